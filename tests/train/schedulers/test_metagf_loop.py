"""Meta-GF's default span against a plain re-implementation of the authors' training loop.

The oracle below is written from the algorithm's description (SYVAE/MetaGF, multi-task version), on plain
tensors with a hand-written functional forward - no nn.Module, no functional_call, none of the
scheduler's code: per span, one phase per task from θ0 on L_t + a·Σ others, restoring only the parameters
between phases (optimiser moments and batch-norm buffers carry on); then a meta phase over a full pass of
the training data that fuses θ0 + Σ σ(w)Δ / (Σ σ(w) + 1e-10) per channel, runs the fused network in
training mode (its running statistics are the model's), steps w (Adam) on Σ L_t and leaves the model at
the last fused weights; 2-D weights keep w = 0; w restarts from its EMA every span.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from automtl_compiler.train.schedulers.base import SpanContext
from automtl_compiler.train.schedulers.metagf import MetaGF

TASKS = ["a", "b"]
K, EPOCH, SPANS = 3, 4, 2
AUX, META_LR, EMA = 0.1, 0.1, 0.9
OPTIMISERS = {"adam": lambda params: torch.optim.Adam(params, lr=0.05),
              "sgd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9)}


class Net(nn.Module):
    """conv + batch norm + Linear trunk, one Linear head per task."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 6)
        self.heads = nn.ModuleDict({t: nn.Linear(6, 1) for t in TASKS})

    def forward_all(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = F.relu(self.bn(self.conv(x))).mean((2, 3))
        h = F.relu(self.fc(h))
        return {t: self.heads[t](h).squeeze(1) for t in TASKS}


def net() -> Net:
    torch.manual_seed(0)
    model = Net().double().train()
    with torch.no_grad():
        model.bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
        model.bn.running_var.copy_(torch.tensor([1.5, 0.7, 1.1, 0.9]))
    return model


def batch(step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(8, 3, 5, 5, generator=g, dtype=torch.float64)
    s = x.mean((1, 2, 3)) * 4
    return x, {"a": s, "b": -s + 0.5}


def mse(outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {t: F.mse_loss(o, targets[t]) for t, o in outputs.items()}


# ------------------------------------------------------------------ the oracle
def functional(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Net's forward in training mode on explicit tensors; updates the running statistics in ``b``."""
    h = F.conv2d(x, p["conv.weight"], p["conv.bias"], padding=1)
    h = F.batch_norm(h, b["bn.running_mean"], b["bn.running_var"], p["bn.weight"], p["bn.bias"], training=True,
                     momentum=0.1, eps=1e-5)
    b["bn.num_batches_tracked"] += 1
    h = F.relu(F.linear(F.relu(h).mean((2, 3)), p["fc.weight"], p["fc.bias"]))
    return {t: F.linear(h, p[f"heads.{t}.weight"], p[f"heads.{t}.bias"]).squeeze(1) for t in TASKS}


def reaches(task: str, name: str) -> bool:
    return not name.startswith("heads.") or name.startswith(f"heads.{task}.")


def weight_shape(value: torch.Tensor) -> tuple[int, ...]:
    return tuple(value.shape[:2]) + (1,) * (value.dim() - 2) if value.dim() >= 2 else tuple(value.shape)


def reference_loop(model: Net, make_opt) -> tuple[dict, dict, dict, dict]:
    """The authors' Meta-GF loop for SPANS spans of K steps: (parameters, buffers, w, EMA of w)."""
    p = {n: v.detach().clone().requires_grad_() for n, v in model.named_parameters()}
    b = {n: v.detach().clone() for n, v in model.named_buffers()}
    opt = make_opt(list(p.values()))
    w = {t: {n: torch.zeros(weight_shape(v), dtype=v.dtype, requires_grad=v.dim() != 2) for n, v in p.items()
             if reaches(t, n)} for t in TASKS}
    ema = {t: {n: torch.zeros_like(v) for n, v in w[t].items()} for t in TASKS}
    meta_opt = torch.optim.Adam([v for t in TASKS for v in w[t].values() if v.requires_grad], lr=META_LR)
    for span in range(SPANS):
        start = span * K
        theta0 = {n: v.detach().clone() for n, v in p.items()}
        delta = {}
        for task in TASKS:
            for i in range(K):
                x, y = batch(start + i)
                losses = mse(functional(p, b, x), y)
                total = losses[task] + AUX * sum(v for t, v in losses.items() if t != task)
                opt.zero_grad()
                total.backward()
                opt.step()
            delta[task] = {n: p[n].detach() - theta0[n] for n in w[task]}
            with torch.no_grad():  # only the parameters go back
                for n, v in p.items():
                    v.copy_(theta0[n])
        with torch.no_grad():
            for t in TASKS:
                for n, v in w[t].items():
                    v.copy_(ema[t][n])
        last = None
        for j in range(EPOCH):
            x, y = batch(start + j)
            fused = {}
            for n in p:
                gates = {t: torch.sigmoid(w[t][n]) for t in TASKS if n in w[t]}
                norm = sum(gates.values()) + 1e-10
                fused[n] = theta0[n] + sum(g / norm * delta[t][n] for t, g in gates.items())
            total = sum(mse(functional(fused, b, x), y).values())
            meta_opt.zero_grad()
            total.backward()
            meta_opt.step()
            last = {n: v.detach() for n, v in fused.items()}
        with torch.no_grad():
            for n, v in p.items():
                v.copy_(last[n])
            for t in TASKS:
                for n, v in w[t].items():
                    ema[t][n].mul_(EMA).add_(v.detach(), alpha=1 - EMA)
    return ({n: v.detach() for n, v in p.items()}, b, {t: {n: v.detach() for n, v in w[t].items()} for t in TASKS},
            ema)


# ------------------------------------------------------------------ the scheduler
def run_scheduler(model: Net, make_opt, **options) -> MetaGF:
    opt = make_opt(list(model.parameters()))
    sched = MetaGF(TASKS, span=K, aux_weight=AUX, meta_lr=META_LR, ema=EMA, **options)
    sched.prepare(list(model.parameters()), None)
    for span in range(SPANS):
        sched.run_span(SpanContext(model=model, optimizer=opt, params=list(model.parameters()),
                                   forward=lambda x, tasks=None, feature=False: model.forward_all(x), batch=batch,
                                   loss=mse, start=span * K, steps=K, epoch=EPOCH))
    return sched


def flat(tensors) -> torch.Tensor:
    return torch.cat([v.detach().double().reshape(-1) for v in tensors])


def relative(got, want, start) -> float:
    """‖got − want‖ over ‖want − start‖: the error relative to the total movement."""
    return float((flat(got) - flat(want)).norm() / (flat(want) - flat(start)).norm())


@pytest.mark.parametrize("kind", list(OPTIMISERS))
def test_default_span_is_the_authors_loop(kind):
    start = net()
    p_ref, b_ref, w_ref, ema_ref = reference_loop(copy.deepcopy(start), OPTIMISERS[kind])
    model = copy.deepcopy(start)
    sched = run_scheduler(model, OPTIMISERS[kind])
    names = [n for n, _ in model.named_parameters()]
    assert relative([v for _, v in model.named_parameters()], [p_ref[n] for n in names],
                    [v for _, v in start.named_parameters()]) < 1e-6
    floats = [n for n, v in model.named_buffers() if v.is_floating_point()]
    assert relative([model.get_buffer(n) for n in floats], [b_ref[n] for n in floats],
                    [start.get_buffer(n) for n in floats]) < 1e-6
    assert int(model.bn.num_batches_tracked) == int(b_ref["bn.num_batches_tracked"]) == SPANS * (2 * K + EPOCH)
    for ti, t in enumerate(TASKS):
        mine = [sched.weights[ti][i].detach() for i, n in enumerate(names) if n in w_ref[t]]
        zero = [torch.zeros_like(v) for v in mine]
        assert relative(mine, [w_ref[t][n] for n in w_ref[t]], zero) < 1e-6
        assert relative([sched.ema_weights[ti][i] for i, n in enumerate(names) if n in ema_ref[t]],
                        [ema_ref[t][n] for n in ema_ref[t]], zero) < 1e-6
        assert all(not sched.weights[ti][i].detach().any() for i, n in enumerate(names) if n.endswith("fc.weight"))


VARIANTS = {"phase_state": "reset", "bn_stats": "phases", "learn_linear": True, "meta_batches": 2}


@pytest.mark.parametrize("option", list(VARIANTS))
def test_each_variant_changes_the_result(option):
    start = net()
    default, variant = copy.deepcopy(start), copy.deepcopy(start)
    run_scheduler(default, OPTIMISERS["adam"])
    run_scheduler(variant, OPTIMISERS["adam"], **{option: VARIANTS[option]})
    params = relative([v for _, v in variant.named_parameters()], [v for _, v in default.named_parameters()],
                      [v for _, v in start.named_parameters()])
    floats = [n for n, v in start.named_buffers() if v.is_floating_point()]
    buffers = relative([variant.get_buffer(n) for n in floats], [default.get_buffer(n) for n in floats],
                       [start.get_buffer(n) for n in floats])
    if option == "bn_stats":  # training-mode batch norm: only the running statistics differ
        assert params == 0 and buffers > 1e-2
    else:
        assert params > 1e-3, params
