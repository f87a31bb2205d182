"""automtl-compiler: compile a single-task CNN backbone into a multi-task network.

The public API is small: read a backbone into the graph IR, transform it, and generate PyTorch, ONNX or
prototxt; build, run and save a multi-task SuperModel.
"""

from .backends.prototxt import export_prototxt
from .backends.torch_codegen import to_torch
from .build import build_supermodel
from .errors import AutomtlError
from .frontends import load_backbone
from .ir import Graph, Node, load_graph, save_graph
from .nn.policy import Policy
from .nn.supermodel import SuperModel

__version__ = "0.1.0"

__all__ = ["AutomtlError", "Graph", "Node", "Policy", "SuperModel", "build_supermodel", "export_prototxt",
           "load_backbone", "load_graph", "save_graph", "to_torch", "__version__"]
