"""ONNX op handlers that move data: reshapes, flatten, (un)squeeze, transpose, slice, split, gather, concat,
pad, resize and expand.

Every size is static (the converter knows each tensor's shape), so each handler computes its IR attributes
from constants; only the batch dimension (dim 0) may differ at run time, so an op that would read or move
it (other than a transpose) is refused with an explanation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .onnx_util import (
    LOWEST,
    ConverterState,
    NodeError,
    flatten_range,
    ints,
    resolve_reshape,
    scalar,
)

_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}


def _nearest_matches_torch(size: int, out: int, scale: float, ctm: str, mode: str) -> bool:
    """Whether ONNX Resize 'nearest' with these settings picks the same source pixels as torch's nearest."""
    dst = np.arange(out, dtype=np.float64)
    if ctm == "asymmetric":
        src = dst / scale
    elif ctm in ("half_pixel", "pytorch_half_pixel"):
        src = (dst + 0.5) / scale - 0.5 if (out > 1 or ctm == "half_pixel") else np.zeros(out)
    elif ctm == "align_corners":
        src = dst * (size - 1) / (out - 1) if out > 1 else np.zeros(out)
    else:
        return False
    rounding = {"floor": np.floor, "ceil": np.ceil, "round_prefer_floor": lambda v: np.ceil(v - 0.5),
                "round_prefer_ceil": lambda v: np.floor(v + 0.5)}.get(mode)
    if rounding is None:
        return False
    onnx_idx = np.clip(rounding(src), 0, size - 1).astype(np.int64)
    torch_idx = np.minimum(np.floor(dst.astype(np.float32) * np.float32(size / out)), size - 1).astype(np.int64)
    return bool(np.array_equal(onnx_idx, torch_idx))


class LayoutOps(ConverterState):
    """Mixin of the ONNX converter: handlers of data-movement ops."""

    batch_overridden: bool
    declared_batch: int | None
    node_name: Callable[[Any, int], str]
    unique: Callable[[str], str]
    current: int

    def as_reshape(self, node: Any, x: str, target: tuple[int, ...]) -> None:
        """Reshape ``x`` to ``target``: nothing, a flatten (merging adjacent dims) or a reshape keeping the batch."""
        src = self.shape_of(x)
        if target == src:
            self.alias(node, x)
            return
        rng = flatten_range(src, target)
        if rng is not None:
            start, end = rng
            self.emit(node, "flatten", {"start_dim": start, "end_dim": -1 if end == len(src) - 1 else end}, [x])
        elif target and target[0] == src[0] and len(target) > 1:
            self.emit(node, "reshape", {"shape": list(target[1:])}, [x])
        else:
            raise NodeError(f"a reshape from {list(src)} to {list(target)} is not supported: it moves the batch "
                            "dimension (dim 0), which every IR op keeps in place")

    def reshape(self, node: Any) -> None:
        x = self.dyn(node, 0)
        spec = self.cin(node, 1, "target shape")
        assert spec is not None
        src = self.shape_of(x)
        allowzero = self.attrs(node).get("allowzero", 0)
        dims = [int(s) for s in spec.reshape(-1)]
        target = resolve_reshape(src, dims, allowzero)
        if self.batch_overridden and dims and dims[0] == self.declared_batch and \
                (target is None or (target != src and target[0] != src[0])):
            # a shape constant written for the file's batch size, loaded at another: keep the batch dimension
            target = resolve_reshape(src, [0, *dims[1:]], 0) or target
        if target is None:
            raise NodeError(f"the target shape {dims} does not fit an input of shape {list(src)}")
        self.as_reshape(node, x, target)

    def flatten(self, node: Any) -> None:
        x = self.dyn(node, 0)
        src = self.shape_of(x)
        axis = self.attrs(node).get("axis", 1)
        axis = axis + len(src) if axis < 0 else axis
        self.as_reshape(node, x, (math.prod(src[:axis]), math.prod(src[axis:])))

    def squeeze(self, node: Any) -> None:
        x = self.dyn(node, 0)
        src = self.shape_of(x)
        axes_arr = self.cin(node, 1, "axes", required=False)
        axes = {int(a) % len(src) for a in axes_arr.reshape(-1)} if axes_arr is not None else \
            {i for i, s in enumerate(src) if s == 1}
        if any(src[a] != 1 for a in axes):
            raise NodeError(f"cannot squeeze axes {sorted(axes)} of a tensor of shape {list(src)}")
        self.as_reshape(node, x, tuple(s for i, s in enumerate(src) if i not in axes))

    def unsqueeze(self, node: Any) -> None:
        x = self.dyn(node, 0)
        src = self.shape_of(x)
        axes = ints(self.cin(node, 1, "axes"))
        assert axes is not None
        rank = len(src) + len(axes)
        where = sorted({a % rank for a in axes})
        if len(where) != len(axes) or any(not -rank <= a < rank for a in axes):
            raise NodeError(f"axes {axes} are invalid for a {len(src)}-D input")
        if 0 in where:
            raise NodeError("inserting a dimension before the batch dimension is not supported")
        it = iter(src)
        self.as_reshape(node, x, tuple(1 if i in where else next(it) for i in range(rank)))

    def transpose(self, node: Any) -> None:
        x = self.dyn(node, 0)
        rank = len(self.shape_of(x))
        perm = [int(p) for p in self.attrs(node).get("perm", range(rank - 1, -1, -1))]
        if perm == list(range(rank)):
            self.alias(node, x)
        else:
            self.emit(node, "permute", {"dims": perm}, [x])

    # ------------------------------------------------------------ slicing
    def emit_slices(self, node: Any, x: str, cuts: list[tuple[int, int, int, int]], output: str, index: int) -> None:
        """Slice ``x`` along each (dim, start, end, step) of ``cuts`` in turn, binding the result to ``output``.
        A cut that keeps the whole dimension is skipped; the batch dimension cannot be cut."""
        shape = self.shape_of(x)
        todo = []
        for dim, start, end, step in cuts:
            start, end, step = slice(start, end, step).indices(shape[dim])
            n = len(range(start, end, step))
            if n == 0:
                raise NodeError(f"slice {start}:{end}:{step} of dimension {dim} (size {shape[dim]}) is empty")
            if (start, n, step) == (0, shape[dim], 1):
                continue
            if dim == 0:
                raise NodeError("slicing the batch dimension is not supported")
            todo.append({"dim": dim, "start": start, "end": start + (n - 1) * step + 1, "step": step})
        if not todo:
            self.value[output] = x
            return
        base = self.node_name(node, self.current) + (f"_{index}" if index else "")
        for i, attrs in enumerate(todo):
            last = i == len(todo) - 1
            x = self.emit(node, "slice", attrs, [x], name=base if last else f"{base}/dim{attrs['dim']}",
                          output=output, bind=last)

    def slice(self, node: Any) -> None:
        x = self.dyn(node, 0)
        rank = len(self.shape_of(x))
        starts, ends = ints(self.cin(node, 1, "starts")), ints(self.cin(node, 2, "ends"))
        axes = ints(self.cin(node, 3, "axes", required=False)) or list(range(len(starts or [])))
        steps = ints(self.cin(node, 4, "steps", required=False)) or [1] * len(axes)
        assert starts is not None and ends is not None
        if not len(starts) == len(ends) == len(axes) == len(steps):
            raise NodeError("starts, ends, axes and steps differ in length")
        if any(s < 1 for s in steps):
            raise NodeError(f"steps {steps} are not supported; only positive steps are")
        if any(not -rank <= a < rank for a in axes):
            raise NodeError(f"axes {axes} are out of range for a {rank}-D input")
        cuts = [(a % rank, s, e, st) for a, s, e, st in zip(axes, starts, ends, steps)]
        self.emit_slices(node, x, cuts, node.output[0], 0)

    def split(self, node: Any) -> None:
        x = self.dyn(node, 0)
        shape = self.shape_of(x)
        at = self.attrs(node)
        axis = int(at.get("axis", 0))
        if not -len(shape) <= axis < len(shape):
            raise NodeError(f"axis {axis} is out of range for a {len(shape)}-D input")
        axis %= len(shape)
        size, n = shape[axis], len(node.output)
        sizes = ints(self.cin(node, 1, "split", required=False))
        if sizes is None:
            piece = -(-size // n)
            sizes = [piece] * (n - 1) + [size - piece * (n - 1)]
            if self.opset < 18 and size % n:
                raise NodeError(f"{size} does not split into {n} equal parts")
        if len(sizes) != n or sum(sizes) != size or min(sizes) < 0:
            raise NodeError(f"split sizes {sizes} do not divide dimension {axis} of size {size} into {n} outputs")
        start = 0
        for i, (t, s) in enumerate(zip(node.output, sizes)):
            if t:
                self.emit_slices(node, x, [(axis, start, start + s, 1)], t, i)
            start += s

    def gather(self, node: Any) -> None:
        """Gather of a computed tensor at constant indices: a slice (one index, or evenly spaced ones) and a
        reshape, or the whole tensor reordered by a reshape of ``arange``."""
        x = self.dyn(node, 0)
        shape = self.shape_of(x)
        idx = self.cin(node, 1, "indices")
        assert idx is not None
        axis = int(self.attrs(node).get("axis", 0))
        if not -len(shape) <= axis < len(shape):
            raise NodeError(f"axis {axis} is out of range for a {len(shape)}-D input")
        axis %= len(shape)
        flat = [int(i) % shape[axis] if -shape[axis] <= int(i) < shape[axis] else -1 for i in idx.reshape(-1)]
        if -1 in flat:
            raise NodeError(f"indices out of range for dimension {axis} of size {shape[axis]}")
        out = (*shape[:axis], *idx.shape, *shape[axis + 1:])
        if axis == 0 and flat == list(range(shape[0])) and self._regroup(node, x, out):
            return
        step = flat[1] - flat[0] if len(flat) > 1 else 1
        if step < 1 or flat != list(range(flat[0], flat[0] + step * len(flat), step)):
            raise NodeError(f"gathering indices {flat[:8]}{'...' if len(flat) > 8 else ''} is not supported; only "
                            "a single index or evenly spaced increasing indices are")
        sliced = f"{node.output[0]}#sliced"
        self.emit_slices(node, x, [(axis, flat[0], flat[-1] + 1, step)], sliced, 0)
        self.as_reshape(node, self.value.pop(sliced), out)

    def _regroup(self, node: Any, x: str, out: tuple[int, ...]) -> bool:
        """Gather(flatten(y), arange(n).reshape(out)) is y reshaped to ``out`` (an exporter's as_strided view);
        True when ``x`` is such a flatten of a tensor whose batch dimension ``out`` keeps."""
        from_node = self.graph_node(x)
        if from_node.op != "flatten" or from_node.attrs["start_dim"] != 0:
            return False
        src = from_node.inputs[0]
        if self.shape_of(src)[0] != out[0]:
            return False
        self.as_reshape(node, src, out)
        return True

    def graph_node(self, name: str) -> Any:
        return self.graph.node(name)  # type: ignore[attr-defined]

    def concat(self, node: Any) -> None:
        ins = [self.dyn(node, i) for i, t in enumerate(node.input) if t]
        self.emit(node, "concat", {"dim": self.attrs(node).get("axis")}, ins)

    def expand(self, node: Any) -> None:
        x = self.dyn(node, 0)
        target = ints(self.cin(node, 1, "shape"))
        assert target is not None
        shape = self.shape_of(x)
        try:
            out = tuple(np.broadcast_shapes(shape, tuple(target)))
        except ValueError:
            raise NodeError(f"shape {target} does not broadcast with {list(shape)}") from None
        if out != shape:
            raise NodeError(f"expanding {list(shape)} to {list(out)} is not supported; only an Expand that keeps "
                            "the shape is")
        self.alias(node, x)

    # ------------------------------------------------------------ padding and resizing
    def pad(self, node: Any) -> None:
        x = self.dyn(node, 0)
        shape = self.shape_of(x)
        rank = len(shape)
        at = self.attrs(node)
        mode = at.get("mode", "constant")
        if mode not in _PAD_MODES:
            raise NodeError(f"mode={mode!r} is not supported (constant, reflect and edge are)")
        pads = ints(self.cin(node, 1, "pads"))
        value_arr = self.cin(node, 2, "constant value", required=False)
        axes = ints(self.cin(node, 3, "axes", required=False)) or list(range(rank))
        assert pads is not None
        if len(pads) != 2 * len(axes):
            raise NodeError(f"pads {pads} do not match {len(axes)} axes")
        begin, end = [0] * rank, [0] * rank
        for i, a in enumerate(axes):
            begin[a % rank], end[a % rank] = pads[i], pads[i + len(axes)]
        if rank != 4 or begin[:2] != [0, 0] or end[:2] != [0, 0]:
            raise NodeError(f"padding {pads} of a {rank}-D tensor is not supported; only padding of the last two "
                            "dims of a 4-D tensor (N, C, H, W) is")
        value = scalar(value_arr) if value_arr is not None and value_arr.size else 0.0
        if value == -math.inf:
            value = LOWEST  # MaxPool2dSame pads with -inf; equal for the max pooling that follows
        attrs = {"pads": [begin[3], end[3], begin[2], end[2]], "mode": _PAD_MODES[mode]}
        if mode == "constant":
            attrs["value"] = value
        if not any(attrs["pads"]):
            self.alias(node, x)
        else:
            self.emit(node, "pad", attrs, [x])

    def resize(self, node: Any) -> None:
        x = self.dyn(node, 0)
        shape = self.need_rank(x, 4, "Resize")  # type: ignore[attr-defined]
        at = self.attrs(node)
        scales = self.cin(node, 2, "scales", required=False)
        sizes = ints(self.cin(node, 3, "sizes", required=False))
        if at.get("axes") is not None or at.get("antialias", 0) or \
                at.get("keep_aspect_ratio_policy", "stretch") != "stretch":
            raise NodeError("axes, antialias and keep_aspect_ratio_policy other than 'stretch' are not supported")
        if sizes:
            out = [int(s) for s in sizes]
            scale_hw = [out[2] / shape[2], out[3] / shape[3]]
        elif scales is not None and scales.size:
            factors = [float(s) for s in scales.reshape(-1)]
            out = [math.floor(s * f) for s, f in zip(shape, factors)]
            scale_hw = factors[2:]
        else:
            raise NodeError("neither scales nor sizes is given")
        if len(out) != 4 or out[:2] != list(shape[:2]):
            raise NodeError(f"resizing {list(shape)} to {out} is not supported; only H and W may change")
        mode, ctm = at.get("mode", "nearest"), at.get("coordinate_transformation_mode", "half_pixel")
        if mode == "nearest":
            nearest = at.get("nearest_mode", "round_prefer_floor")
            for size, n, s in zip(shape[2:], out[2:], scale_hw):
                if not _nearest_matches_torch(size, n, s, ctm, nearest):
                    raise NodeError(f"nearest resizing {size} -> {n} with coordinate_transformation_mode={ctm!r} "
                                    f"and nearest_mode={nearest!r} differs from torch's nearest")
            self.emit(node, "resize", {"size": out[2:], "mode": "nearest"}, [x])
            return
        exact = all(abs(s - n / size) < 1e-6 * s for size, n, s in zip(shape[2:], out[2:], scale_hw))
        if mode == "linear" and ctm in ("half_pixel", "pytorch_half_pixel", "align_corners") and \
                (exact or ctm == "align_corners") and (ctm != "pytorch_half_pixel" or min(out[2:]) > 1):
            self.emit(node, "resize", {"size": out[2:], "mode": "bilinear", "align_corners": ctm == "align_corners"},
                      [x])
            return
        raise NodeError(f"mode={mode!r} with coordinate_transformation_mode={ctm!r} is not supported (nearest, and "
                        "linear with half_pixel or align_corners, are)")


LAYOUT_HANDLERS: dict[str, Callable[[Any, Any], None]] = {
    "Reshape": LayoutOps.reshape,
    "Flatten": LayoutOps.flatten,
    "Squeeze": LayoutOps.squeeze,
    "Unsqueeze": LayoutOps.unsqueeze,
    "Transpose": LayoutOps.transpose,
    "Slice": LayoutOps.slice,
    "Split": LayoutOps.split,
    "Gather": LayoutOps.gather,
    "Concat": LayoutOps.concat,
    "Expand": LayoutOps.expand,
    "Pad": LayoutOps.pad,
    "Resize": LayoutOps.resize,
}
