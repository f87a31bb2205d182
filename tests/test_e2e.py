"""The main job end to end: ``automtl run --quick`` through the real CLI in a fresh process."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from automtl_compiler.nn.compact import CompactModel

TASKS = ("segment_semantic", "depth_zbuffer", "normal")


def automtl(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the installed ``automtl`` command (or the CLI module when the script is not on PATH)."""
    exe = shutil.which("automtl")
    cmd = [exe] if exe else [sys.executable, "-m", "automtl_compiler.cli.main"]
    return subprocess.run([*cmd, *args], cwd=cwd, capture_output=True, text=True, timeout=900, check=False)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    cwd = tmp_path_factory.mktemp("e2e")
    result = automtl("run", "--quick", "--out", "run", cwd=cwd)
    return cwd / "run", result


@pytest.mark.slow
def test_quick_run_writes_what_it_promised(quick_run) -> None:
    run, result = quick_run
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("model.onnx", "report.json", "policy.png", "policy.json", "config.yaml", "metrics.jsonl",
                 "supermodel/supermodel.json", "compact", "references/report.json",
                 *(f"tasks/{t}.onnx" for t in TASKS)):
        assert (run / name).exists(), name
    lines = result.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines[-3:]] == ["model.onnx", "report.json", "policy.png"]
    assert any(line.startswith("Δm vs single-task references") for line in lines)
    assert any(line.startswith("onnxruntime latency") and line.endswith("smaller is better)") for line in lines)
    assert "[pretrain]" in result.stderr and "[posttrain]" in result.stderr  # progress of every stage


@pytest.mark.slow
def test_report_has_a_metric_for_every_task(quick_run) -> None:
    run, _ = quick_run
    report = json.loads((run / "report.json").read_text())
    assert set(report["tasks"]) == set(TASKS)
    for task in TASKS:
        assert report["tasks"][task] and all(math.isfinite(v) for v in report["tasks"][task].values())
        assert set(report["references"][task]) == set(report["tasks"][task])
    assert report["delta_m"]["delta_m"] is not None
    assert report["parameters"]["compact"] < report["parameters"]["single_task_params"]
    assert report["onnx"]["all_tasks_ms"] > 0 and set(report["onnx"]["per_task_ms"]) == set(TASKS)
    units = report["policy_units"]
    for task in TASKS:
        chosen = units["tasks"][task]["choice"]
        assert {b: chosen.count(b) for b in ("share", "specific", "skip")} == report["policy"][task]
    assert 1 / len(TASKS) <= report["macs"]["ratio"] < 1  # the quick run's policy shares work between tasks


@pytest.mark.slow
def test_onnx_model_matches_the_saved_compact_model(quick_run) -> None:
    run, _ = quick_run
    compact = CompactModel.load(run / "compact").eval()
    session = ort.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = compact(x)
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": x.numpy()})))
    assert set(got) == set(TASKS)
    for task in TASKS:
        ref = expected[task].numpy()
        assert np.abs(got[task] - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max()), task


@pytest.mark.slow
def test_single_stage_commands_work_on_the_run_directory(quick_run, tmp_path) -> None:
    run, _ = quick_run
    result = automtl("prune", str(run / "supermodel"), "--policy", str(run / "policy.json"), "-o",
                     str(tmp_path / "compact"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    result = automtl("export", str(tmp_path / "compact"), "-o", str(tmp_path / "again.onnx"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "verified against PyTorch" in result.stdout


def test_bad_config_is_one_line_and_keeps_the_directory(tmp_path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    result = automtl("run", "--quick", "--out", "run", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    result = automtl("run", "--quick", "--set", "batch_size=0", "--out", "other", cwd=tmp_path)
    assert result.returncode == 2 and "batch_size" in result.stderr
