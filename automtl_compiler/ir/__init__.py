"""Graph IR: nodes, the op registry, and (de)serialisation."""

from .graph import Graph, Node
from .ops import REGISTRY, Attr, Lowering, OpDef, get_op
from .serialize import load_graph, save_graph

__all__ = ["REGISTRY", "Attr", "Graph", "Lowering", "Node", "OpDef", "get_op", "load_graph", "save_graph"]
