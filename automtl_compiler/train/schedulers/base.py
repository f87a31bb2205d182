"""The two interfaces every gradient scheduler implements.

* :class:`Combiner` - a per-step scheduler: it sees one step's task losses and fills the ``.grad`` of the
  parameters the step trains (the weighted sum, IMTL). It may use a tensor every task consumes
  (``StepContext.feature``) where the model has one: per-task gradients w.r.t. it are far cheaper than
  w.r.t. the shared parameters.
* :class:`MetaScheduler` - owns a span of the training loop (K steps): it gets the model, the stage's
  optimiser, the deterministic batches and the loss function, as Meta-GF and TMT need.

Both are ``nn.Module`` so that learnable scheduler state (IMTL-L's loss scales, TMT's controller, Meta-GF's
meta-weights) is saved in checkpoints with the model; ``optimizers()`` names the scheduler's own optimisers
so that their moments are checkpointed too.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

Batch = tuple[torch.Tensor, dict[str, torch.Tensor]]


@dataclass
class StepContext:
    """What a per-step combiner may use beyond the losses.

    ``params`` are the parameters the step trains (its optimiser's); ``feature`` is a tensor that every task
    consumes and that every path from the input to a task output passes through (the end of the common
    trunk), or None when the model has none in this mode.

    Across processes each rank sees its own part of the batch: ``reduce(t)`` returns the sum of ``t`` over the
    ``world`` ranks (``t`` itself on one process), so that a combiner that is not linear in the gradients
    (IMTL) can compute its weights from the whole batch's quantities, the same on every rank. The trainer
    averages the ``.grad`` the combiner fills over the ranks afterwards.
    """

    params: list[nn.Parameter]
    feature: torch.Tensor | None = None
    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    world: int = 1

    def mean_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of ``t`` over the ranks (``t`` on one process): a whole-batch mean from per-rank means."""
        return t if self.world == 1 else self.reduce(t) / self.world


@dataclass
class SpanContext:
    """What a meta scheduler gets to run the steps ``start .. start + steps - 1`` of a stage.

    * ``forward(x, tasks=None, feature=False)``: the stage's forward (its mode and policy) -> task -> output;
      with ``feature=True`` it returns ``(outputs, z)`` with ``z`` as in :class:`StepContext` (or None).
    * ``batch(step)``: the stage's batch for a step (all targets), deterministic in the step.
    * ``task_batch(task, step)``: a batch that carries labels of ``task`` (for per-task data, e.g. TMT's
      limited-label setting); by default the same as ``batch``.
    * ``loss(outputs, targets)``: task -> scalar loss.
    * ``seed(step)``: call before a step's forward so dropout and noise are reproducible on resume.
    * ``epoch``: how many batches make one pass over the stage's training data (None when unknown), for
      a scheduler that works in passes (Meta-GF's meta phase).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]
    forward: Callable[..., Any]
    batch: Callable[[int], Batch]
    loss: Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    start: int
    steps: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    task_batch: Callable[[str, int], Batch] | None = None
    seed: Callable[[int], None] = lambda step: None
    check: Callable[[dict[str, torch.Tensor], int], None] = lambda losses, step: None
    epoch: int | None = None

    def batch_for(self, task: str, step: int) -> Batch:
        """A batch with labels of ``task`` for ``step``."""
        return self.task_batch(task, step) if self.task_batch is not None else self.batch(step)


class Scheduler(nn.Module, ABC):
    """What every scheduler has: its tasks, its own optimisers, and what it needs from the model."""

    #: True when the scheduler cannot work without ``StepContext.feature`` / ``forward(feature=True)``
    needs_feature: bool = False
    #: the trainer stages it can run in; validation rejects any other
    stages: tuple[str, ...] = ("pretrain", "policy", "posttrain")
    #: True when multiplying every loss by one factor multiplies the gradients it leaves by that factor
    #: (so fp16's loss scaling, undone before the optimiser step, does not change the update)
    scales_losses: bool = False

    def __init__(self, tasks: list[str]) -> None:
        super().__init__()
        self.tasks = list(tasks)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The scheduler's own optimisers by name (checkpointed with the trainer's)."""
        return {}

    def prepare(self, params: list[nn.Parameter], feature_shape: tuple[int, ...] | None) -> None:
        """Create per-stage state for training ``params`` (called once per stage, before a checkpoint's
        scheduler state is restored); ``feature_shape`` is the shape of the common trunk's end, or None."""


class Combiner(Scheduler):
    """Turns a step's per-task losses into gradients on the model's parameters."""

    @abstractmethod
    def backward(self, losses: dict[str, torch.Tensor], ctx: StepContext | None = None) -> torch.Tensor:
        """Fill ``.grad`` of ``ctx.params`` from ``losses`` (task -> scalar); return the optimised loss.

        Called after the optimiser's ``zero_grad``; the trainer calls ``optimizer.step()`` next. A combiner
        with learnable state steps its own optimisers here.
        """

    @abstractmethod
    def combine(self, grads: torch.Tensor) -> torch.Tensor:
        """Combine a [T, P] matrix of task gradients (rows in ``self.tasks`` order) into one [P] vector."""


class MetaScheduler(Scheduler):
    """Owns spans of the loop: ``run_span`` trains ``ctx.steps`` steps and leaves the model updated."""
    stages = ("pretrain", "posttrain")

    def __init__(self, tasks: list[str], span: int = 100) -> None:
        super().__init__(tasks)
        if span < 1:
            raise ValueError(f"span must be at least 1 step, got {span}")
        self.span = int(span)

    @abstractmethod
    def run_span(self, ctx: SpanContext) -> dict[str, float]:
        """Train steps ``ctx.start .. ctx.start + ctx.steps - 1``; return per-task mean losses (for logs)."""
