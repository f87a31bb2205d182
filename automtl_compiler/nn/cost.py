"""What a policy costs to run: multiply-accumulates of every task in one call against the tasks one by one.

The sample stage ranks candidate policies by accuracy *and* this cost, and the report states it beside the
measured onnxruntime latency. Counting is exact for the trunk (each IR op's FLOP rule on the pruned graph)
and uses torch's FLOP counter for the heads, which every task runs once either way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..ir.graph import Graph
from ..passes.prune import prune_graph
from .heads import apply_head
from .policy import Policy

if TYPE_CHECKING:
    from .compact import CompactModel
    from .supermodel import SuperModel


def head_macs(head: nn.Module, feature_shape: tuple[int, ...], input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one head on a feature of ``feature_shape`` (batch 1) for an input of
    ``input_shape``, counted by torch's FLOP counter (which counts two FLOPs per multiply-accumulate)."""
    # imported here, not at the top: torch.utils.flop_counter loads triton (~75 MB)
    from torch.utils.flop_counter import FlopCounterMode

    device = next(iter(head.parameters()), torch.empty(0)).device
    feature = torch.zeros((1, *feature_shape[1:]), device=device)
    x = torch.zeros((1, *input_shape[1:]), device=device)
    was_training = head.training
    head.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            apply_head(head, feature, x)
    finally:
        head.train(was_training)
    return counter.get_total_flops() // 2


def graph_cost(graph: Graph, tasks: list[str], heads: Mapping[str, nn.Module]) -> dict[str, Any]:
    """Multiply-accumulates per sample (the IR's FLOP rules: convolutions as multiply-accumulates,
    normalisation and elementwise ops per element) of a pruned graph with one output per task and the
    tasks' heads: all tasks in one call (``all_tasks``: shared work once) and the tasks one after the other
    (``one_by_one``: each task's own path, shared work again for every task), heads included; ``ratio`` =
    all_tasks / one_by_one (1/T when everything is shared, 1 when nothing is)."""
    inputs = [n for n in graph.nodes() if n.op == "input"]
    batch = max(1, inputs[0].shape[0])  # the graph's recorded batch; counts are per sample
    per_task = {}
    head_total = 0
    for task, out in zip(tasks, graph.outputs):
        head = head_macs(heads[task], graph.node(out).shape, inputs[0].shape)
        head_total += head
        per_task[task] = sum(graph.node_flops(graph.node(n)) for n in graph.upstream(out)) // batch + head
    all_tasks = graph.flops() // batch + head_total
    one_by_one = sum(per_task.values())
    return {"all_tasks": all_tasks, "one_by_one": one_by_one, "per_task": per_task,
            "ratio": all_tasks / one_by_one if one_by_one else 1.0}


def compact_cost(compact: CompactModel) -> dict[str, Any]:
    """:func:`graph_cost` of a compact model."""
    return graph_cost(compact.graph, compact.tasks, compact.heads)


def policy_cost(supermodel: SuperModel, policy: Policy) -> dict[str, Any]:
    """:func:`graph_cost` of ``supermodel`` pruned to ``policy``, without copying weights or generating
    code (the sample stage prices every candidate)."""
    policy.check(supermodel.tasks, supermodel.unit_names)
    graph = prune_graph(supermodel.synced_graph(), policy.choices)
    return graph_cost(graph, supermodel.tasks, supermodel.heads)
