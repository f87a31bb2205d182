"""The op registry: every IR op is defined once, here.

An :class:`OpDef` gives an op's attribute schema, its arity, the shapes of its parameters and buffers, its
shape rule, its FLOP count and its torch lowering. Frontends map foreign operators onto these names;
backends lower them; nothing else knows what an op means.

FLOPs are counted as multiply-accumulates (the convention of torchvision's model tables and of the MTL
papers' "FLOPs" columns); parameter-free elementwise ops cost one per output element.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import limits
from ..errors import GraphError, ShapeError
from ..registry import Registry
from . import functional as AF
from .modules import StdConv2d, SubsampledConv2d

Shape = tuple[int, ...]
REQUIRED = object()


@dataclass(frozen=True)
class Attr:
    """One attribute of an op: its kind (int, float, bool, str, pair, ints, floats, shape), default and range.

    Numbers are checked after coercion: ``low``/``high`` are inclusive bounds, ``above`` an exclusive lower
    bound, ``limit`` the name of a size limit of :mod:`automtl_compiler.limits` (an upper bound that the
    user can raise); ``finite=False`` admits +-infinity (never NaN). ``choices`` lists the allowed strings;
    ``length`` fixes the number of ints or floats; ``nonempty`` refuses an empty list.
    """

    kind: str
    default: Any = REQUIRED
    low: float | None = None
    high: float | None = None
    above: float | None = None
    limit: str | None = None
    finite: bool = True
    choices: tuple[str, ...] | None = None
    length: int | None = None
    nonempty: bool = False

    def normalise(self, value: Any, where: str, key: str = "") -> Any:
        """Coerce ``value`` to this attribute's kind and check its range; raise GraphError naming ``where``
        and the attribute ``key`` if it is of the wrong type or out of range."""
        if value is None and self.default is None:
            return None
        name = f"attribute '{key}'" if key else "attribute"
        out = self._coerce(value)
        if out is None:
            raise GraphError(f"{where}: {name} value {value!r} is not {_KIND_TEXT[self.kind]}")
        problem, limit = self._range_problem(out)
        if limit:
            raise limits.LimitError(f"{where}: {name} = {_show(out)}: {problem}")
        if problem:
            raise GraphError(f"{where}: {name} = {_show(out)} is invalid: {problem}")
        return out

    def _coerce(self, value: Any) -> Any:
        if self.kind == "int":
            return int(value) if _is_int(value) else None
        if self.kind == "float":
            return float(value) if _is_real(value) else None
        if self.kind == "bool":
            if isinstance(value, (bool, np.bool_)) or (_is_int(value) and value in (0, 1)):
                return bool(value)
            return None
        if self.kind == "str":
            return value if isinstance(value, str) else None
        if self.kind in ("pair", "ints", "shape", "floats"):
            if self.kind == "pair" and _is_int(value):
                value = (value, value)
            if isinstance(value, (str, bytes, dict)) or not isinstance(value, Iterable):
                return None
            items = list(value)
            check = _is_real if self.kind == "floats" else _is_int
            if not all(check(v) for v in items):
                return None
            if self.kind == "pair" and len(items) != 2:
                return None
            return tuple(float(v) for v in items) if self.kind == "floats" else tuple(int(v) for v in items)
        raise AssertionError(f"unknown attribute kind {self.kind}")

    def _range_problem(self, value: Any) -> tuple[str | None, bool]:
        """(what is wrong, whether it is a size limit), or (None, False)."""
        if self.kind == "str":
            if self.choices is not None and value not in self.choices:
                return f"use one of {', '.join(repr(c) for c in self.choices)}", False
            return None, False
        if self.kind == "bool":
            return None, False
        items = value if isinstance(value, tuple) else (value,)
        if self.length is not None and len(items) != self.length:
            return f"it needs {self.length} values", False
        if self.nonempty and not items:
            return "it needs at least one value", False
        each = "each value" if isinstance(value, tuple) else "it"
        for v in items:
            if math.isnan(v) or (self.finite and math.isinf(v)):
                return ("it must be a finite number" if self.finite else "it must not be NaN"), False
            if self.low is not None and v < self.low:
                return f"{each} must be at least {_show(self.low)}", False
            if self.above is not None and v <= self.above:
                return f"{each} must be greater than {_show(self.above)}", False
            if self.high is not None and v > self.high:
                return f"{each} must be at most {_show(self.high)}", False
            if self.limit is not None and v > limits.get(self.limit):
                return (f"{v:,} is more than the limit {self.limit}={limits.get(self.limit):,}; "
                        f"{limits.how_to_raise(self.limit)}"), True
        return None, False


_KIND_TEXT = {"int": "an integer (not a bool or a float)", "float": "a number", "bool": "true or false",
              "str": "a string", "pair": "an integer or a pair of integers", "ints": "a list of integers",
              "shape": "a list of integers", "floats": "a list of numbers"}


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def _show(v: Any) -> str:
    if isinstance(v, tuple):
        return "[" + ", ".join(_show(x) for x in v) + "]"
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(v) if isinstance(v, str) else str(v)


@dataclass
class Lowering:
    """How one node becomes torch: a module to call, or a function with constant keyword arguments."""

    module: nn.Module | None = None
    function: Callable[..., Any] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


ShapeRule = Callable[[dict[str, Any], list[Shape]], Shape]
ParamRule = Callable[[dict[str, Any], list[Shape]], dict[str, Shape]]
FlopRule = Callable[[dict[str, Any], list[Shape], Shape], int]
LowerRule = Callable[[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]], Lowering]
InitRule = Callable[[dict[str, Any], dict[str, Shape], torch.Generator], dict[str, torch.Tensor]]


def _no_tensors(attrs: dict[str, Any], shapes: list[Shape]) -> dict[str, Shape]:
    return {}


def _no_init(attrs: dict[str, Any], shapes: dict[str, Shape], gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {}


def _numel(shape: Shape) -> int:
    return math.prod(shape)


def _elementwise_flops(attrs: dict[str, Any], ins: list[Shape], out: Shape) -> int:
    return _numel(out)


def _free(attrs: dict[str, Any], ins: list[Shape], out: Shape) -> int:
    return 0


@dataclass(frozen=True)
class OpDef:
    """The single definition of an IR op."""

    name: str
    doc: str
    shape: ShapeRule
    lower: LowerRule
    attrs: Mapping[str, Attr] = field(default_factory=dict)
    arity: tuple[int, int | None] = (1, 1)
    params: ParamRule = _no_tensors
    buffers: ParamRule = _no_tensors
    flops: FlopRule = _elementwise_flops
    init: InitRule = _no_init
    check: Callable[[dict[str, Any], str], None] | None = None
    int_tensors: frozenset[str] = frozenset()

    def normalise_attrs(self, attrs: Mapping[str, Any], where: str) -> dict[str, Any]:
        """Fill defaults, coerce values and check their ranges (and the op's cross-attribute rule).

        Unknown, missing, mistyped or out-of-range attributes are a GraphError naming ``where`` and the
        attribute; this is the one place where every frontend's and the JSON loader's attributes are checked.
        """
        if not isinstance(attrs, Mapping):
            raise GraphError(f"{where}: the attributes of op '{self.name}' must be a mapping, got {attrs!r}")
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise GraphError(f"{where}: op '{self.name}' has no attribute(s) {sorted(map(str, unknown))}; "
                             f"it takes {sorted(self.attrs)}")
        out: dict[str, Any] = {}
        for key, spec in self.attrs.items():
            if key in attrs:
                out[key] = spec.normalise(attrs[key], where, key)
            elif spec.default is REQUIRED:
                raise GraphError(f"{where}: op '{self.name}' needs attribute '{key}'")
            else:
                out[key] = spec.default
        if self.check is not None:
            self.check(out, where)
        return out

    def check_tensor_dtype(self, key: str, tensor: torch.Tensor, where: str) -> None:
        """Parameters and buffers are floating point, except the integer counters in ``int_tensors``."""
        if key in self.int_tensors:
            ok = not tensor.dtype.is_floating_point and not tensor.dtype.is_complex and tensor.dtype != torch.bool
            want = "an integer tensor"
        else:
            ok = tensor.dtype.is_floating_point
            want = "a floating-point tensor (float32)"
        if not ok:
            raise GraphError(f"{where}: tensor '{key}' has dtype {str(tensor.dtype).replace('torch.', '')}; "
                             f"op '{self.name}' needs {want} there; convert the weights")

    def check_arity(self, n: int, where: str) -> None:
        """Raise GraphError if ``n`` inputs is not allowed for this op."""
        lo, hi = self.arity
        if n < lo or (hi is not None and n > hi):
            want = f"{lo}" if lo == hi else f"{lo} to {hi if hi is not None else 'any number of'}"
            raise GraphError(f"{where}: op '{self.name}' takes {want} input(s), got {n}")


#: op name -> OpDef. The modules listed as plugins register the remaining ops when the registry is first read
#: (this module cannot import them: they import it).
REGISTRY: Registry[OpDef] = Registry("op", caller="ops.register", error=GraphError, plugins=(
    f"{__package__}.ops_layout", f"{__package__}.ops_math", f"{__package__}.ops_multitask"))


def register(op: OpDef, *, replace: bool = False) -> OpDef:
    """Add ``op`` to the registry under ``op.name`` (each name once unless ``replace``); returns it."""
    return REGISTRY.register(op.name, op, replace=replace)


def get_op(name: str, where: str = "") -> OpDef:
    """Look up an op by name; unknown names are a GraphError naming close matches and the known ops."""
    return REGISTRY.lookup(name, where)


def _need_rank(shape: Shape, rank: int, op: str) -> None:
    if len(shape) != rank:
        raise ShapeError(f"op '{op}' needs a {rank}-D input, got shape {list(shape)}")


def _window_out(size: int, k: int, s: int, p: int, d: int, ceil: bool) -> int:
    span = size + 2 * p - d * (k - 1) - 1
    if span < 0:
        raise ShapeError(f"window of {k} (dilation {d}, padding {p}) is larger than the input size {size}")
    out = (math.ceil(span / s) if ceil else span // s) + 1
    if ceil and (out - 1) * s >= size + p:
        out -= 1
    return out


def _pool_shape(attrs: dict[str, Any], ins: list[Shape], name: str) -> Shape:
    x = ins[0]
    _need_rank(x, 4, name)
    stride = attrs["stride"] or attrs["kernel_size"]
    dil = attrs.get("dilation", (1, 1))
    hw = tuple(_window_out(x[2 + i], attrs["kernel_size"][i], stride[i], attrs["padding"][i], dil[i],
                           attrs["ceil_mode"]) for i in range(2))
    return (x[0], x[1], *hw)


# ---------------------------------------------------------------- shared attribute specs

_KERNEL = Attr("pair", low=1, limit="MAX_KERNEL_SIZE")
_STRIDE = Attr("pair", (1, 1), low=1, limit="MAX_SPATIAL")
_PADDING = Attr("pair", (0, 0), low=0, limit="MAX_SPATIAL")
_DILATION = Attr("pair", (1, 1), low=1, limit="MAX_SPATIAL")
_PROBABILITY = Attr("float", REQUIRED, low=0.0, high=1.0)


def _check_input(a: dict[str, Any], where: str) -> None:
    limits.check_image_shape(a["shape"], "the input shape", where)


def _check_conv(a: dict[str, Any], where: str) -> None:
    if a["out_channels"] % a["groups"]:
        raise GraphError(f"{where}: attribute 'groups' = {a['groups']} does not divide attribute 'out_channels' = "
                         f"{a['out_channels']}")


def _check_clip(a: dict[str, Any], where: str) -> None:
    if a["min"] > a["max"]:
        raise GraphError(f"{where}: attribute 'min' = {a['min']} is greater than attribute 'max' = {a['max']}")


def _check_pads(a: dict[str, Any], where: str) -> None:
    for v in a["pads"]:
        limits.check("MAX_SPATIAL", abs(v), "the size of attribute 'pads'", where)


def _check_dim(dim: int, rank: int, what: str) -> int:
    if not -rank <= dim < rank:
        raise ShapeError(f"{what} {dim} is out of range for a {rank}-D input (use -{rank} to {rank - 1})")
    return dim % rank


# ---------------------------------------------------------------- graph input

register(OpDef(
    name="input", doc="A graph input of a fixed shape.", arity=(0, 0),
    attrs={"shape": Attr("shape", low=1, nonempty=True)}, check=_check_input,
    shape=lambda a, ins: a["shape"], flops=_free,
    lower=lambda a, p, b: Lowering(),
))

# ---------------------------------------------------------------- convolution


def _conv_params(a: dict[str, Any], ins: list[Shape]) -> dict[str, Shape]:
    _need_rank(ins[0], 4, "conv2d")
    cin = ins[0][1]
    if cin % a["groups"] or a["out_channels"] % a["groups"]:
        raise ShapeError(f"conv2d: {cin} input and {a['out_channels']} output channels are not "
                         f"divisible by groups={a['groups']}")
    shapes = {"weight": (a["out_channels"], cin // a["groups"], *a["kernel_size"])}
    if a["bias"]:
        shapes["bias"] = (a["out_channels"],)
    if a["weight_gain"]:
        shapes["gain"] = (a["out_channels"], 1, 1, 1)
    return shapes


def _conv_shape(a: dict[str, Any], ins: list[Shape]) -> Shape:
    x = ins[0]
    _conv_params(a, ins)
    hw = tuple(_window_out(x[2 + i], a["kernel_size"][i], a["stride"][i], a["padding"][i], a["dilation"][i],
                           False) for i in range(2))
    return (x[0], a["out_channels"], *hw)


def _conv_flops(a: dict[str, Any], ins: list[Shape], out: Shape) -> int:
    per_out = (ins[0][1] // a["groups"]) * a["kernel_size"][0] * a["kernel_size"][1]
    return _numel(out) * per_out + (_numel(out) if a["bias"] else 0)


def _conv_init(a: dict[str, Any], shapes: dict[str, Shape], gen: torch.Generator) -> dict[str, torch.Tensor]:
    w = shapes["weight"]
    fan_out = w[0] * w[2] * w[3]
    out = {"weight": torch.randn(w, generator=gen) * math.sqrt(2.0 / fan_out)}
    if "bias" in shapes:
        out["bias"] = torch.zeros(shapes["bias"])
    if "gain" in shapes:
        out["gain"] = torch.ones(shapes["gain"])
    return out


def _conv_lower(a: dict[str, Any], p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> Lowering:
    w = p["weight"]
    args = (w.shape[1] * a["groups"], a["out_channels"], a["kernel_size"], a["stride"], a["padding"],
            a["dilation"], a["groups"])
    if a["weight_std"] is None:
        avoid_onednn_6035 = (a["kernel_size"] == (1, 1) and a["stride"] != (1, 1) and a["padding"] == (0, 0)
                             and a["groups"] == 1 and w.shape[1] < 16)
        m: nn.Conv2d = (SubsampledConv2d if avoid_onednn_6035 else nn.Conv2d)(*args, bias=a["bias"], device="meta")
    else:
        m = StdConv2d(*args, bias=a["bias"], device="meta", eps=a["weight_std"], scale=a["weight_scale"],
                      gain=a["weight_gain"])
        if a["weight_gain"]:
            m.gain = nn.Parameter(p["gain"])
    m.weight = nn.Parameter(w)
    if a["bias"]:
        m.bias = nn.Parameter(p["bias"])
    return Lowering(module=m)


def _check_std_conv(a: dict[str, Any], where: str) -> None:
    _check_conv(a, where)
    if a["weight_std"] is None and (a["weight_gain"] or a["weight_scale"] != 1.0):
        raise GraphError(f"{where}: attributes 'weight_gain'/'weight_scale' need 'weight_std' (the eps of weight "
                         "standardisation)")


register(OpDef(
    name="conv2d", doc="2-D convolution (cross-correlation), symmetric zero padding; optionally with the weight "
                       "standardised per output channel on every call (weight_std = its eps; NF-ResNet, BiT).",
    attrs={"out_channels": Attr("int", low=1, limit="MAX_CHANNELS"), "kernel_size": _KERNEL, "stride": _STRIDE,
           "padding": _PADDING, "dilation": _DILATION, "groups": Attr("int", 1, low=1, limit="MAX_CHANNELS"),
           "bias": Attr("bool", False), "weight_std": Attr("float", None, above=0.0),
           "weight_gain": Attr("bool", False), "weight_scale": Attr("float", 1.0)}, check=_check_std_conv,
    shape=_conv_shape, params=_conv_params, flops=_conv_flops, init=_conv_init, lower=_conv_lower,
))

# ---------------------------------------------------------------- normalisation


def _bn_params(a: dict[str, Any], ins: list[Shape]) -> dict[str, Shape]:
    return {"weight": (ins[0][1],), "bias": (ins[0][1],)} if a["affine"] else {}


def _bn_buffers(a: dict[str, Any], ins: list[Shape]) -> dict[str, Shape]:
    c = ins[0][1]
    return {"running_mean": (c,), "running_var": (c,), "num_batches_tracked": ()} if a["track_running_stats"] else {}


def _bn_shape(a: dict[str, Any], ins: list[Shape]) -> Shape:
    _need_rank(ins[0], 4, "batchnorm2d")
    return ins[0]


def _bn_init(a: dict[str, Any], shapes: dict[str, Shape], gen: torch.Generator) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if "weight" in shapes:
        out["weight"] = torch.ones(shapes["weight"])
        out["bias"] = torch.zeros(shapes["bias"])
    if "running_mean" in shapes:
        out["running_mean"] = torch.zeros(shapes["running_mean"])
        out["running_var"] = torch.ones(shapes["running_var"])
        out["num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    return out


def _bn_lower(a: dict[str, Any], p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> Lowering:
    c = (p.get("weight") if a["affine"] else b["running_mean"]).shape[0]
    m = nn.BatchNorm2d(c, eps=a["eps"], momentum=a["momentum"], affine=a["affine"],
                       track_running_stats=a["track_running_stats"])
    if a["affine"]:
        m.weight = nn.Parameter(p["weight"])
        m.bias = nn.Parameter(p["bias"])
    for key, value in b.items():
        setattr(m, key, value)
    return Lowering(module=m)


register(OpDef(
    name="batchnorm2d", doc="Batch normalisation over channels (dim 1) of a 4-D tensor.",
    attrs={"eps": Attr("float", 1e-5, above=0.0), "momentum": Attr("float", 0.1, low=0.0, high=1.0),
           "affine": Attr("bool", True), "track_running_stats": Attr("bool", True)},
    int_tensors=frozenset({"num_batches_tracked"}),
    shape=_bn_shape, params=_bn_params, buffers=_bn_buffers, init=_bn_init, lower=_bn_lower,
    flops=lambda a, ins, out: 2 * _numel(out),
))

# ---------------------------------------------------------------- activations


def _same(a: dict[str, Any], ins: list[Shape]) -> Shape:
    return ins[0]


def _fn(function: Callable[..., Any], **fixed: Any) -> LowerRule:
    def lower(a: dict[str, Any], p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> Lowering:
        return Lowering(function=function, kwargs={**fixed, **a})
    return lower


for _name, _f, _doc in [
    ("relu", F.relu, "max(x, 0)"),
    ("relu6", F.relu6, "min(max(x, 0), 6)"),
    ("silu", F.silu, "x * sigmoid(x) (swish)"),
    ("sigmoid", torch.sigmoid, "1 / (1 + exp(-x))"),
    ("tanh", torch.tanh, "hyperbolic tangent"),
    ("hardswish", F.hardswish, "x * relu6(x + 3) / 6"),
    ("hardsigmoid", F.hardsigmoid, "relu6(x + 3) / 6"),
    ("identity", torch.clone, "y = x (kept as a node so that graphs round-trip)"),
]:
    register(OpDef(name=_name, doc=_doc, shape=_same, lower=_fn(_f), flops=(
        _free if _name == "identity" else _elementwise_flops)))

register(OpDef(name="gelu", doc="Gaussian error linear unit ('none' exact or 'tanh' approximation).",
               attrs={"approximate": Attr("str", "none", choices=("none", "tanh"))}, shape=_same, lower=_fn(F.gelu)))
register(OpDef(name="leaky_relu", doc="max(x, 0) + negative_slope * min(x, 0).",
               attrs={"negative_slope": Attr("float", 0.01)}, shape=_same, lower=_fn(F.leaky_relu)))
register(OpDef(name="clip", doc="Clamp to [min, max] (hardtanh).",
               attrs={"min": Attr("float", finite=False), "max": Attr("float", finite=False)},
               check=_check_clip, shape=_same,
               lower=lambda a, p, b: Lowering(function=F.hardtanh,
                                              kwargs={"min_val": a["min"], "max_val": a["max"]})))


def _module_lower(factory: Callable[[dict[str, Any]], nn.Module]) -> LowerRule:
    return lambda a, p, b: Lowering(module=factory(a))


register(OpDef(name="dropout", doc="Dropout with probability p in training; identity in eval.",
               attrs={"p": Attr("float", 0.5, low=0.0, high=1.0)}, shape=_same, flops=_free,
               lower=_module_lower(lambda a: nn.Dropout(a["p"]))))


def _stochastic_depth(a: dict[str, Any]) -> nn.Module:
    from torchvision.ops import StochasticDepth
    return StochasticDepth(a["p"], a["mode"])


register(OpDef(name="stochastic_depth", doc="Drop whole residual branches in training (torchvision).",
               attrs={"p": _PROBABILITY, "mode": Attr("str", "row", choices=("row", "batch"))}, shape=_same,
               flops=_free,
               lower=_module_lower(_stochastic_depth)))

# ---------------------------------------------------------------- pooling

_POOL_ATTRS = {"kernel_size": _KERNEL, "stride": Attr("pair", None, low=1, limit="MAX_SPATIAL"),
               "padding": _PADDING, "ceil_mode": Attr("bool", False)}


def _pool_flops(a: dict[str, Any], ins: list[Shape], out: Shape) -> int:
    return _numel(out) * a["kernel_size"][0] * a["kernel_size"][1]


def _pool_lower(function: Callable[..., Any]) -> LowerRule:
    def lower(a: dict[str, Any], p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> Lowering:
        kw = dict(a)
        kw["stride"] = a["stride"] or a["kernel_size"]
        return Lowering(function=function, kwargs=kw)
    return lower


register(OpDef(name="maxpool2d", doc="Max pooling; ceil_mode rounds the output size up (Caffe's CEIL).",
               attrs={**_POOL_ATTRS, "dilation": _DILATION},
               shape=lambda a, ins: _pool_shape(a, ins, "maxpool2d"), flops=_pool_flops,
               lower=_pool_lower(F.max_pool2d)))
register(OpDef(name="avgpool2d", doc="Average pooling.",
               attrs={**_POOL_ATTRS, "count_include_pad": Attr("bool", True)},
               shape=lambda a, ins: _pool_shape(a, ins, "avgpool2d"), flops=_pool_flops,
               lower=_pool_lower(F.avg_pool2d)))


def _adaptive_shape(a: dict[str, Any], ins: list[Shape]) -> Shape:
    _need_rank(ins[0], 4, "adaptive pooling")
    return (ins[0][0], ins[0][1], *a["output_size"])


for _name, _f in [("adaptive_avgpool2d", F.adaptive_avg_pool2d), ("adaptive_maxpool2d", F.adaptive_max_pool2d)]:
    register(OpDef(name=_name, doc="Adaptive pooling to a fixed output size; (1, 1) is global pooling.",
                   attrs={"output_size": Attr("pair", low=1, limit="MAX_SPATIAL")}, shape=_adaptive_shape,
                   flops=lambda a, ins, out: _numel(ins[0]), lower=_fn(_f)))


def _mean_shape(a: dict[str, Any], ins: list[Shape]) -> Shape:
    rank = len(ins[0])
    dims = {_check_dim(d, rank, "mean over dimension") for d in a["dim"]}
    if a["keepdim"]:
        return tuple(1 if i in dims else s for i, s in enumerate(ins[0]))
    return tuple(s for i, s in enumerate(ins[0]) if i not in dims)


register(OpDef(name="mean", doc="Mean over the given dimensions.",
               attrs={"dim": Attr("ints", nonempty=True), "keepdim": Attr("bool", False)}, shape=_mean_shape,
               flops=lambda a, ins, out: _numel(ins[0]), lower=_fn(torch.mean)))

# ---------------------------------------------------------------- elementwise n-ary


def _broadcast(a: dict[str, Any], ins: list[Shape]) -> Shape:
    try:
        return tuple(torch.broadcast_shapes(*ins))
    except RuntimeError:
        raise ShapeError(f"input shapes {[list(s) for s in ins]} do not broadcast") from None


def _nary_flops(a: dict[str, Any], ins: list[Shape], out: Shape) -> int:
    return _numel(out) * (len(ins) - 1)


register(OpDef(name="add", doc="Elementwise sum with broadcasting; optional per-input coefficients (Eltwise).",
               attrs={"coeffs": Attr("floats", None)}, arity=(2, None), shape=_broadcast, flops=_nary_flops,
               lower=lambda a, p, b: Lowering(function=AF.weighted_sum,
                                              kwargs={} if a["coeffs"] is None else {"coeffs": a["coeffs"]})))
register(OpDef(name="mul", doc="Elementwise product with broadcasting (squeeze-excitation scaling).",
               arity=(2, None), shape=_broadcast, flops=_nary_flops, lower=_fn(AF.product)))
register(OpDef(name="max", doc="Elementwise maximum with broadcasting.",
               arity=(2, None), shape=_broadcast, flops=_nary_flops, lower=_fn(AF.maximum)))


def _concat_shape(a: dict[str, Any], ins: list[Shape]) -> Shape:
    rank = len(ins[0])
    d = _check_dim(a["dim"], rank, "concat along dimension")
    for s in ins[1:]:
        if len(s) != rank or any(s[i] != ins[0][i] for i in range(rank) if i != d):
            raise ShapeError(f"concat along dim {a['dim']}: shapes {[list(s) for s in ins]} differ elsewhere")
    return tuple(sum(s[d] for s in ins) if i == d else ins[0][i] for i in range(rank))


register(OpDef(name="concat", doc="Concatenation along a dimension.", attrs={"dim": Attr("int", 1)},
               arity=(1, None), shape=_concat_shape, flops=_free, lower=_fn(AF.concat)))

def _pad_shape(a: dict[str, Any], ins: list[Shape]) -> Shape:
    x = ins[0]
    _need_rank(x, 4, "pad")
    left, right, top, bottom = a["pads"]
    h, w = x[2] + top + bottom, x[3] + left + right
    if h <= 0 or w <= 0:
        raise ShapeError(f"pad {list(a['pads'])} crops a {x[2]}x{x[3]} map to nothing")
    return (x[0], x[1], h, w)


def _check_pad_mode(a: dict[str, Any], where: str) -> None:
    _check_pads(a, where)
    if a["mode"] != "constant" and min(a["pads"]) < 0:
        raise GraphError(f"{where}: negative pads (a crop) need mode 'constant', got mode '{a['mode']}'")


register(OpDef(name="pad", doc="Padding of the last two dims as (left, right, top, bottom): constant (value), "
                               "reflect or replicate; negative amounts crop.",
               attrs={"pads": Attr("ints", length=4), "mode": Attr("str", "constant",
                                                                   choices=("constant", "reflect", "replicate")),
                      "value": Attr("float", 0.0)},
               check=_check_pad_mode, shape=_pad_shape, flops=_free, lower=_fn(AF.pad2d)))

# ---------------------------------------------------------------- reshaping and dense


def _flatten_shape(a: dict[str, Any], ins: list[Shape]) -> Shape:
    x = ins[0]
    s = _check_dim(a["start_dim"], len(x), "flatten from dimension")
    e = _check_dim(a["end_dim"], len(x), "flatten to dimension")
    if s > e:
        raise ShapeError(f"flatten from dimension {a['start_dim']} to {a['end_dim']}: the start is after the end")
    return (*x[:s], math.prod(x[s:e + 1]), *x[e + 1:])


register(OpDef(name="flatten", doc="Merge dimensions start_dim..end_dim into one.",
               attrs={"start_dim": Attr("int", 1), "end_dim": Attr("int", -1)},
               shape=_flatten_shape, flops=_free, lower=_fn(torch.flatten)))


def _linear_params(a: dict[str, Any], ins: list[Shape]) -> dict[str, Shape]:
    if len(ins[0]) < 2:
        raise ShapeError(f"linear needs an input [N, ..., features], got {list(ins[0])}")
    shapes = {"weight": (a["out_features"], ins[0][-1])}
    if a["bias"]:
        shapes["bias"] = (a["out_features"],)
    return shapes


def _linear_shape(a: dict[str, Any], ins: list[Shape]) -> Shape:
    _linear_params(a, ins)
    return (*ins[0][:-1], a["out_features"])


def _linear_init(a: dict[str, Any], shapes: dict[str, Shape], gen: torch.Generator) -> dict[str, torch.Tensor]:
    bound = 1.0 / math.sqrt(shapes["weight"][1])
    out = {"weight": (torch.rand(shapes["weight"], generator=gen) * 2 - 1) * bound}
    if "bias" in shapes:
        out["bias"] = (torch.rand(shapes["bias"], generator=gen) * 2 - 1) * bound
    return out


def _linear_lower(a: dict[str, Any], p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> Lowering:
    w = p["weight"]
    m = nn.Linear(w.shape[1], w.shape[0], bias=a["bias"], device="meta")
    m.weight = nn.Parameter(w)
    if a["bias"]:
        m.bias = nn.Parameter(p["bias"])
    return Lowering(module=m)


register(OpDef(name="linear", doc="Fully connected layer y = x W^T + b over the last dim (features).",
               attrs={"out_features": Attr("int", low=1, limit="MAX_CHANNELS"), "bias": Attr("bool", True)},
               shape=_linear_shape, params=_linear_params, init=_linear_init, lower=_linear_lower,
               flops=lambda a, ins, out: _numel(out) * ins[0][-1]))


def tensor_shapes(op: OpDef, attrs: dict[str, Any], in_shapes: list[Shape], where: str = "") -> dict[str, Shape]:
    """Shapes of all parameters and buffers of a node of ``op`` with these inputs.

    Each shape is checked against the MAX_TENSOR_BYTES limit (at 4 bytes a value), so a caller can
    allocate them safely.
    """
    shapes = {**op.params(attrs, in_shapes), **op.buffers(attrs, in_shapes)}
    for key, shape in shapes.items():
        limits.check_tensor(shape, f"{op.name} tensor '{key}'", where)
    return shapes

