"""torch functions and tensor methods on traced tensors -> IR nodes: arithmetic, activations, reductions
and the functional forms of layers.

Each handler takes (emitter, args, kwargs) with traced tensors already replaced by their
:class:`TensorValue`; shapes are static, so every argument is a Python value. Arithmetic with a Python
number becomes an ``affine`` node (x * 0.5, x + 3, 1 - x, x ** 2); with a torch tensor (a parameter or
buffer read in ``forward``) a ``tensor`` constant. Shape manipulation lives in :mod:`.fx_tensors`.
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UnsupportedOpError
from . import fx_leaves as leaves
from .fx_trace import Emitter, Opaque, TensorValue

Handler = Callable[[Emitter, tuple[Any, ...], dict[str, Any]], Any]
REQUIRED = object()


def arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, name: str, default: Any = REQUIRED) -> Any:
    """Argument ``i`` (positional) or ``name`` (keyword) of a call, else ``default``."""
    if len(args) > i:
        return args[i]
    if name in kwargs:
        return kwargs[name]
    if default is REQUIRED:
        raise UnsupportedOpError(f"missing argument '{name}'")
    return default


def is_number(v: Any) -> bool:
    """A Python (or numpy) scalar, not a tensor."""
    return isinstance(v, numbers.Real)


def tensor_value(v: Any, what: str = "input") -> TensorValue:
    """A traced tensor argument, or an error saying what was given instead."""
    if not isinstance(v, TensorValue):
        raise UnsupportedOpError(f"the {what} is a {type(v).__name__}, not a traced tensor")
    return v


# ---------------------------------------------------------------- arithmetic

def affine(e: Emitter, x: TensorValue, scale: float = 1.0, shift: float = 0.0, power: float = 1.0) -> TensorValue:
    """(scale * x + shift) ** power, or x itself when that is the identity."""
    if scale == 1.0 and shift == 0.0 and power == 1.0:
        return x
    return e.emit("affine", {"scale": float(scale), "shift": float(shift), "power": float(power)}, [x])


def _scalar_right(e: Emitter, op: str, x: TensorValue, c: float) -> TensorValue:
    if op == "add":
        return affine(e, x, shift=c)
    if op == "sub":
        return affine(e, x, shift=-c)
    if op == "mul":
        return affine(e, x, scale=c)
    if op == "div":
        if c == 0:
            raise UnsupportedOpError("division by the constant 0")
        return affine(e, x, scale=1.0 / c)
    if c == 0.5:
        return e.emit("sqrt", {}, [x])
    return affine(e, x, power=c)


def _scalar_left(e: Emitter, op: str, c: float, x: TensorValue) -> TensorValue:
    if op in ("add", "mul"):
        return _scalar_right(e, op, x, c)
    if op == "sub":
        return affine(e, x, scale=-1.0, shift=c)
    if op == "div":
        return affine(e, e.emit("reciprocal", {}, [x]), scale=c)
    raise UnsupportedOpError("a number raised to a tensor power has no IR op")


def arithmetic(e: Emitter, op: str, a: Any, b: Any) -> TensorValue:
    """a <op> b for op in add, sub, mul, div, pow, with tensors, torch constants or Python numbers."""
    if is_number(b) and not is_number(a):
        return _scalar_right(e, op, e.tensor(a), float(b))
    if is_number(a) and not is_number(b):
        return _scalar_left(e, op, float(a), e.tensor(b))
    if op == "pow":
        raise UnsupportedOpError("a tensor raised to a tensor power has no IR op")
    return e.emit(op, {}, [e.tensor(a), e.tensor(b)])


def _binary(op: str) -> Handler:
    def handler(e: Emitter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        a, b = args[0], arg(args, kwargs, 1, "other")
        alpha = kwargs.get("alpha", 1)
        if alpha != 1:
            b = b * alpha if is_number(b) else arithmetic(e, "mul", b, alpha)
        if kwargs.get("rounding_mode") is not None:
            raise UnsupportedOpError(f"division with rounding_mode='{kwargs['rounding_mode']}' has no IR op")
        return arithmetic(e, op, a, b)
    return handler


def _reversed(op: str) -> Handler:
    return lambda e, args, kwargs: arithmetic(e, op, args[1], args[0])


def _maximum(e: Emitter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """torch.max(a, b) / torch.maximum: elementwise; torch.max(x, dim): a reduction (values, indices)."""
    other = arg(args, kwargs, 1, "other", None)
    if "dim" in kwargs or isinstance(other, int) and not isinstance(other, bool):
        return _max_reduction(e, args, kwargs)
    if other is None:
        raise UnsupportedOpError("max over all dimensions (including the batch) has no IR op; give dim")
    return e.emit("max", {}, [e.tensor(args[0]), e.tensor(other)])


def _max_reduction(e: Emitter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    dim = arg(args, kwargs, 1, "dim", None)
    if dim is None:
        raise UnsupportedOpError("max over all dimensions (including the batch) has no IR op; give dim")
    values = reduce(e, "amax", args[0], dim, arg(args, kwargs, 2, "keepdim", False))
    indices = Opaque(UnsupportedOpError("the indices of max(dim) have no IR op"))
    return torch.return_types.max((values, indices))


# ---------------------------------------------------------------- elementwise functions

def _unary(op: str, **names: tuple[int, Any]) -> Handler:
    """An elementwise op; ``names`` maps IR attributes to (argument position, default)."""
    def handler(e: Emitter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        attrs = {k: arg(args, kwargs, i, k, default) for k, (i, default) in names.items()}
        return e.emit(op, attrs, [tensor_value(args[0])])
    return handler


def _hardtanh(e: Emitter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    low, high = arg(args, kwargs, 1, "min_val", -1.0), arg(args, kwargs, 2, "max_val", 1.0)
    return e.emit("clip", {"min": low, "max": high}, [tensor_value(args[0])])


def _clamp(e: Emitter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    low, high = arg(args, kwargs, 1, "min", None), arg(args, kwargs, 2, "max", None)
    if not all(v is None or is_number(v) for v in (low, high)):
        raise UnsupportedOpError("clamp with tensor bounds has no IR op")
    low = float("-inf") if low is None else low
    high = float("inf") if high is None else high
    return e.emit("clip", {"min": low, "max": high}, [tensor_value(args[0])])


def _clamp_min(e: Emitter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return _clamp(e, (args[0], arg(args, kwargs, 1, "min")), {})


def _rsqrt(e: Emitter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return e.emit("reciprocal", {}, [e.emit("sqrt", {}, [tensor_value(args[0])], part="sqrt")])


def _neg(e: Emitter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return affine(e, tensor_value(args[0]), scale=-1.0)


def _prelu(e: Emitter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    weight = arg(args, kwargs, 1, "weight")
    return e.emit("prelu", {"num_parameters": weight.numel()}, [tensor_value(args[0])], {"weight": e.copy(weight)})


def _dropout(e: Emitter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    p = arg(args, kwargs, 1, "p", 0.5)
    x = tensor_value(args[0])
    return e.emit("dropout", {"p": p}, [x]) if p > 0 else x


def _identity_node(e: Emitter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return e.emit("identity", {}, [tensor_value(args[0])])


# ---------------------------------------------------------------- reductions and softmax

def reduce(e: Emitter, op: str, x: Any, dim: Any, keepdim: bool) -> TensorValue:
    """mean/sum/amax over ``dim`` (never the batch dimension)."""
    x = tensor_value(x)
    dims = [dim] if isinstance(dim, int) else list(dim)
    if not dims or any(d % len(x.shape) == 0 for d in dims):
        raise UnsupportedOpError(f"{op} over dims {dims} of a {len(x.shape)}-D tensor reduces the batch dimension; "
                                 "the IR keeps the batch")
    return e.emit(op, {"dim": dims, "keepdim": bool(keepdim)}, [x])


def _reduction(op: str) -> Handler:
    def handler(e: Emitter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        dim = arg(args, kwargs, 1, "dim", None)
        if dim is None:
            raise UnsupportedOpError(f"{op} over all dimensions (including the batch) has no IR op; give dim")
        if kwargs.get("dtype") not in (None, torch.float32):
            raise UnsupportedOpError(f"{op} with dtype={kwargs['dtype']} is not supported")
        return reduce(e, op, args[0], dim, arg(args, kwargs, 2, "keepdim", False))
    return handler


def _softmax(e: Emitter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    dim = arg(args, kwargs, 1, "dim", None)
    if dim is None:
        raise UnsupportedOpError("softmax without dim has no IR op; give dim")
    return e.emit("softmax", {"dim": dim}, [tensor_value(args[0])])


# ---------------------------------------------------------------- functional layers

def _conv2d(e: Emitter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    weight, bias = arg(args, kwargs, 1, "weight"), arg(args, kwargs, 2, "bias", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise UnsupportedOpError("conv2d needs a constant 4-D weight (a parameter), not a traced tensor")
    padding = arg(args, kwargs, 4, "padding", 0)
    layer = SimpleNamespace(
        out_channels=weight.shape[0], kernel_size=tuple(weight.shape[2:]), padding_mode="zeros", bias=bias,
        stride=leaves.pair(arg(args, kwargs, 3, "stride", 1)),
        dilation=leaves.pair(arg(args, kwargs, 5, "dilation", 1)),
        padding=padding if isinstance(padding, str) else leaves.pair(padding),
        groups=arg(args, kwargs, 6, "groups", 1))
    params = {"weight": e.copy(weight), **({"bias": e.copy(bias)} if bias is not None else {})}
    return leaves.conv2d(e, layer, tensor_value(args[0]), params=params)


def _affine_tensors(e: Emitter, weight: Any, bias: Any, n: int) -> dict[str, torch.Tensor]:
    if weight is None and bias is None:
        return {}
    return {"weight": e.copy(weight) if weight is not None else torch.ones(n),
            "bias": e.copy(bias) if bias is not None else torch.zeros(n)}


def _batch_norm(e: Emitter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x = tensor_value(args[0])
    mean, var = arg(args, kwargs, 1, "running_mean"), arg(args, kwargs, 2, "running_var")
    weight, bias = arg(args, kwargs, 3, "weight", None), arg(args, kwargs, 4, "bias", None)
    training = arg(args, kwargs, 5, "training", False)
    if mean is None or var is None or training:
        raise UnsupportedOpError("batch_norm with batch statistics (training=True or no running stats) has no IR op")
    params = _affine_tensors(e, weight, bias, x.shape[1])
    buffers = {"running_mean": e.copy(mean), "running_var": e.copy(var),
               "num_batches_tracked": torch.zeros((), dtype=torch.long)}
    attrs = {"eps": arg(args, kwargs, 7, "eps", 1e-5), "momentum": arg(args, kwargs, 6, "momentum", 0.1) or 0.1,
             "affine": bool(params)}
    return e.emit("batchnorm2d", attrs, [x], params, buffers)


def _layer_norm(e: Emitter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x, shape = tensor_value(args[0]), arg(args, kwargs, 1, "normalized_shape")
    shape = [shape] if isinstance(shape, int) else list(shape)
    if len(shape) != 1:
        raise UnsupportedOpError(f"layer_norm over {len(shape)} dimensions {shape} has no IR op; only one "
                                 "normalised dimension is supported")
    params = _affine_tensors(e, arg(args, kwargs, 2, "weight", None), arg(args, kwargs, 3, "bias", None), shape[0])
    attrs = {"dim": -1, "eps": arg(args, kwargs, 4, "eps", 1e-5), "affine": bool(params)}
    return e.emit("layernorm", attrs, [x], params)


def _group_norm(e: Emitter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x = tensor_value(args[0])
    params = _affine_tensors(e, arg(args, kwargs, 2, "weight", None), arg(args, kwargs, 3, "bias", None), x.shape[1])
    attrs = {"num_groups": arg(args, kwargs, 1, "num_groups"), "eps": arg(args, kwargs, 4, "eps", 1e-5),
             "affine": bool(params)}
    return e.emit("groupnorm", attrs, [x], params)


def _linear(e: Emitter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    weight, bias = arg(args, kwargs, 1, "weight"), arg(args, kwargs, 2, "bias", None)
    if not isinstance(weight, torch.Tensor):
        raise UnsupportedOpError("linear needs a constant weight (a parameter), not a traced tensor")
    params = {"weight": e.copy(weight), **({"bias": e.copy(bias)} if bias is not None else {})}
    return e.emit("linear", {"out_features": weight.shape[0], "bias": bias is not None},
                  [tensor_value(args[0])], params)


def _pool(op: str) -> Handler:
    def handler(e: Emitter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        kernel = arg(args, kwargs, 1, "kernel_size")
        layer = SimpleNamespace(kernel_size=kernel, stride=arg(args, kwargs, 2, "stride", None) or kernel,
                                padding=arg(args, kwargs, 3, "padding", 0))
        if op == "maxpool2d":
            layer.dilation = arg(args, kwargs, 4, "dilation", 1)
            layer.ceil_mode = arg(args, kwargs, 5, "ceil_mode", False)
            layer.return_indices = arg(args, kwargs, 6, "return_indices", False)
        else:
            layer.ceil_mode = arg(args, kwargs, 4, "ceil_mode", False)
            layer.count_include_pad = arg(args, kwargs, 5, "count_include_pad", True)
            layer.divisor_override = arg(args, kwargs, 6, "divisor_override", None)
        return leaves.pool(e, layer, tensor_value(args[0]), op)
    return handler


def _adaptive(op: str) -> Handler:
    def handler(e: Emitter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x = tensor_value(args[0])
        if arg(args, kwargs, 2, "return_indices", False):
            raise UnsupportedOpError("return_indices=True is not supported")
        return e.emit(op, {"output_size": leaves.adaptive_size(arg(args, kwargs, 1, "output_size"), x)}, [x])
    return handler


def _interpolate(e: Emitter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if kwargs.get("antialias"):
        raise UnsupportedOpError("interpolation with antialias=True has no IR op")
    return leaves.resize(e, tensor_value(args[0]), arg(args, kwargs, 1, "size", None),
                         arg(args, kwargs, 2, "scale_factor", None), arg(args, kwargs, 3, "mode", "nearest"),
                         arg(args, kwargs, 4, "align_corners", None))


def _lrn(e: Emitter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    attrs = {"size": arg(args, kwargs, 1, "size"), "alpha": arg(args, kwargs, 2, "alpha", 1e-4),
             "beta": arg(args, kwargs, 3, "beta", 0.75), "k": arg(args, kwargs, 4, "k", 1.0)}
    return e.emit("lrn", attrs, [tensor_value(args[0])])


# ---------------------------------------------------------------- tables

_ARITHMETIC = {"add": (operator.add, torch.add), "sub": (operator.sub, torch.sub),
               "mul": (operator.mul, torch.mul), "div": (operator.truediv, torch.div, torch.true_divide),
               "pow": (operator.pow, torch.pow)}
_SIMPLE = {"relu": (F.relu, torch.relu), "relu6": (F.relu6,), "silu": (F.silu,),
           "sigmoid": (F.sigmoid, torch.sigmoid), "tanh": (F.tanh, torch.tanh), "hardswish": (F.hardswish,),
           "hardsigmoid": (F.hardsigmoid,), "mish": (F.mish,), "exp": (torch.exp,), "log": (torch.log,),
           "sqrt": (torch.sqrt,), "abs": (torch.abs, operator.abs), "erf": (torch.erf, torch.special.erf),
           "reciprocal": (torch.reciprocal,)}

FUNCTIONS: dict[Any, Handler] = {
    **{f: _binary(op) for op, fs in _ARITHMETIC.items() for f in fs},
    operator.neg: _neg, torch.neg: _neg, operator.pos: lambda e, a, k: tensor_value(a[0]),
    torch.rsub: _reversed("sub"),
    torch.maximum: _maximum, torch.max: _maximum, torch.amax: _reduction("amax"),
    **{f: _unary(op) for op, fs in _SIMPLE.items() for f in fs},
    torch.rsqrt: _rsqrt,
    F.gelu: _unary("gelu", approximate=(1, "none")),
    F.leaky_relu: _unary("leaky_relu", negative_slope=(1, 0.01)),
    F.elu: _unary("elu", alpha=(1, 1.0)),
    F.softplus: _unary("softplus", beta=(1, 1.0), threshold=(2, 20.0)),
    F.hardtanh: _hardtanh, torch.clamp: _clamp, torch.clip: _clamp, torch.clamp_min: _clamp_min,
    torch.prelu: _prelu,
    F.dropout: _dropout, F.dropout2d: _dropout, torch.clone: _identity_node,
    torch.mean: _reduction("mean"), torch.sum: _reduction("sum"),
    F.softmax: _softmax, torch.softmax: _softmax,
    torch.conv2d: _conv2d, F.batch_norm: _batch_norm, F.layer_norm: _layer_norm, F.group_norm: _group_norm,
    F.linear: _linear,
    F.max_pool2d: _pool("maxpool2d"), F.avg_pool2d: _pool("avgpool2d"),
    F.adaptive_avg_pool2d: _adaptive("adaptive_avgpool2d"), F.adaptive_max_pool2d: _adaptive("adaptive_maxpool2d"),
    F.interpolate: _interpolate, F.upsample: _interpolate, F.local_response_norm: _lrn,
}

METHODS: dict[str, Handler] = {
    **{op: _binary(op) for op in _ARITHMETIC}, "true_divide": _binary("div"), "rsub": _reversed("sub"),
    "neg": _neg, "maximum": _maximum, "max": _maximum, "amax": _reduction("amax"),
    **{op: _unary(op) for op in _SIMPLE}, "rsqrt": _rsqrt,
    "clamp": _clamp, "clip": _clamp, "clamp_min": _clamp_min,
    "mean": _reduction("mean"), "sum": _reduction("sum"), "softmax": _softmax,
}
