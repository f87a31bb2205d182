"""Real datasets through the real CLI: tiny directories in each real layout, trained with `automtl train`
and `automtl run` from configs that set little more than ``dataset.name`` and ``dataset.root``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from tests.realdata import write_cityscapes, write_folder, write_nyuv2, write_taskonomy

ROOT = Path(__file__).resolve().parents[2]
#: Only the step budget is cut (every stage still runs); everything else is each config's own.
BUDGET = ["--set", "stages.pretrain.iters=2", "--set", "stages.policy.iters=2", "--set", "stages.policy.network_steps=1",
          "--set", "stages.policy.policy_steps=1", "--set", "stages.posttrain.iters=2", "--set", "batch_size=2",
          "--set", "stages.sample.candidates=1", "--quiet"]


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "automtl_compiler.cli.main", *map(str, args)], capture_output=True, check=False,
                          text=True, cwd=cwd or ROOT, timeout=600)


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def dense_tasks(*names: str) -> str:
    return "tasks:\n" + "".join(f"  {n}: {{hidden: 16}}\n" for n in names)


def report(run: Path) -> dict:
    return json.loads((run / "report.json").read_text())


def test_nyuv2_trains_with_only_name_and_root_and_evaluates_the_whole_split(tmp_path):
    write_nyuv2(tmp_path / "nyu", n_train=6, n_val=3, hw=(32, 48))
    cfg = write_config(tmp_path / "nyu.yaml", f"dataset: {{name: nyuv2, root: {tmp_path / 'nyu'}}}\n")
    res = cli("train", cfg, "--out", tmp_path / "run", *BUDGET)
    assert res.returncode == 0, res.stderr
    rep = report(tmp_path / "run")
    assert set(rep["tasks"]) == {"segment_semantic", "depth_zbuffer", "normal"}
    assert rep["evaluated"] == {"split": "val", "samples": 3, "split_samples": 3, "whole_split": True}
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "input_size:\n- 32\n- 48" in saved  # taken from the data
    assert "length" not in saved  # no synthetic option leaked into the real dataset


@pytest.mark.parametrize("classes", [7, 19])
def test_cityscapes_trains_with_7_and_19_classes(tmp_path, classes):
    write_cityscapes(tmp_path / "cs", n_train=5, n_val=2, hw=(32, 64))
    cfg = write_config(tmp_path / "cs.yaml", f"dataset: {{name: cityscapes, root: {tmp_path / 'cs'}, "
                                             f"options: {{num_classes: {classes}}}}}\n"
                                             + dense_tasks("segment_semantic", "depth_zbuffer"))
    res = cli("train", cfg, "--out", tmp_path / "run", *BUDGET)
    assert res.returncode == 0, res.stderr
    model = json.loads((tmp_path / "run" / "report.json").read_text())
    assert set(model["tasks"]) == {"segment_semantic", "depth_zbuffer"}
    assert "segment_semantic: miou" in res.stdout


def test_taskonomy_trains_through_automtl_train(tmp_path):
    write_taskonomy(tmp_path / "tt", n_train=5, n_val=2, hw=(40, 40))
    cfg = write_config(tmp_path / "tt.yaml", f"dataset: {{name: taskonomy, root: {tmp_path / 'tt'}, "
                                             "options: {resolution: [32, 32]}}\n")
    res = cli("train", cfg, "--out", tmp_path / "run", *BUDGET)
    assert res.returncode == 0, res.stderr
    assert report(tmp_path / "run")["evaluated"]["samples"] == 2


def test_folder_dataset_runs_the_whole_pipeline(tmp_path):
    write_folder(tmp_path / "mine", n_train=5, n_val=2, hw=(32, 32), style="lists",
                 tasks={"seg": "segment_semantic", "depth": "depth_zbuffer"}, num_classes=5)
    cfg = write_config(tmp_path / "mine.yaml", f"dataset: {{name: folder, root: {tmp_path / 'mine'}, "
                                               "options: {num_classes: {seg: 5}}}\n"
                                               "tasks:\n  seg: {type: segment_semantic, hidden: 16}\n"
                                               "  depth: {type: depth_zbuffer, hidden: 16}\n")
    res = cli("run", cfg, "--out", tmp_path / "run", "--no-references", *BUDGET)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "run" / "model.onnx").is_file()
    assert "evaluated on 2 of 2 validation samples (the whole split)" in res.stdout


def test_a_users_dataset_class_through_automtl_run_with_references(tmp_path):
    cfg = write_config(tmp_path / "user.yaml", "dataset: {name: tests.userdata:ToyDataset, options: {length: 6}}\n"
                                               + dense_tasks("segment_semantic", "depth_zbuffer"))
    res = cli("run", cfg, "--out", tmp_path / "run", *BUDGET)
    assert res.returncode == 0, res.stderr
    assert "Δm vs single-task references" in res.stdout
    assert (tmp_path / "run" / "references" / "report.json").is_file()


def test_real_dataset_errors_are_one_line_naming_the_file(tmp_path):
    res = cli("train", "--out", tmp_path / "run", "--set", "dataset.name=nyuv2", "--set",
              f"dataset.root={tmp_path / 'nowhere'}", "--quiet")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "nowhere" in res.stderr and "directory not found" in res.stderr
    assert not (tmp_path / "run").exists()
    write_nyuv2(tmp_path / "nyu", n_train=5, n_val=2, hw=(16, 24))
    label = tmp_path / "nyu" / "val" / "label" / "1.npy"
    bad = np.load(label)
    bad[3, 3] = 20
    np.save(label, bad)
    res = cli("train", "--out", tmp_path / "run2", "--set", "dataset.name=nyuv2", "--set",
              f"dataset.root={tmp_path / 'nyu'}", *BUDGET)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "1.npy" in res.stderr and "20" in res.stderr


def test_train_takes_pretrained_weights_and_never_ignores_them(tmp_path):
    torch.manual_seed(3)
    net = torchvision.models.resnet18(weights=None)
    torch.save({"model": {**net.state_dict(), "aux_head.weight": torch.zeros(3)}}, tmp_path / "r18.pth")
    budget = [*BUDGET, "--set", "dataset.options.length=8", "--set", "input_size=[32, 32]"]
    res = cli("train", "--out", tmp_path / "missing", "--weights", tmp_path / "nope.pth", *budget)
    assert res.returncode == 2 and "nope.pth" in res.stderr
    res = cli("train", "--out", tmp_path / "strict", "--weights", tmp_path / "r18.pth", *budget)
    assert res.returncode == 2 and "r18.pth" in res.stderr and "aux_head.weight" in res.stderr  # not in the net
    res = cli("train", "--out", tmp_path / "run", "--weights", tmp_path / "r18.pth", "--weights-non-strict", *budget,
              "--set", "stages.pretrain.iters=0", "--set", "stages.policy.iters=0", "--set", "stages.posttrain.iters=0")
    assert res.returncode == 0, res.stderr
    from safetensors.torch import load_file

    (ckpt,) = (tmp_path / "run" / "checkpoints").glob("state-*.safetensors")
    state = load_file(str(ckpt))
    conv1 = [v for k, v in state.items() if k.endswith("conv1.weight") and v.shape == (64, 3, 7, 7)]
    assert conv1 and all(torch.equal(v, net.conv1.weight) for v in conv1)
