"""User-facing errors.

Every error a user can trigger with bad input is an :class:`AutomtlError`; its message says what went
wrong, where (file, line, node), and what to do. The CLI prints the message and exits 2.
"""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any

#: How many characters of a user's value an error message echoes.
SHOWN_CHARS = 80


class AutomtlError(Exception):
    """Base class of every error caused by user input (files, options, specs)."""


class ParseError(AutomtlError):
    """A source file could not be parsed; the message carries ``file:line:column``."""

    def __init__(self, message: str, *, path: str | Path | None = None, line: int | None = None,
                 column: int | None = None) -> None:
        where = ""
        if path is not None:
            where = str(path)
            if line is not None:
                where += f":{line}"
                if column is not None:
                    where += f":{column}"
            where += ": "
        super().__init__(where + message)
        self.path, self.line, self.column = path, line, column


class UnsupportedOpError(AutomtlError):
    """A frontend met an operator that has no mapping onto the op registry."""


class GraphError(AutomtlError):
    """The graph is malformed: dangling input, cycle, unknown op, bad attribute or parameter."""


class ShapeError(GraphError):
    """Shapes do not agree: an op cannot accept its inputs' shapes, or a stored shape is wrong."""


class FileFormatError(AutomtlError):
    """A file is missing, unreadable, corrupt, or of an unexpected kind."""


def require_file(path: str | Path, what: str = "file") -> Path:
    """Return ``path`` as a Path, raising FileFormatError when it does not name a readable file."""
    p = Path(path)
    if not p.exists():
        raise FileFormatError(f"{p}: {what} not found; check the path")
    if not p.is_file():
        raise FileFormatError(f"{p}: is not a file; give the path of a {what}")
    return p


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 3, 6, 6, 6, 6
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = SHOWN_CHARS


def brief(value: Any, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` for an error message: one line, at most ``limit`` characters (``...`` marks a cut).

    Nested and long values are abbreviated without being expanded, so echoing a huge value costs nothing.
    """
    try:
        text = _REPR.repr(value)
    except Exception:  # noqa: BLE001 - a value whose repr fails still needs a message
        text = f"<{type(value).__name__}>"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def one_line(text: Any, limit: int = 120) -> str:
    """``str(text)`` with its whitespace collapsed to single spaces, cut to ``limit`` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit - 3] + "..."


def value_error_text(e: BaseException) -> str:
    """A short reason for an error met while reading a value: Python's refusal of an integer with thousands
    of digits is said plainly, anything else is its type and one line of its message."""
    import sys

    if isinstance(e, ValueError) and "integer string conversion" in str(e):
        return f"an integer with more than {sys.get_int_max_str_digits()} digits"
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return f"{type(e).__name__}: {one_line(e)}"
