"""``automtl export --precision fp16|int8`` and ``automtl bench`` of several files, through the CLI's entry
point: the check's table, the run directory's config as the default, one-line refusals that write nothing."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from automtl_compiler.backends.onnx_calibration import DeploymentData
from automtl_compiler.train.run import write_marker
from tests.backends.test_onnx_precision import deployment_model
from tests.cli.test_exit_codes import run


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An automtl run directory (marker, config.yaml, compact/, supermodel/) with a briefly trained model."""
    root = tmp_path_factory.mktemp("cli_precision")
    deployment_model(root)
    write_marker(root, "run")
    return root


def one_line_error(res: subprocess.CompletedProcess[str], needle: str) -> None:
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: ") and needle in res.stderr, res.stderr


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_file() or p.name.startswith("."))


def test_variants_and_bench(work: Path, tmp_path: Path) -> None:
    res = run("export", str(work / "compact"), "-o", "int8.onnx", "--precision", "int8", "--calibration-images", "8",
              cwd=tmp_path)  # the config comes from the run directory
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:9]] == ["segment_semantic"] * 2 + ["depth_zbuffer"] * 5
    assert lines[9].startswith("Δm of int8 against fp32: ") and "on 64 validation samples" in lines[9]
    assert lines[-1].startswith("wrote int8.onnx (") and "int8 QDQ, minmax calibration on 8 training images" in lines[-1]
    assert "then against fp32 on 64 validation samples" in lines[-1]

    res = run("export", str(work / "compact"), "-o", "fp16.onnx", "--precision", "fp16", "--config",
              str(work / "config.yaml"), "--task", "depth_zbuffer", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert [line.split("|")[1].strip() for line in res.stdout.splitlines()[2:7]] == ["depth_zbuffer"] * 5
    assert run("export", str(work / "compact"), "-o", "fp32.onnx", "--task", "depth_zbuffer", cwd=tmp_path).returncode == 0

    res = run("bench", "fp32.onnx", "fp16.onnx", "int8.onnx", "--provider", "cpu", "--repeat", "2", "--warmup", "1",
              cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert [c.strip() for c in lines[0].split("|")[1:-1]] == ["file", "precision", "provider", "batch", "input",
                                                              "median ms", "images/s", "ratio"]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in lines[2:5]]
    assert [r[:3] for r in rows] == [["fp32.onnx", "fp32", "cpu"], ["fp16.onnx", "fp16", "cpu"], ["int8.onnx", "int8", "cpu"]]
    assert rows[0][-1] == "1.00" and all(float(r[5]) > 0 and float(r[-1]) > 0 for r in rows)
    assert "round-robin" in lines[5]
    res = run("bench", "int8.onnx", "--provider", "cpu", "--repeat", "1", cwd=tmp_path)
    assert res.returncode == 0 and "int8.onnx (int8)" in res.stdout.splitlines()[-1], res.stdout
    assert files(tmp_path) == ["fp16.onnx", "fp32.onnx", "int8.onnx"]


@pytest.mark.parametrize("args, needle", [
    (["--precision", "int8"], "give the training config (--config)"),
    (["--precision", "int8", "--config", "{root}/no_dataset.yaml"], "the config has no 'dataset' section"),
    (["--precision", "int8", "--config", "{root}/config.yaml", "--calibration-images", "0"], "0 is not in the range"),
    (["--precision", "int8", "--config", "{root}/config.yaml", "--calibration-images", "65"],
     "the training split has 64 image(s)"),
    (["--precision", "int8", "--config", "{root}/missing.yaml"], "missing.yaml: config file not found"),
    (["--precision", "fp16", "--calibration-images", "8"], "--calibration-images applies to --precision int8"),
    (["--config", "{root}/config.yaml"], "--config applies to --precision fp16 or int8"),
    (["--precision", "int8", "--max-drop", "-1"], "-1.0 is not in the range x>=0"),
])
def test_bad_input_is_one_line_and_writes_nothing(work: Path, tmp_path: Path, args: list[str], needle: str) -> None:
    (work / "no_dataset.yaml").write_text("batch_size: 4\n")
    (tmp_path / "elsewhere").mkdir()
    model = tmp_path / "elsewhere" / "compact"  # not in a run directory: no default config
    model.symlink_to(work / "compact")
    res = run("export", str(model), "-o", "out.onnx", *[a.format(root=work) for a in args], cwd=tmp_path)
    one_line_error(res, needle)
    assert files(tmp_path) == []


def test_supermodel_has_no_variants(work: Path, tmp_path: Path) -> None:
    res = run("export", str(work / "supermodel"), "-o", "sm.onnx", "--precision", "int8", cwd=tmp_path)
    one_line_error(res, "is a SuperModel; deployment variants are made of compact models")
    assert files(tmp_path) == []


def test_too_large_a_drop_keeps_the_existing_file(work: Path, tmp_path: Path, monkeypatch) -> None:
    real = DeploymentData.calibration_images
    monkeypatch.setattr(DeploymentData, "calibration_images", lambda self, n: [i * 0.01 for i in real(self, n)])
    (tmp_path / "model.onnx").write_text("precious")
    res = run("export", str(work / "compact"), "-o", "model.onnx", "--precision", "int8", "--calibration-images", "8",
              cwd=tmp_path)
    one_line_error(res, "Δm points against fp32")
    assert "model.onnx was not written" in res.stderr and res.stdout == ""
    assert (tmp_path / "model.onnx").read_text() == "precious" and files(tmp_path) == ["model.onnx"]
