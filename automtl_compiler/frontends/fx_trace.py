"""Static-shape torch.fx tracing: every proxy knows the IR value it computes.

Each call that torch.fx records is handed at once to a converter callback, which emits the IR nodes and
returns the IR value: a :class:`TensorValue` (an IR node name and its static shape), a tuple of them
(``split``), a plain Python value, or an :class:`Opaque` result that has no IR mapping. So ``x.shape``,
``x.size(-1)``, ``x.dim()`` and ``len(x)`` are ordinary Python ints while tracing, and Python control flow
and arithmetic on shapes (TF 'same' padding, VGG's pre-logits size check) run as they do in eager mode;
only control flow on tensor *data* stays untraceable. In-place calls (``x.mul_(g)``, ``x[:, :c] = y``,
``inplace=True``) rebind the mutated proxy to the new value, so later reads of ``x`` see the update.
"""

from __future__ import annotations

import linecache
import operator
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import fx, nn

from ..errors import AutomtlError, UnsupportedOpError


@dataclass(frozen=True)
class TensorValue:
    """A tensor of the IR graph being built: the node that computes it and its static shape (batch first)."""

    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Opaque:
    """A traced result with no IR mapping. Its error is raised only when the result is used (so dead code
    and unused by-products do not fail a conversion)."""

    error: AutomtlError


class Emitter(Protocol):
    """What layer and function mappings may ask of the converter (automtl_compiler.frontends.fx)."""

    def emit(self, op: str, attrs: dict[str, Any], inputs: list[TensorValue],
             params: dict[str, torch.Tensor] | None = None, buffers: dict[str, torch.Tensor] | None = None,
             part: str = "") -> TensorValue:
        """Add one IR node (named after the traced call, ``_part`` appended) and return its value."""

    def tensor(self, value: Any) -> TensorValue:
        """An operand as an IR tensor: a traced tensor as it is, a torch tensor or number as a constant."""

    def params_of(self, m: nn.Module) -> dict[str, torch.Tensor]:
        """Copies of a module's own parameters."""

    def buffers_of(self, m: nn.Module) -> dict[str, torch.Tensor]:
        """Copies of a module's own buffers."""

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        """A detached copy of a tensor (one copy per tensor, so shared weights stay shared)."""

    def leaf(self, m: nn.Module, x: TensorValue, part: str) -> Any:
        """Map a child layer of a layer being mapped (e.g. the ``act`` of a norm-act layer)."""


#: Converter callback: (kind, target, argument values, keyword values, fx node) -> value.
Convert = Callable[[str, Any, tuple[Any, ...], dict[str, Any], fx.Node], Any]

_OWN_FILES = {str(p) for p in Path(__file__).resolve().parent.glob("fx*.py")}
_TORCH_DIR = str(Path(torch.__file__).resolve().parent)


def user_frame(frames: list[traceback.FrameSummary]) -> traceback.FrameSummary | None:
    """The innermost frame that is neither torch nor this frontend: the model's own source line."""
    for frame in reversed(frames):
        path = str(Path(frame.filename).resolve()) if frame.filename and not frame.filename.startswith("<") else ""
        if path and not path.startswith(_TORCH_DIR) and path not in _OWN_FILES:
            return frame
    return None


def describe_frame(frame: traceback.FrameSummary | None) -> str:
    """``file:line (`code`)`` of a frame, for error messages."""
    if frame is None:
        return "an unknown source line"
    code = (frame.line or linecache.getline(frame.filename, frame.lineno or 0)).strip()
    return f"{frame.filename}:{frame.lineno}" + (f" (`{code}`)" if code else "")


def current_line() -> str:
    """Where the model's code is right now (called while tracing, on failures only)."""
    return describe_frame(user_frame(traceback.extract_stack()))


class TraceError(UnsupportedOpError):
    """The model's code does something with a traced tensor that tracing cannot follow; the frontend adds
    the module and source line."""


class DataDependentError(TraceError):
    """A tensor's data (not its shape) decides Python control flow."""


class StaticProxy(fx.Proxy):
    """An fx Proxy that carries its IR value, so that shape queries are answered with Python values."""

    def __init__(self, node: fx.Node, tracer: StaticTracer, value: Any) -> None:
        super().__init__(node, tracer)
        self.value = value

    def __repr__(self) -> str:
        return f"StaticProxy({self.node.name}, {self.value})"

    def _shape(self) -> torch.Size:
        if isinstance(self.value, Opaque):
            raise self.value.error
        return torch.Size(self.value.shape)

    @property
    def shape(self) -> torch.Size:  # type: ignore[override]
        return self._shape()

    def size(self, dim: int | None = None) -> Any:
        return self._shape() if dim is None else self._shape()[dim]

    def dim(self) -> int:
        return len(self._shape())

    @property
    def ndim(self) -> int:
        return len(self._shape())

    def numel(self) -> int:
        return self._shape().numel()

    def nelement(self) -> int:
        return self._shape().numel()

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def is_cuda(self) -> bool:
        return False

    @property
    def requires_grad(self) -> bool:
        return False

    def is_contiguous(self, memory_format: Any = None) -> bool:
        return True

    def is_floating_point(self) -> bool:
        return True

    def __len__(self) -> int:
        return self._shape()[0]

    def __iter__(self) -> Any:
        self._shape()  # an unmapped result: its own error
        raise TraceError("iterating over a tensor splits its batch dimension, which the IR keeps whole")

    def __bool__(self) -> bool:
        raise DataDependentError(f"the values of tensor '{self.node.name}' decide Python control flow "
                                 "(data-dependent control flow is not traceable)")

    def __setitem__(self, index: Any, value: Any) -> None:
        self.tracer.create_proxy("call_function", operator.setitem, (self, index, value), {})


_INPLACE_FUNCTIONS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv}


def _is_inplace(kind: str, target: Any, kwargs: dict[str, Any]) -> bool:
    if kind == "call_method":
        return isinstance(target, str) and target.endswith("_") and not target.startswith("__")
    return kind == "call_function" and (target in _INPLACE_FUNCTIONS or kwargs.get("inplace") is True)


class StaticTracer(fx.Tracer):
    """Traces a module, converting each recorded call at once through ``convert``.

    ``is_leaf(module)`` says which modules are recorded as single calls (layers with an IR mapping); all
    others are traced through. ``stack`` holds the (path, class name) of the modules being traced, and
    ``failed_stack`` the stack at the first exception, to say where tracing failed.
    """

    def __init__(self, convert: Convert, is_leaf: Callable[[nn.Module], bool]) -> None:
        super().__init__(autowrap_modules=(), autowrap_functions=())
        self.convert = convert
        self.leaf = is_leaf
        self.stack: list[tuple[str, str]] = []
        self.failed_stack: list[tuple[str, str]] | None = None
        self.outputs: Any = None

    # ------------------------------------------------------------ what is traced
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return self.leaf(m)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        if not _has_proxy((args, kwargs)):
            return forward(*args, **kwargs)  # a layer applied to constants only: its result is a constant
        self.stack.append((self.path_of_module(m), type(m).__name__))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_stack is None:
                self.failed_stack = list(self.stack)
            raise
        finally:
            self.stack.pop()

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        """Parameters and buffers are read as the real tensors: arithmetic on them runs eagerly."""
        return attr_val

    # ------------------------------------------------------------ recording
    def create_arg(self, a: Any) -> Any:
        """fx node arguments are only bookkeeping here: tensors and foreign objects are recorded as None
        (fx would otherwise attach constants to the traced module)."""
        if isinstance(a, torch.Tensor) and not isinstance(a, fx.Proxy):
            return None
        try:
            return super().create_arg(a)
        except (NotImplementedError, TypeError):
            return None

    def create_node(self, kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                    name: str | None = None, type_expr: Any | None = None) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind == "output":
            self.outputs = args[0]
        return node

    def create_proxy(self, kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                     name: str | None = None, type_expr: Any | None = None,
                     proxy_factory_fn: Callable[[fx.Node], fx.Proxy] | None = None) -> Any:
        node = self.create_node(kind, target, self.create_arg(args), self.create_arg(kwargs), name, type_expr)
        value = self.convert(kind, target, _values(args), _values(kwargs), node)
        result = self.wrap(node, value)
        if _is_inplace(kind, target, kwargs) and args and isinstance(args[0], StaticProxy) \
                and isinstance(result, StaticProxy):
            args[0].node, args[0].value = result.node, result.value
        return result

    def wrap(self, node: fx.Node, value: Any) -> Any:
        """A proxy for a tensor value; a tuple of proxies for a tuple of them; Python values as they are."""
        node.meta["automtl_value"] = value
        if isinstance(value, (TensorValue, Opaque)):
            return StaticProxy(node, self, value)
        if isinstance(value, (tuple, list)) and any(isinstance(v, (TensorValue, Opaque)) for v in value):
            items = []
            for i, v in enumerate(value):
                item = self.create_node("call_function", operator.getitem, (node, i), {})
                items.append(self.wrap(item, v))
            return type(value)(items)
        return value

    def module_path(self) -> tuple[str, str]:
        """(path, class name) of the module whose code is being traced."""
        return self.stack[-1] if self.stack else ("<top level>", type(self.root).__name__)


def _has_proxy(a: Any) -> bool:
    if isinstance(a, fx.Proxy):
        return True
    if isinstance(a, (tuple, list)):
        return any(_has_proxy(v) for v in a)
    if isinstance(a, dict):
        return any(_has_proxy(v) for v in a.values())
    return False


def _values(a: Any) -> Any:
    """Replace every proxy in a (nested) argument by its IR value."""
    if isinstance(a, StaticProxy):
        return a.value
    if isinstance(a, fx.Proxy):
        raise TraceError(f"a traced attribute ({a}) is used as a value; only tensor shapes, sizes and "
                                 "dtypes are known while tracing")
    if isinstance(a, (tuple, list)):
        return type(a)(_values(v) for v in a) if not hasattr(a, "_fields") else type(a)(*(_values(v) for v in a))
    if isinstance(a, dict):
        return {k: _values(v) for k, v in a.items()}
    if isinstance(a, slice):
        return slice(_values(a.start), _values(a.stop), _values(a.step))
    return a
