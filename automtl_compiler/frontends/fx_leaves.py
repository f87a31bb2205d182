"""Layer classes that the fx frontend records as single calls, each mapped onto one or a few IR nodes.

torch.nn layers are looked up by exact class (a subclass with its own ``forward`` is traced through);
timm and torchvision layers by ``module.QualName``, so that neither library has to be imported. A layer
whose behaviour depends on the input size (TF 'same' padding, ``nn.Upsample`` with a scale factor) gets
its padding or size computed from the static input shape. Parameters keep their module names (``weight``,
``bias``, ``gain``, ...), so weight files map onto the nodes by the module path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedOpError
from .fx_trace import Emitter, TensorValue
from .padding import same_padding

Leaf = Callable[[Emitter, Any, TensorValue], Any]


def pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def tf_same_pads(size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int],
                 dilation: tuple[int, int]) -> tuple[int, int, int, int]:
    """TensorFlow 'SAME' padding of an input of spatial ``size``: (left, right, top, bottom), the odd pixel
    after (right/bottom). The output size is ceil(size / stride)."""
    (top, bottom), (left, right) = (same_padding(*axis) for axis in zip(size, kernel, stride, dilation))
    return left, right, top, bottom


def _padded(e: Emitter, x: TensorValue, pads: tuple[int, int, int, int]) -> tuple[TensorValue, tuple[int, int]]:
    """Symmetric padding stays in the layer's ``padding``; asymmetric padding becomes a pad node first."""
    left, right, top, bottom = pads
    if left == right and top == bottom:
        return x, (top, left)
    return e.emit("pad", {"pads": [left, right, top, bottom]}, [x], part="pad"), (0, 0)


# ---------------------------------------------------------------- convolutions

def _conv_pads(m: nn.Conv2d, x: TensorValue, same: bool) -> tuple[int, int, int, int]:
    if same:
        return tf_same_pads(x.shape[2:], m.kernel_size, m.stride, m.dilation)
    padding = m.padding
    if padding == "valid":
        return 0, 0, 0, 0
    if padding == "same":
        totals = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
        (top, bottom), (left, right) = ((t // 2, t - t // 2) for t in totals)
        return left, right, top, bottom
    ph, pw = pair(padding)
    return pw, pw, ph, ph


def conv2d(e: Emitter, m: Any, x: TensorValue, *, same: bool = False,
           params: dict[str, torch.Tensor] | None = None, **extra: Any) -> TensorValue:
    """A convolution layer (with TF 'same' padding, weight standardisation or gain when asked); ``params``
    replaces the layer's own tensors (for ``F.conv2d``)."""
    if m.padding_mode not in ("zeros", "reflect", "replicate"):
        raise UnsupportedOpError(f"padding_mode='{m.padding_mode}' has no IR op (use zeros, reflect or replicate)")
    pads = _conv_pads(m, x, same)
    if m.padding_mode != "zeros" and any(pads):
        left, right, top, bottom = pads
        x = e.emit("pad", {"pads": [left, right, top, bottom], "mode": m.padding_mode}, [x], part="pad")
        padding: tuple[int, int] = (0, 0)
    else:
        x, padding = _padded(e, x, pads)
    attrs = {"out_channels": m.out_channels, "kernel_size": m.kernel_size, "stride": m.stride,
             "padding": padding, "dilation": m.dilation, "groups": m.groups, "bias": m.bias is not None, **extra}
    return e.emit("conv2d", attrs, [x], e.params_of(m) if params is None else params)


def _std_conv(e: Emitter, m: Any, x: TensorValue) -> TensorValue:
    return conv2d(e, m, x, same=bool(getattr(m, "same_pad", False)), weight_std=m.eps)


def _scaled_std_conv(e: Emitter, m: Any, x: TensorValue) -> TensorValue:
    return conv2d(e, m, x, same=bool(getattr(m, "same_pad", False)), weight_std=m.eps, weight_gain=True,
                  weight_scale=float(m.scale))


def _conv_transpose(e: Emitter, m: nn.ConvTranspose2d, x: TensorValue) -> TensorValue:
    if m.padding_mode != "zeros":
        raise UnsupportedOpError(f"padding_mode='{m.padding_mode}' is not supported for transposed convolution")
    attrs = {"out_channels": m.out_channels, "kernel_size": m.kernel_size, "stride": m.stride,
             "padding": m.padding, "output_padding": m.output_padding, "dilation": m.dilation,
             "groups": m.groups, "bias": m.bias is not None}
    return e.emit("conv_transpose2d", attrs, [x], e.params_of(m))


def _linear(e: Emitter, m: nn.Linear, x: TensorValue) -> TensorValue:
    return e.emit("linear", {"out_features": m.out_features, "bias": m.bias is not None}, [x], e.params_of(m))


# ---------------------------------------------------------------- normalisation

def batchnorm(e: Emitter, m: nn.BatchNorm2d, x: TensorValue) -> TensorValue:
    """Batch norm over the channels of a 4-D tensor (its training behaviour is the IR op's)."""
    if m.momentum is None:
        raise UnsupportedOpError("momentum=None (cumulative moving average) is not supported")
    attrs = {"eps": m.eps, "momentum": m.momentum, "affine": m.affine, "track_running_stats": m.track_running_stats}
    return e.emit("batchnorm2d", attrs, [x], e.params_of(m), e.buffers_of(m))


def _then_drop_act(e: Emitter, m: Any, y: TensorValue) -> Any:
    """timm's norm-act layers: the norm, then ``drop``, then ``act`` (each may be Identity)."""
    y = e.leaf(m.drop, y, "drop")
    return e.leaf(m.act, y, "act")


def _layernorm(e: Emitter, m: nn.LayerNorm, x: TensorValue, dim: int = -1) -> TensorValue:
    if len(m.normalized_shape) != 1:
        raise UnsupportedOpError(f"LayerNorm over {len(m.normalized_shape)} dimensions {list(m.normalized_shape)} "
                                 "has no IR op; only one normalised dimension is supported")
    if getattr(m, "bias", None) is None and m.elementwise_affine:
        raise UnsupportedOpError("LayerNorm with a weight but no bias is not supported")
    return e.emit("layernorm", {"dim": dim, "eps": m.eps, "affine": m.elementwise_affine}, [x], e.params_of(m))


def _groupnorm(e: Emitter, m: nn.GroupNorm, x: TensorValue) -> TensorValue:
    return e.emit("groupnorm", {"num_groups": m.num_groups, "eps": m.eps, "affine": m.affine}, [x], e.params_of(m))


def _lrn(e: Emitter, m: nn.LocalResponseNorm, x: TensorValue) -> TensorValue:
    return e.emit("lrn", {"size": m.size, "alpha": m.alpha, "beta": m.beta, "k": m.k}, [x])


# ---------------------------------------------------------------- pooling, resizing, padding

def pool(e: Emitter, m: Any, x: TensorValue, op: str) -> TensorValue:
    attrs = {"kernel_size": pair(m.kernel_size), "stride": pair(m.stride or m.kernel_size),
             "padding": pair(m.padding), "ceil_mode": m.ceil_mode}
    if op == "maxpool2d":
        if m.return_indices:
            raise UnsupportedOpError("return_indices=True is not supported")
        attrs["dilation"] = pair(m.dilation)
    else:
        if m.divisor_override is not None:
            raise UnsupportedOpError("divisor_override is not supported")
        attrs["count_include_pad"] = m.count_include_pad
    return e.emit(op, attrs, [x])


def _max_pool_same(e: Emitter, m: Any, x: TensorValue) -> TensorValue:
    """timm's MaxPool2dSame: TF 'same' padding with the lowest float (as good as -inf for a max), then pool."""
    kernel, stride, dilation = pair(m.kernel_size), pair(m.stride or m.kernel_size), pair(m.dilation)
    pads = list(tf_same_pads(x.shape[2:], kernel, stride, dilation))
    if any(pads):
        x = e.emit("pad", {"pads": pads, "value": float(torch.finfo(torch.float32).min)}, [x], part="pad")
    attrs = {"kernel_size": kernel, "stride": stride, "padding": (0, 0), "dilation": dilation,
             "ceil_mode": m.ceil_mode}
    return e.emit("maxpool2d", attrs, [x])


def adaptive_size(size: Any, x: TensorValue) -> tuple[int, int]:
    """An adaptive pooling's output size, with ``None`` (keep that input size) filled in."""
    h, w = (size, size) if size is None or isinstance(size, int) else size
    return (x.shape[2] if h is None else int(h)), (x.shape[3] if w is None else int(w))


def _adaptive(e: Emitter, m: Any, x: TensorValue, op: str) -> TensorValue:
    if getattr(m, "return_indices", False):
        raise UnsupportedOpError("return_indices=True is not supported")
    return e.emit(op, {"output_size": adaptive_size(m.output_size, x)}, [x])


def resize_size(x: TensorValue, size: Any, scale: Any) -> tuple[int, int]:
    """Output size of an interpolation given ``size`` or ``scale_factor`` (floor of size * scale, as torch)."""
    if size is not None:
        return pair(size)
    if scale is None:
        raise UnsupportedOpError("interpolation needs size or scale_factor")
    sh, sw = (scale, scale) if isinstance(scale, (int, float)) else scale
    return math.floor(x.shape[2] * sh), math.floor(x.shape[3] * sw)


def resize(e: Emitter, x: TensorValue, size: Any, scale: Any, mode: str, align_corners: Any) -> TensorValue:
    """``F.interpolate`` / ``nn.Upsample`` on a 4-D tensor: nearest or bilinear at a static output size."""
    if len(x.shape) != 4:
        raise UnsupportedOpError(f"interpolation of a {len(x.shape)}-D tensor is not supported (only 4-D)")
    if mode not in ("nearest", "bilinear"):
        raise UnsupportedOpError(f"interpolation mode '{mode}' has no IR op (use nearest or bilinear)")
    out = resize_size(x, size, scale)
    if size is None and mode == "nearest":
        factors = [o / i for o, i in zip(out, x.shape[2:])]
        given = (scale, scale) if isinstance(scale, (int, float)) else tuple(scale)
        if any(abs(f - g) > 1e-9 for f, g in zip(factors, given)):
            raise UnsupportedOpError(f"nearest interpolation by scale_factor={scale} of a {x.shape[2]}x{x.shape[3]} "
                                     "map is not a whole output size; give size= instead")
    attrs = {"size": out, "mode": mode, "align_corners": bool(align_corners) if mode == "bilinear" else False}
    return e.emit("resize", attrs, [x])


def _upsample(e: Emitter, m: nn.Upsample, x: TensorValue) -> TensorValue:
    return resize(e, x, m.size, m.scale_factor, m.mode, m.align_corners)


def _pad_layer(e: Emitter, m: Any, x: TensorValue, mode: str) -> TensorValue:
    pads = [int(p) for p in m.padding] if not isinstance(m.padding, int) else [m.padding] * 4
    if len(pads) != 4:
        raise UnsupportedOpError(f"padding {pads} is not (left, right, top, bottom)")
    attrs: dict[str, Any] = {"pads": pads, "mode": mode}
    if mode == "constant":
        attrs["value"] = float(getattr(m, "value", 0.0))
    return e.emit("pad", attrs, [x])


# ---------------------------------------------------------------- activations and regularisers

def _simple(op: str, **attrs: Any) -> Leaf:
    return lambda e, m, x: e.emit(op, dict(attrs), [x])


def _alias(e: Emitter, m: Any, x: TensorValue) -> TensorValue:
    return x


def _dropout(e: Emitter, m: Any, x: TensorValue) -> TensorValue:
    return e.emit("dropout", {"p": m.p}, [x]) if m.p > 0 else x


def _drop_path(e: Emitter, m: Any, x: TensorValue) -> TensorValue:
    if not m.drop_prob:
        return x
    if not getattr(m, "scale_by_keep", True):
        raise UnsupportedOpError("DropPath with scale_by_keep=False has no IR op")
    return e.emit("stochastic_depth", {"p": m.drop_prob, "mode": "row"}, [x])


def _prelu(e: Emitter, m: nn.PReLU, x: TensorValue) -> TensorValue:
    return e.emit("prelu", {"num_parameters": m.num_parameters}, [x], e.params_of(m))


TORCH_LEAVES: dict[type, Leaf] = {
    nn.Conv2d: conv2d,
    nn.ConvTranspose2d: _conv_transpose,
    nn.Linear: _linear,
    nn.BatchNorm2d: batchnorm,
    nn.LayerNorm: _layernorm,
    nn.GroupNorm: _groupnorm,
    nn.LocalResponseNorm: _lrn,
    nn.ReLU: _simple("relu"),
    nn.ReLU6: _simple("relu6"),
    nn.SiLU: _simple("silu"),
    nn.Sigmoid: _simple("sigmoid"),
    nn.Tanh: _simple("tanh"),
    nn.Hardswish: _simple("hardswish"),
    nn.Hardsigmoid: _simple("hardsigmoid"),
    nn.Mish: _simple("mish"),
    nn.GELU: lambda e, m, x: e.emit("gelu", {"approximate": m.approximate}, [x]),
    nn.LeakyReLU: lambda e, m, x: e.emit("leaky_relu", {"negative_slope": m.negative_slope}, [x]),
    nn.Hardtanh: lambda e, m, x: e.emit("clip", {"min": m.min_val, "max": m.max_val}, [x]),
    nn.ELU: lambda e, m, x: e.emit("elu", {"alpha": m.alpha}, [x]),
    nn.Softplus: lambda e, m, x: e.emit("softplus", {"beta": m.beta, "threshold": m.threshold}, [x]),
    nn.Softmax: lambda e, m, x: e.emit("softmax", {"dim": m.dim}, [x]),
    nn.PReLU: _prelu,
    nn.MaxPool2d: lambda e, m, x: pool(e, m, x, "maxpool2d"),
    nn.AvgPool2d: lambda e, m, x: pool(e, m, x, "avgpool2d"),
    nn.AdaptiveAvgPool2d: lambda e, m, x: _adaptive(e, m, x, "adaptive_avgpool2d"),
    nn.AdaptiveMaxPool2d: lambda e, m, x: _adaptive(e, m, x, "adaptive_maxpool2d"),
    nn.Upsample: _upsample,
    nn.ZeroPad2d: lambda e, m, x: _pad_layer(e, m, x, "constant"),
    nn.ConstantPad2d: lambda e, m, x: _pad_layer(e, m, x, "constant"),
    nn.ReflectionPad2d: lambda e, m, x: _pad_layer(e, m, x, "reflect"),
    nn.ReplicationPad2d: lambda e, m, x: _pad_layer(e, m, x, "replicate"),
    nn.Dropout: _dropout,
    nn.Dropout2d: _dropout,
    nn.Identity: _alias,
    nn.Flatten: lambda e, m, x: e.emit("flatten", {"start_dim": m.start_dim, "end_dim": m.end_dim}, [x]),
}

_T = "timm.layers."
NAMED_LEAVES: dict[str, Leaf] = {
    "torchvision.ops.stochastic_depth.StochasticDepth":
        lambda e, m, x: e.emit("stochastic_depth", {"p": m.p, "mode": m.mode}, [x]) if m.p else x,
    _T + "norm_act.BatchNormAct2d": lambda e, m, x: _then_drop_act(e, m, batchnorm(e, m, x)),
    _T + "norm_act.GroupNormAct": lambda e, m, x: _then_drop_act(e, m, _groupnorm(e, m, x)),
    _T + "norm_act.GroupNorm1Act": lambda e, m, x: _then_drop_act(e, m, _groupnorm(e, m, x)),
    _T + "norm_act.LayerNormAct": lambda e, m, x: _then_drop_act(e, m, _layernorm(e, m, x)),
    _T + "norm_act.LayerNormAct2d": lambda e, m, x: _then_drop_act(e, m, _layernorm(e, m, x, dim=1)),
    _T + "norm.LayerNorm": _layernorm,
    _T + "norm.LayerNorm2d": lambda e, m, x: _layernorm(e, m, x, dim=1),
    _T + "norm.GroupNorm": _groupnorm,
    _T + "norm.GroupNorm1": _groupnorm,
    _T + "conv2d_same.Conv2dSame": lambda e, m, x: conv2d(e, m, x, same=True),
    _T + "pool2d_same.MaxPool2dSame": _max_pool_same,
    _T + "std_conv.StdConv2d": _std_conv,
    _T + "std_conv.StdConv2dSame": _std_conv,
    _T + "std_conv.ScaledStdConv2d": _scaled_std_conv,
    _T + "std_conv.ScaledStdConv2dSame": _scaled_std_conv,
    _T + "linear.Linear": _linear,
    _T + "drop.DropPath": _drop_path,
    _T + "activations.Swish": _simple("silu"),
    _T + "activations.Sigmoid": _simple("sigmoid"),
    _T + "activations.Tanh": _simple("tanh"),
    _T + "activations.HardSwish": _simple("hardswish"),
    _T + "activations.HardSigmoid": _simple("hardsigmoid"),
    _T + "activations.Mish": _simple("mish"),
    _T + "activations.GELU": _simple("gelu"),
    _T + "activations.GELUTanh": _simple("gelu", approximate="tanh"),
    _T + "activations.PReLU": _prelu,
    _T + "activations_me.SwishMe": _simple("silu"),
    _T + "activations_me.MishMe": _simple("mish"),
    _T + "activations_me.HardSwishMe": _simple("hardswish"),
    _T + "activations_me.HardSigmoidMe": _simple("hardsigmoid"),
    "automtl_compiler.ir.modules.StdConv2d": lambda e, m, x: conv2d(
        e, m, x, weight_std=m.eps, weight_gain=m.gain is not None, weight_scale=float(m.scale)),
    "automtl_compiler.ir.modules.LayerNormDim": lambda e, m, x: e.emit(
        "layernorm", {"dim": m.dim, "eps": m.eps, "affine": m.weight is not None}, [x], e.params_of(m)),
}


def leaf_of(m: nn.Module) -> Leaf | None:
    """The IR mapping of a layer recorded as one call, or None when the layer is traced through."""
    cls = type(m)
    found = TORCH_LEAVES.get(cls)
    return found if found is not None else NAMED_LEAVES.get(f"{cls.__module__}.{cls.__qualname__}")
