"""User-facing errors.

Every error a user can trigger with bad input is an :class:`AutomtlError`; its message says what went
wrong, where (file, line, node), and what to do. The CLI prints the message and exits 2.
"""

from __future__ import annotations

from pathlib import Path


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
