"""TMT: Task Meta-Transfer (Jian, Ahmed, Torresani, "Task Meta-Transfer from Limited Parallel Labels",
4th Meta-Learning workshop at NeurIPS 2020).

A learned controller rewrites the auxiliary tasks' gradients at the end of the shared trunk so that an
update driven by them helps the target task; the controller is meta-learned through a one-step look-ahead.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import AutomtlError
from .base import Batch, MetaScheduler, SpanContext
from .functional import autograd_leaves, call_with, trunk_parameters

CONTROLLERS = ("diag", "full", "rank")
TARGET_UPDATES = ("lookahead", "every_step")

NO_TRUNK = ("TMT needs a trunk all tasks share (it rewrites auxiliary gradients at its end): use it in "
            "post-train with a policy that shares at least the first units among all tasks, or the "
            "all-share baseline")


class Controller(nn.Module):
    """P_φ: maps a gradient g w.r.t. a [B, C, ...] feature map to g', one C -> C map applied at every position.

    * ``diag``: g' = d ⊙ g, d ∈ R^C initialised to 1 + N(0, noise²);
    * ``full``: g' = M g, M ∈ R^{C×C} initialised to I + N(0, noise²);
    * ``rank``: g' = d ⊙ g + U Uᵀ g, d as for diag and U ∈ R^{C×rank} initialised to N(0, noise²).

    All three start near the identity, so TMT starts as plain multi-task training.
    """

    def __init__(self, kind: str, channels: int, rank: int = 5, noise: float = 0.02,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if kind not in CONTROLLERS:
            raise AutomtlError(f"unknown TMT controller '{kind}'; use one of {', '.join(CONTROLLERS)}")
        self.kind, self.channels, self.rank = kind, int(channels), int(rank)

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=generator) * noise

        if kind == "full":
            self.m = nn.Parameter(torch.eye(channels) + randn(channels, channels))
        else:
            self.d = nn.Parameter(1.0 + randn(channels))
        if kind == "rank":
            self.u = nn.Parameter(randn(channels, rank))

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        """g' for a gradient ``g`` with channels on dim 1."""
        if g.dim() < 2 or g.shape[1] != self.channels:
            raise AutomtlError(f"TMT controller expects a [B, {self.channels}, ...] gradient, got {list(g.shape)}")
        if self.kind == "diag":
            return g * self.d.view(1, -1, *([1] * (g.dim() - 2)))
        h = g.movedim(1, -1)
        if self.kind == "full":
            out = F.linear(h, self.m)
        else:
            out = h * self.d + F.linear(F.linear(h, self.u.t()), self.u)
        return out.movedim(-1, 1)

    def extra_repr(self) -> str:
        return f"{self.kind}, channels={self.channels}" + (f", rank={self.rank}" if self.kind == "rank" else "")


def _to(batch: Batch, device: torch.device) -> Batch:
    x, targets = batch
    return x.to(device), {k: v.to(device) for k, v in targets.items()}


class TMT(MetaScheduler):
    """Task Meta-Transfer: auxiliary gradients at the trunk's end pass through a meta-learned controller.

    Notation: z = f_Θ(x) is the end of the trunk all tasks share (``forward(feature=True)``), Θ the
    parameters z depends on, g_A = ∂L_A/∂z the gradient of auxiliary task A, P_A a :class:`Controller`
    (one per auxiliary task, so that each auxiliary task's transfer is learned separately - depth and normals
    need not help segmentation in the same channels) and P the target task. The target's *head* is every
    parameter after z that L_P reaches; an auxiliary head likewise.

    **The authors' loop** (``target_update: lookahead``, the default; yiren-jian/TMT ``nyu_TMT.py``):

    * every step s, on ``batch(s)`` (whose target labels are never read): one step of the stage optimiser
      with the auxiliary heads' gradients ∂L_A/∂head and, for the trunk, *only* the transformed auxiliary
      gradient Σ_A (∂z/∂Θ)ᵀ P_A(g_A) (no target gradient; the target head is not run);
    * when s % update_freq == 0, after that step, on the labelled batch x_P = ``batch_for(target, s)``:
      g_A is recomputed on x_P (the auxiliary heads' batch-norm buffers are put back afterwards), the
      look-ahead Θ⁺(Θ, φ) = Θ − lr · ∂⟨z, Σ_A P_A(g_A)⟩/∂Θ is taken with create_graph (second order),
      L_P(f_{Θ⁺}(x_P)) is differentiated w.r.t. φ, Θ (through Θ⁺, Hessian term included) and the target
      head; the controllers take one step of their Adam, and the trunk (∂L_P(Θ⁺)/∂Θ) and the target head
      (its gradient at Θ⁺) one more step of the stage optimiser. The look-ahead forward runs the stage's
      forward under torch.func.functional_call with Θ⁺ swapped in, in training mode on the model's own
      running statistics (as the authors' functional forward does; their ``num_batches_tracked`` stay).

    With the authors' plain SGD (no momentum or weight decay) as the stage optimiser both steps are exactly
    theirs; with Adam they are Adam steps on the same gradients.

    **The per-step target gradient** (``target_update: every_step``, the earlier behaviour): every step the
    trunk gets ∂L_P/∂Θ + Σ_A (∂z/∂Θ)ᵀ P_A(g_A) at Θ and every parameter after z the plain gradient of the
    losses that use it, in one step of the stage optimiser; with identity controllers this is plain training
    on L_P + Σ_A L_A. When s % update_freq == 0, before that step, φ takes its Adam step on L_P at the
    look-ahead driven by g_A of ``batch(s)``, judged on x_P = ``batch_for(target, s)`` (with copies of the
    buffers, so the look-ahead leaves the statistics alone); there is no separate trunk update from the
    look-ahead. The target then pulls on the trunk at every step rather than every ``update_freq`` steps.
    With ``label_fraction`` < 1 the step's L_P also comes from ``batch_for(target, s)``.

    **Labels.** ``label_fraction`` < 1 is the paper's limited-label setting: target labels on that fraction
    of the training set, served by the trainer through ``batch_for`` in their own order (the trainer gives
    TMT that second loader at any fraction, as the authors' code has it). The schedule depends only on the
    step index, so a resumed run repeats an uninterrupted one.

    Hyper-parameters: ``target_update`` lookahead | every_step; ``controller`` diag | full | rank (default
    rank, ``rank`` 5 columns); ``update_freq`` steps between meta updates; ``lr`` the look-ahead step size
    (default: the stage optimiser's current lr); ``controller_lr`` / ``controller_weight_decay`` the
    controllers' Adam (paper: 1e-3 / 1e-5; a ``controller_lr`` of 0 keeps hand-set controllers fixed while
    the look-ahead loss is still logged); ``noise`` the std of the controllers' initial perturbation (0.02);
    ``span`` steps per ``run_span``.
    """

    needs_feature = True
    stages = ("posttrain",)

    def __init__(self, tasks: list[str], target: str, span: int = 1, controller: str = "rank", rank: int = 5,
                 update_freq: int = 1, lr: float | None = None, controller_lr: float = 1e-3,
                 controller_weight_decay: float = 1e-5, label_fraction: float = 1.0, noise: float = 0.02,
                 target_update: str = "lookahead") -> None:
        tasks = list(tasks)
        if target not in tasks:
            raise AutomtlError(f"scheduler 'tmt': target '{target}' is not one of the tasks {tasks}")
        if len(tasks) < 2:
            raise AutomtlError(f"scheduler 'tmt' needs at least one auxiliary task besides the target '{target}'")
        if controller not in CONTROLLERS:
            raise AutomtlError(f"scheduler 'tmt': unknown controller '{controller}'; use one of "
                               f"{', '.join(CONTROLLERS)}")
        if target_update not in TARGET_UPDATES:
            raise AutomtlError(f"scheduler 'tmt': target_update must be one of {', '.join(TARGET_UPDATES)}, got "
                               f"{target_update!r}")
        checks = [("span", span, span >= 1 and int(span) == span, "an integer >= 1"),
                  ("rank", rank, rank >= 1 and int(rank) == rank, "an integer >= 1"),
                  ("update_freq", update_freq, update_freq >= 1 and int(update_freq) == update_freq,
                   "an integer >= 1"),
                  ("lr", lr, lr is None or lr > 0, "positive (or None for the stage optimiser's lr)"),
                  ("controller_lr", controller_lr, controller_lr >= 0, ">= 0"),
                  ("controller_weight_decay", controller_weight_decay, controller_weight_decay >= 0, ">= 0"),
                  ("label_fraction", label_fraction, 0 < label_fraction <= 1, "in (0, 1]"),
                  ("noise", noise, noise >= 0, ">= 0")]
        for name, value, ok, want in checks:
            if not ok:
                raise AutomtlError(f"scheduler 'tmt': {name} must be {want}, got {value}")
        super().__init__(tasks, int(span))
        self.target = target
        self.auxiliary = [t for t in tasks if t != target]
        self.controller_kind = controller
        self.rank = int(rank)
        self.update_freq = int(update_freq)
        self.lr = None if lr is None else float(lr)
        self.controller_lr = float(controller_lr)
        self.controller_weight_decay = float(controller_weight_decay)
        self.label_fraction = float(label_fraction)
        self.noise = float(noise)
        self.target_update = target_update
        self.controllers = nn.ModuleDict()
        self.channels: int | None = None
        self._opt: torch.optim.Adam | None = None

    # ------------------------------------------------------------ set-up
    def prepare(self, params: list[nn.Parameter], feature_shape: tuple[int, ...] | None) -> None:
        """Create one controller per auxiliary task for a trunk end of ``feature_shape`` and their Adam.

        Called by the trainer before a stage's spans and before it restores checkpointed scheduler state;
        a second call with the same channel count, device and dtype keeps the existing controllers.
        """
        if feature_shape is None:
            raise AutomtlError(NO_TRUNK)
        if len(feature_shape) < 2 or int(feature_shape[1]) < 1:
            raise AutomtlError(f"TMT needs a [B, C, ...] trunk feature, got shape {list(feature_shape)}")
        channels = int(feature_shape[1])
        ref = next((p for p in params if p.is_floating_point()), None)
        device = ref.device if ref is not None else torch.device("cpu")
        dtype = ref.dtype if ref is not None else torch.get_default_dtype()
        if self._opt is not None and self.channels == channels:
            first = next(self.controllers.parameters())
            if first.device == device and first.dtype == dtype:
                return
        self.channels = channels
        self.controllers = nn.ModuleDict({
            t: Controller(self.controller_kind, channels, self.rank, self.noise,
                          torch.Generator().manual_seed(i)).to(device=device, dtype=dtype)
            for i, t in enumerate(self.auxiliary)})
        self._opt = torch.optim.Adam(self.controllers.parameters(), lr=self.controller_lr,
                                     weight_decay=self.controller_weight_decay)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"tmt_controller": self._opt} if self._opt is not None else {}

    # ------------------------------------------------------------ training
    def run_span(self, ctx: SpanContext) -> dict[str, float]:
        """Train steps ``ctx.start .. ctx.start + ctx.steps - 1`` (see the class docstring for one step)."""
        if self._opt is None:
            raise RuntimeError("TMT.prepare(params, feature_shape) must be called before run_span")
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        step_fn = self._step_lookahead if self.target_update == "lookahead" else self._step
        for step in range(ctx.start, ctx.start + ctx.steps):
            for k, v in step_fn(ctx, step).items():
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
        return {k: sums[k] / counts[k] for k in sums}

    def transform(self, aux_grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """Σ_A P_A(g_A) for auxiliary task -> ∂L_A/∂z (differentiable in the controllers)."""
        out = None
        for t, g in aux_grads.items():
            ctl = self.controllers[t]
            dtype = next(ctl.parameters()).dtype
            v = ctl(g.to(dtype)).to(g.dtype)
            out = v if out is None else out + v
        assert out is not None
        return out

    def _trunk_forward(self, ctx: SpanContext, x: torch.Tensor,
                       tasks: list[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        outputs, z = ctx.forward(x, tasks=list(tasks), feature=True)
        if z is None:
            raise AutomtlError(NO_TRUNK)
        if z.shape[1] != self.channels:
            raise AutomtlError(f"TMT was prepared for a {self.channels}-channel trunk feature but the forward "
                               f"returned {list(z.shape)}; call prepare with the stage's feature shape")
        return outputs, z

    def _step_lookahead(self, ctx: SpanContext, step: int) -> dict[str, float]:
        """One step of the authors' loop (``target_update: lookahead``, see the class docstring)."""
        ctx.seed(step)
        x, targets = _to(ctx.batch(step), ctx.device)
        before = {n: b.detach().clone() for n, b in ctx.model.named_buffers()}
        outputs, z = self._trunk_forward(ctx, x, self.tasks)  # all tasks: z is the end of the trunk all share
        losses = ctx.loss({t: outputs[t] for t in self.auxiliary}, targets)
        ctx.check(losses, step)
        trunk = trunk_parameters(z, ctx.params)
        trunk_ids = {id(p) for p in trunk}
        after = [p for p in ctx.params if p.requires_grad and id(p) not in trunk_ids]
        reached = {id(p) for p in autograd_leaves(list(losses.values()))}
        target_only = {id(p) for p in after if id(p) not in reached}
        with torch.no_grad():  # the target head is not part of this step: its statistics stay
            for n, b in _module_buffers(ctx.model, lambda own: all(id(p) in target_only for p in own)).items():
                b.copy_(before[n])
        del before
        grads: dict[int, torch.Tensor] = {}
        aux_grads: dict[str, torch.Tensor] = {}
        for t in self.auxiliary:
            gz, *gh = torch.autograd.grad(losses[t], [z, *after], retain_graph=True, allow_unused=True)
            aux_grads[t] = torch.zeros_like(z) if gz is None else gz.detach()
            _add(grads, after, gh)
        if trunk:
            with torch.no_grad():
                steer = self.transform(aux_grads)
            _add(grads, trunk, torch.autograd.grad(z, trunk, grad_outputs=steer))
        info = {t: float(losses[t].detach()) for t in self.auxiliary}
        del outputs, z, losses
        _step_with(ctx, grads)
        if step % self.update_freq == 0 and trunk:
            info["tmt_lookahead"] = info[self.target] = self._lookahead_update(ctx, step, trunk, after)
        return info

    def _lookahead_update(self, ctx: SpanContext, step: int, trunk: list[nn.Parameter],
                          after: list[nn.Parameter]) -> float:
        """The authors' meta step on the labelled batch: controllers (Adam), then trunk and target head (one
        step of the stage optimiser) on L_P at the second-order look-ahead Θ⁺; returns that loss."""
        assert self._opt is not None
        xp, yp = _to(ctx.batch_for(self.target, step), ctx.device)
        trunk_ids = {id(p) for p in trunk}
        heads = _module_buffers(ctx.model, lambda own: not any(id(p) in trunk_ids for p in own))
        kept = {n: b.detach().clone() for n, b in heads.items()}
        ctx.seed(step)
        outputs, z = self._trunk_forward(ctx, xp, self.tasks)
        losses = ctx.loss({t: outputs[t] for t in self.auxiliary}, yp)
        ctx.check(losses, step)
        aux_grads = {}
        for t in self.auxiliary:
            gz = torch.autograd.grad(losses[t], z, retain_graph=True, allow_unused=True)[0]
            aux_grads[t] = torch.zeros_like(z) if gz is None else gz.detach()
        del outputs
        with torch.no_grad():  # the heads' statistics are those of the ordinary step
            for n, b in heads.items():
                b.copy_(kept[n])
        lr = self._lookahead_lr(ctx, trunk)
        steer = torch.autograd.grad(z, trunk, grad_outputs=self.transform(aux_grads), create_graph=True)
        names = {id(p): n for n, p in ctx.model.named_parameters()}
        tensors: dict[str, torch.Tensor] = {names[id(p)]: p - lr * g for p, g in zip(trunk, steer)}
        head_ids = {id(b) for b in heads.values()}
        tensors.update({n: b.clone() for n, b in ctx.model.named_buffers()  # a functional forward's counters stay
                        if n.endswith("num_batches_tracked") and id(b) not in head_ids})
        ctx.seed(step)
        target_out = call_with(ctx.model, tensors, ctx.forward, xp, tasks=[self.target])
        loss = ctx.loss(target_out, yp)
        ctx.check(loss, step)
        phi = list(self.controllers.parameters())
        grads = torch.autograd.grad(loss[self.target], [*phi, *trunk, *after], allow_unused=True)
        self._opt.zero_grad(set_to_none=True)
        for p, g in zip(phi, grads):
            p.grad = torch.zeros_like(p) if g is None else g
        self._opt.step()
        update: dict[int, torch.Tensor] = {}
        _add(update, [*trunk, *after], grads[len(phi):])
        _step_with(ctx, update)
        return float(loss[self.target].detach())

    def _step(self, ctx: SpanContext, step: int) -> dict[str, float]:
        limited = self.label_fraction < 1
        meta = step % self.update_freq == 0
        ctx.seed(step)
        x, targets = _to(ctx.batch(step), ctx.device)
        outputs, z = self._trunk_forward(ctx, x, self.tasks)
        used = self.auxiliary if limited else self.tasks
        losses = ctx.loss({t: outputs[t] for t in used}, targets)
        ctx.check(losses, step)
        trunk = trunk_parameters(z, ctx.params)
        trunk_ids = {id(p) for p in trunk}
        after = [p for p in ctx.params if p.requires_grad and id(p) not in trunk_ids]
        grads: dict[int, torch.Tensor] = {}
        feature_grads: dict[str, torch.Tensor] = {}
        for t in used:
            gz, *gh = torch.autograd.grad(losses[t], [z, *after], retain_graph=True, allow_unused=True)
            feature_grads[t] = torch.zeros_like(z) if gz is None else gz.detach()
            _add(grads, after, gh)
        labelled = _to(ctx.batch_for(self.target, step), ctx.device) if limited or meta else None
        info = {t: float(losses[t].detach()) for t in used}
        aux_grads = {t: feature_grads[t] for t in self.auxiliary}
        if labelled is not None and meta and trunk:
            info["tmt_lookahead"] = self._meta_update(ctx, step, z, aux_grads, trunk, labelled)
        if labelled is not None and limited:
            ctx.seed(step)
            xp, yp = labelled
            lp = ctx.loss(ctx.forward(xp, tasks=[self.target]), yp)
            ctx.check(lp, step)
            info[self.target] = float(lp[self.target].detach())
            trainable = [p for p in ctx.params if p.requires_grad]
            _add(grads, trainable, torch.autograd.grad(lp[self.target], trainable, allow_unused=True))
        with torch.no_grad():
            feature = self.transform(aux_grads)
            if not limited:
                feature = feature + feature_grads[self.target]
        if trunk:
            _add(grads, trunk, torch.autograd.grad(z, trunk, grad_outputs=feature))
        ctx.optimizer.zero_grad(set_to_none=True)
        for p in ctx.params:
            if id(p) in grads:
                p.grad = grads[id(p)]
        ctx.optimizer.step()
        return info

    def _lookahead_lr(self, ctx: SpanContext, trunk: list[nn.Parameter]) -> float:
        if self.lr is not None:
            return self.lr
        first = id(trunk[0])
        for group in ctx.optimizer.param_groups:
            if any(id(p) == first for p in group["params"]):
                return float(group["lr"])
        return float(ctx.optimizer.param_groups[0]["lr"])

    def _meta_update(self, ctx: SpanContext, step: int, z: torch.Tensor, aux_grads: dict[str, torch.Tensor],
                     trunk: list[nn.Parameter], labelled: Batch) -> float:
        """One Adam step of the controllers on L_P at the look-ahead Θ⁺(φ); returns that loss."""
        assert self._opt is not None
        lr = self._lookahead_lr(ctx, trunk)
        steer = torch.autograd.grad(z, trunk, grad_outputs=self.transform(aux_grads), retain_graph=True,
                                    create_graph=True)
        names = {id(p): n for n, p in ctx.model.named_parameters()}
        tensors: dict[str, torch.Tensor] = {n: b.clone() for n, b in ctx.model.named_buffers()}
        tensors.update({names[id(p)]: p - lr * g for p, g in zip(trunk, steer)})
        ctx.seed(step)
        xp, yp = labelled
        outputs = call_with(ctx.model, tensors, ctx.forward, xp, tasks=[self.target])
        loss = ctx.loss(outputs, yp)
        ctx.check(loss, step)
        phi = list(self.controllers.parameters())
        grads = torch.autograd.grad(loss[self.target], phi, retain_graph=True, allow_unused=True)
        self._opt.zero_grad(set_to_none=True)
        for p, g in zip(phi, grads):
            p.grad = torch.zeros_like(p) if g is None else g
        self._opt.step()
        return float(loss[self.target].detach())


def _add(acc: dict[int, torch.Tensor], params: list[nn.Parameter], grads: Any) -> None:
    """Add each non-None gradient of ``grads`` to ``acc[id(param)]``."""
    for p, g in zip(params, grads):
        if g is not None:
            acc[id(p)] = acc[id(p)] + g if id(p) in acc else g


def _step_with(ctx: SpanContext, grads: dict[int, torch.Tensor]) -> None:
    """One step of the stage optimiser with ``grads`` (by parameter id) as the parameters' gradients."""
    ctx.optimizer.zero_grad(set_to_none=True)
    for p in ctx.params:
        if id(p) in grads:
            p.grad = grads[id(p)].detach()
    ctx.optimizer.step()
    ctx.optimizer.zero_grad(set_to_none=True)


def _module_buffers(model: nn.Module, keep: Any) -> dict[str, torch.Tensor]:
    """The buffers of the modules that own parameters for which ``keep(own parameters)`` is true (TMT asks
    for heads' batch norms: a batch norm without affine weights owns none and is never picked)."""
    found: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if own and keep(own):
            for n, b in module.named_buffers(recurse=False):
                found[f"{prefix}.{n}" if prefix else n] = b
    return found
