"""Registry ops for arithmetic beyond convolution: elementwise functions, reductions, softmax,
normalisations (layer, group, local response), PReLU and transposed convolution."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GraphError, ShapeError
from . import functional as AF
from .modules import LayerNormDim
from .ops import (
    _DILATION,
    _KERNEL,
    _PADDING,
    _STRIDE,
    Attr,
    Lowering,
    OpDef,
    Shape,
    _broadcast,
    _check_conv,
    _check_dim,
    _conv_init,
    _elementwise_flops,
    _fn,
    _mean_shape,
    _need_rank,
    _numel,
    _same,
    register,
)

for _name, _f, _doc in [
    ("exp", torch.exp, "e ** x"), ("log", torch.log, "natural logarithm"), ("sqrt", torch.sqrt, "square root"),
    ("abs", torch.abs, "|x|"), ("erf", torch.erf, "the error function"),
    ("reciprocal", torch.reciprocal, "1 / x"), ("mish", F.mish, "x * tanh(softplus(x))"),
]:
    register(OpDef(name=_name, doc=_doc, shape=_same, lower=_fn(_f)))

register(OpDef(name="softplus", doc="log(1 + exp(beta * x)) / beta, linear above `threshold`.",
               attrs={"beta": Attr("float", 1.0, above=0.0), "threshold": Attr("float", 20.0)},
               shape=_same, lower=_fn(F.softplus)))
register(OpDef(name="elu", doc="x if x > 0 else alpha * (exp(x) - 1).", attrs={"alpha": Attr("float", 1.0)},
               shape=_same, lower=_fn(F.elu)))
register(OpDef(name="affine", doc="(scale * x + shift) ** power: arithmetic with scalars (Caffe's Power layer).",
               attrs={"scale": Attr("float", 1.0), "shift": Attr("float", 0.0), "power": Attr("float", 1.0)},
               shape=_same, lower=_fn(AF.affine)))

register(OpDef(name="sub", doc="a - b with broadcasting.", arity=(2, 2), shape=_broadcast, lower=_fn(torch.sub)))
register(OpDef(name="div", doc="a / b with broadcasting.", arity=(2, 2), shape=_broadcast, lower=_fn(torch.div)))

_REDUCE_ATTRS = {"dim": Attr("ints", nonempty=True), "keepdim": Attr("bool", False)}
register(OpDef(name="sum", doc="Sum over the given dimensions.", attrs=_REDUCE_ATTRS, shape=_mean_shape,
               flops=lambda a, ins, out: _numel(ins[0]), lower=_fn(torch.sum)))
register(OpDef(name="amax", doc="Maximum over the given dimensions.", attrs=_REDUCE_ATTRS, shape=_mean_shape,
               flops=lambda a, ins, out: _numel(ins[0]), lower=_fn(torch.amax)))


def _softmax_shape(a: dict[str, Any], ins: list[Shape]) -> Shape:
    _check_dim(a["dim"], len(ins[0]), "softmax over dimension")
    return ins[0]


register(OpDef(name="softmax", doc="exp(x) / sum(exp(x)) along `dim`.", attrs={"dim": Attr("int", 1)},
               shape=_softmax_shape, flops=lambda a, ins, out: 3 * _numel(out), lower=_fn(F.softmax)))

# ---------------------------------------------------------------- normalisation


def _affine_params(channels: Callable[[dict[str, Any], Shape], int]) -> Callable[..., dict[str, Shape]]:
    def rule(a: dict[str, Any], ins: list[Shape]) -> dict[str, Shape]:
        c = channels(a, ins[0])
        return {"weight": (c,), "bias": (c,)} if a["affine"] else {}
    return rule


def _affine_init(a: dict[str, Any], shapes: dict[str, Shape], gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"weight": torch.ones(shapes["weight"]), "bias": torch.zeros(shapes["bias"])} if shapes else {}


def _ln_channels(a: dict[str, Any], x: Shape) -> int:
    return x[_check_dim(a["dim"], len(x), "layer norm over dimension")]


def _affine_module(m: nn.Module, a: dict[str, Any], p: dict[str, torch.Tensor]) -> Lowering:
    """``m`` holding the node's affine weight and bias (when it has them) as its parameters."""
    if a["affine"]:
        m.weight, m.bias = nn.Parameter(p["weight"]), nn.Parameter(p["bias"])
    return Lowering(module=m)


def _ln_lower(a: dict[str, Any], p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> Lowering:
    return _affine_module(LayerNormDim(None, a["dim"], a["eps"]), a, p)


register(OpDef(
    name="layernorm", doc="Layer norm over one dimension: 1 = channels-first (ConvNeXt's LayerNorm2d), "
                          "-1 = the last (channels-last); biased variance.",
    attrs={"dim": Attr("int", 1), "eps": Attr("float", 1e-6, above=0.0), "affine": Attr("bool", True)},
    shape=lambda a, ins: (_ln_channels(a, ins[0]), ins[0])[1], params=_affine_params(_ln_channels),
    init=_affine_init, lower=_ln_lower, flops=lambda a, ins, out: 5 * _numel(out),
))


def _gn_channels(a: dict[str, Any], x: Shape) -> int:
    if len(x) < 2 or x[1] % a["num_groups"]:
        raise ShapeError(f"group norm: {x[1] if len(x) > 1 else 0} channels do not split into "
                         f"{a['num_groups']} groups")
    return x[1]


def _gn_lower(a: dict[str, Any], p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> Lowering:
    c = p["weight"].shape[0] if a["affine"] else a["num_groups"]
    return _affine_module(nn.GroupNorm(a["num_groups"], c, eps=a["eps"], affine=a["affine"]), a, p)


register(OpDef(
    name="groupnorm", doc="Group normalisation: channels in `num_groups` groups, each normalised over its "
                          "channels and positions.",
    attrs={"num_groups": Attr("int", low=1, limit="MAX_CHANNELS"), "eps": Attr("float", 1e-5, above=0.0),
           "affine": Attr("bool", True)},
    shape=lambda a, ins: (_gn_channels(a, ins[0]), ins[0])[1], params=_affine_params(_gn_channels),
    init=_affine_init, lower=_gn_lower, flops=lambda a, ins, out: 5 * _numel(out),
))


def _check_lrn(a: dict[str, Any], where: str) -> None:
    if a["region"] == "within" and a["size"] % 2 == 0:
        raise GraphError(f"{where}: local response normalisation within a channel needs an odd size, "
                         f"got {a['size']}")


def _lrn_shape(a: dict[str, Any], ins: list[Shape]) -> Shape:
    _need_rank(ins[0], 4, "lrn")
    return ins[0]


register(OpDef(
    name="lrn", doc="Local response normalisation x / (k + alpha / n * sum of x^2 over a window of n) ** beta; "
                    "the window is `size` neighbouring channels (across) or a size x size patch (within).",
    attrs={"size": Attr("int", low=1, limit="MAX_CHANNELS"), "alpha": Attr("float", 1e-4),
           "beta": Attr("float", 0.75), "k": Attr("float", 1.0),
           "region": Attr("str", "across", choices=("across", "within"))},
    check=_check_lrn, shape=_lrn_shape, lower=_fn(AF.lrn),
    flops=lambda a, ins, out: _numel(out) * (a["size"] * (a["size"] if a["region"] == "within" else 1) + 3),
))

# ---------------------------------------------------------------- layers with weights


def _prelu_params(a: dict[str, Any], ins: list[Shape]) -> dict[str, Shape]:
    n = a["num_parameters"]
    if n != 1 and (len(ins[0]) < 2 or ins[0][1] != n):
        raise ShapeError(f"prelu with {n} slopes on an input of shape {list(ins[0])}: use 1 or its channel count")
    return {"weight": (n,)}


def _prelu_lower(a: dict[str, Any], p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> Lowering:
    m = nn.PReLU(a["num_parameters"])
    m.weight = nn.Parameter(p["weight"])
    return Lowering(module=m)


register(OpDef(
    name="prelu", doc="max(x, 0) + slope * min(x, 0) with a learnt slope (one, or one per channel).",
    attrs={"num_parameters": Attr("int", 1, low=1, limit="MAX_CHANNELS")},
    shape=lambda a, ins: (_prelu_params(a, ins), ins[0])[1], params=_prelu_params,
    init=lambda a, shapes, gen: {"weight": torch.full(shapes["weight"], 0.25)}, lower=_prelu_lower,
    flops=_elementwise_flops,
))


def _deconv_params(a: dict[str, Any], ins: list[Shape]) -> dict[str, Shape]:
    _need_rank(ins[0], 4, "conv_transpose2d")
    cin = ins[0][1]
    if cin % a["groups"]:
        raise ShapeError(f"conv_transpose2d: {cin} input channels are not divisible by groups={a['groups']}")
    shapes = {"weight": (cin, a["out_channels"] // a["groups"], *a["kernel_size"])}
    if a["bias"]:
        shapes["bias"] = (a["out_channels"],)
    return shapes


def _deconv_shape(a: dict[str, Any], ins: list[Shape]) -> Shape:
    _deconv_params(a, ins)
    x = ins[0]
    hw = []
    for i in range(2):
        size = ((x[2 + i] - 1) * a["stride"][i] - 2 * a["padding"][i] + a["dilation"][i] * (a["kernel_size"][i] - 1)
                + a["output_padding"][i] + 1)
        if size < 1:
            raise ShapeError(f"conv_transpose2d output size {size} along dimension {2 + i} is not positive")
        hw.append(size)
    return (x[0], a["out_channels"], *hw)


def _check_deconv(a: dict[str, Any], where: str) -> None:
    _check_conv(a, where)
    for i in range(2):
        if a["output_padding"][i] >= max(a["stride"][i], a["dilation"][i]):
            raise GraphError(f"{where}: attribute 'output_padding' = {list(a['output_padding'])} must be smaller "
                             "than the stride or the dilation")


def _deconv_lower(a: dict[str, Any], p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> Lowering:
    w = p["weight"]
    m = nn.ConvTranspose2d(w.shape[0], a["out_channels"], a["kernel_size"], a["stride"], a["padding"],
                           a["output_padding"], a["groups"], a["bias"], a["dilation"], device="meta")
    m.weight = nn.Parameter(w)
    if a["bias"]:
        m.bias = nn.Parameter(p["bias"])
    return Lowering(module=m)


register(OpDef(
    name="conv_transpose2d", doc="Transposed 2-D convolution (Caffe's Deconvolution); not a policy unit.",
    attrs={"out_channels": Attr("int", low=1, limit="MAX_CHANNELS"), "kernel_size": _KERNEL, "stride": _STRIDE,
           "padding": _PADDING, "output_padding": Attr("pair", (0, 0), low=0, limit="MAX_SPATIAL"),
           "dilation": _DILATION, "groups": Attr("int", 1, low=1, limit="MAX_CHANNELS"), "bias": Attr("bool", False)},
    check=_check_deconv, shape=_deconv_shape, params=_deconv_params, lower=_deconv_lower,
    init=lambda a, shapes, gen: {**_conv_init(a, {"weight": shapes["weight"]}, gen),
                                 **({"bias": torch.zeros(shapes["bias"])} if "bias" in shapes else {})},
    flops=lambda a, ins, out: _numel(ins[0]) * a["out_channels"] // a["groups"] * a["kernel_size"][0]
    * a["kernel_size"][1],
))
