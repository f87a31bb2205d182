"""ONNX op handlers for layers and arithmetic: convolutions, normalisations, pooling, activations, elementwise
ops (with constant operands), reductions, softmax and dense layers.

Each handler is a method of the converter (mixed in from :class:`LayerOps`) that reads one ONNX node and emits
IR nodes; ``OP_HANDLERS`` maps ONNX op types onto them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .onnx_util import (
    LOWEST,
    TOL,
    ConverterState,
    NodeError,
    as_tensor,
    ints,
    scalar,
    show,
)
from .padding import same_padding

_ELEMENTWISE_IR = {"Add": "add", "Sum": "add", "Mul": "mul", "Max": "max", "Sub": "sub", "Div": "div"}
# reductions: ONNX op -> (IR op, IR op for a 4-D keepdim reduction over H and W, first opset with axes as input)
_REDUCTIONS = {"ReduceMean": ("mean", "adaptive_avgpool2d", 18), "ReduceSum": ("sum", None, 13),
               "ReduceMax": ("amax", "adaptive_maxpool2d", 18)}


def _split_pads(begin: list[int], end: list[int]) -> tuple[tuple[int, int], tuple[int, int, int, int] | None]:
    """Window padding (begin/end per spatial axis) as the symmetric part the IR's window ops take, and the
    rest as (left, right, top, bottom) for a separate pad node (None when the padding is symmetric)."""
    sym = (min(begin[0], end[0]), min(begin[1], end[1]))
    extra = (begin[1] - sym[1], end[1] - sym[1], begin[0] - sym[0], end[0] - sym[0])
    return sym, (extra if any(extra) else None)


class LayerOps(ConverterState):
    """Mixin of the ONNX converter: handlers of layers and arithmetic."""

    tensor_node: Callable[[Any, str], str]
    learnt: set[str]

    # ------------------------------------------------------------ shared helpers
    def need_rank(self, x: str, rank: int, what: str) -> tuple[int, ...]:
        shape = self.shape_of(x)
        if len(shape) != rank:
            raise NodeError(f"{what} on a {len(shape)}-D tensor {list(shape)} is not supported; only "
                            f"{rank}-D" + (" (N, C, H, W)" if rank == 4 else ""))
        return shape

    def window_pads(self, at: dict[str, Any], hw: tuple[int, ...], kernel: list[int], strides: list[int],
                    dilations: list[int]) -> tuple[list[int], list[int]]:
        """The (begin, end) padding of a 2-D window op along H and W, from ``pads`` or ``auto_pad``."""
        auto = at.get("auto_pad", "NOTSET")
        if auto == "NOTSET":
            pads = list(at.get("pads", [0] * 4))
            if len(pads) != 4:
                raise NodeError(f"pads {pads} must have 4 values for a 2-D window")
            if min(pads) < 0:
                raise NodeError(f"negative pads {pads} are not supported")
            return pads[:2], pads[2:]
        if auto == "VALID":
            return [0, 0], [0, 0]
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            begin, end = [], []
            for size, k, s, d in zip(hw, kernel, strides, dilations):
                small, big = same_padding(size, k, s, d)
                begin.append(small if auto == "SAME_UPPER" else big)
                end.append(big if auto == "SAME_UPPER" else small)
            return begin, end
        raise NodeError(f"auto_pad={auto!r} is not supported")

    def padded_input(self, node: Any, x: str, extra: tuple[int, int, int, int] | None, value: float) -> str:
        """``x``, or ``x`` padded by ``extra`` (left, right, top, bottom) with ``value`` in a node of its own."""
        if extra is None:
            return x
        return self.aux(node, "pad", {"pads": list(extra), "value": value}, [x], "pad")

    def norm_affine(self, scale_t: str, bias_t: str, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel weight and bias of a normalisation from its constant scale and (optional) bias inputs."""
        scale = self.const.get(scale_t)
        if scale is None:
            raise NodeError(f"the scale ('{scale_t}') must be a constant (initialiser)")
        bias = self.const.get(bias_t) if bias_t else np.zeros(channels, np.float32)
        if bias is None:
            raise NodeError(f"the bias ('{bias_t}') must be a constant (initialiser)")
        out = []
        for what, a in (("scale", scale), ("bias", bias)):
            if a.size == 1:
                a = np.full(channels, scalar(a), np.float32)
            if a.size != channels:
                raise NodeError(f"a {what} of shape {list(a.shape)} is not supported; it must have {channels} values")
            out.append(as_tensor(a.reshape(-1)))
        return out[0], out[1]

    # ------------------------------------------------------------ convolution and normalisation
    def conv_weights(self, node: Any, what: str) -> tuple[str, np.ndarray, np.ndarray | None]:
        """The input, the 4-D weight and the optional bias of a Conv or ConvTranspose node."""
        w = self.cin(node, 1, "weight")
        b = self.cin(node, 2, "bias", required=False)
        assert w is not None
        if w.ndim != 4:
            raise NodeError(f"only 2-D {what} are supported (weight of shape {list(w.shape)})")
        return self.dyn(node, 0), w, b

    def conv(self, node: Any) -> None:
        x, w, b = self.conv_weights(node, "convolutions")
        shape = self.need_rank(x, 4, "Conv")
        at = self.attrs(node)
        kernel = list(at.get("kernel_shape", w.shape[2:]))
        if tuple(kernel) != tuple(w.shape[2:]):
            raise NodeError(f"kernel_shape {kernel} disagrees with the weight's shape {list(w.shape)}")
        strides, dil = list(at.get("strides", [1, 1])), list(at.get("dilations", [1, 1]))
        pad, extra = _split_pads(*self.window_pads(at, shape[2:], kernel, strides, dil))
        x = self.padded_input(node, x, extra, 0.0)
        params = {"weight": as_tensor(w)}
        if b is not None:
            params["bias"] = as_tensor(b.reshape(-1))
        self.emit(node, "conv2d", {"out_channels": w.shape[0], "kernel_size": kernel, "stride": strides,
                                   "padding": pad, "dilation": dil, "groups": at.get("group", 1),
                                   "bias": b is not None}, [x], params=params)

    def conv_transpose(self, node: Any) -> None:
        x, w, b = self.conv_weights(node, "transposed convolutions")
        self.need_rank(x, 4, "ConvTranspose")
        at = self.attrs(node)
        if at.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID") or "output_shape" in at:
            raise NodeError("auto_pad SAME_* and output_shape are not supported; export with explicit pads")
        pads = list(at.get("pads", [0] * 4))
        if len(pads) != 4 or pads[:2] != pads[2:]:
            raise NodeError(f"pads {pads} are not supported; only symmetric 2-D padding is")
        groups = at.get("group", 1)
        params = {"weight": as_tensor(w)}
        if b is not None:
            params["bias"] = as_tensor(b.reshape(-1))
        self.emit(node, "conv_transpose2d", {
            "out_channels": w.shape[1] * groups, "kernel_size": list(w.shape[2:]),
            "stride": list(at.get("strides", [1, 1])), "padding": pads[:2],
            "output_padding": list(at.get("output_padding", [0, 0])), "dilation": list(at.get("dilations", [1, 1])),
            "groups": groups, "bias": b is not None}, [x], params=params)

    def batchnorm(self, node: Any) -> None:
        x = self.dyn(node, 0)
        scale, bias, mean, var = (self.cin(node, i, what) for i, what in
                                  enumerate(["scale", "bias", "running mean", "running variance"], start=1))
        at = self.attrs(node)
        if at.get("training_mode", 0):
            raise NodeError("training_mode=1 (batch statistics) is not supported; export the model in eval mode")
        self.need_rank(x, 4, "BatchNormalization")
        momentum = round(1.0 - float(at.get("momentum", 0.9)), 6)  # ONNX keeps the old value's share
        self.emit(node, "batchnorm2d", {"eps": at.get("epsilon", 1e-5), "momentum": momentum, "affine": True,
                                        "track_running_stats": True}, [x],
                  params={"weight": as_tensor(scale), "bias": as_tensor(bias)},  # type: ignore[arg-type]
                  buffers={"running_mean": as_tensor(mean), "running_var": as_tensor(var),  # type: ignore[arg-type]
                           "num_batches_tracked": torch.tensor(0, dtype=torch.long)})

    def layer_norm(self, node: Any) -> None:
        """LayerNormalization over the last dims: one IR layernorm over the last dim (after a reshape that
        merges the normalised dims, when there are several)."""
        x = self.dyn(node, 0)
        shape = self.shape_of(x)
        at = self.attrs(node)
        axis = int(at.get("axis", -1))
        axis = axis + len(shape) if axis < 0 else axis
        if not 1 <= axis < len(shape):
            raise NodeError(f"a layer norm from axis {at.get('axis', -1)} of a {len(shape)}-D tensor is not "
                            "supported (the batch dimension must not be normalised)")
        size = math.prod(shape[axis:])
        weight, bias = self.norm_affine(node.input[1], node.input[2] if len(node.input) > 2 else "", size)
        attrs = {"dim": -1, "eps": at.get("epsilon", 1e-5)}
        if axis == len(shape) - 1:
            self.emit(node, "layernorm", attrs, [x], params={"weight": weight, "bias": bias})
            return
        flat = self.aux(node, "reshape", {"shape": [*shape[1:axis], size]}, [x], "flatten")
        normed = self.aux(node, "layernorm", attrs, [flat], "norm", params={"weight": weight, "bias": bias})
        self.emit(node, "reshape", {"shape": list(shape[1:])}, [normed])

    def group_norm(self, node: Any) -> None:
        x = self.dyn(node, 0)
        channels = self.shape_of(x)[1]
        at = self.attrs(node)
        groups = int(at.get("num_groups", 0))
        if groups < 1 or channels % groups:
            raise NodeError(f"num_groups={groups} does not divide the {channels} channels")
        scale, bias = self.cin(node, 1, "scale"), self.cin(node, 2, "bias")
        assert scale is not None and bias is not None
        weight, shift = self._affine_arrays(scale, bias, channels)
        self.emit(node, "groupnorm", {"num_groups": groups, "eps": at.get("epsilon", 1e-5)}, [x],
                  params={"weight": weight, "bias": shift})

    def instance_norm(self, node: Any) -> None:
        """InstanceNormalization is a group norm with one channel a group."""
        x = self.dyn(node, 0)
        shape = self.shape_of(x)
        if len(shape) < 3:
            raise NodeError(f"InstanceNormalization of a {len(shape)}-D tensor is not supported")
        scale, bias = self.cin(node, 1, "scale"), self.cin(node, 2, "bias")
        assert scale is not None and bias is not None
        weight, shift = self._affine_arrays(scale, bias, shape[1])
        self.emit(node, "groupnorm", {"num_groups": shape[1], "eps": self.attrs(node).get("epsilon", 1e-5)}, [x],
                  params={"weight": weight, "bias": shift})

    @staticmethod
    def _affine_arrays(scale: np.ndarray, bias: np.ndarray, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        if scale.size != channels or bias.size != channels:
            raise NodeError(f"scale and bias of shapes {list(scale.shape)} and {list(bias.shape)} are not supported; "
                            f"they must have {channels} values")
        return as_tensor(scale.reshape(-1)), as_tensor(bias.reshape(-1))

    def lrn(self, node: Any) -> None:
        x = self.dyn(node, 0)
        self.need_rank(x, 4, "LRN")
        at = self.attrs(node)
        self.emit(node, "lrn", {"size": at.get("size"), "alpha": at.get("alpha", 1e-4), "beta": at.get("beta", 0.75),
                                "k": at.get("bias", 1.0)}, [x])

    # ------------------------------------------------------------ activations
    def clip(self, node: Any) -> None:
        x = self.dyn(node, 0)
        bounds = []
        for i, key in ((1, "min"), (2, "max")):  # inputs since opset 11 (attributes before)
            v = self.cin(node, i, key, required=False)
            if v is not None and v.size != 1:
                raise NodeError(f"a non-scalar {key} of shape {list(v.shape)} is not supported")
            bounds.append(None if v is None else scalar(v))
        self.emit_clip(node, x, *bounds)

    def emit_clip(self, node: Any, x: str, lo: float | None, hi: float | None) -> None:
        if lo is None and hi is None:
            self.emit(node, "identity", {}, [x])
        elif lo == 0.0 and hi == 6.0:
            self.emit(node, "relu6", {}, [x])
        elif lo == 0.0 and (hi is None or hi == math.inf):
            self.emit(node, "relu", {}, [x])
        else:
            self.emit(node, "clip", {"min": -math.inf if lo is None else lo, "max": math.inf if hi is None else hi},
                      [x])

    def hardsigmoid(self, node: Any) -> None:
        at = self.attrs(node)
        alpha, beta = at.get("alpha", 0.2), at.get("beta", 0.5)
        if abs(alpha - 1 / 6) > TOL or abs(beta - 0.5) > TOL:
            raise NodeError(f"HardSigmoid with alpha={alpha:g}, beta={beta:g} is not supported; the IR's "
                            "hardsigmoid is torch's (alpha=1/6, beta=0.5)")
        self.emit(node, "hardsigmoid", {}, [self.dyn(node, 0)])

    def leaky_relu(self, node: Any) -> None:
        self.emit(node, "leaky_relu", {"negative_slope": self.attrs(node).get("alpha", 0.01)}, [self.dyn(node, 0)])

    def elu(self, node: Any) -> None:
        self.emit(node, "elu", {"alpha": self.attrs(node).get("alpha", 1.0)}, [self.dyn(node, 0)])

    def gelu(self, node: Any) -> None:
        approx = self.attrs(node).get("approximate", "none")
        if approx not in ("none", "tanh"):
            raise NodeError(f"approximate={approx!r} is not supported")
        self.emit(node, "gelu", {"approximate": approx}, [self.dyn(node, 0)])

    def neg(self, node: Any) -> None:
        self.emit(node, "affine", {"scale": -1.0}, [self.dyn(node, 0)])

    def prelu(self, node: Any) -> None:
        x = self.dyn(node, 0)
        shape = self.shape_of(x)
        slope = self.cin(node, 1, "slope")
        assert slope is not None
        if slope.size == 1:
            n = 1
        else:
            aligned = (1,) * (len(shape) - slope.ndim) + tuple(slope.shape)
            if len(shape) < 2 or len(aligned) != len(shape) or \
                    [i for i, s in enumerate(aligned) if s != 1] != [1] or aligned[1] != shape[1]:
                raise NodeError(f"a slope of shape {list(slope.shape)} on an input of shape {list(shape)} is not "
                                "supported; it must be one value or one per channel")
            n = shape[1]
        self.emit(node, "prelu", {"num_parameters": n}, [x], params={"weight": as_tensor(slope.reshape(-1))})

    def softmax(self, node: Any) -> None:
        x = self.dyn(node, 0)
        rank = len(self.shape_of(x))
        axis = int(self.attrs(node).get("axis", -1))
        if not -rank <= axis < rank or axis % rank == 0:
            raise NodeError(f"a softmax over axis {axis} of a {rank}-D tensor is not supported (the batch "
                            "dimension cannot be reduced)")
        self.emit(node, "softmax", {"dim": axis % rank}, [x])

    # ------------------------------------------------------------ pooling and reductions
    def pool(self, node: Any) -> None:
        x = self.dyn(node, 0)
        shape = self.need_rank(x, 4, node.op_type)
        at = self.attrs(node)
        kernel = list(at["kernel_shape"])
        if len(kernel) != 2:
            raise NodeError(f"only 2-D pooling is supported (kernel_shape {kernel})")
        strides, dil = list(at.get("strides", [1, 1])), list(at.get("dilations", [1, 1]))
        ceil = bool(at.get("ceil_mode", 0))
        pad, extra = _split_pads(*self.window_pads(at, shape[2:], kernel, strides, dil))
        for p, k, d in zip(pad, kernel, dil):
            if 2 * p > d * (k - 1) + 1:
                raise NodeError(f"padding {list(pad)} is more than half the window {kernel}; torch pooling "
                                "cannot express it")
        if extra is not None and ceil:
            raise NodeError("asymmetric padding with ceil_mode=1 is not supported")
        attrs = {"kernel_size": kernel, "stride": strides, "padding": pad, "ceil_mode": ceil}
        if node.op_type == "MaxPool":
            if at.get("storage_order", 0):
                raise NodeError("storage_order=1 is not supported")
            x = self.padded_input(node, x, extra, LOWEST)
            self.emit(node, "maxpool2d", {**attrs, "dilation": dil}, [x])
            return
        if dil != [1, 1]:
            raise NodeError(f"AveragePool with dilations {dil} is not supported")
        include = bool(at.get("count_include_pad", 0))
        if extra is not None and not include:
            raise NodeError("asymmetric padding with count_include_pad=0 is not supported")
        x = self.padded_input(node, x, extra, 0.0)
        self.emit(node, "avgpool2d", {**attrs, "count_include_pad": include}, [x])

    def global_pool(self, node: Any) -> None:
        x = self.dyn(node, 0)
        self.need_rank(x, 4, node.op_type)
        op = "adaptive_avgpool2d" if node.op_type == "GlobalAveragePool" else "adaptive_maxpool2d"
        self.emit(node, op, {"output_size": (1, 1)}, [x])

    def reduce(self, node: Any) -> None:
        """ReduceMean, ReduceSum, ReduceMax over dims other than the batch dimension."""
        x = self.dyn(node, 0)
        shape = self.shape_of(x)
        at = self.attrs(node)
        op, pool_op, axes_input_from = _REDUCTIONS[node.op_type]
        axes = ints(self.cin(node, 1, "axes", required=False)) if self.opset >= axes_input_from else at.get("axes")
        keep = bool(at.get("keepdims", 1))
        if not axes:
            if at.get("noop_with_empty_axes", 0):
                self.emit(node, "identity", {}, [x])
                return
            axes = list(range(len(shape)))
        if any(not -len(shape) <= a < len(shape) for a in axes):
            raise NodeError(f"axes {axes} are out of range for a {len(shape)}-D tensor")
        dims = sorted({a % len(shape) for a in axes})
        if 0 in dims:
            raise NodeError(f"a reduction over the batch dimension (axes {axes}) is not supported")
        if pool_op and keep and len(shape) == 4 and dims == [2, 3]:
            self.emit(node, pool_op, {"output_size": (1, 1)}, [x])
        else:
            self.emit(node, op, {"dim": dims, "keepdim": keep}, [x])

    # ------------------------------------------------------------ elementwise
    def elementwise(self, node: Any) -> None:
        """Add, Sub, Mul, Div, Max, Min, Sum, Pow: of computed tensors, or of one with a constant."""
        op = node.op_type
        ins = [t for t in node.input if t]
        for i, t in enumerate(node.input):
            if t and t not in self.value:
                self.cin(node, i, "operand")  # raises if undefined
        dyn = [t for t in ins if t in self.value]
        consts = [t for t in ins if t not in self.value]
        if len(ins) == 1:
            self.alias(node, self.value[ins[0]])
        elif not consts:
            if op not in _ELEMENTWISE_IR or (len(ins) > 2 and op in ("Sub", "Div")):
                raise NodeError(f"{op} of two computed tensors has no IR op")
            self.emit(node, _ELEMENTWISE_IR[op], {}, [self.value[t] for t in ins])
        elif len(ins) == 2:
            self.with_constant(node, op, dyn[0], consts[0], const_first=ins[0] in consts)
        else:
            raise NodeError(f"{op} of {len(ins)} inputs with constant ones is not supported")

    def with_constant(self, node: Any, op: str, t: str, c_name: str, const_first: bool) -> None:
        """``op`` of the computed tensor ``t`` and the constant ``c_name`` (in that order unless ``const_first``):
        dropped when neutral, ``affine``/``clip`` for a scalar (or a tensor of equal values that is not one of the
        file's initialisers, which stay learnable tensors), a ``tensor`` node and the binary op otherwise."""
        x = self.value[t]
        c = self.const[c_name]
        shape = self.shape_of(x)
        try:
            out = tuple(np.broadcast_shapes(shape, c.shape))
        except ValueError:
            raise NodeError(f"a constant of shape {list(c.shape)} does not broadcast with {list(shape)}") from None
        if c.ndim > len(shape) or out[0] != shape[0]:
            raise NodeError(f"a constant operand of shape {list(c.shape)} would change the batch dimension of a "
                            f"tensor of shape {list(shape)}")
        uniform = c.size > 0 and bool(np.all(c == c.reshape(-1)[0]))
        neutral = {"Add": 0.0, "Sum": 0.0, "Sub": 0.0, "Mul": 1.0, "Div": 1.0}.get(op)
        as_scalar = c.size == 1 or (uniform and (c_name not in self.learnt or scalar(c) == neutral))
        if out == shape and as_scalar and self._scalar_op(node, op, x, scalar(c), const_first):
            return
        ir = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Max": "max"}.get(op)
        if ir is None:
            raise NodeError(f"{op} with a constant operand ({show(c)}) is not supported")
        tensor = self.tensor_node(node, c_name)
        self.emit(node, ir, {}, [tensor, x] if const_first else [x, tensor])

    def _scalar_op(self, node: Any, op: str, x: str, v: float, const_first: bool) -> bool:
        """Emit ``op`` of ``x`` and the scalar ``v``; False when that needs a tensor node instead."""
        neutral = {"Add": 0.0, "Sum": 0.0, "Sub": 0.0, "Mul": 1.0, "Div": 1.0, "Pow": 1.0}.get(op)
        if v == neutral and not (const_first and op in ("Sub", "Div", "Pow")):
            self.alias(node, x)
        elif op in ("Add", "Sum"):
            self.emit(node, "affine", {"shift": v}, [x])
        elif op == "Sub":
            self.emit(node, "affine", {"scale": -1.0, "shift": v} if const_first else {"shift": -v}, [x])
        elif op == "Mul":
            self.emit(node, "affine", {"scale": v}, [x])
        elif op == "Div" and not const_first:
            if v == 0.0:
                return False
            self.emit(node, "affine", {"scale": 1.0 / v}, [x])
        elif op == "Div" and v == 1.0:
            self.emit(node, "reciprocal", {}, [x])
        elif op == "Div":
            inverse = self.aux(node, "reciprocal", {}, [x], "reciprocal")
            self.emit(node, "affine", {"scale": v}, [inverse])
        elif op == "Pow" and not const_first:
            self.emit(node, "sqrt" if v == 0.5 else "affine", {} if v == 0.5 else {"power": v}, [x])
        elif op == "Max":
            self.emit_clip(node, x, v, None)
        elif op == "Min":
            self.emit_clip(node, x, None, v)
        else:
            raise NodeError(f"{op} with the constant {v:g} as its {'first' if const_first else 'second'} operand "
                            "is not supported")
        return True

    # ------------------------------------------------------------ dense layers
    def gemm(self, node: Any) -> None:
        x = self.dyn(node, 0)
        self.need_rank(x, 2, "Gemm")
        b = self.cin(node, 1, "weight (B)")
        c = self.cin(node, 2, "bias (C)", required=False)
        at = self.attrs(node)
        assert b is not None
        if at.get("transA", 0):
            raise NodeError("transA=1 is not supported (the input must be [N, features])")
        w = b if at.get("transB", 0) else b.T
        alpha, beta = float(at.get("alpha", 1.0)), float(at.get("beta", 1.0))
        if alpha != 1.0:
            w = w * np.float32(alpha)
        params = {"weight": as_tensor(w)}
        if c is not None:
            out = w.shape[0]
            if c.size == 1:
                c = np.full((out,), c.reshape(-1)[0], dtype=np.float32)
            elif c.ndim > 2 or c.shape[-1] != out or c.size != out:
                raise NodeError(f"a bias C of shape {list(c.shape)} is not supported; it must be [{out}] or "
                                f"[1, {out}]")
            params["bias"] = as_tensor(c.reshape(-1) * np.float32(beta) if beta != 1.0 else c.reshape(-1))
        self.emit(node, "linear", {"out_features": w.shape[0], "bias": c is not None}, [x], params=params)

    def matmul(self, node: Any) -> None:
        """MatMul of a computed tensor (any rank >= 2) by a constant matrix: a linear layer on the last dim."""
        x = self.dyn(node, 0)
        w = self.cin(node, 1, "weight (second operand)")
        assert w is not None
        if w.ndim != 2:
            raise NodeError(f"a MatMul weight of shape {list(w.shape)} is not supported; it must be 2-D")
        if len(self.shape_of(x)) < 2:
            raise NodeError(f"MatMul on a {len(self.shape_of(x))}-D tensor is not supported")
        self.emit(node, "linear", {"out_features": w.shape[1], "bias": False}, [x], params={"weight": as_tensor(w.T)})

    # ------------------------------------------------------------ pass-through
    def dropout(self, node: Any) -> None:
        x = self.dyn(node, 0)
        ratio = self.cin(node, 1, "ratio", required=False)
        p = scalar(ratio) if ratio is not None else 0.5  # an input since opset 12
        self.emit(node, "dropout", {"p": p}, [x])

    def identity(self, node: Any) -> None:
        self.emit(node, "identity", {}, [self.dyn(node, 0)])

    def cast(self, node: Any) -> None:
        if self.attrs(node).get("to") != 1:  # TensorProto.FLOAT
            raise NodeError("only casts to float32 of float32 tensors are supported")
        self.alias(node, self.dyn(node, 0))


def _unary(op: str) -> Callable[[Any, Any], None]:
    """A handler for a one-input, attribute-free op."""
    def handler(conv: Any, node: Any) -> None:
        conv.emit(node, op, {}, [conv.dyn(node, 0)])
    return handler


def _softplus(conv: Any, node: Any) -> None:
    conv.emit(node, "softplus", {}, [conv.dyn(node, 0)])


OP_HANDLERS: dict[str, Callable[[Any, Any], None]] = {
    "Conv": LayerOps.conv,
    "ConvTranspose": LayerOps.conv_transpose,
    "BatchNormalization": LayerOps.batchnorm,
    "LayerNormalization": LayerOps.layer_norm,
    "GroupNormalization": LayerOps.group_norm,
    "InstanceNormalization": LayerOps.instance_norm,
    "LRN": LayerOps.lrn,
    **{onnx_op: _unary(ir_op) for onnx_op, ir_op in [
        ("Relu", "relu"), ("Sigmoid", "sigmoid"), ("Tanh", "tanh"), ("HardSwish", "hardswish"), ("Exp", "exp"),
        ("Log", "log"), ("Sqrt", "sqrt"), ("Abs", "abs"), ("Erf", "erf"), ("Reciprocal", "reciprocal"),
        ("Mish", "mish")]},
    "Softplus": _softplus,
    "Neg": LayerOps.neg,
    "Elu": LayerOps.elu,
    "PRelu": LayerOps.prelu,
    "HardSigmoid": LayerOps.hardsigmoid,
    "LeakyRelu": LayerOps.leaky_relu,
    "Gelu": LayerOps.gelu,
    "Clip": LayerOps.clip,
    "Softmax": LayerOps.softmax,
    "MaxPool": LayerOps.pool,
    "AveragePool": LayerOps.pool,
    "GlobalAveragePool": LayerOps.global_pool,
    "GlobalMaxPool": LayerOps.global_pool,
    "ReduceMean": LayerOps.reduce,
    "ReduceSum": LayerOps.reduce,
    "ReduceMax": LayerOps.reduce,
    **{op: LayerOps.elementwise for op in ("Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Pow")},
    "Gemm": LayerOps.gemm,
    "MatMul": LayerOps.matmul,
    "Dropout": LayerOps.dropout,
    "Identity": LayerOps.identity,
    "Cast": LayerOps.cast,
}
