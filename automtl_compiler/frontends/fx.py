"""torch.fx frontend: an ``nn.Module`` (torchvision, timm, your own) -> Graph.

The module is traced with torch.fx while the IR is built: every recorded call is converted at once and
its output shape computed from the registry's shape rules at the given input shape (see
:mod:`.fx_trace`). Shapes are therefore Python ints during tracing, so shape arithmetic and control flow
on shapes (TF 'same' padding, size checks) run as in eager mode, and no forward pass is executed
(compiling ResNet-50 runs nothing). Layers with an IR mapping are recorded as single calls
(:mod:`.fx_leaves`: torch.nn layers, timm's norm-act, same-padding, weight-standardised convolutions,
DropPath, ...); everything else is traced through and its torch functions and tensor methods mapped
(:mod:`.fx_functions`, :mod:`.fx_tensors`). Parameters and buffers are copied.

A call with no mapping is an UnsupportedOpError naming the fx node, the module path and class it sits
in, and the source line -- raised only if its result is used. Data-dependent control flow is an
UnsupportedOpError naming the module and line too.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import fx, nn

from ..errors import AutomtlError, ShapeError, UnsupportedOpError
from ..ir.graph import Graph
from ..ir.ops import get_op
from . import fx_functions, fx_tensors
from .fx_leaves import leaf_of
from .fx_trace import (
    Opaque,
    StaticTracer,
    TensorValue,
    TraceError,
    current_line,
    describe_frame,
    user_frame,
)

_FUNCTIONS = {**fx_functions.FUNCTIONS, **fx_tensors.FUNCTIONS}
_METHODS = {**fx_functions.METHODS, **fx_tensors.METHODS}
_HANDLER_ERRORS = (AutomtlError, ValueError, TypeError, KeyError, IndexError, AttributeError, ZeroDivisionError)


def _first_opaque(a: Any) -> Opaque | None:
    if isinstance(a, Opaque):
        return a
    if isinstance(a, (tuple, list)):
        items: Any = a
    elif isinstance(a, dict):
        items = a.values()
    else:
        return None
    for v in items:
        found = _first_opaque(v)
        if found is not None:
            return found
    return None


def _target_name(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", repr(target))


class _Converter:
    """Builds the Graph while the tracer runs: the callback of :class:`StaticTracer` and the emitter that
    layer and function mappings use."""

    def __init__(self, module: nn.Module, input_shape: tuple[int, ...], copy_tensors: bool) -> None:
        self.graph = Graph(type(module).__name__.lower())
        self.input_shape = input_shape
        self.copy_tensors = copy_tensors
        self.modules = dict(module.named_modules())
        self.tracer = StaticTracer(self, lambda m: leaf_of(m) is not None)
        self.node: fx.Node | None = None
        self.kind = ""
        self.target: Any = None
        self.children: list[str] = []
        self.copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.constants: dict[int, tuple[torch.Tensor, TensorValue]] = {}

    # ------------------------------------------------------------ the tracer's callback
    def __call__(self, kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                 node: fx.Node) -> Any:
        if kind == "placeholder":
            return self.placeholder(node, args)
        opaque = _first_opaque((args, kwargs))
        if opaque is not None:
            return opaque
        self.node, self.kind, self.target = node, kind, target
        try:
            return self.dispatch(kind, target, args, kwargs)
        except _HANDLER_ERRORS as e:
            cls = type(e) if isinstance(e, AutomtlError) else UnsupportedOpError
            return Opaque(cls(f"{self.describe()}, {current_line()}: {e}"))

    def placeholder(self, node: fx.Node, args: tuple[Any, ...]) -> Any:
        if not self.graph.inputs:
            self.graph.add_input(node.name, self.input_shape)
            return TensorValue(node.name, tuple(self.input_shape))
        if args:
            return args[0]  # a keyword argument of forward: its default
        raise UnsupportedOpError(f"forward takes a second input '{node.name}'; modules with more than one "
                                 "input are not supported")

    def dispatch(self, kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if kind == "call_module":
            m = self.modules[target]
            if len(args) != 1 or kwargs or not isinstance(args[0], TensorValue):
                raise UnsupportedOpError(f"layer {type(m).__name__} is called with {len(args)} positional and "
                                         f"{len(kwargs)} keyword arguments; one traced tensor is supported")
            return self.map_layer(m, args[0])
        if kind == "call_function":
            handler = _FUNCTIONS.get(target)
            if handler is None:
                raise UnsupportedOpError("function has no IR op")
            return handler(self, args, kwargs)
        if kind == "call_method":
            name = str(target)
            handler = _METHODS.get(name) or (_METHODS.get(name[:-1]) if name.endswith("_") else None)
            if handler is None:
                raise UnsupportedOpError(f"tensor method '{name}' has no IR op")
            return handler(self, args, kwargs)
        raise UnsupportedOpError(f"'{kind}' nodes are not supported")

    def map_layer(self, m: nn.Module, x: TensorValue) -> Any:
        fn = leaf_of(m)
        if fn is None:
            raise UnsupportedOpError(f"layer type {type(m).__name__} has no IR op")
        return fn(self, m, x)

    def where(self) -> tuple[str, str]:
        """(module path, class name) of the current call."""
        if self.kind == "call_module":
            return str(self.target), type(self.modules[self.target]).__name__
        return self.tracer.module_path()

    def describe(self) -> str:
        path, cls = self.where()
        assert self.node is not None
        return (f"fx node '{self.node.name}' ({self.kind} {_target_name(self.target)}) in module '{path}'"
                + (f" ({cls})" if cls else ""))

    # ------------------------------------------------------------ the emitter (see fx_trace.Emitter)
    def emit(self, op: str, attrs: dict[str, Any], inputs: list[TensorValue],
             params: dict[str, torch.Tensor] | None = None, buffers: dict[str, torch.Tensor] | None = None,
             part: str = "") -> TensorValue:
        assert self.node is not None
        parts = [p for p in (*self.children, part) if p]
        name = self.fresh("_".join([self.node.name, *parts]))
        path, _ = self.where()
        source = ".".join([path, *self.children]) if self.kind == "call_module" else f"{path}:{self.node.name}"
        node = self.graph.add_node(name, op, [i.name for i in inputs], attrs, params=params, buffers=buffers,
                                   source=source)
        try:
            node.shape = tuple(get_op(op).shape(node.attrs, [i.shape for i in inputs]))
        except ShapeError as e:
            self.graph.remove_node(name)
            raise ShapeError(f"{op} of input shapes {[list(i.shape) for i in inputs]}: {e}") from None
        return TensorValue(name, node.shape)

    def fresh(self, name: str) -> str:
        if name not in self.graph:
            return name
        i = 1
        while f"{name}_{i}" in self.graph:
            i += 1
        return f"{name}_{i}"

    def tensor(self, value: Any) -> TensorValue:
        if isinstance(value, TensorValue):
            return value
        if isinstance(value, torch.Tensor):
            if id(value) not in self.constants:
                self.constants[id(value)] = (value, self.constant(value, value.requires_grad))
            return self.constants[id(value)][1]
        if fx_functions.is_number(value):
            return self.constant(torch.tensor(float(value)), False)
        raise UnsupportedOpError(f"operand {value!r} is not a tensor or a number")

    def constant(self, t: torch.Tensor, trainable: bool) -> TensorValue:
        """A ``tensor`` node holding a copy of ``t`` (a parameter when it is trained, else a buffer)."""
        value = {"value": t.detach().to(torch.float32).clone()}
        return self.emit("tensor", {"shape": list(t.shape), "trainable": trainable}, [],
                         params=value if trainable else None, buffers=None if trainable else value, part="const")

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        if id(t) not in self.copies:
            self.copies[id(t)] = (t, t.detach().clone() if self.copy_tensors else t.detach())
        return self.copies[id(t)][1]

    def params_of(self, m: nn.Module) -> dict[str, torch.Tensor]:
        return {k: self.copy(p) for k, p in m.named_parameters(recurse=False)}

    def buffers_of(self, m: nn.Module) -> dict[str, torch.Tensor]:
        return {k: self.copy(b) for k, b in m.named_buffers(recurse=False) if b is not None}

    def leaf(self, m: nn.Module, x: TensorValue, part: str) -> Any:
        with self.child(part):
            return self.map_layer(m, x)

    @contextmanager
    def child(self, part: str) -> Iterator[None]:
        self.children.append(part)
        try:
            yield
        finally:
            self.children.pop()

    # ------------------------------------------------------------ finishing
    def finish(self) -> Graph:
        """Declare the outputs, drop nodes they do not need, and check the result."""
        nodes: list[fx.Node] = []
        fx.node.map_arg(self.tracer.outputs, nodes.append)
        values = [n.meta.get("automtl_value") for n in nodes]
        for v in values:
            if isinstance(v, Opaque):
                raise v.error
        names = [v.name for v in values if isinstance(v, TensorValue)]
        if not names:
            raise UnsupportedOpError(f"{self.graph.name}: forward returns no traced tensor")
        self.graph.set_outputs(names)
        keep = set(self.graph.inputs).union(*(self.graph.upstream(o) for o in names))
        for node in reversed(self.graph.nodes()):
            if node.name not in keep:
                self.graph.remove_node(node.name)
        return self.graph


def _trace_failure(module: nn.Module, tracer: StaticTracer, e: BaseException) -> UnsupportedOpError:
    """A one-paragraph error for an exception raised while running the module's code under tracing."""
    stack = tracer.failed_stack or tracer.stack
    path, cls = stack[-1] if stack else ("<top level>", type(module).__name__)
    line = describe_frame(user_frame(traceback.extract_tb(e.__traceback__)))
    reason = str(e) if isinstance(e, AutomtlError) else f"{type(e).__name__}: {e}"
    return UnsupportedOpError(
        f"torch.fx could not trace {type(module).__name__}: in module '{path}' ({cls}) at {line}: {reason}. "
        "Control flow on tensor values is not traceable; move it into a layer of your own, or export the "
        "model to ONNX and load the .onnx file instead")


def from_module(module: nn.Module, *, input_shape: tuple[int, ...] = (1, 3, 224, 224),
                copy_tensors: bool = True) -> Graph:
    """Trace ``module`` with torch.fx and convert it to a Graph with shapes and copied tensors.

    Nothing runs the module: its state (training flag, batch-norm statistics) is untouched. Python code
    that reads shapes runs with the static shapes of ``input_shape``. ``copy_tensors=False`` lets the graph
    share the module's weight storage (no copy: half the compile time of a ResNet-50 on a slow memory bus);
    only for a module nobody else uses, such as one built from ``timm:NAME``.
    """
    converter = _Converter(module, tuple(input_shape), copy_tensors)
    try:
        converter.tracer.trace(module)
    except TraceError as e:
        raise _trace_failure(module, converter.tracer, e) from None
    except AutomtlError:
        raise
    except Exception as e:  # noqa: BLE001 - tracing runs user code: any failure becomes a readable error
        raise _trace_failure(module, converter.tracer, e) from None
    try:
        return converter.finish().materialise(seed=None)
    except ShapeError as e:
        raise ShapeError(f"{e}; the input shape was {list(input_shape)}: pass the input_shape the model "
                         "expects") from None


__all__ = ["from_module"]
