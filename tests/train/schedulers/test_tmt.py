"""TMT: controllers, the network update, the second-order meta gradient, limited labels, errors, resume."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from automtl_compiler import build_supermodel
from automtl_compiler.errors import AutomtlError
from automtl_compiler.nn.policy import Policy
from automtl_compiler.nn.supermodel import SuperModel
from automtl_compiler.train.schedulers.base import SpanContext
from automtl_compiler.train.schedulers.tmt import (
    TMT,
    Controller,
    call_with,
    trunk_parameters,
)

TASKS = ["p", "a", "b"]
TARGET = "p"
TRUNK = {"backbone.conv1.weight", "backbone.conv1.bias", "backbone.bn1.weight", "backbone.bn1.bias"}


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))


def make_model(dtype: torch.dtype = torch.float64) -> SuperModel:
    """Tasks p, a, b; p takes its own conv2, so the common trunk ends at the ReLU (4 channels)."""
    torch.manual_seed(0)
    heads = {t: nn.Conv2d(6, 2, 1) for t in TASKS}
    sm = build_supermodel(Tiny(), heads, input_shape=(2, 3, 6, 6))
    sm.set_policy(Policy({t: {u: "specific" if (t == TARGET and u == "conv2") else "share"
                              for u in sm.unit_names} for t in TASKS}))
    return sm.to(dtype).train()


def make_batch(seed: int, dtype: torch.dtype, tasks: list[str] = TASKS) -> tuple[torch.Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 6, 6, generator=g, dtype=dtype)
    return x, {t: torch.randn(4, 2, 6, 6, generator=g, dtype=dtype) for t in tasks}


def mse(outputs: dict, targets: dict) -> dict:
    return {t: F.mse_loss(o, targets[t]) for t, o in outputs.items()}


def make_ctx(model: SuperModel, opt: torch.optim.Optimizer, start: int, steps: int, **kw) -> SpanContext:
    dtype = next(model.parameters()).dtype
    kw.setdefault("batch", lambda step: make_batch(step, dtype))
    kw.setdefault("task_batch", lambda task, step: make_batch(1000 + step, dtype))
    return SpanContext(model=model, optimizer=opt, params=model.network_parameters(),
                       forward=lambda x, tasks=None, feature=False: model.forward_all(x, mode="fixed", tasks=tasks,
                                                                                     feature=feature),
                       loss=mse, start=start, steps=steps, **kw)


def prepared(model: SuperModel, **options) -> TMT:
    sched = TMT(TASKS, TARGET, **options)
    sched.prepare(model.network_parameters(), (4, 4, 6, 6))
    return sched


def tensors(*modules: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v.detach().clone() for i, m in enumerate(modules) for k, v in m.state_dict().items()}


@pytest.mark.parametrize("kind", ["diag", "full", "rank"])
def test_controller_maps_per_position_and_inits_near_identity(kind):
    c, rank, noise = 128, 3, 0.02
    ctl = Controller(kind, c, rank=rank, noise=noise, generator=torch.Generator().manual_seed(0))
    shapes = {"diag": {"d": (c,)}, "full": {"m": (c, c)}, "rank": {"d": (c,), "u": (c, rank)}}[kind]
    assert {n: tuple(p.shape) for n, p in ctl.named_parameters()} == shapes
    eye = torch.eye(c)
    with torch.no_grad():
        if kind == "full":
            m = ctl.m.clone()
            perturbation = [ctl.m - eye]
        else:
            m = torch.diag(ctl.d)
            perturbation = [ctl.d - 1]
        if kind == "rank":
            m = m + ctl.u @ ctl.u.t()
            perturbation.append(ctl.u)
        for dev in perturbation:
            assert 0.7 * noise < float(dev.std()) < 1.3 * noise and float(dev.mean().abs()) < noise
        g = torch.randn(2, c, 3, 5)
        got = ctl(g)
    assert got.shape == g.shape
    torch.testing.assert_close(got, torch.einsum("dc,bchw->bdhw", m, g))
    with pytest.raises(AutomtlError, match="128"):
        ctl(torch.randn(2, c + 1, 3))


def test_functional_call_substitutes_weights_in_the_generated_forward():
    sm = make_model().eval()
    forward = lambda x, tasks=None, feature=False: sm.forward_all(x, mode="fixed", tasks=tasks, feature=feature)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    before = tensors(sm)
    names = ["backbone.conv1.weight", "specific.conv2.p.conv.weight", "heads.p.weight"]
    params = dict(sm.named_parameters())
    deltas = {n: (torch.randn_like(params[n]) * 0.1).requires_grad_() for n in names}
    outs, z = call_with(sm, {n: params[n] + deltas[n] for n in names}, forward, x, feature=True)
    ref = copy.deepcopy(sm)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n in deltas:
                p.add_(deltas[n])
    want = ref.forward_all(x, mode="fixed", tasks=["p"])["p"]
    torch.testing.assert_close(outs["p"], want)
    assert z.shape == (2, 4, 6, 6)  # the common trunk ends before p's own conv2
    assert not torch.allclose(outs["p"], forward(x, tasks=["p"])["p"])
    grads = torch.autograd.grad(outs["p"].square().sum(), list(deltas.values()))
    want.square().sum().backward()
    ref_params = dict(ref.named_parameters())
    for n, g in zip(names, grads):
        torch.testing.assert_close(g, ref_params[n].grad)
    for k, v in tensors(sm).items():
        assert torch.equal(v, before[k]), k


def test_identity_controller_is_plain_training_on_the_sum_of_losses():
    model = make_model()
    ref = copy.deepcopy(model)
    sched = prepared(model, controller="diag", controller_lr=0.0, controller_weight_decay=0.0,
                     target_update="every_step")
    with torch.no_grad():
        for ctl in sched.controllers.values():
            ctl.d.fill_(1.0)
    opt = torch.optim.SGD(model.network_parameters(), lr=0.1, momentum=0.9)
    info = sched.run_span(make_ctx(model, opt, 0, 2))  # step 0 includes a meta update (update_freq 1)
    assert set(info) == {*TASKS, "tmt_lookahead"}
    ref_opt = torch.optim.SGD(ref.network_parameters(), lr=0.1, momentum=0.9)
    for step in range(2):
        x, y = make_batch(step, torch.float64)
        ref_opt.zero_grad(set_to_none=True)
        sum(mse(ref.forward_all(x, mode="fixed"), y).values()).backward()
        ref_opt.step()
    got, want = tensors(model), tensors(ref)
    assert any(not torch.equal(v, tensors(make_model())[k]) for k, v in got.items())
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12, msg=k)
    assert all(torch.equal(c.d, torch.ones(4, dtype=torch.float64)) for c in sched.controllers.values())


def lookahead_objective(model: SuperModel, sched: TMT, lr: float):
    """φ -> L_P at Θ⁺ = Θ - lr ∂<z, Σ_A P_A(g_A)>/∂Θ from ``model``'s state, by plain autograd on a copy."""
    work, state = copy.deepcopy(model), copy.deepcopy(model.state_dict())
    x, y = make_batch(0, torch.float64)
    xp, yp = make_batch(1000, torch.float64)

    def objective() -> torch.Tensor:
        work.load_state_dict(state)
        outs, z = work.forward_all(x, mode="fixed", feature=True)
        losses = mse(outs, y)
        trunk = trunk_parameters(z, list(work.parameters()))
        names = {id(p): n for n, p in work.named_parameters()}
        assert {names[id(p)] for p in trunk} == TRUNK
        steer = sum(sched.controllers[t](torch.autograd.grad(losses[t], z, retain_graph=True)[0])
                    for t in ("a", "b"))
        vjp = torch.autograd.grad(z, trunk, grad_outputs=steer)
        with torch.no_grad():
            for p, g in zip(trunk, vjp):
                p.sub_(lr * g)
            return mse(work.forward_all(xp, mode="fixed", tasks=[TARGET]), yp)[TARGET]

    return objective


@pytest.mark.parametrize("kind", ["diag", "full", "rank"])
def test_controller_gradient_matches_finite_differences_of_the_lookahead(kind):
    model = make_model()
    sched = prepared(model, controller=kind, rank=2, noise=0.3, controller_lr=0.0, controller_weight_decay=0.0,
                     target_update="every_step")
    start = copy.deepcopy(model)
    opt = torch.optim.SGD(model.network_parameters(), lr=0.5)
    sched.run_span(make_ctx(model, opt, 0, 1))
    objective, eps = lookahead_objective(start, sched, 0.5), 1e-6
    phi = list(sched.controllers.parameters())
    keep = [p.detach().clone() for p in phi]
    gen = torch.Generator().manual_seed(0)
    # random directions on each controller tensor alone (two each) and on all of them at once
    directions = [[torch.randn(q.shape, generator=gen, dtype=q.dtype) * (j == i) for j, q in enumerate(phi)]
                  for i in range(len(phi)) for _ in range(2)]
    directions.append([torch.randn(q.shape, generator=gen, dtype=q.dtype) for q in phi])
    for direction in directions:
        values = []
        for sign in (1, -1):
            with torch.no_grad():
                for p, k, d in zip(phi, keep, direction):
                    p.copy_(k + sign * eps * d)
            values.append(objective())
        with torch.no_grad():
            for p, k in zip(phi, keep):
                p.copy_(k)
        fd = (values[0] - values[1]) / (2 * eps)
        analytic = sum((p.grad * d).sum() for p, d in zip(phi, direction))
        assert abs(float(fd)) > 1e-5
        torch.testing.assert_close(analytic, fd, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("update,fraction,expected", [("every_step", 0.5, [0, 1, 2]), ("every_step", 1.0, [0, 2]),
                                                      ("lookahead", 0.5, [0, 2]), ("lookahead", 1.0, [0, 2])])
def test_target_labels_come_only_from_batch_for_when_labels_are_limited(update, fraction, expected):
    model = make_model()
    sched = prepared(model, label_fraction=fraction, update_freq=2, target_update=update)
    assert sched.label_fraction == fraction
    calls = []

    def task_batch(task, step):
        calls.append((task, step))
        return make_batch(1000 + step, torch.float64)

    aux_only = lambda step: make_batch(step, torch.float64, ["a", "b"] if fraction < 1 else TASKS)
    before = tensors(model.heads[TARGET])
    opt = torch.optim.SGD(model.network_parameters(), lr=0.1)
    info = sched.run_span(make_ctx(model, opt, 0, 3, batch=aux_only, task_batch=task_batch))
    assert calls == [(TARGET, s) for s in expected]
    assert set(info) == {*TASKS, "tmt_lookahead"} and all(math.isfinite(v) for v in info.values())
    assert not torch.equal(tensors(model.heads[TARGET])["0.weight"], before["0.weight"])


def test_clear_errors():
    with pytest.raises(AutomtlError, match="target 'x' is not one of the tasks"):
        TMT(TASKS, "x")
    with pytest.raises(AutomtlError, match="auxiliary"):
        TMT(["p"], "p")
    with pytest.raises(AutomtlError, match="controller 'lowrank'"):
        TMT(TASKS, "p", controller="lowrank")
    with pytest.raises(AutomtlError, match="label_fraction"):
        TMT(TASKS, "p", label_fraction=0)
    with pytest.raises(AutomtlError, match="target_update must be one of lookahead, every_step"):
        TMT(TASKS, "p", target_update="always")
    sched = TMT(TASKS, "p")
    model = make_model()
    with pytest.raises(RuntimeError, match="prepare"):
        sched.run_span(make_ctx(model, torch.optim.SGD(model.network_parameters(), lr=0.1), 0, 1))
    with pytest.raises(AutomtlError, match="trunk all tasks share"):
        sched.prepare(model.network_parameters(), None)
    sched.prepare(model.network_parameters(), (4, 4, 6, 6))
    ctx = make_ctx(model, torch.optim.SGD(model.network_parameters(), lr=0.1), 0, 1)
    ctx.forward = lambda x, tasks=None, feature=False: (model.forward_all(x, mode="fixed", tasks=tasks), None)
    with pytest.raises(AutomtlError, match="trunk all tasks share"):
        sched.run_span(ctx)


def test_resumed_spans_repeat_an_uninterrupted_run_exactly():
    def fresh(state=None):
        model = make_model(torch.float32)
        opt = torch.optim.Adam(model.network_parameters(), lr=1e-2)
        sched = prepared(model, update_freq=2, noise=0.1)
        if state is not None:
            model.load_state_dict(state[0])
            opt.load_state_dict(state[1])
            sched.load_state_dict(state[2])
            sched.optimizers()["tmt_controller"].load_state_dict(state[3])
        return model, opt, sched

    model, opt, sched = fresh()
    initial = tensors(model, sched)
    sched.run_span(make_ctx(model, opt, 0, 6))
    whole = tensors(model, sched)
    model, opt, sched = fresh()
    sched.run_span(make_ctx(model, opt, 0, 3))
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict(),
                           sched.optimizers()["tmt_controller"].state_dict()))
    del model, opt, sched  # the run is killed; a new process rebuilds everything from the checkpoint
    model, opt, sched = fresh(saved)
    sched.run_span(make_ctx(model, opt, 3, 3))
    resumed = tensors(model, sched)
    for prefix in ("0.", "1."):  # the model and the controllers both moved
        assert any(not torch.equal(v, initial[k]) for k, v in whole.items() if k.startswith(prefix))
    for k, v in whole.items():
        assert torch.equal(v, resumed[k]), k
