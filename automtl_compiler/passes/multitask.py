"""Multi-task insertion: find the policy-able units of a backbone and what their branches are.

Every ``conv2d`` is policy-able. A conv whose only consumer is a ``batchnorm2d`` forms a *unit* with it:
the batch norm belongs to the branch (the share branch uses the backbone's batch norm, the specific
branch a task-owned copy), so that a policy that shares a unit computes exactly the backbone's
conv + batch norm and shared work can be computed once for all tasks. The *skip* branch is the identity
when the unit's input and output shapes are equal, and otherwise a 1x1 projection (conv without bias,
then batch norm) onto the conv's output grid: same stride, and the input shifted/cropped so that each
output position reads the input at the centre of the conv's window; for ordinary convs ("same"
padding) that shift is zero, which is exactly AutoMTL's projection. For a depthwise conv that changes
shape, the projection is a dense 1x1 conv (as in AutoMTL), so skipping it mixes channels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx

from ..backends.names import check_task_name
from ..errors import AutomtlError
from ..ir.graph import Graph

BRANCHES = ("share", "specific", "skip")


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
        """The IR node whose value the unit produces."""
        return self.bn or self.conv


@dataclass
class MultiTaskGraph:
    """A backbone trunk (ending at the feature node) with its policy-able units and the tasks."""

    graph: Graph
    tasks: list[str]
    units: list[Unit] = field(default_factory=list)

    @property
    def feature_node(self) -> str:
        return self.graph.outputs[0]

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


def conv_depths(graph: Graph) -> dict[str, int]:
    """For each conv, the number of convs on the longest path before it (0 for the first conv)."""
    depth: dict[str, int] = {}
    before: dict[str, int] = {}
    for node in graph.topological_order():
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


def insert_task_branches(graph: Graph, tasks: list[str]) -> MultiTaskGraph:
    """Find the units of a trunk (a graph whose single output is the feature map) for ``tasks``."""
    tasks = validate_tasks(list(tasks))
    if len(graph.outputs) != 1:
        raise AutomtlError(f"graph '{graph.name}' must end at one feature node; truncate it first")
    depths = conv_depths(graph)
    units = []
    for node in graph.topological_order():
        if node.op != "conv2d":
            continue
        users = graph.consumers(node.name)
        bn = None
        if len(users) == 1 and graph.node(users[0]).op == "batchnorm2d" and node.name not in graph.outputs:
            bn = users[0]
        units.append(Unit(node.name, bn, depths[node.name], skip_spec(graph, node.name)))
    if not units:
        raise AutomtlError(f"graph '{graph.name}' has no conv2d before the feature node: nothing to share or "
                           "specialise")
    assert nx.is_directed_acyclic_graph(graph.nx)
    return MultiTaskGraph(graph, tasks, units)
