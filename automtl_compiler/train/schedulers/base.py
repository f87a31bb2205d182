"""The per-step combiner interface every gradient scheduler implements."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Combiner(ABC):
    """Turns a step's per-task losses into gradients on the model's parameters."""

    def __init__(self, tasks: list[str]) -> None:
        self.tasks = list(tasks)

    @abstractmethod
    def backward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """Fill the parameters' ``.grad`` from ``losses`` (task -> scalar); return the optimised loss."""

    @abstractmethod
    def combine(self, grads: torch.Tensor) -> torch.Tensor:
        """Combine a [T, P] matrix of task gradients (rows in ``self.tasks`` order) into one [P] vector."""
