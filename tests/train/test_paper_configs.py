"""The AutoMTL paper-protocol configs run as written (Deeplab-ResNet-34 with ImageNet-format weights, ASPP
heads of width 1024, per-task loaders, AdaShare's data layouts) for a few iterations on tiny directories;
only the data root, the weights file, the step budget and the sizes are changed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from automtl_compiler.data import get_dataset
from automtl_compiler.data.adashare import AdaShareCityscapes, AdaShareNYUv2
from automtl_compiler.train.config import load_config
from tests.adashare_data import write_adashare_cityscapes, write_adashare_nyuv2

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["stages.pretrain.iters=1", "stages.policy.iters=2", "stages.policy.network_steps=1",
         "stages.policy.policy_steps=1", "stages.posttrain.iters=1", "batch_size=2", "eval_every=0",
         "checkpoint_every=0", "dataset.workers=0"]


@pytest.fixture(scope="module")
def resnet34_weights(tmp_path_factory) -> Path:
    """A state dict in the format of torchvision's ``resnet34-b627a593.pth`` (random values)."""
    path = tmp_path_factory.mktemp("weights") / "resnet34.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    return path


def test_the_paper_configs_load_and_name_their_sources():
    for name in ("nyuv2-automtl.yaml", "cityscapes-automtl.yaml"):
        text = (ROOT / "configs" / name).read_text()
        cfg = load_config(ROOT / "configs" / name)
        assert cfg["backbone"] == "models/deeplab_resnet34.prototxt" and cfg["backbone_weights"]
        assert all(spec["hidden"] == 1024 for spec in cfg["tasks"].values())
        assert cfg["dataset"]["loader"] == "per_task" and cfg["eval_batches"] is None
        assert "894cfd1be0831a4927447afb7598f82399ec5b1c" in text  # the AutoMTL commit the sources cite
        assert text.count(".py:") + text.count(".ipynb") >= 20  # values cite AutoMTL's files


def test_nyuv2_and_cityscapes_pick_adashares_layout_from_the_index(tmp_path):
    write_adashare_nyuv2(tmp_path / "nyu")
    write_adashare_cityscapes(tmp_path / "cs")
    assert isinstance(get_dataset("nyuv2", root=tmp_path / "nyu", split="val"), AdaShareNYUv2)
    assert isinstance(get_dataset("cityscapes", root=tmp_path / "cs", split="val"), AdaShareCityscapes)
    assert get_dataset("nyuv2", root=tmp_path / "nyu").num_classes["segment_semantic"] == 40
    with pytest.raises(Exception, match=r"bad options \['scales'\]"):
        get_dataset("nyuv2", root=tmp_path / "nyu", scales=[1.0])


@pytest.mark.slow
@pytest.mark.parametrize("config, writer, size", [
    ("nyuv2-automtl.yaml", write_adashare_nyuv2, (48, 64)),
    ("cityscapes-automtl.yaml", write_adashare_cityscapes, (32, 64)),
])
def test_paper_config_trains_a_few_iterations(tmp_path, resnet34_weights, config, writer, size):
    writer(tmp_path / "data", n_train=5, n_test=2, hw=size)
    sets = [*SMALL, f"dataset.root={tmp_path / 'data'}", f"backbone_weights={resnet34_weights}",
            "dataset.options.crop=[32, 32]", "input_size=[32, 32]", "dataset.split_options={val: {crop: [32, 32]}}"]
    args = [sys.executable, "-m", "automtl_compiler.cli.main", "train", str(ROOT / "configs" / config),
            "--out", str(tmp_path / "run"), "--quiet"]
    for s in sets:
        args += ["--set", s]
    res = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=900, check=False)
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["evaluated"]["whole_split"] and report["evaluated"]["samples"] == 2
    cfg = load_config(ROOT / "configs" / config)
    assert set(report["tasks"]) == set(cfg["tasks"])
