"""Every aggregator of torchjd (Jacobian descent, https://github.com/TorchJD/torchjd) as a combiner.

``scheduler: {name: torchjd, aggregator: UPGrad, level: auto, ...options}`` builds
``torchjd.aggregation.<aggregator>(**options)`` (UPGrad, MGDA, PCGrad, CAGrad, NashMTL, DualProj, GradDrop,
IMTLG, AlignedMTL, ConFIG, ...) and lets it turn the step's task Jacobian into the update. torchjd is an
optional extra: ``pip install 'automtl-compiler[torchjd]'``.
"""

from __future__ import annotations

import importlib
import inspect
import typing
from typing import Any

import torch
from torch import nn

from ...errors import AutomtlError
from .base import Combiner, StepContext
from .functional import accumulate_grad, autograd_leaves, trainable

LEVELS = ("auto", "features", "params")
#: torchjd's abstract bases, which cannot be built by name
ABSTRACT = ("Aggregator", "WeightedAggregator", "GramianWeightedAggregator", "Weighting")
#: weightings that need the Jacobians of two independent batches per step, which a combiner does not get
TWO_BATCHES = ("MoDoWeighting", "SDMGradWeighting")
MISSING = ("scheduler 'torchjd' needs the torchjd package; install it with pip install "
           "'automtl-compiler[torchjd]' (or pip install 'torchjd[full]>=0.18')")


def _aggregation() -> Any:
    try:
        return importlib.import_module("torchjd.aggregation")
    except ImportError:
        raise AutomtlError(MISSING) from None


def _solvable(matrix: torch.Tensor) -> torch.Tensor:
    """``matrix`` in a dtype torchjd's solvers take: bf16/fp16 (gradients under autocast) become float32;
    float32 and float64 stay as they are."""
    return matrix if matrix.dtype in (torch.float32, torch.float64) else matrix.float()


def aggregator_names() -> list[str]:
    """The classes of ``torchjd.aggregation`` a config may name: aggregators and weightings (a weighting is
    wrapped into the aggregator that applies its weights)."""
    agg = _aggregation()
    names = []
    for name in dir(agg):
        cls = getattr(agg, name)
        if (isinstance(cls, type) and name not in ABSTRACT + TWO_BATCHES and not inspect.isabstract(cls)
                and issubclass(cls, (agg.Aggregator, agg.Weighting))):
            names.append(name)
    return sorted(names)


def _is_gramian_weighting(weighting: Any) -> bool:
    """Whether a torchjd weighting takes the Gramian (else the matrix itself); a wrapper such as
    CRMOGMWeighting takes what the weighting it wraps takes."""
    bases = {c.__name__ for c in type(weighting).__mro__}
    if "_GramianWeighting" in bases or "_MatrixWeighting" in bases:
        return "_GramianWeighting" in bases
    inner = getattr(weighting, "weighting", None)
    return inner is not None and _is_gramian_weighting(inner)


def build_aggregator(name: Any, options: dict[str, Any], tasks: int) -> Any:
    """``torchjd.aggregation.<name>(**options)`` as an aggregator (a weighting is wrapped). Lists become
    tensors where the option is a tensor; ``n_tasks`` defaults to the number of tasks; an option that takes
    a weighting may name one (``UPGradWeighting``) or give ``{name: ..., <options>}``."""
    agg = _aggregation()
    valid = aggregator_names()
    if name in TWO_BATCHES:
        raise AutomtlError(f"scheduler 'torchjd': {name} needs the Jacobians of two independent batches per step, "
                           f"which a per-step scheduler does not have; use one of {', '.join(valid)}")
    if not isinstance(name, str) or name not in valid:
        raise AutomtlError(f"scheduler 'torchjd': unknown aggregator {name!r}; use one of {', '.join(valid)}")
    cls = getattr(agg, name)
    signature = inspect.signature(cls)
    hints = typing.get_type_hints(cls.__init__) if cls.__init__ is not object.__init__ else {}
    kwargs = dict(options)
    if "n_tasks" in signature.parameters and "n_tasks" not in kwargs:
        kwargs["n_tasks"] = tasks
    for key, value in list(kwargs.items()):
        hint = str(hints.get(key, signature.parameters[key].annotation if key in signature.parameters else ""))
        if "Tensor" in hint and isinstance(value, (list, tuple, int, float)) and not isinstance(value, bool):
            kwargs[key] = torch.as_tensor(value, dtype=torch.get_default_dtype())
        elif "Weighting" in hint and isinstance(value, (str, dict)):
            inner = dict(value) if isinstance(value, dict) else {"name": value}
            kwargs[key] = _weighting(inner.pop("name", None), inner, tasks)
    try:
        signature.bind(**kwargs)
    except TypeError:
        allowed = [p for p in signature.parameters if p != "self"]
        raise AutomtlError(f"scheduler 'torchjd': aggregator {name} takes options {allowed or 'none'}, got "
                           f"{sorted(options)}") from None
    try:
        built = cls(**kwargs)
    except (TypeError, ValueError, ImportError) as e:
        raise AutomtlError(f"scheduler 'torchjd': aggregator {name} rejects options {options} ({e})") from None
    if isinstance(built, agg.Weighting):
        return agg.GramianWeightedAggregator(built) if _is_gramian_weighting(built) else agg.WeightedAggregator(built)
    return built


def _weighting(name: Any, options: dict[str, Any], tasks: int) -> Any:
    names = [n for n in aggregator_names() if n.endswith("Weighting")]
    if name not in names:
        raise AutomtlError(f"scheduler 'torchjd': an inner weighting must be one of {', '.join(names)}, got {name!r}")
    built = build_aggregator(name, options, tasks)
    return built.weighting if hasattr(built, "weighting") else built.gramian_weighting


class TorchJD(Combiner):
    """A torchjd aggregator A: the step's update is A(J) for the task Jacobian J (rows in task order).

    **Where J is taken** (``level``):

    * ``features``: J is the [T, numel(z)] matrix of the tasks' gradients w.r.t. the tensor z all tasks
      share (``StepContext.feature``; the whole tensor, batch included, since A returns a direction in z's
      space rather than task weights); the trunk (every parameter z depends on) gets the backward of A(J)
      through z - one backward through the trunk - and each parameter after z the sum of its tasks'
      gradients. This is torchjd's ``mtl_backward`` with z as the shared parameter: T backward passes
      through the heads only.
    * ``params``: per-task gradients of every parameter the step trains (one backward pass per task).
      The parameters that two tasks or more give a non-zero gradient are shared: their gradients are
      concatenated into one J (zero where a task does not reach a parameter) and get A(J), as torchjd's
      ``backward`` + ``jac_to_grad`` over them; a parameter one task reaches gets that task's gradient.
      For an all-share model this is torchjd's ``mtl_backward`` with the trunk as shared parameters.
    * ``auto``: ``features`` when the step has a z that requires gradients, else ``params``.

    Losses that do not require gradients are left out of J (a row of zeros would only confuse the
    aggregators that normalise rows). Aggregators with internal state (NashMTL, GradVac, PCD, ExcessMTL,
    MoDo, SDMGrad, CR-MOGM) keep it in memory only: a run resumed from a checkpoint starts it afresh.
    """

    def __init__(self, tasks: list[str], aggregator: str = "UPGrad", level: str = "auto", **options: Any) -> None:
        super().__init__(tasks)
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise AutomtlError(f"scheduler 'torchjd' needs distinct task names, got {self.tasks}")
        if level not in LEVELS:
            raise AutomtlError(f"scheduler 'torchjd': unknown level {level!r}; use one of {', '.join(LEVELS)}")
        self.level = level
        self.aggregator_name = aggregator
        self.aggregator: nn.Module = build_aggregator(aggregator, options, len(self.tasks))

    def combine(self, grads: torch.Tensor) -> torch.Tensor:
        """A(J) for a [T, P] matrix of task gradients (rows in ``self.tasks`` order), computed in float32 (the
        gradients w.r.t. z are bf16 under bf16 autocast)."""
        if grads.dim() != 2 or grads.shape[0] != len(self.tasks):
            raise AutomtlError(f"TorchJD.combine needs a [{len(self.tasks)}, P] matrix (one row per task), got shape "
                               f"{tuple(grads.shape)}")
        return self.aggregator(_solvable(grads)).to(grads.dtype)

    def backward(self, losses: dict[str, torch.Tensor], ctx: StepContext | None = None) -> torch.Tensor:
        """Fill the gradients of the step's parameters with the aggregation (see the class docstring);
        returns the plain sum of the losses, detached."""
        unknown = sorted(set(losses) - set(self.tasks))
        if unknown:
            raise AutomtlError(f"torchjd: losses for unknown task(s) {unknown}; the scheduler's tasks are {self.tasks}")
        live = [losses[t].reshape(()) for t in self.tasks if t in losses and losses[t].requires_grad]
        total = sum(float(v.detach()) for v in losses.values())
        if not live:
            return torch.tensor(total)
        feature = ctx.feature if ctx is not None else None
        if self.level == "features" and feature is None:
            raise AutomtlError("scheduler 'torchjd' with level 'features' needs the tensor all tasks share (the end "
                               "of the common trunk), but this step has none; use level 'params' (or 'auto')")
        if self.level != "params" and feature is not None and feature.requires_grad:
            self._backward_features(live, feature, ctx)
        else:
            self._backward_params(live, ctx)
        return torch.tensor(total)

    def _backward_features(self, losses: list[torch.Tensor], z: torch.Tensor, ctx: StepContext | None) -> None:
        params = trainable(ctx, losses)
        trunk_ids = {id(p) for p in autograd_leaves([z])}
        trunk = [p for p in params if id(p) in trunk_ids]
        after = [p for p in params if id(p) not in trunk_ids]
        rows: list[torch.Tensor] = []
        own: dict[int, torch.Tensor] = {}
        for loss in losses:
            gz, *gh = torch.autograd.grad(loss, [z, *after], retain_graph=True, allow_unused=True)
            rows.append(torch.zeros_like(z).reshape(-1) if gz is None else gz.reshape(-1))
            for p, g in zip(after, gh):
                if g is not None:
                    own[id(p)] = own[id(p)] + g if id(p) in own else g
        combined = self.aggregator(_solvable(torch.stack(rows))).reshape(z.shape).to(z.dtype)
        if trunk:
            z.backward(combined, inputs=trunk)
        for p in after:
            if id(p) in own:
                accumulate_grad(p, own[id(p)])

    def _backward_params(self, losses: list[torch.Tensor], ctx: StepContext | None) -> None:
        params = trainable(ctx, losses)
        per_task: list[list[torch.Tensor | None]] = []
        for i, loss in enumerate(losses):
            reached = {id(p) for p in autograd_leaves([loss])}
            inputs = [p for p in params if id(p) in reached]
            grads = iter(torch.autograd.grad(loss, inputs, retain_graph=i + 1 < len(losses), allow_unused=True)
                         if inputs else ())
            per_task.append([next(grads) if id(p) in reached else None for p in params])
        shared: list[int] = []
        for k, p in enumerate(params):
            given = [g for g in (row[k] for row in per_task) if g is not None and bool(g.any())]
            if len(given) >= 2:
                shared.append(k)
            else:
                parts = [row[k] for row in per_task if row[k] is not None]
                if parts:
                    accumulate_grad(p, sum(parts[1:], parts[0]))  # type: ignore[arg-type]
        if not shared:
            return
        jac = torch.stack([torch.cat([(row[k] if row[k] is not None else torch.zeros_like(params[k])).reshape(-1)
                                      for k in shared]) for row in per_task])
        combined = self.aggregator(jac)
        offset = 0
        for k in shared:
            p = params[k]
            accumulate_grad(p, combined[offset:offset + p.numel()].reshape(p.shape))
            offset += p.numel()


