"""Meta-GF: task phases from θ0, fusion formula, meta phase, flat memory, functional call, determinism."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from automtl_compiler import build_supermodel
from automtl_compiler.errors import AutomtlError
from automtl_compiler.nn.heads import ClassificationHead
from automtl_compiler.train.schedulers.base import SpanContext
from automtl_compiler.train.schedulers.metagf import MetaGF, meta_shape
from tests.helpers import Tiny, randomise_bn

TASKS = ["a", "b"]
LR = 0.05


class Toy(nn.Module):
    """A conv + batch norm + linear trunk shared by two linear heads, and one parameter nothing uses."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 6)
        self.heads = nn.ModuleDict({t: nn.Linear(6, 1) for t in TASKS})
        self.unused = nn.Parameter(torch.ones(2))

    def forward_all(self, x: torch.Tensor, tasks=None) -> dict[str, torch.Tensor]:
        h = F.relu(self.bn(self.conv(x))).mean((2, 3))
        h = F.dropout(F.relu(self.fc(h)), 0.2, self.training)
        return {t: self.heads[t](h).squeeze(1) for t in (tasks or TASKS)}


def toy() -> Toy:
    torch.manual_seed(0)
    return randomise_bn(Toy()).train()


def batch(step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Deterministic batches whose two targets pull the shared weights apart."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(8, 3, 5, 5, generator=g)
    s = x.mean((1, 2, 3)) * 4
    return x, {"a": s, "b": -s + 0.5}


def mse(outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {t: F.mse_loss(o, targets[t]) for t, o in outputs.items()}


def seed(step: int) -> None:
    torch.manual_seed(1000 + step)


def make_ctx(model: nn.Module, opt: torch.optim.Optimizer, start: int = 0, steps: int = 3,
             forward=None, loss=mse) -> SpanContext:
    forward = forward or (lambda x, tasks=None, feature=False: model.forward_all(x, tasks))
    return SpanContext(model=model, optimizer=opt, params=list(model.parameters()), forward=forward, batch=batch,
                       loss=loss, start=start, steps=steps, seed=seed)


def reference_phases(model: nn.Module, start: int, steps: int, aux: float = 0.1):
    """Each task's phase run by hand on a fresh copy with a fresh Adam: (displacements, buffers, states)."""
    theta0 = dict(model.named_parameters())
    deltas, buffers, states = {}, {}, {}
    for task in TASKS:
        m = copy.deepcopy(model)
        opt = torch.optim.Adam(m.parameters(), lr=LR)
        for i in range(steps):
            x, targets = batch(start + i)
            seed(start + i)
            losses = mse(m.forward_all(x), targets)
            total = losses[task] + aux * sum(v for t, v in losses.items() if t != task)
            opt.zero_grad()
            total.backward()
            opt.step()
        deltas[task] = {n: p.detach() - theta0[n].detach() for n, p in m.named_parameters()}
        buffers[task] = {n: b.clone() for n, b in m.named_buffers()}
        states[task] = {n: opt.state[p] for n, p in m.named_parameters() if p in opt.state}
    return deltas, buffers, states


# which tasks reach each parameter of the toy model
REACH = {"heads.a": ["a"], "heads.b": ["b"], "unused": []}


def reaching(name: str) -> list[str]:
    for prefix, tasks in REACH.items():
        if name.startswith(prefix):
            return tasks
    return TASKS


def test_first_fusion_is_mean_of_displacements():
    model = toy()
    start = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    sched = MetaGF(TASKS, span=3, meta_batches=0, phase_state="reset")
    sched.prepare(list(model.parameters()), None)
    logs = sched.run_span(make_ctx(model, opt))
    deltas, buffers, states = reference_phases(start, 0, 3)
    names = [n for n, _ in model.named_parameters()]
    assert sched.reach.tolist() == [[t in reaching(n) for n in names] for t in TASKS]
    moved = 0
    for n, p in model.named_parameters():
        tasks = reaching(n)
        want = start.get_parameter(n) + (sum(deltas[t][n] for t in tasks) / len(tasks) if tasks else 0)
        torch.testing.assert_close(p, want, rtol=1e-5, atol=1e-6)
        moved += int(bool(tasks) and not torch.equal(p, start.get_parameter(n)))
    assert moved == len(names) - 1
    # shared weights: a real average of two different displacements
    assert not torch.allclose(deltas["a"]["fc.weight"], deltas["b"]["fc.weight"])
    for n, b in model.named_buffers():
        if b.is_floating_point():
            torch.testing.assert_close(b, (buffers["a"][n] + buffers["b"][n]) / 2)
        else:
            assert int(b) == int(buffers["a"][n]) == int(start.get_buffer(n)) + 3
    # the stage optimiser ends with the mean of the phases' moments and their step count
    for n, p in model.named_parameters():
        if n == "unused":
            assert p not in opt.state
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][key], (states["a"][n][key] + states["b"][n][key]) / 2)
        assert float(opt.state[p]["step"]) == 3
    assert set(logs) == set(TASKS) and all(v > 0 for v in logs.values())


def test_fusion_follows_formula_with_nonzero_weights():
    model = toy()
    start = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    sched = MetaGF(TASKS, span=2, meta_batches=0, phase_state="reset")
    params = list(model.parameters())
    sched.prepare(params, None)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for ema_task in sched.ema_weights:
            for i in range(len(ema_task)):
                ema_task[i].copy_(torch.randn(ema_task[i].shape, generator=gen) * 2)
    w = {t: [ema_task[i].clone() for i in range(len(ema_task))] for t, ema_task in zip(TASKS, sched.ema_weights)}
    sched.run_span(make_ctx(model, opt, start=4, steps=2))
    deltas, _, _ = reference_phases(start, 4, 2)
    index = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    assert tuple(sched.weights[0][index["conv.weight"]].shape) == (4, 3, 1, 1) == meta_shape(model.conv.weight.shape)
    assert tuple(sched.weights[0][index["bn.weight"]].shape) == (4,)  # one per channel
    assert tuple(sched.weights[0][index["fc.weight"]].shape) == (6, 4)
    for i, (n, p) in enumerate(model.named_parameters()):
        tasks = reaching(n)
        if not tasks:
            torch.testing.assert_close(p, start.get_parameter(n), rtol=0, atol=0)
            continue
        s = {t: torch.sigmoid(w[t][i]) for t in tasks}
        want = start.get_parameter(n) + sum(s[t] * deltas[t][n] for t in tasks) / (sum(s.values()) + 1e-10)
        torch.testing.assert_close(p, want, rtol=1e-5, atol=1e-6)
        plain = start.get_parameter(n) + sum(deltas[t][n] for t in tasks) / len(tasks)
        if len(tasks) > 1:
            assert not torch.allclose(p, plain, rtol=1e-4, atol=1e-6), n
    # w started from the EMA and, with no meta batches, stayed there; the EMA is a fixed point
    for t, w_task, ema_task in zip(TASKS, sched.weights, sched.ema_weights):
        for i, value in enumerate(w_task):
            torch.testing.assert_close(value.detach(), w[t][i])
            torch.testing.assert_close(ema_task[i], w[t][i])


def total_loss(model: nn.Module, steps: list[int]) -> float:
    m = copy.deepcopy(model)
    with torch.no_grad():
        total = 0.0
        for k in steps:
            x, targets = batch(k)
            seed(k)
            total += float(sum(mse(m.forward_all(x), targets).values()))
    return total


def test_meta_phase_trains_weights_and_lowers_total_loss():
    model = toy()
    plain = copy.deepcopy(model)
    meta = MetaGF(TASKS, span=4, meta_lr=0.5, meta_batches=8, ema=0.9, learn_linear=True)
    base = MetaGF(TASKS, span=4, meta_batches=0)
    for m, s in ((model, meta), (plain, base)):
        s.prepare(list(m.parameters()), None)
        s.run_span(make_ctx(m, torch.optim.Adam(m.parameters(), lr=LR), steps=4))
    adam = meta.optimizers()["metagf"]
    shared = [n for n, _ in model.named_parameters()].index("fc.weight")
    for ti in range(len(TASKS)):
        w = meta.weights[ti][shared]
        assert w.grad is None  # freed after the meta phase
        assert adam.state[w]["exp_avg"].abs().max() > 0, "w got no gradient"
        assert w.detach().abs().max() > 1e-3, "w did not move from 0"
        torch.testing.assert_close(meta.ema_weights[ti][shared], 0.1 * w.detach())
    assert total_loss(model, [0, 1, 2, 3]) < total_loss(plain, [0, 1, 2, 3])


def live_bytes_at_marks(meta_batches: int) -> list[int]:
    """Bytes allocated (net, since the profiler started) when each meta batch computes its losses."""
    model = toy()
    sched = MetaGF(TASKS, span=2, meta_batches=meta_batches)
    sched.prepare(list(model.parameters()), None)
    calls = []

    def loss(outputs, targets):
        calls.append(1)
        if len(calls) > 1 + 2 * len(TASKS):  # the reach probe and the task phases come first
            with record_function(f"meta_{len(calls)}"):
                pass
        return mse(outputs, targets)

    ctx = make_ctx(model, torch.optim.Adam(model.parameters(), lr=LR), steps=2, loss=loss)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        sched.run_span(ctx)
    events = prof.events()
    marks = sorted(e.time_range.start for e in events if e.name.startswith("meta_"))
    memory = [(e.time_range.start, e.self_cpu_memory_usage) for e in events if e.self_cpu_memory_usage]
    return [sum(m for t, m in memory if t < mark) for mark in marks]


def test_memory_does_not_grow_with_meta_batches():
    live = live_bytes_at_marks(6)
    assert len(live) == 6
    # each meta batch frees its graph and keeps no tensor: from the second batch on (the first creates the
    # meta optimiser's moments) the live bytes are exactly the same at every batch
    assert live[0] > 0 and len(set(live[1:])) == 1, live


def test_each_phase_starts_from_theta0():
    model = toy()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    x, targets = batch(99)  # a first ordinary step so that the optimiser has moments
    opt.zero_grad()
    sum(mse(model.forward_all(x), targets).values()).backward()
    opt.step()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers0 = {n: b.clone() for n, b in model.named_buffers()}
    state0 = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()
              if p in opt.state}
    seen = []

    def forward(x, tasks=None, feature=False):
        seen.append(({n: p.detach().clone() for n, p in model.named_parameters()},
                     {n: b.clone() for n, b in model.named_buffers()},
                     {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()
                      if p in opt.state}))
        return model.forward_all(x, tasks)

    sched = MetaGF(TASKS, span=3, meta_batches=0, phase_state="reset")
    sched.prepare(list(model.parameters()), None)
    sched.run_span(make_ctx(model, opt, start=10, steps=3, forward=forward))
    assert len(seen) == 1 + 3 * len(TASKS)
    firsts = [seen[1 + 3 * k] for k in range(len(TASKS))]
    for params, buffers, state in firsts:
        for n, value in theta0.items():
            assert torch.equal(params[n], value), n
        for n, value in buffers0.items():
            assert torch.equal(buffers[n], value), n
        assert state.keys() == state0.keys()
        for n, entries in state0.items():
            for k, value in entries.items():
                assert torch.equal(state[n][k], value), (n, k)
    # within a phase the weights and statistics do move
    assert not torch.equal(seen[2][0]["fc.weight"], theta0["fc.weight"])
    assert not torch.equal(seen[2][1]["bn.running_mean"], buffers0["bn.running_mean"])


@pytest.fixture(scope="module")
def supermodel():
    torch.manual_seed(0)
    heads = {t: ClassificationHead(6, 1) for t in TASKS}
    return build_supermodel(randomise_bn(Tiny(6)), heads, input_shape=(1, 3, 5, 5)).train()


def sm_ctx(sm: nn.Module, opt: torch.optim.Optimizer, steps: int, loss=mse) -> SpanContext:
    def forward(x, tasks=None, feature=False):
        return sm.forward_all(x, mode="pretrain", tasks=tasks)

    def squeeze(outputs, targets):
        return loss({t: o.squeeze(1) for t, o in outputs.items()}, targets)

    return SpanContext(model=sm, optimizer=opt, params=sm.network_parameters(), forward=forward, batch=batch,
                       loss=squeeze, start=0, steps=steps, seed=seed)


def test_functional_call_uses_fused_weights_on_supermodel(supermodel):
    sm = copy.deepcopy(supermodel)
    before = copy.deepcopy(sm)
    opt = torch.optim.Adam(sm.network_parameters(), lr=LR)
    sched = MetaGF(TASKS, span=2, meta_lr=0.0, meta_batches=1)
    sched.prepare(sm.network_parameters(), None)
    recorded = []

    def loss(outputs, targets):
        recorded.append({t: o.detach().clone() for t, o in outputs.items()})
        return mse(outputs, targets)

    sched.run_span(sm_ctx(sm, opt, steps=2, loss=loss))
    meta_outputs = recorded[-1]  # the meta batch: step 0 at θ(w), and meta_lr = 0 keeps w
    x, _ = batch(0)
    with torch.no_grad():
        seed(0)
        fused = copy.deepcopy(sm).forward_all(x, mode="pretrain")
        seed(0)
        start = copy.deepcopy(before).forward_all(x, mode="pretrain")
    for t in TASKS:
        torch.testing.assert_close(meta_outputs[t], fused[t].squeeze(1), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(meta_outputs[t], start[t].squeeze(1), rtol=1e-4, atol=1e-5)
    # each task's specific branch is reached by that task alone
    names = [n for n, p in sm.named_parameters() if any(p is q for q in sm.network_parameters())]
    reach = dict(zip(names, zip(*sched.reach.tolist())))
    specific = [n for n in names if n.startswith("specific.") and n.split(".")[2] == "a"]
    assert specific and all(reach[n] == (True, False) for n in specific)
    assert all(reach[n] == (True, True) for n in names if n.startswith("backbone."))


def run_two_spans(model: nn.Module, opt: torch.optim.Optimizer, sched: MetaGF) -> None:
    for start in (0, 3):
        sched.run_span(make_ctx(model, opt, start=start, steps=3))


def test_span_is_deterministic_and_resumes_exactly():
    model = toy()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    sched = MetaGF(TASKS, span=3, meta_lr=0.3, meta_batches=3)
    sched.prepare(list(model.parameters()), None)
    sched.run_span(make_ctx(model, opt, start=0, steps=3))  # non-trivial EMA, meta moments, reach
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    saved_sched = copy.deepcopy(sched.state_dict())
    saved_meta = copy.deepcopy(sched.optimizers()["metagf"].state_dict())
    run_two_spans(model, opt, sched)
    first = copy.deepcopy(model.state_dict())

    resumed = toy()
    resumed.load_state_dict(saved_model)
    opt2 = torch.optim.Adam(resumed.parameters(), lr=LR)
    opt2.load_state_dict(saved_opt)
    sched2 = MetaGF(TASKS, span=3, meta_lr=0.3, meta_batches=3)
    sched2.prepare(list(resumed.parameters()), None)
    sched2.load_state_dict(saved_sched)
    sched2.optimizers()["metagf"].load_state_dict(saved_meta)
    run_two_spans(resumed, opt2, sched2)
    for n, v in first.items():
        assert torch.equal(v, resumed.state_dict()[n]), n
    for a, b in zip(sched.state_dict().values(), sched2.state_dict().values()):
        assert torch.equal(a, b)
    assert not torch.equal(first["fc.weight"], saved_model["fc.weight"])


def test_bad_options_and_parameters_are_clear_errors():
    for options in ({"aux_weight": -1}, {"meta_lr": -0.1}, {"meta_batches": -1}, {"meta_batches": 1.5},
                    {"ema": 1.5}, {"phase_state": "fresh"}, {"bn_stats": "mean"}, {"learn_linear": "yes"}):
        with pytest.raises(AutomtlError):
            MetaGF(TASKS, **options)
    with pytest.raises(AutomtlError):
        MetaGF(["a", "a"])
    model = toy()
    sched = MetaGF(TASKS, span=2)
    sched.prepare(list(model.parameters())[:-1], None)
    with pytest.raises(AutomtlError, match="prepare"):
        sched.run_span(make_ctx(model, torch.optim.Adam(model.parameters(), lr=LR), steps=2))
    other = toy()
    sched.prepare(list(other.parameters()), None)
    ctx = SpanContext(model=model, optimizer=torch.optim.Adam(other.parameters(), lr=LR),
                      params=list(other.parameters()), forward=lambda x, tasks=None, feature=False: model.forward_all(x),
                      batch=batch, loss=mse, start=0, steps=2)
    with pytest.raises(AutomtlError, match="not parameters"):
        sched.run_span(ctx)
