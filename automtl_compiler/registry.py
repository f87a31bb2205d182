"""One registry idiom for everything looked up by name: IR ops, schedulers, task types, datasets, heads.

A :class:`Registry` maps plain names (and optional aliases) to entries. ``register`` works as a call and
as a decorator; registering a taken name for another entry is an error unless ``replace=True``; looking up
an unknown name raises an :class:`~automtl_compiler.errors.AutomtlError` that names the kind, suggests
close matches and lists the known names. Entries of our own modules may be registered lazily, as
``"automtl_compiler.module:attr"`` strings imported on first use, and a registry may name *plugin* modules
that register entries when imported (so that the module holding the registry need not import them, which
would be a cycle). Nothing here imports a module named by a user or a file.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Generic, TypeVar, overload

from .errors import AutomtlError

T = TypeVar("T")
E = TypeVar("E")
PACKAGE = __name__.partition(".")[0]


@dataclass(frozen=True)
class _Lazy:
    """An entry still to be imported: ``module:attr`` inside this package."""

    target: str


def _own_module(module: str) -> bool:
    return module == PACKAGE or module.startswith(PACKAGE + ".")


def _describe(entry: object) -> str:
    if isinstance(entry, _Lazy):
        return entry.target
    module, name = getattr(entry, "__module__", None), getattr(entry, "__qualname__", None)
    return f"{module}:{name}" if isinstance(module, str) and isinstance(name, str) else type(entry).__name__


def _same(old: object, new: object) -> bool:
    """The same entry: one object, or a class or function of one ``module:qualname`` (a reloaded module)."""
    if old is new:
        return True
    both_named = all(isinstance(e, type) or callable(e) and hasattr(e, "__qualname__") for e in (old, new))
    return both_named and not isinstance(old, _Lazy) and _describe(old) == _describe(new)


class Registry(Mapping[str, T], Generic[T]):
    """Names -> entries of one kind (``"scheduler"``, ``"op"``...), with aliases and clear errors.

    As a mapping it holds the canonical names (iteration, ``len``, ``keys``); ``registry[name]``,
    ``name in registry`` and :meth:`lookup` also accept aliases. ``check(name, entry)`` validates every
    entry (raising AutomtlError); ``fold_case`` makes names case-insensitive; entries registered with
    ``builtin=True`` cannot be replaced when ``builtins_final``; ``hint`` ends the unknown-name message
    (e.g. how else to name one); ``error`` is the class of the errors raised; ``caller`` names the
    registering function in messages; ``plugins`` are modules of this package that register entries,
    imported before the registry is first read.
    """

    def __init__(self, kind: str, *, caller: str | None = None, check: Callable[[str, Any], None] | None = None,
                 fold_case: bool = False, builtins_final: bool = False, hint: str = "",
                 error: type[AutomtlError] = AutomtlError, plugins: Sequence[str] = ()) -> None:
        for module in plugins:
            if not _own_module(module):
                raise ValueError(f"{kind} registry: plugin {module!r} is not a module of {PACKAGE}")
        self.kind = kind
        self.caller = caller or f"register_{kind.split()[0]}"
        self.error = error
        self._check = check
        self._fold_case = fold_case
        self._builtins_final = builtins_final
        self._hint = hint
        self._plugins = list(plugins)
        self._entries: dict[str, T | _Lazy] = {}
        self._aliases: dict[str, str] = {}
        self._builtins: set[str] = set()

    # ------------------------------------------------------------------ registering

    def _key(self, name: str) -> str:
        return name.lower() if self._fold_case else name

    def _check_name(self, name: object) -> str:
        if not isinstance(name, str) or not name or ":" in name or any(c.isspace() for c in name):
            raise self.error(f"{self.caller}: {name!r} is not a {self.kind} name; use a plain name without ':' "
                             "(which marks a package.module:Class path) or spaces")
        return self._key(name)

    def _claim(self, key: str, entry: object, replace: bool) -> None:
        """Refuse ``key`` when a built-in or another entry holds it (unless ``replace``)."""
        if key in self._builtins and self._builtins_final:
            raise self.error(f"{self.caller}: {key!r} is a built-in name; choose another name")
        if key in self._aliases:
            if not replace:
                raise self.error(f"{self.caller}: {key!r} is already an alias of {self._aliases[key]!r}; pass "
                                 "replace=True to replace it")
            del self._aliases[key]
        old = self._entries.get(key)
        if old is not None and not replace and not _same(old, entry):
            raise self.error(f"{self.caller}: {key!r} is already registered ({_describe(old)}); pass "
                             "replace=True to replace it")

    def _add(self, name: str, entry: T | _Lazy, replace: bool, aliases: Iterable[str], builtin: bool) -> None:
        key = self._check_name(name)
        alias_keys = [self._check_name(a) for a in aliases]
        if not isinstance(entry, _Lazy) and self._check is not None:
            self._check(name, entry)
        self._claim(key, entry, replace)
        for alias in alias_keys:
            if alias in self._entries or (alias in self._aliases and self._aliases[alias] != key and not replace):
                raise self.error(f"{self.caller}: alias {alias!r} of {key!r} is already taken")
        self._entries[key] = entry
        self._aliases.update(dict.fromkeys(alias_keys, key))
        if builtin:
            self._builtins.update([key, *alias_keys])
        else:
            self._builtins.discard(key)

    @overload
    def register(self, name: str, entry: None = None, *, replace: bool = False, aliases: Iterable[str] = (),
                 builtin: bool = False) -> Callable[[E], E]: ...

    @overload
    def register(self, name: str, entry: E, *, replace: bool = False, aliases: Iterable[str] = (),
                 builtin: bool = False) -> E: ...

    def register(self, name: str, entry: Any = None, *, replace: bool = False, aliases: Iterable[str] = (),
                 builtin: bool = False) -> Any:
        """Register ``entry`` as ``name`` (and ``aliases``) and return it; without ``entry``, a decorator.

        The same entry again (or a class of the same ``module:qualname``, as after a module reload) is
        fine; another entry under a taken name needs ``replace=True``.
        """
        aliases = tuple(aliases)

        def add(value: E) -> E:
            self._add(name, value, replace, aliases, builtin)
            return value

        return add if entry is None else add(entry)

    def register_lazy(self, name: str, target: str, *, aliases: Iterable[str] = (), builtin: bool = True) -> None:
        """Register ``package.module:attr`` of this package as ``name``, imported when first looked up."""
        module, _, attr = target.partition(":")
        if not attr or not _own_module(module):
            raise ValueError(f"{self.kind} registry: lazy entry {target!r} is not a module:attr path inside {PACKAGE}")
        self._add(name, _Lazy(target), False, tuple(aliases), builtin)

    def unregister(self, name: str) -> None:
        """Remove a registered (non built-in) ``name`` and its aliases."""
        key = self._key(name)
        if key not in self._entries:
            raise self.unknown(name)
        if key in self._builtins:
            raise self.error(f"{self.caller}: {key!r} is a built-in {self.kind}; it cannot be removed")
        del self._entries[key]
        for alias in [a for a, k in self._aliases.items() if k == key]:
            del self._aliases[alias]

    @contextmanager
    def snapshot(self) -> Iterator[Registry[T]]:
        """Undo, on leaving the block, every registration made inside it (for tests)."""
        self._load_plugins()
        saved = (dict(self._entries), dict(self._aliases), set(self._builtins))
        try:
            yield self
        finally:
            for live, old in zip((self._entries, self._aliases, self._builtins), saved):
                live.clear()
                live.update(old)  # in place: the alias view handed out stays live

    # ------------------------------------------------------------------ looking up

    def _load_plugins(self) -> None:
        while self._plugins:
            importlib.import_module(self._plugins.pop(0))

    def canonical(self, name: str, where: str = "") -> str:
        """The registered name ``name`` stands for (an alias resolved); unknown names raise."""
        self._load_plugins()
        key = self._key(name) if isinstance(name, str) else name
        key = self._aliases.get(key, key)
        if key not in self._entries:
            raise self.unknown(name, where)
        return key

    def lookup(self, name: str, where: str = "") -> T:
        """The entry of ``name`` or an alias (a lazy entry is imported now); unknown names raise."""
        key = self.canonical(name, where)
        entry = self._entries[key]
        if isinstance(entry, _Lazy):
            module, _, attr = entry.target.partition(":")
            value = getattr(importlib.import_module(module), attr)
            if self._check is not None:
                self._check(key, value)
            self._entries[key] = entry = value
        return entry

    def unknown(self, name: object, where: str = "") -> AutomtlError:
        """The error for an unknown ``name``: the kind, close matches and the known names."""
        self._load_plugins()
        known = sorted([*self._entries, *self._aliases])
        close = difflib.get_close_matches(self._key(name), known, n=3) if isinstance(name, str) else []
        guess = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
        prefix = f"{where}: " if where else ""
        return self.error(f"{prefix}unknown {self.kind} {name!r}{guess}; available: "
                          f"{', '.join(known) or 'none'}{self._hint}")

    def names(self) -> list[str]:
        """The registered names (not the aliases), sorted."""
        self._load_plugins()
        return sorted(self._entries)

    @property
    def aliases(self) -> Mapping[str, str]:
        """Alias -> registered name (read-only, live)."""
        self._load_plugins()
        return MappingProxyType(self._aliases)

    def is_builtin(self, name: str) -> bool:
        """True when ``name`` (or an alias) was registered as a built-in."""
        self._load_plugins()
        return self._key(name) in self._builtins

    def __getitem__(self, name: str) -> T:
        return self.lookup(name)

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        """The entry of ``name`` (or an alias), or ``default`` when unknown."""
        return self.lookup(name) if name in self else default

    def __contains__(self, name: object) -> bool:
        self._load_plugins()
        if not isinstance(name, str):
            return False
        key = self._key(name)
        return key in self._entries or key in self._aliases

    def __iter__(self) -> Iterator[str]:
        self._load_plugins()
        return iter(list(self._entries))

    def __len__(self) -> int:
        self._load_plugins()
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self)} entries)"
