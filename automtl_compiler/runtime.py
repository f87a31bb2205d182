"""Run exported multi-task models with onnxruntime, on the GPU when one is really usable.

``InferenceSession(path)`` opens a file written by :func:`automtl_compiler.backends.onnx_export.export_onnx`
(any single-input ONNX file works) and returns ``{output name: array}`` from :meth:`InferenceSession.run`;
for our files the output names are the task names.

Choosing the execution provider. ``provider="auto"`` (the default) asks onnxruntime for the CUDA provider
only when both hold:

* the installed onnxruntime has it: ``"CUDAExecutionProvider" in onnxruntime.get_available_providers()``
  (true for ``onnxruntime-gpu`` even on a machine without a GPU), and
* a CUDA device is really present: ``torch.cuda.is_available()`` and ``torch.cuda.device_count() > 0``.

Otherwise it uses the CPU provider and never requests CUDA, because onnxruntime-gpu logs loud errors when
CUDA is requested without a GPU. ``provider="cuda"`` without a usable GPU is an AutomtlError saying what is
missing; ``provider="cpu"`` always works.

Getting the CUDA provider on a GPU machine (Linux x86_64):

1. an NVIDIA GPU with a driver recent enough for the CUDA major version the ``onnxruntime-gpu`` wheel
   was built for (``onnxruntime.capi.build_and_package_info.cuda_version``; 13.0 for the wheel pinned
   here, 12.x for older wheels); ``nvidia-smi`` shows the driver and the highest CUDA version it supports;
2. the CUDA runtime libraries (cudart, cuBLAS, cuFFT, cuRAND) of that major version and cuDNN 9. PyTorch's
   CUDA wheels install them as ``nvidia-*`` pip packages, and onnxruntime reuses what ``import torch``
   loaded when the major versions agree (importing automtl_compiler imports torch first); otherwise call
   ``onnxruntime.preload_dlls()`` or install the CUDA toolkit and cuDNN system-wide;
3. only ``onnxruntime-gpu`` installed (not also the CPU-only ``onnxruntime``, which shadows it).

``python -c "import onnxruntime as o; print(o.get_available_providers())"`` must list
``CUDAExecutionProvider``, and ``InferenceSession(path, provider="cuda").providers`` then starts with it.
"""

from __future__ import annotations

import json
import math
import statistics
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import limits
from .errors import AutomtlError, FileFormatError, require_file

PROVIDERS = ("auto", "cpu", "cuda")
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
METADATA_PREFIX = "automtl."
# ops onnxruntime never folds at load (random or control flow)
_NOT_FOLDED = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
               "If", "Loop", "Scan"}

def _wheel_cuda_version() -> str | None:
    """The CUDA version the installed onnxruntime was built for (None for CPU-only builds)."""
    try:
        from onnxruntime.capi import build_and_package_info as info
    except ImportError:
        return None
    return getattr(info, "cuda_version", None) or None


def cuda_help() -> str:
    """What a user needs for the CUDA provider (said in errors)."""
    version = _wheel_cuda_version()
    cuda = f"CUDA {version.split('.')[0]}.x" if version else "the CUDA major version of the onnxruntime-gpu wheel"
    return (f"to use it: install onnxruntime-gpu (Linux x86_64), not the CPU-only onnxruntime package, on a "
            f"machine with an NVIDIA GPU and a driver for {cuda}, with the {cuda} runtime libraries and cuDNN 9 "
            f"(PyTorch's CUDA wheels bring them; see automtl_compiler.runtime); or use provider 'cpu'")


def _ort() -> Any:
    import onnxruntime as ort

    return ort


def cuda_device_present() -> tuple[bool, str]:
    """Whether a CUDA device is really there (checked through torch), and if not, why."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency of the package
        return False, "torch is not installed, so no CUDA device could be checked"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = bool(torch.cuda.is_available())
        count = torch.cuda.device_count() if available else 0
    if available and count > 0:
        return True, ""
    detail = "; ".join(" ".join(str(w.message).split())[:200] for w in caught)
    reason = "no CUDA GPU is visible (torch.cuda.is_available() is False: no NVIDIA GPU or driver, or " \
             "CUDA_VISIBLE_DEVICES hides it"
    if torch.version.cuda is None:
        reason += f"; this torch {torch.__version__} is a CPU-only build"
    return False, reason + (f"; torch says: {detail}" if detail else "") + ")"


def cuda_status() -> tuple[bool, str]:
    """(usable, reason): the CUDA provider is usable when onnxruntime has it and a CUDA device is present."""
    ort = _ort()
    available = ort.get_available_providers()
    if CUDA not in available:
        return False, (f"this onnxruntime {ort.__version__} has no CUDAExecutionProvider (it has "
                       f"{', '.join(available)})")
    present, reason = cuda_device_present()
    if not present:
        return False, reason
    return True, ""


def select_providers(provider: str = "auto") -> list[str]:
    """The onnxruntime providers to request for ``provider`` (auto | cpu | cuda), CPU always last."""
    if provider not in PROVIDERS:
        raise AutomtlError(f"unknown provider '{provider}'; use one of {', '.join(PROVIDERS)}")
    if provider == "cpu":
        return [CPU]
    usable, reason = cuda_status()
    if provider == "cuda" and not usable:
        raise AutomtlError(f"the CUDA provider is not usable: {reason}; {cuda_help()}")
    return [CUDA, CPU] if usable else [CPU]


def read_metadata(props: dict[str, str]) -> dict[str, Any]:
    """``automtl.*`` metadata values parsed from JSON (prefix dropped); other keys kept as strings.

    A value nested deeper than MAX_JSON_DEPTH is a LimitError naming the key.
    """
    out: dict[str, Any] = {}
    for key, value in props.items():
        if key.startswith(METADATA_PREFIX):
            try:
                out[key[len(METADATA_PREFIX):]] = limits.loads_json(value, f"metadata '{key}'")
            except json.JSONDecodeError:
                out[key[len(METADATA_PREFIX):]] = value
        else:
            out[key] = value
    return out


def _value_bytes(value_type: Any) -> int | None:
    """Bytes of a tensor of an inferred ONNX type, or None when its shape or type is not fully known."""
    from onnx import helper

    if not value_type.HasField("tensor_type") or not value_type.tensor_type.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value_type.tensor_type.shape.dim]
    if any(d < 0 for d in dims):
        return None
    try:
        itemsize = helper.tensor_dtype_to_np_dtype(value_type.tensor_type.elem_type).itemsize
    except Exception:  # noqa: BLE001 - strings and exotic types: count 8 bytes a value
        itemsize = 8
    return math.prod(dims) * max(itemsize, 1)


def folding_check(path: Path) -> bool:
    """Bound what onnxruntime's constant folding would allocate when it opens ``path``.

    Runs onnx's shape inference (with data propagation) and adds up the sizes of the results of every
    node that onnxruntime can evaluate at load time (all inputs constant, or the shape of a tensor of a
    static shape). More than MAX_FOLD_BYTES is a LimitError naming the file and the node. Returns False
    when some such result has a size that cannot be known, so that the caller switches constant folding
    off instead of letting it allocate without bound.
    """
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - onnxruntime reports unreadable files itself
        return False
    g = inferred.graph
    types = {v.name: v.type for v in [*g.input, *g.value_info, *g.output]}
    constant = {i.name for i in g.initializer}
    total, bounded = 0, True
    for node in g.node:
        inputs = [t for t in node.input if t]
        if node.op_type in _NOT_FOLDED or node.domain not in ("", "ai.onnx"):
            continue
        static_shape = node.op_type in ("Shape", "Size") and inputs and inputs[0] in types \
            and _value_bytes(types[inputs[0]]) is not None
        if not (static_shape or all(t in constant for t in inputs)):
            continue
        for out in node.output:
            if not out:
                continue
            constant.add(out)
            size = _value_bytes(types[out]) if out in types else None
            if size is None:
                bounded = False
                continue
            total += size
            limits.check("MAX_FOLD_BYTES", total, "the size in bytes of the constants onnxruntime would evaluate "
                         f"when opening the model (up to node '{node.name or node.op_type}')", str(path))
    return bounded


class InferenceSession:
    """An onnxruntime session over an exported model: ``run(x) -> {task: array}``.

    ``provider``: ``auto`` (CUDA when usable - see the module docstring - else CPU), ``cpu`` or ``cuda``
    (an AutomtlError when no usable GPU). ``threads`` sets onnxruntime's intra-op threads (default: its
    own choice, one per core); ``spin=False`` stops idle worker threads from spinning, so that several
    sessions in one process do not take each other's cores. Graph optimisations are at ORT_ENABLE_ALL (constant folding, conv + batch
    norm + activation fusion, layout optimisations).

    Attributes: ``providers`` (what the session really uses, first = preferred), ``tasks`` (output names,
    in order), ``input_name``, ``input_shape`` (ints, or names for dynamic axes), ``metadata`` (the file's
    ``automtl.*`` metadata parsed from JSON: tasks, output shapes, policy, ...).
    """

    def __init__(self, path: str | Path, provider: str = "auto", threads: int | None = None,
                 device_id: int = 0, spin: bool = True) -> None:
        ort = _ort()
        self.path = require_file(path, "ONNX model")
        requested = select_providers(provider)
        if threads is not None and threads < 1:
            raise AutomtlError(f"threads must be at least 1, got {threads}")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if threads is not None:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        if not spin:  # idle worker threads sleep at once (fair timing of several sessions in one process)
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers: list[Any] = [(CUDA, {"device_id": device_id}) if p == CUDA else p for p in requested]
        disabled = [] if folding_check(self.path) else ["ConstantFolding"]
        try:
            self._session = ort.InferenceSession(str(self.path), opts, providers=providers,
                                                 disabled_optimizers=disabled)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise FileFormatError(f"{self.path}: onnxruntime cannot load this model "
                                  f"({' '.join(str(e).split())[:300]})") from None
        self.providers: list[str] = list(self._session.get_providers())
        if provider == "cuda" and CUDA not in self.providers:
            raise AutomtlError(f"{self.path}: onnxruntime could not start the CUDA provider although a GPU is "
                               f"present (CUDA or cuDNN libraries missing or of another major version?); "
                               f"{cuda_help()}")
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise AutomtlError(f"{self.path}: the model has {len(inputs)} inputs; InferenceSession runs "
                               "single-input models (as export_onnx writes them)")
        self.input_name: str = inputs[0].name
        self.input_shape: list[int | str] = [d if isinstance(d, int) else str(d) for d in inputs[0].shape]
        self.output_names: list[str] = [o.name for o in self._session.get_outputs()]
        try:
            self.metadata: dict[str, Any] = read_metadata(dict(self._session.get_modelmeta().custom_metadata_map))
        except limits.LimitError as e:
            raise limits.FileLimitError(f"{self.path}: {e}") from None

    @property
    def tasks(self) -> list[str]:
        """The task (output) names, in output order."""
        return list(self.output_names)

    @property
    def device(self) -> str:
        return "cuda" if self.providers and self.providers[0] == CUDA else "cpu"

    def run(self, x: Any) -> dict[str, np.ndarray]:
        """Run every output on ``x`` (an np.ndarray or torch.Tensor, N x C x H x W, float32)."""
        if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch.Tensor, without importing torch here
            x = x.detach().cpu().numpy()
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != len(self.input_shape):
            raise AutomtlError(f"input has shape {list(x.shape)} but the model takes {self.input_shape}")
        for i, (got, want) in enumerate(zip(x.shape, self.input_shape)):
            if isinstance(want, int) and want > 0 and got != want:
                raise AutomtlError(f"input has shape {list(x.shape)} but the model takes {self.input_shape} "
                                   f"(axis {i} is fixed at {want})")
        try:
            outs = self._session.run(self.output_names, {self.input_name: x})
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise AutomtlError(f"onnxruntime failed on an input of shape {list(x.shape)}: "
                               f"{' '.join(str(e).split())[:300]}") from None
        return dict(zip(self.output_names, outs))

    __call__ = run

    def example_input(self, batch: int = 1, seed: int = 0) -> np.ndarray:
        """A seeded random input of the model's shape with batch ``batch`` (dynamic H, W from the metadata).

        The shape is checked against MAX_SPATIAL, MAX_CHANNELS and MAX_TENSOR_BYTES before anything is
        allocated (a file may declare any size).
        """
        example = self.metadata.get("example_input_shape")
        shape = []
        for i, d in enumerate(self.input_shape):
            if i == 0 and not (isinstance(d, int) and d > 0):
                shape.append(batch)
            elif isinstance(d, int) and d > 0:
                shape.append(d)
            elif isinstance(example, list) and len(example) == len(self.input_shape):
                size = example[i]
                if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                    raise FileFormatError(f"{self.path}: the metadata example_input_shape {example} must hold "
                                          "positive integers")
                shape.append(size)
            else:
                raise AutomtlError(f"{self.path}: input axis {i} is dynamic ({d}) and the file has no automtl "
                                   "metadata giving an example size")
        if isinstance(self.input_shape[0], int) and self.input_shape[0] > 0 and self.input_shape[0] != batch:
            raise AutomtlError(f"{self.path}: the batch size is fixed at {self.input_shape[0]}; export with a "
                               f"dynamic batch to run batch {batch}")
        limits.check_image_shape(shape, "the model input", str(self.path))
        return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)

    def __repr__(self) -> str:
        return f"InferenceSession({str(self.path)!r}, providers={self.providers}, tasks={self.tasks})"


def benchmark(path: str | Path, *, batch: int = 1, providers: Sequence[str] = ("cpu",), repeat: int = 10,
              warmup: int = 2, threads: int | None = None) -> list[dict[str, Any]]:
    """Median latency of ``path`` per provider: rows of provider, batch, median_ms, images_per_s, runs.

    Each provider gets a fresh session, ``warmup`` untimed runs, then ``repeat`` timed runs on one seeded
    random input. A provider that is not usable raises AutomtlError (see :func:`select_providers`).
    """
    if batch < 1 or repeat < 1 or warmup < 0:
        raise AutomtlError("batch and repeat must be at least 1 and warmup at least 0")
    rows = []
    for provider in providers:
        session = InferenceSession(path, provider=provider, threads=threads)
        x = session.example_input(batch)
        for _ in range(warmup):
            session.run(x)
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            session.run(x)
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        rows.append({"provider": session.device, "execution_provider": session.providers[0], "batch": batch,
                     "input_shape": list(x.shape), "median_ms": median * 1e3, "images_per_s": batch / median,
                     "runs": repeat})
    return rows


__all__ = [
    "PROVIDERS",
    "InferenceSession",
    "benchmark",
    "cuda_device_present",
    "cuda_status",
    "read_metadata",
    "select_providers",
]
