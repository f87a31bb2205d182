"""Registry ops that move data without arithmetic: stored tensors, slices, reshapes, permutes and resizes.

Frontends compute every size statically (the IR has static shapes), so each op's attributes are plain
integers; only the batch dimension may vary at run time, and no op here reads or moves it except permute.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import GraphError, ShapeError
from . import functional as AF
from .modules import StoredTensor
from .ops import (
    REQUIRED,
    Attr,
    Lowering,
    OpDef,
    Shape,
    _check_dim,
    _fn,
    _free,
    _need_rank,
    _numel,
    register,
)


def _tensor_shape(a: dict[str, Any], ins: list[Shape]) -> Shape:
    return a["shape"]


def _tensor_tensors(want_trainable: bool) -> Any:
    def rule(a: dict[str, Any], ins: list[Shape]) -> dict[str, Shape]:
        return {"value": a["shape"]} if a["trainable"] == want_trainable else {}
    return rule


def _tensor_init(a: dict[str, Any], shapes: dict[str, Shape], gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"value": torch.zeros(shapes["value"])}


def _tensor_lower(a: dict[str, Any], p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> Lowering:
    return Lowering(module=StoredTensor(p["value"] if a["trainable"] else b["value"], a["trainable"]))


register(OpDef(
    name="tensor", doc="A stored tensor used as a value (a constant operand, or a learnt one such as a layer "
                       "scale when trainable); it has no batch dimension and broadcasts.",
    arity=(0, 0), attrs={"shape": Attr("shape", low=1), "trainable": Attr("bool", False)},
    shape=_tensor_shape, params=_tensor_tensors(True), buffers=_tensor_tensors(False), init=_tensor_init,
    lower=_tensor_lower, flops=_free,
))


def _slice_shape(a: dict[str, Any], ins: list[Shape]) -> Shape:
    x = ins[0]
    d = _check_dim(a["dim"], len(x), "slice along dimension")
    if d == 0:
        raise ShapeError("slicing the batch dimension is not supported")
    n = len(range(x[d])[a["start"]:a["end"]:a["step"]])
    if n == 0:
        raise ShapeError(f"slice {a['start']}:{a['end']}:{a['step']} of dimension {a['dim']} (size {x[d]}) is empty")
    return tuple(n if i == d else s for i, s in enumerate(x))


register(OpDef(
    name="slice", doc="x[start:end:step] along one dimension (Python semantics); split, chunk and narrow "
                      "become one slice per piece.",
    attrs={"dim": Attr("int"), "start": Attr("int", 0), "end": Attr("int", 2 ** 62),
           "step": Attr("int", 1, low=1)},
    shape=_slice_shape, flops=_free, lower=_fn(AF.slice_dim),
))


def _reshape_shape(a: dict[str, Any], ins: list[Shape]) -> Shape:
    x = ins[0]
    spec = list(a["shape"])
    total = _numel(x[1:])
    if spec.count(-1) > 1:
        raise ShapeError(f"reshape to {spec}: at most one dimension may be -1")
    if any(v == 0 or v < -1 for v in spec):
        raise ShapeError(f"reshape to {spec}: dimensions must be positive (or one -1)")
    known = math.prod(v for v in spec if v != -1)
    if -1 in spec:
        if total % known:
            raise ShapeError(f"cannot reshape a sample of shape {list(x[1:])} to {spec}")
        spec[spec.index(-1)] = total // known
    if math.prod(spec) != total:
        raise ShapeError(f"cannot reshape a sample of shape {list(x[1:])} ({total} values) to {spec}")
    return (x[0], *spec)


register(OpDef(
    name="reshape", doc="Reshape each sample to `shape` (the dims after the batch dim, at most one -1); the "
                        "batch dimension is kept.",
    attrs={"shape": Attr("ints", REQUIRED, low=-1)}, shape=_reshape_shape, flops=_free,
    lower=_fn(AF.reshape_batch),
))


def _check_permutation(a: dict[str, Any], where: str) -> None:
    if sorted(a["dims"]) != list(range(len(a["dims"]))):
        raise GraphError(f"{where}: attribute 'dims' = {list(a['dims'])} is not a permutation of "
                         f"0..{len(a['dims']) - 1}")


def _permute_shape(a: dict[str, Any], ins: list[Shape]) -> Shape:
    if len(a["dims"]) != len(ins[0]):
        raise ShapeError(f"permute {list(a['dims'])} of a {len(ins[0])}-D input")
    return tuple(ins[0][d] for d in a["dims"])


register(OpDef(
    name="permute", doc="Reorder the dimensions (transpose is a permute).",
    attrs={"dims": Attr("ints", nonempty=True, low=0)}, check=_check_permutation, shape=_permute_shape,
    flops=_free, lower=_fn(torch.permute),
))


def _resize_shape(a: dict[str, Any], ins: list[Shape]) -> Shape:
    _need_rank(ins[0], 4, "resize")
    return (*ins[0][:2], *a["size"])


def _resize_flops(a: dict[str, Any], ins: list[Shape], out: Shape) -> int:
    return _numel(out) * (4 if a["mode"] == "bilinear" else 1)


register(OpDef(
    name="resize", doc="Resize H, W to `size`: nearest (torch's, = ONNX asymmetric/floor) or bilinear "
                       "(align_corners either way).",
    attrs={"size": Attr("pair", low=1, limit="MAX_SPATIAL"),
           "mode": Attr("str", "nearest", choices=("nearest", "bilinear")), "align_corners": Attr("bool", False)},
    shape=_resize_shape, flops=_resize_flops, lower=_fn(AF.resize),
))
