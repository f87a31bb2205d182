"""torch.fx frontend: any traceable ``nn.Module`` -> Graph.

The module is traced symbolically (standard torch.nn layers and torchvision's StochasticDepth stay
leaves) and converted node by node; shapes then follow from the registry's shape rules at the given input
shape, so nothing is executed (compiling ResNet-50 costs no forward pass). Parameters and buffers are
copied. A call with no registry mapping is an UnsupportedOpError naming the fx node and the module
path it sits in.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import AutomtlError, ShapeError, UnsupportedOpError
from ..ir.graph import Graph

Mapped = tuple[str, dict[str, Any]]


class _Tracer(fx.Tracer):
    """Keeps torch.nn layers and torchvision's StochasticDepth as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if type(m).__name__ == "StochasticDepth" and type(m).__module__.startswith("torchvision"):
            return True
        return super().is_leaf_module(m, qualname)


def torchvision_model(name: str) -> nn.Module:
    """A torchvision classification model with random weights (nothing is downloaded)."""
    import torchvision

    try:
        return torchvision.models.get_model(name, weights=None)
    except ValueError:
        names = ", ".join(torchvision.models.list_models(module=torchvision.models))
        raise AutomtlError(f"torchvision has no model '{name}'; known models: {names}") from None


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


def _conv(m: nn.Conv2d) -> Mapped:
    if m.padding_mode != "zeros":
        raise ValueError(f"padding_mode='{m.padding_mode}' (only 'zeros' is supported)")
    padding = m.padding
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        else:
            total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
            if any(t % 2 for t in total):
                raise ValueError("padding='same' with an even receptive field needs asymmetric padding")
            padding = tuple(t // 2 for t in total)
    return "conv2d", {"out_channels": m.out_channels, "kernel_size": m.kernel_size, "stride": m.stride,
                      "padding": padding, "dilation": m.dilation, "groups": m.groups, "bias": m.bias is not None}


def _pool(m: nn.Module, op: str) -> Mapped:
    attrs = {"kernel_size": _pair(m.kernel_size), "stride": _pair(m.stride or m.kernel_size),
             "padding": _pair(m.padding), "ceil_mode": m.ceil_mode}
    if op == "maxpool2d":
        if m.return_indices:
            raise ValueError("return_indices=True is not supported")
        attrs["dilation"] = _pair(m.dilation)
    else:
        if m.divisor_override is not None:
            raise ValueError("divisor_override is not supported")
        attrs["count_include_pad"] = m.count_include_pad
    return op, attrs


def _adaptive(size: Any, op: str) -> Mapped:
    size = _pair(size)
    if None in size:
        raise ValueError("adaptive pooling that keeps an input dimension (None) is not supported")
    return op, {"output_size": size}


def _bn(m: nn.BatchNorm2d) -> Mapped:
    if m.momentum is None:
        raise ValueError("momentum=None (cumulative moving average) is not supported")
    return "batchnorm2d", {"eps": m.eps, "momentum": m.momentum, "affine": m.affine,
                           "track_running_stats": m.track_running_stats}


_MODULES: dict[type, Callable[[Any], Mapped]] = {
    nn.Conv2d: _conv,
    nn.BatchNorm2d: _bn,
    nn.ReLU: lambda m: ("relu", {}),
    nn.ReLU6: lambda m: ("relu6", {}),
    nn.SiLU: lambda m: ("silu", {}),
    nn.Sigmoid: lambda m: ("sigmoid", {}),
    nn.Tanh: lambda m: ("tanh", {}),
    nn.Hardswish: lambda m: ("hardswish", {}),
    nn.Hardsigmoid: lambda m: ("hardsigmoid", {}),
    nn.GELU: lambda m: ("gelu", {"approximate": m.approximate}),
    nn.LeakyReLU: lambda m: ("leaky_relu", {"negative_slope": m.negative_slope}),
    nn.Hardtanh: lambda m: ("clip", {"min": m.min_val, "max": m.max_val}),
    nn.MaxPool2d: lambda m: _pool(m, "maxpool2d"),
    nn.AvgPool2d: lambda m: _pool(m, "avgpool2d"),
    nn.Dropout: lambda m: ("dropout", {"p": m.p}),
    nn.Identity: lambda m: ("identity", {}),
    nn.Flatten: lambda m: ("flatten", {"start_dim": m.start_dim, "end_dim": m.end_dim}),
    nn.Linear: lambda m: ("linear", {"out_features": m.out_features, "bias": m.bias is not None}),
}

_UNARY_FUNCS: dict[Any, str] = {
    F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.silu: "silu", torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid", torch.tanh: "tanh", F.tanh: "tanh", F.hardswish: "hardswish",
    F.hardsigmoid: "hardsigmoid",
}
_BINARY_FUNCS: dict[Any, str] = {
    operator.add: "add", operator.iadd: "add", torch.add: "add", operator.mul: "mul", operator.imul: "mul",
    torch.mul: "mul", torch.maximum: "max", torch.max: "max",
}
_UNARY_METHODS = {"relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}
_ALIASES = {"contiguous", "clone", "detach"}


def _module_path(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else "<top level>"


class _Converter:
    """Walks a traced, shape-propagated GraphModule and emits IR nodes."""

    def __init__(self, gm: fx.GraphModule, name: str, input_shape: tuple[int, ...]) -> None:
        self.gm = gm
        self.input_shape = input_shape
        self.graph = Graph(name)
        self.value: dict[fx.Node, str] = {}
        self.modules = dict(gm.named_modules())

    def tensor_args(self, node: fx.Node, args: Any) -> list[str]:
        out = []
        for a in args:
            if not isinstance(a, fx.Node) or a not in self.value:
                raise ValueError(f"argument {a!r} is not a tensor computed by the graph "
                                 "(constants and scalars as operands are not supported)")
            out.append(self.value[a])
        return out

    def convert(self) -> Graph:
        for node in self.gm.graph.nodes:
            try:
                self.visit(node)
            except AutomtlError:
                raise
            except (ValueError, TypeError, KeyError) as e:
                raise UnsupportedOpError(self.describe(node) + f": {e}") from None
        return self.graph

    def describe(self, node: fx.Node) -> str:
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.target)
        return f"fx node '{node.name}' ({node.op} {target}) in module '{_module_path(node)}'"

    def emit(self, node: fx.Node, op: str, attrs: dict[str, Any], inputs: list[str],
             params: dict[str, torch.Tensor] | None = None, buffers: dict[str, torch.Tensor] | None = None) -> None:
        self.graph.add_node(node.name, op, inputs, attrs, params=params, buffers=buffers,
                            source=_module_path(node) if node.op == "call_module" else
                            f"{_module_path(node)}:{node.name}")
        self.value[node] = node.name

    def visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            if self.graph.inputs:
                raise ValueError("modules with more than one input are not supported")
            self.graph.add_input(node.name, self.input_shape)
            self.value[node] = node.name
        elif node.op == "output":
            outs = fx.node.map_arg(node.args[0], lambda n: n)
            flat: list[fx.Node] = []
            fx.node.map_aggregate(outs, lambda a: flat.append(a) if isinstance(a, fx.Node) else None)
            self.graph.set_outputs([self.value[n] for n in flat])
        elif node.op == "call_method" and node.target == "size" or node.target is getattr:
            return
        elif node.op == "call_module":
            self.visit_module(node)
        elif node.op == "call_function":
            self.visit_function(node)
        elif node.op == "call_method":
            self.visit_method(node)
        else:
            raise ValueError(f"'{node.op}' nodes (module attributes used as tensors) are not supported")

    def visit_module(self, node: fx.Node) -> None:
        m = self.modules[str(node.target)]
        if type(m).__name__ == "StochasticDepth":
            op, attrs = "stochastic_depth", {"p": m.p, "mode": m.mode}
        elif type(m) in (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d):
            op, attrs = _adaptive(m.output_size, "adaptive_avgpool2d" if isinstance(m, nn.AdaptiveAvgPool2d)
                                  else "adaptive_maxpool2d")
            if getattr(m, "return_indices", False):
                raise ValueError("return_indices=True is not supported")
        elif type(m) in _MODULES:
            op, attrs = _MODULES[type(m)](m)
        else:
            raise UnsupportedOpError(f"{self.describe(node)}: layer type {type(m).__name__} has no IR op; "
                                     f"supported layers: {', '.join(sorted(t.__name__ for t in _MODULES))}")
        params = {k: p.detach().clone() for k, p in m.named_parameters(recurse=False)}
        buffers = {k: b.detach().clone() for k, b in m.named_buffers(recurse=False) if b is not None}
        self.emit(node, op, attrs, self.tensor_args(node, node.args[:1]), params, buffers)

    def visit_function(self, node: fx.Node) -> None:
        f, args, kw = node.target, node.args, node.kwargs
        if f in _UNARY_FUNCS:
            self.emit(node, _UNARY_FUNCS[f], {}, self.tensor_args(node, args[:1]))
        elif f in _BINARY_FUNCS:
            if f is torch.add and (len(args) > 2 or "alpha" in kw):
                raise ValueError("torch.add with alpha is not supported")
            if f is torch.max and len(args) != 2:
                raise ValueError("torch.max as a reduction is not supported; only max(a, b)")
            self.emit(node, _BINARY_FUNCS[f], {}, self.tensor_args(node, args[:2]))
        elif f is torch.cat or f is torch.concat:
            dim = args[1] if len(args) > 1 else kw.get("dim", 0)
            self.emit(node, "concat", {"dim": dim}, self.tensor_args(node, args[0]))
        elif f is torch.flatten:
            start = args[1] if len(args) > 1 else kw.get("start_dim", 0)
            end = args[2] if len(args) > 2 else kw.get("end_dim", -1)
            self.emit(node, "flatten", {"start_dim": start, "end_dim": end}, self.tensor_args(node, args[:1]))
        elif f in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
            size = args[1] if len(args) > 1 else kw["output_size"]
            op = "adaptive_avgpool2d" if f is F.adaptive_avg_pool2d else "adaptive_maxpool2d"
            self.emit(node, *_adaptive(size, op), self.tensor_args(node, args[:1]))
        elif f in (F.dropout, F.gelu, F.leaky_relu, F.hardtanh, F.max_pool2d, F.avg_pool2d):
            self.visit_functional_layer(node)
        elif f is torch.mean:
            self.visit_mean(node)
        else:
            raise UnsupportedOpError(f"{self.describe(node)}: function has no IR op")

    def visit_functional_layer(self, node: fx.Node) -> None:
        """Functional forms of layers: bind their arguments through the matching nn module's constructor."""
        f, args, kw = node.target, node.args, dict(node.kwargs)
        kw.pop("inplace", None)
        bound = {F.dropout: nn.Dropout, F.gelu: nn.GELU, F.leaky_relu: nn.LeakyReLU, F.hardtanh: nn.Hardtanh,
                 F.max_pool2d: nn.MaxPool2d, F.avg_pool2d: nn.AvgPool2d}[f]  # type: ignore[index]
        if f is F.dropout:
            kw.pop("training", None)
            layer = bound(*args[1:2], **{k: v for k, v in kw.items() if k == "p"})
        elif f is F.max_pool2d:
            kw.pop("return_indices", None)
            layer = bound(*args[1:], **kw)
        else:
            layer = bound(*args[1:], **kw)
        op, attrs = _MODULES[bound](layer)
        self.emit(node, op, attrs, self.tensor_args(node, args[:1]))

    def visit_mean(self, node: fx.Node) -> None:
        args, kw = node.args, node.kwargs
        dim = args[1] if len(args) > 1 else kw.get("dim")
        if dim is None:
            raise ValueError("mean over all dimensions is not supported; give dim")
        keep = args[2] if len(args) > 2 else kw.get("keepdim", False)
        dim = [dim] if isinstance(dim, int) else list(dim)
        self.emit(node, "mean", {"dim": dim, "keepdim": keep}, self.tensor_args(node, args[:1]))

    def visit_method(self, node: fx.Node) -> None:
        name = node.target
        if name in _UNARY_METHODS:
            self.emit(node, _UNARY_METHODS[name], {}, self.tensor_args(node, node.args[:1]))
        elif name in _ALIASES:
            self.value[node] = self.tensor_args(node, node.args[:1])[0]
        elif name == "mean":
            self.visit_mean(node)
        elif name == "flatten":
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            self.emit(node, "flatten", {"start_dim": start, "end_dim": end}, self.tensor_args(node, node.args[:1]))
        elif name in ("view", "reshape"):
            dims = node.args[1:]
            if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
                dims = tuple(dims[0])
            batch = dims[0] if dims else None
            keeps_batch = isinstance(batch, fx.Node) and batch.op == "call_method" and batch.target == "size" \
                and batch.args[0] is node.args[0] and batch.args[1:] == (0,)
            if len(dims) != 2 or dims[1] != -1 or not keeps_batch:
                raise ValueError(f"{name}{tuple(dims)} is not a flatten to (x.size(0), -1)")
            self.emit(node, "flatten", {"start_dim": 1, "end_dim": -1}, self.tensor_args(node, node.args[:1]))
        elif name in ("add", "mul") and len(node.args) == 2:
            self.emit(node, name, {}, self.tensor_args(node, node.args))
        else:
            raise UnsupportedOpError(f"{self.describe(node)}: tensor method '{name}' has no IR op")


def from_module(module: nn.Module, *, input_shape: tuple[int, ...] = (1, 3, 224, 224)) -> Graph:
    """Trace ``module`` with torch.fx and convert it to a Graph with shapes and copied tensors.

    Nothing runs the module: its state (training flag, batch-norm statistics) is untouched.
    """
    try:
        fx_graph = _Tracer().trace(module)
    except Exception as e:  # tracing runs user code: any failure becomes a readable error
        raise UnsupportedOpError(f"torch.fx could not trace {type(module).__name__}: {type(e).__name__}: {e}. "
                                 "Data-dependent control flow is not traceable; export the model to ONNX "
                                 "and load the .onnx file instead") from None
    gm = fx.GraphModule(module, fx_graph, type(module).__name__)
    graph = _Converter(gm, type(module).__name__.lower(), tuple(input_shape)).convert()
    try:
        return graph.materialise(seed=None)
    except ShapeError as e:
        raise ShapeError(f"{e}; the input shape was {list(input_shape)}: pass the input_shape the model "
                         "expects") from None
