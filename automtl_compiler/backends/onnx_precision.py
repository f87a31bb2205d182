"""Deployment variants of an exported compact model: float16 for GPUs, int8 for CPUs.

``export_precision(model, path, precision="int8", data=...)`` exports the fp32 model (verified against
PyTorch as :func:`~automtl_compiler.backends.onnx_export.export_onnx` does), derives the variant from it,
and checks the variant against the fp32 file on the validation split of the training config: each task's
metrics for both, Δm of the variant relative to fp32 (:func:`automtl_compiler.tasks.delta_m`) and the max
abs output difference on a few images. A Δm below ``-max_drop`` is an AutomtlError. Everything is built in
a temporary directory beside ``path`` and only the checked variant is moved onto ``path``; a failure leaves
an existing file there as it was.

- **int8** (:mod:`.onnx_quantize`): onnxruntime static quantization in QDQ format, per-channel int8
  weights and uint8 activations, calibrated on training images (:class:`~.onnx_calibration.DeploymentData`).
- **fp16**: ``onnxruntime.transformers.float16.convert_float_to_float16`` with float32 inputs and outputs
  (callers do not change). CPU onnxruntime runs it (it casts around ops without float16 kernels); a node it
  cannot run at all stays float32 (``node_block_list``), found by opening the file.

The file's ``metadata_props`` keep the fp32 export's ``automtl.*`` entries and add ``automtl.precision``
(``"fp16"`` or ``"int8"``) and ``automtl.precision_details`` (how it was made), both JSON like the others.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..errors import AutomtlError, one_line
from ..ir.serialize import atomic_write
from .onnx_calibration import (
    Comparison,
    DeploymentData,
    compare_on_validation,
    fixed_batch,
)
from .onnx_export import METADATA_PREFIX, export_onnx, save_checked
from .onnx_quantize import Int8Settings, quantize_int8, quiet

PRECISIONS = ("fp32", "fp16", "int8")
PRECISION_KEY = METADATA_PREFIX + "precision"
DETAILS_KEY = METADATA_PREFIX + "precision_details"
DEFAULT_CALIBRATION_IMAGES = 64
DEFAULT_MAX_DROP = 1.0
#: Without validation data a float16 file must match fp32 within this share of the largest output magnitude.
FP16_RTOL = 2e-2


def read_precision(path: str | Path) -> str:
    """The ``automtl.precision`` of an ONNX file (see :func:`precision_of`)."""
    from ..runtime import read_metadata

    model = onnx.load(str(path), load_external_data=False)
    return precision_of(read_metadata({p.key: p.value for p in model.metadata_props if p.key == PRECISION_KEY}))


def precision_of(metadata: dict[str, Any]) -> str:
    """The precision named by a file's parsed ``automtl.*`` metadata (``runtime.read_metadata``; at most 16
    characters shown): ``fp32`` when it does not say, ``unknown`` when it says something other than a name."""
    key = PRECISION_KEY[len(METADATA_PREFIX):]
    if key not in metadata:
        return "fp32"
    value = metadata[key]
    return one_line(value, 16) if isinstance(value, str) and value.strip() else "unknown"


def _cpu_session(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _sort_nodes(graph: onnx.GraphProto) -> None:
    """Put ``graph``'s nodes in topological order (the float16 converter appends its input casts at the end,
    which onnxruntime accepts and ``onnx.checker`` does not)."""
    ready = {i.name for i in graph.initializer} | {i.name for i in graph.input} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        left = [n for n in pending if not all(t in ready for t in n.input)]
        done = [n for n in pending if all(t in ready for t in n.input)]
        if not done:
            raise AutomtlError("the float16 graph has a cycle or an undefined input; report this with the model")
        for node in done:
            ordered.append(node)
            ready.update(node.output)
        pending = left
    del graph.node[:]
    graph.node.extend(ordered)


def convert_fp16(src: Path, dst: Path, *, max_blocked: int = 16) -> dict[str, Any]:
    """Write ``src`` with float16 weights and arithmetic to ``dst`` (float32 inputs and outputs) and make sure
    CPU onnxruntime opens it: a node it has no kernel for is left float32 and the conversion redone."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    blocked: list[str] = []
    model = onnx.load(str(src))
    while True:
        with quiet():  # the converter works on a shape-inferred copy: ``model`` stays float32
            converted = convert_float_to_float16(model, keep_io_types=True, node_block_list=blocked or None)
        _sort_nodes(converted.graph)
        onnx.save(converted, str(dst))
        try:
            _cpu_session(dst)
            return {"format": "float16", "io": "float32", "float32_nodes": blocked}
        except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types
            node = re.search(r"node with name '([^']+)'", str(e))
            if node is None or node.group(1) in blocked or len(blocked) >= max_blocked:
                raise AutomtlError(f"onnxruntime cannot open the float16 model ({one_line(e, 300)}); export fp32 "
                                   "instead, or report this with the model") from None
            blocked.append(node.group(1))


@dataclass
class VariantReport:
    """What :func:`export_precision` found: the variant against fp32 on the validation split."""

    precision: str
    details: dict[str, Any]
    comparison: Comparison | None = None
    delta_m: float | None = None
    per_task: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    max_drop: float = DEFAULT_MAX_DROP
    directions: dict[str, dict[str, bool]] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """A table of each task's metrics (fp32, the variant, the change; + is better) and Δm."""
        c = self.comparison
        if c is None:
            return []
        rows = [("task", "metric", "fp32", self.precision, "change")]
        for task, metrics in c.reference.items():
            for k, ref in metrics.items():
                got = c.variant[task][k]
                sign = 1 if self.directions.get(task, {}).get(k, True) else -1
                change = f"{sign * (got - ref) / abs(ref):+.2%}" if ref and math.isfinite(ref) else ""
                rows.append((task, k, f"{ref:.4g}", f"{got:.4g}", change))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        out = ["| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |" for r in rows]
        out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
        dm = "undefined (no metric with a non-zero fp32 value)" if self.delta_m is None else f"{self.delta_m:+.2f}"
        parts = ", ".join(f"{t} {v:+.2f}" for t, v in self.per_task.items())
        out.append(f"Δm of {self.precision} against fp32: {dm} points{f' ({parts})' if parts else ''} on "
                   f"{c.samples} validation samples (a drop beyond {self.max_drop:g} is refused)"
                   + (f"; left out (fp32 value 0 or not finite): {', '.join(self.skipped)}" if self.skipped else ""))
        out.append(f"max |{self.precision} - fp32| on the first {c.diff_images} validation images: " + ", ".join(
            f"{t} {d:.3g} (outputs up to {c.reference_max_abs[t]:.3g})" for t, d in c.max_abs_diff.items()))
        return out


def _score(report: VariantReport, task_types: dict[str, Any], shown_as: Path) -> None:
    """Fill in Δm of the variant against fp32 and refuse a drop beyond ``report.max_drop``."""
    from ..tasks import delta_m

    c = report.comparison
    assert c is not None
    usable = {t: {k: v for k, v in m.items() if math.isfinite(v) and v != 0} for t, m in c.reference.items()}
    report.skipped = sorted(f"{t}/{k}" for t, m in c.reference.items() for k in m if k not in usable[t])
    usable = {t: m for t, m in usable.items() if m}
    report.directions = {t: dict(task_types[t].metric_directions) for t in c.reference}
    broken = [f"{t}/{k}" for t, m in usable.items() for k in m if not math.isfinite(c.variant[t][k])]
    if broken:
        raise AutomtlError(f"the {report.precision} model gives non-finite {', '.join(broken)} on the validation "
                           f"split where fp32 does not; {shown_as} was not written")
    if not usable:
        return
    found = delta_m(c.variant, usable, {t: report.directions[t] for t in usable})
    report.delta_m, report.per_task = found["delta_m"], found["per_task"]
    if report.delta_m < -report.max_drop:
        worst = min(report.per_task, key=report.per_task.get)  # type: ignore[arg-type]
        raise AutomtlError(f"the {report.precision} model loses {-report.delta_m:.2f} Δm points against fp32 on "
                           f"{c.samples} validation samples (allowed: --max-drop {report.max_drop:g}; worst task "
                           f"{worst} {report.per_task[worst]:+.2f}); {shown_as} was not written. Try more calibration "
                           "images, another precision, or a larger --max-drop")


def _check_fp16_outputs(reference: Any, variant: Any, shown_as: Path) -> dict[str, float]:
    """Without validation data: the float16 file on a seeded random input against fp32."""
    x = reference.example_input(fixed_batch(reference.input_shape) or 1)
    want, got = reference.run(x), variant.run(x)
    diffs = {}
    for task, w in want.items():
        allowed = FP16_RTOL * max(1.0, float(np.max(np.abs(w))))
        diffs[task] = float(np.max(np.abs(got[task].astype(np.float64) - w)))
        if not diffs[task] <= allowed:
            raise AutomtlError(f"the fp16 model's output '{task}' differs from fp32 by {diffs[task]:.3g} on a random "
                               f"input (allowed {allowed:.3g}); {shown_as} was not written. Export fp32 instead")
    return diffs


def export_precision(model: Any, path: str | Path, *, precision: str, data: DeploymentData | None = None,
                     calibration_images: int = DEFAULT_CALIBRATION_IMAGES, max_drop: float = DEFAULT_MAX_DROP,
                     int8: Int8Settings | None = None, verify: bool = True, threads: int | None = None,
                     **export_options: Any) -> VariantReport:
    """Export a CompactModel to ``path`` as its ``fp16`` or ``int8`` variant, checked against fp32.

    ``data`` (from the training config) gives the calibration images (int8 needs it) and the validation
    split of the check; without it an fp16 file is compared with fp32 on a random input only.
    ``export_options`` go to :func:`~.onnx_export.export_onnx` (input_shape, opset, dynamic_batch,
    dynamic_hw, task). ``verify=False`` skips both checks (fp32 against PyTorch, variant against fp32).
    """
    from ..runtime import InferenceSession

    if precision not in PRECISIONS[1:]:
        raise AutomtlError(f"precision '{precision}' has no variant; use one of {', '.join(PRECISIONS[1:])} (fp32 "
                           "is what export_onnx writes)")
    if precision == "int8" and data is None:
        raise AutomtlError("int8 quantization is calibrated on training images: give the training config "
                           "(--config) whose dataset the model was trained on")
    if not (isinstance(max_drop, (int, float)) and math.isfinite(max_drop) and max_drop >= 0):
        raise AutomtlError(f"the allowed Δm drop must be a number >= 0, got {max_drop!r}")
    path = Path(path)
    images = data.calibration_images(calibration_images) if precision == "int8" and data is not None else []
    report = VariantReport(precision, {}, max_drop=float(max_drop))

    def write(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp") as scratch:
            fp32 = export_onnx(model, Path(scratch) / "fp32.onnx", verify=verify, **export_options)
            variant = Path(scratch) / "variant.onnx"
            report.details = (quantize_int8(fp32, variant, images, int8 or Int8Settings()) if precision == "int8"
                              else convert_fp16(fp32, variant))
            reference = onnx.load(str(fp32), load_external_data=False)
            meta = {p.key: p.value for p in reference.metadata_props}
            meta.update({PRECISION_KEY: json.dumps(precision), DETAILS_KEY: json.dumps(report.details)})
            save_checked(onnx.load(str(variant)), meta, variant, path)
            if verify:
                ref = InferenceSession(fp32, provider="cpu", threads=threads, spin=False)
                var = InferenceSession(variant, provider="cpu", threads=threads, spin=False)
                if data is None:
                    report.details["random_input_max_abs_diff"] = _check_fp16_outputs(ref, var, path)
                else:
                    report.comparison = compare_on_validation(ref, var, data)
                    _score(report, data.task_types, path)
            os.replace(variant, tmp)

    atomic_write(path, write)
    return report
