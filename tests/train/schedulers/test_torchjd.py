"""torchjd aggregators as schedulers: the combined gradient equals torchjd's own mtl_backward / backward."""

from __future__ import annotations

import builtins
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from automtl_compiler.errors import AutomtlError
from automtl_compiler.train.schedulers import StepContext, create
from automtl_compiler.train.schedulers.jd import aggregator_names

torchjd = pytest.importorskip("torchjd")
from torchjd.aggregation import MGDA, PCGrad, UPGrad
from torchjd.autojac import backward, jac_to_grad, mtl_backward

TASKS = ["a", "b", "c"]
AGGREGATORS = {"UPGrad": UPGrad, "PCGrad": PCGrad, "MGDA": MGDA}


class Net(nn.Module):
    """A conv + batch-norm trunk ending at z; tasks a and b share a 1x1 conv after z, c does not."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.ab = nn.Conv2d(4, 4, 1)
        self.heads = nn.ModuleDict({t: nn.Conv2d(4, 1, 1) for t in TASKS})

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))

    def heads_from(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        h = F.relu(self.ab(z))
        return {t: self.heads[t](h if t != "c" else z) for t in TASKS}


def data() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    return x, {t: torch.randn(4, 1, 5, 5, generator=g, dtype=torch.float64) for t in TASKS}


def losses_of(outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {t: F.mse_loss(o, targets[t]) * (1 + i) for i, (t, o) in enumerate(outputs.items())}


def model() -> Net:
    torch.manual_seed(0)
    return Net().double().train()


def grads(net: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    scale = max(float(v.abs().max()) for v in want.values())
    for n, value in want.items():
        torch.testing.assert_close(got[n], value, rtol=0, atol=1e-9 * scale, msg=n)


@pytest.mark.parametrize("name", list(AGGREGATORS))
def test_features_level_equals_torchjd_mtl_backward(name):
    x, y = data()
    ours = model()
    z = ours.trunk(x)
    sched = create("torchjd", TASKS, aggregator=name, level="features")
    sched.backward(losses_of(ours.heads_from(z), y), StepContext(params=list(ours.parameters()), feature=z))

    ref = model()
    z = ref.trunk(x)
    leaf = z.detach().requires_grad_()
    feature = leaf.view_as(leaf)  # torchjd wants features with a grad_fn; the leaf is the shared "parameter"
    values = losses_of(ref.heads_from(feature), y)
    mtl_backward([values[t] for t in TASKS], features=feature, shared_params=[leaf], retain_graph=True)
    jac_to_grad([leaf], AGGREGATORS[name]())
    z.backward(leaf.grad)
    want = grads(ref)
    assert_same(grads(ours), want)
    sizes = {n: float(g.abs().max()) for n, g in want.items()}
    assert sizes["conv.weight"] > 0 and sizes["ab.weight"] > 0 and sizes["heads.c.weight"] > 0


@pytest.mark.parametrize("name", list(AGGREGATORS))
def test_params_level_equals_torchjd_backward_over_shared_parameters(name):
    x, y = data()
    ours = model()
    sched = create("torchjd", TASKS, aggregator=name, level="params")
    sched.backward(losses_of(ours.heads_from(ours.trunk(x)), y), StepContext(params=list(ours.parameters())))

    ref = model()
    values = losses_of(ref.heads_from(ref.trunk(x)), y)
    named = dict(ref.named_parameters())
    # two tasks or more reach the trunk and the a/b layer; each head is one task's
    shared = [p for n, p in named.items() if not n.startswith("heads.")]
    own = {t: [named[f"heads.{t}.weight"], named[f"heads.{t}.bias"]] for t in TASKS}
    for t in TASKS:
        for p, g in zip(own[t], torch.autograd.grad(values[t], own[t], retain_graph=True)):
            p.grad = g
    backward([values[t] for t in TASKS], inputs=shared)
    jac_to_grad(shared, AGGREGATORS[name]())
    assert_same(grads(ours), grads(ref))


def test_params_level_with_an_all_share_trunk_is_mtl_backward():
    x, y = data()
    ours = model()
    trunk = [ours.conv.weight, ours.conv.bias, ours.bn.weight, ours.bn.bias]
    z = ours.trunk(x)
    outs = {t: ours.heads[t](z) for t in TASKS}  # no a/b layer: the trunk is all that is shared
    create("torchjd", TASKS, aggregator="UPGrad", level="params").backward(
        losses_of(outs, y), StepContext(params=trunk + [p for h in ours.heads.values() for p in h.parameters()]))
    ref = model()
    z = ref.trunk(x)
    values = losses_of({t: ref.heads[t](z) for t in TASKS}, y)
    mtl_backward([values[t] for t in TASKS], features=z)
    jac_to_grad([ref.conv.weight, ref.conv.bias, ref.bn.weight, ref.bn.bias], UPGrad())
    assert_same(grads(ours), grads(ref))


def test_combine_and_options():
    J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    sched = create("torchjd", ["x", "y"], aggregator="UPGrad")
    torch.testing.assert_close(sched.combine(J), UPGrad()(J))
    weighted = create("torchjd", ["x", "y"], aggregator="UPGrad", pref_vector=[1.0, 3.0])
    assert not torch.allclose(weighted.combine(J), sched.combine(J))
    assert create("torchjd", TASKS, aggregator="NashMTL").aggregator.n_tasks == 3  # filled in
    wrapped = create("torchjd", ["x", "y"], aggregator="UPGradWeighting")  # a weighting is wrapped
    torch.testing.assert_close(wrapped.combine(J), UPGrad()(J))


def test_bad_configs_are_clear_errors(monkeypatch):
    with pytest.raises(AutomtlError, match="unknown aggregator 'UPGradd'; use one of .*UPGrad"):
        create("torchjd", TASKS, aggregator="UPGradd")
    with pytest.raises(AutomtlError, match=r"aggregator CAGrad takes options \['c', 'norm_eps'\], got \['cc'\]"):
        create("torchjd", TASKS, aggregator="CAGrad", cc=0.4)
    with pytest.raises(AutomtlError, match="two independent batches"):
        create("torchjd", TASKS, aggregator="MoDoWeighting")
    with pytest.raises(AutomtlError, match="level 'feature'"):
        create("torchjd", TASKS, level="feature")
    with pytest.raises(AutomtlError, match="needs the tensor all tasks share"):
        net = model()
        x, y = data()
        create("torchjd", TASKS, level="features").backward(losses_of(net.heads_from(net.trunk(x)), y),
                                                            StepContext(params=list(net.parameters())))
    assert {"UPGrad", "MGDA", "PCGrad", "CAGrad", "NashMTL", "DualProj", "GradDrop", "IMTLG",
            "AlignedMTL"} <= set(aggregator_names())
    real_import = builtins.__import__

    def no_torchjd(name, *args, **kwargs):
        if name.startswith("torchjd"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    import sys
    for key in [k for k in sys.modules if k.startswith("torchjd")]:
        monkeypatch.delitem(sys.modules, key)
    monkeypatch.setattr(builtins, "__import__", no_torchjd)
    with pytest.raises(AutomtlError, match=r"pip install 'automtl-compiler\[torchjd\]'"):
        create("torchjd", TASKS)


def test_losses_without_gradients_are_left_out():
    x, y = data()
    net = model()
    z = net.trunk(x)
    values = losses_of(net.heads_from(z), y)
    values["c"] = values["c"].detach()
    ref = copy.deepcopy(net)
    create("torchjd", TASKS, aggregator="UPGrad", level="features").backward(
        values, StepContext(params=list(net.parameters()), feature=z))
    zr = ref.trunk(x)
    two = create("torchjd", ["a", "b"], aggregator="UPGrad", level="features")
    out = losses_of(ref.heads_from(zr), y)
    two.backward({"a": out["a"], "b": out["b"]}, StepContext(params=list(ref.parameters()), feature=zr))
    assert_same(grads(net), grads(ref))
