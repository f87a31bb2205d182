"""The graph IR: a :class:`Graph` of :class:`Node` s on a ``networkx.DiGraph``.

A node has an op from the registry, normalised attributes, named parameters and buffers (tensors), its
input node names (in argument order) and its output shape (batch dimension included). Edges of the
DiGraph run from producer to consumer; the ordered inputs live on the node, because an op may take the
same tensor twice.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch

from .. import limits
from ..errors import GraphError, ShapeError
from .ops import OpDef, Shape, get_op, tensor_shapes


@dataclass
class Node:
    """One operation of the graph."""

    name: str
    op: str
    inputs: list[str] = field(default_factory=list)
    attrs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    shape: Shape | None = None
    source: str | None = None

    @property
    def where(self) -> str:
        """How error messages name this node: its name, and where it came from when known."""
        return f"node '{self.name}'" + (f" ({self.source})" if self.source and self.source != self.name else "")

    def num_parameters(self) -> int:
        """Number of learnable scalars of this node (buffers excluded)."""
        return sum(t.numel() for t in self.params.values())


class Graph:
    """A dataflow graph of registry ops with shapes and parameters."""

    def __init__(self, name: str = "graph") -> None:
        self.name = name
        self.outputs: list[str] = []
        self._g = nx.DiGraph()
        self._order = 0

    # ------------------------------------------------------------ building
    def add_node(self, name: str, op: str, inputs: Iterable[str] = (), attrs: dict[str, Any] | None = None, *,
                 params: dict[str, torch.Tensor] | None = None, buffers: dict[str, torch.Tensor] | None = None,
                 shape: Shape | None = None, source: str | None = None, check: bool = True,
                 normalised: bool = False) -> Node:
        """Add a node; its inputs must already exist unless ``check`` is False (loaders validate later).

        ``normalised`` says that ``attrs`` are another node's (already checked and normalised), so they are
        taken as they are: what passes that copy nodes use.
        """
        node = Node(name, op, list(inputs), {}, dict(params or {}), dict(buffers or {}),
                    tuple(shape) if shape is not None else None, source)
        where = node.where
        if name in self._g:
            raise GraphError(f"{where}: a node of this name already exists")
        opdef = get_op(op, where)
        node.attrs = dict(attrs or {}) if normalised else opdef.normalise_attrs(attrs or {}, where)
        if check:
            opdef.check_arity(len(node.inputs), where)
            for i in node.inputs:
                if i not in self._g:
                    raise GraphError(f"{where}: input '{i}' is not produced by any node; add it first")
        self._g.add_node(name, node=node, order=self._order)
        self._order += 1
        self._link(node)
        return node

    def add_input(self, name: str, shape: Shape, source: str | None = None) -> Node:
        """Add a graph input of a fixed shape."""
        return self.add_node(name, "input", attrs={"shape": tuple(shape)}, shape=tuple(shape), source=source)

    def _link(self, node: Node) -> None:
        for i in node.inputs:
            if i in self._g:
                self._g.add_edge(i, node.name)

    def relink(self) -> None:
        """Rebuild the edges from the nodes' input lists (after nodes were added with ``check=False``)."""
        self._g.remove_edges_from(list(self._g.edges))
        for n in self.nodes():
            self._link(n)

    def set_outputs(self, names: Iterable[str]) -> None:
        """Declare which nodes' results the graph returns, in order."""
        names = list(names)
        for n in names:
            if n not in self._g:
                raise GraphError(f"output '{n}' is not a node of graph '{self.name}'")
        self.outputs = names

    def remove_node(self, name: str) -> None:
        """Remove a node that nothing consumes."""
        users = self.consumers(name)
        if users or name in self.outputs:
            raise GraphError(f"node '{name}' is still used by {users or 'the graph outputs'}")
        self._g.remove_node(name)

    def replace_uses(self, old: str, new: str) -> None:
        """Make every consumer of ``old`` (and the outputs) read ``new`` instead."""
        for user in self.consumers(old):
            node = self.node(user)
            node.inputs = [new if i == old else i for i in node.inputs]
            self._g.remove_edge(old, user)
            self._g.add_edge(new, user)
        self.outputs = [new if o == old else o for o in self.outputs]

    # ------------------------------------------------------------ queries
    def __contains__(self, name: object) -> bool:
        return name in self._g

    def __len__(self) -> int:
        return self._g.number_of_nodes()

    def __iter__(self) -> Iterator[Node]:
        return iter(self.topological_order())

    def node(self, name: str) -> Node:
        """The node called ``name``."""
        try:
            return self._g.nodes[name]["node"]
        except KeyError:
            raise GraphError(f"graph '{self.name}' has no node '{name}'") from None

    def nodes(self) -> list[Node]:
        """All nodes in insertion order."""
        return [d["node"] for _, d in sorted(self._g.nodes(data=True), key=lambda kv: kv[1]["order"])]

    @property
    def inputs(self) -> list[str]:
        """Names of the graph's input nodes, in insertion order."""
        return [n.name for n in self.nodes() if n.op == "input"]

    def consumers(self, name: str) -> list[str]:
        """Nodes that read the output of ``name``."""
        return sorted(self._g.successors(name), key=lambda n: self._g.nodes[n]["order"])

    def topological_order(self) -> list[Node]:
        """Nodes in a dependency order, ties broken by insertion order (stable across runs)."""
        if not nx.is_directed_acyclic_graph(self._g):
            cycle = [u for u, _ in nx.find_cycle(self._g)]
            raise GraphError(f"graph '{self.name}' has a cycle through {' -> '.join(cycle)}")
        order = nx.lexicographical_topological_sort(self._g, key=lambda n: self._g.nodes[n]["order"])
        return [self._g.nodes[n]["node"] for n in order]

    @property
    def nx(self) -> nx.DiGraph:
        """The underlying networkx graph (nodes carry the Node under the key 'node'); read it, don't edit it."""
        return self._g

    def upstream(self, name: str) -> set[str]:
        """``name`` and every node it depends on."""
        return nx.ancestors(self.nx, name) | {name}

    def copy(self, *, share_tensors: bool = False) -> Graph:
        """A deep copy: passes transform copies, never their input.

        With ``share_tensors`` the copy's nodes hold the same tensor objects (only the structure is new):
        what passes that rewrite structure use, so that weights stay shared by identity.
        """
        if not share_tensors:
            return copy.deepcopy(self)
        out = Graph(self.name)
        out.outputs = list(self.outputs)
        out._order = self._order
        for name, data in self._g.nodes(data=True):
            n = data["node"]
            node = Node(n.name, n.op, list(n.inputs), dict(n.attrs), dict(n.params), dict(n.buffers), n.shape,
                        n.source)
            out._g.add_node(name, node=node, order=data["order"])
        out._g.add_edges_from(self._g.edges)
        return out

    # ------------------------------------------------------------ shapes and tensors
    def materialise(self, seed: int | None = 0, *, complete: bool = True) -> Graph:
        """Infer every output shape, check parameter shapes, and initialise missing parameters.

        Missing tensors are created from the op's init rule with a generator seeded by ``seed`` (Kaiming
        for convolutions); with ``seed=None`` a missing tensor is an error. With ``complete=False`` only
        shapes are inferred and the tensors present are checked (for loaders that fill tensors next).
        Returns ``self``.
        """
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        plan = []
        new_params = 0
        for node in self.topological_order():
            opdef = get_op(node.op, node.where)
            opdef.check_arity(len(node.inputs), node.where)
            ins = [self.node(i).shape for i in node.inputs]
            try:
                shape = tuple(opdef.shape(node.attrs, ins))  # type: ignore[arg-type]
                expected = tensor_shapes(opdef, node.attrs, ins, node.where)  # type: ignore[arg-type]
            except ShapeError as e:
                raise ShapeError(f"{node.where}: {e} (input shapes {[list(s) for s in ins]})") from None
            if node.shape is not None and tuple(node.shape) != shape:
                raise ShapeError(f"{node.where}: recorded shape {list(node.shape)} conflicts with the "
                                 f"inferred {list(shape)}")
            node.shape = shape
            buffer_names = opdef.buffers(node.attrs, ins)  # type: ignore[arg-type]
            missing = {k: s for k, s in expected.items() if k not in node.params and k not in node.buffers}
            if not complete:
                expected = {k: s for k, s in expected.items() if k not in missing}
            elif missing and gen is None:
                raise GraphError(f"{node.where}: missing tensor(s) {sorted(missing)}")
            elif missing:
                new_params += sum(math.prod(s) for k, s in missing.items() if k not in buffer_names)
            plan.append((node, opdef, expected, buffer_names, missing if complete else {}))
        if new_params:
            limits.check("MAX_PARAMS", self.num_parameters() + new_params, "the number of parameters",
                         f"graph '{self.name}'")
        for node, opdef, expected, buffer_names, missing in plan:
            if missing:
                assert gen is not None
                for key, value in opdef.init(node.attrs, expected, gen).items():
                    if key in missing:
                        (node.buffers if key in buffer_names else node.params)[key] = value
            self._check_tensors(node, opdef, expected, buffer_names)
        return self

    def tensor_specs(self) -> dict[str, tuple[dict[str, Shape], dict[str, Shape]]]:
        """Per node, the (parameter, buffer) shapes its op expects; needs inferred shapes."""
        out = {}
        for node in self.nodes():
            opdef = get_op(node.op, node.where)
            ins = [self.node(i).shape for i in node.inputs]
            out[node.name] = (opdef.params(node.attrs, ins), opdef.buffers(node.attrs, ins))  # type: ignore[arg-type]
        return out

    @staticmethod
    def _check_tensors(node: Node, opdef: OpDef, expected: dict[str, Shape], buffer_names: dict[str, Shape]) -> None:
        have = {**node.params, **node.buffers}
        for key, t in have.items():
            if not isinstance(t, torch.Tensor):
                raise GraphError(f"{node.where}: '{key}' is a {type(t).__name__}, not a tensor")
        unused = sorted(set(have) - set(expected))
        if unused:
            raise GraphError(f"{node.where}: unused tensor(s) {unused}; op '{node.op}' takes {sorted(expected)}")
        for key, want in expected.items():
            if key not in have:
                raise GraphError(f"{node.where}: missing tensor '{key}' of shape {list(want)}")
            if tuple(have[key].shape) != tuple(want):
                raise ShapeError(f"{node.where}: tensor '{key}' has shape {list(have[key].shape)}, "
                                 f"expected {list(want)}")
            opdef.check_tensor_dtype(key, have[key], node.where)
            if (key in buffer_names) != (key in node.buffers):
                raise GraphError(f"{node.where}: '{key}' must be a {'buffer' if key in buffer_names else 'parameter'}")

    def validate(self) -> Graph:
        """Check the whole graph; raise GraphError listing every problem found. Returns ``self``.

        Checks: dangling inputs, cycles, unknown ops and attributes, arity, missing outputs, shape
        conflicts, missing, unused or mis-shaped parameters.
        """
        problems: list[str] = []
        error: type[GraphError] = GraphError
        for node in self.nodes():
            try:
                opdef = get_op(node.op, node.where)
                opdef.normalise_attrs(node.attrs, node.where)
                opdef.check_arity(len(node.inputs), node.where)
            except GraphError as e:
                problems.append(str(e))
            for i in node.inputs:
                if i not in self._g:
                    problems.append(f"{node.where}: input '{i}' is not produced by any node (dangling)")
        if not self.outputs:
            problems.append(f"graph '{self.name}' declares no outputs")
        problems += [f"output '{o}' is not a node" for o in self.outputs if o not in self._g]
        if not problems:
            try:
                self.copy().materialise(seed=None)
            except GraphError as e:
                problems.append(str(e))
                error = type(e)
        if problems:
            raise error(f"graph '{self.name}' is invalid:\n  " + "\n  ".join(problems))
        return self

    def num_parameters(self) -> int:
        """Learnable scalars in the graph (buffers excluded); a tensor held by several nodes counts once."""
        unique = {id(t): t for n in self.nodes() for t in n.params.values()}
        return sum(t.numel() for t in unique.values())

    def node_flops(self, node: Node) -> int:
        """FLOPs (multiply-accumulates) of one node, from its op's rule."""
        opdef = get_op(node.op, node.where)
        return int(opdef.flops(node.attrs, [self.node(i).shape for i in node.inputs], node.shape))  # type: ignore

    def flops(self) -> int:
        """Total FLOPs (multiply-accumulates) of one forward pass at the recorded input shape."""
        return sum(self.node_flops(n) for n in self.nodes())

    def summary(self) -> str:
        """A readable table: one row per node (name, op, inputs, shape, parameters, FLOPs) and totals."""
        rows = [("name", "op", "inputs", "output shape", "params", "FLOPs")]
        for n in self.topological_order():
            rows.append((n.name, n.op, ", ".join(n.inputs), "x".join(map(str, n.shape or ())),
                         f"{n.num_parameters():,}", f"{self.node_flops(n):,}"))
        widths = [min(max(len(r[i]) for r in rows), 48) for i in range(len(rows[0]))]
        fmt = "  ".join(f"{{:{'>' if i >= 4 else '<'}{w}}}" for i, w in enumerate(widths))
        lines = [fmt.format(*(c if len(c) <= 48 else c[:45] + "..." for c in r)) for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.append("-" * len(lines[0]))
        lines.append(f"{self.name}: {len(self)} nodes, {self.num_parameters():,} parameters, "
                     f"{self.flops() / 1e9:.3f} GFLOPs (multiply-accumulates), outputs: {', '.join(self.outputs)}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Graph({self.name!r}, {len(self)} nodes, outputs={self.outputs})"
