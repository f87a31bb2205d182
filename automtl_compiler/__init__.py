"""automtl-compiler: compile a single-task CNN backbone into a multi-task network.

The public API is small: read a backbone into the graph IR, transform it, and generate PyTorch or ONNX.
"""

from .backends.torch_codegen import to_torch
from .build import build_supermodel
from .errors import AutomtlError
from .frontends import load_backbone
from .ir import Graph, Node, load_graph, save_graph

__version__ = "0.1.0"


def export_prototxt(graph: Graph, path, *, weights: bool = True):  # type: ignore[no-untyped-def]
    """Write ``graph`` as a Caffe prototxt (weights in a safetensors sidecar); see backends.prototxt."""
    from .backends.prototxt import export_prototxt as _export

    return _export(graph, path, weights=weights)


__all__ = ["build_supermodel", "AutomtlError", "Graph", "Node", "export_prototxt", "load_backbone", "load_graph", "save_graph",
           "to_torch", "__version__"]
