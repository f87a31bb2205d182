"""Activation checkpointing of units' branches: the same values, gradients and batch-norm statistics as
without it, and fewer bytes kept for the backward."""

from __future__ import annotations

import copy

import torch

from automtl_compiler import build_supermodel
from automtl_compiler.nn.heads import ASPPHead
from tests.helpers import Small, randomise_bn


def saved_bytes_and_step(model, x: torch.Tensor):  # type: ignore[no-untyped-def]
    """Bytes the forward keeps for the backward (distinct storages), and the step's outputs and gradients."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = model.forward_all(x, mode="soft", tau=2.0, generator=torch.Generator().manual_seed(3))
    loss = sum((o * torch.linspace(-1, 1, o.numel()).reshape(o.shape)).sum() for o in outs.values())
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return sum(storages.values()), {t: o.detach() for t, o in outs.items()}, grads


def test_checkpointed_branches_compute_the_same_and_keep_less():
    torch.manual_seed(0)
    heads = {t: ASPPHead(16, 2, hidden=4, dropout=0.0) for t in ("a", "b")}
    plain = build_supermodel(randomise_bn(Small()), heads, input_shape=(2, 3, 24, 24)).train()
    ckpt = copy.deepcopy(plain)
    ckpt.use_checkpointing(True)
    assert ckpt.checkpointing and "checkpointed_" in ckpt.generated_code("soft")
    assert "checkpointed_" not in ckpt.generated_code("hard"), "only soft and pre-training calls train branches"
    x = torch.randn(2, 3, 24, 24)
    kept_plain, outs_plain, grads_plain = saved_bytes_and_step(plain, x)
    kept_ckpt, outs_ckpt, grads_ckpt = saved_bytes_and_step(ckpt, x)
    for t in outs_plain:
        torch.testing.assert_close(outs_ckpt[t], outs_plain[t], rtol=0, atol=0)
    assert grads_ckpt.keys() == grads_plain.keys()
    for k in grads_plain:
        torch.testing.assert_close(grads_ckpt[k], grads_plain[k], rtol=1e-6, atol=1e-7)
    for k, v in plain.state_dict().items():  # running statistics updated once, not again by the recomputation
        torch.testing.assert_close(ckpt.state_dict()[k], v, rtol=0, atol=0, msg=k)
    assert kept_ckpt < 0.5 * kept_plain, f"checkpointing keeps {kept_ckpt} bytes against {kept_plain}"
    ckpt.use_checkpointing(False)
    assert "checkpointed_" not in ckpt.generated_code("soft")
    with torch.no_grad():  # no gradients recorded: the segments run plainly
        ckpt.use_checkpointing(True)
        torch.testing.assert_close(ckpt.forward_all(x, mode="pretrain")["a"], plain.forward_all(x, mode="pretrain")["a"])
