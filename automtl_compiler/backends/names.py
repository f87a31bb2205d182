"""Attribute names for generated modules: one rule for every code generator.

IR node names are free text (Caffe layers are called ``inc/1x1``, ONNX nodes ``/layer1/Conv``), but a
generated module holds each node's module under a Python attribute, and state-dict keys are those
attributes joined by dots. :func:`module_name` turns a node name into a candidate attribute:

1. NFKC-normalise it (Python reads identifiers in NFKC form, so ``ﬁ`` *is* the attribute ``fi``);
2. replace each character that cannot continue an identifier (``/``, ``.``, ``-``, spaces, ...) by ``_``;
3. prefix ``n_`` when the result is empty, starts with a digit or is a Python keyword;
4. append ``_`` when it names an attribute of ``torch.fx.GraphModule``, ``nn.ModuleDict`` or
   ``nn.ParameterDict`` (``forward``, ``training``, ``_modules``, ``state_dict``, ``keys``, ...).

A :class:`Namer` makes the candidates unique within one module: names are handed out in the order they
are asked for (code generators ask in topological order), and a candidate already taken gets ``_``
appended until it is free. The first node keeps its candidate, so a name that is already a valid,
unique attribute is kept as it is; ``Namer.mapping`` records node name -> attribute.
"""

from __future__ import annotations

import functools
import keyword
import re
import unicodedata

from torch import fx, nn

from ..errors import AutomtlError

_CONTAINERS = (fx.GraphModule, nn.ModuleDict, nn.ParameterDict)


@functools.cache
def _instance_attributes(containers: tuple[type, ...]) -> frozenset[str]:
    """Attributes that instances of ``containers`` set in ``__init__`` (``training``, ``_modules``, ``meta``...)."""
    names: set[str] = set()
    for cls in containers:
        instance = cls(nn.Module(), fx.Graph()) if cls is fx.GraphModule else cls()
        names |= set(vars(instance))
    return frozenset(names)


def is_reserved(name: str, containers: tuple[type, ...] = _CONTAINERS) -> bool:
    """True when ``name`` is an attribute (class or instance) of one of ``containers``."""
    return name in _instance_attributes(containers) or any(hasattr(cls, name) for cls in containers)


def _identifier(text: str) -> str:
    """Steps 1-3 of the rule: an NFKC-normal, non-keyword identifier."""
    name = re.sub(r"\W", "_", unicodedata.normalize("NFKC", text))
    name = "".join(c if ("_" + c).isidentifier() else "_" for c in name)
    if unicodedata.normalize("NFKC", name) != name:
        name = "".join(c if c.isascii() else f"u{ord(c):04x}" for c in name)
    if not name.isidentifier() or keyword.iskeyword(name):
        name = "n_" + name
    return name


def module_name(node_name: str) -> str:
    """The candidate attribute for a node's module (unique only within a :class:`Namer`)."""
    name = _identifier(node_name)
    if is_reserved(name):
        name += "_"
    return name


class Namer:
    """Gives each node name one attribute name, unique within one generated module."""

    def __init__(self, taken: tuple[str, ...] = ()) -> None:
        self.mapping: dict[str, str] = {}
        self._taken = set(taken)

    def __call__(self, node_name: str) -> str:
        """The attribute for ``node_name`` (the same one every time it is asked)."""
        if node_name not in self.mapping:
            name = module_name(node_name)
            while name in self._taken or is_reserved(name):
                name += "_"
            self._taken.add(name)
            self.mapping[node_name] = name
        return self.mapping[node_name]


_TASK_CONTAINERS = (nn.ModuleDict, nn.ParameterDict)


def check_task_name(task: object) -> str:
    """A task name must be usable as a module key and an attribute as written; else an AutomtlError."""
    if not isinstance(task, str) or not task.isidentifier():
        raise AutomtlError(f"task name {task!r} must be a non-empty identifier (letters, digits, _; no '.' or "
                           "spaces); rename the task")
    if unicodedata.normalize("NFKC", task) != task:
        raise AutomtlError(f"task name {task!r} is not in Unicode NFKC form (Python reads it as "
                           f"{unicodedata.normalize('NFKC', task)!r}); rename the task")
    if keyword.iskeyword(task):
        raise AutomtlError(f"task name {task!r} is a Python keyword; rename the task (e.g. '{task}_task')")
    if is_reserved(task, _TASK_CONTAINERS):
        raise AutomtlError(f"task name {task!r} clashes with a torch attribute (nn.Module/nn.ModuleDict); "
                           f"rename the task (e.g. '{task}_task')")
    return task


__all__ = ["Namer", "check_task_name", "is_reserved", "module_name"]
