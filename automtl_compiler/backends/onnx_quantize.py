"""int8 static quantization of an exported fp32 ONNX file (onnxruntime's quantization tools, QDQ format).

Weights are int8, symmetric, with one scale per output channel; activations uint8 with a zero point
(asymmetric). Symmetric int8 activations took 3.4-3.6x the time of uint8 ones on the AVX512-VNNI CPU
measured (VNNI's dot product multiplies uint8 by int8; int8 by int8 takes a slower path) for no accuracy
that mattered, so they are an option, not the default. The activation ranges come from running the fp32
model on calibration images:

- ``minmax`` (the default): each tensor's smallest and largest value over the images;
- ``entropy``: the range whose 256-level histogram loses the least information (KL divergence, 2048 bins);
- ``percentile``: the range holding ``percentile`` % of the values (2048 bins).

Measured with ``benchmarks/deploy.py`` (DeepLab-ResNet-34 on the synthetic scenes, 64 images), MinMax lost
0.00 Δm points against fp32, Percentile 0.06 and Entropy 45 (it clipped the depth head's outputs).

Calibration runs :data:`CALIBRATION_CHUNK` images at a time, since onnxruntime's calibrators keep every
intermediate tensor of the images they are given (about 100 MB an image for DeepLab-ResNet-34 at 224x224)
before reducing them. Dilated convolutions of the quantized graph then stop multiplying their zero padding
(:mod:`.onnx_atrous`, exact). onnxruntime's ``quant_pre_process`` (shape inference and graph optimisations
before quantizing) is an option: on automtl's exports, whose batch norms are already folded, it gave the
same graph and the same outputs, so it is off by default.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from ..errors import AutomtlError
from .onnx_calibration import check_image_size, fixed_batch

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
DEFAULT_METHOD = "minmax"
#: Images the calibrator runs before it reduces their intermediate tensors to histograms or ranges.
CALIBRATION_CHUNK = 8
_METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}


@dataclass(frozen=True)
class Int8Settings:
    """How :func:`quantize_int8` quantizes (the defaults are the measured choice; see the module docstring)."""

    method: str = DEFAULT_METHOD
    percentile: float = 99.999
    symmetric_activations: bool = False
    skip_padding: bool = True
    preprocess: bool = False


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """onnxruntime's quantization tools print progress and log advice; keep the CLI's output to its own."""
    import onnxruntime as ort

    logging.disable(logging.WARNING)
    ort.set_default_logger_severity(3)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(logging.NOTSET)
        ort.set_default_logger_severity(2)


class _Images(CalibrationDataReader):
    """onnxruntime's calibration data reader over images ``start:stop`` of a list, batched to the model's
    fixed batch size (the last batch filled from the first images)."""

    def __init__(self, images: Sequence[np.ndarray], input_name: str, batch: int) -> None:
        self.images, self.input_name, self.batch = images, input_name, batch
        self.position = self.stop = 0

    def select(self, start: int, stop: int) -> _Images:
        self.position, self.stop = start, stop
        return self

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= self.stop:
            return None
        batch = [self.images[(self.position + k) % len(self.images)] for k in range(self.batch)]
        self.position += self.batch
        return {self.input_name: np.stack(batch)}


def _calibrator_options(settings: Int8Settings) -> dict[str, Any]:
    symmetric = settings.symmetric_activations
    if settings.method == "entropy":
        return {"symmetric": symmetric, "num_bins": 2048, "num_quantized_bins": 128 if symmetric else 256}
    if settings.method == "percentile":
        return {"symmetric": symmetric, "num_bins": 2048, "percentile": settings.percentile}
    return {"symmetric": symmetric}


def calibrate(model: Path, images: Sequence[np.ndarray], settings: Int8Settings, cache: Path) -> None:
    """Activation ranges of ``model`` on ``images``, written as onnxruntime's calibration cache ``cache``."""
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    spec = onnx.load(str(model), load_external_data=False).graph.input[0]
    dims = spec.type.tensor_type.shape.dim
    shape: list[int | str] = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]
    for i, image in enumerate(images):
        check_image_size(image, shape, f"calibration image {i}")
    batch = fixed_batch(shape) or 1
    reader = _Images(images, spec.name, batch)
    with quiet():
        calibrator = create_calibrator(model, sorted({*QDQRegistry, *QLinearOpsRegistry}),
                                       augmented_model_path=str(cache.with_suffix(".augmented.onnx")),
                                       calibrate_method=_METHODS[settings.method],
                                       extra_options=_calibrator_options(settings))
        step = max(batch, CALIBRATION_CHUNK // batch * batch)
        for start in range(0, len(images), step):
            calibrator.collect_data(reader.select(start, min(start + step, len(images))))
        save_tensors_data(calibrator.compute_data(), cache)
    del calibrator


def quantize_int8(src: Path, dst: Path, images: Sequence[np.ndarray], settings: Int8Settings = Int8Settings()
                  ) -> dict[str, Any]:
    """Write ``src`` statically quantized to int8 (QDQ) to ``dst``, calibrated on ``images`` ([3, H, W]
    float32, preprocessed as for evaluation); returns what was done, for the file's metadata. Scratch
    files live in a temporary directory beside ``dst`` while it runs."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from .onnx_atrous import skip_padding_taps

    if settings.method not in CALIBRATION_METHODS:
        raise AutomtlError(f"unknown calibration method '{settings.method}'; use one of {', '.join(CALIBRATION_METHODS)}")
    if not images:
        raise AutomtlError("int8 quantization needs at least one calibration image")
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp") as scratch:
        work = src
        if settings.preprocess:
            work = Path(scratch) / "prepared.onnx"
            with quiet():
                quant_pre_process(str(src), str(work))
        cache = Path(scratch) / "calibration.json"
        calibrate(work, images, settings, cache)
        symmetric = settings.symmetric_activations
        with quiet():
            quantize_static(str(work), str(dst), None, quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=_METHODS[settings.method],
                            calibration_cache_path=str(cache),
                            extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True})
    rewritten = 0
    if settings.skip_padding:
        model = onnx.load(str(dst))
        rewritten = skip_padding_taps(model)
        if rewritten:
            onnx.save(model, str(dst))
    return {"format": "QDQ", "weights": "int8 symmetric per output channel",
            "activations": "int8 symmetric" if symmetric else "uint8 asymmetric",
            "calibration": settings.method, "calibration_images": len(images),
            **({"percentile": settings.percentile} if settings.method == "percentile" else {}),
            "convs_skipping_padding": rewritten}
