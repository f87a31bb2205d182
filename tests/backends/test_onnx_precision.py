"""Deployment variants: int8 (calibrated on training images) and fp16 files checked against fp32 on the
validation split, the exact padding rewrite of quantized dilated convolutions, and refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from onnx import TensorProto, numpy_helper

from automtl_compiler import build_supermodel, load_backbone
from automtl_compiler.backends import onnx_precision
from automtl_compiler.backends.onnx_atrous import Band, skip_padding_taps, tap_bands
from automtl_compiler.backends.onnx_calibration import DeploymentData
from automtl_compiler.backends.onnx_export import export_onnx
from automtl_compiler.backends.onnx_precision import export_precision, read_precision
from automtl_compiler.backends.onnx_quantize import Int8Settings, quantize_int8
from automtl_compiler.data import collate, get_dataset
from automtl_compiler.errors import AutomtlError
from automtl_compiler.nn.compact import CompactModel, prune
from automtl_compiler.nn.heads import ASPPHead
from automtl_compiler.nn.policy import Policy
from automtl_compiler.runtime import InferenceSession
from automtl_compiler.tasks import get_task
from tests.helpers import Small

SIZE = 32
TASKS = {"segment_semantic": 6, "depth_zbuffer": 1}


def deployment_model(root: Path, steps: int = 40) -> tuple[CompactModel, Path]:
    """A small all-share compact model trained briefly on the synthetic scenes (so that its metrics are not
    zero), saved in ``root/compact`` (its SuperModel in ``root/supermodel``), and the config of its data."""
    torch.manual_seed(0)
    graph = load_backbone(Small(), input_shape=(1, 3, SIZE, SIZE))
    heads = {t: ASPPHead(graph.node(graph.outputs[0]).shape[1], k, hidden=8) for t, k in TASKS.items()}
    sm = build_supermodel(graph, heads)
    model = prune(sm, Policy({t: {u: "share" for u in sm.unit_names} for t in sm.tasks}))
    train = get_dataset("synthetic", split="train", length=64, resolution=(SIZE, SIZE), tasks=list(TASKS))
    types = {t: get_task(t) for t in TASKS}
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        x, targets = collate(train.__getitems__([(step * 8 + i) % 64 for i in range(8)]))
        outs = model(x)
        loss = sum(types[t].loss(outs[t], targets[t]) for t in TASKS)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    model.save(root / "compact")
    sm.eval().save(root / "supermodel")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump({"input_size": [SIZE, SIZE], "dataset": {"name": "synthetic", "options": {"length": 64}},
                                      "tasks": {t: {"hidden": 8} for t in TASKS}, "batch_size": 16}))
    return model, config


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> tuple[CompactModel, DeploymentData, Path]:
    root = tmp_path_factory.mktemp("precision")
    model, config = deployment_model(root)
    return model, DeploymentData.from_config(config, list(TASKS)), root


def relative_diff(a: Path, b: Path, x: np.ndarray) -> float:
    """The largest |a - b| over the outputs, relative to the largest |a|."""
    ra, rb = InferenceSession(a, provider="cpu").run(x), InferenceSession(b, provider="cpu").run(x)
    return max(float(np.max(np.abs(ra[t] - rb[t]))) / float(np.max(np.abs(ra[t]))) for t in ra)


def test_int8_is_calibrated_checked_and_marked(work, tmp_path: Path) -> None:
    model, data, _ = work
    report = export_precision(model, tmp_path / "int8.onnx", precision="int8", data=data, calibration_images=16)
    c = report.comparison
    assert c is not None and list(c.reference) == list(TASKS) and list(c.variant) == list(TASKS)
    assert set(c.reference["segment_semantic"]) == {"miou", "pixel_acc"} and "abs_err" in c.reference["depth_zbuffer"]
    assert c.samples == 64 and c.reference["segment_semantic"]["pixel_acc"] > 0.3  # trained, not chance
    assert report.delta_m is not None and abs(report.delta_m) < 1.0 and set(report.per_task) == set(TASKS)
    assert all(c.max_abs_diff[t] < 0.05 * c.reference_max_abs[t] for t in TASKS), c.max_abs_diff
    lines = report.lines()
    assert lines[0].split("|")[1:-1] == [" task             ", " metric       ", " fp32   ", " int8   ", " change "]
    assert sum(line.startswith("| segment_semantic") for line in lines) == 2 and lines[-2].startswith("Δm of int8")

    proto = onnx.load(str(tmp_path / "int8.onnx"))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["automtl.precision"] == '"int8"' and "automtl.tasks" in meta
    assert '"calibration": "minmax"' in meta["automtl.precision_details"]
    assert read_precision(tmp_path / "int8.onnx") == "int8"
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    weights = [i for i in proto.graph.initializer if len(i.dims) == 4]
    assert weights and all(i.data_type == TensorProto.INT8 for i in weights)
    assert [p.name for p in tmp_path.iterdir()] == ["int8.onnx"]


def test_wrong_calibration_range_is_caught(work, tmp_path: Path) -> None:
    """Scales from images of a hundredth of the real range clip the activations: the outputs drift far beyond
    what a right calibration gives, and the Δm check refuses the file (an existing one stays as it was)."""
    model, data, _ = work
    fp32 = export_onnx(model, tmp_path / "fp32.onnx")
    images = data.calibration_images(8)
    quantize_int8(fp32, tmp_path / "good.onnx", images)
    quantize_int8(fp32, tmp_path / "bad.onnx", [i * 0.01 for i in images])
    x = np.stack(data.calibration_images(4))
    good, bad = relative_diff(fp32, tmp_path / "good.onnx", x), relative_diff(fp32, tmp_path / "bad.onnx", x)
    assert good < 0.05 < bad, (good, bad)

    out = tmp_path / "keep.onnx"
    out.write_text("precious")
    data.calibration_images = lambda n: [i * 0.01 for i in DeploymentData.calibration_images(data, n)]  # type: ignore[method-assign]
    try:
        with pytest.raises(AutomtlError, match=r"loses .* Δm points .*keep\.onnx was not written"):
            export_precision(model, out, precision="int8", data=data, calibration_images=8)
    finally:
        del data.calibration_images
    assert out.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx", "fp32.onnx", "good.onnx", "keep.onnx"]


def test_fp16_has_float16_weights_and_float32_io(work, tmp_path: Path) -> None:
    model, data, _ = work
    report = export_precision(model, tmp_path / "fp16.onnx", precision="fp16", data=data)
    assert report.delta_m is not None and abs(report.delta_m) < 0.1
    proto = onnx.load(str(tmp_path / "fp16.onnx"))
    floats = [i for i in proto.graph.initializer if i.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)]
    assert floats and all(i.data_type == TensorProto.FLOAT16 for i in floats)
    assert [v.type.tensor_type.elem_type for v in [*proto.graph.input, *proto.graph.output]] == [TensorProto.FLOAT] * 3
    assert read_precision(tmp_path / "fp16.onnx") == "fp16"
    no_data = export_precision(model, tmp_path / "fp16_random.onnx", precision="fp16")
    assert no_data.comparison is None and set(no_data.details["random_input_max_abs_diff"]) == set(TASKS)


def test_fp16_keeps_float32_what_cpu_onnxruntime_cannot_run(work, tmp_path: Path, monkeypatch) -> None:
    model, _, _ = work
    fp32 = export_onnx(model, tmp_path / "fp32.onnx")
    first_conv = next(n.name for n in onnx.load(str(fp32)).graph.node if n.op_type == "Conv")
    opened = onnx_precision._cpu_session
    calls = []

    def refuse_once(path: Path):  # what onnxruntime says for a node without a kernel
        calls.append(path)
        if len(calls) == 1:
            raise RuntimeError(f"NOT_IMPLEMENTED : Could not find an implementation for Conv(11) node with name "
                               f"'{first_conv}'")
        return opened(path)

    monkeypatch.setattr(onnx_precision, "_cpu_session", refuse_once)
    details = onnx_precision.convert_fp16(fp32, tmp_path / "fp16.onnx")
    assert details["float32_nodes"] == [first_conv] and len(calls) == 2
    proto = onnx.load(str(tmp_path / "fp16.onnx"))
    kept = next(n for n in proto.graph.node if n.name == first_conv)
    weights = {i.name: i.data_type for i in proto.graph.initializer}
    assert weights[kept.input[1]] == TensorProto.FLOAT
    assert sum(t == TensorProto.FLOAT16 for t in weights.values()) > 10


def test_skipping_padding_gives_the_same_integers(work, tmp_path: Path) -> None:
    model, data, _ = work
    fp32 = export_onnx(model, tmp_path / "fp32.onnx")
    images = data.calibration_images(4)
    plain_path = tmp_path / "plain.onnx"
    quantize_int8(fp32, plain_path, images, Int8Settings(skip_padding=False))
    # this model's head convs are far too small to gain by default (the rewrite's extra kernels cost more)
    assert quantize_int8(fp32, tmp_path / "default.onnx", images)["convs_skipping_padding"] == 0
    plain = onnx.load(str(plain_path))
    proto = onnx.load(str(plain_path))
    # every 3x3 conv of the two ASPP heads (rates 6-24 on a 14x14 map) when size does not matter
    assert skip_padding_taps(proto, min_saved_macs=0) == 8 and skip_padding_taps(proto, min_saved_macs=0) == 0
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(tmp_path / "skip.onnx"))
    x = np.stack(images)
    want, got = InferenceSession(plain_path, provider="cpu").run(x), InferenceSession(tmp_path / "skip.onnx", provider="cpu").run(x)
    for t in TASKS:
        np.testing.assert_array_equal(got[t], want[t])

    def int8_bytes(model: onnx.ModelProto) -> int:
        return sum(numpy_helper.to_array(i).nbytes for i in model.graph.initializer if i.data_type == TensorProto.INT8)

    assert int8_bytes(proto) == int8_bytes(plain)  # each weight stored once
    pieces = sum(len(tap_bands(14, 3, r, r, r)) ** 2 for r in (6, 12, 18, 24))  # 9 + 9 + 1 + 1: rates >= 14 keep the centre
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert len(convs) == len([n for n in plain.graph.node if n.op_type == "Conv"]) + 2 * (pieces - 4)


def test_tap_bands() -> None:
    assert tap_bands(29, 3, 24, 24, 24) == [Band(0, 5, 1, 2), Band(5, 24, 1, 1), Band(24, 29, 0, 1)]
    assert tap_bands(29, 3, 6, 6, 6) == [Band(0, 6, 1, 2), Band(6, 23, 0, 2), Band(23, 29, 0, 1)]
    assert tap_bands(8, 3, 1, 0, 0) == [Band(0, 6, 0, 2)]
    assert tap_bands(4, 3, 9, 0, 30) is None  # outputs past the input read padding only


def test_calibration_images_are_deterministic_training_images(work) -> None:
    _, data, _ = work
    images = data.calibration_images(4)
    train = get_dataset("synthetic", split="train", length=64, resolution=(SIZE, SIZE), tasks=list(TASKS))
    for image, index in zip(images, (0, 16, 32, 48)):
        np.testing.assert_array_equal(image, train[index][0].numpy())
    with pytest.raises(AutomtlError, match="training split has 64 image"):
        data.calibration_images(65)


def test_bad_requests(work, tmp_path: Path) -> None:
    model, data, root = work
    with pytest.raises(AutomtlError, match="give the training config"):
        export_precision(model, tmp_path / "a.onnx", precision="int8")
    with pytest.raises(AutomtlError, match="has no variant"):
        export_precision(model, tmp_path / "a.onnx", precision="fp32", data=data)
    (tmp_path / "no_data.yaml").write_text("batch_size: 4\n")
    with pytest.raises(AutomtlError, match="no 'dataset' section"):
        DeploymentData.from_config(tmp_path / "no_data.yaml", list(TASKS))
    with pytest.raises(AutomtlError, match=r"task\(s\) \['normal'\] are not in the config"):
        DeploymentData.from_config(root / "config.yaml", ["normal"])
    assert not list(tmp_path.iterdir()) or [p.name for p in tmp_path.iterdir()] == ["no_data.yaml"]
