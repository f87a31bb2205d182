"""Caffe layer types beyond the convolution/batch-norm core, for :mod:`automtl_compiler.frontends.prototxt`.

Each ``layer_<Type>`` method converts one layer of that type into IR nodes, following upstream Caffe's
semantics (``caffe/src/caffe/layers/*.cpp``):

``LRN``           ``lrn``; ACROSS_CHANNELS -> region ``across``; WITHIN_CHANNEL -> ``within`` with k = 1
                  (Caffe's within-channel LRN ignores ``k``). ``local_size`` must be odd, as in Caffe.
``Softmax``       ``softmax`` over ``softmax_param.axis``; a *final* Softmax (one no later layer reads) is
                  dropped by default (``softmax="drop"``), so the graph ends at the logits: a backbone
                  never needs the probabilities, and a kept Softmax would be the output that feature
                  detection sees in fully convolutional nets. ``softmax="keep"`` keeps it.
``Power``         ``affine``: (shift + scale * x) ** power.
``Slice``         one ``slice`` node per top that a later layer reads (``slice_point``s, or equal parts);
                  tops that no layer but a Silence reads make no node. Not along the batch axis.
``Crop``          ``slice`` nodes, one per axis (from ``crop_param.axis`` on) where the first bottom is cut
                  to the second bottom's size at the given offset; the second bottom only gives the shape.
``Deconvolution`` ``conv_transpose2d`` (Caffe's weight layout [in, out / group, kh, kw] is torch's).
``Reshape``       ``reshape`` to the static shape Caffe computes (``0`` copies a dim, ``-1`` infers one);
                  the batch dimension must stay first and unchanged.
``PReLU``         ``prelu`` with one slope per channel, or one (``channel_shared``).
``ELU``           ``elu`` with ``elu_param.alpha``.
``Parameter``     ``tensor`` of ``parameter_param.shape`` (no bottom); constant, not trainable, when its
                  ``param`` has ``lr_mult: 0``. Its value is the tensor ``<layer>/value`` of a weights file.
``Permute``       ``permute`` (SSD Caffe's layer): output axis i is input axis ``order[i]``, the batch axis
                  included; axes not listed follow in their order, as in SSD Caffe.
``Pad``           (AutoMTL) ``pad`` of the last two axes by ``pad_param.pads`` (left, right, top, bottom),
                  in ``mode`` CONSTANT (with ``value``), REFLECT or REPLICATE.
``LayerNorm``     (AutoMTL) ``layernorm`` over ``layer_norm_param.axis`` with ``eps``; weight and bias
                  unless ``affine: false``.
"""

from __future__ import annotations

import itertools
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ParseError, ShapeError, UnsupportedOpError
from ..proto import caffe_pb2

if TYPE_CHECKING:
    from ..ir.graph import Graph, Node

#: What a final Softmax becomes: dropped (the graph ends at its input) or kept as a ``softmax`` node.
SOFTMAX_CHOICES = ("drop", "keep")
#: ``pad_param.mode`` -> the pad op's ``mode``.
_PAD_MODES = {caffe_pb2.PadParameter.CONSTANT: "constant", caffe_pb2.PadParameter.REFLECT: "reflect",
              caffe_pb2.PadParameter.REPLICATE: "replicate"}


def f32(value: float) -> float:
    """The shortest decimal that reads back as the same float32 (protobuf ``float`` fields are float32).

    So ``eps: 1e-05`` becomes ``1e-05``, not ``9.99999974737875e-06``.
    """
    x32 = struct.unpack("f", struct.pack("f", value))[0]
    for digits in range(1, 10):
        short = float(f"{value:.{digits}g}")
        if struct.unpack("f", struct.pack("f", short))[0] == x32:
            return short
    return x32


@dataclass
class Folded:
    """A blob whose value was folded away (pre-Scale batch norm output, pre-Flatten pooled mean, unused Slice
    top); reading it is an error carrying ``reason``."""

    reason: str


@dataclass
class Unused(Folded):
    """A Slice top that no layer but a Silence reads: no node is made for it."""


@dataclass
class Layer:
    """A layer to convert, with its index in the file and its line (None when not found)."""

    index: int
    proto: Any
    line: int | None


def pair_field(p: Any, name: str, default: int, where: str) -> tuple[int, int]:
    """A Convolution pad/kernel_size/stride/dilation: one value, or one per spatial axis; or ``name_h/_w``."""
    base = name.replace("_size", "")
    h, w = f"{base}_h", f"{base}_w"
    if h in p.DESCRIPTOR.fields_by_name and (p.HasField(h) or p.HasField(w)):
        if len(getattr(p, name)):
            raise ParseError(f"{where}: both `{name}` and `{h}`/`{w}` are given; use one")
        if base == "kernel" and not (p.HasField(h) and p.HasField(w)):
            raise ParseError(f"{where}: `{h}` and `{w}` must be given together")
        return (getattr(p, h) if p.HasField(h) else default, getattr(p, w) if p.HasField(w) else default)
    values = list(getattr(p, name))
    if not values:
        return (default, default)
    if len(values) == 1:
        return (values[0], values[0])
    if len(values) == 2:
        return (values[0], values[1])
    raise UnsupportedOpError(f"{where}: {len(values)} values of `{name}` (only 2-D convolutions are supported)")


class CaffeLayers:
    """Mixin of the prototxt builder: converters for the layer types listed in the module docstring.

    The builder provides the attributes annotated here and the methods ``emit``, ``bottoms``, ``write``,
    ``describe``, ``source``.
    """

    path: Path
    graph: Graph
    layers: list[Layer]
    blobs: dict[str, str | Folded]
    silenced: set[str]
    caffe_layout: dict[str, tuple[str, str]]
    softmax: str

    if TYPE_CHECKING:
        def emit(self, layer: Layer, op: str, inputs: list[str], attrs: dict[str, Any] | None = None,
                 name: str | None = None) -> Node: ...

        def bottoms(self, layer: Layer, count: int | None = None) -> list[str]: ...

        def write(self, layer: Layer, node: str) -> None: ...

        def describe(self, layer: Layer) -> str: ...

    # ------------------------------------------------------------ helpers
    def error(self, layer: Layer, message: str) -> ParseError:
        """A ParseError naming the file, line and layer."""
        return ParseError(f"{layer.proto.type} layer '{layer.proto.name}': {message}", path=self.path,
                          line=layer.line)

    def read_later(self, pos: int, blob: str) -> bool:
        """Whether a layer after ``pos`` other than a Silence reads ``blob`` before it is rewritten."""
        for later in self.layers[pos + 1:]:
            if blob in later.proto.bottom and later.proto.type != "Silence":
                return True
            if blob in later.proto.top:
                return False
        return False

    def shape_of(self, node: str) -> tuple[int, ...]:
        return tuple(self.graph.node(node).shape or ())

    def axis(self, layer: Layer, axis: int, rank: int, what: str = "axis") -> int:
        """``axis`` of a ``rank``-D blob as a non-negative index (Caffe's negative axes count from the end)."""
        if not -rank <= axis < rank:
            raise self.error(layer, f"{what} {axis} is out of range for a {rank}-D blob")
        return axis % rank

    def conv_attrs(self, layer: Layer) -> dict[str, Any]:
        """The conv2d / conv_transpose2d attributes of a Convolution or Deconvolution layer."""
        p, where = layer.proto.convolution_param, self.describe(layer)
        if not p.HasField("num_output"):
            raise self.error(layer, "convolution_param needs num_output")
        if p.axis != 1:
            raise UnsupportedOpError(f"{where}: convolution over axis {p.axis} (only the channel axis 1)")
        kernel = pair_field(p, "kernel_size", 0, where)
        if 0 in kernel:
            raise self.error(layer, "convolution_param needs kernel_size or kernel_h/kernel_w")
        return {"out_channels": p.num_output, "kernel_size": kernel, "stride": pair_field(p, "stride", 1, where),
                "padding": pair_field(p, "pad", 0, where), "dilation": pair_field(p, "dilation", 1, where),
                "groups": p.group, "bias": p.bias_term}

    # ------------------------------------------------------------ layers
    def layer_LRN(self, pos: int, layer: Layer) -> None:
        p = layer.proto.lrn_param
        if p.local_size % 2 == 0:
            raise self.error(layer, f"local_size {p.local_size} is even; Caffe's LRN needs an odd size")
        across = p.norm_region == caffe_pb2.LRNParameter.ACROSS_CHANNELS
        attrs = {"size": p.local_size, "alpha": f32(p.alpha), "beta": f32(p.beta),
                 "k": f32(p.k) if across else 1.0, "region": "across" if across else "within"}
        self.write(layer, self.emit(layer, "lrn", self.bottoms(layer, 1), attrs).name)

    def layer_Softmax(self, pos: int, layer: Layer) -> None:
        (src,) = self.bottoms(layer, 1)
        tops = list(layer.proto.top)
        if self.softmax == "drop" and len(tops) == 1 and not self.read_later(pos, tops[0]):
            self.blobs[tops[0]] = src
            return
        dim = self.axis(layer, layer.proto.softmax_param.axis, len(self.shape_of(src)))
        self.write(layer, self.emit(layer, "softmax", [src], {"dim": dim}).name)

    def layer_Power(self, pos: int, layer: Layer) -> None:
        p = layer.proto.power_param
        attrs = {"scale": f32(p.scale), "shift": f32(p.shift), "power": f32(p.power)}
        self.write(layer, self.emit(layer, "affine", self.bottoms(layer, 1), attrs).name)

    def slice_edges(self, layer: Layer, size: int, parts: int) -> list[int]:
        """Boundaries of a Slice layer's ``parts`` pieces of an axis of ``size``."""
        points = list(layer.proto.slice_param.slice_point)
        if not points:
            if parts == 0 or size % parts:
                raise self.error(layer, f"cannot cut an axis of {size} into {parts} equal parts; give slice_point")
            return [i * (size // parts) for i in range(parts + 1)]
        if len(points) != parts - 1:
            raise self.error(layer, f"{len(points)} slice_point value(s) need {len(points) + 1} tops, not {parts}")
        edges = [0, *points, size]
        if any(a >= b for a, b in itertools.pairwise(edges)):
            raise self.error(layer, f"slice_point {points} must increase strictly within (0, {size})")
        return edges

    def layer_Slice(self, pos: int, layer: Layer) -> None:
        proto, p = layer.proto, layer.proto.slice_param
        (src,) = self.bottoms(layer, 1)
        shape = self.shape_of(src)
        dim = self.axis(layer, p.axis if p.HasField("axis") or not p.HasField("slice_dim") else p.slice_dim,
                        len(shape))
        if dim == 0:
            raise UnsupportedOpError(f"{self.describe(layer)}: slices the batch axis 0; only axes after it can be "
                                     "sliced")
        tops = list(proto.top)
        edges = self.slice_edges(layer, shape[dim], len(tops))
        used = [t for t in tops if self.read_later(pos, t)] or tops
        for top, (start, end) in zip(tops, itertools.pairwise(edges)):
            if top not in used:
                self.blobs[top] = Unused(f"a top of Slice '{proto.name}' that automtl did not compute because no "
                                         "layer reads it")
                continue
            name = proto.name if len(used) == 1 else f"{proto.name}/{top}"
            attrs = {"dim": dim, "start": start, "end": end, "step": 1}
            self.blobs[top] = self.emit(layer, "slice", [src], attrs, name=name).name

    def crop_offsets(self, layer: Layer, count: int) -> list[int]:
        offsets = list(layer.proto.crop_param.offset)
        if not offsets:
            return [0] * count
        if len(offsets) == 1:
            return offsets * count
        if len(offsets) != count:
            raise self.error(layer, f"{len(offsets)} offsets for {count} cropped axes (give one, or one per axis)")
        return offsets

    def layer_Crop(self, pos: int, layer: Layer) -> None:
        src, ref = self.bottoms(layer, 2)
        shape, target = self.shape_of(src), self.shape_of(ref)
        if len(shape) != len(target):
            raise self.error(layer, f"crops a {len(shape)}-D blob to the shape of a {len(target)}-D one")
        start = self.axis(layer, layer.proto.crop_param.axis, len(shape))
        cuts = []
        for d, offset in zip(range(start, len(shape)), self.crop_offsets(layer, len(shape) - start)):
            if offset + target[d] > shape[d]:
                raise ShapeError(f"{self.describe(layer)}: axis {d}: offset {offset} + size {target[d]} exceeds "
                                 f"the input's {shape[d]} (input {list(shape)}, reference {list(target)})")
            if (offset, target[d]) != (0, shape[d]):
                cuts.append((d, offset, offset + target[d]))
        if any(d == 0 for d, _, _ in cuts):
            raise UnsupportedOpError(f"{self.describe(layer)}: crops the batch axis 0")
        self.silenced.add(ref)
        node = src
        for i, (d, begin, end) in enumerate(cuts):
            name = layer.proto.name if i == len(cuts) - 1 else f"{layer.proto.name}/axis{d}"
            node = self.emit(layer, "slice", [node], {"dim": d, "start": begin, "end": end, "step": 1}, name=name).name
        if not cuts:
            node = self.emit(layer, "identity", [src]).name
        self.write(layer, node)

    def layer_Deconvolution(self, pos: int, layer: Layer) -> None:
        attrs = {**self.conv_attrs(layer), "output_padding": (0, 0)}
        node = self.emit(layer, "conv_transpose2d", self.bottoms(layer, 1), attrs)
        self.caffe_layout[layer.proto.name] = ("plain", node.name)
        self.write(layer, node.name)

    def reshape_target(self, layer: Layer, shape: tuple[int, ...]) -> list[int]:
        """The output shape of a Reshape layer on a blob of ``shape`` (Caffe's rules for 0, -1, axis, num_axes)."""
        p, rank = layer.proto.reshape_param, len(shape)
        begin = p.axis if p.axis >= 0 else rank + 1 + p.axis
        end = rank if p.num_axes == -1 else begin + p.num_axes
        if not 0 <= begin <= end <= rank or p.num_axes < -1:
            raise self.error(layer, f"axis {p.axis} / num_axes {p.num_axes} do not fit a {rank}-D blob")
        middle, infer = [], None
        for i, d in enumerate(p.shape.dim):
            if d == 0 and begin + i >= rank:
                raise self.error(layer, f"dim {i} is 0 (copy) but the input has no axis {begin + i}")
            if d == -1 and infer is not None:
                raise self.error(layer, "more than one dim is -1")
            if d < -1:
                raise self.error(layer, f"dim {i} is {d}; dims are positive, 0 (copy) or -1 (infer)")
            infer = len(middle) if d == -1 else infer
            middle.append(shape[begin + i] if d == 0 else max(int(d), 1))
        out = [*shape[:begin], *middle, *shape[end:]]
        if infer is not None:
            known = math.prod(out) // out[begin + infer]
            if known == 0 or math.prod(shape) % known:
                raise ShapeError(f"{self.describe(layer)}: cannot infer the -1 dim of {list(p.shape.dim)} for an "
                                 f"input of shape {list(shape)}")
            out[begin + infer] = math.prod(shape) // known
        if math.prod(out) != math.prod(shape):
            raise ShapeError(f"{self.describe(layer)}: cannot reshape {list(shape)} ({math.prod(shape)} values) to "
                             f"{out} ({math.prod(out)} values)")
        return out

    def layer_Reshape(self, pos: int, layer: Layer) -> None:
        (src,) = self.bottoms(layer, 1)
        shape = self.shape_of(src)
        out = self.reshape_target(layer, shape)
        if out[0] != shape[0]:
            raise UnsupportedOpError(f"{self.describe(layer)}: reshapes {list(shape)} to {out}, which changes the "
                                     "batch dimension; only reshapes that keep dim 0 are supported")
        self.write(layer, self.emit(layer, "reshape", [src], {"shape": tuple(out[1:])}).name)

    def layer_PReLU(self, pos: int, layer: Layer) -> None:
        (src,) = self.bottoms(layer, 1)
        shape = self.shape_of(src)
        if len(shape) < 2:
            raise self.error(layer, f"needs a blob with a channel axis, got shape {list(shape)}")
        count = 1 if layer.proto.prelu_param.channel_shared else shape[1]
        node = self.emit(layer, "prelu", [src], {"num_parameters": count})
        self.caffe_layout[layer.proto.name] = ("plain", node.name)
        self.write(layer, node.name)

    def layer_ELU(self, pos: int, layer: Layer) -> None:
        alpha = f32(layer.proto.elu_param.alpha)
        self.write(layer, self.emit(layer, "elu", self.bottoms(layer, 1), {"alpha": alpha}).name)

    def layer_Parameter(self, pos: int, layer: Layer) -> None:
        shape = tuple(layer.proto.parameter_param.shape.dim)
        if not shape or min(shape) <= 0:
            raise self.error(layer, f"parameter_param needs a shape of positive dims, got {list(shape)}")
        self.bottoms(layer, 0)
        constant = bool(layer.proto.param) and all(spec.lr_mult == 0 for spec in layer.proto.param)
        node = self.emit(layer, "tensor", [], {"shape": shape, "trainable": not constant})
        self.write(layer, node.name)

    def layer_Permute(self, pos: int, layer: Layer) -> None:
        (src,) = self.bottoms(layer, 1)
        rank = len(self.shape_of(src))
        order = list(layer.proto.permute_param.order)
        if any(d >= rank for d in order) or len(set(order)) != len(order):
            raise self.error(layer, f"permute_param order {order} is not a list of distinct axes of a {rank}-D "
                                    "blob")
        dims = [*order, *(d for d in range(rank) if d not in order)]
        self.write(layer, self.emit(layer, "permute", [src], {"dims": dims}).name)

    def layer_Pad(self, pos: int, layer: Layer) -> None:
        p = layer.proto.pad_param
        if len(p.pads) != 4:
            raise self.error(layer, f"pad_param needs 4 pads (left, right, top, bottom), got {list(p.pads)}")
        attrs = {"pads": tuple(p.pads), "mode": _PAD_MODES[p.mode], "value": f32(p.value)}
        self.write(layer, self.emit(layer, "pad", self.bottoms(layer, 1), attrs).name)

    def layer_LayerNorm(self, pos: int, layer: Layer) -> None:
        p = layer.proto.layer_norm_param
        (src,) = self.bottoms(layer, 1)
        self.axis(layer, p.axis, len(self.shape_of(src)))
        if not p.eps > 0:
            raise self.error(layer, f"layer_norm_param eps must be positive, got {p.eps}")
        node = self.emit(layer, "layernorm", [src], {"dim": p.axis, "eps": f32(p.eps), "affine": p.affine})
        if p.affine:
            self.caffe_layout[layer.proto.name] = ("plain", node.name)
        self.write(layer, node.name)


__all__ = ["SOFTMAX_CHOICES", "CaffeLayers", "Folded", "Layer", "Unused", "f32", "pair_field"]
