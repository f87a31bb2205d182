"""Gradient schedulers: how the task losses of a step become the gradients of the shared weights.

A registry maps names to classes; ``create(name, tasks=..., **options)`` builds one. Per-step combiners
implement ``backward(losses)`` (fill ``.grad`` and return the loss they optimised) and ``combine(grads)``
on a plain [T, P] matrix of task gradients (for tests and references).
"""

from __future__ import annotations

from typing import Any

from ...errors import AutomtlError
from .base import Combiner
from .weighted_sum import WeightedSum

REGISTRY: dict[str, type[Combiner]] = {"sum": WeightedSum}


def create(name: str, tasks: list[str], **options: Any) -> Combiner:
    """Build the scheduler called ``name`` for ``tasks``; unknown names and options are clear errors."""
    if name not in REGISTRY:
        raise AutomtlError(f"unknown scheduler '{name}'; available: {', '.join(sorted(REGISTRY))}")
    try:
        return REGISTRY[name](tasks, **options)
    except TypeError as e:
        raise AutomtlError(f"scheduler '{name}': bad options {sorted(options)} ({e})") from None


__all__ = ["Combiner", "REGISTRY", "WeightedSum", "create"]
