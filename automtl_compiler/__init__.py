"""automtl-compiler: compile a single-task CNN backbone into a multi-task network.

The public API is small: read a backbone into the graph IR, transform it, and generate PyTorch, ONNX or
prototxt; build, run and save a multi-task SuperModel.
"""

from .backends.prototxt import export_prototxt
from .backends.torch_codegen import to_torch
from .build import build_supermodel
from .data import get_dataset, register_dataset
from .errors import AutomtlError
from .frontends import load_backbone
from .ir import Graph, Node, load_graph, save_graph
from .nn.compact import CompactModel, prune
from .nn.heads import create_head, register_head
from .nn.policy import Policy
from .nn.supermodel import SuperModel
from .tasks import get_task, register_task
from .version import __version__

__all__ = [
    "AutomtlError",
    "CompactModel",
    "Graph",
    "InferenceSession",
    "Node",
    "Policy",
    "SuperModel",
    "__version__",
    "build_supermodel",
    "create_head",
    "export_onnx",
    "export_prototxt",
    "get_dataset",
    "get_task",
    "load_backbone",
    "load_graph",
    "prune",
    "register_dataset",
    "register_head",
    "register_task",
    "save_graph",
    "to_torch",
]


def __getattr__(name: str):  # type: ignore[no-untyped-def]
    """ONNX export and the onnxruntime session load onnx/onnxruntime only when first used."""
    if name == "export_onnx":
        from .backends.onnx_export import export_onnx

        return export_onnx
    if name == "InferenceSession":
        from .runtime import InferenceSession

        return InferenceSession
    raise AttributeError(f"module 'automtl_compiler' has no attribute {name!r}")
