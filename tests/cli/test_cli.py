"""The automtl CLI through a real subprocess: outputs, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from automtl_compiler import load_backbone


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "automtl_compiler.cli.main", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_inspect_table_and_json():
    res = run("inspect", "torchvision:resnet18", "--input-shape", "1,3,64,64")
    assert res.returncode == 0, res.stderr
    assert "11,689,512 parameters" in res.stdout and "layer4_1_conv2" in res.stdout
    res = run("inspect", "torchvision:mobilenet_v2", "--input-shape", "1,3,32,32", "--json")
    doc = json.loads(res.stdout)
    assert doc["total_params"] == 3_504_872
    assert doc["nodes"][0]["op"] == "input" and doc["nodes"][-1]["shape"] == [1, 1000]
    assert sum(n["params"] for n in doc["nodes"]) == doc["total_params"]


def test_convert_to_json_and_onnx(tmp_path):
    out = tmp_path / "r18.json"
    res = run("convert", "torchvision:resnet18", "-o", str(out), "--input-shape", "1,3,32,32")
    assert res.returncode == 0, res.stderr
    assert load_backbone(out).num_parameters() == 11_689_512
    onnx_out = tmp_path / "r18.onnx"
    res = run("convert", str(out), "-o", str(onnx_out))
    assert res.returncode == 0, res.stderr
    model = onnx.load(str(onnx_out))
    onnx.checker.check_model(model, full_check=True)
    assert [o.name for o in model.graph.output] == ["fc"]


@pytest.mark.parametrize("args,needle", [
    (["inspect", "missing.prototxt"], "missing.prototxt"),
    (["inspect", "torchvision:resnet18", "--input-shape", "1,three"], "not a shape"),
    (["inspect", "torchvision:nonet"], "no model 'nonet'"),
    (["convert", "torchvision:resnet18", "-o", "out.txt"], "must end in"),
    (["inspect", "model.h5"], "model.h5"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, needle):
    res = run(*args, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert needle in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr


def test_debug_shows_traceback(tmp_path):
    res = run("--debug", "inspect", "missing.onnx", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" in res.stderr


def test_failed_convert_keeps_existing_output(tmp_path):
    out = tmp_path / "keep.json"
    out.write_text("precious")
    res = run("convert", "torchvision:resnet18", "-o", str(out), "--input-shape", "1,1,32,32")
    assert res.returncode == 2 and "conv1" in res.stderr
    assert out.read_text() == "precious"


def test_compile_and_inspect_supermodel(tmp_path):
    out = tmp_path / "sm"
    res = run("compile", "torchvision:resnet18", "--task", "seg:13", "--task", "depth:1", "--head-hidden", "8",
              "--input-shape", "1,3,32,32", "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert "policy-able units: 20 convs" in res.stdout and (out / "weights.safetensors").exists()
    res = run("inspect", str(out), "--json")
    doc = json.loads(res.stdout)
    assert doc["tasks"] == ["seg", "depth"] and len(doc["units"]) == 20


@pytest.mark.parametrize("task,needle", [("seg", "NAME:CHANNELS"), ("seg:0", "at least one"),
                                         ("seg:x", "not a whole number")])
def test_compile_rejects_bad_task_specs(tmp_path, task, needle):
    res = run("compile", "torchvision:resnet18", "--task", task, "-o", str(tmp_path / "sm"))
    assert res.returncode == 2 and needle in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "sm").exists()


def test_compile_rejects_duplicate_tasks(tmp_path):
    res = run("compile", "torchvision:resnet18", "--task", "a:1", "--task", "a:2", "-o", str(tmp_path / "sm"))
    assert res.returncode == 2 and "given twice" in res.stderr


def test_train_quick_run_and_bad_config(tmp_path):
    args = ["train", str(Path(__file__).resolve().parents[2] / "configs" / "synthetic-quick.yaml"),
            "--out", str(tmp_path / "run"), "--quiet", "--set", "backbone=torchvision:mobilenet_v3_small",
            "--set", "input_size=[32, 32]", "--set", "dataset.options.length=16", "--set", "batch_size=4"]
    for stage in ("pretrain", "policy", "posttrain"):
        args += ["--set", f"stages.{stage}.iters=2"]
    res = run(*args)
    assert res.returncode == 0, res.stderr
    assert "segment_semantic: miou" in res.stdout and (tmp_path / "run" / "report.json").exists()
    res = run("train", "--out", str(tmp_path / "other"), "--set", "stages.pretrain.itres=1")
    assert res.returncode == 2 and "unknown key 'stages.pretrain.itres'" in res.stderr
    assert not (tmp_path / "other").exists()


def test_every_command_in_the_readme_exists():
    import re

    from automtl_compiler.cli.main import main
    from click.testing import CliRunner

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    commands = set(re.findall(r"(?:^|\$ |`)automtl ([a-z]+)", readme, flags=re.MULTILINE))
    assert {"inspect", "convert", "compile", "sample", "prune", "export", "bench", "train", "run"} <= commands
    for name in commands:
        result = CliRunner().invoke(main, [name, "--help"], standalone_mode=False)
        assert result.exit_code == 0, f"README mentions `automtl {name}`, which does not exist"


def test_cli_reference_options_exist_and_setup_commands_match_ci():
    import re

    from automtl_compiler.cli.main import main
    from click.testing import CliRunner

    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text()
    table = readme[readme.index("## CLI reference"):]
    table = table[:table.index("\n## ")]
    rows = [r for r in table.splitlines() if r.startswith("| `automtl ")]
    assert len(rows) >= 9
    for row in rows:
        name = re.match(r"\| `automtl ([a-z]+)", row).group(1)
        help_text = CliRunner().invoke(main, [name, "--help"]).output
        for option in re.findall(r"`(--[a-z-]+)", row.split("|")[3]):
            assert option in help_text, f"the README lists {option} for `automtl {name}`, which has no such option"
    start = readme[readme.index("## Start here"):]
    block = start[start.index("```bash") + 7:start.index("```", start.index("```bash") + 7)].strip().splitlines()
    ci = [line for line in (root / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert block == ci, "the README's two set-up commands and .ci/run differ"
