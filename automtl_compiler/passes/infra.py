"""What every graph pass returns, and how passes compose.

A pass is a function ``Graph -> PassResult``: it never edits its input (it works on
``graph.copy(share_tensors=True)``, so weights stay shared by identity) and says whether it changed
anything, so that a pipeline can stop, log or check it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

from ..ir.graph import Graph


class PassResult(NamedTuple):
    """The graph a pass made and whether it differs from the pass's input."""

    graph: Graph
    changed: bool


GraphPass = Callable[[Graph], PassResult]


def run_passes(graph: Graph, passes: Sequence[GraphPass]) -> PassResult:
    """Apply ``passes`` in order; changed when any of them changed the graph."""
    changed = False
    for graph_pass in passes:
        graph, did = graph_pass(graph)
        changed = changed or did
    return PassResult(graph, changed)
