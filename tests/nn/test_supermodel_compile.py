"""torch.compile and channels_last on SuperModels and compact models: they run and compute what eager,
contiguous PyTorch computes (values and gradients), within float32 rounding."""

from __future__ import annotations

import copy

import pytest
import torch

from automtl_compiler import build_supermodel
from automtl_compiler.nn.compact import prune
from automtl_compiler.nn.heads import ASPPHead
from tests.helpers import Small, Tiny, randomise_bn


def supermodel(backbone: torch.nn.Module | None = None):  # type: ignore[no-untyped-def]
    """Small (every kind of unit) or another backbone, with two ASPP heads (upsampling to the input)."""
    torch.manual_seed(0)
    backbone = backbone or Small()
    channels = 16 if isinstance(backbone, Small) else 8
    heads = {"a": ASPPHead(channels, 3, hidden=4, dropout=0.0), "b": ASPPHead(channels, 1, hidden=4, dropout=0.0)}
    return build_supermodel(randomise_bn(backbone), heads, input_shape=(2, 3, 12, 12)).train()


def soft_step(model, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:  # type: ignore[no-untyped-def]
    """Outputs and parameter gradients of a soft-mode step with fixed Gumbel noise and regulariser."""
    outs = model.forward_all(x, mode="soft", tau=2.0, generator=torch.Generator().manual_seed(3))
    loss = sum((o * torch.linspace(-1, 1, o.numel()).reshape(o.shape)).sum() for o in outs.values())
    loss = loss + sum(model.policy_regulariser(t, generator=torch.Generator().manual_seed(4)) for t in model.tasks)
    model.zero_grad(set_to_none=True)
    loss.backward()
    return ({t: o.detach() for t, o in outs.items()},
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})


def assert_close_dicts(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float) -> None:
    """Each entry equal within ``rtol`` of its largest value (or of a thousandth of the largest of all,
    for entries that are zero in exact arithmetic, such as the bias of a conv before a batch norm)."""
    assert got.keys() == want.keys()
    overall = max(v.abs().max().item() for v in want.values())
    for k in want:
        scale = max(want[k].abs().max().item(), 1e-3 * overall)
        err = (got[k] - want[k]).abs().max().item() / scale
        assert err < rtol, f"{k}: relative difference {err:.3g}"


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_compiled_supermodel_step_equals_eager(mode):
    sm = supermodel(Tiny())
    x = torch.randn(2, 3, 12, 12)
    step = soft_step if mode == "soft" else None
    if step is None:
        def step(model, x):  # type: ignore[no-untyped-def]
            outs, z = model.forward_all(x, mode=mode, feature=True)
            model.zero_grad(set_to_none=True)
            sum(o.square().sum() for o in outs.values()).backward()
            return ({t: o.detach() for t, o in outs.items()} | ({"z": z.detach()} if z is not None else {}),
                    {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    want = step(sm, x)
    sm.use_compiler("aot_eager")
    assert sm.compiler_backend == "aot_eager"
    for _ in range(2):  # the second call runs the cached compiled code
        got = step(sm, x)
        assert_close_dicts(got[0], want[0], 1e-5)
        assert_close_dicts(got[1], want[1], 1e-4)
    copied = copy.deepcopy(sm)  # a copy leaves the compiled wrappers behind and compiles its own
    assert_close_dicts(step(copied, x)[0], want[0], 1e-5)
    sm.use_compiler(None)
    assert_close_dicts(step(sm, x)[1], want[1], 1e-6)


def test_channels_last_soft_step_equals_contiguous():
    sm = supermodel()
    x = torch.randn(2, 3, 12, 12)
    want = soft_step(sm, x)
    sm.to(memory_format=torch.channels_last)
    assert any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in sm.parameters())
    got = soft_step(sm, x.contiguous(memory_format=torch.channels_last))
    assert_close_dicts(got[0], want[0], 1e-5)
    assert_close_dicts(got[1], want[1], 1e-4)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_compact_model_equals_eager(backend):
    sm = supermodel(Tiny()).eval()
    compact = prune(sm, sm.sample_policy(seed=1)).eval()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        want = compact(x)
        got = torch.compile(compact, backend=backend)(x)
    assert_close_dicts(got, want, 1e-5)
