"""Size limits: every size that a file, a spec or an option controls is checked against these BEFORE
anything of that size is allocated, so that a tiny hostile input cannot make automtl take gigabytes.

Each limit is a module-level constant (its default) with a docstring. A limit is raised (or lowered)

* for one run, with the environment variable ``AUTOMTL_<NAME>`` (e.g. ``AUTOMTL_MAX_PARAMS=5e9``), or
* in a program, with ``with limits.override(MAX_PARAMS=5_000_000_000): ...``.

The defaults admit the large backbones (ResNet-152, EfficientNet-B7, ConvNeXt-XL) at 1024x2048 inputs.
A violation is a :class:`LimitError` naming the limit, the value, and how to raise it.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from .errors import AutomtlError, FileFormatError

MAX_PARAMS: int = 2_000_000_000
"""Learnable scalars of one graph (all its parameters together) or of one task head (ConvNeXt-XL has
350 M). Checked before parameters are initialised or a head is constructed."""

MAX_TENSOR_BYTES: int = 8 * 2**30
"""Bytes of one tensor (8 GiB): a parameter or buffer (counted at 4 bytes a value), a graph input, the
input ``InferenceSession.example_input`` / ``automtl bench`` creates, a tensor in a safetensors file."""

MAX_CHANNELS: int = 2**20
"""Channels of a convolution's output or of a graph input, features of a linear layer, width of a head
(1,048,576; real backbones stay below 10,000)."""

MAX_KERNEL_SIZE: int = 1024
"""Side of a convolution or pooling window (large-kernel CNNs use up to 51)."""

MAX_SPATIAL: int = 32768
"""Height or width of a graph input or of a model input the runtime creates; also bounds strides,
paddings, dilations and adaptive-pooling output sizes (a 1024x2048 input is far below it)."""

MAX_FOLD_BYTES: int = 2**30
"""Bytes of all the constants that loading one ONNX file evaluates (1 GiB): shape arithmetic and any
node whose inputs are all constants (``ConstantOfShape``, ``Expand``, ``Tile``, ``Range``, ...), for
the frontend and for onnxruntime's constant folding when a session is opened. Each result's size is
computed from its inputs before it is evaluated."""

MAX_JSON_DEPTH: int = 100
"""Nesting depth of a JSON document automtl reads (graph files, model descriptions, policies, metadata);
ours nest fewer than 10 levels. Checked without recursion before the document is parsed."""

NAMES: tuple[str, ...] = ("MAX_PARAMS", "MAX_TENSOR_BYTES", "MAX_CHANNELS", "MAX_KERNEL_SIZE", "MAX_SPATIAL",
                          "MAX_FOLD_BYTES", "MAX_JSON_DEPTH")
ENV_PREFIX = "AUTOMTL_"
_overrides: dict[str, int] = {}


class LimitError(AutomtlError):
    """An input exceeds one of the documented size limits of :mod:`automtl_compiler.limits`."""


class FileLimitError(LimitError, FileFormatError):
    """A file exceeds a size limit (nesting depth, tensor size): both a LimitError and a FileFormatError."""


def _parse(name: str, text: str) -> int:
    try:
        value = float(text.replace("_", "")) if re.fullmatch(r"\s*[0-9_.eE+]+\s*", text) else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 1 or value != int(value):
        raise AutomtlError(f"environment variable {ENV_PREFIX}{name}={text!r} is not a positive whole number; "
                           f"set it like {ENV_PREFIX}{name}={globals()[name]} or unset it")
    return int(value)


def get(name: str) -> int:
    """The current value of limit ``name``: an :func:`override`, else ``AUTOMTL_<name>``, else the default."""
    if name not in NAMES:
        raise KeyError(f"unknown limit {name}; limits are {', '.join(NAMES)}")
    if name in _overrides:
        return _overrides[name]
    env = os.environ.get(ENV_PREFIX + name)
    if env is not None and env.strip():
        return _parse(name, env)
    return int(globals()[name])


@contextmanager
def override(**values: int) -> Iterator[None]:
    """Set limits for the ``with`` block: ``with override(MAX_PARAMS=5_000_000_000): ...``."""
    for name, value in values.items():
        get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise AutomtlError(f"limit {name} must be a positive int, got {value!r}")
    saved = dict(_overrides)
    _overrides.update(values)
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)


def how_to_raise(name: str) -> str:
    """The sentence that tells a user how to raise limit ``name``."""
    return (f"if the input is genuine, raise the limit with the environment variable {ENV_PREFIX}{name}=<n> or "
            f"automtl_compiler.limits.override({name}=<n>)")


def check(name: str, value: int, what: str, where: str = "", *, error: type[LimitError] = LimitError) -> None:
    """Raise ``error`` when ``value`` (the size of ``what``) exceeds limit ``name``."""
    bound = get(name)
    if value > bound:
        prefix = f"{where}: " if where else ""
        raise error(f"{prefix}{what} is {value:,}, more than the limit {name}={bound:,}; {how_to_raise(name)}")


def check_tensor(shape: Sequence[int], what: str, where: str = "", *, itemsize: int = 4,
                 error: type[LimitError] = LimitError) -> int:
    """Check a tensor of ``shape`` against MAX_TENSOR_BYTES before it is allocated; returns its element count."""
    numel = math.prod(int(s) for s in shape)
    bound = get("MAX_TENSOR_BYTES")
    if numel * itemsize > bound:
        prefix = f"{where}: " if where else ""
        raise error(f"{prefix}{what} of shape {list(shape)} would take {numel * itemsize:,} bytes, more than the "
                    f"limit MAX_TENSOR_BYTES={bound:,}; {how_to_raise('MAX_TENSOR_BYTES')}")
    return numel


def check_image_shape(shape: Sequence[int], what: str, where: str = "", *, itemsize: int = 4) -> None:
    """Check an N x C x H x W (or any rank) input shape: each spatial side (dims 2 and on) against
    MAX_SPATIAL, the channels (dim 1) against MAX_CHANNELS, and the whole tensor against MAX_TENSOR_BYTES."""
    if len(shape) > 1:
        check("MAX_CHANNELS", int(shape[1]), f"the channel count of {what}", where)
    for i, side in enumerate(shape[2:], start=2):
        check("MAX_SPATIAL", int(side), f"dimension {i} of {what} {list(shape)}", where)
    check_tensor(shape, what, where, itemsize=itemsize)


_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = re.compile(rb"[^\[\]{}]+")


def json_depth(text: str | bytes) -> int:
    """The deepest nesting of ``[``/``{`` in a JSON text, found without recursion (strings are skipped)."""
    import numpy as np

    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    brackets = _NOT_BRACKETS.sub(b"", _STRINGS.sub(b"", data))
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1).astype(np.int64)
    return int(np.cumsum(steps).max())


def check_json_depth(text: str | bytes, where: str) -> None:
    """Raise FileLimitError naming ``where`` when the JSON ``text`` nests deeper than MAX_JSON_DEPTH."""
    check("MAX_JSON_DEPTH", json_depth(text), "the JSON nesting depth", where, error=FileLimitError)


def loads_json(text: str | bytes, where: str) -> Any:
    """``json.loads`` after the depth check: deep nesting is a FileLimitError, never a RecursionError."""
    import json

    check_json_depth(text, where)
    return json.loads(text)


__all__ = ["MAX_CHANNELS", "MAX_FOLD_BYTES", "MAX_JSON_DEPTH", "MAX_KERNEL_SIZE", "MAX_PARAMS", "MAX_SPATIAL",
           "MAX_TENSOR_BYTES", "NAMES", "FileLimitError", "LimitError", "check", "check_image_shape",
           "check_json_depth", "check_tensor", "get", "how_to_raise", "json_depth", "loads_json", "override"]
