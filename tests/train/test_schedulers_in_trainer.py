"""Every registered scheduler trains the synthetic-scenes SuperModel through the real Trainer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from automtl_compiler.errors import AutomtlError
from automtl_compiler.train.config import load_config
from automtl_compiler.train.run import make_datasets, make_task_types
from automtl_compiler.train.schedulers import REGISTRY, create
from automtl_compiler.train.trainer import Batches, Trainer


def tiny_backbone() -> nn.Module:
    """A four-conv backbone (the config names it as ``tests.train.test_schedulers_in_trainer:tiny_backbone``)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())


BASE = ["backbone=tests.train.test_schedulers_in_trainer:tiny_backbone", "input_size=[32, 32]", "dataset.options.length=256",
        "tasks.segment_semantic.hidden=16", "tasks.depth_zbuffer.hidden=16", "tasks.normal.hidden=16",
        "tasks.segment_semantic.options={resize: prediction}", "tasks.depth_zbuffer.options={resize: prediction}",
        "tasks.normal.options={resize: prediction}", "batch_size=8", "eval_every=0", "checkpoint_every=0",
        "eval_batches=2", "stages.posttrain.lr=0.002"]
SCHEDULERS = {
    "sum": {"name": "sum"},
    "imtl-hybrid": {"name": "imtl"},
    "imtl-gradient-params": {"name": "imtl", "method": "gradient", "level": "params"},
    "metagf": {"name": "metagf", "span": 20, "meta_batches": 4},
    "tmt": {"name": "tmt", "target": "segment_semantic", "span": 20},
    "torchjd-upgrad": {"name": "torchjd", "aggregator": "UPGrad"},
}


def val_losses(trainer: Trainer) -> dict[str, float]:
    """Mean validation loss per task of the trainer's model in fixed mode (no gradients)."""
    val = Batches(trainer.datasets["val"], 16, 0, "sample")
    trainer.model.eval()
    totals = {t: 0.0 for t in trainer.tasks}
    with torch.no_grad():
        for i in range(4):
            x, targets = val.batch(i)
            for t, v in trainer.losses(trainer.model.forward_all(x, mode="fixed"), targets).items():
                totals[t] += float(v) / 4
    trainer.model.train()
    return totals


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_scheduler_lowers_every_task_loss(tmp_path, name: str) -> None:
    spec = SCHEDULERS[name]
    sets = [*BASE, "stages.posttrain.iters=160", "scheduler=" + str(spec).replace("'", "")]
    cfg = load_config(None, sets)
    datasets = make_datasets(cfg)
    trainer = Trainer(cfg, tmp_path / name, datasets=datasets, task_types=make_task_types(cfg, datasets["train"]),
                      progress=False, baseline=True)  # the all-share model: every scheduler has its inputs
    before = val_losses(trainer)
    trainer.run()
    after = val_losses(trainer)
    for task in trainer.tasks:
        assert after[task] < 0.9 * before[task], (name, task, before[task], after[task])


SPECS = {"imtl": "{name: imtl}", "metagf": "{name: metagf, span: 2, meta_batches: 1}"}


@pytest.mark.parametrize("name", list(SPECS))
def test_scheduler_runs_every_stage_and_resumes(tmp_path, name: str) -> None:
    sets = [*BASE, "stages.pretrain.iters=4", "stages.policy.iters=6", "stages.policy.network_steps=2",
            "stages.policy.policy_steps=1", "stages.posttrain.iters=4", "checkpoint_every=2",
            f"scheduler={SPECS[name]}"]
    cfg = load_config(None, sets)
    datasets = make_datasets(cfg)
    types = make_task_types(cfg, datasets["train"])
    report = Trainer(cfg, tmp_path / "a", datasets=datasets, task_types=types, progress=False).run()
    assert set(report["tasks"]) == set(cfg["tasks"])
    # a second trainer on the same directory resumes from the final checkpoint (scheduler state included)
    again = Trainer(cfg, tmp_path / "a", datasets=datasets, task_types=types, progress=False).run()
    assert again["tasks"] == report["tasks"]


def test_scheduler_validation_says_what_works() -> None:
    cfg = load_config(None, [*BASE, "scheduler={name: tmt, target: normal, stages: [pretrain]}"])
    datasets = make_datasets(cfg)
    with pytest.raises(AutomtlError, match=r"cannot run in stage\(s\) \['pretrain'\].*posttrain"):
        Trainer(cfg, "/nonexistent-run", datasets=datasets, task_types=make_task_types(cfg, datasets["train"]),
                progress=False)
    with pytest.raises(AutomtlError, match="unknown scheduler 'pcgradd'; available: imtl, metagf, sum, tmt, torchjd"):
        create("pcgradd", tasks=["a", "b"])
    with pytest.raises(AutomtlError, match="scheduler 'imtl'"):
        create("imtl", tasks=["a", "b"], method="fast")
    assert set(REGISTRY) >= {"sum", "imtl", "metagf", "tmt", "torchjd"}
    with pytest.raises(AutomtlError, match="unknown aggregator 'UPgrad'; use one of .*UPGrad"):
        create("torchjd", tasks=["a", "b"], aggregator="UPgrad")


def test_meta_schedulers_get_the_pass_length_and_tmt_its_labelled_loader() -> None:
    """A span knows how many batches one pass over the training data is (Meta-GF's meta phase); TMT gets
    a second loader over the labelled part even when every sample is labelled (the authors' part loader)."""
    cfg = load_config(None, [*BASE, "scheduler={name: tmt, target: normal}"])
    datasets = make_datasets(cfg)
    trainer = Trainer(cfg, "/nonexistent-run", datasets=datasets,
                      task_types=make_task_types(cfg, datasets["train"]), progress=False, baseline=True)
    batches = trainer.batches("train", "posttrain")
    labelled = trainer.loop.labelled_batches("posttrain")
    ctx = trainer.span_context("posttrain", "fixed", batches, 0, 1, labelled)
    assert ctx.epoch == len(datasets["train"]) // 8
    assert labelled is not None and len(labelled.dataset) == len(datasets["train"])
    x, y = ctx.batch_for("normal", 0)
    assert not torch.equal(x, ctx.batch(0)[0]) and "normal" in y


def test_nan_loss_stops_with_the_task_named(tmp_path) -> None:
    cfg = load_config(None, [*BASE, "stages.posttrain.iters=3", "scheduler={name: imtl}", "stages.posttrain.lr=1e30"])
    datasets = make_datasets(cfg)
    trainer = Trainer(cfg, tmp_path / "nan", datasets=datasets, task_types=make_task_types(cfg, datasets["train"]),
                      progress=False, baseline=True)
    with pytest.raises(AutomtlError, match=r"the \w+ loss is (nan|inf)"):
        trainer.run()
