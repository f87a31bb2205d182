"""The task-type registry: built-in kinds, aliases, kinds registered at run time, and class paths.

A task type is named by a registered kind (``segment_semantic``, ``depth``, a name given to
:func:`register_task`) or by a ``package.module:Class`` path to a :class:`TaskType` subclass, which is
imported on use (configs and Python calls name code; model files never do).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar, overload

from ..classpath import construct, is_class_path, load_class
from ..errors import AutomtlError
from ..registry import Registry
from .base import TaskType
from .classification import Classification
from .depth import DepthZBuffer
from .normal import Normal
from .segmentation import SegmentSemantic

T = TypeVar("T", bound=type[TaskType])


def _check_task_class(name: str, cls: object) -> None:
    if not isinstance(cls, type) or not issubclass(cls, TaskType):
        raise AutomtlError(f"register_task({name!r}, ...): {cls!r} is not a TaskType subclass; derive the class "
                           "from automtl_compiler.tasks.TaskType")


#: kind -> TaskType subclass, built-ins and those registered with :func:`register_task`
TASK_TYPES: Registry[type[TaskType]] = Registry(
    "task kind", caller="register_task", check=_check_task_class, builtins_final=True,
    hint=" (or name a TaskType subclass as package.module:Class, or register one with register_task)")
TASK_TYPES.register(SegmentSemantic.kind, SegmentSemantic, builtin=True)
TASK_TYPES.register(DepthZBuffer.kind, DepthZBuffer, aliases=["depth"], builtin=True)
TASK_TYPES.register(Normal.kind, Normal, builtin=True)
TASK_TYPES.register(Classification.kind, Classification, builtin=True)
#: alias -> kind (read-only, live)
ALIASES: Mapping[str, str] = TASK_TYPES.aliases


def canonical_kind(kind: str) -> str:
    """The registry name of ``kind`` (resolving aliases such as ``depth``); AutomtlError when unknown."""
    return TASK_TYPES.canonical(kind)


def available_tasks() -> list[str]:
    """The canonical task kinds (built-in and registered), sorted."""
    return TASK_TYPES.names()


@overload
def register_task(name: str, cls: None = None, *, replace: bool = False) -> Callable[[T], T]: ...


@overload
def register_task(name: str, cls: T, *, replace: bool = False) -> T: ...


def register_task(name: str, cls: T | None = None, *, replace: bool = False) -> T | Callable[[T], T]:
    """Make the TaskType subclass ``cls`` available as ``get_task(name)`` (and in configs as ``type: name``).

    Also a class decorator: ``@register_task("keypoints")``. The built-in kinds and aliases cannot be
    replaced; a name already registered for another class needs ``replace=True`` (registering the same
    class again, e.g. after a module reload, is fine). Returns the class.
    """
    return TASK_TYPES.register(name, cls, replace=replace)


def task_class(type_name: str) -> type[TaskType]:
    """The TaskType subclass named by a kind, alias, registered name or ``package.module:Class`` path."""
    if is_class_path(type_name):
        return load_class(type_name, TaskType, "task type", "automtl_compiler.tasks.TaskType")
    return TASK_TYPES.lookup(type_name)


def get_task(type_name: str, /, **options: object) -> TaskType:
    """A task type by kind, alias, registered name or ``package.module:Class``, built with ``options``.

    Options are the class's constructor arguments (e.g. ``num_classes``, ``ignore_index``, ``resize``).
    Raises AutomtlError for an unknown kind (listing the known ones), a class path that cannot be
    imported or does not name a TaskType subclass, or options the class does not take.
    """
    cls = task_class(type_name)
    task = construct(cls, type_name, "task type", **options)
    if not isinstance(getattr(task, "metric_directions", None), dict):
        raise AutomtlError(f"task type {type_name} has no metric_directions dict (metric name -> True when higher "
                           "is better); define it on the class")
    return task  # type: ignore[return-value]
