"""Training data and evaluation: deterministic batches with DataLoader workers, exact whole-split metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from automtl_compiler.train.batches import Batches, eval_loader
from automtl_compiler.train.config import load_config
from automtl_compiler.train.run import make_datasets, make_task_types
from automtl_compiler.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
QUICK = ROOT / "configs" / "synthetic-quick.yaml"
TINY = ["backbone=torchvision:mobilenet_v3_small", "input_size=[32, 32]", "dataset.options.length=24",
        "tasks.segment_semantic.hidden=8", "tasks.depth_zbuffer.hidden=8", "tasks.normal.hidden=8"]


def _trainer(tmp_path: Path, extra: list[str]) -> Trainer:
    cfg = load_config(QUICK, [*TINY, *extra])
    datasets = make_datasets(cfg)
    return Trainer(cfg, tmp_path / "run", datasets=datasets, task_types=make_task_types(cfg, datasets["train"]),
                   progress=False)


class EpochEcho(Dataset):
    """Sample ``i`` is an image holding ``(i, epoch)``: shows which augmentation draw a sample got."""

    def __init__(self, n: int) -> None:
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return torch.tensor([float(i), float(self.epoch)]), {"t": torch.tensor(i)}


def test_batches_are_the_same_with_and_without_workers_in_any_order():
    cfg = load_config(QUICK, TINY)
    train = make_datasets(cfg)["train"]
    direct = Batches(train, 4, 0, "pretrain")
    loaded = Batches(train, 4, 0, "pretrain", workers=2)
    try:
        for step in [0, 1, 2, 7, 8, 3, 4]:  # in order (read ahead by workers), then jumps (served afresh)
            x0, y0 = direct.batch(step)
            x1, y1 = loaded.batch(step)
            assert torch.equal(x0, x1)
            assert all(torch.equal(y0[k], y1[k]) for k in y0)
    finally:
        loaded.close()
    assert not torch.equal(direct.batch(0)[0], direct.batch(1)[0])


@pytest.mark.parametrize("workers", [0, 2])
def test_each_epoch_gets_its_own_augmentation_draw(workers):
    batches = Batches(EpochEcho(8), 4, 0, "pretrain", workers=workers)
    try:
        seen = {step: batches.batch(step)[0] for step in range(6)}  # 2 batches per epoch
    finally:
        batches.close()
    for step, x in seen.items():
        assert set(x[:, 1].tolist()) == {float(step // 2)}
    for epoch in range(3):  # every epoch covers every sample once
        ids = torch.cat([seen[2 * epoch][:, 0], seen[2 * epoch + 1][:, 0]])
        assert sorted(ids.tolist()) == list(range(8))


def test_eval_loader_reads_the_split_once_in_order():
    loader = eval_loader(EpochEcho(7), 3)
    ids = torch.cat([x[:, 0] for x, _ in loader]).tolist()
    assert ids == list(range(7))


def _reference_metrics(trainer: Trainer) -> dict[str, float]:
    """mIoU, pixel accuracy and mean absolute depth error over the whole validation split, one sample at a
    time, from a confusion matrix built here with numpy."""
    model, val = trainer.model.eval(), trainer.datasets["val"]
    c = trainer.task_types["segment_semantic"].num_classes
    conf = np.zeros((c, c), dtype=np.int64)
    abs_sum, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(val)):
            x, y = val[i]
            out = model.forward_all(x[None], mode="hard")
            seg = out["segment_semantic"][0]
            lab = F.interpolate(y["segment_semantic"][None, None].float(), size=seg.shape[-2:], mode="nearest")
            t, p = lab[0, 0].long().numpy().ravel(), seg.argmax(0).numpy().ravel()
            ok = (t >= 0) & (t < c)
            conf += np.bincount(t[ok] * c + p[ok], minlength=c * c).reshape(c, c)
            d = out["depth_zbuffer"][0, 0]
            gt = F.interpolate(y["depth_zbuffer"][None], size=d.shape, mode="nearest")[0, 0]
            valid = gt > 0
            abs_sum += float((d[valid] - gt[valid]).abs().double().sum())
            count += int(valid.sum())
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    return {"miou": float((tp[union > 0] / union[union > 0]).mean()), "pixel_acc": float(tp.sum() / conf.sum()),
            "abs_err": abs_sum / count}


def test_evaluation_is_the_whole_split_and_does_not_depend_on_the_batch_size(tmp_path):
    extra = ["dataset.split_options={val: {length: 7}}", "eval_batches=null"]
    one = _trainer(tmp_path / "a", [*extra, "batch_size=1"])
    three = _trainer(tmp_path / "b", [*extra, "batch_size=3"])
    m1, m3 = one.evaluate("hard"), three.evaluate("hard")
    assert one.evaluated == {"split": "val", "samples": 7, "split_samples": 7, "whole_split": True}
    assert three.evaluated["samples"] == 7
    for task in m1:
        for key, value in m1[task].items():
            assert m3[task][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (task, key)
    ref = _reference_metrics(one)
    assert m1["segment_semantic"]["miou"] == pytest.approx(ref["miou"], rel=1e-12)
    assert m1["segment_semantic"]["pixel_acc"] == pytest.approx(ref["pixel_acc"], rel=1e-12)
    assert m1["depth_zbuffer"]["abs_err"] == pytest.approx(ref["abs_err"], rel=1e-6)


def test_eval_batches_caps_the_evaluation_and_the_report_says_so(tmp_path):
    trainer = _trainer(tmp_path, ["dataset.split_options={val: {length: 7}}", "eval_batches=2", "batch_size=3"])
    trainer.evaluate("hard")
    assert trainer.evaluated == {"split": "val", "samples": 6, "split_samples": 7, "whole_split": False}


@pytest.mark.parametrize("loader", ["shared", "per_task"])
def test_training_with_workers_equals_training_without(tmp_path, loader):
    """Two DataLoader workers change nothing: the same batches, so the same weights after a few steps of
    every stage (per-task loaders each have their own workers)."""
    extra = ["stages.pretrain.iters=3", "stages.policy.iters=2", "stages.policy.network_steps=1",
             "stages.policy.policy_steps=1", "stages.posttrain.iters=2", "checkpoint_every=0", "eval_every=0",
             "eval_batches=1", "batch_size=4", "stages.sample.candidates=1", f"dataset.loader={loader}"]
    reports = []
    for workers in (0, 2):
        trainer = _trainer(tmp_path / f"w{workers}", [*extra, f"dataset.workers={workers}"])
        reports.append((trainer.run(), {k: v.clone() for k, v in trainer.model.state_dict().items()}))
    (r0, s0), (r2, s2) = reports
    assert r0["tasks"] == r2["tasks"]
    assert all(torch.equal(s0[k], s2[k]) for k in s0)
