"""IMTL: closed-form references for IMTL-G, the IMTL-L gradient, the hybrid, and both gradient levels."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from automtl_compiler import build_supermodel
from automtl_compiler.errors import AutomtlError
from automtl_compiler.nn.heads import ClassificationHead
from automtl_compiler.nn.policy import Policy
from automtl_compiler.train.schedulers import StepContext, create
from automtl_compiler.train.schedulers.imtl import IMTL
from tests.helpers import Tiny, randomise_bn

TASKS = ["a", "b", "c"]


def paper_alpha(J: np.ndarray) -> np.ndarray:
    """The paper's closed form α_{2:T} = g1 Uᵀ (D Uᵀ)⁻¹, α1 = 1 − Σ α_{2:T}, with the sign kept a descent one."""
    u = J / np.linalg.norm(J, axis=1, keepdims=True)
    D, U = J[0] - J[1:], u[0] - u[1:]
    rest = J[0] @ U.T @ np.linalg.inv(D @ U.T)
    alpha = np.concatenate([[1 - rest.sum()], rest])
    return alpha if (alpha @ J) @ u[0] > 0 else -alpha


def projections(alpha: torch.Tensor, J: torch.Tensor) -> torch.Tensor:
    return J @ (alpha @ J) / J.norm(dim=1)


# ------------------------------------------------------------------ IMTL-G on a matrix
def test_golden_case():
    J = torch.tensor([[-4.0, 1, 1], [6, 1, 1]], dtype=torch.float64)
    imtl = IMTL(["x", "y"], method="gradient")
    torch.testing.assert_close(imtl.weights(J), torch.tensor([0.5923, 0.4077], dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(imtl.combine(J), torch.tensor([0.0767, 1, 1], dtype=torch.float64), atol=1e-4, rtol=0)


@pytest.mark.parametrize("T", [2, 3, 5])
@pytest.mark.parametrize("seed", range(4))
def test_weights_match_closed_form_and_project_equally(T, seed):
    gen = torch.Generator().manual_seed(100 * T + seed)
    P = int(torch.randint(7, 51, (1,), generator=gen))
    J = torch.randn(T, P, generator=gen, dtype=torch.float64) * torch.exp(2 * torch.randn(T, 1, generator=gen,
                                                                                           dtype=torch.float64))
    imtl = IMTL(TASKS[:2] + [f"t{i}" for i in range(T - 2)], method="gradient")
    alpha = imtl.weights(J)
    np.testing.assert_allclose(alpha.numpy(), paper_alpha(J.numpy()), rtol=1e-8, atol=1e-8)
    assert abs(abs(float(alpha.sum())) - 1) < 1e-10
    proj = projections(alpha, J)
    assert float(proj.min()) > 0
    torch.testing.assert_close(proj, proj[0].expand(T), rtol=1e-9, atol=0)
    torch.testing.assert_close(imtl.combine(J), alpha @ J)


def test_sign_keeps_a_descent_direction_where_the_papers_normalisation_does_not():
    J = torch.tensor([[0.0, 3, -2], [-3, 3, 0], [-1, 2, -1]], dtype=torch.float64)
    G = J @ J.T
    beta = torch.linalg.solve(G, G.diagonal().sqrt())
    paper = beta / beta.sum()
    assert float(projections(paper, J).max()) < 0  # the paper's α: every task's loss would go up
    alpha = IMTL(TASKS, method="gradient").weights(J)
    torch.testing.assert_close(alpha, -paper)
    proj = projections(alpha, J)
    assert float(proj.min()) > 0
    torch.testing.assert_close(proj, proj[0].expand(3))


@pytest.mark.parametrize("parallel", [False, True])
def test_direction_is_invariant_to_positive_row_scaling(parallel):
    gen = torch.Generator().manual_seed(3)
    J = torch.randn(3, 11, generator=gen, dtype=torch.float64)
    if parallel:
        J[1] = 0.5 * J[0]
    k = torch.tensor([0.01, 7.0, 300.0], dtype=torch.float64)
    imtl = IMTL(TASKS, method="gradient")
    a, b = imtl.weights(J), imtl.weights(k[:, None] * J)
    # the coefficients on the original rows agree up to one positive factor, so the update's direction does
    torch.testing.assert_close((b * k) / (b * k).sum(), a)
    d1, d2 = imtl.combine(J), imtl.combine(k[:, None] * J)
    torch.testing.assert_close(d1 / d1.norm(), d2 / d2.norm())


def test_rank_deficient_and_zero_gradients_give_finite_weights():
    imtl = IMTL(TASKS, method="gradient")
    g = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    h = torch.tensor([0.0, 1.0, 1.0, -1.0], dtype=torch.float64)
    cases = {"parallel": torch.stack([g, 3 * g, h]), "zero row": torch.stack([g, torch.zeros(4, dtype=g.dtype), h]),
             "all zero": torch.zeros(3, 4, dtype=g.dtype), "identical": torch.stack([g, g, g])}
    for name, J in cases.items():
        alpha = imtl.weights(J)
        assert torch.isfinite(alpha).all(), name
        assert torch.isfinite(imtl.combine(J)).all(), name
        live = J.norm(dim=1) > 0
        if live.any():
            proj = J[live] @ (alpha @ J) / J[live].norm(dim=1)
            torch.testing.assert_close(proj, proj[0].expand(len(proj)), msg=name)
            assert float(proj.min()) > 0, name
    assert float(imtl.weights(cases["zero row"])[1]) == 0
    torch.testing.assert_close(imtl.weights(cases["identical"]), torch.full((3,), 1 / 3, dtype=torch.float64))
    J32 = torch.stack([g, 2 * g]).float()
    assert torch.isfinite(IMTL(["x", "y"], method="gradient").weights(J32)).all()


# ------------------------------------------------------------------ a small model with a shared layer
class Toy(nn.Module):
    """A shared layer, one head per task, and a parameter only task 'c' uses."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.shared = nn.Linear(4, 6)
        self.heads = nn.ModuleDict({t: nn.Linear(6, 1) for t in TASKS})
        self.extra = nn.Parameter(torch.randn(6))
        self.double()

    def losses(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.tanh(self.shared(x))
        out = {t: self.heads[t](h * self.extra if t == "c" else h).squeeze(-1) for t in TASKS}
        return {t: ((o - i) ** 2).mean() + 0.1 * (i + 1) for i, (t, o) in enumerate(out.items())}


def toy_input() -> torch.Tensor:
    return torch.randn(8, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def per_task_grads(losses: dict[str, torch.Tensor], params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    rows = []
    for t in TASKS:
        grads = torch.autograd.grad(losses[t], params, retain_graph=True, allow_unused=True)
        rows.append([torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)])
    return rows


def with_scales(imtl: IMTL, s: list[float]) -> torch.Tensor:
    with torch.no_grad():
        imtl.log_scale.copy_(torch.tensor(s))
    return imtl.scales().double()


def test_loss_method_scale_gradient_step_and_network_gradient():
    model, x = Toy(), toy_input()
    imtl = IMTL(TASKS, method="loss", loss_lr=0.01)
    e = with_scales(imtl, [0.3, -0.2, 0.0])
    s_before = imtl.log_scale.detach().clone()
    losses = model.losses(x)
    values = torch.stack([losses[t].detach() for t in TASKS])
    params = list(model.parameters())
    rows = per_task_grads(losses, params)
    returned = imtl.backward(losses, StepContext(params=params))
    expected_s_grad = e * values - 1
    torch.testing.assert_close(imtl.last_scale_grad.double(), expected_s_grad, rtol=1e-6, atol=1e-6)
    step = imtl.log_scale.detach() - s_before
    assert torch.all(torch.sign(step) == -torch.sign(expected_s_grad.float())), step
    torch.testing.assert_close(step.abs(), torch.full((3,), 0.01), rtol=1e-3, atol=1e-6)
    for i, p in enumerate(params):
        torch.testing.assert_close(p.grad, sum(e[t] * rows[t][i] for t in range(3)))
    torch.testing.assert_close(returned.double(), (e * values - s_before.double()).sum(), rtol=1e-6, atol=1e-6)
    assert set(imtl.optimizers()) == {"imtl_loss_scale"} and IMTL(TASKS, method="gradient").optimizers() == {}


@pytest.mark.parametrize("with_ctx", [True, False])
def test_params_level_hybrid_is_imtl_g_of_scaled_gradients(with_ctx):
    model, x = Toy(), toy_input()
    imtl = IMTL(TASKS, method="hybrid", level="params")
    e = with_scales(imtl, [0.5, -0.7, 0.2])
    losses = model.losses(x)
    params = list(model.parameters())
    rows = per_task_grads(losses, params)
    shared_idx = [i for i, p in enumerate(params) if p is model.shared.weight or p is model.shared.bias]
    J = np.stack([np.concatenate([(e[t] * rows[t][i]).reshape(-1).numpy() for i in shared_idx]) for t in range(3)])
    alpha = torch.from_numpy(paper_alpha(J))
    imtl.backward(losses, StepContext(params=params) if with_ctx else None)
    torch.testing.assert_close(imtl.last_weights, alpha, rtol=1e-8, atol=1e-10)
    for i, p in enumerate(params):
        if i in shared_idx:
            want = sum(alpha[t] * e[t] * rows[t][i] for t in range(3))
        else:  # a head or `extra`: one task reaches it
            want = sum(e[t] * rows[t][i] for t in range(3))
        torch.testing.assert_close(p.grad, want, rtol=1e-7, atol=1e-10)
    grads = torch.stack([torch.cat([rows[t][i].reshape(-1) for i in shared_idx]) for t in range(3)])
    e = imtl.scales().double()  # the step moved s; combine uses the current scales
    J = (e[:, None] * grads).numpy()
    torch.testing.assert_close(imtl.combine(grads), IMTL(TASKS, method="gradient").combine(e[:, None] * grads))
    torch.testing.assert_close(imtl.combine(grads), torch.from_numpy(paper_alpha(J) @ J))


# ------------------------------------------------------------------ a SuperModel with a common trunk
@pytest.fixture(scope="module")
def supermodel():
    torch.manual_seed(0)
    heads = {t: ClassificationHead(8, 3) for t in TASKS}
    sm = build_supermodel(randomise_bn(Tiny()), heads, input_shape=(2, 3, 8, 8)).eval().double()
    sm.set_policy(Policy({t: {u: "share" for u in sm.unit_names} for t in TASKS}))
    return sm


def sm_losses(sm, x: torch.Tensor, mode: str = "fixed", **kw) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    outs, z = sm.forward_all(x, mode=mode, feature=True, **kw)
    labels = torch.arange(x.shape[0]) % 3
    return {t: F.cross_entropy(outs[t], (labels + i) % 3) * (i + 1) for i, t in enumerate(TASKS)}, z


def sm_input() -> torch.Tensor:
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(9), dtype=torch.float64)


@pytest.mark.parametrize("method", ["gradient", "hybrid"])
def test_feature_level_trunk_gets_vjp_of_balanced_z_gradient(supermodel, method):
    sm, x = supermodel, sm_input()
    params = sm.network_parameters()
    trunk = [p for n, p in sm.named_parameters() if n.startswith("backbone.")]
    assert trunk
    imtl = IMTL(TASKS, method=method)
    e = with_scales(imtl, [0.4, -0.3, 0.1]) if method == "hybrid" else torch.ones(3, dtype=torch.float64)

    losses, z = sm_losses(sm, x)
    gz = [e[t] * torch.autograd.grad(losses[name], z, retain_graph=True)[0] for t, name in enumerate(TASKS)]
    alpha = torch.from_numpy(paper_alpha(torch.stack([g.sum(0).reshape(-1) for g in gz]).numpy()))
    want_trunk = torch.autograd.grad(z, trunk, grad_outputs=sum(a * g for a, g in zip(alpha, gz)), retain_graph=True)
    want_head = {name: torch.autograd.grad(losses[name], list(sm.heads[name].parameters()), retain_graph=True)
                 for name in TASKS}

    sm.zero_grad(set_to_none=True)
    losses, z = sm_losses(sm, x)
    imtl.backward(losses, StepContext(params=params, feature=z))
    torch.testing.assert_close(imtl.last_weights, alpha, rtol=1e-8, atol=1e-10)
    for p, g in zip(trunk, want_trunk):
        torch.testing.assert_close(p.grad, g, rtol=1e-8, atol=1e-12)
    for t, name in enumerate(TASKS):
        for p, g in zip(sm.heads[name].parameters(), want_head[name]):
            torch.testing.assert_close(p.grad, e[t] * g, rtol=1e-8, atol=1e-12)
    unused = [p for n, p in sm.named_parameters() if n.startswith("specific.")]
    assert unused and all(p.grad is None for p in unused)
    sm.zero_grad(set_to_none=True)


def test_feature_level_parameters_after_the_trunk_get_their_tasks_gradients(supermodel):
    sm, x = supermodel, sm_input()
    policy = Policy({t: {"conv1": "share", "conv2": "share" if t != "c" else "specific"} for t in TASKS})
    named = dict(sm.named_parameters())
    trunk = [named[n] for n in ("backbone.conv1.weight", "backbone.conv1.bias", "backbone.bn1.weight",
                                "backbone.bn1.bias")]
    after = {n: named[n] for n in ("backbone.conv2.weight", "backbone.bn2.weight", "specific.conv2.c.conv.weight")}
    users = {"backbone.conv2.weight": "ab", "backbone.bn2.weight": "ab", "specific.conv2.c.conv.weight": "c"}
    imtl = IMTL(TASKS, method="hybrid")
    e = dict(zip(TASKS, with_scales(imtl, [0.2, 0.6, -0.4])))

    losses, z = sm_losses(sm, x, policy=policy)
    gz = [e[t] * torch.autograd.grad(losses[t], z, retain_graph=True)[0] for t in TASKS]
    alpha = torch.from_numpy(paper_alpha(torch.stack([g.sum(0).reshape(-1) for g in gz]).numpy()))
    want_trunk = torch.autograd.grad(z, trunk, grad_outputs=sum(a * g for a, g in zip(alpha, gz)), retain_graph=True)
    want_after = {n: sum(e[t] * torch.autograd.grad(losses[t], p, retain_graph=True)[0] for t in users[n])
                  for n, p in after.items()}

    sm.zero_grad(set_to_none=True)
    losses, z = sm_losses(sm, x, policy=policy)
    imtl.backward(losses, StepContext(params=sm.network_parameters(), feature=z))
    for p, g in zip(trunk, want_trunk):
        torch.testing.assert_close(p.grad, g, rtol=1e-8, atol=1e-12)
    for n, p in after.items():
        torch.testing.assert_close(p.grad, want_after[n], rtol=1e-8, atol=1e-12, msg=n)
    sm.zero_grad(set_to_none=True)


def test_params_level_on_supermodel_balances_the_shared_parameters(supermodel):
    sm, x = supermodel, sm_input()
    params = sm.network_parameters()
    trunk = [p for n, p in sm.named_parameters() if n.startswith("backbone.")]
    losses, z = sm_losses(sm, x)
    rows = per_task_grads(losses, trunk)
    alpha = torch.from_numpy(paper_alpha(np.stack([torch.cat([g.reshape(-1) for g in r]).numpy() for r in rows])))
    want_head = {name: torch.autograd.grad(losses[name], list(sm.heads[name].parameters()), retain_graph=True)
                 for name in TASKS}

    sm.zero_grad(set_to_none=True)
    imtl = IMTL(TASKS, method="gradient", level="params")
    losses, z = sm_losses(sm, x)
    returned = imtl.backward(losses, StepContext(params=params, feature=z))
    torch.testing.assert_close(imtl.last_weights, alpha, rtol=1e-8, atol=1e-10)
    for i, p in enumerate(trunk):
        torch.testing.assert_close(p.grad, sum(alpha[t] * rows[t][i] for t in range(3)), rtol=1e-8, atol=1e-12)
    for name in TASKS:
        for p, g in zip(sm.heads[name].parameters(), want_head[name]):
            torch.testing.assert_close(p.grad, g)
    values = torch.stack([losses[t].detach() for t in TASKS])
    torch.testing.assert_close(returned.double(), (alpha * values).sum(), rtol=1e-6, atol=1e-6)
    assert returned.dim() == 0 and not returned.requires_grad
    sm.zero_grad(set_to_none=True)


def test_policy_step_without_shared_parameters_is_the_plain_sum(supermodel):
    sm, x = supermodel, sm_input()
    logits = sm.policy_parameters()
    network = sm.network_parameters()
    for p in network:
        p.requires_grad_(False)
    try:
        losses, z = sm_losses(sm, x, mode="soft", generator=torch.Generator().manual_seed(1))
        assert z is None
        want = torch.autograd.grad(sum(losses.values()), logits)
        losses, z = sm_losses(sm, x, mode="soft", generator=torch.Generator().manual_seed(1))
        imtl = IMTL(TASKS, method="gradient")
        imtl.backward(losses, StepContext(params=logits, feature=z))
        assert imtl.last_weights is None
        for p, g in zip(logits, want):
            torch.testing.assert_close(p.grad, g)
    finally:
        for p in network:
            p.requires_grad_(True)
        sm.zero_grad(set_to_none=True)


# ------------------------------------------------------------------ errors
def test_features_level_without_a_common_trunk_is_a_clear_error():
    model, x = Toy(), toy_input()
    imtl = IMTL(TASKS, level="features")
    with pytest.raises(AutomtlError, match="level 'params'.*common trunk"):
        imtl.backward(model.losses(x), StepContext(params=list(model.parameters())))
    with pytest.raises(AutomtlError, match="level 'features'"):
        imtl.backward(model.losses(x), None)


def test_bad_options_and_losses_are_clear_errors():
    with pytest.raises(AutomtlError, match="method 'grad'.*gradient, loss, hybrid"):
        IMTL(TASKS, method="grad")
    with pytest.raises(AutomtlError, match="level 'shared'"):
        IMTL(TASKS, level="shared")
    with pytest.raises(AutomtlError, match="loss_lr"):
        IMTL(TASKS, loss_lr=0)
    with pytest.raises(AutomtlError, match="imtl"):
        create("imtl", TASKS, method="nope")
    with pytest.raises(AutomtlError, match="imtl"):
        create("imtl", TASKS, beta=1)
    assert isinstance(create("imtl", TASKS, method="loss", level="params"), IMTL)
    with pytest.raises(AutomtlError, match="unknown task"):
        IMTL(TASKS).backward({"zzz": torch.tensor(1.0, requires_grad=True)})
    with pytest.raises(AutomtlError, match=r"\[3, P\]"):
        IMTL(TASKS).combine(torch.zeros(2, 4))


def hybrid_reference(rows, e, tasks, shared_idx, n_params):
    """Hybrid IMTL over ``tasks`` (indices) by the paper's closed form: per-parameter gradients and α."""
    J = np.stack([np.concatenate([(e[t] * rows[t][i]).reshape(-1).numpy() for i in shared_idx]) for t in tasks])
    alpha = paper_alpha(J)
    want = []
    for i in range(n_params):
        if i in shared_idx:
            want.append(sum(float(a) * e[t] * rows[t][i] for a, t in zip(alpha, tasks)))
        else:
            want.append(sum(e[t] * rows[t][i] for t in tasks))
    return alpha, want


def test_init_scales_start_the_loss_scales():
    model, x = Toy(), toy_input()
    imtl = IMTL(TASKS, level="params", init_scales={"a": 2.0, "c": 0.5}, loss_lr=0.01)
    e = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(imtl.scales().double(), e)
    losses = model.losses(x)
    params = list(model.parameters())
    rows = per_task_grads(losses, params)
    imtl.backward(losses, StepContext(params=params))
    shared_idx = [i for i, p in enumerate(params) if p is model.shared.weight or p is model.shared.bias]
    alpha, want = hybrid_reference(rows, e, [0, 1, 2], shared_idx, len(params))
    torch.testing.assert_close(imtl.last_weights, torch.from_numpy(alpha), rtol=1e-6, atol=1e-8)
    for p, w in zip(params, want):
        torch.testing.assert_close(p.grad, w, rtol=1e-6, atol=1e-9)
    values = torch.stack([losses[t].detach() for t in TASKS])
    torch.testing.assert_close(imtl.last_scale_grad.double(), e * values - 1, rtol=1e-6, atol=1e-6)
    assert abs(float(IMTL(TASKS, method="loss", init_scales={"b": 3.0}).log_scale.detach()[1]) - np.log(3.0)) < 1e-6


@pytest.mark.parametrize("level", ["params", "features"])
def test_excluded_losses_are_added_plainly_outside_the_balancing(supermodel, level):
    if level == "params":
        model, x = Toy(), toy_input()
        params = list(model.parameters())
        losses, z = model.losses(x), None
    else:
        sm = copy.deepcopy(supermodel)
        losses, z = sm_losses(sm, sm_input())
        params = [p for p in sm.network_parameters() if p.requires_grad]
    imtl = IMTL(TASKS, method="hybrid", level=level, exclude=["c"])
    e = with_scales(imtl, [0.4, -0.3, 0.9])
    s_before = imtl.log_scale.detach().clone()
    rows = per_task_grads(losses, params)
    if level == "params":
        shared_idx = [i for i, p in enumerate(params) if p is model.shared.weight or p is model.shared.bias]
        alpha, want = hybrid_reference(rows, e, [0, 1], shared_idx, len(params))
        alpha = torch.from_numpy(alpha)
    else:
        ref = IMTL(["a", "b"], method="hybrid", level="features")
        with_scales(ref, [0.4, -0.3])
        sm2 = copy.deepcopy(supermodel)
        l2, z2 = sm_losses(sm2, sm_input())
        p2 = [p for p in sm2.network_parameters() if p.requires_grad]
        ref.backward({"a": l2["a"], "b": l2["b"]}, StepContext(params=p2, feature=z2))
        alpha = ref.last_weights
        want = [p.grad if p.grad is not None else torch.zeros_like(p) for p in p2]
    imtl.backward(losses, StepContext(params=params, feature=z))
    torch.testing.assert_close(imtl.last_weights[:2], alpha, rtol=1e-6, atol=1e-9)
    assert float(imtl.last_weights[2]) == 0.0
    for i, p in enumerate(params):  # the excluded loss: weight 1, no scale
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(got, want[i] + rows[2][i], rtol=1e-6, atol=1e-9)
    assert float(imtl.last_scale_grad[2]) == 0.0 and float(imtl.log_scale[2]) == float(s_before[2])
    assert float(imtl.log_scale[0]) != float(s_before[0])


def test_losses_without_gradients_are_ignored():
    model, x = Toy(), toy_input()
    imtl = IMTL(TASKS, method="hybrid", level="params")
    e = with_scales(imtl, [0.2, 0.1, -0.4])
    losses = model.losses(x)
    params = list(model.parameters())
    rows = per_task_grads(losses, params)
    losses["b"] = losses["b"].detach()
    imtl.backward(losses, StepContext(params=params))
    shared_idx = [i for i, p in enumerate(params) if p is model.shared.weight or p is model.shared.bias]
    alpha, want = hybrid_reference(rows, e, [0, 2], shared_idx, len(params))
    torch.testing.assert_close(imtl.last_weights[[0, 2]], torch.from_numpy(alpha), rtol=1e-6, atol=1e-9)
    assert float(imtl.last_weights[1]) == 0.0 and float(imtl.last_scale_grad[1]) == 0.0
    for p, w in zip(params, want):
        torch.testing.assert_close(p.grad if p.grad is not None else torch.zeros_like(p), w, rtol=1e-6, atol=1e-9)


def test_bad_init_scales_and_exclude_are_clear_errors():
    for options, message in [({"init_scales": {"a": 0}}, "init_scales.a must be a positive number"),
                             ({"init_scales": {"zz": 1.0}}, r"init_scales for unknown task\(s\) \['zz'\]"),
                             ({"init_scales": [1.0]}, "init_scales must map task names"),
                             ({"init_scales": {"a": 2.0}, "method": "gradient"}, "method loss or hybrid"),
                             ({"exclude": ["zz"]}, r"exclude names unknown task\(s\) \['zz'\]"),
                             ({"exclude": "a"}, "exclude must be a list"),
                             ({"exclude": TASKS}, "no task to balance")]:
        with pytest.raises(AutomtlError, match=message):
            create("imtl", TASKS, **options)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_runs_on_cuda():
    model, x = Toy().cuda(), toy_input().cuda()
    imtl = IMTL(TASKS).cuda()
    loss = imtl.backward(model.losses(x), StepContext(params=list(model.parameters())))
    assert loss.device.type == "cuda" and all(p.grad.device.type == "cuda" for p in model.parameters())
