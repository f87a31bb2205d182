"""Pruning as passes over the multi-task graph: bind the gates, forward the selections, merge, sweep.

``prune_graph(mt, choices)`` composes them: :func:`bind_gates` turns each unit's ``mix`` into a ``select``
of the branch the policy picks; :func:`inline_selects` makes every consumer read that branch directly;
:func:`eliminate_common_subexpressions` merges nodes that apply the same op and attributes to the same
tensors and inputs (the tasks' copies of a shared unit, the image's share conv, ...); and
:func:`eliminate_dead_code` removes the branches and the gates that no output reads. The result is a
tree: a shared trunk that branches where the policies first differ, one output per task (tasks that
share everything share the output node). A conv that several branches run keeps one set of tensor
objects, so its weights are stored once. Each pass returns a :class:`~.infra.PassResult`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import networkx as nx

from ..errors import AutomtlError
from ..ir.graph import Graph
from ..ir.ops_multitask import BRANCHES
from .infra import PassResult, run_passes
from .multitask import MultiTaskGraph


def bind_gates(graph: Graph, plan: Sequence[Sequence[str]]) -> PassResult:
    """Replace each ``mix`` of task k and unit u by a ``select`` of ``plan[k][u]`` (share | specific | skip)."""
    out = graph.copy(share_tensors=True)
    changed = False
    for node in out.nodes():
        if node.op != "mix":
            continue
        task, unit = node.attrs["task"], node.attrs["unit"]
        try:
            choice = plan[task][unit]
        except IndexError:
            raise AutomtlError(f"{node.where}: the plan has no choice for task {task}, unit {unit}") from None
        if choice not in BRANCHES:
            raise AutomtlError(f"{node.where}: choice {choice!r} is not one of {BRANCHES}")
        node.op, node.attrs, node.inputs = "select", {"choice": choice}, node.inputs[:3]
        changed = True
    if changed:
        out.relink()
    return PassResult(out, changed)


def inline_selects(graph: Graph) -> PassResult:
    """Make every reader of a ``select`` read the chosen input, and drop the select."""
    out = graph.copy(share_tensors=True)
    selects = [n for n in out.topological_order() if n.op == "select"]
    for node in selects:
        chosen = node.inputs[BRANCHES.index(node.attrs["choice"])]
        out.replace_uses(node.name, chosen)
        out.remove_node(node.name)
    return PassResult(out, bool(selects))


def _cse_key(node: Any, inputs: tuple[str, ...]) -> Any:
    attrs = tuple(sorted((k, repr(v)) for k, v in node.attrs.items()))
    tensors = tuple(sorted((k, id(t)) for k, t in (*node.params.items(), *node.buffers.items())))
    return node.op, attrs, tensors, inputs


def eliminate_common_subexpressions(graph: Graph) -> PassResult:
    """Merge each node into an earlier one with the same op, attributes, tensor objects and inputs."""
    out = graph.copy(share_tensors=True)
    seen: dict[Any, str] = {}
    changed = False
    for node in out.topological_order():
        if node.op == "input":
            continue
        key = _cse_key(node, tuple(node.inputs))
        if key in seen:
            out.replace_uses(node.name, seen[key])
            out.remove_node(node.name)
            changed = True
        else:
            seen[key] = node.name
    return PassResult(out, changed)


def eliminate_dead_code(graph: Graph) -> PassResult:
    """Remove every node (inputs included) that no graph output depends on."""
    out = graph.copy(share_tensors=True)
    live: set[str] = set()
    for o in out.outputs:
        live |= out.upstream(o)
    dead = [n for n in reversed(out.topological_order()) if n.name not in live]
    for node in dead:
        out.remove_node(node.name)
    return PassResult(out, bool(dead))


def keep_outputs(graph: Graph, indices: Sequence[int]) -> Graph:
    """``graph`` (structure copied, tensors shared) returning only the outputs at ``indices``."""
    out = graph.copy(share_tensors=True)
    out.set_outputs([graph.outputs[i] for i in indices])
    return out


def plan_of(mt: MultiTaskGraph, choices: Mapping[str, Mapping[str, str]]) -> list[list[str]]:
    """``choices[task][conv]`` as the plan ``bind_gates`` reads: [task index][unit index]."""
    return [[choices[t][u.conv] for u in mt.units] for t in mt.tasks]


def prune_graph(mt: MultiTaskGraph, choices: Mapping[str, Mapping[str, str]], name: str | None = None) -> Graph:
    """The compact graph of ``mt`` under a discrete policy ``choices[task][conv]``; tensors shared, not copied."""
    plan = plan_of(mt, choices)
    graph, _ = run_passes(mt.graph, [lambda g: bind_gates(g, plan), inline_selects,
                                     eliminate_common_subexpressions, eliminate_dead_code])
    graph.name = name or f"{mt.trunk.name}_compact"
    return graph


def common_trunk_end(graph: Graph) -> str | None:
    """The last node that every path from the image to every output passes through (None if only the image).

    Its value is what all outputs have in common: per-output gradients with respect to it cost a pass
    through the output-specific part only. ``graph`` must have one input (bind the gates first).
    """
    inputs = graph.inputs
    if len(inputs) != 1 or not graph.outputs:
        return None
    g = nx.DiGraph(graph.nx)
    sink = object()
    g.add_edges_from((o, sink) for o in graph.outputs)
    end = nx.immediate_dominators(g, inputs[0])[sink]
    return None if end == inputs[0] else end
