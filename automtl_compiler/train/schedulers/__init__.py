"""Gradient schedulers: how the task losses of a step become the gradients of the shared weights.

A registry maps names to classes; ``create(name, tasks=..., **options)`` builds one. Two kinds exist
(see :mod:`.base`): per-step :class:`Combiner` s (``sum``, ``imtl``, ``torchjd``) and :class:`MetaScheduler` s that own
spans of the loop (``metagf``, ``tmt``). Others join with :func:`register`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from ...errors import AutomtlError
from ...registry import Registry
from .base import Combiner, MetaScheduler, Scheduler, SpanContext, StepContext
from .weighted_sum import WeightedSum

S = TypeVar("S", bound=type[Scheduler])


def _check_scheduler(name: str, cls: object) -> None:
    if not (isinstance(cls, type) and issubclass(cls, (Combiner, MetaScheduler))):
        raise AutomtlError(f"scheduler '{name}': {cls!r} is not a Combiner or MetaScheduler subclass")


#: name -> scheduler class; the built-ins other than ``sum`` are imported when first used
REGISTRY: Registry[type[Scheduler]] = Registry("scheduler", caller="schedulers.register", check=_check_scheduler)
REGISTRY.register("sum", WeightedSum, builtin=True)
REGISTRY.register_lazy("imtl", f"{__name__}.imtl:IMTL")
REGISTRY.register_lazy("metagf", f"{__name__}.metagf:MetaGF")
REGISTRY.register_lazy("tmt", f"{__name__}.tmt:TMT")
REGISTRY.register_lazy("torchjd", f"{__name__}.jd:TorchJD")


def register(name: str, cls: S | None = None, *, replace: bool = False) -> S | Callable[[S], S]:
    """Make ``cls`` available to configs as ``scheduler: {name: <name>, ...}``; also a class decorator.

    A name already registered for another class (built-ins included) needs ``replace=True``.
    """
    return REGISTRY.register(name, cls, replace=replace)


def scheduler_class(name: str) -> type[Scheduler]:
    """The class registered as ``name``; unknown names are a clear error."""
    return REGISTRY.lookup(name)


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
