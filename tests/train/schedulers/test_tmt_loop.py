"""TMT's default steps against a plain re-implementation of the authors' training loop.

The oracle below is written from the algorithm's description (yiren-jian/TMT, ``nyu_TMT.py``) on plain
tensors with a hand-written functional forward - none of the scheduler's code. Every step, on the step's
batch: the auxiliary heads take an SGD step on their losses and the trunk one on the controller-transformed
auxiliary gradients alone. Every ``update_freq`` steps, on a batch of the labelled set: the auxiliary
gradients at z are taken again (their heads' batch-norm statistics discarded), the look-ahead
Θ⁺ = Θ − lr·∂⟨z, Σ P_A(g_A)⟩/∂Θ is formed with its graph, the target head runs on f_{Θ⁺}(x) (a functional
trunk forward that updates the running statistics but not the counters), and L_P updates the target head
(SGD, at Θ⁺), the controllers (Adam, lr 1e-3, weight decay 1e-5) and the trunk (SGD with ∂L_P(Θ⁺)/∂Θ).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from automtl_compiler.train.schedulers.base import SpanContext
from automtl_compiler.train.schedulers.tmt import TMT

TASKS = ["p", "a", "b"]
TARGET, AUX = "p", ["a", "b"]
FREQ, STEPS, LR, RANK = 3, 6, 0.1, 2


class Net(nn.Module):
    """conv + batch norm trunk ending at z; each task a 1x1 conv + batch norm + 1x1 conv head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.heads = nn.ModuleDict({t: nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU(),
                                                     nn.Conv2d(4, 2, 1)) for t in TASKS})

    def forward_all(self, x: torch.Tensor, tasks=None, feature: bool = False):
        z = F.relu(self.bn(self.conv(x)))
        outs = {t: self.heads[t](z) for t in (tasks or TASKS)}
        return (outs, z) if feature else outs


def net() -> Net:
    torch.manual_seed(0)
    return Net().double().train()


def make_batch(seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 6, 6, generator=g, dtype=torch.float64)
    return x, {t: torch.randn(4, 2, 6, 6, generator=g, dtype=torch.float64) for t in TASKS}


def mse(outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {t: F.mse_loss(o, targets[t]) for t, o in outputs.items()}


# ------------------------------------------------------------------ the oracle
def batch_norm(h, b, prefix, weight, bias, count=True):
    out = F.batch_norm(h, b[f"{prefix}.running_mean"], b[f"{prefix}.running_var"], weight, bias, training=True,
                       momentum=0.1, eps=1e-5)
    if count:
        b[f"{prefix}.num_batches_tracked"] += 1
    return out


def trunk(p, b, x, count=True):
    return F.relu(batch_norm(F.conv2d(x, p["conv.weight"], p["conv.bias"], padding=1), b, "bn", p["bn.weight"],
                             p["bn.bias"], count))


def head(p, b, t, z):
    k = f"heads.{t}."
    h = F.conv2d(z, p[k + "0.weight"], p[k + "0.bias"])
    h = F.relu(batch_norm(h, b, k + "1", p[k + "1.weight"], p[k + "1.bias"]))
    return F.conv2d(h, p[k + "3.weight"], p[k + "3.bias"])


def controller(phi, t, g):
    """d ⊙ g + U Uᵀ g over the channels of g."""
    d, u = phi[f"{t}.d"], phi[f"{t}.u"]
    return g * d.view(1, -1, 1, 1) + torch.einsum("cr,dr,bdhw->bchw", u, u, g)


def reference_loop(model: Net, phi0: dict[str, torch.Tensor]):
    """The authors' TMT loop for STEPS steps: (parameters, buffers, controllers)."""
    p = {n: v.detach().clone().requires_grad_() for n, v in model.named_parameters()}
    b = {n: v.detach().clone() for n, v in model.named_buffers()}
    phi = {n: v.detach().clone().requires_grad_() for n, v in phi0.items()}
    phi_opt = torch.optim.Adam(list(phi.values()), lr=1e-3, weight_decay=1e-5)
    shared = ["conv.weight", "conv.bias", "bn.weight", "bn.bias"]
    own = {t: [n for n in p if n.startswith(f"heads.{t}.")] for t in TASKS}
    for step in range(STEPS):
        x, y = make_batch(step)
        z = trunk(p, b, x)
        zd = z.detach().requires_grad_()
        update, g_aux = {}, {}
        for t in AUX:
            gz, *gh = torch.autograd.grad(F.mse_loss(head(p, b, t, zd), y[t]), [zd] + [p[n] for n in own[t]])
            g_aux[t] = gz
            update.update(zip(own[t], gh))
        with torch.no_grad():
            steer = sum(controller(phi, t, g_aux[t]) for t in AUX)
        update.update(zip(shared, torch.autograd.grad(z, [p[n] for n in shared], steer)))
        with torch.no_grad():
            for n, g in update.items():
                p[n] -= LR * g
        if step % FREQ:
            continue
        xp, yp = make_batch(1000 + step)
        z = trunk(p, b, xp)
        zd = z.detach().requires_grad_()
        scratch = {n: v.clone() for n, v in b.items()}  # the auxiliary heads' statistics are discarded
        g_aux = {t: torch.autograd.grad(F.mse_loss(head(p, scratch, t, zd), yp[t]), zd)[0] for t in AUX}
        steer = sum(controller(phi, t, g_aux[t]) for t in AUX)
        grads = torch.autograd.grad(z, [p[n] for n in shared], steer, create_graph=True)
        ahead = dict(p) | {n: p[n] - LR * g for n, g in zip(shared, grads)}
        loss = F.mse_loss(head(p, b, TARGET, trunk(ahead, b, xp, count=False)), yp[TARGET])
        names = list(phi) + shared + own[TARGET]
        found = torch.autograd.grad(loss, [phi[n] for n in phi] + [p[n] for n in shared + own[TARGET]])
        for n, g in zip(names[:len(phi)], found[:len(phi)]):
            phi[n].grad = g
        phi_opt.step()
        with torch.no_grad():
            for n, g in zip(names[len(phi):], found[len(phi):]):
                p[n] -= LR * g
    return ({n: v.detach() for n, v in p.items()}, b, {n: v.detach() for n, v in phi.items()})


# ------------------------------------------------------------------ the scheduler
def run_scheduler(model: Net, **options) -> TMT:
    sched = TMT(TASKS, TARGET, span=STEPS, controller="rank", rank=RANK, update_freq=FREQ, noise=0.3, **options)
    sched.prepare(list(model.parameters()), (4, 4, 6, 6))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    sched.run_span(SpanContext(model=model, optimizer=opt, params=list(model.parameters()),
                               forward=model.forward_all, batch=make_batch,
                               task_batch=lambda task, step: make_batch(1000 + step), loss=mse, start=0,
                               steps=STEPS))
    return sched


def flat(tensors) -> torch.Tensor:
    return torch.cat([v.detach().double().reshape(-1) for v in tensors])


def relative(got, want, start) -> float:
    """‖got − want‖ over ‖want − start‖: the error relative to the total movement."""
    return float((flat(got) - flat(want)).norm() / (flat(want) - flat(start)).norm())


def controllers(sched: TMT) -> dict[str, torch.Tensor]:
    return {f"{t}.{n}": v.detach().clone() for t, c in sched.controllers.items() for n, v in c.named_parameters()}


def test_default_steps_are_the_authors_loop():
    start = net()
    model = copy.deepcopy(start)
    phi0 = _prepared_phi()
    sched = run_scheduler(model)
    p_ref, b_ref, phi_ref = reference_loop(copy.deepcopy(start), phi0)
    names = [n for n, _ in model.named_parameters()]
    assert relative([v for _, v in model.named_parameters()], [p_ref[n] for n in names],
                    [v for _, v in start.named_parameters()]) < 1e-6
    floats = [n for n, v in model.named_buffers() if v.is_floating_point()]
    moved = [n for n in floats if not torch.equal(b_ref[n], start.get_buffer(n))]
    assert relative([model.get_buffer(n) for n in moved], [b_ref[n] for n in moved],
                    [start.get_buffer(n) for n in moved]) < 1e-6
    assert all(torch.equal(model.get_buffer(n), start.get_buffer(n)) for n in floats if n not in moved)
    assert "heads.p.1.running_mean" in moved and "bn.running_mean" in moved
    for n, v in model.named_buffers():
        if not v.is_floating_point():
            assert int(v) == int(b_ref[n]), n
    # trunk: one count per step and per labelled forward; target head: one per look-ahead
    assert int(model.bn.num_batches_tracked) == STEPS + STEPS // FREQ
    assert int(model.heads.p[1].num_batches_tracked) == STEPS // FREQ
    mine = controllers(sched)
    assert relative([mine[n] for n in phi_ref], [phi_ref[n] for n in phi_ref], [phi0[n] for n in phi_ref]) < 1e-6
    # the target head moved only at the look-ahead updates; the auxiliary heads every step
    assert not torch.equal(model.heads.p[0].weight, start.heads.p[0].weight)


def _prepared_phi() -> dict[str, torch.Tensor]:
    model = net()
    sched = TMT(TASKS, TARGET, span=STEPS, controller="rank", rank=RANK, update_freq=FREQ, noise=0.3)
    sched.prepare(list(model.parameters()), (4, 4, 6, 6))
    return controllers(sched)


def test_per_step_target_gradient_changes_the_result():
    start = net()
    default, variant = copy.deepcopy(start), copy.deepcopy(start)
    run_scheduler(default)
    run_scheduler(variant, target_update="every_step")
    assert relative([v for _, v in variant.named_parameters()], [v for _, v in default.named_parameters()],
                    [v for _, v in start.named_parameters()]) > 1e-2
