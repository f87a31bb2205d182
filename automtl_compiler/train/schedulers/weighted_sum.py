"""The weighted sum of task losses: L = Σ_t λ_t L_t (static weights, 1 by default)."""

from __future__ import annotations

import torch

from ...errors import AutomtlError
from .base import Combiner, StepContext


class WeightedSum(Combiner):
    """Static per-task weights λ_t; the default scheduler, and AutoMTL's."""

    scales_losses = True  # linear in the losses

    def __init__(self, tasks: list[str], weights: dict[str, float] | None = None) -> None:
        super().__init__(tasks)
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(tasks))
        if unknown:
            raise AutomtlError(f"scheduler 'sum': weights for unknown task(s) {unknown}; tasks are {tasks}")
        self.weights = {t: float(weights.get(t, 1.0)) for t in tasks}

    def total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """Σ_t λ_t L_t."""
        return sum(self.weights[t] * losses[t] for t in losses)  # type: ignore[return-value]

    def backward(self, losses: dict[str, torch.Tensor], ctx: StepContext | None = None) -> torch.Tensor:
        loss = self.total(losses)
        loss.backward()
        return loss

    def combine(self, grads: torch.Tensor) -> torch.Tensor:
        w = torch.tensor([self.weights[t] for t in self.tasks], dtype=grads.dtype, device=grads.device)
        return (w[:, None] * grads).sum(0)
