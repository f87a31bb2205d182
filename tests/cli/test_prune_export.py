"""The deployment chain through real subprocesses: compile -> sample -> prune -> export -> bench."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from automtl_compiler.runtime import cuda_status


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "automtl_compiler.cli.main", *args], check=False, capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def one_line_error(res: subprocess.CompletedProcess[str], needle: str) -> None:
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert needle in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    res = run("compile", "torchvision:resnet18", "--task", "seg:3", "--task", "depth:1", "--head-hidden", "8",
              "--input-shape", "1,3,32,32", "-o", "sm", cwd=root)
    assert res.returncode == 0, res.stderr
    return root


def test_sample_prune_export_bench(work):
    res = run("sample", "sm", "--strategy", "sample", "--seed", "3", "-o", "policy.json", cwd=work)
    assert res.returncode == 0, res.stderr
    counts = {line.split(":")[0]: line for line in res.stdout.splitlines()[:2]}
    assert sorted(counts) == ["depth", "seg"] and "share" in counts["seg"] and "skip" in counts["seg"]
    doc = json.loads((work / "policy.json").read_text())
    assert doc["format"] == "automtl-policy" and len(doc["choices"]["seg"]) == 20

    res = run("prune", "sm", "--policy", "policy.json", "-o", "cm", cwd=work)
    assert res.returncode == 0, res.stderr
    assert "CompactModel: 2 task(s) seg, depth" in res.stdout and "parameter saving" in res.stdout
    assert sorted(p.name for p in (work / "cm").iterdir()) == ["compact.json", "graph.json", "graph.safetensors",
                                                                 "heads.safetensors"]
    assert not [p for p in work.iterdir() if p.name.startswith(".")]

    res = run("export", "cm", "-o", "model.onnx", cwd=work)
    assert res.returncode == 0, res.stderr
    assert "verified against PyTorch" in res.stdout
    model = onnx.load(str(work / "model.onnx"))
    assert [o.name for o in model.graph.output] == ["seg", "depth"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, 32, 32]  # the compact model's input

    res = run("export", "cm", "-o", "seg.onnx", "--task", "seg", "--opset", "13", "--dynamic-hw",
              "--input-shape", "1,3,64,64", cwd=work)
    assert res.returncode == 0, res.stderr
    seg = onnx.load(str(work / "seg.onnx"))
    assert [o.name for o in seg.graph.output] == ["seg"] and seg.opset_import[0].version == 13
    assert [d.dim_param or d.dim_value for d in seg.graph.input[0].type.tensor_type.shape.dim] == \
        ["batch", 3, "height", "width"]

    res = run("bench", "model.onnx", "--batch", "2", "--provider", "all", "--repeat", "2", cwd=work)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split("|")[1:-1] == [" provider ", " batch ", " input     ", " median ms ", " images/s "]
    cpu = [c.strip() for c in lines[2].split("|")[1:-1]]
    assert cpu[:3] == ["cpu", "2", "2x3x32x32"] and float(cpu[3]) > 0 and float(cpu[4]) > 0
    if not cuda_status()[0]:
        assert "cuda: skipped" in res.stdout


def test_argmax_policy_of_fresh_logits_shares_everything(work):
    res = run("sample", "sm", "--strategy", "argmax", "-o", "argmax.json", cwd=work)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[:2] == ["seg: share 20, specific 0, skip 0", "depth: share 20, specific 0, skip 0"]
    doc = json.loads((work / "argmax.json").read_text())
    assert set(doc["choices"]["depth"].values()) == {"share"}


def test_policy_errors_are_one_line_and_write_nothing(work):
    meta = json.loads((work / "sm" / "supermodel.json").read_text())
    backbone = json.loads((work / "sm" / "backbone.json").read_text())
    convs = [n["name"] for n in backbone["nodes"] if n["op"] == "conv2d"]
    choices = {t: {c: "share" for c in convs} for t in meta["tasks"]}
    choices["seg"]["layer9_conv"] = "share"
    (work / "bad_node.json").write_text(json.dumps({"format": "automtl-policy", "version": 1, "choices": choices}))
    res = run("prune", "sm", "--policy", "bad_node.json", "-o", "never", cwd=work)
    one_line_error(res, "names unknown node(s) ['layer9_conv']")
    assert "bad_node.json" in res.stderr

    del choices["seg"]["layer9_conv"]
    choices["ghost"] = choices["seg"]
    (work / "bad_task.json").write_text(json.dumps({"format": "automtl-policy", "version": 1, "choices": choices}))
    one_line_error(run("prune", "sm", "--policy", "bad_task.json", "-o", "never", cwd=work), "ghost")
    one_line_error(run("prune", "sm", "--policy", "missing.json", "-o", "never", cwd=work),
                   "missing.json: policy file not found")
    assert not (work / "never").exists()
    assert not [p for p in work.iterdir() if p.name.startswith(".")]


def test_failed_export_keeps_the_existing_file(work):
    if not (work / "cm").exists():  # when run alone
        assert run("prune", "sm", "--policy", "argmax.json", "-o", "cm", cwd=work).returncode == 0
    (work / "keep.onnx").write_text("precious")
    one_line_error(run("export", "cm", "-o", "keep.onnx", "--task", "nope", cwd=work), "unknown task 'nope'")
    assert (work / "keep.onnx").read_text() == "precious"
    assert not [p for p in work.iterdir() if p.name.startswith(".")]


def test_bench_error_is_one_line(work):
    if cuda_status()[0]:
        one_line_error(run("bench", "absent.onnx", cwd=work), "absent.onnx")
    else:
        (work / "tiny.onnx").write_bytes(b"junk")
        one_line_error(run("bench", "tiny.onnx", "--provider", "cuda", cwd=work), "CUDA provider is not usable")
