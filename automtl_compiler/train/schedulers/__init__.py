"""Gradient schedulers: how the task losses of a step become the gradients of the shared weights.

A registry maps names to classes; ``create(name, tasks=..., **options)`` builds one. Two kinds exist
(see :mod:`.base`): per-step :class:`Combiner` s (``sum``, ``imtl``, ``torchjd``) and :class:`MetaScheduler` s that own
spans of the loop (``metagf``, ``tmt``). Others join with :func:`register`.
"""

from __future__ import annotations

import importlib
from typing import Any

from ...errors import AutomtlError
from .base import Combiner, MetaScheduler, Scheduler, SpanContext, StepContext
from .weighted_sum import WeightedSum

#: name -> class, or "module:Class" inside this package (imported when first used)
REGISTRY: dict[str, type[Scheduler] | str] = {"sum": WeightedSum, "imtl": "imtl:IMTL", "metagf": "metagf:MetaGF",
                                              "tmt": "tmt:TMT", "torchjd": "jd:TorchJD"}


def register(name: str, cls: type[Scheduler]) -> None:
    """Make ``cls`` available to configs as ``scheduler: {name: <name>, ...}``."""
    if not (isinstance(cls, type) and issubclass(cls, (Combiner, MetaScheduler))):
        raise AutomtlError(f"scheduler '{name}': {cls!r} is not a Combiner or MetaScheduler subclass")
    REGISTRY[name] = cls


def scheduler_class(name: str) -> type[Scheduler]:
    """The class registered as ``name``; unknown names are a clear error."""
    if name not in REGISTRY:
        raise AutomtlError(f"unknown scheduler '{name}'; available: {', '.join(sorted(REGISTRY))}")
    entry = REGISTRY[name]
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = REGISTRY[name] = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    return entry


def create(name: str, tasks: list[str], **options: Any) -> Scheduler:
    """Build the scheduler called ``name`` for ``tasks``; unknown names and bad options are clear errors."""
    cls = scheduler_class(name)
    try:
        return cls(tasks, **options)
    except (TypeError, ValueError) as e:
        raise AutomtlError(f"scheduler '{name}': bad options {sorted(options)} ({e})") from None


__all__ = [
    "REGISTRY",
    "Combiner",
    "MetaScheduler",
    "Scheduler",
    "SpanContext",
    "StepContext",
    "WeightedSum",
    "create",
    "register",
    "scheduler_class",
]
