"""Frontends: each reads one source format into a Graph, and nothing else.

:func:`load_backbone` is the one entry point; it picks the frontend from the kind of ``source``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import AutomtlError, FileFormatError
from ..ir.graph import Graph

DEFAULT_INPUT_SHAPE = (1, 3, 224, 224)


def load_backbone(source: Any, *, input_shape: tuple[int, ...] | None = None,
                  weights: str | Path | None = None) -> Graph:
    """Read a backbone into the IR.

    ``source`` is an ``nn.Module`` (traced with torch.fx), a ``.prototxt`` path (AutoMTL dialect or
    genuine Caffe), an ``.onnx`` path, a graph ``.json`` written by :func:`save_graph`, or
    ``torchvision:NAME`` (a torchvision model with random weights), or ``package.module:function`` (your
    code: the function is called with no arguments and must return an ``nn.Module``). ``input_shape`` overrides the shape a
    file declares (and is the tracing shape for modules, default ``(1, 3, 224, 224)``). ``weights`` is an
    optional safetensors file for prototxt sources.
    """
    import torch

    if isinstance(source, torch.nn.Module):
        from .fx import from_module
        return from_module(source, input_shape=input_shape or DEFAULT_INPUT_SHAPE)
    if not isinstance(source, (str, Path)):
        raise AutomtlError(f"cannot load a backbone from a {type(source).__name__}; give an nn.Module, "
                           "a .prototxt, .onnx or .json path, or torchvision:NAME")
    text = str(source)
    if text.startswith("torchvision:"):
        from .fx import from_module, torchvision_model
        return from_module(torchvision_model(text.split(":", 1)[1]), input_shape=input_shape or DEFAULT_INPUT_SHAPE)
    if ENTRY.fullmatch(text):
        return load_backbone(_call_entry(text), input_shape=input_shape)
    path = Path(text)
    suffix = path.suffix.lower()
    if suffix == ".prototxt":
        from .prototxt import load_prototxt
        return load_prototxt(path, input_shape=input_shape, weights=weights)
    if suffix == ".onnx":
        from .onnx import load_onnx
        return load_onnx(path, input_shape=input_shape)
    if suffix == ".json":
        from ..ir.serialize import load_graph
        return load_graph(path)
    if not path.exists():
        raise FileFormatError(f"{path}: no such file (and not torchvision:NAME or package.module:function); "
                              "check the path")
    raise FileFormatError(f"{path}: unknown backbone format '{suffix or 'no suffix'}'; use .prototxt, .onnx, "
                          ".json, torchvision:NAME, package.module:function, or pass an nn.Module")


ENTRY = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*")


def _call_entry(text: str) -> Any:
    """Import ``package.module`` and call ``function()``: the user's own code that builds the backbone."""
    import importlib

    import torch

    module_name, _, function = text.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise AutomtlError(f"backbone '{text}': cannot import {module_name} ({e}); is it on PYTHONPATH?") from None
    fn = getattr(module, function, None)
    if not callable(fn):
        raise AutomtlError(f"backbone '{text}': {module_name} has no function {function}")
    try:
        model = fn()
    except Exception as e:  # noqa: BLE001 - the user's code: report it in one line
        raise AutomtlError(f"backbone '{text}': {function}() raised {type(e).__name__}: {e}") from None
    if not isinstance(model, torch.nn.Module):
        raise AutomtlError(f"backbone '{text}': {function}() returned a {type(model).__name__}, not an nn.Module")
    return model
