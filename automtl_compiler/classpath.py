"""Classes named by ``package.module:Class`` paths, for user code named in configs and on command lines.

Importing a module runs its code, so only callers acting on the user's own words (a config, a command
line, a Python call) resolve class paths; paths recorded in model files are resolved only with the
caller's consent (``trust_code``). Every failure is a one-line :class:`AutomtlError` naming the path.
"""

from __future__ import annotations

import importlib
import inspect
import re

from .errors import AutomtlError


class UntrustedCodeError(AutomtlError):
    """A file names code (a ``package.module:Class``) and the caller did not consent to importing it."""


_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_CLASS_PATH = re.compile(rf"^{_IDENT}(\.{_IDENT})*:{_IDENT}(\.{_IDENT})*$")


def is_class_path(name: str) -> bool:
    """True when ``name`` is meant as a class path (it contains ``:``), as opposed to a registered name."""
    return isinstance(name, str) and ":" in name


def class_path_of(cls: type) -> str:
    """The ``package.module:Class`` path of ``cls``."""
    return f"{cls.__module__}:{cls.__qualname__}"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def load_class(path: str, base: type, what: str, base_name: str | None = None) -> type:
    """Import ``package.module:Class`` and return the class, which must subclass ``base``.

    ``what`` names the role in messages (e.g. "task type", "head"), ``base_name`` the base class. Syntax errors, import failures (any
    exception the module raises while importing), a missing attribute, a non-class or a class outside
    ``base`` are AutomtlErrors naming ``path``.
    """
    if not isinstance(path, str) or not _CLASS_PATH.match(path):
        raise AutomtlError(f"{what} {path!r} is not a class path; write it as package.module:Class")
    module_name, _, qualname = path.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - the module's own code may raise anything while it is imported
        raise AutomtlError(f"{what} {path}: cannot import module '{module_name}' ({type(e).__name__}: "
                           f"{_one_line(e)}); check the path and that the module is installed or on "
                           "PYTHONPATH") from None
    for part in qualname.split("."):
        if not hasattr(obj, part):
            raise AutomtlError(f"{what} {path}: module '{module_name}' has no attribute '{qualname}'; check the "
                               "class name")
        obj = getattr(obj, part)
    if not inspect.isclass(obj) or not issubclass(obj, base):
        raise AutomtlError(f"{what} {path} is not a subclass of {base_name or class_path_of(base)}; name a class "
                           f"derived from {base.__qualname__}")
    return obj


def construct(cls: type, name: str, what: str, **kwargs: object) -> object:
    """``cls(**kwargs)``; an abstract class or a TypeError/ValueError is an AutomtlError naming ``name``."""
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(getattr(cls, "__abstractmethods__", ())))
        raise AutomtlError(f"{what} {name} is abstract (it does not define {missing}); implement them")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise AutomtlError(f"{what} {name}: bad arguments {sorted(kwargs)} ({_one_line(e)}); check them against "
                           f"the constructor of {class_path_of(cls)}") from None
