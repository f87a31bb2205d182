"""Frontends: each reads one source format into a Graph, and nothing else.

:func:`load_backbone` is the one entry point; it picks the frontend from the kind of ``source``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import AutomtlError, FileFormatError, one_line
from ..ir.graph import Graph

DEFAULT_INPUT_SHAPE = (1, 3, 224, 224)


def load_backbone(source: Any, *, input_shape: tuple[int, ...] | None = None,
                  weights: str | Path | None = None, strict: bool = True) -> Graph:
    """Read a backbone into the IR, optionally with pretrained weights.

    ``source`` is an ``nn.Module`` (traced with torch.fx), a ``.prototxt`` path (AutoMTL dialect or
    genuine Caffe), an ``.onnx`` path, a graph ``.json`` written by :func:`save_graph`, or
    ``torchvision:NAME`` or ``timm:NAME`` (a torchvision or timm model with random weights; nothing is
    downloaded), or ``package.module:function`` (your
    code: the function is called with no arguments and must return an ``nn.Module``). ``input_shape`` overrides the shape a
    file declares (and is the tracing shape for modules, default ``(1, 3, 224, 224)``). A relative
    ``models/NAME.prototxt`` that does not exist in the working directory is the one installed with the
    package (``models/deeplab_resnet34.prototxt``, AutoMTL's backbone, and torchvision's ResNets etc.).

    ``weights`` is a PyTorch state-dict file (``.pth``/``.pt``/``.bin``/``.ckpt``, read with
    ``weights_only=True``) or a ``.safetensors`` file, for every source but ``.onnx`` (whose file carries its
    own weights; giving weights= is an error). Module sources (including ``torchvision:`` and
    ``package.module:function``) get it by their ``state_dict`` names before tracing; a passed ``nn.Module``
    is copied first, not modified. ``.prototxt`` sources also take a ``.caffemodel``, and state-dict names
    map onto layers named as the project's exporter names them; ``.json`` graphs take ``<node>/<tensor>``
    keys or the module names the graph recorded, replacing the sidecar's tensors. ``strict=False`` ignores
    tensors the network does not use; missing and mis-shaped tensors are always an error. See
    :mod:`automtl_compiler.frontends.weights`.
    """
    import torch

    if isinstance(source, torch.nn.Module):
        if weights is not None:
            return _from_module(_copy_module(source), input_shape, weights, strict, owned=True)
        return _from_module(source, input_shape, weights, strict, owned=False)
    if not isinstance(source, (str, Path)):
        raise AutomtlError(f"cannot load a backbone from a {type(source).__name__}; give an nn.Module, "
                           "a .prototxt, .onnx or .json path, torchvision:NAME or timm:NAME")
    text = str(source)
    if text.startswith("torchvision:"):
        from .zoo import torchvision_model
        return _from_module(torchvision_model(text.split(":", 1)[1]), input_shape, weights, strict, owned=True)
    if text.startswith("timm:"):
        from .zoo import timm_model
        return _from_module(timm_model(text.split(":", 1)[1]), input_shape, weights, strict, owned=True)
    if ENTRY.fullmatch(text):
        return _from_module(_call_entry(text), input_shape, weights, strict, owned=False)
    path = Path(text)
    suffix = path.suffix.lower()
    if suffix == ".prototxt":
        from .prototxt import load_prototxt
        return load_prototxt(_builtin_model(path), input_shape=input_shape, weights=weights, strict=strict)
    if suffix == ".onnx":
        from .onnx import load_onnx
        if weights is not None:
            raise AutomtlError(f"{path}: an .onnx file carries its own weights (its initialisers), so weights= "
                               f"({weights}) cannot be applied; export the ONNX file from the model with the "
                               "weights loaded, or load the PyTorch model or a .prototxt/.json of it with weights=")
        return load_onnx(path, input_shape=input_shape)
    if suffix == ".json":
        from ..ir.serialize import load_graph
        graph = load_graph(path)
        if weights is not None:
            from .weights import load_into_graph
            load_into_graph(graph, weights, strict=strict)
            graph.materialise(seed=0)
        return graph
    if not path.exists():
        raise FileFormatError(f"{path}: no such file (and not torchvision:NAME, timm:NAME or package.module:function); "
                              "check the path")
    raise FileFormatError(f"{path}: unknown backbone format '{suffix or 'no suffix'}'; use .prototxt, .onnx, "
                          ".json, torchvision:NAME, timm:NAME, package.module:function, or pass an nn.Module")


def _builtin_model(path: Path) -> Path:
    """``models/NAME.prototxt`` that does not exist here is the copy installed with the package (the
    configs name the built-in backbones so); any other path is returned as it is."""
    if path.exists() or path.is_absolute() or path.parent != Path("models"):
        return path
    from importlib.resources import files

    packaged = files("automtl_compiler.models") / path.name
    return Path(str(packaged)) if packaged.is_file() else path


def _from_module(module: Any, input_shape: tuple[int, ...] | None, weights: str | Path | None,
                 strict: bool, owned: bool) -> Graph:
    """Load ``weights`` (if any) into ``module`` by its state-dict names, then trace it. An ``owned`` module
    (built here, used by no one else) lends its tensors to the graph instead of having them copied."""
    from .fx import from_module

    if weights is not None:
        from .weights import load_into_module
        load_into_module(module, weights, strict=strict)
    return from_module(module, input_shape=input_shape or DEFAULT_INPUT_SHAPE, copy_tensors=not owned)


def _copy_module(module: Any) -> Any:
    """A deep copy of the caller's module, so that loading weights does not change their model."""
    import copy

    try:
        return copy.deepcopy(module)
    except Exception as e:  # noqa: BLE001 - arbitrary user modules: report it in one line
        raise AutomtlError(f"cannot copy {type(module).__name__} to load weights into it ({type(e).__name__}: "
                           f"{e}); call model.load_state_dict(...) yourself and pass the model without "
                           "weights=") from None


ENTRY = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*")

#: Top-level modules whose objects are never called as a backbone entry point: they end, replace or
#: signal the process, run other programs, or wait for a terminal (``os:abort``, ``sys:exit``, ``pdb:set_trace``).
REFUSED_MODULES = frozenset({
    "builtins", "os", "posix", "nt", "sys", "subprocess", "_posixsubprocess", "shutil", "signal", "_signal",
    "faulthandler", "atexit", "ctypes", "multiprocessing", "threading", "_thread", "concurrent", "asyncio",
    "pdb", "bdb", "code", "pty", "tty", "termios", "getpass", "webbrowser", "runpy", "importlib", "socket",
    "resource", "gc", "site", "pydoc", "idlelib", "tkinter", "turtle", "antigravity", "this",
})


def _refused(module_name: str | None) -> bool:
    return (module_name or "").split(".")[0] in REFUSED_MODULES


def _call_entry(text: str) -> Any:
    """Import ``package.module`` and call ``function()``: the user's own code that builds the backbone.

    The entry point must be a Python function (or an ``nn.Module`` subclass) that takes no arguments, defined
    outside :data:`REFUSED_MODULES`; builtins and C functions are refused. Whatever it raises, including
    ``SystemExit`` and ``KeyboardInterrupt``, becomes an AutomtlError, and it must return an ``nn.Module``.
    """
    import importlib
    import inspect

    import torch

    module_name, _, function = text.partition(":")
    if _refused(module_name):
        raise AutomtlError(f"backbone '{text}': {module_name} is not a module of backbones; name a function of "
                           "your own that returns an nn.Module, e.g. mypackage.models:build")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise AutomtlError(f"backbone '{text}': cannot import {module_name} ({one_line(e)}); is it on "
                           "PYTHONPATH?") from None
    except (Exception, SystemExit, KeyboardInterrupt) as e:  # noqa: BLE001 - the user's module ran and failed
        raise AutomtlError(f"backbone '{text}': importing {module_name} raised {type(e).__name__}: "
                           f"{one_line(e)}") from None
    fn = getattr(module, function, None)
    if fn is None:
        raise AutomtlError(f"backbone '{text}': {module_name} has no function {function}")
    is_module_class = inspect.isclass(fn) and issubclass(fn, torch.nn.Module)
    if not (inspect.isfunction(fn) or is_module_class) or _refused(getattr(fn, "__module__", None)):
        raise AutomtlError(f"backbone '{text}': {function} is a {type(fn).__name__} (from "
                           f"{getattr(fn, '__module__', None) or module_name}); builtins, C functions and system "
                           "modules are refused: name a Python function of your own that takes no arguments and "
                           "returns an nn.Module")
    try:
        inspect.signature(fn).bind()
    except TypeError:
        raise AutomtlError(f"backbone '{text}': {function}() needs arguments; name a function that takes none "
                           "(wrap the call in one) and returns an nn.Module") from None
    except ValueError:
        pass  # no signature to inspect: let the call tell
    try:
        model = fn()
    except (Exception, SystemExit, KeyboardInterrupt) as e:  # noqa: BLE001 - the user's code: one line
        raise AutomtlError(f"backbone '{text}': {function}() raised {type(e).__name__}: {one_line(e)}"
                           ) from None
    if not isinstance(model, torch.nn.Module):
        raise AutomtlError(f"backbone '{text}': {function}() returned a {type(model).__name__}, not an nn.Module")
    return model
