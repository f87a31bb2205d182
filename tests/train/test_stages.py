"""Policy training computes only the gradients each step uses: network steps none for the policy logits (so
the backward keeps no branch outputs for the gates), policy steps none for the weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from automtl_compiler.train.config import load_config
from automtl_compiler.train.stages import frozen

ROOT = Path(__file__).resolve().parents[2]
TINY = ["backbone=torchvision:mobilenet_v3_small", "input_size=[32, 32]", "dataset.options.length=16",
        "tasks.segment_semantic.hidden=8", "tasks.depth_zbuffer.hidden=8", "tasks.normal.hidden=8", "batch_size=4",
        "eval_batches=1", "stages.pretrain.iters=1", "stages.policy.iters=3", "stages.policy.network_steps=2",
        "stages.policy.policy_steps=1", "stages.posttrain.iters=1", "precision=fp32"]


def test_frozen_restores_gradients_even_after_an_error():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    with pytest.raises(RuntimeError), frozen([a]):
        assert not a.requires_grad and b.requires_grad
        raise RuntimeError("boom")
    assert a.requires_grad and b.requires_grad
    b.requires_grad_(False)
    with frozen([a, b]):
        assert not a.requires_grad and not b.requires_grad
    assert a.requires_grad and not b.requires_grad, "a parameter frozen before stays frozen"


def test_policy_stage_steps_compute_only_their_own_gradients(tmp_path, monkeypatch):
    from automtl_compiler.train.run import make_datasets, make_task_types
    from automtl_compiler.train.trainer import Trainer

    cfg = load_config(ROOT / "configs" / "synthetic-quick.yaml", TINY)
    datasets = make_datasets(cfg)
    trainer = Trainer(cfg, tmp_path / "run", datasets=datasets, task_types=make_task_types(cfg, datasets["train"]),
                      progress=False)
    model = trainer.model
    policy_ids = {id(p) for p in model.policy_parameters()}
    seen: list[tuple[str, bool, bool]] = []  # (optimiser, a policy logit has a gradient, a weight has one)

    def spy(name: str, step):  # type: ignore[no-untyped-def]
        def wrapped(*args, **kwargs):  # type: ignore[no-untyped-def]
            seen.append((name, any(p.grad is not None for p in model.policy_parameters()),
                         any(p.grad is not None for p in model.network_parameters())))
            return step(*args, **kwargs)
        return wrapped

    for name in ("network", "policy"):
        opt = trainer.loop.opts[name]
        monkeypatch.setattr(opt, "step", spy(name, opt.step))
    trainer.run()
    assert seen == [("network", False, True), ("network", False, True), ("policy", True, False)]
    assert all(p.grad is None for p in model.parameters()), "no gradient is kept after a step"
    # after the stage every parameter trains again
    assert all(p.requires_grad for p in model.parameters())
    assert policy_ids == {id(p) for p in model.policy_parameters()}


def test_constant_gates_keep_no_branch_outputs_for_the_backward():
    """The bytes autograd saves in a soft forward drop when the gates need no gradient: the reason network
    steps freeze the policy logits."""
    import torchvision

    from automtl_compiler import build_supermodel
    from automtl_compiler.nn.heads import ASPPHead

    torch.manual_seed(0)
    heads = {"a": ASPPHead(512, 2, hidden=8), "b": ASPPHead(512, 1, hidden=8)}
    model = build_supermodel(torchvision.models.resnet18(), heads, input_shape=(1, 3, 32, 32))
    x = torch.randn(2, 3, 64, 64)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_bytes() -> int:
        """Bytes of the activations (not the weights) the forward saves for the backward."""
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.untyped_storage().data_ptr() not in weights:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.forward_all(x, mode="soft", generator=torch.Generator().manual_seed(0))
        return sum(storages.values())

    full = saved_bytes()
    with frozen(model.policy_parameters()):
        network_only = saved_bytes()
    assert network_only < 0.75 * full  # measured: 0.61 (resnet18, 2 tasks, 64 px)
