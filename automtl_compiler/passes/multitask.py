"""Multi-task insertion: a trunk and its tasks -> the multi-task IR graph with every branch as real nodes.

Every ``conv2d`` is policy-able. A conv whose only consumer is a ``batchnorm2d`` forms a *unit* with it:
the batch norm belongs to the branch (the share branch uses the backbone's batch norm, the specific
branch a task-owned copy), so that a policy that shares a unit computes exactly the backbone's
conv + batch norm and shared work can be computed once for all tasks. The *skip* branch is the identity
when the unit's input and output shapes are equal, and otherwise a 1x1 projection (conv without bias,
then batch norm) onto the conv's output grid: same stride, and the input shifted/cropped so that each
output position reads the input at the centre of the conv's window; for ordinary convs ("same"
padding) that shift is zero, which is exactly AutoMTL's projection. For a depthwise conv that changes
shape, the projection is a dense 1x1 conv (as in AutoMTL), so skipping it mixes channels.

The multi-task graph has the trunk's image input and a ``gates`` input [tasks, units, 3]. For each task
it holds a copy of the trunk whose backbone nodes hold the trunk's tensors (the same objects: shared
weights), and in which each unit is its three branches - the share conv (+ batch norm), a specific conv
(+ batch norm) holding the task's own tensors, the skip identity or projection - combined by a ``mix``
node reading the task's gates. Output ``k`` is task ``k``'s feature map. This is the one definition of
what a branch is: the SuperModel is generated from this graph, and pruning is passes over it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..backends.names import Namer, check_task_name
from ..errors import AutomtlError
from ..ir.graph import Graph, Node
from ..ir.ops import get_op
from ..ir.ops_multitask import BRANCHES

__all__ = ["BRANCHES", "MultiTaskGraph", "SkipSpec", "Unit", "conv_depths", "insert_task_branches", "skip_spec",
           "validate_tasks"]


@dataclass(frozen=True)
class SkipSpec:
    """The skip branch of a unit: identity, or a 1x1 projection with padding (negative pads crop)."""

    identity: bool
    in_channels: int
    out_channels: int
    stride: tuple[int, int] = (1, 1)
    pad: tuple[int, int, int, int] = (0, 0, 0, 0)

    def num_parameters(self) -> int:
        """Parameters of the projection (conv weight + batch norm affine), 0 for the identity."""
        return 0 if self.identity else self.in_channels * self.out_channels + 2 * self.out_channels


@dataclass(frozen=True)
class Unit:
    """A policy-able unit: one conv and the batch norm that follows it, if any."""

    conv: str
    bn: str | None
    depth: int
    skip: SkipSpec

    @property
    def output(self) -> str:
        """The trunk node whose value the unit produces."""
        return self.bn or self.conv


@dataclass
class MultiTaskGraph:
    """The multi-task IR of a trunk: ``graph`` (inputs: image, gates; an output per task) and its units.

    ``trunk`` is the single-task backbone (ending at the feature node) it was made from; ``module_paths``
    maps each node of ``graph`` that is a module to where a SuperModel keeps it: ``backbone.<key>`` for
    every task's copy of trunk node (one module, shared), ``specific.<key>.<task>.{conv,bn}`` and
    ``skip.<key>.<task>.{conv,bn}``, ``<key>`` being the unit conv's (or node's) attribute name
    (:class:`~automtl_compiler.backends.names.Namer` over the trunk, as ``to_torch`` names it).
    """

    trunk: Graph
    graph: Graph
    tasks: list[str]
    units: list[Unit]
    gates: str
    module_paths: dict[str, str]
    module_names: dict[str, str]

    @property
    def feature_node(self) -> str:
        """The trunk node every task's head reads."""
        return self.trunk.outputs[0]

    @property
    def num_levels(self) -> int:
        """D: the number of conv depth levels (largest 0-based depth + 1)."""
        return max((u.depth for u in self.units), default=0) + 1

    def unit(self, name: str) -> Unit:
        """The unit whose conv is ``name``."""
        for u in self.units:
            if u.conv == name:
                return u
        raise AutomtlError(f"'{name}' is not a policy-able conv; known: {', '.join(u.conv for u in self.units)}")


def skip_spec(graph: Graph, conv: str) -> SkipSpec:
    """Compute the skip branch of ``conv`` so that its output shape always equals the conv's."""
    node = graph.node(conv)
    x, y = graph.node(node.inputs[0]).shape, node.shape
    assert x is not None and y is not None
    if tuple(x[1:]) == tuple(y[1:]):
        return SkipSpec(True, x[1], y[1])
    a = node.attrs
    pads: list[int] = []
    for i in (1, 0):  # F.pad order: last dim (width) first
        lead = a["padding"][i] - a["dilation"][i] * (a["kernel_size"][i] - 1) // 2
        low = (y[2 + i] - 1) * a["stride"][i] + 1 - x[2 + i] - lead  # fewest trailing pads that fit
        high = y[2 + i] * a["stride"][i] - x[2 + i] - lead  # most trailing pads that still fit
        pads += [lead, min(max(0, low), high)]
    return SkipSpec(False, x[1], y[1], tuple(a["stride"]), tuple(pads))  # type: ignore[arg-type]


def conv_depths(graph: Graph, order: list[Node] | None = None) -> dict[str, int]:
    """For each conv, the number of convs on the longest path before it (0 for the first conv).

    ``order`` is the graph's topological order when the caller has it already."""
    depth: dict[str, int] = {}
    before: dict[str, int] = {}
    for node in order or graph.topological_order():
        seen = max((before[i] for i in node.inputs), default=0)
        if node.op == "conv2d":
            depth[node.name] = seen
            seen += 1
        before[node.name] = seen
    return depth


def validate_tasks(tasks: list[str]) -> list[str]:
    """Task names must be unique identifiers usable as module keys (they name modules and ONNX outputs).

    See :func:`~automtl_compiler.backends.names.check_task_name`: no keywords, no torch attributes such as
    ``training`` or ``forward``, NFKC-normal.
    """
    if not tasks:
        raise AutomtlError("no tasks given; give at least one task (name and head)")
    for t in tasks:
        check_task_name(t)
    dup = sorted({t for t in tasks if tasks.count(t) > 1})
    if dup:
        raise AutomtlError(f"duplicate task name(s) {dup}; each task needs its own name")
    return list(tasks)


def find_units(trunk: Graph, order: list[Node] | None = None) -> list[Unit]:
    """The policy-able units of a trunk, in topological order (``order``, when the caller has it)."""
    order = order or trunk.topological_order()
    depths = conv_depths(trunk, order)
    units = []
    for node in order:
        if node.op != "conv2d":
            continue
        users = trunk.consumers(node.name)
        bn = None
        if len(users) == 1 and trunk.node(users[0]).op == "batchnorm2d" and node.name not in trunk.outputs:
            bn = users[0]
        units.append(Unit(node.name, bn, depths[node.name], skip_spec(trunk, node.name)))
    if not units:
        raise AutomtlError(f"graph '{trunk.name}' has no conv2d before the feature node: nothing to share or "
                           "specialise")
    return units


def _skip_weight(spec: SkipSpec) -> torch.Tensor:
    """A fresh projection weight, initialised from torch's global generator as ``nn.Conv2d`` initialises it."""
    weight = torch.empty(spec.out_channels, spec.in_channels, 1, 1)
    torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    return weight


_MODULE_OPS: dict[str, bool] = {}


def _is_module(node: Node) -> bool:
    """Whether ``node``'s op lowers to a module (which then has a path in the SuperModel), not a function.

    Lowering is per op, never per attribute value, so one lowering per op answers for all its nodes.
    """
    if node.op not in _MODULE_OPS:
        lowering = get_op(node.op, node.where).lower(node.attrs, node.params, node.buffers)
        _MODULE_OPS[node.op] = lowering.module is not None
    return _MODULE_OPS[node.op]


class _Builder:
    """Adds the nodes of the multi-task graph, each name unique, recording module paths."""

    def __init__(self, trunk: Graph, order: list[Node], tasks: list[str], units: list[Unit]) -> None:
        self.trunk, self.tasks, self.units = trunk, tasks, units
        self.graph = Graph(f"{trunk.name}_multitask")
        names = Namer()
        self.keys = {n.name: names(n.name) for n in order if n.op != "input" and _is_module(n)}
        self.paths: dict[str, str] = {}

    def fresh(self, name: str) -> str:
        while name in self.graph:
            name += "_"
        return name

    def add(self, name: str, like: Node, inputs: list[str], path: str | None, *, attrs: dict | None = None,
            op: str | None = None, params: dict | None = None, buffers: dict | None = None,
            shape: tuple[int, ...] | None = None) -> str:
        name = self.fresh(name)
        self.graph.add_node(name, op or like.op, inputs, like.attrs if attrs is None else attrs,
                            params=like.params if params is None else params,
                            buffers=like.buffers if buffers is None else buffers, source=like.source,
                            shape=like.shape if shape is None else shape, normalised=attrs is None)
        if path is not None:
            self.paths[name] = path
        return name

    def copy_of(self, node: Node, k: int, inputs: list[str]) -> str:
        """Task ``k``'s copy of a trunk node: the same tensors, its own name unless ``k`` is 0."""
        name = node.name if k == 0 else f"{node.name}/{self.tasks[k]}"
        key = self.keys.get(node.name)
        return self.add(name, node, inputs, None if key is None else f"backbone.{key}")

    def unit(self, u: Unit, k: int, x: str, gates: str, skip_weights: dict) -> str:
        """The three branches of unit ``u`` for task ``k`` on input ``x``, mixed by the task's gates."""
        t, key = self.tasks[k], self.keys[u.conv]
        conv = self.trunk.node(u.conv)
        bn = self.trunk.node(u.bn) if u.bn else None
        share = self.copy_of(conv, k, [x])
        specific = self.add(f"{u.conv}/{t}/specific", conv, [x], f"specific.{key}.{t}.conv",
                            params={n: v.clone() for n, v in conv.params.items()},
                            buffers={n: v.clone() for n, v in conv.buffers.items()})
        if bn is not None:
            share = self.copy_of(bn, k, [share])
            specific = self.add(f"{bn.name}/{t}/specific", bn, [specific], f"specific.{key}.{t}.bn",
                                params={n: v.clone() for n, v in bn.params.items()},
                                buffers={n: v.clone() for n, v in bn.buffers.items()})
        skip = x
        if not u.skip.identity:
            s = u.skip
            if any(s.pad):
                n, c, h, w = self.graph.node(x).shape  # type: ignore[misc]
                padded = (n, c, h + s.pad[2] + s.pad[3], w + s.pad[0] + s.pad[1])
                skip = self.add(f"{u.conv}/{t}/skip_pad", conv, [skip], None, op="pad", attrs={"pads": s.pad},
                                params={}, buffers={}, shape=padded)
            skip = self.add(f"{u.conv}/{t}/skip", conv, [skip], f"skip.{key}.{t}.conv",
                            attrs={"out_channels": s.out_channels, "kernel_size": 1, "stride": s.stride},
                            params={"weight": skip_weights[u.conv, t]}, buffers={})
            bn_attrs = {"eps": bn.attrs["eps"], "momentum": bn.attrs["momentum"]} if bn is not None else {}
            c = s.out_channels
            skip = self.add(f"{u.conv}/{t}/skip_bn", conv, [skip], f"skip.{key}.{t}.bn", op="batchnorm2d",
                            attrs=bn_attrs, params={"weight": torch.ones(c), "bias": torch.zeros(c)},
                            buffers={"running_mean": torch.zeros(c), "running_var": torch.ones(c),
                                     "num_batches_tracked": torch.zeros((), dtype=torch.long)})
        return self.add(f"{u.output}/{t}/mix", conv, [share, specific, skip, gates], None, op="mix",
                        attrs={"task": k, "unit": self.units.index(u)}, params={}, buffers={})


def insert_task_branches(trunk: Graph, tasks: list[str]) -> MultiTaskGraph:
    """Make the multi-task graph of ``trunk`` (a graph whose single output is the feature map) for ``tasks``.

    The trunk is not changed; the multi-task graph's backbone nodes hold its tensors, the specific
    branches copies of them, the skip projections fresh ones (from torch's global generator, in unit-major
    order, as ``nn.Conv2d`` initialises a weight, so that a seeded build gives the same numbers each time).
    """
    tasks = validate_tasks(list(tasks))
    if len(trunk.outputs) != 1:
        raise AutomtlError(f"graph '{trunk.name}' must end at one feature node; truncate it first")
    order = trunk.topological_order()
    units = find_units(trunk, order)
    skip_weights = {(u.conv, t): _skip_weight(u.skip) for u in units if not u.skip.identity for t in tasks}
    b = _Builder(trunk, order, tasks, units)
    for node in order:
        if node.op == "input":
            b.graph.add_input(node.name, node.shape or (), source=node.source)
    gates = b.fresh("gates")
    b.graph.add_input(gates, (len(tasks), len(units), 3), source="policy gates [tasks, units, 3]")
    by_conv = {u.conv: u for u in units}
    in_unit = {u.bn for u in units if u.bn}
    outputs = []
    for k in range(len(tasks)):
        env: dict[str, str] = {}
        for node in order:
            if node.op == "input":
                env[node.name] = node.name
            elif node.name in by_conv:
                u = by_conv[node.name]
                env[u.output] = b.unit(u, k, env[node.inputs[0]], gates, skip_weights)
            elif node.name not in in_unit:
                env[node.name] = b.copy_of(node, k, [env[i] for i in node.inputs])
        outputs.append(env[trunk.outputs[0]])
    b.graph.set_outputs(outputs)
    module_names = {n: b.keys[n] for n in b.keys}
    return MultiTaskGraph(trunk, b.graph, tasks, units, gates, b.paths, module_names)
