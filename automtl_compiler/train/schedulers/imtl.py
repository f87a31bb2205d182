"""IMTL: impartial multi-task learning (Liu et al., ICLR 2021), gradient, loss and hybrid forms."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ...errors import AutomtlError
from .base import Combiner, StepContext
from .functional import accumulate_grad, autograd_leaves, trainable

METHODS = ("gradient", "loss", "hybrid")
LEVELS = ("auto", "features", "params")
#: eigenvalues of the unit-gradient Gram matrix below this fraction of the largest are treated as zero
PINV_RTOL = 1e-10


def _gram_weights(gram: torch.Tensor) -> torch.Tensor:
    """IMTL-G weights from a float64 [T, T] Gram matrix of task gradients (see :class:`IMTL`)."""
    norms = gram.diagonal().clamp(min=0).sqrt()
    live = norms > 0
    inv_norms = torch.where(live, 1.0 / torch.where(live, norms, torch.ones_like(norms)), torch.zeros_like(norms))
    cosines = gram * inv_norms[:, None] * inv_norms[None, :]
    cosines = (cosines + cosines.T) / 2
    ones = torch.ones_like(norms)
    beta = torch.linalg.pinv(cosines, rtol=PINV_RTOL, hermitian=True) @ ones * inv_norms
    total = beta.sum()
    scale = beta.abs().sum()
    if not bool(torch.isfinite(total)) or scale == 0 or total.abs() <= 1e-12 * scale:
        return ones / len(ones)
    return beta / total.abs()


def imtl_weights(grads: torch.Tensor) -> torch.Tensor:
    """IMTL-G weights α [T] (float64, on the device of ``grads``) of the rows of a [T, P] gradient matrix."""
    if grads.dim() != 2 or grads.shape[0] == 0:
        raise AutomtlError(f"IMTL needs a [T, P] matrix of task gradients with T >= 1, got shape {tuple(grads.shape)}")
    with torch.no_grad():
        g = grads.detach().to(torch.float64)
        return _gram_weights(g @ g.T)




class IMTL(Combiner):
    """Impartial multi-task learning: Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021.

    **IMTL-G** (``method="gradient"``) balances the *direction* of the update. With task gradients g_t
    (rows of J, [T, P]), unit vectors u_t = g_t / ‖g_t‖, D = [g_1 − g_2; …; g_1 − g_T] and
    U = [u_1 − u_2; …; u_1 − u_T], the paper's closed form is α_{2:T} = g_1 Uᵀ (D Uᵀ)⁻¹, α_1 = 1 − Σ α_{2:T};
    the update Σ_t α_t g_t then has the same projection on every u_t, so no task dominates however large its
    gradient. The same α is ∝ G⁻¹ n with the Gram matrix G = J Jᵀ and n_t = ‖g_t‖ = √G_tt. It is computed in
    float64 as α ∝ N⁻¹ C⁺ 1 with C = N⁻¹ G N⁻¹ the cosine matrix of the u_t (N = diag(n)) and C⁺ its
    pseudo-inverse, which equals G⁻¹ n when J has full rank and stays finite when it has not (parallel task
    gradients, a zero gradient, whose weight is 0); for any J the direction of the update is unchanged when
    a row is multiplied by a positive number. α is a constant: no gradient flows through it.
    One deviation from the paper: α is normalised to Σ α = 1 when that keeps the common projection positive,
    else to Σ α = −1 (for some J the paper's normalisation makes the update an ascent direction for every
    task); when the sum vanishes (all gradients zero) α is uniform.

    **IMTL-L** (``method="loss"``) balances the *scale* of the losses: each L_t becomes e^{s_t} L_t − s_t with
    a learnable s_t (zeros at first, ``log_scale``), whose gradient e^{s_t} L_t − 1 drives e^{s_t} L_t to 1.
    s has its own Adam optimiser (learning rate ``loss_lr``), stepped inside :meth:`backward`; the network
    gets the plain sum of the gradients of e^{s_t} L_t.

    **Hybrid** (``method="hybrid"``, the default, the paper's full IMTL): α comes from IMTL-G on the
    gradients of the scaled losses e^{s_t} L_t, and s is trained as in IMTL-L.

    **Where α is computed** (``level``): ``features`` uses the gradients w.r.t. the tensor z all tasks share
    (``StepContext.feature``, the paper's default): one backward per task through the task-specific part
    only. As in the paper the z-gradients are summed over the batch dimension, so α comes from a
    [T, numel(z) / batch] matrix; the trunk (every parameter z depends on) then gets the backward of
    Σ_t α_t ∂L_t/∂z, and each parameter after z gets the sum of its (scaled) task gradients, i.e. its own
    task's gradient when one task uses it. ``params`` uses the per-task gradients of every parameter the
    step trains: a parameter reached by two tasks or more is shared and gets Σ_t α_t g_t with α from the
    concatenated shared-parameter gradients; a parameter one task reaches gets that task's gradient (with
    no shared parameter, e.g. per-task policy logits, the step is the plain sum in one backward).
    ``auto`` is ``features`` when the step has a z and ``params`` otherwise; without a ``StepContext``
    every trainable tensor the losses reach is a parameter of the ``params`` level. When z does not require
    gradients (a frozen trunk) the ``params`` level is used. A parameter used both before and after z (tied
    weights) is treated as trunk and gets only the trunk's gradient.

    **Sign.** The paper normalises Σ α = 1. For some Jacobians that α makes the common projection
    negative - the update would raise every task's loss - so α is normalised to Σ α = −1 there instead
    (the sign that keeps a descent direction; LibMTL's IMTL gives the same α up to that sign).

    **Parameters shared by only some tasks** (``params`` level, e.g. a branch two of three tasks use): the
    Gram matrix is summed over every parameter that two tasks or more reach, each task's gradient being 0
    on parameters it does not reach; so one α, computed over all tasks, weights every shared parameter,
    and a task that does not reach a parameter contributes nothing to it (its α still counts in the
    normalisation). A parameter one task reaches gets that task's (scaled) gradient, unweighted.

    **Leaving losses out.** ``exclude: [task, ...]`` names tasks whose losses are added plainly (weight 1,
    no loss scale, no α) to the balanced objective - the reference code's "other" losses that bypass IMTL,
    e.g. a regulariser; they are trained but do not take part in the balancing. A loss that does not
    require gradients (a frozen head, a constant) is ignored: it gets no α and no scale update.

    **Across processes** (each rank a part of the batch, ``StepContext.reduce``): α and the scales' update
    come from the whole batch, the same on every rank. ``params`` level: each task's gradient of the shared
    parameters is averaged over the ranks before α (the gradient of the whole batch's mean loss), so the
    combined gradient is already the whole batch's. ``features`` level: the batch-summed z-gradients are
    the mean over the ranks of each rank's batch-summed z-gradients of its own mean loss, so they are
    averaged before α; the backward of Σ α_t ∂L_t/∂z then runs on each rank's own part and the trainer
    averages it. The loss values that drive s are averaged over the ranks too, so s stays the same
    everywhere.

    Hyper-parameters: ``method`` (above), ``level`` (above), ``loss_lr`` (Adam learning rate of s),
    ``init_scales`` (task -> the initial loss scale e^{s_t} > 0, default 1; the IMTL reference's
    ``init_loss`` gives s_t itself, so its ``init_loss`` v is ``init_scales`` e^v), ``exclude`` (above).
    """

    def __init__(self, tasks: list[str], method: str = "hybrid", level: str = "auto", loss_lr: float = 1e-3,
                 init_scales: dict[str, float] | None = None, exclude: list[str] | None = None) -> None:
        super().__init__(tasks)
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise AutomtlError(f"scheduler 'imtl' needs distinct task names, got {self.tasks}")
        if method not in METHODS:
            raise AutomtlError(f"scheduler 'imtl': unknown method '{method}'; use one of {', '.join(METHODS)}")
        if level not in LEVELS:
            raise AutomtlError(f"scheduler 'imtl': unknown level '{level}'; use one of {', '.join(LEVELS)}")
        if not isinstance(loss_lr, (int, float)) or not loss_lr > 0:
            raise AutomtlError(f"scheduler 'imtl': loss_lr must be a positive number, got {loss_lr!r}")
        init = self._check_init_scales(init_scales, method)
        self.exclude = self._check_exclude(exclude)
        self.method = method
        self.level = level
        self.loss_lr = float(loss_lr)
        self.log_scale: nn.Parameter | None = None
        self._scale_opt: torch.optim.Optimizer | None = None
        if method != "gradient":
            start = [math.log(init.get(t, 1.0)) for t in self.tasks]
            self.log_scale = nn.Parameter(torch.tensor(start, dtype=torch.get_default_dtype()))
            self._scale_opt = torch.optim.Adam([self.log_scale], lr=self.loss_lr)
        #: α of the last step over ``self.tasks`` (None when the step needed none), for logs and tests
        self.last_weights: torch.Tensor | None = None
        #: gradient of s used by the last step (before the optimiser step), for logs and tests
        self.last_scale_grad: torch.Tensor | None = None

    def _check_init_scales(self, init_scales: Any, method: str) -> dict[str, float]:
        if init_scales is None:
            return {}
        if not isinstance(init_scales, dict):
            raise AutomtlError(f"scheduler 'imtl': init_scales must map task names to positive scales, e.g. "
                               f"{{{self.tasks[0]}: 2.0}}, got {init_scales!r}")
        if method == "gradient":
            raise AutomtlError("scheduler 'imtl': init_scales needs learnable loss scales (method loss or hybrid); "
                               "IMTL-G (method gradient) has none")
        unknown = sorted(set(init_scales) - set(self.tasks))
        if unknown:
            raise AutomtlError(f"scheduler 'imtl': init_scales for unknown task(s) {unknown}; tasks are {self.tasks}")
        for t, v in init_scales.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < float("inf")):
                raise AutomtlError(f"scheduler 'imtl': init_scales.{t} must be a positive number, got {v!r}")
        return {t: float(v) for t, v in init_scales.items()}

    def _check_exclude(self, exclude: Any) -> list[str]:
        if exclude is None:
            return []
        if not isinstance(exclude, (list, tuple)) or not all(isinstance(t, str) for t in exclude):
            raise AutomtlError(f"scheduler 'imtl': exclude must be a list of task names, got {exclude!r}")
        unknown = sorted(set(exclude) - set(self.tasks))
        if unknown:
            raise AutomtlError(f"scheduler 'imtl': exclude names unknown task(s) {unknown}; tasks are {self.tasks}")
        if set(exclude) >= set(self.tasks):
            raise AutomtlError("scheduler 'imtl': exclude leaves no task to balance; use scheduler 'sum' instead")
        return list(exclude)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """IMTL-L's Adam over the loss scales s (none for IMTL-G)."""
        return {"imtl_loss_scale": self._scale_opt} if self._scale_opt is not None else {}

    # ------------------------------------------------------------ matrix form
    def weights(self, grads: torch.Tensor) -> torch.Tensor:
        """IMTL-G weights α [T] of the rows of ``grads`` [T, P] as given (|Σ α| = 1, in the dtype of ``grads``)."""
        return imtl_weights(grads).to(grads.dtype)

    def scales(self) -> torch.Tensor:
        """The current loss scales e^{s_t} [T] (ones for IMTL-G), detached."""
        if self.log_scale is None:
            return torch.ones(len(self.tasks))
        return self.log_scale.detach().exp()

    def combine(self, grads: torch.Tensor) -> torch.Tensor:
        """What a shared parameter gets from the raw task gradients ``grads`` [T, P] (rows in task order).

        ``gradient``: Σ α_t g_t; ``loss``: Σ e^{s_t} g_t; ``hybrid``: Σ α_t e^{s_t} g_t with α from the
        scaled rows e^{s_t} g_t.
        """
        if grads.dim() != 2 or grads.shape[0] != len(self.tasks):
            raise AutomtlError(f"IMTL.combine needs a [{len(self.tasks)}, P] matrix (one row per task), got shape "
                               f"{tuple(grads.shape)}")
        scaled = grads * self.scales().to(device=grads.device, dtype=grads.dtype)[:, None]
        if self.method == "loss":
            return scaled.sum(0)
        return (self.weights(scaled)[:, None] * scaled).sum(0)

    # ------------------------------------------------------------ training step
    def backward(self, losses: dict[str, torch.Tensor], ctx: StepContext | None = None) -> torch.Tensor:
        """Fill the gradients of the step's parameters (see the class docstring); step s for IMTL-L/hybrid.

        Returns Σ_t w_t L'_t detached, with L'_t the objective of task t (e^{s_t} L_t − s_t, or L_t for
        IMTL-G) and w = α when the step computed one, else 1, plus the excluded losses. Tasks missing from
        ``losses``, excluded or without gradients get a zero s-gradient and α = 0.
        """
        self._check_losses(losses)
        plain = [losses[t] for t in self.exclude if t in losses and losses[t].requires_grad]
        if plain:  # the excluded losses first, keeping the graph for the balanced part
            self._backward_plain(torch.stack([v.reshape(()) for v in plain]).sum(), ctx)
        names = [t for t in self.tasks if t in losses and t not in self.exclude and losses[t].requires_grad]
        extra = sum(float(v.detach()) for v in plain)
        if not names:
            self.last_weights = None
            self.last_scale_grad = None
            return torch.tensor(extra)
        index = [self.tasks.index(t) for t in names]
        raw = [losses[t] for t in names]
        device = raw[0].device
        if self.log_scale is not None:
            s = self.log_scale.detach()[index].to(device)
            factors = s.exp()
        else:
            s = torch.zeros(len(names), device=device)
            factors = torch.ones(len(names), device=device)
        level = self._resolve_level(ctx)
        if self.method == "loss":
            self._backward_sum(raw, factors, ctx)
            alpha = None
        elif level == "features":
            alpha = self._backward_features(raw, factors, ctx)  # type: ignore[arg-type]
        else:
            alpha = self._backward_params(raw, factors, ctx)
        self.last_weights = self._full(alpha, index) if alpha is not None else None
        values = torch.stack([loss.detach().reshape(()).to(factors.dtype) for loss in raw])
        if ctx is not None:  # the whole batch's losses: the scales' gradient is then the same on every rank
            values = ctx.mean_over_ranks(values)
        objective = values * factors - s if self.log_scale is not None else values
        if self.log_scale is not None:
            grad = torch.zeros_like(self.log_scale)
            grad[index] = (factors * values - 1).to(grad.device, grad.dtype)
            self.log_scale.grad = grad
            self.last_scale_grad = grad.clone()
            self._scale_opt.step()  # type: ignore[union-attr]
        w = alpha.to(objective.device, objective.dtype) if alpha is not None else torch.ones_like(objective)
        return (w * objective).sum() + extra

    def _backward_plain(self, total: torch.Tensor, ctx: StepContext | None) -> None:
        """Backward of ``total`` into the step's parameters it reaches, keeping the graph."""
        reached = {id(p) for p in autograd_leaves([total])}
        inputs = [p for p in trainable(ctx, [total]) if id(p) in reached]
        if inputs:
            total.backward(inputs=inputs, retain_graph=True)

    def _check_losses(self, losses: dict[str, torch.Tensor]) -> list[str]:
        if not isinstance(losses, dict) or not losses:
            raise AutomtlError("IMTL.backward needs a non-empty dict of task -> scalar loss")
        unknown = sorted(set(losses) - set(self.tasks))
        if unknown:
            raise AutomtlError(f"IMTL: losses for unknown task(s) {unknown}; the scheduler's tasks are {self.tasks}")
        for t, v in losses.items():
            if not isinstance(v, torch.Tensor) or v.numel() != 1:
                raise AutomtlError(f"IMTL: the loss of task '{t}' must be a scalar tensor")
        return [t for t in self.tasks if t in losses]

    def _resolve_level(self, ctx: StepContext | None) -> str:
        feature = ctx.feature if ctx is not None else None
        if self.level == "features" and feature is None:
            raise AutomtlError("scheduler 'imtl' with level 'features' needs the tensor all tasks share (the end of "
                               "the common trunk), but this step has none (soft or pretrain mode, or a policy "
                               "without a common trunk); use level 'params' (or 'auto'), or a model/stage with a "
                               "common trunk")
        if self.level == "params" or feature is None or not feature.requires_grad:
            return "params"
        return "features"

    def _full(self, alpha: torch.Tensor, index: list[int]) -> torch.Tensor:
        full = torch.zeros(len(self.tasks), dtype=alpha.dtype, device=alpha.device)
        full[index] = alpha
        return full

    def _backward_sum(self, losses: list[torch.Tensor], factors: torch.Tensor, ctx: StepContext | None) -> None:
        """One backward of Σ_t f_t L_t into the step's parameters."""
        terms = [f * loss.reshape(()) for f, loss in zip(factors, losses) if loss.requires_grad]
        if not terms:
            return
        total = torch.stack(terms).sum()
        if ctx is None:
            total.backward()
            return
        reached = {id(p) for p in autograd_leaves([total])}
        inputs = [p for p in trainable(ctx, losses) if id(p) in reached]
        if inputs:
            total.backward(inputs=inputs)

    def _backward_params(self, losses: list[torch.Tensor], factors: torch.Tensor,
                         ctx: StepContext | None) -> torch.Tensor | None:
        """Params level: α from the gradients of the parameters that two tasks or more train.

        The autograd graph says which parameters each task reaches; with none reached by two tasks the step
        is one backward of the sum. Otherwise each task gets one gradient pass, and a parameter counts as
        shared when two tasks give it a non-zero gradient (a task that reaches a parameter only through a
        stack of per-task tensors, like the soft-mode gates, gives it exact zeros).
        """
        params = trainable(ctx, losses)
        ids = {id(p) for p in params}
        reach = [{id(p) for p in autograd_leaves([loss])} & ids for loss in losses]
        if not any(a & b for i, a in enumerate(reach) for b in reach[i + 1:]):
            self._backward_sum(losses, factors, ctx)
            return None
        per_task: list[dict[int, torch.Tensor]] = []
        for loss, r in zip(losses, reach):
            inputs = [p for p in params if id(p) in r]
            grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True) if inputs else ()
            per_task.append({id(p): g for p, g in zip(inputs, grads) if g is not None})
        # The factors (loss scales) are folded into the Gram matrix and the coefficients, so that no scaled
        # copy of a gradient is made. A parameter is shared when two tasks give it a non-zero gradient,
        # read from the diagonal of its own Gram block (computed anyway) in one device-to-host copy.
        candidates = [p for p in params if sum(id(p) in g for g in per_task) >= 2]
        if ctx is not None and ctx.world > 1:
            self._mean_over_ranks(per_task, candidates, ctx)
        alpha = None
        coef = [float(f) for f in factors]
        shared_ids: set[int] = set()
        if candidates:
            n = len(losses)
            blocks = torch.zeros(len(candidates), n, n, dtype=torch.float64, device=candidates[0].device)
            for k, p in enumerate(candidates):  # dot products in the gradients' dtype, summed in float64
                flat = {t: g[id(p)].reshape(-1) for t, g in enumerate(per_task) if id(p) in g}
                for i, gi in flat.items():
                    for j, gj in flat.items():
                        if j >= i:
                            blocks[k, i, j] = torch.dot(gi, gj).to(torch.float64)
            blocks = blocks.cpu()
            used = (torch.diagonal(blocks, dim1=1, dim2=2) > 0).sum(1) >= 2
            shared_ids = {id(p) for p, u in zip(candidates, used.tolist()) if u}
            if shared_ids:
                gram = blocks[used].sum(0)
                gram = torch.triu(gram) + torch.triu(gram, 1).T
                f = factors.detach().to(torch.float64).cpu()
                alpha = _gram_weights(gram * f[:, None] * f[None, :]).to(factors.device)
                scaled = [float(alpha[t]) * coef[t] for t in range(n)]
        for p in params:
            weights = scaled if alpha is not None and id(p) in shared_ids else coef
            parts = [(weights[t], g[id(p)]) for t, g in enumerate(per_task) if id(p) in g]
            if not parts:
                continue
            total = parts[0][1]  # autograd.grad's fresh tensor: combined in place
            if parts[0][0] != 1.0:
                total.mul_(parts[0][0])
            for w, g in parts[1:]:
                total.add_(g, alpha=w)
            accumulate_grad(p, total)
        return alpha

    @staticmethod
    def _mean_over_ranks(per_task: list[dict[int, torch.Tensor]], params: list[nn.Parameter],
                         ctx: StepContext) -> None:
        """Replace each task's gradient of ``params`` by its mean over the ranks (one flat all-reduce): the
        gradient of the whole batch's mean loss, from which every rank computes the same α and update."""
        keys = [(t, id(p)) for p in params for t, g in enumerate(per_task) if id(p) in g]
        if not keys:
            return
        grads = [per_task[t][k] for t, k in keys]
        flat = ctx.mean_over_ranks(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for (t, k), g in zip(keys, grads):
            per_task[t][k] = flat[offset:offset + g.numel()].view_as(g).to(g.dtype, copy=True)
            offset += g.numel()

    def _backward_features(self, losses: list[torch.Tensor], factors: torch.Tensor,
                           ctx: StepContext) -> torch.Tensor:
        """Features level: α from the batch-summed gradients w.r.t. the shared tensor z."""
        z = ctx.feature
        assert z is not None
        params = trainable(ctx, losses)
        trunk_ids = {id(p) for p in autograd_leaves([z])}
        trunk = [p for p in params if id(p) in trunk_ids]
        after = [p for p in params if id(p) not in trunk_ids]
        after_ids = {id(p) for p in after}
        stop = z.grad_fn
        z_grads: list[torch.Tensor] = []
        own: dict[int, list[torch.Tensor]] = {}
        for loss, f in zip(losses, factors):
            reached = {id(p) for p in autograd_leaves([loss], stop=stop)} & after_ids
            inputs = [p for p in after if id(p) in reached]
            if loss.requires_grad:
                grads = torch.autograd.grad(loss, [z, *inputs], retain_graph=True, allow_unused=True)
            else:
                grads = (None,) * (1 + len(inputs))
            gz = grads[0]
            z_grads.append((gz * f.to(gz.dtype)) if gz is not None else torch.zeros_like(z))
            for p, g in zip(inputs, grads[1:]):
                if g is not None:
                    own.setdefault(id(p), []).append(g * f.to(g.dtype))
        stacked = torch.stack(z_grads)
        rows = stacked.sum(1) if z.dim() > 0 else stacked
        rows = ctx.mean_over_ranks(rows)  # Σ over the whole batch of ∂(its mean loss)/∂z
        alpha = imtl_weights(rows.reshape(len(losses), -1))
        weights = alpha.to(device=stacked.device, dtype=stacked.dtype).reshape(-1, *([1] * z.dim()))
        combined = (weights * stacked).sum(0)
        if trunk:
            z.backward(combined, inputs=trunk)
        for p in after:
            if id(p) in own:
                accumulate_grad(p, sum(own[id(p)]))  # type: ignore[arg-type]
        return alpha
