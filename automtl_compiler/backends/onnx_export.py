"""IR -> ONNX through the generated torch module, verified against onnxruntime before it is kept.

The file appears at its path only after onnxruntime has run it and matched PyTorch; a failed export
leaves no file behind (and never touches an existing file at that path).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import AutomtlError
from ..ir.graph import Graph
from ..ir.serialize import atomic_write
from .torch_codegen import to_torch

DEFAULT_OPSET = 17


def export_graph_onnx(graph: Graph, path: str | Path, *, opset: int = DEFAULT_OPSET, dynamic_batch: bool = True,
                      verify: bool = True, atol: float = 1e-4, seed: int = 0) -> Path:
    """Write ``graph`` as an ONNX model with one input per graph input and one output per graph output.

    With ``verify`` the model is run in onnxruntime (CPU) on a seeded random input and compared with the
    PyTorch module (max abs difference ``atol``); a mismatch raises AutomtlError and writes nothing.
    """
    if not 13 <= opset <= 21:
        raise AutomtlError(f"ONNX opset {opset} is not supported; use 13 to 21")
    path = Path(path)
    module = to_torch(graph).eval()
    names_in = [n for n in graph.inputs]
    shapes = [graph.node(n).shape for n in names_in]
    gen = torch.Generator().manual_seed(seed)
    inputs = tuple(torch.randn(*s, generator=gen) for s in shapes)  # type: ignore[misc]
    axes = {n: {0: "batch"} for n in names_in + graph.outputs} if dynamic_batch else None

    def write(tmp: Path) -> None:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(module, inputs, str(tmp), dynamo=False, opset_version=opset, input_names=names_in,
                              output_names=list(graph.outputs), dynamic_axes=axes, do_constant_folding=True)
        if verify:
            verify_onnx(tmp, module, inputs, list(graph.outputs), atol=atol)

    atomic_write(path, write)
    return path


def verify_onnx(path: Path, module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output_names: list[str],
                *, atol: float = 1e-4) -> float:
    """Run ``path`` in onnxruntime on ``inputs`` and compare with ``module``; return the max abs difference."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
    got = session.run(output_names, feed)
    with torch.no_grad():
        want = module(*inputs)
    want = [want] if isinstance(want, torch.Tensor) else list(want)
    worst = max(float(np.max(np.abs(g - w.numpy()))) for g, w in zip(got, want))
    if not worst <= atol:
        raise AutomtlError(f"ONNX verification failed: onnxruntime differs from PyTorch by {worst:.3g} "
                           f"(allowed {atol:g}); the file was not written. Report this with the model")
    return worst
