"""Shared helpers of the ONNX frontend (:mod:`automtl_compiler.frontends.onnx`): constants, tensor reading and
small pure functions that the converter's op handlers use."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

DEFAULT_DOMAINS = ("", "ai.onnx")
# ops that must not be evaluated at load time even when their inputs are constant
NOT_FOLDABLE = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                "Bernoulli", "If", "Loop", "Scan"}
TOL = 1e-5
# constant inputs up to this many elements are given to onnx's shape inference as data (shape arithmetic)
DATA_FOR_INFERENCE = 2**16
# ops whose result has at most (rank of an input) x (elements of all inputs) values of at most 8 bytes
BOUNDED_BY_INPUTS = {"NonZero", "Unique", "Compress", "TopK", "Slice", "Squeeze", "Unsqueeze", "Reshape",
                     "Identity", "Cast", "CastLike", "Transpose", "Flatten", "Split", "Concat", "GatherElements",
                     "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "Abs", "Neg", "Sqrt",
                     "Floor", "Ceil", "Round", "Not", "Sign", "Shape", "Size"}
# the lowest float32: padding with it is padding with -inf for a max pooling that follows
LOWEST = float(np.finfo(np.float32).min)


class NodeError(Exception):
    """A node cannot be converted; the converter adds the file, node name and op type."""


def is_scalar(a: np.ndarray | None, value: float) -> bool:
    """Whether ``a`` is a one-element array equal to ``value`` (to a relative 1e-5)."""
    return a is not None and a.size == 1 and abs(float(a.reshape(-1)[0]) - value) <= TOL * max(1.0, abs(value))


def is_real(value: Any) -> bool:
    """Whether an attribute value is a plain number (not a tensor, list, string or bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def initialiser(init: Any) -> np.ndarray:
    """An initialiser as an array; raw float32 data is viewed, not copied (``as_tensor`` makes the one copy)."""
    import onnx
    from onnx import numpy_helper

    if init.data_type == onnx.TensorProto.FLOAT and init.raw_data and not init.external_data \
            and len(init.raw_data) == 4 * math.prod(init.dims):
        return np.frombuffer(init.raw_data, dtype="<f4").reshape(tuple(init.dims))
    return numpy_helper.to_array(init)


def result_bytes(node: Any, feeds: dict[str, np.ndarray], opset: int) -> int | None:
    """Bytes of the results of ``node`` on the constant ``feeds``, from onnx's shape inference (with the
    small inputs given as data), computed without evaluating the node; None when it cannot be known."""
    from onnx import defs, helper, numpy_helper, shape_inference

    try:
        schema = defs.get_schema(node.op_type, opset, "")
        types = {t: helper.make_tensor_type_proto(helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape))
                 for t, a in feeds.items()}
        data = {t: numpy_helper.from_array(a, t) for t, a in feeds.items() if a.size <= DATA_FOR_INFERENCE}
        outs = shape_inference.infer_node_outputs(schema, node, types, data)
    except Exception:  # noqa: BLE001 - no schema, no inference function, or rejected inputs: size unknown
        return None
    total = 0
    for t in node.output:
        if not t:
            continue
        if t not in outs or not outs[t].tensor_type.HasField("shape"):
            return None
        tt = outs[t].tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if any(d is None or d < 0 for d in dims):
            return None
        try:
            itemsize = helper.tensor_dtype_to_np_dtype(tt.elem_type).itemsize
        except Exception:  # noqa: BLE001 - strings and exotic types: count 8 bytes a value
            itemsize = 8
        total += math.prod(dims) * max(itemsize, 1)
    return total


def as_tensor(a: np.ndarray) -> torch.Tensor:
    """A float32 torch copy of a numpy array (parameters of the IR are float32)."""
    return torch.from_numpy(np.array(a, dtype=np.float32, copy=True))


def flatten_range(src: tuple[int, ...], dst: tuple[int, ...]) -> tuple[int, int] | None:
    """(start, end) such that flattening dims start..end of ``src`` gives ``dst``; None if there is none.

    A range that keeps the batch dimension (start >= 1) is preferred.
    """
    extra = len(src) - len(dst)
    if extra < 0:
        return None
    for start in [*range(1, len(dst)), 0]:
        end = start + extra
        if (src[:start] == dst[:start] and src[end + 1:] == dst[start + 1:]
                and math.prod(src[start:end + 1]) == dst[start]):
            return start, end
    return None


def resolve_reshape(src: tuple[int, ...], spec: list[int], allowzero: int) -> tuple[int, ...] | None:
    """The shape ONNX Reshape makes of ``src`` with the target ``spec`` (0 copies, -1 infers); None if invalid."""
    out = [src[i] if s == 0 and not allowzero and i < len(src) else s for i, s in enumerate(spec)]
    if out.count(-1) > 1 or any(s < -1 for s in out):
        return None
    total = math.prod(src)
    if -1 in out:
        known = math.prod(s for s in out if s != -1)
        if known == 0 or total % known:
            return None
        out[out.index(-1)] = total // known
    return tuple(out) if math.prod(out) == total else None


def ints(a: np.ndarray | None) -> list[int] | None:
    """A constant integer tensor as a list of Python ints (None stays None)."""
    return None if a is None else [int(v) for v in np.asarray(a).reshape(-1)]


def scalar(a: np.ndarray) -> float:
    """The value of a one-element constant."""
    return float(np.asarray(a).reshape(-1)[0])


def show(a: np.ndarray) -> str:
    """A constant operand as error messages name it."""
    return f"the value {scalar(a):g}" if a.size == 1 else f"a tensor of shape {list(a.shape)}"


class ConverterState:
    """What the op-handler mixins (layers, layout) read and call on the ONNX converter, declared once."""

    opset: int
    const: dict[str, np.ndarray]
    value: dict[str, str]
    emit: Callable[..., str]
    aux: Callable[..., str]
    alias: Callable[[Any, str], None]
    attrs: Callable[[Any], dict[str, Any]]
    dyn: Callable[[Any, int], str]
    cin: Callable[..., np.ndarray | None]
    shape_of: Callable[[str], tuple[int, ...]]
