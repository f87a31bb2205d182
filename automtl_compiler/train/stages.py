"""AutoMTL's four stages, one function each, over a :class:`~.loop.Loop`.

``pretrain``: the network alone, every unit the mean of its branches. ``policy``: alternating network
steps (training split) and policy steps (held-out split, plus the policy regulariser) at a Gumbel
temperature that decays. ``sample``: draw candidate policies and keep the best. ``posttrain``: the
network alone on the fixed policy. Each stage resumes at ``loop.state["step"]``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..nn.policy import Policy
from ..nn.supermodel import SuperModel
from .batches import Batches, step_seed
from .distributed import broadcast_int
from .loop import Loop
from .schedulers import MetaScheduler
from .scoring import candidate_scores
from .settings import StageSettings


def make_optimizers(model: SuperModel, stages: StageSettings) -> tuple[dict[str, torch.optim.Optimizer], dict[str, Any]]:
    """The stages' optimisers over the model's parameters, and post-train's learning-rate schedule."""
    pre, pol, post = stages.pretrain, stages.policy, stages.posttrain
    opts = {
        "pretrain": torch.optim.Adam(model.network_parameters(), lr=pre.lr, betas=pre.betas,
                                     weight_decay=pre.weight_decay),
        "network": torch.optim.SGD(model.network_parameters(), lr=pol.network_lr, momentum=pol.momentum,
                                   weight_decay=pol.network_weight_decay),
        "policy": torch.optim.Adam(model.policy_parameters(), lr=pol.policy_lr, weight_decay=pol.policy_weight_decay),
        "posttrain": torch.optim.Adam(model.network_parameters(), lr=post.lr, betas=post.betas,
                                      weight_decay=post.weight_decay),
    }
    scheds = {"posttrain": torch.optim.lr_scheduler.StepLR(opts["posttrain"], post.step_size, post.gamma)}
    return opts, scheds


def network_stage(loop: Loop, stage: str, iters: int, mode: str, batches: Batches,
                  after: Callable[[int], None] = lambda count: None) -> None:
    """A stage that trains the network alone: per-step combiner steps, or a meta scheduler's spans.
    ``after(count)`` runs after every ``count`` steps (post-train's learning-rate schedule)."""
    loop.prepare_scheduler(stage)
    opt = loop.opts[stage]
    labelled = None
    if isinstance(loop.scheduler, MetaScheduler) and stage in loop.scheduler_stages:
        meta = loop.scheduler
        labelled = loop.labelled_batches(stage)

        def body(step: int) -> tuple[dict[str, float], int]:
            count = min(meta.span, iters - step)
            info = meta.run_span(loop.span_context(stage, mode, batches, step, count, labelled))
            after(count)
            return info, count
    else:
        def body(step: int) -> tuple[dict[str, float], int]:
            info = loop.train_step(batches, step, opt, mode, stage)
            after(1)
            return info, 1

    try:
        loop.run_steps(stage, iters, body)
    finally:
        if labelled is not None:
            labelled.close()


def pretrain(loop: Loop) -> None:
    """Pre-train the network with every unit the mean of its branches."""
    batches = loop.batches("train", "pretrain")
    try:
        network_stage(loop, "pretrain", loop.cfg.stages.pretrain.iters, "pretrain", batches)
    finally:
        loop.close(batches)


@contextmanager
def frozen(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """``params`` take no gradient inside the block (autograd neither computes nor stores what only they need);
    afterwards those that trained train again (one frozen before stays frozen)."""
    trained = [p for p in params if p.requires_grad]
    for p in trained:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trained:
            p.requires_grad_(True)


def policy(loop: Loop) -> None:
    """Alternate ``network_steps`` network steps and ``policy_steps`` policy steps in soft mode; the
    temperature decays by ``tau_decay`` every ``tau_every`` policy steps."""
    s, model = loop.cfg.stages.policy, loop.model
    train = loop.batches("train", "policy")
    held = loop.batches("policy", "policy", seed_offset=1)
    cycle = s.network_steps + s.policy_steps
    loop.prepare_scheduler("policy")

    def body(step: int) -> tuple[dict[str, float], int]:
        tau = loop.state["tau"]
        if step % cycle < s.network_steps or s.policy_steps == 0:
            # no policy gradients: the gates are constants, so the backward keeps no branch outputs for them
            with frozen(model.policy_parameters()):
                return loop.train_step(train, step, loop.opts["network"], "soft", "policy", tau=tau) | {"tau": tau}, 1
        gen = torch.Generator().manual_seed(step_seed(loop.cfg.seed, "sample", step))
        reg = lambda: s.reg_weight * sum(model.policy_regulariser(t, tau=tau, generator=gen) for t in loop.tasks)
        with frozen(model.network_parameters()):  # a policy step needs no weight gradients: skip computing them
            info = loop.train_step(held, step, loop.opts["policy"], "soft", "policy", extra=reg, tau=tau)
        loop.state["policy_steps"] += 1
        if loop.state["policy_steps"] % s.tau_every == 0:
            loop.state["tau"] = tau * s.tau_decay
        return info | {"tau": tau}, 1

    try:
        loop.run_steps("policy", s.iters, body)
    finally:
        loop.close(train, held)


def sample(loop: Loop) -> None:
    """Draw the policy. With ``candidates: k > 1`` the candidates are the argmax policy and k - 1 samples
    (strategy ``sample``). Those whose compute ratio (multiply-accumulates of all tasks in one call against
    the tasks one by one) exceeds ``max_macs_ratio`` are dropped unscored (the cheapest stays when none
    fits); the rest are scored on validation in fixed mode, less ``cost_weight`` times the ratio, and the
    best is kept."""
    from ..nn.cost import policy_cost

    s, model = loop.cfg.stages.sample, loop.model
    count = max(1, s.candidates)
    policies: list[Policy] = []
    for k in range(count):
        strategy = "argmax" if count > 1 and k == 0 else s.strategy
        drawn = model.sample_policy(strategy, seed=s.seed + k)
        for u in model.unit_names[:s.share_first]:
            for t in loop.tasks:
                drawn.choices[t][u] = "share"
        if drawn not in policies:
            policies.append(drawn)
    ratios = [policy_cost(model, p)["ratio"] for p in policies]
    within = [s.max_macs_ratio is None or r <= s.max_macs_ratio for r in ratios]
    if not any(within):  # nothing fits the budget: the cheapest candidate(s) only
        within = [r == min(ratios) for r in ratios]
    scored = [i for i in range(len(policies)) if within[i]]
    baselines = Path(loop.cfg.baselines) if loop.cfg.baselines else None
    found = candidate_scores([_score_metrics(loop, policies[i]) for i in scored], loop.task_types, loop.tasks,
                             baselines) if len(scored) > 1 else [0.0]
    accuracy: list[float | None] = [None] * len(policies)
    for i, a in zip(scored, found):
        accuracy[i] = a
    scores = [None if a is None else a - s.cost_weight * 100 * r for a, r in zip(accuracy, ratios)]
    pick = broadcast_int(max(scored, key=lambda i: scores[i]), loop.dist)  # every rank takes rank 0's choice
    best = policies[pick]
    loop.state["candidates"] = [{"accuracy": a, "macs_ratio": r, "score": sc, "within_budget": w,
                                 "chosen": i == pick, "policy": p.counts()}
                                for i, (a, r, sc, w, p) in enumerate(zip(accuracy, ratios, scores, within, policies))]
    model.set_policy(best)
    loop.state["policy"] = best.to_json()
    if loop.dist.is_main:
        best.save(loop.out / "policy.json")
    loop.checkpoint()


def _score_metrics(loop: Loop, candidate: Policy) -> dict[str, dict[str, float]]:
    """Validation metrics of a candidate policy, its batch-norm statistics first re-estimated on
    ``calibration_batches`` training batches under that policy (the stage's own batches, so a resumed
    run scores alike); the model's statistics are restored afterwards."""
    from ..nn.calibrate import recalibrated_batchnorm

    count = loop.cfg.stages.sample.calibration_batches
    if count == 0:
        return loop.evaluator.evaluate("fixed", candidate)
    batches = loop.batches("train", "sample")

    def feed() -> None:
        for k in range(count):
            loop.model.forward_all(batches.batch(k)[0].to(loop.device), mode="fixed", policy=candidate)

    try:
        with recalibrated_batchnorm(loop.model, feed):
            return loop.evaluator.evaluate("fixed", candidate)
    finally:
        loop.close(batches)


def posttrain(loop: Loop, build: Callable[[], SuperModel]) -> None:
    """Train the network on the fixed policy; with ``init: fresh`` from the initial weights (``build()``
    makes them again), else from the trained ones."""
    s = loop.cfg.stages.posttrain
    if s.init == "fresh" and loop.state["step"] == 0:
        fixed = loop.model.fixed_policy
        loop.model.load_state_dict(build().to(loop.device).state_dict())
        if fixed is not None:
            loop.model.set_policy(fixed)
    batches = loop.batches("train", "posttrain")

    def lr_steps(count: int) -> None:
        for _ in range(count):
            loop.scheds["posttrain"].step()

    try:
        network_stage(loop, "posttrain", s.iters, "fixed", batches, after=lr_steps)
    finally:
        loop.close(batches)

