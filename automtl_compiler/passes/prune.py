"""Pruning: a multi-task graph and a discrete policy -> one IR graph computing every task.

It is a common-subexpression elimination over the tasks' paths: each task walks the trunk choosing its
branch at every unit, and a node that applies the same weights to the same input value as an earlier
one *is* that node. The result is a tree: a shared trunk that branches where the policies first differ,
with one output per task (tasks that share everything share the output node). Where a shared conv must
run on several branches (different inputs), the copies hold the same tensor objects, so the weights are
stored once (``to_torch`` makes them one Parameter, serialisation one record).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..ir.graph import Graph
from .multitask import MultiTaskGraph, Unit

Tensors = tuple[dict[str, Any], dict[str, Any]]
TensorSource = Callable[[str, str, str | None], Tensors]


def prune_graph(mt: MultiTaskGraph, choices: dict[str, dict[str, str]], tensors: TensorSource,
                name: str | None = None) -> Graph:
    """Build the pruned graph. ``choices[task][conv]`` is share | specific | skip.

    ``tensors(kind, ir_node, task)`` gives (params, buffers) for ``kind`` in backbone (task None),
    specific_conv, specific_bn, skip_conv, skip_bn; it must return the same tensor objects when asked
    twice, so that shared weights stay one tensor.
    """
    out = Graph(name or f"{mt.graph.name}_compact")
    memo: dict[Any, str] = {}

    def emit(key: Any, base: str, op: str, attrs: dict[str, Any], inputs: list[str], task: str,
             kind: str, source_node: str) -> str:
        full = (key, tuple(inputs))
        if full in memo:
            return memo[full]
        node_name = base if base not in out else f"{base}/{task}"
        while node_name in out:
            node_name += "_"
        params, buffers = tensors(kind, source_node, None if kind == "backbone" else task)
        out.add_node(node_name, op, inputs, attrs, params=params, buffers=buffers, source=source_node)
        memo[full] = node_name
        return node_name

    units = {u.conv: u for u in mt.units}
    in_unit = {u.bn for u in mt.units if u.bn}
    outputs = []
    for task in mt.tasks:
        env: dict[str, str] = {}
        for node in mt.graph.topological_order():
            if node.op == "input":
                if node.name not in out:
                    out.add_input(node.name, node.shape or (), source=node.source)
                env[node.name] = node.name
            elif node.name in units:
                u = units[node.name]
                env[u.output] = _emit_unit(emit, mt, u, task, choices[task][u.conv], env[node.inputs[0]])
            elif node.name in in_unit:
                continue
            else:
                env[node.name] = emit(("backbone", node.name), node.name, node.op, node.attrs,
                                      [env[i] for i in node.inputs], task, "backbone", node.name)
        outputs.append(env[mt.feature_node])
    out.set_outputs(outputs)
    return out.materialise(seed=None)


def _emit_unit(emit: Callable[..., str], mt: MultiTaskGraph, u: Unit, task: str, choice: str, x: str) -> str:
    conv, bn = mt.graph.node(u.conv), mt.graph.node(u.bn) if u.bn else None
    if choice == "share":
        y = emit(("backbone", u.conv), u.conv, "conv2d", conv.attrs, [x], task, "backbone", u.conv)
        return emit(("backbone", u.bn), u.bn, "batchnorm2d", bn.attrs, [y], task, "backbone", u.bn) if bn else y
    if choice == "specific":
        y = emit(("specific", u.conv, task), f"{u.conv}/{task}", "conv2d", conv.attrs, [x], task, "specific_conv",
                 u.conv)
        if bn is None:
            return y
        return emit(("specific", u.bn, task), f"{u.bn}/{task}", "batchnorm2d", bn.attrs, [y], task, "specific_bn",
                    u.conv)
    if u.skip.identity:
        return x
    s = u.skip
    if any(s.pad):
        x = emit(("skip_pad", u.conv), f"{u.conv}/skip_pad", "pad", {"pads": s.pad}, [x], task, "none", u.conv)
    y = emit(("skip", u.conv, task), f"{u.conv}/{task}/skip", "conv2d",
             {"out_channels": s.out_channels, "kernel_size": 1, "stride": s.stride}, [x], task, "skip_conv", u.conv)
    bn_attrs = {"eps": bn.attrs["eps"], "momentum": bn.attrs["momentum"]} if bn else {}
    return emit(("skip_bn", u.conv, task), f"{u.conv}/{task}/skip_bn", "batchnorm2d", bn_attrs, [y], task,
                "skip_bn", u.conv)
