"""Precision, memory format and compilation of training: what each setting resolves to, and that a run in
it trains the same network as fp32 eager, within the arithmetic's tolerance."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from automtl_compiler.errors import AutomtlError
from automtl_compiler.train.config import load_config, validate_config
from automtl_compiler.train.precision import cpu_has_native_bf16, resolve_precision
from automtl_compiler.train.run import make_datasets, make_task_types, train
from automtl_compiler.train.trainer import Trainer
from tests.train.test_run_safety import CONFIG, TINY

CPU = torch.device("cpu")
#: a few steps of every stage on a backbone without biases before batch norms and heads without dropout: the
#: weights then depend smoothly on the arithmetic (see test_distributed.BiasFreeBackbone)
SHORT = [*TINY, "backbone=tests.train.test_distributed:BiasFreeBackbone", "stages.policy.iters=3",
         "stages.posttrain.iters=2", "checkpoint_every=0", "eval_every=0", "stages.sample.candidates=2",
         "stages.sample.calibration_batches=0"] + [
    f"tasks.{t}.head_options.dropout=0" for t in ("segment_semantic", "depth_zbuffer", "normal")]


def cpuinfo(tmp_path: Path, flags: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 avx2 {flags}\n\nprocessor\t: 1\nflags\t\t: fpu {flags}\n")
    return path


def test_auto_takes_bf16_only_where_the_cpu_computes_it_natively(tmp_path):
    native = cpuinfo(tmp_path, "avx512f avx512_bf16")
    assert cpu_has_native_bf16(native)
    p = resolve_precision("auto", CPU, scales_losses=True, cpuinfo=native)
    assert (p.name, p.dtype, p.loss_scaling) == ("bf16", torch.bfloat16, False) and "natively" in p.reason
    emulated = cpuinfo(tmp_path, "avx512f")
    assert not cpu_has_native_bf16(emulated)
    assert resolve_precision("auto", CPU, scales_losses=True, cpuinfo=emulated).name == "fp32"
    assert "emulates" in resolve_precision("bf16", CPU, scales_losses=True, cpuinfo=emulated).reason
    assert resolve_precision("fp32", CPU, scales_losses=True, cpuinfo=native).dtype is None
    assert not cpu_has_native_bf16(tmp_path / "missing"), "no /proc/cpuinfo (not Linux): not native"


def test_cuda_without_bf16_takes_fp16_with_loss_scaling_if_the_scheduler_allows(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    cuda = torch.device("cuda")
    p = resolve_precision("auto", cuda, scales_losses=True)
    assert (p.name, p.dtype, p.loss_scaling) == ("fp16", torch.float16, True)
    assert resolve_precision("auto", cuda, scales_losses=False).name == "fp32"
    with pytest.raises(AutomtlError, match="fp16.*scheduler"):
        resolve_precision("fp16", CPU, scales_losses=False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", cuda, scales_losses=False).name == "bf16"


def test_old_bf16_key_reads_as_precision_and_bad_values_name_the_key():
    assert validate_config({"bf16": True})["precision"] == "bf16"
    assert validate_config({"bf16": False})["precision"] == "fp32", "a run written before resumes in fp32"
    assert "bf16" not in validate_config({"bf16": True})
    with pytest.raises(AutomtlError, match="'precision' only"):
        validate_config({"bf16": True, "precision": "fp32"})
    with pytest.raises(AutomtlError, match="'precision' is 'fp8'"):
        validate_config({"precision": "fp8"})
    with pytest.raises(AutomtlError, match="'compile' is 'tvm'"):
        validate_config({"compile": "tvm"})
    with pytest.raises(AutomtlError, match="'channels_last' must be true or false"):
        validate_config({"channels_last": "yes"})
    with pytest.raises(AutomtlError, match="'activation_checkpointing' must be true or false"):
        validate_config({"activation_checkpointing": 1})


def weights(run: Path) -> dict[str, torch.Tensor]:
    index = json.loads((run / "checkpoints" / "last.json").read_text())
    return load_file(str(run / "checkpoints" / index["weights"]))


def max_relative_change(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                        start: dict[str, torch.Tensor]) -> tuple[float, str]:
    """The largest difference of two runs' weights relative to how far fp32 training moved them, and where."""
    worst, where = 0.0, ""
    for k, v in a.items():
        if not k.startswith("model/") or not v.is_floating_point():
            continue
        moved = (b[k] - start[k]).norm().item()
        if moved > 1e-6 and (v - b[k]).norm().item() / moved > worst:
            worst, where = (v - b[k]).norm().item() / moved, k
    return worst, where


#: The reference: fp32, contiguous memory, eager (each setting below changes one of these).
EAGER_FP32 = [*SHORT, "precision=fp32", "channels_last=false", "compile=none", "activation_checkpointing=false"]


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp32")
    report = train(CONFIG, [*EAGER_FP32], out / "run", progress=False)
    start = train(CONFIG, [*EAGER_FP32, "stages.pretrain.iters=0", "stages.policy.iters=0",
                           "stages.posttrain.iters=0"], out / "start", progress=False)
    assert report["arithmetic"]["precision"] == "fp32" and start
    return weights(out / "run"), weights(out / "start")


@pytest.mark.parametrize("setting,tolerance", [
    (["precision=fp32", "channels_last=true"], 1e-3),
    (["precision=fp32", "compile=aot_eager"], 1e-4),
    (["precision=fp32", "activation_checkpointing=true"], 1e-5),
    (["precision=bf16"], 2.0),
    (["precision=fp16"], 2.0),
])
def test_a_run_in_each_setting_trains_what_fp32_eager_trains(tmp_path, fp32_run, setting, tolerance):
    want, start = fp32_run
    report = train(CONFIG, [*EAGER_FP32, *setting], tmp_path / "run", progress=False)  # later keys win
    got = weights(tmp_path / "run")
    assert all(not math.isnan(v) for m in report["tasks"].values() for v in m.values())
    change, where = max_relative_change(got, want, start)
    assert change < tolerance, f"{setting}: {where} differs by {change:.3g} of what training moved it"
    if "precision=bf16" in setting:
        assert change > 1e-6, "bf16 autocast must actually compute in bf16"
    arithmetic = report["arithmetic"]
    assert arithmetic["precision"] == setting[0].split("=")[1]
    assert arithmetic["channels_last"] == ("channels_last=true" in setting)
    assert arithmetic["activation_checkpointing"] == ("activation_checkpointing=true" in setting)


def test_fp16_checkpoints_its_loss_scale_and_skips_steps_whose_gradients_overflow(tmp_path):
    run = tmp_path / "run"
    train(CONFIG, [*SHORT, "precision=fp16", "checkpoint_every=1"], run, progress=False)
    assert json.loads((run / "checkpoints" / "last.json").read_text())["state"]["loss_scaler"]["scale"] > 0

    cfg = load_config(CONFIG, [*SHORT, "precision=fp16"])
    datasets = make_datasets(cfg)
    trainer = Trainer(cfg, tmp_path / "again", datasets=datasets, task_types=make_task_types(cfg, datasets["train"]),
                      progress=False)
    loop = trainer.loop
    assert loop.precision.name == "fp16" and loop.scaler is not None
    loop.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)  # scaled gradients overflow
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    batches = loop.batches("train", "pretrain")
    try:
        loop.train_step(batches, 0, loop.opts["pretrain"], "pretrain", "pretrain")
        after = trainer.model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before if "running" not in k and "num_batches" not in k), \
            "a step whose scaled gradients overflow changes no weight"
        assert loop.scaler.get_scale() < 2.0**127, "and lowers the scale"
        loop.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        loop.train_step(batches, 1, loop.opts["pretrain"], "pretrain", "pretrain")
        moved = [k for k, v in trainer.model.state_dict().items() if k.startswith("heads") and not torch.equal(before[k], v)]
        assert moved, "a step at a finite scale updates the weights"
    finally:
        loop.close(batches)
