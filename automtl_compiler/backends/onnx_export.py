"""IR and CompactModel -> ONNX through the generated torch modules, verified against onnxruntime before it is kept.

The file appears at its path only after onnxruntime has run it and matched PyTorch; a failed export
leaves no file behind (and never touches an existing file at that path).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ..errors import AutomtlError, one_line
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
        _torch_export(module, inputs, tmp, opset, list(graph.outputs), axes, True, False, names_in)
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


# ---------------------------------------------------------------------------------------------- CompactModel

OPSET_RANGE = (13, 21)
METADATA_PREFIX = "automtl."
METADATA_FORMAT = "automtl-onnx"


class _Outputs(torch.nn.Module):
    """A CompactModel as torch.onnx sees it: one input, a tuple of outputs in task order."""

    def __init__(self, model: torch.nn.Module, tasks: list[str], single: str | None) -> None:
        super().__init__()
        self.model = model
        self.tasks = tasks
        self.single = single

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.single is not None:
            return (self.model(x, task=self.single),)
        outs = self.model(x)
        return tuple(outs[t] for t in self.tasks)


def export_onnx(model: Any, path: str | Path, *, input_shape: Sequence[int] | None = None, opset: int | None = None,
                dynamic_batch: bool = True, dynamic_hw: bool = False, verify: bool = True, task: str | None = None,
                atol: float = 1e-4, seed: int = 0, constant_folding: bool = True) -> Path:
    """Write a :class:`~automtl_compiler.nn.compact.CompactModel` as one ONNX graph and verify it.

    The graph has one input named ``input`` (N, C, H, W) and one output per task, named after the task, in
    ``model.tasks`` order; with ``task=`` only that task's output and the nodes it needs (the model's
    ``model(x, task=...)`` path). ``input_shape`` defaults to the compact graph's input shape. The batch axis
    is dynamic unless ``dynamic_batch=False``; ``dynamic_hw`` makes height and width dynamic too.

    Weights: a tensor the compact model holds once (a shared conv reached on several branches) is one
    initialiser. torch's exporter already maps a tied Parameter to one initialiser; with
    ``constant_folding`` (the default) it also folds each conv + batch norm into one conv, and the folded
    copies of a shared pair are identical, which torch links through ``Identity`` nodes. A clean-up pass
    then points every use at one initialiser, drops the ``Identity`` nodes and stores initialisers with
    identical contents once. ``constant_folding=False`` keeps batch norms as nodes (onnxruntime fuses them
    when it loads the model), and then initialisers correspond one to one to the model's distinct tensors.

    The file has ``metadata_props`` (``automtl.tasks``, ``automtl.output_shapes``, ``automtl.policy``, ...;
    values are JSON) and passes ``onnx.checker.check_model(full_check=True)``. With ``verify`` (the default)
    it is run in onnxruntime (CPU) on seeded random inputs - batch 1 and 3 when the batch is dynamic (else
    the given batch), and a second height and width when those are dynamic - and compared with the
    PyTorch model in eval mode: each output must satisfy ``max |onnx - torch| <= atol * max(1, max |torch|)``
    (absolute for outputs of magnitude up to 1, relative to the largest value for larger logits, since
    float32 round-off grows with magnitude). Any failure raises AutomtlError and leaves no file at ``path``
    (an existing file there is left as it was).
    """
    path = Path(path)
    opset = DEFAULT_OPSET if opset is None else opset
    if isinstance(opset, bool) or not isinstance(opset, int) or not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        raise AutomtlError(f"ONNX opset {opset!r} is not supported; use {OPSET_RANGE[0]} to {OPSET_RANGE[1]} "
                           f"(default {DEFAULT_OPSET})")
    tasks = _check_compact(model, task)
    shape = _input_shape(model, input_shape)
    wrapper = _Outputs(model, list(model.tasks), task)
    names_out = [task] if task is not None else list(model.tasks)
    gen = torch.Generator().manual_seed(seed)
    example = torch.randn(*shape, generator=gen)
    axes: dict[str, dict[int, str]] | None = None
    if dynamic_batch or dynamic_hw:
        axes = {"input": {}}
        for name in names_out:
            axes[name] = {}
        if dynamic_batch:
            for name in axes:
                axes[name][0] = "batch"
        if dynamic_hw:
            axes["input"].update({2: "height", 3: "width"})
    was_training = model.training
    wrapper.eval()  # torch.onnx restores the wrapper's mode after export, recursively: keep it eval
    try:
        try:
            with torch.no_grad():
                ref = wrapper(example)
        except (RuntimeError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise AutomtlError(f"the model cannot run on an input of shape {list(shape)} ({first}); choose "
                               "another input shape") from None
        if axes is not None and dynamic_hw:
            for name, out in zip(names_out, ref):
                if out.dim() == 4:
                    axes[name].update({2: f"{name}_height", 3: f"{name}_width"})
        meta = _metadata(model, tasks, shape, names_out, ref, axes, opset)

        def write(tmp: Path) -> None:
            _torch_export(wrapper, example, tmp, opset, names_out, axes, constant_folding, dynamic_hw)
            proto = onnx.load(str(tmp))
            _dedupe_initialisers(proto)
            save_checked(proto, meta, tmp, path)
            if verify:
                inputs = _verification_inputs(shape, dynamic_batch, dynamic_hw, seed)
                verify_compact_onnx(tmp, wrapper, inputs, names_out, atol=atol, shown_as=path)

        atomic_write(path, write)
    finally:
        model.train(was_training)
    return path


def save_checked(proto: onnx.ModelProto, meta: dict[str, str], tmp: Path, path: str | Path) -> None:
    """Give ``proto`` exactly the ``metadata_props`` ``meta``, check it with ``onnx.checker`` (full check) and
    save it to ``tmp``; a model the checker refuses is an AutomtlError and nothing is saved."""
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise AutomtlError(f"the exported ONNX model for {path} fails onnx.checker ({one_line(e)}); the file was "
                           "not written. Report this with the model") from None
    onnx.save(proto, str(tmp))


def _check_compact(model: Any, task: str | None) -> list[str]:
    if not (isinstance(model, torch.nn.Module) and hasattr(model, "graph") and hasattr(model, "tasks")
            and hasattr(model, "heads")):
        raise AutomtlError(f"export_onnx takes a CompactModel (from automtl_compiler.nn.compact.prune or "
                           f"CompactModel.load), not a {type(model).__name__}; for a backbone graph use "
                           "export_graph_onnx")
    if task is not None and task not in model.tasks:
        raise AutomtlError(f"unknown task '{task}'; the model's tasks are {list(model.tasks)}")
    return [task] if task is not None else list(model.tasks)


def _input_shape(model: Any, input_shape: Sequence[int] | None) -> tuple[int, ...]:
    graph_in = model.graph.node(model.graph.inputs[0]).shape
    if input_shape is None:
        if not graph_in:
            raise AutomtlError("the compact graph records no input shape; pass input_shape=(N, C, H, W)")
        return tuple(int(d) for d in graph_in)
    try:
        shape = tuple(int(d) for d in input_shape)
    except (TypeError, ValueError):
        raise AutomtlError(f"input_shape {input_shape!r} is not a shape; give (N, C, H, W)") from None
    if len(shape) != 4 or any(d <= 0 for d in shape):
        raise AutomtlError(f"input_shape {list(shape)} must be four positive numbers (N, C, H, W)")
    if graph_in and len(graph_in) == 4 and shape[1] != graph_in[1]:
        raise AutomtlError(f"input_shape {list(shape)} has {shape[1]} channels but the model takes {graph_in[1]}")
    return shape


def _metadata(model: Any, tasks: list[str], shape: tuple[int, ...], names: list[str],
              ref: tuple[torch.Tensor, ...], axes: dict[str, dict[int, str]] | None, opset: int) -> dict[str, str]:
    from ..version import __version__

    def dims(name: str, t_shape: Sequence[int]) -> list[int | str]:
        named = (axes or {}).get(name, {})
        return [named.get(i, int(d)) for i, d in enumerate(t_shape)]

    fields: dict[str, Any] = {
        "format": {"name": METADATA_FORMAT, "version": 1},
        "tasks": tasks,
        "model_tasks": list(model.tasks),
        "input_name": "input",
        "input_shape": dims("input", shape),
        "example_input_shape": list(shape),
        "output_shapes": {n: dims(n, r.shape) for n, r in zip(names, ref)},
        "example_output_shapes": {n: list(r.shape) for n, r in zip(names, ref)},
        "policy": model.policy.to_json() if getattr(model, "policy", None) is not None else None,
        "opset": opset,
        "automtl_version": __version__,
    }
    return {METADATA_PREFIX + k: json.dumps(v) for k, v in fields.items()}


def _torch_export(module: torch.nn.Module, example: torch.Tensor | tuple[torch.Tensor, ...], tmp: Path, opset: int,
                  names_out: list[str], axes: dict[str, dict[int, str]] | None, constant_folding: bool,
                  dynamic_hw: bool, names_in: list[str] | None = None) -> None:
    """torch.onnx.export (TorchScript exporter) with its noise silenced and its failures as one-line errors."""
    example = example if isinstance(example, tuple) else (example,)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()), _native_output_silenced(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, example, str(tmp), dynamo=False, opset_version=opset,
                              input_names=names_in or ["input"], output_names=names_out, dynamic_axes=axes,
                              do_constant_folding=constant_folding)
    except AutomtlError:
        raise
    except Exception as e:  # noqa: BLE001 - torch raises many types (UnsupportedOperatorError, RuntimeError...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        first = first.split(" [Caused by")[0].split(" Please feel free")[0]
        if "adaptive" in first and dynamic_hw:
            hint = "export without dynamic height and width (adaptive pooling to a size other than 1 needs a known input size)"
        elif "adaptive" in first:
            hint = ("choose an input size whose feature map is a multiple of the pooling output (e.g. 224 for VGG's "
                    "7x7 pooling) or a feature node before the pooling")
        else:
            hint = "try another opset, or report this with the model"
        raise AutomtlError(f"torch could not export the model to ONNX opset {opset}: {first}; {hint}") from None


@contextlib.contextmanager
def _native_output_silenced() -> Any:
    """Silence file descriptors 1 and 2 for a while: when an export fails, torch's ONNX exporter dumps its
    whole IR graph from C++ (its log switch is always on), which would bury the one-line error."""
    import os
    import sys
    import tempfile

    try:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
    except (OSError, ValueError, AttributeError):  # no real descriptors (embedded interpreters, some notebooks)
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _dedupe_initialisers(proto: onnx.ModelProto) -> dict[str, str]:
    """Store initialisers with identical contents once and drop ``Identity`` nodes that only copy one.

    Returns the renaming applied (old name -> kept name). Graph inputs and outputs keep their names.
    """
    graph = proto.graph
    keep: dict[tuple[Any, ...], str] = {}
    rename: dict[str, str] = {}
    for init in graph.initializer:
        data = init.raw_data if init.HasField("raw_data") else numpy_helper.to_array(init).tobytes()
        key = (init.data_type, tuple(init.dims), hashlib.sha256(data).hexdigest(), len(data))
        if key in keep:
            rename[init.name] = keep[key]
        else:
            keep[key] = init.name
    inits = {i.name for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    dropped = []
    for node in graph.node:
        if node.op_type == "Identity" and len(node.input) == 1 and node.input[0] in inits \
                and node.output[0] not in outputs:
            rename[node.output[0]] = rename.get(node.input[0], node.input[0])
            dropped.append(node)
    for node in dropped:
        graph.node.remove(node)
    if not rename:
        return rename
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    used = {name for node in graph.node for name in node.input} | outputs
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    for inp in [i for i in graph.input if i.name in rename]:
        graph.input.remove(inp)
    for info in [v for v in graph.value_info if v.name in rename]:
        graph.value_info.remove(info)
    return rename


def _verification_inputs(shape: tuple[int, ...], dynamic_batch: bool, dynamic_hw: bool,
                         seed: int) -> list[torch.Tensor]:
    """Seeded inputs: batch 1 and 3 (dynamic batch) or the given batch; a second H, W when those are dynamic."""
    gen = torch.Generator().manual_seed(seed + 1)
    n, c, h, w = shape
    batches = [1, 3] if dynamic_batch else [n]
    inputs = [torch.randn(b, c, h, w, generator=gen) for b in batches]
    if dynamic_hw:
        inputs.append(torch.randn(2 if dynamic_batch else n, c, h + 32, w + 32, generator=gen))
    return inputs


def verify_compact_onnx(path: str | Path, module: torch.nn.Module, inputs: Sequence[torch.Tensor],
                        output_names: list[str], *, atol: float = 1e-4, shown_as: str | Path | None = None) -> float:
    """Run ``path`` in onnxruntime (CPU) on each input and compare every output with ``module``.

    ``module(x)`` returns a tuple in ``output_names`` order. An output passes when
    ``max |onnx - torch| <= atol * max(1, max |torch|)``. Returns the worst ratio of difference to allowance
    (<= 1); raises AutomtlError naming the output, the input shape and the difference otherwise.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types
        raise AutomtlError(f"onnxruntime cannot load the exported model ({' '.join(str(e).split())[:300]}); "
                           f"{shown_as or path} was not written") from None
    worst = 0.0
    where = shown_as or path
    for x in inputs:
        with torch.no_grad():
            want = module(x)
        want = (want,) if isinstance(want, torch.Tensor) else tuple(want)
        try:
            got = session.run(output_names, {"input": x.numpy()})
        except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types
            raise AutomtlError(f"ONNX verification failed: onnxruntime cannot run the model on an input of shape "
                               f"{list(x.shape)} ({' '.join(str(e).split())[:300]}); {where} was not "
                               "written") from None
        worst = max(worst, check_outputs(output_names, got, want, atol=atol, input_shape=tuple(x.shape), where=where))
    return worst


def check_outputs(names: Sequence[str], got: Sequence[np.ndarray], want: Sequence[torch.Tensor], *, atol: float,
                  input_shape: tuple[int, ...], where: str | Path) -> float:
    """Compare onnxruntime's outputs with PyTorch's, output by output: each must have the same shape and
    ``max |onnx - torch| <= atol * max(1, max |torch|)``. Returns the worst ratio of difference to allowance;
    raises AutomtlError naming the output, the input shape and the difference otherwise."""
    worst = 0.0
    for name, g, w in zip(names, got, want):
        w = w.detach().cpu().numpy()
        if g.shape != w.shape:
            raise AutomtlError(f"ONNX verification failed: output '{name}' has shape {list(g.shape)} in "
                               f"onnxruntime but {list(w.shape)} in PyTorch for input {list(input_shape)}; "
                               f"{where} was not written")
        scale = max(1.0, float(np.max(np.abs(w)))) if w.size else 1.0
        diff = float(np.max(np.abs(g - w))) if w.size else 0.0
        allowed = atol * scale
        if not diff <= allowed:  # also catches NaN
            raise AutomtlError(
                f"ONNX verification failed: output '{name}' differs from PyTorch by {diff:.3g} for input "
                f"{list(input_shape)} (allowed {allowed:.3g} = {atol:g} x max(1, max |output| = {scale:.3g})); "
                f"{where} was not written. Check the model in eval mode, or report this with the model")
        worst = max(worst, diff / allowed)
    return worst
