"""Training: config validation, a full tiny run, exact resume after SIGKILL, run-directory safety, NaN stop."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from automtl_compiler.errors import AutomtlError, FileFormatError
from automtl_compiler.train.config import load_config
from automtl_compiler.train.run import train

ROOT = Path(__file__).resolve().parents[2]
TINY = ["backbone=torchvision:mobilenet_v3_small", "input_size=[32, 32]", "dataset.options.length=24", "tasks.segment_semantic.hidden=8",
        "tasks.depth_zbuffer.hidden=8", "tasks.normal.hidden=8", "batch_size=4", "eval_batches=1",
        "stages.pretrain.iters=3", "stages.policy.iters=6", "stages.policy.network_steps=2",
        "stages.policy.policy_steps=1", "stages.policy.tau_every=2", "stages.posttrain.iters=3",
        "checkpoint_every=1", "eval_every=2"]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    index = json.loads((run / "checkpoints" / "last.json").read_text())
    assert index["state"]["done"]
    return load_file(str(run / "checkpoints" / index["weights"]))


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(AutomtlError, match="unknown key 'stages.pretrain.itres'"):
        load_config(None, ["stages.pretrain.itres=3"])
    with pytest.raises(AutomtlError, match="'batch_size' must be a whole number"):
        load_config(None, ["batch_size=many"])
    with pytest.raises(AutomtlError, match="'stages.sample.strategy'.*sample, argmax"):
        load_config(None, ["stages.sample.strategy=best"])
    with pytest.raises(AutomtlError, match="KEY=VALUE"):
        load_config(None, ["batch_size"])
    with pytest.raises(AutomtlError, match="tasks.depth_zbuffer.head"):
        load_config(None, ["tasks.depth_zbuffer.head=fpn"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  pretrain: {iters: [\n")
    with pytest.raises(FileFormatError, match=r"bad.yaml:\d+:\d+"):
        load_config(bad)
    cfg = load_config(ROOT / "configs" / "synthetic-quick.yaml", ["stages.pretrain.iters=7", "scheduler.name=sum"])
    assert cfg["stages"]["pretrain"]["iters"] == 7 and cfg["stages"]["policy"]["tau"] == 5.0


def test_typed_config_reads_the_checked_mapping_and_names_bad_keys():
    import copy
    import dataclasses

    from automtl_compiler.train.settings import SchedulerSettings, TrainConfig

    cfg = load_config(None, ["stages.pretrain.iters=3", "scheduler={name: imtl, stages: [posttrain]}",
                             "tasks={normal: {head: cls, weight: 2}, depth: {hidden: 8}}", "input_size=[32, 48]"])
    s = TrainConfig.from_dict(cfg)
    assert s.stages.pretrain.iters == 3 and s.stages.pretrain.betas == (0.5, 0.999) and s.input_size == (32, 48)
    assert s.stages.sample.max_macs_ratio == 0.7 and s.stages.posttrain.init == "policy"
    assert s.scheduler == SchedulerSettings("imtl", ("posttrain",), {})
    assert s.task_names == ["normal", "depth"] and s.tasks["normal"].weight == 2.0
    assert s.tasks["normal"].head_kwargs() == {} and s.tasks["depth"].head_kwargs() == {"hidden": 8}
    assert TrainConfig.from_dict({}) == TrainConfig.from_dict(load_config(None))  # partial mappings get defaults
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.seed = 1  # type: ignore[misc]
    for key, value, needle in ((("batch_size",), "8", "'batch_size' must be a whole number"),
                               (("stages", "pretrain", "itres"), 3, "unknown key 'stages.pretrain.itres'"),
                               (("stages", "sample", "strategy"), "best", "'stages.sample.strategy'"),
                               (("scheduler", "stages"), "posttrain", "'scheduler.stages' must be a list")):
        bad = copy.deepcopy(cfg)
        node = bad
        for k in key[:-1]:
            node = node[k]
        node[key[-1]] = value
        with pytest.raises(AutomtlError, match=needle):
            TrainConfig.from_dict(bad)
    assert TrainConfig.from_dict(cfg) == s  # the mapping given is never changed


def test_tiny_run_writes_every_artifact(tmp_path):
    report = train(ROOT / "configs" / "synthetic-quick.yaml", TINY, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    for name in ("config.yaml", "policy.json", "policy.png", "report.json", "metrics.jsonl"):
        assert (run / name).exists(), name
    assert set(report["tasks"]) == {"segment_semantic", "depth_zbuffer", "normal"}
    assert all(report["tasks"][t] for t in report["tasks"])
    assert report["parameters"]["compact"] <= report["parameters"]["supermodel_params"]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {x["stage"] for x in lines} == {"pretrain", "posttrain", "final"}
    assert lines[-1]["stage"] == "final" and lines[-1]["metrics"] == report["tasks"]
    assert (run / "policy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_directory_is_never_overwritten_by_accident(tmp_path):
    run = tmp_path / "run"
    train(ROOT / "configs" / "synthetic-quick.yaml", TINY, run, progress=False)
    before = (run / "report.json").read_text()
    with pytest.raises(AutomtlError, match="different config.*--overwrite"):
        train(ROOT / "configs" / "synthetic-quick.yaml", TINY + ["seed=1"], run, progress=False)
    assert (run / "report.json").read_text() == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(AutomtlError, match="not a run directory"):
        train(ROOT / "configs" / "synthetic-quick.yaml", TINY, tmp_path / "other", progress=False)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


SCRIPT = """
import sys
from automtl_compiler.train.run import train
train(sys.argv[1], sys.argv[3:], sys.argv[2], progress=False)
"""


@pytest.mark.slow
def test_sigkill_and_restart_ends_with_the_same_weights(tmp_path):
    """A run killed mid-way (its batches read by DataLoader workers) and restarted ends with the weights of
    an uninterrupted run (read in the main process)."""
    config = str(ROOT / "configs" / "synthetic-quick.yaml")
    args = TINY + ["stages.policy.iters=10", "stages.posttrain.iters=6"]
    whole = tmp_path / "whole"
    subprocess.run([sys.executable, "-c", SCRIPT, config, str(whole), *args], check=True, cwd=ROOT, timeout=600)

    killed = tmp_path / "killed"  # read by two DataLoader workers: the batches, so the weights, are the same
    args = [*args, "dataset.workers=2"]
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, config, str(killed), *args], cwd=ROOT)
    index = killed / "checkpoints" / "last.json"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if index.exists():
            try:
                state = json.loads(index.read_text())["state"]
            except (json.JSONDecodeError, KeyError):
                state = {}
            if state.get("stage") == "policy" and state.get("step", 0) >= 3:
                break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not json.loads(index.read_text())["state"]["done"], "the run must be killed mid-way"
    subprocess.run([sys.executable, "-c", SCRIPT, config, str(killed), *args], check=True, cwd=ROOT, timeout=600)

    a, b = final_weights(whole), final_weights(killed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert json.loads((whole / "policy.json").read_text()) == json.loads((killed / "policy.json").read_text())


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(AutomtlError, match=r"loss is (nan|inf).*pretrain step \d+.*checkpoint"):
        train(ROOT / "configs" / "synthetic-quick.yaml",
              TINY + ["stages.pretrain.lr=1.0e+30", "stages.pretrain.iters=30"], run, progress=False)
    index = json.loads((run / "checkpoints" / "last.json").read_text())
    assert (run / "checkpoints" / index["weights"]).exists()


def test_baselines_and_delta_m(tmp_path):
    config = ROOT / "configs" / "synthetic-quick.yaml"
    single = train(config, TINY, tmp_path / "single", progress=False, baseline="single-task")
    assert set(single["tasks"]) == {"segment_semantic", "depth_zbuffer", "normal"}
    assert all((tmp_path / "single" / t / "report.json").exists() for t in single["tasks"])
    shared = train(config, TINY, tmp_path / "shared", progress=False, baseline="all-share")
    assert all(c["share"] == sum(c.values()) for c in shared["policy"].values())
    report = train(config, TINY + [f"baselines={tmp_path / 'single' / 'report.json'}"], tmp_path / "mtl",
                   progress=False)
    dm = report["delta_m"]
    zero = {f"{t}/{k}" for t, values in single["tasks"].items() for k, v in values.items() if v == 0}
    assert set(dm["skipped"]) == zero, "metrics whose baseline is 0 are left out of Δm, and listed"
    assert set(dm["per_task"]) == {t for t, values in single["tasks"].items() if any(v != 0 for v in values.values())}
    assert isinstance(dm["delta_m"], float) or (dm["delta_m"] is None and not dm["per_task"])
    with pytest.raises(AutomtlError, match="unknown baseline"):
        train(config, TINY, tmp_path / "x", baseline="ensemble")


def test_tensorboard_logging(tmp_path):
    pytest.importorskip("tensorboard")
    train(ROOT / "configs" / "synthetic-quick.yaml", [*TINY, "tensorboard=true"], tmp_path / "run", progress=False)
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_tensorboard_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(AutomtlError, match=r"automtl-compiler\[tensorboard\]"):
        train(ROOT / "configs" / "synthetic-quick.yaml", [*TINY, "tensorboard=true"], tmp_path / "run", progress=False)


def test_per_task_loaders_give_each_task_its_own_batches(tmp_path):
    from automtl_compiler.train.run import make_datasets, make_task_types
    from automtl_compiler.train.trainer import Batches, Trainer

    cfg = load_config(ROOT / "configs" / "synthetic-quick.yaml", [*TINY, "dataset.loader=per_task"])
    datasets = make_datasets(cfg)
    trainer = Trainer(cfg, tmp_path / "run", datasets=datasets, task_types=make_task_types(cfg, datasets["train"]),
                      progress=False)
    shared = Batches(datasets["train"], 4, 0, "pretrain")
    sources = trainer.loop.per_task(shared)
    firsts = [sources[t].batch(0)[0] for t in trainer.tasks]
    assert not torch.equal(firsts[0], firsts[1]) and not torch.equal(firsts[1], firsts[2])
    assert torch.equal(sources[trainer.tasks[0]].batch(0)[0], firsts[0])  # deterministic per step
    report = trainer.run()
    assert set(report["tasks"]) == set(cfg["tasks"])
