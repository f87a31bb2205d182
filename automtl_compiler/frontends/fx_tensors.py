"""Shape manipulation of traced tensors -> IR nodes: view/reshape, permute, indexing, split, concat, pad.

Every shape is static, so indices, split sizes and target shapes are resolved to plain ints here. The IR
keeps the batch dimension first and whole: a reshape, permute, slice or concat that moves, splits or
merges it is refused with an UnsupportedOpError.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UnsupportedOpError
from .fx_functions import Handler, arg, tensor_value
from .fx_trace import Emitter, TensorValue


def _norm_dim(dim: int, rank: int) -> int:
    if not -rank <= dim < rank:
        raise UnsupportedOpError(f"dimension {dim} is out of range for a {rank}-D tensor")
    return dim % rank


def _not_batch(dim: int, what: str) -> None:
    if dim == 0:
        raise UnsupportedOpError(f"{what} along the batch dimension (dim 0) is not supported; the IR keeps the "
                                 "batch whole")


def _shape_args(args: tuple[Any, ...]) -> list[int]:
    dims = list(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else list(args)
    if not all(isinstance(d, int) for d in dims):
        raise UnsupportedOpError(f"shape {dims} is not made of ints")
    return dims


# ---------------------------------------------------------------- reshaping

def reshape_to(e: Emitter, x: TensorValue, shape: list[int], part: str = "") -> TensorValue:
    """Reshape to a full target shape (batch first, at most one -1)."""
    shape = list(shape)
    if shape.count(-1) > 1:
        raise UnsupportedOpError(f"reshape to {shape} has more than one -1")
    total = math.prod(x.shape)
    if -1 in shape:
        known = math.prod(d for d in shape if d != -1)
        if known == 0 or total % known:
            raise UnsupportedOpError(f"cannot reshape {list(x.shape)} to {shape}")
        shape[shape.index(-1)] = total // known
    if math.prod(shape) != total:
        raise UnsupportedOpError(f"cannot reshape {list(x.shape)} ({total} values) to {shape}")
    if not shape or shape[0] != x.shape[0]:
        raise UnsupportedOpError(f"reshape of {list(x.shape)} to {shape} moves the batch dimension; the IR keeps "
                                 "the batch first and whole")
    if tuple(shape) == x.shape:
        return x
    if len(shape) == 2:
        return e.emit("flatten", {"start_dim": 1, "end_dim": -1}, [x], part=part)
    return e.emit("reshape", {"shape": shape[1:]}, [x], part=part)


def _view(e: Emitter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    rest = args[1:] or (kwargs.get("shape") or kwargs.get("size"),)
    if len(rest) == 1 and isinstance(rest[0], torch.dtype):
        raise UnsupportedOpError("view as another dtype is not supported")
    return reshape_to(e, tensor_value(args[0]), _shape_args(rest))


def _reshape_as(e: Emitter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return reshape_to(e, tensor_value(args[0]), list(tensor_value(args[1], "target").shape))


def _flatten(e: Emitter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x = tensor_value(args[0])
    start, end = arg(args, kwargs, 1, "start_dim", 0), arg(args, kwargs, 2, "end_dim", -1)
    if _norm_dim(start, len(x.shape)) == _norm_dim(end, len(x.shape)):
        return x
    return e.emit("flatten", {"start_dim": start, "end_dim": end}, [x])


def _unsqueeze(e: Emitter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x = tensor_value(args[0])
    dim = _norm_dim(arg(args, kwargs, 1, "dim"), len(x.shape) + 1)
    _not_batch(dim, "unsqueeze")
    return reshape_to(e, x, [*x.shape[:dim], 1, *x.shape[dim:]])


def _squeeze(e: Emitter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x = tensor_value(args[0])
    dim = arg(args, kwargs, 1, "dim", None)
    dims = range(1, len(x.shape)) if dim is None else [_norm_dim(d, len(x.shape)) for d in
                                                      ([dim] if isinstance(dim, int) else dim)]
    drop = {d for d in dims if x.shape[d] == 1 and d != 0}
    return reshape_to(e, x, [s for i, s in enumerate(x.shape) if i not in drop])


def _permute(e: Emitter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x = tensor_value(args[0])
    dims = [_norm_dim(d, len(x.shape)) for d in _shape_args(args[1:] or (kwargs["dims"],))]
    if sorted(dims) != list(range(len(x.shape))):
        raise UnsupportedOpError(f"permute dims {dims} are not a permutation of {len(x.shape)} dims")
    if dims[0] != 0:
        raise UnsupportedOpError(f"permute {dims} moves the batch dimension; the IR keeps the batch first")
    if dims == sorted(dims):
        return x
    return e.emit("permute", {"dims": dims}, [x])


def _transpose(e: Emitter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x = tensor_value(args[0])
    a = _norm_dim(arg(args, kwargs, 1, "dim0"), len(x.shape))
    b = _norm_dim(arg(args, kwargs, 2, "dim1"), len(x.shape))
    dims = list(range(len(x.shape)))
    dims[a], dims[b] = dims[b], dims[a]
    return _permute(e, (x, dims), {})


def _alias(e: Emitter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return tensor_value(args[0])


def _to(e: Emitter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    for a in (*args[1:], *kwargs.values()):
        if isinstance(a, torch.dtype) and a != torch.float32:
            raise UnsupportedOpError(f"conversion to {a} is not supported (the IR computes in float32)")
    return tensor_value(args[0])


# ---------------------------------------------------------------- slicing

def slice_dim(e: Emitter, x: TensorValue, dim: int, start: int, end: int, step: int = 1,
              part: str = "") -> TensorValue:
    """x[start:end:step] along ``dim`` (already clamped, step >= 1); x itself when that is everything."""
    if (start, end, step) == (0, x.shape[dim], 1):
        return x
    _not_batch(dim, "slicing")
    return e.emit("slice", {"dim": dim, "start": start, "end": end, "step": step}, [x], part=part)


def _expand_index(index: Any, rank: int) -> list[Any]:
    items = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(i, (TensorValue, torch.Tensor, list)) for i in items):
        raise UnsupportedOpError("indexing with tensors or lists (advanced indexing) has no IR op")
    if Ellipsis in items:
        at = items.index(Ellipsis)
        used = sum(1 for i in items if i is not None and i is not Ellipsis)
        items[at:at + 1] = [slice(None)] * (rank - used)
    return items


def getitem(e: Emitter, x: TensorValue, index: Any) -> TensorValue:
    """Basic indexing (ints, slices with step >= 1, None, ...): one slice per indexed dim, then a reshape
    when dims are dropped (ints) or inserted (None)."""
    out, dim, shape = x, 0, []
    for item in _expand_index(index, len(x.shape)):
        if item is None:
            shape.append(1)
            continue
        if dim >= len(x.shape):
            raise UnsupportedOpError(f"too many indices for a {len(x.shape)}-D tensor")
        size = x.shape[dim]
        if isinstance(item, slice):
            start, end, step = item.indices(size)
            if step < 1:
                raise UnsupportedOpError("slicing with a negative step has no IR op")
            out = slice_dim(e, out, dim, start, max(end, start), step, part=f"d{dim}")
            shape.append(out.shape[dim])
        elif isinstance(item, int):
            if not -size <= item < size:
                raise UnsupportedOpError(f"index {item} is out of range for dim {dim} of size {size}")
            out = slice_dim(e, out, dim, item % size, item % size + 1, part=f"d{dim}")
        else:
            raise UnsupportedOpError(f"index {item!r} has no IR op")
        dim += 1
    shape += list(out.shape[dim:])
    return reshape_to(e, out, shape, part="view") if tuple(shape) != out.shape else out


def _getitem(e: Emitter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return getitem(e, tensor_value(args[0]), args[1])


def _setitem(e: Emitter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """x[..., a:b, ...] = y along one dim: the result is x with that range replaced (a concat)."""
    x, index, y = tensor_value(args[0]), args[1], args[2]
    items = _expand_index(index, len(x.shape))
    sliced = [(d, i) for d, i in enumerate(items) if i != slice(None)]
    if len(sliced) != 1 or not isinstance(sliced[0][1], slice) or None in items:
        raise UnsupportedOpError("assignment is only supported to a slice of one dimension (x[:, a:b] = y)")
    dim, item = sliced[0]
    start, end, step = item.indices(x.shape[dim])
    y = e.tensor(y)
    want = tuple(end - start if d == dim else s for d, s in enumerate(x.shape))
    if step != 1 or y.shape != want:
        raise UnsupportedOpError(f"assigning a {list(y.shape)} tensor to a {list(want)} slice is not supported")
    parts = [slice_dim(e, x, dim, 0, start, part="head") if start > 0 else None, y,
             slice_dim(e, x, dim, end, x.shape[dim], part="tail") if end < x.shape[dim] else None]
    return concat(e, [p for p in parts if p is not None], dim)


def split_sizes(e: Emitter, x: TensorValue, sizes: list[int], dim: int) -> tuple[TensorValue, ...]:
    """Consecutive pieces of the given sizes along ``dim``."""
    dim = _norm_dim(dim, len(x.shape))
    out, start = [], 0
    for i, size in enumerate(sizes):
        out.append(slice_dim(e, x, dim, start, start + size, part=str(i)))
        start += size
    return tuple(out)


def _split(e: Emitter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x = tensor_value(args[0])
    how, dim = arg(args, kwargs, 1, "split_size_or_sections"), arg(args, kwargs, 2, "dim", 0)
    n = x.shape[_norm_dim(dim, len(x.shape))]
    if isinstance(how, int):
        sizes = [min(how, n - s) for s in range(0, n, how)]
    else:
        sizes = [int(s) for s in how]
        if sum(sizes) != n:
            raise UnsupportedOpError(f"split sizes {sizes} do not add up to {n}")
    return split_sizes(e, x, sizes, dim)


def _chunk(e: Emitter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x = tensor_value(args[0])
    chunks, dim = arg(args, kwargs, 1, "chunks"), arg(args, kwargs, 2, "dim", 0)
    n = x.shape[_norm_dim(dim, len(x.shape))]
    size = math.ceil(n / chunks)
    return split_sizes(e, x, [min(size, n - s) for s in range(0, n, size)], dim)


def _unbind(e: Emitter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x = tensor_value(args[0])
    dim = _norm_dim(arg(args, kwargs, 1, "dim", 0), len(x.shape))
    _not_batch(dim, "unbind")
    index = [slice(None)] * dim
    return tuple(getitem(e, x, (*index, i)) for i in range(x.shape[dim]))


def _narrow(e: Emitter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x = tensor_value(args[0])
    dim = _norm_dim(arg(args, kwargs, 1, "dim"), len(x.shape))
    start = arg(args, kwargs, 2, "start") % x.shape[dim]
    return slice_dim(e, x, dim, start, start + arg(args, kwargs, 3, "length"))


# ---------------------------------------------------------------- joining and padding

def concat(e: Emitter, values: list[Any], dim: int) -> TensorValue:
    """Concatenate traced tensors along a non-batch dim (one tensor is returned as it is)."""
    xs = [tensor_value(v, "concatenated value") for v in values]
    if not xs:
        raise UnsupportedOpError("concatenation of no tensors")
    _not_batch(_norm_dim(dim, len(xs[0].shape)), "concatenation")
    return xs[0] if len(xs) == 1 else e.emit("concat", {"dim": dim}, xs)


def _cat(e: Emitter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return concat(e, list(arg(args, kwargs, 0, "tensors")), arg(args, kwargs, 1, "dim", 0))


def _stack(e: Emitter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    xs = [tensor_value(v, "stacked value") for v in arg(args, kwargs, 0, "tensors")]
    dim = _norm_dim(arg(args, kwargs, 1, "dim", 0), len(xs[0].shape) + 1)
    _not_batch(dim, "stacking")
    parts = [reshape_to(e, x, [*x.shape[:dim], 1, *x.shape[dim:]], part=f"u{i}") for i, x in enumerate(xs)]
    return parts[0] if len(parts) == 1 else e.emit("concat", {"dim": dim}, parts)


def _pad(e: Emitter, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x = tensor_value(args[0])
    pads = [int(p) for p in arg(args, kwargs, 1, "pad")]
    mode, value = arg(args, kwargs, 2, "mode", "constant"), arg(args, kwargs, 3, "value", None)
    if len(x.shape) != 4 or len(pads) not in (2, 4, 6, 8) or any(pads[4:]):
        raise UnsupportedOpError(f"padding {pads} of a {len(x.shape)}-D tensor: only the last two dims of a "
                                 "4-D tensor can be padded")
    pads = (pads + [0, 0])[:4]
    if mode not in ("constant", "reflect", "replicate"):
        raise UnsupportedOpError(f"padding mode '{mode}' has no IR op (use constant, reflect or replicate)")
    attrs: dict[str, Any] = {"pads": pads, "mode": mode}
    if mode == "constant":
        attrs["value"] = float(value or 0.0)
    return e.emit("pad", attrs, [x]) if any(pads) else x


FUNCTIONS: dict[Any, Handler] = {
    torch.reshape: lambda e, a, k: reshape_to(e, tensor_value(a[0]), _shape_args(a[1:] or (k["shape"],))),
    torch.flatten: _flatten, torch.squeeze: _squeeze, torch.unsqueeze: _unsqueeze,
    torch.permute: _permute, torch.transpose: _transpose, torch.swapaxes: _transpose,
    operator.getitem: _getitem, operator.setitem: _setitem,
    torch.split: _split, torch.chunk: _chunk, torch.unbind: _unbind, torch.narrow: _narrow,
    torch.cat: _cat, torch.concat: _cat, torch.concatenate: _cat, torch.stack: _stack,
    F.pad: _pad, torch._C._nn.pad: _pad, torch.constant_pad_nd: _pad,
}

METHODS: dict[str, Handler] = {
    "view": _view, "reshape": _view, "view_as": _reshape_as, "reshape_as": _reshape_as, "flatten": _flatten,
    "squeeze": _squeeze, "unsqueeze": _unsqueeze, "permute": _permute, "transpose": _transpose,
    "swapaxes": _transpose, "split": _split, "chunk": _chunk, "unbind": _unbind, "narrow": _narrow,
    "contiguous": _alias, "clone": _alias, "detach": _alias, "float": _alias, "to": _to, "type_as": _alias,
    "__getitem__": _getitem,
}
