"""The dataset registry: names (and ``package.module:Class`` paths) -> dataset constructors with their defaults.

:func:`get_dataset` builds a dataset from a name, a split, the task list and the options of that dataset
alone: each registered dataset keeps its own defaults, options are checked against its constructor's
signature (an unknown one is an error listing those it accepts), and ``root``/``tasks`` are passed only to
constructors that take them.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ..errors import AutomtlError
from ..registry import Registry

TaskSpec = Mapping[str, str] | Sequence[str]
ENTRY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
_FIXED = ("root", "split", "tasks")


@dataclass(frozen=True)
class DatasetEntry:
    """One registered dataset: how to build it and which options it gets unless the caller gives them."""

    name: str
    factory: Callable[..., Dataset]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    tasks_as: str = "mapping"
    builtin: bool = False

    def signature(self) -> tuple[dict[str, inspect.Parameter], bool]:
        """The constructor's named parameters and whether it takes ``**kwargs`` (all of them if unknown)."""
        try:
            params = inspect.signature(self.factory).parameters
        except (TypeError, ValueError):
            return {}, True
        named = {k: p for k, p in params.items()
                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        return named, any(p.kind == p.VAR_KEYWORD for p in params.values())

    def accepted_options(self) -> list[str]:
        """The option names the constructor takes (besides ``root``, ``split`` and ``tasks``)."""
        named, _ = self.signature()
        return sorted(k for k in named if k not in _FIXED)


def _check_entry(name: str, entry: object) -> None:
    if not isinstance(entry, DatasetEntry) or not callable(entry.factory):
        factory = getattr(entry, "factory", entry)
        raise AutomtlError(f"register_dataset: {name!r} needs a Dataset class or factory, got "
                           f"{type(factory).__name__}")


#: dataset name (case-insensitive) -> how to build it, the built-ins and those added with register_dataset
DATASETS: Registry[DatasetEntry] = Registry(
    "dataset", caller="register_dataset", check=_check_entry, fold_case=True,
    hint=" (or give a package.module:Class path to your own Dataset)")


def register_dataset(name: str, cls_or_factory: Callable[..., Dataset], defaults: Mapping[str, Any] | None = None,
                     *, tasks_as: str = "mapping", replace: bool = False) -> None:
    """Make ``get_dataset(name, ...)`` build ``cls_or_factory(root=..., split=..., [tasks=...], **options)``.

    ``defaults`` are options used when the caller does not give them (copied per call, so nothing leaks
    between calls or datasets). ``tasks_as`` says how a constructor with a ``tasks`` parameter receives the
    tasks: ``"mapping"`` (``{task name: kind}``) or ``"names"`` (a list; the names must then be the kinds).
    Re-registering a name is an error unless ``replace``.
    """
    if tasks_as not in ("mapping", "names"):
        raise AutomtlError(f"register_dataset: tasks_as must be 'mapping' or 'names', got {tasks_as!r}")
    entry = DatasetEntry(name.lower() if isinstance(name, str) else name, cls_or_factory, dict(defaults or {}),
                         tasks_as)
    if callable(cls_or_factory):
        _check_options(entry, entry.defaults, f"dataset {name!r} (registered defaults)")
    DATASETS.register(name, entry, replace=replace)


def _register_builtin(name: str, cls: Callable[..., Dataset], tasks_as: str) -> None:
    DATASETS.register(name, DatasetEntry(name, cls, {}, tasks_as, builtin=True), builtin=True)


def available_datasets() -> list[str]:
    """The registry's dataset names."""
    return DATASETS.names()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _import_entry(text: str) -> DatasetEntry:
    """The user's ``package.module:Class`` (a Dataset subclass, or a function returning a Dataset)."""
    if not ENTRY.fullmatch(text):
        raise AutomtlError(f"dataset {text!r}: not a dataset name ({', '.join(available_datasets())}) nor a "
                           "package.module:Class path")
    module_name, _, attr = text.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - the user's module: report any failure in one line
        raise AutomtlError(f"dataset {text!r}: cannot import {module_name} ({type(exc).__name__}: {_one_line(exc)}); "
                           "is it on PYTHONPATH?") from None
    obj = getattr(module, attr, None)
    if obj is None:
        raise AutomtlError(f"dataset {text!r}: module {module_name} has no attribute {attr}")
    if inspect.isclass(obj):
        if not issubclass(obj, Dataset):
            raise AutomtlError(f"dataset {text!r}: {attr} is not a torch.utils.data.Dataset subclass")
    elif not callable(obj):
        raise AutomtlError(f"dataset {text!r}: {attr} is a {type(obj).__name__}, not a Dataset class or factory")
    return DatasetEntry(text, obj, {}, "mapping")


def _check_options(entry: DatasetEntry, options: Mapping[str, Any], label: str) -> None:
    named, var_kw = entry.signature()
    if var_kw:
        return
    unknown = sorted(k for k in options if k not in named or k in _FIXED)
    if unknown:
        accepted = entry.accepted_options()
        raise AutomtlError(f"{label}: bad options {unknown}; it accepts "
                           f"{', '.join(accepted) if accepted else 'no options'}")


def _tasks_arg(entry: DatasetEntry, tasks: TaskSpec) -> list[str] | dict[str, str]:
    """``tasks`` in the form ``entry`` takes; for name-keyed readers each name must be its kind."""
    from ..tasks import ALIASES

    if isinstance(tasks, str):
        tasks = [tasks]
    if isinstance(tasks, Mapping):
        mapping = dict(tasks)
    else:
        mapping = {t: t for t in tasks}
    for name, kind in mapping.items():
        if not isinstance(name, str) or not isinstance(kind, str):
            raise AutomtlError(f"dataset {entry.name!r}: tasks must map task names to kinds (strings), got "
                               f"{name!r}: {kind!r}")
    if entry.tasks_as == "mapping":
        return mapping
    for name, kind in mapping.items():
        if ALIASES.get(name, name) != ALIASES.get(kind, kind):
            raise AutomtlError(f"dataset {entry.name!r} names its targets by task kind: task {name!r} of kind "
                               f"{kind!r} must be called {ALIASES.get(kind, kind)!r}")
    return list(mapping)


def get_dataset(name: str, root: str | Path | None = None, split: str = "train", tasks: TaskSpec | None = None,
                **options: Any) -> Dataset:
    """A dataset by registered name (``synthetic``, ``nyuv2``, ``cityscapes``, ``taskonomy``, ``folder``, or
    one added with :func:`register_dataset`) or by ``package.module:Class`` path to the user's own
    ``torch.utils.data.Dataset`` subclass (or a function returning one).

    The constructor is called as ``Class(root=root, split=split, tasks=tasks, **options)``: ``root`` only
    when given, ``tasks`` only when given and the constructor has a ``tasks`` parameter (as the mapping
    ``{task name: kind}``; as a list of names for the built-in nyuv2/cityscapes/taskonomy/synthetic
    readers), ``options`` on top of the dataset's registered defaults and to this dataset alone.

    Raises AutomtlError (one line) for an unknown name, a path that does not import or is not a Dataset,
    a ``root`` missing (a dataset read from disk) or superfluous (synthetic), an option the constructor
    does not take (listing those it does), and any exception of the user's constructor; FileFormatError for
    a directory that does not hold the expected layout.
    """
    entry = _import_entry(name) if ":" in name else DATASETS.lookup(name)
    label = f"dataset {entry.name!r}"
    named, var_kw = entry.signature()
    merged = {**copy.deepcopy(dict(entry.defaults)), **options}
    _check_options(entry, merged, label)

    kwargs: dict[str, Any] = {}
    if root is not None:
        if "root" not in named and not var_kw:
            what = "rendered, not read from disk" if entry.name == "synthetic" else "not read from a directory"
            raise AutomtlError(f"{label} is {what} (its constructor takes no root): give no root")
        kwargs["root"] = root
    elif "root" in named and named["root"].default is inspect.Parameter.empty:
        raise AutomtlError(f"{label} is read from disk: give root=<directory> (dataset.root in a config; see "
                           f"{getattr(entry.factory, '__module__', 'its module')} for the layout)")
    if "split" not in named and not var_kw:
        raise AutomtlError(f"{label}: its constructor takes no split parameter; get_dataset calls it as "
                           f"{getattr(entry.factory, '__name__', 'Class')}(root=..., split=..., **options)")
    kwargs["split"] = split
    if tasks is not None and "tasks" in named:
        kwargs["tasks"] = _tasks_arg(entry, tasks)
    kwargs.update(merged)

    factory_name = getattr(entry.factory, "__name__", entry.name)
    try:
        dataset = entry.factory(**kwargs)
    except AutomtlError:
        raise
    except (TypeError, ValueError) as exc:
        if entry.builtin:
            raise AutomtlError(f"{label}: bad options {sorted(merged)}: {_one_line(exc)}") from None
        raise AutomtlError(f"{label}: {factory_name}(split={split!r}, ...) raised {type(exc).__name__}: "
                           f"{_one_line(exc)}") from None
    except Exception as exc:  # the constructor of a user class: report any failure in one line
        if entry.builtin:
            raise
        raise AutomtlError(f"{label}: {factory_name}(split={split!r}, ...) raised {type(exc).__name__}: "
                           f"{_one_line(exc)}") from None
    if not isinstance(dataset, Dataset):
        raise AutomtlError(f"{label}: {factory_name}(...) returned a {type(dataset).__name__}, not a "
                           "torch.utils.data.Dataset")
    return dataset
