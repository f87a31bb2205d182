"""Meta-GF: meta-learned fusion of per-task weight updates (Sun, Li, Xu, ECCV 2022, multi-task version).

Each span of K steps starts from the weights θ0. A *task phase* per task t trains the network from θ0
for K steps on L_t + a·Σ_{j≠t} L_j (the span's batches, the stage's optimiser) and records the
displacement Δ_t = θ_t − θ0. The displacements are then fused per parameter tensor p over the tasks that
reach p (whose own loss has a gradient path to p, found once per stage on its first batch):

    θ(w)_p = θ0_p + Σ_t σ(w_{t,p})·Δ_{t,p} / (Σ_t σ(w_{t,p}) + 1e-10)

with one meta-weight per output×input channel of a conv (broadcast over the kernel), per out×in entry of
a 2-D weight and per channel of a 1-D parameter. A *meta phase* fits w with Adam to Σ_t L_t at θ(w)
(first order: the Δ are constants), one Adam step per batch; the model ends at the θ(w) of the last meta
batch's forward (w before that batch's step, as in the authors' loop) and the meta-weights' EMA is
updated: EMA ← ema·EMA + (1 − ema)·w (w starts every span from the EMA, zero at first).

By default a span is the authors' loop (SYVAE/MetaGF, ``MetaGFgrad_ECCV_multitask.py`` with
``model_segnet_mt_ECCV.py``):

* ``phase_state: sequential`` - only the *parameters* go back to θ0 between task phases: the stage
  optimiser's moments and the batch-norm buffers carry on from one phase to the next (task 2's phase
  starts with the moments and running statistics task 1's phase ended with).
* ``bn_stats: meta`` - the meta phase's forwards run the fused network in training mode on the model's
  own buffers, so the running statistics after a span are those of the fused network (carried on from
  the last task phase through every meta batch).
* ``learn_linear: false`` - the meta-weights of 2-D weights (``Linear`` layers) stay at 0: those
  parameters get the plain mean of the displacements.
* ``meta_batches: null`` - the meta phase is one full pass over the training data
  (``SpanContext.epoch`` batches from the span's start; the span's length when the pass is unknown).

The variants, kept as options because each fixes something the authors' loop leaves open:

* ``phase_state: reset`` - every phase also starts from θ0's optimiser state and buffers (snapshots
  taken at the span's start); after the span the optimiser holds the mean of the phases' states (floating
  tensors averaged, step counters the maximum) and the buffers are θ0's plus the mean of the phases'
  changes (integer buffers the maximum). The phases then no longer depend on the order of the tasks,
  and the averaged moments describe the fused step.
* ``bn_stats: phases`` - the meta phase runs on scratch copies of the buffers, so the statistics after
  a span are those the phases left (their mean with ``phase_state: reset``): the meta phase's few batches
  at weights that change every batch do not overwrite them.
* ``learn_linear: true`` - 2-D weights get learned meta-weights like every other parameter.
* ``meta_batches: N`` - a bounded meta phase reusing the span's own batches ``start + (j mod K)`` for
  j < N (0 skips meta-learning and fuses with the EMA weights): the meta phase then costs N
  forward/backward passes instead of a pass over the data.

Parameters that no task reaches (unused branches) stay at θ0.

The meta phase calls the stage's forward through ``torch.func.functional_call`` with θ(w) substituted
for the parameters: no copy of the model per batch. Beyond the model, a span holds θ0, the reached
displacements (with ``phase_state: reset`` also θ0's optimiser state and buffers and a running sum of the
phases'), and the meta-weights with their EMA and Adam moments; each meta batch frees its graph.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...errors import AutomtlError
from .base import MetaScheduler, SpanContext
from .functional import call_with

EPS = 1e-10
_COUNTERS = ("step",)
PHASE_STATES = ("sequential", "reset")
BN_STATS = ("meta", "phases")


def meta_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    """The shape of one task's meta-weights for a parameter of ``shape``: out×in channels for weights of
    two or more dimensions (broadcast over the kernel), one per entry for 1-D and scalar parameters."""
    shape = tuple(shape)
    if len(shape) >= 2:
        return shape[:2] + (1,) * (len(shape) - 2)
    return shape


class _BufferList(nn.Module):
    """Numbered buffers (so that they land in ``state_dict`` as ``<name>.<i>``)."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        super().__init__()
        for i, t in enumerate(tensors):
            self.register_buffer(str(i), t)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self._buffers[str(i)]  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self._buffers)


class _Combine(torch.autograd.Function):
    """θ = θ0 + Σ_t a_t·Δ_t with a_t broadcast over Δ_t, differentiable in the a_t only.

    Written out because autograd's version of the same expression keeps several weight-sized temporaries
    per task; this one makes one output tensor and, backwards, one weight-sized product per task reduced
    straight to a_t's shape. The Δ_t are constants (Meta-GF is first order).
    """

    @staticmethod
    def forward(ctx: Any, start: torch.Tensor, count: int, *args: torch.Tensor) -> torch.Tensor:
        coefs, deltas = args[:count], args[count:]
        out = start.clone()
        for a, d in zip(coefs, deltas):
            out.addcmul_(a.to(out.dtype), d)
        ctx.save_for_backward(*deltas)
        ctx.shapes = [a.shape for a in coefs]
        ctx.dtypes = [a.dtype for a in coefs]
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        deltas = ctx.saved_tensors
        grads = [(grad * d).sum_to_size(shape).to(dtype) for d, shape, dtype in zip(deltas, ctx.shapes, ctx.dtypes)]
        return (None, None, *grads, *(None for _ in deltas))


class MetaGF(MetaScheduler):
    """Meta-GF: per-task phases from shared start weights, fused with meta-learned per-channel weights.

    ``aux_weight`` is a (the weight of the other tasks' losses in a task phase), ``meta_lr`` the meta
    Adam's learning rate, ``meta_batches`` the meta phase's batches per span (None: a full pass over the
    training data), ``ema`` the decay of the meta-weights' moving average, ``phase_state``
    (``sequential`` | ``reset``), ``bn_stats`` (``meta`` | ``phases``) and ``learn_linear`` choose between
    the authors' loop and the variants (see the module docstring). A span costs T·K + meta-batch
    forward/backward passes.
    """

    def __init__(self, tasks: list[str], span: int = 100, aux_weight: float = 0.1, meta_lr: float = 0.1,
                 meta_batches: int | None = None, ema: float = 0.9, phase_state: str = "sequential",
                 bn_stats: str = "meta", learn_linear: bool = False) -> None:
        super().__init__(tasks, span)
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise AutomtlError(f"scheduler 'metagf' needs distinct task names, got {self.tasks}")
        if aux_weight < 0:
            raise AutomtlError(f"scheduler 'metagf': aux_weight must be >= 0, got {aux_weight}")
        if meta_lr < 0:
            raise AutomtlError(f"scheduler 'metagf': meta_lr must be >= 0, got {meta_lr}")
        if meta_batches is not None and (isinstance(meta_batches, bool) or int(meta_batches) != meta_batches
                                         or meta_batches < 0):
            raise AutomtlError(f"scheduler 'metagf': meta_batches must be a whole number >= 0 (or null for a "
                               f"full pass over the training data), got {meta_batches}")
        if not 0.0 <= ema <= 1.0:
            raise AutomtlError(f"scheduler 'metagf': ema must be in [0, 1], got {ema}")
        if phase_state not in PHASE_STATES:
            raise AutomtlError(f"scheduler 'metagf': phase_state must be one of {', '.join(PHASE_STATES)}, got "
                               f"{phase_state!r}")
        if bn_stats not in BN_STATS:
            raise AutomtlError(f"scheduler 'metagf': bn_stats must be one of {', '.join(BN_STATS)}, got {bn_stats!r}")
        if not isinstance(learn_linear, bool):
            raise AutomtlError(f"scheduler 'metagf': learn_linear must be true or false, got {learn_linear!r}")
        self.aux_weight = float(aux_weight)
        self.meta_lr = float(meta_lr)
        self.meta_batches = None if meta_batches is None else int(meta_batches)
        self.ema = float(ema)
        self.phase_state = phase_state
        self.bn_stats = bn_stats
        self.learn_linear = learn_linear
        self.weights = nn.ModuleList()
        self.ema_weights = nn.ModuleList()
        self.register_buffer("reach", torch.zeros(0, 0, dtype=torch.bool))
        self.register_buffer("reach_known", torch.tensor(False))
        self._meta_opt: torch.optim.Adam | None = None
        self._param_ids: list[int] | None = None

    # ------------------------------------------------------------ state
    def prepare(self, params: list[nn.Parameter], feature_shape: tuple[int, ...] | None = None) -> None:
        """Create the meta-weights (zero), their EMA and their Adam for the stage's ``params``.

        Called once per stage before its spans (and before a checkpoint restores the state); the set of
        tasks that reach each parameter is found on the stage's first span. ``feature_shape`` is unused.
        Without ``learn_linear`` the meta-weights of 2-D parameters are frozen (not in the Adam).
        """
        params = list(params)
        if not params:
            raise AutomtlError("scheduler 'metagf': the stage trains no parameters")
        self.weights = nn.ModuleList(
            nn.ParameterList(nn.Parameter(torch.zeros(meta_shape(p.shape), device=p.device, dtype=_dtype(p)),
                                          requires_grad=self.learn_linear or p.dim() != 2) for p in params)
            for _ in self.tasks)
        self.ema_weights = nn.ModuleList(
            _BufferList([torch.zeros(meta_shape(p.shape), device=p.device, dtype=_dtype(p)) for p in params])
            for _ in self.tasks)
        device = params[0].device
        self.register_buffer("reach", torch.zeros(len(self.tasks), len(params), dtype=torch.bool, device=device))
        self.register_buffer("reach_known", torch.tensor(False, device=device))
        learned = [w for w in self.weights.parameters() if w.requires_grad]
        self._meta_opt = torch.optim.Adam(learned or [nn.Parameter(torch.zeros(0))], lr=self.meta_lr)
        self._param_ids = [id(p) for p in params]

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The meta-weights' Adam (after :meth:`prepare`)."""
        return {} if self._meta_opt is None else {"metagf": self._meta_opt}

    def fuse(self, theta0: list[torch.Tensor], deltas: list[list[torch.Tensor | None]]) -> list[torch.Tensor | None]:
        """θ(w) for each parameter from its start value and the tasks' displacements (``deltas[t][p]``,
        None where task t does not reach p); None for a parameter that no task reaches.

        Differentiable in the meta-weights ``self.weights``.
        """
        fused: list[torch.Tensor | None] = []
        for i, start in enumerate(theta0):
            tasks = [ti for ti in range(len(self.tasks)) if deltas[ti][i] is not None]
            if not tasks:
                fused.append(None)
                continue
            gates = [torch.sigmoid(self.weights[ti][i]) for ti in tasks]
            total = gates[0] if len(gates) == 1 else torch.stack(gates).sum(0)
            coefs = [g / (total + EPS) for g in gates]  # small tensors: ordinary autograd
            fused.append(_Combine.apply(start, len(coefs), *coefs, *(deltas[ti][i] for ti in tasks)))
        return fused

    # ------------------------------------------------------------ the span
    def run_span(self, ctx: SpanContext) -> dict[str, float]:
        """Task phases from θ0, meta phase, fusion; leaves the model at θ(w). Returns each task's mean
        loss over every step of every task phase."""
        params = list(ctx.params)
        if self._param_ids is None:
            self.prepare(params, None)
        if [id(p) for p in params] != self._param_ids:
            raise AutomtlError("scheduler 'metagf': the span trains other parameters than prepare() was given; "
                               "call prepare() with the stage's parameters before its spans")
        if ctx.steps < 1:
            raise AutomtlError(f"scheduler 'metagf': a span needs at least 1 step, got {ctx.steps}")
        model, opt = ctx.model, ctx.optimizer
        names = self._names(model, params)
        trainable = [p for p in params if p.requires_grad]
        theta0 = [p.detach().clone() for p in params]
        reset = self.phase_state == "reset"
        buffers0 = {n: b.detach().clone() for n, b in model.named_buffers()} if reset else {}
        opt0 = _copy_state(opt.state) if reset else {}
        if not bool(self.reach_known):
            self._find_reach(ctx, params)
        reach = self.reach.tolist()

        deltas: list[list[torch.Tensor | None]] = [[None] * len(params) for _ in self.tasks]
        buffer_sum: dict[str, torch.Tensor] = {}
        opt_sum: dict[Any, dict[str, Any]] = {}
        opt_count: dict[Any, int] = {}
        totals = {t: 0.0 for t in self.tasks}
        for ti, task in enumerate(self.tasks):
            _set(params, theta0)
            if reset:
                self._restore(model, buffers0, opt, opt0)
            for i in range(ctx.steps):
                step = ctx.start + i
                x, targets = ctx.batch(step)
                ctx.seed(step)
                losses = self._losses(ctx, ctx.forward(x), targets, step)
                total = losses[task]
                if self.aux_weight > 0:
                    total = total + self.aux_weight * sum(losses[t] for t in self.tasks if t != task)
                opt.zero_grad(set_to_none=True)
                if total.requires_grad:
                    total.backward(inputs=trainable)
                opt.step()
                for t in self.tasks:
                    totals[t] += float(losses[t].detach())
                del losses, total
            with torch.no_grad():
                for pi, p in enumerate(params):
                    if reach[ti][pi]:
                        deltas[ti][pi] = p.detach() - theta0[pi]
                if reset:
                    for n, b in model.named_buffers():
                        _add_buffer(buffer_sum, n, b, buffers0[n])
            if reset:
                _add_state(opt_sum, opt_count, opt.state)
        opt.zero_grad(set_to_none=True)
        _set(params, theta0)
        if reset:
            del opt0
            with torch.no_grad():
                for n, b in model.named_buffers():
                    if n in buffer_sum:
                        b.copy_(_mean_buffer(buffer_sum[n], buffers0[n], len(self.tasks)))
            del buffer_sum, buffers0
            _set_mean_state(opt, opt_sum, opt_count)
            del opt_sum

        final = self._meta_phase(ctx, names, theta0, deltas)
        with torch.no_grad():
            for p, value in zip(params, final):
                if value is not None:
                    p.copy_(value)
            for w_task, ema_task in zip(self.weights, self.ema_weights):
                for i, w in enumerate(w_task):
                    ema_task[i].mul_(self.ema).add_(w, alpha=1.0 - self.ema)
        count = ctx.steps * len(self.tasks)
        return {t: totals[t] / count for t in self.tasks}

    def meta_schedule(self, ctx: SpanContext) -> list[int]:
        """The steps whose batches the span's meta phase uses, in order (see the module docstring)."""
        if self.meta_batches is None:
            return [ctx.start + j for j in range(ctx.epoch or ctx.steps)]
        return [ctx.start + j % ctx.steps for j in range(self.meta_batches)]

    def _meta_phase(self, ctx: SpanContext, names: list[str], theta0: list[torch.Tensor],
                    deltas: list[list[torch.Tensor | None]]) -> list[torch.Tensor | None]:
        """Fit w to Σ_t L_t at θ(w), one Adam step per batch of :meth:`meta_schedule` (w starts at the EMA);
        returns the fused weights of the last forward (the EMA's fusion when there is no meta batch)."""
        assert self._meta_opt is not None
        with torch.no_grad():
            for w_task, ema_task in zip(self.weights, self.ema_weights):
                for i, w in enumerate(w_task):
                    w.copy_(ema_task[i])
        schedule = self.meta_schedule(ctx)
        if not schedule:
            with torch.no_grad():
                return self.fuse(theta0, deltas)
        scratch = ({n: b.detach().clone() for n, b in ctx.model.named_buffers()}
                   if self.bn_stats == "phases" else {})
        meta_params = [w for w in self.weights.parameters() if w.requires_grad]
        last: list[torch.Tensor | None] = []
        for step in schedule:
            x, targets = ctx.batch(step)
            fused = self.fuse(theta0, deltas)
            last = [None if v is None else v.detach() for v in fused]
            substitute = {n: v for n, v in zip(names, fused) if v is not None}
            substitute.update(scratch)
            ctx.seed(step)
            outputs = call_with(ctx.model, substitute, ctx.forward, x)
            losses = self._losses(ctx, outputs, targets, step)
            total = sum(losses[t] for t in self.tasks)
            self._meta_opt.zero_grad(set_to_none=True)
            if meta_params and isinstance(total, torch.Tensor) and total.requires_grad:
                total.backward(inputs=meta_params)
            self._meta_opt.step()
            del fused, substitute, outputs, losses, total
        self._meta_opt.zero_grad(set_to_none=True)
        return last

    # ------------------------------------------------------------ helpers
    def _losses(self, ctx: SpanContext, outputs: Any, targets: dict[str, torch.Tensor],
                step: int) -> dict[str, torch.Tensor]:
        losses = ctx.loss(outputs, targets)
        missing = [t for t in self.tasks if t not in losses]
        if missing:
            raise AutomtlError(f"scheduler 'metagf': the step's losses have no {missing} (it trains {self.tasks})")
        ctx.check(losses, step)
        return losses

    def _find_reach(self, ctx: SpanContext, params: list[nn.Parameter]) -> None:
        """Mark which parameters each task's own loss has a gradient path to (on the span's first batch);
        the probe's forward leaves the model's buffers as they were."""
        x, targets = ctx.batch(ctx.start)
        ctx.seed(ctx.start)
        scratch = {n: b.detach().clone() for n, b in ctx.model.named_buffers()}
        losses = self._losses(ctx, call_with(ctx.model, scratch, ctx.forward, x), targets, ctx.start)
        trainable = [i for i, p in enumerate(params) if p.requires_grad]
        reach = torch.zeros(len(self.tasks), len(params), dtype=torch.bool)
        for ti, task in enumerate(self.tasks):
            loss = losses[task]
            if not loss.requires_grad or not trainable:
                continue
            grads = torch.autograd.grad(loss, [params[i] for i in trainable], retain_graph=True, allow_unused=True)
            for i, g in zip(trainable, grads):
                reach[ti, i] = g is not None
        self.reach.copy_(reach)
        self.reach_known.fill_(True)

    @staticmethod
    def _names(model: nn.Module, params: list[nn.Parameter]) -> list[str]:
        by_id: dict[int, str] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            by_id.setdefault(id(p), n)
        missing = [i for i, p in enumerate(params) if id(p) not in by_id]
        if missing:
            raise AutomtlError(f"scheduler 'metagf': {len(missing)} trained parameter(s) are not parameters of "
                               "the span's model")
        return [by_id[id(p)] for p in params]

    @staticmethod
    def _restore(model: nn.Module, buffers0: dict[str, torch.Tensor], opt: torch.optim.Optimizer,
                 opt0: dict[Any, dict[str, Any]]) -> None:
        """Put the buffers and the optimiser state back to the span's start (``phase_state: reset``)."""
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(buffers0[n])
        opt.state.clear()
        for p, entries in _copy_state(opt0).items():
            opt.state[p] = entries


def _set(params: list[nn.Parameter], values: list[torch.Tensor]) -> None:
    """Copy ``values`` into ``params`` (no autograd)."""
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)


def _copy_state(state: Any) -> dict[Any, dict[str, Any]]:
    """A copy of an optimiser's per-parameter state (tensors cloned)."""
    return {p: {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in entries.items()}
            for p, entries in state.items()}


def _add_buffer(acc: dict[str, torch.Tensor], name: str, value: torch.Tensor, start: torch.Tensor) -> None:
    """Accumulate a phase's buffer: the sum of its changes if floating, else the maximum."""
    if value.is_floating_point():
        change = value.detach() - start
        acc[name] = change if name not in acc else acc[name].add_(change)
    else:
        acc[name] = value.detach().clone() if name not in acc else torch.maximum(acc[name], value.detach())


def _mean_buffer(acc: torch.Tensor, start: torch.Tensor, phases: int) -> torch.Tensor:
    return start + acc / phases if acc.is_floating_point() else acc


def _add_state(acc: dict[Any, dict[str, Any]], count: dict[Any, int], state: Any) -> None:
    """Accumulate a phase's optimiser state: sums of floating tensors, maxima of step counters."""
    for p, entries in state.items():
        slot = acc.setdefault(p, {})
        count[p] = count.get(p, 0) + 1
        for k, v in entries.items():
            if k in _COUNTERS:
                value = v.detach().clone() if torch.is_tensor(v) else v
                slot[k] = value if k not in slot else (
                    torch.maximum(slot[k], value) if torch.is_tensor(value) else max(slot[k], value))
            elif torch.is_tensor(v) and v.is_floating_point():
                slot[k] = v.detach().clone() if k not in slot else slot[k].add_(v)
            else:
                slot[k] = v.detach().clone() if torch.is_tensor(v) else v


def _set_mean_state(opt: torch.optim.Optimizer, acc: dict[Any, dict[str, Any]], count: dict[Any, int]) -> None:
    opt.state.clear()
    for p, entries in acc.items():
        opt.state[p] = {k: v.div_(count[p]) if k not in _COUNTERS and torch.is_tensor(v) and v.is_floating_point()
                        else v for k, v in entries.items()}


def _dtype(param: torch.Tensor) -> torch.dtype:
    """Meta-weights take the dtype of a floating parameter (the default dtype for any other)."""
    return param.dtype if param.is_floating_point() else torch.get_default_dtype()
