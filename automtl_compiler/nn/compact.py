"""CompactModel: a SuperModel pruned to one discrete policy, the deployable multi-task network.

``prune(supermodel, policy)`` keeps, per task, only the branch the policy picks at every unit; shared
work is computed once (the pruning pass is a common-subexpression elimination across tasks), shared
weights are stored once, and policy logits, unused copies and unused projections are gone.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from ..backends.names import check_task_name
from ..backends.torch_codegen import to_torch
from ..errors import AutomtlError
from ..ir.graph import Graph
from ..passes.fold_bn import fold_batchnorm
from ..passes.prune import prune_graph
from .compact_io import load_compact, save_compact
from .cost import graph_cost
from .heads import apply_head
from .policy import Policy
from .supermodel import SuperModel


def pruned_graph(supermodel: SuperModel, policy: Policy, *, copy_tensors: bool = True) -> Graph:
    """The IR of ``supermodel`` pruned to ``policy`` (:func:`~automtl_compiler.passes.prune.prune_graph`).

    The graph holds detached copies of the weights it keeps (a tensor shared by several nodes stays one
    tensor); with ``copy_tensors=False`` it holds the SuperModel's own tensors, detached: enough to count
    its cost.
    """
    policy.check(supermodel.tasks, supermodel.unit_names)
    graph = prune_graph(supermodel.synced_graph(), policy.choices)
    memo: dict[int, torch.Tensor] = {}

    def own(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in memo:
            memo[id(t)] = t.detach().clone() if copy_tensors else t.detach()
        return memo[id(t)]

    for node in graph.nodes():
        node.params = {k: own(v) for k, v in node.params.items()}
        node.buffers = {k: own(v) for k, v in node.buffers.items()}
    return graph


def prune(supermodel: SuperModel, policy: Policy, *, fold_bn: bool = False) -> CompactModel:
    """Prune ``supermodel`` to the discrete ``policy``; the result owns copies of the weights it keeps.

    ``fold_bn`` folds every conv + batch norm into one conv (inference only: the model then has no
    batch-norm statistics to update).
    """
    graph = pruned_graph(supermodel, policy)
    if fold_bn:
        graph = fold_batchnorm(graph).graph
    heads = {t: copy.deepcopy(supermodel.heads[t]) for t in supermodel.tasks}
    counts = supermodel.parameter_counts()
    trunk = supermodel.mt.trunk
    head_params = {t: sum(p.numel() for p in h.parameters()) for t, h in heads.items()}
    reference = {"supermodel_params": counts["total"],
                 "single_task_params": sum(trunk.num_parameters() + head_params[t] for t in heads),
                 "trunk_params": trunk.num_parameters(), "trunk_flops": trunk.flops()}
    return CompactModel(graph, supermodel.tasks, heads, policy, reference)


class CompactModel(nn.Module):
    """A pruned multi-task network: ``model(x)`` -> {task: output}; ``model(x, task=t)`` runs only t's nodes.

    ``graph`` is the pruned IR (one output per task, in task order); ``trunk`` is its generated code, whose
    module attributes follow ``to_torch``'s naming (``trunk.meta["automtl_module_names"]``: node -> attribute).
    """

    def __init__(self, graph: Graph, tasks: list[str], heads: dict[str, nn.Module], policy: Policy,
                 reference: dict[str, int] | None = None) -> None:
        super().__init__()
        if len(graph.outputs) != len(tasks):
            raise AutomtlError(f"the pruned graph has {len(graph.outputs)} outputs for {len(tasks)} tasks")
        for t in tasks:
            check_task_name(t)
        self.graph = graph
        self.tasks = list(tasks)
        self.policy = policy
        self.reference = dict(reference or {})
        self.trunk = to_torch(graph, class_name="CompactTrunk")
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})
        self._per_task: dict[str, fx.GraphModule] = {}

    def forward(self, x: torch.Tensor, task: str | None = None) -> Any:
        if task is not None:
            if task not in self.heads:
                raise AutomtlError(f"unknown task '{task}'; the model's tasks are {self.tasks}")
            return apply_head(self.heads[task], self._trunk_for(task)(x), x)
        feats = self.trunk(x)
        feats = (feats,) if isinstance(feats, torch.Tensor) else feats
        return {t: apply_head(self.heads[t], f, x) for t, f in zip(self.tasks, feats)}

    def _trunk_for(self, task: str) -> fx.GraphModule:
        """Generated code for one task: the trunk's graph with every node that task does not need removed."""
        if task not in self._per_task:
            graph = copy.deepcopy(self.trunk.graph)
            output = next(n for n in graph.nodes if n.op == "output")
            value = output.args[0]
            index = self.tasks.index(task)
            output.args = (value[index] if isinstance(value, (tuple, list)) else value,)
            gm = fx.GraphModule(self.trunk, graph, f"CompactTrunk_{task}")
            gm.graph.eliminate_dead_code()
            gm.recompile()
            self._per_task[task] = gm
        return self._per_task[task]

    def _apply(self, fn: Any, recurse: bool = True) -> CompactModel:
        self._per_task.clear()  # per-task code refers to modules by object: rebuild after .to()/.half()
        return super()._apply(fn, recurse)

    def task_nodes(self, task: str) -> list[str]:
        """IR nodes that ``task`` needs (its output and everything upstream)."""
        return sorted(self.graph.upstream(self.graph.outputs[self.tasks.index(task)]))

    def num_parameters(self) -> int:
        """Parameters of the compact model, each shared tensor counted once, heads included."""
        return self.graph.num_parameters() + sum(p.numel() for p in self.heads.parameters())

    def summary(self) -> str:
        """Parameters and trunk FLOPs of the compact model against the SuperModel and T single-task models."""
        ref = self.reference
        params = self.num_parameters()
        flops = self.graph.flops()
        lines = [f"CompactModel: {len(self.tasks)} task(s) {', '.join(self.tasks)}; {len(self.graph)} trunk nodes",
                 "policy: " + "; ".join(f"{t} " + ", ".join(f"{k} {v}" for k, v in c.items())
                                         for t, c in self.policy.counts().items())]
        rows = [("compact model", params, flops)]
        if ref:
            rows += [("supermodel", ref["supermodel_params"], None),
                     (f"{len(self.tasks)} single-task models", ref["single_task_params"],
                      ref["trunk_flops"] * len(self.tasks))]
        for name, p, f in rows:
            lines.append(f"  {name:<24} parameters {p:>14,}" + (f"   trunk FLOPs {f:>16,}" if f is not None else ""))
        if ref:
            lines.append(f"  parameter saving vs single-task models: {1 - params / ref['single_task_params']:.1%}; "
                         f"trunk FLOPs vs {len(self.tasks)} single-task trunks: "
                         f"{flops / (ref['trunk_flops'] * len(self.tasks)):.2f}x")
        cost = graph_cost(self.graph, self.tasks, self.heads)
        lines.append(f"  multiply-accumulates per sample, heads included: all tasks in one call {cost['all_tasks']:,} = "
                     f"{cost['ratio']:.2f}x the tasks one by one ({cost['one_by_one']:,}; smaller is better)")
        return "\n".join(lines)

    # ------------------------------------------------------------ files
    def save(self, directory: str | Path) -> Path:
        """Write the model to a directory: IR JSON + safetensors (shared weights once), heads, policy."""
        return save_compact(self, directory)

    @classmethod
    def load(cls, directory: str | Path, heads: dict[str, nn.Module] | None = None,
             trust_code: bool = False) -> CompactModel:
        """Read a model written by :meth:`save`; heads made by hand are passed in ``heads``.

        ``trust_code=True`` lets heads recorded as ``package.module:Class`` be imported (only for files
        you trust: importing runs code); built-in and registered heads never need it.
        """
        return load_compact(cls, directory, heads, trust_code=trust_code)
