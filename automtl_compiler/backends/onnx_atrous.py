"""An exact rewrite of quantized dilated convolutions: stop multiplying the zero padding.

A 3x3 convolution with dilation ``d`` and padding ``d`` on a feature map of side ``n`` reads, for outputs
near the border, taps ``d`` pixels away that lie in the padding, and onnxruntime's kernels multiply them
all the same. In DeepLab's ASPP heads (rates 6, 12, 18, 24 on the 29x29 map of a 224x224 input) 26 % to
80 % of those convolutions' multiply-accumulates are such zeros: a third of the whole network's.

:func:`skip_padding_taps` splits the output of each such convolution into the rectangles in which the
same taps read real pixels (at most three bands per axis: taps missing at the start, all taps, taps
missing at the end), computes each with an unpadded convolution of only those taps on a slice of the
input, and concatenates the rectangles. It works on the QDQ graphs of onnxruntime's static quantization
(``DequantizeLinear -> Conv -> QuantizeLinear``): the slices and the concatenation move uint8 values that
share the original tensors' scales, the weight pieces are slices of the one stored int8 weight (folded when
onnxruntime opens the file, so the file does not grow), and each rectangle is still one ``QLinearConv``.
Padding holds the zero point, which adds nothing to an integer convolution, so the result is the same
integers. It needs a fixed height and width, stride 1 and no ``auto_pad``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

#: Rewrite a convolution only when it saves at least this share of its multiply-accumulates and at least
#: this many of them per image: below either, the extra kernel calls, slices and concatenations cost about
#: what they save (4.7 M-MAC head convs on an 8x8 map made a model 1.3x slower; with its 4 G-MAC ASPP convs
#: rewritten, DeepLab-ResNet-34 at 224x224 takes 0.73-0.78x the time of the file without the rewrite).
MIN_SAVING = 0.2
MIN_SAVED_MACS = 20e6


@dataclass(frozen=True)
class Band:
    """Outputs ``start:stop`` along one axis, whose valid kernel taps are ``first..last`` (inclusive)."""

    start: int
    stop: int
    first: int
    last: int


def tap_bands(size: int, kernel: int, dilation: int, pad_begin: int, pad_end: int) -> list[Band] | None:
    """The bands of outputs along one axis (stride 1) with the same valid taps; None when some output
    reads padding only (then the rewrite does not apply)."""
    out = size + pad_begin + pad_end - dilation * (kernel - 1)
    if out <= 0:
        return None
    lows = [pad_begin - t * dilation for t in range(kernel)]
    highs = [size - 1 + pad_begin - t * dilation for t in range(kernel)]
    cuts = sorted({0, out, *(min(max(v, 0), out) for v in lows), *(min(max(v + 1, 0), out) for v in highs)})
    bands = []
    for start, stop in itertools.pairwise(cuts):
        taps = [t for t in range(kernel) if lows[t] <= start and stop - 1 <= highs[t]]
        if not taps:
            return None
        bands.append(Band(start, stop, taps[0], taps[-1]))
    return bands


def padding_share(rows: list[Band], cols: list[Band], kernel: tuple[int, int]) -> float:
    """The share of a convolution's multiply-accumulates that read padding."""
    done = sum((r.stop - r.start) * (c.stop - c.start) * (r.last - r.first + 1) * (c.last - c.first + 1)
               for r in rows for c in cols)
    return 1.0 - done / (rows[-1].stop * cols[-1].stop * kernel[0] * kernel[1])


@dataclass
class _QConv:
    """A quantized convolution as onnxruntime's QDQ quantizer writes it."""

    conv: onnx.NodeProto
    x: onnx.NodeProto  # DequantizeLinear of the input
    w: onnx.NodeProto  # DequantizeLinear of the int8 weight initializer
    y: onnx.NodeProto  # QuantizeLinear of the output, its only consumer


class _Graph:
    """Producers, consumers, initialisers, shapes and fresh names of one graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.inits = {i.name: i for i in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for t in n.input:
                self.consumers.setdefault(t, []).append(n)
        self.outputs = {o.name for o in g.output}
        self.used = {*self.inits, *(v.name for v in [*g.input, *g.output, *g.value_info]),
                     *(t for n in g.node for t in [*n.input, *n.output]), *(n.name for n in g.node)}
        inferred = onnx.shape_inference.infer_shapes(model)
        self.shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
                       for v in [*inferred.graph.input, *inferred.graph.value_info] if v.type.tensor_type.HasField("shape")}

    def name(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            name, k = f"{base}_{k}", k + 1
        self.used.add(name)
        return name

    def quantized_conv(self, node: onnx.NodeProto) -> _QConv | None:
        """``node`` with its DequantizeLinear inputs and QuantizeLinear output, when it has that form."""
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            return None
        x, w = self.producer.get(node.input[0]), self.producer.get(node.input[1])
        after = self.consumers.get(node.output[0], [])
        if (x is None or w is None or x.op_type != "DequantizeLinear" or w.op_type != "DequantizeLinear"
                or w.input[0] not in self.inits or len(after) != 1 or after[0].op_type != "QuantizeLinear"
                or node.output[0] in self.outputs):
            return None
        return _QConv(node, x, w, after[0])


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _split(q: _QConv, rows: list[Band], cols: list[Band], g: _Graph, inits: list[onnx.TensorProto]) -> list[onnx.NodeProto]:
    """The nodes computing ``q``'s quantized output rectangle by rectangle (see the module docstring)."""
    attrs = _attrs(q.conv)
    dilations, pads = list(attrs.get("dilations", [1, 1])), list(attrs.get("pads", [0, 0, 0, 0]))
    base = q.conv.name or q.conv.output[0]
    bias = list(q.conv.input[2:3])
    nodes: list[onnx.NodeProto] = []

    def constant(tag: str, values: list[int]) -> str:
        name = g.name(f"{base}/skip_pad/{tag}")
        inits.append(numpy_helper.from_array(np.array(values, dtype=np.int64), name))
        return name

    def node(op: str, inputs: list[str], tag: str, source: onnx.NodeProto | None = None, output: str | None = None,
             **kwargs: object) -> str:
        out = output or g.name(f"{base}/skip_pad/{tag}")
        kwargs = {**(_attrs(source) if source is not None else {}), **kwargs}
        nodes.append(helper.make_node(op, inputs, [out], name=g.name(f"{base}/skip_pad/{tag}/{op}"), **kwargs))
        return out

    axes = constant("axes", [2, 3])
    row_outputs = []
    for i, r in enumerate(rows):
        row = q.y.output[0] if len(rows) == 1 else g.name(f"{base}/skip_pad/r{i}")
        pieces = []
        for j, c in enumerate(cols):
            tag = f"r{i}c{j}"
            y0 = r.start - pads[0] + r.first * dilations[0]
            x0 = c.start - pads[1] + c.first * dilations[1]
            y1 = y0 + (r.stop - r.start) + (r.last - r.first) * dilations[0]
            x1 = x0 + (c.stop - c.start) + (c.last - c.first) * dilations[1]
            x = node("Slice", [q.x.input[0], constant(f"{tag}/starts", [y0, x0]), constant(f"{tag}/ends", [y1, x1]),
                               axes], f"{tag}/x_quantized")
            x = node("DequantizeLinear", [x, *q.x.input[1:]], f"{tag}/x", q.x)
            w = node("Slice", [q.w.input[0], constant(f"{tag}/taps_from", [r.first, c.first]),
                               constant(f"{tag}/taps_to", [r.last + 1, c.last + 1]), axes], f"{tag}/w_quantized")
            w = node("DequantizeLinear", [w, *q.w.input[1:]], f"{tag}/w", q.w)
            y = node("Conv", [x, w, *bias], f"{tag}/y", q.conv, pads=[0, 0, 0, 0],
                     kernel_shape=[r.last - r.first + 1, c.last - c.first + 1])
            pieces.append(node("QuantizeLinear", [y, *q.y.input[1:]], f"{tag}/y_quantized", q.y,
                               output=row if len(cols) == 1 else None))
        if len(cols) > 1:
            node("Concat", pieces, f"r{i}", output=row, axis=3)
        row_outputs.append(row)
    if len(rows) > 1:
        node("Concat", row_outputs, "rows", output=q.y.output[0], axis=2)
    return nodes


def _drop_dead(graph: onnx.GraphProto) -> None:
    """Remove nodes whose outputs nothing reads, then initialisers nothing reads."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {t for n in graph.node for t in n.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {t for n in graph.node for t in n.input} | outputs
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def skip_padding_taps(model: onnx.ModelProto, *, min_saving: float = MIN_SAVING,
                      min_saved_macs: float = MIN_SAVED_MACS) -> int:
    """Rewrite, in place, every quantized 2-D convolution of ``model`` that spends at least ``min_saving`` of
    its multiply-accumulates, and at least ``min_saved_macs`` of them per image, on zero padding (see the
    module docstring); returns how many were rewritten.

    Only convolutions of stride 1 with explicit pads and an input of fixed height and width (the batch may
    be dynamic) are considered; the graph's inputs and outputs and every other node stay as they are.
    """
    g = _Graph(model)
    graph = model.graph
    added: list[onnx.TensorProto] = []
    replaced: dict[int, list[onnx.NodeProto]] = {}
    dropped: set[str] = set()
    for conv in graph.node:
        q = g.quantized_conv(conv)
        attrs = _attrs(conv)
        shape = g.shapes.get(conv.input[0]) if q is not None else None
        if (q is None or shape is None or len(shape) != 4 or None in shape[2:]
                or any(s != 1 for s in attrs.get("strides", [1, 1]))
                or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")):
            continue
        dims = [int(d) for d in g.inits[q.w.input[0]].dims]
        kernel = (dims[2], dims[3])
        dilations, pads = list(attrs.get("dilations", [1, 1])), list(attrs.get("pads", [0, 0, 0, 0]))
        rows = tap_bands(shape[2], kernel[0], dilations[0], pads[0], pads[2])
        cols = tap_bands(shape[3], kernel[1], dilations[1], pads[1], pads[3])
        if rows is None or cols is None:
            continue
        share = padding_share(rows, cols, kernel)
        macs = rows[-1].stop * cols[-1].stop * dims[0] * dims[1] * kernel[0] * kernel[1]
        if share < min_saving or share * macs < min_saved_macs:
            continue
        replaced[id(conv)] = _split(q, rows, cols, g, added)
        dropped.add(q.y.output[0])
    if not replaced:
        return 0
    nodes = []
    for n in graph.node:
        if id(n) in replaced:
            nodes.extend(replaced[id(n)])
        elif not (n.op_type == "QuantizeLinear" and n.output[0] in dropped):
            nodes.append(n)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(added)
    _drop_dead(graph)
    return len(replaced)
