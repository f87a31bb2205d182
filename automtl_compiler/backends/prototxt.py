"""IR -> Caffe prototxt (+ the weights as a safetensors sidecar or a binary ``.caffemodel``).

The file is genuine-Caffe style: one ``Input`` layer with ``input_param { shape }`` per graph input,
then one layer per node in topological order, named after the node, with one top named after the node
too, so that :func:`automtl_compiler.frontends.prototxt.load_prototxt` reads back the same graph
(node names, ops and attributes; float attributes at float32 precision, since Caffe's fields are
``float``). Weights go to ``<path>.safetensors`` keyed ``<layer>/<tensor>``, or to ``<path>.caffemodel``
(:mod:`automtl_compiler.backends.caffe_model`); the loader reads them only when passed as ``weights=``.

Two dialects
    ``dialect="automtl"`` (the default) writes batch norms as one layer with AutoMTL's fields and allows
    the extensions below: everything the IR can say round-trips exactly through automtl, and files
    written before keep their form. ``dialect="caffe"`` writes only what upstream BVLC Caffe reads: each
    batch norm becomes a ``BatchNorm`` layer (``use_global_stats: true``, ``eps``,
    ``moving_average_fraction`` = 1 - momentum) working in place on its input's top when it is that
    input's only reader, followed, when affine, by a ``Scale`` layer ``<node>/scale`` (``bias_term:
    true``) in place on the same top; automtl's reader folds the pair back into one batch norm. ``relu6``
    becomes Caffe's ``Clip`` (0, 6), read back as the equal ``clip``; the extension layer types, batch
    norms without running statistics, broadcasting ``Eltwise`` and adaptive pooling to sizes other than
    1x1 are refused with an UnsupportedOpError. Its weights default to a ``.caffemodel``.

automtl extensions (upstream Caffe does not read these; the frontend does; ``dialect="automtl"`` only)
    * ``BatchNorm`` carries the whole PyTorch batch norm in the AutoMTL fields ``eps``, ``momentum``,
      ``affine`` and ``track_running_stats`` (no separate ``Scale`` layer), so it round-trips exactly.
    * Layer types ``ReLU6``, ``HardSwish``, ``HardSigmoid``, ``GELU`` (exact form only),
      ``Identity`` and ``StochasticDepth`` (drop probability in ``dropout_param.dropout_ratio``, row
      mode only); ``Swish`` is upstream Caffe's name for silu (beta 1).
    * ``Eltwise`` inputs of different shapes broadcast (e.g. squeeze-excitation's ``mul``).
    * ``mean`` over dims (2, 3) is a global ``AVE`` ``Pooling`` layer ``N`` (top ``N/pool``) followed,
      when ``keepdim`` is false, by a ``Flatten`` layer ``N/flatten`` whose top is ``N``; the frontend
      reads that pair back as one ``mean`` node. With ``keepdim`` true it reads back as the equivalent
      ``adaptive_avgpool2d`` to (1, 1).
    * Adaptive pooling to a size other than (1, 1) is a ``global_pooling`` layer refined by
      ``pooling_param.adaptive_output_size: [h, w]``.
    * ``permute`` -> ``Permute`` with ``permute_param { order }`` (the batch axis included, 0 first): the
      message and field number of the SSD Caffe fork, which therefore reads it too.
    * ``pad`` with a positive amount -> ``Pad`` with the AutoMTL ``pad_param { pads }`` (left, right, top,
      bottom, negative ones cropping), ``mode`` (CONSTANT, REFLECT, REPLICATE) and ``value``.
    * ``layernorm`` -> ``LayerNorm`` with the AutoMTL ``layer_norm_param { axis eps }`` (``axis`` as the
      node's ``dim``, e.g. 1 or -1); when affine, weight and bias are its tensors (its blobs in a
      ``.caffemodel``); a layer norm without them is written ``affine: false``.

Upstream Caffe layers for the other ops
    ``lrn`` -> ``LRN`` (``within`` -> WITHIN_CHANNEL, which fixes k = 1); ``softmax`` -> ``Softmax``;
    ``affine`` -> ``Power``, and ``sqrt`` / ``reciprocal`` -> ``Power`` with power 0.5 / -1;
    ``conv_transpose2d`` -> ``Deconvolution``; ``reshape`` -> ``Reshape`` (``dim: 0`` keeps the batch);
    ``prelu`` -> ``PReLU``; ``elu`` -> ``ELU``; ``tensor`` -> ``Parameter`` (its value is the layer's tensor
    ``value``, only in a safetensors weights file; a constant one has ``param { lr_mult: 0 decay_mult: 0 }``); ``abs`` / ``exp`` / ``log`` -> ``AbsVal`` / ``Exp`` /
    ``Log``; ``softplus`` (beta 1, threshold 20) -> ``BNLL``; ``sub`` -> ``Eltwise`` SUM with coefficients
    1, -1. ``slice`` (step 1, not along the batch axis) -> a ``Slice`` layer ``N`` whose top ``N`` is the
    kept piece; the pieces before and after it (tops ``N/before``, ``N/after``) go to a ``Silence`` layer
    ``N/unused``. ``pad`` with no positive amount (a crop) -> such a ``Slice`` along the width (layer
    ``N/axis3``, when it is cut) and one along the height (``N``); a Slice of everything when nothing is cut.
    These read back as ``slice`` nodes.

Ops written exactly with several upstream layers (both dialects; they read back as those layers' ops)
    ``sum`` over dims after the batch axis: for each summed axis d of size k > 1, a ``Slice`` layer
    ``N/slice<d>`` along d into k tops ``N/slice<d>/<i>`` and an ``Eltwise`` SUM ``N/sum<d>`` of them
    (which keeps d with size 1); several axes chain. With ``keepdim`` the last Eltwise is ``N``; otherwise
    (or when no summed axis is longer than 1) a ``Reshape`` ``N`` follows, dropping the summed axes unless
    ``keepdim``.
    ``resize`` in nearest mode by integer factors (s_h, s_w) >= 1: a ``Deconvolution`` ``N`` with
    num_output = group = C, kernel = stride = (s_h, s_w), no padding or bias, and a constant all-ones weight
    [C, 1, s_h, s_w] (written to the weights file as ``N/weight``, or as the layer's blob): it repeats every
    pixel s_h x s_w times, which is torch's nearest upsampling (checked for the sizes at hand). Bilinear,
    downsampling and non-integer factors are refused, since Caffe has no resize layer.

Ops Caffe has no layer for (``div``, ``groupnorm``, ``amax``, ``erf``, ``mish``, ``sum`` over the batch
axis, other resizes, ...; in ``dialect="caffe"`` also ``permute``, ``layernorm`` and positive padding) are
refused with an UnsupportedOpError naming the node and op, as are attributes the schema has no place for
rather than dropped: gelu with ``approximate='tanh'``, row-less stochastic depth, pooling with dilation,
average pooling that excludes padding, mean over other dimensions, a transposed convolution's
``output_padding``, strided slices, softplus other than BNLL's. A prototxt's outputs are the blobs no layer reads, in layer
order, so a graph whose outputs are read by other nodes (or that has dead nodes) cannot be written either;
layer and blob names must not repeat.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from google.protobuf import text_format
from safetensors.torch import save_file

from ..errors import AutomtlError, GraphError, UnsupportedOpError
from ..ir.graph import Graph, Node
from ..ir.serialize import atomic_write, graph_tensors
from ..proto import caffe_pb2
from .caffe_model import Layout, check_caffemodel_size, write_caffemodel

_SIMPLE_TYPES = {"relu": "ReLU", "relu6": "ReLU6", "silu": "Swish", "sigmoid": "Sigmoid", "tanh": "TanH",
                 "hardswish": "HardSwish", "hardsigmoid": "HardSigmoid", "identity": "Identity", "abs": "AbsVal",
                 "exp": "Exp", "log": "Log"}
#: ``Power`` layers (power, scale, shift) for unary ops that are powers.
_POWERS = {"sqrt": 0.5, "reciprocal": -1.0}
DIALECTS = ("automtl", "caffe")
#: Weights file formats, by ``weights=`` value; ``True`` picks the dialect's own.
WEIGHT_SUFFIXES = {"safetensors": ".safetensors", "caffemodel": ".caffemodel"}
_DEFAULT_WEIGHTS = {"automtl": "safetensors", "caffe": "caffemodel"}
#: Ops whose layer type is an automtl extension: ``dialect="caffe"`` refuses them.
_EXTENSION_TYPES = {"hardswish": "HardSwish", "hardsigmoid": "HardSigmoid", "identity": "Identity",
                    "gelu": "GELU", "stochastic_depth": "StochasticDepth"}
#: Ops ``dialect="caffe"`` refuses as having no Caffe layer, and the layer ``dialect="automtl"`` writes.
_AUTOMTL_LAYERS = {"permute": "SSD Caffe's Permute layer", "layernorm": "the AutoMTL LayerNorm layer"}
_PAD_MODES = {"constant": caffe_pb2.PadParameter.CONSTANT, "reflect": caffe_pb2.PadParameter.REFLECT,
              "replicate": caffe_pb2.PadParameter.REPLICATE}


def _set_pair(param: Any, name: str, value: tuple[int, int], *, repeated: bool,
              skip_default: int | None = None) -> None:
    """Write a 2-D size: one value when square, else ``<name>_h``/``<name>_w``."""
    if skip_default is not None and value == (skip_default, skip_default):
        return
    if value[0] == value[1]:
        if repeated:
            getattr(param, name).append(value[0])
        else:
            setattr(param, name, value[0])
        return
    base = name.replace("_size", "")
    if f"{base}_h" in param.DESCRIPTOR.fields_by_name:
        setattr(param, f"{base}_h", value[0])
        setattr(param, f"{base}_w", value[1])
    else:  # dilation has no _h/_w form: one value per spatial axis
        getattr(param, name).extend(value)


def _conv_param(p: Any, a: dict[str, Any]) -> None:
    """Fill a ConvolutionParameter from conv2d / conv_transpose2d attributes."""
    p.num_output = a["out_channels"]
    p.bias_term = a["bias"]
    _set_pair(p, "pad", a["padding"], repeated=True)
    _set_pair(p, "kernel_size", a["kernel_size"], repeated=True)
    _set_pair(p, "stride", a["stride"], repeated=True)
    _set_pair(p, "dilation", a["dilation"], repeated=True, skip_default=1)
    if a["groups"] != 1:
        p.group = a["groups"]


class _Writer:
    def __init__(self, graph: Graph, dialect: str) -> None:
        self.graph = graph
        self.caffe = dialect == "caffe"
        self.net = caffe_pb2.NetParameter(name=graph.name)
        self.blob: dict[str, str] = {}
        self.layer_names: set[str] = set()
        self.top_names: set[str] = set()
        self.layout: Layout = {}   # layer with weights -> (kind, node), for the .caffemodel

    def add(self, node: Node, name: str, kind: str, bottoms: list[str], tops: list[str], *,
            in_place: bool = False) -> Any:
        """A new layer; no earlier layer may have its name, nor (unless ``in_place``) write one of its tops."""
        for used, names in [(name, self.layer_names), *((t, self.top_names) for t in tops if not in_place)]:
            if used in names:
                raise GraphError(f"export_prototxt: {node.where}: the layer or blob name '{used}' would be used "
                                 "twice; rename the node")
            names.add(used)
        layer = self.net.layer.add(name=name, type=kind)
        layer.bottom.extend(bottoms)
        layer.top.extend(tops)
        return layer

    def layer(self, node: Node, kind: str, *, name: str | None = None, top: str | None = None,
              bottoms: list[str] | None = None) -> Any:
        """The layer of ``node`` (named after it unless ``name``), reading its inputs' blobs unless ``bottoms``."""
        layer = self.add(node, name or node.name, kind,
                         bottoms if bottoms is not None else [self.blob[i] for i in node.inputs], [top or node.name])
        self.blob[node.name] = top or node.name
        return layer

    def input_shape(self, node: Node) -> tuple[int, ...]:
        return tuple(self.graph.node(node.inputs[0]).shape or ())

    def cut(self, node: Node, bottom: str, name: str, axis: int, span: tuple[int, int], size: int) -> None:
        """A Slice layer ``name`` keeping ``span`` of ``axis`` (of ``size``) as top ``name``; the other pieces
        go to a Silence layer ``name/unused``."""
        start, end = span
        before, after = [f"{name}/before"] if start > 0 else [], [f"{name}/after"] if end < size else []
        p = self.add(node, name, "Slice", [bottom], [*before, name, *after]).slice_param
        p.axis = axis
        p.slice_point.extend([*([start] if before else []), *([end] if after else [])])
        if before or after:
            self.add(node, f"{name}/unused", "Silence", [*before, *after], [])

    def refuse(self, node: Node, why: str) -> None:
        raise UnsupportedOpError(f"export_prototxt: {node.where} (op '{node.op}'): {why}; the Caffe schema has no "
                                 "place for it")

    def not_upstream(self, node: Node, what: str) -> None:
        """Refuse, in the caffe dialect, what only automtl's reader understands."""
        if self.caffe:
            raise UnsupportedOpError(f"export_prototxt: {node.where} (op '{node.op}'): upstream Caffe has no {what}; "
                                     "export with dialect='automtl' (read back by automtl, not by BVLC Caffe), or "
                                     "replace the op")

    def write(self) -> Any:
        for node in self.graph.topological_order():
            handler = getattr(self, f"op_{node.op}", None)
            if node.op in _EXTENSION_TYPES:
                self.not_upstream(node, f"{_EXTENSION_TYPES[node.op]} layer")
            if self.caffe and node.op in _AUTOMTL_LAYERS:
                raise UnsupportedOpError(f"export_prototxt: {node.where}: op '{node.op}' has no Caffe layer "
                                         f"(dialect='automtl' writes it as {_AUTOMTL_LAYERS[node.op]}, which "
                                         "upstream BVLC Caffe does not read)")
            if node.op == "relu6" and self.caffe:
                self.op_clip(node, (0.0, 6.0))
            elif node.op in _SIMPLE_TYPES:
                self.layer(node, _SIMPLE_TYPES[node.op])
            elif handler is not None:
                handler(node)
            else:
                raise UnsupportedOpError(f"export_prototxt: {node.where}: op '{node.op}' has no Caffe layer")
        return self.net

    def op_input(self, node: Node) -> None:
        layer = self.layer(node, "Input", bottoms=[])
        layer.input_param.shape.add().dim.extend(node.attrs["shape"])

    def op_conv2d(self, node: Node) -> None:
        a = node.attrs
        if a.get("weight_std") is not None or a.get("weight_gain") or a.get("weight_scale", 1.0) != 1.0:
            self.refuse(node, "weight standardisation (fold it first with passes.fold_weights."
                              "fold_weight_standardisation)")
        _conv_param(self.layer(node, "Convolution").convolution_param, a)
        self.layout[node.name] = ("plain", node)

    def op_conv_transpose2d(self, node: Node) -> None:
        if tuple(node.attrs["output_padding"]) != (0, 0):
            self.refuse(node, f"output_padding {list(node.attrs['output_padding'])} (Caffe's Deconvolution has none)")
        _conv_param(self.layer(node, "Deconvolution").convolution_param, node.attrs)
        self.layout[node.name] = ("plain", node)

    def op_batchnorm2d(self, node: Node) -> None:
        if self.caffe:
            self.caffe_batchnorm(node)
            return
        a = node.attrs
        p = self.layer(node, "BatchNorm").batch_norm_param
        p.eps = a["eps"]
        p.momentum = a["momentum"]
        p.affine = a["affine"]
        p.track_running_stats = a["track_running_stats"]
        self.layout[node.name] = ("automtl_bn", node)

    def sole_reader(self, node: Node) -> bool:
        """Whether ``node`` is the only reader of its (non-input) first input, so it may overwrite its blob."""
        src = node.inputs[0]
        return self.graph.node(src).op != "input" and self.graph.consumers(src) == [node.name]

    def caffe_batchnorm(self, node: Node) -> None:
        """Upstream Caffe's pair: BatchNorm (statistics) then, when affine, Scale (weight, bias), both in place."""
        a = node.attrs
        if not a["track_running_stats"]:
            self.not_upstream(node, "batch norm without running statistics (its BatchNorm always keeps them)")
        bottom = self.blob[node.inputs[0]]
        top = bottom if self.sole_reader(node) else node.name
        layer = self.add(node, node.name, "BatchNorm", [bottom], [top], in_place=top == bottom)
        self.blob[node.name] = top
        p = layer.batch_norm_param
        p.use_global_stats = True
        p.eps = a["eps"]
        p.moving_average_fraction = 1.0 - a["momentum"]
        self.layout[node.name] = ("caffe_bn", node)
        if a["affine"]:
            scale = self.add(node, f"{node.name}/scale", "Scale", [top], [top], in_place=True)
            scale.scale_param.bias_term = True
            self.layout[scale.name] = ("scale", node)

    def op_leaky_relu(self, node: Node) -> None:
        self.layer(node, "ReLU").relu_param.negative_slope = node.attrs["negative_slope"]

    def op_clip(self, node: Node, bounds: tuple[float, float] | None = None) -> None:
        p = self.layer(node, "Clip").clip_param
        p.min, p.max = bounds or (node.attrs["min"], node.attrs["max"])

    def op_gelu(self, node: Node) -> None:
        if node.attrs["approximate"] != "none":
            self.refuse(node, f"approximate='{node.attrs['approximate']}' (only the exact GELU is written)")
        self.layer(node, "GELU")

    def op_dropout(self, node: Node) -> None:
        self.layer(node, "Dropout").dropout_param.dropout_ratio = node.attrs["p"]

    def op_stochastic_depth(self, node: Node) -> None:
        if node.attrs["mode"] != "row":
            self.refuse(node, f"mode='{node.attrs['mode']}' (only 'row' is written)")
        self.layer(node, "StochasticDepth").dropout_param.dropout_ratio = node.attrs["p"]

    def _pool(self, node: Node, method: int) -> None:
        a = node.attrs
        if tuple(a.get("dilation", (1, 1))) != (1, 1):
            self.refuse(node, f"dilation {list(a['dilation'])}")
        if not a.get("count_include_pad", True) and tuple(a["padding"]) != (0, 0):
            self.refuse(node, "count_include_pad=False with padding (Caffe's AVE counts the padding)")
        p = self.layer(node, "Pooling").pooling_param
        p.pool = method
        _set_pair(p, "kernel_size", a["kernel_size"], repeated=False)
        _set_pair(p, "stride", a["stride"] or a["kernel_size"], repeated=False)
        _set_pair(p, "pad", a["padding"], repeated=False)
        p.round_mode = caffe_pb2.PoolingParameter.CEIL if a["ceil_mode"] else caffe_pb2.PoolingParameter.FLOOR

    def op_maxpool2d(self, node: Node) -> None:
        self._pool(node, caffe_pb2.PoolingParameter.MAX)

    def op_avgpool2d(self, node: Node) -> None:
        self._pool(node, caffe_pb2.PoolingParameter.AVE)

    def _global(self, node: Node, method: int, **kw: Any) -> None:
        size = tuple(node.attrs.get("output_size", (1, 1)))
        if size != (1, 1):
            self.not_upstream(node, f"adaptive pooling to {list(size)} (only global pooling to 1x1)")
        p = self.layer(node, "Pooling", **kw).pooling_param
        p.pool = method
        p.global_pooling = True
        if size != (1, 1):
            p.adaptive_output_size.extend(size)

    def op_adaptive_avgpool2d(self, node: Node) -> None:
        self._global(node, caffe_pb2.PoolingParameter.AVE)

    def op_adaptive_maxpool2d(self, node: Node) -> None:
        self._global(node, caffe_pb2.PoolingParameter.MAX)

    def op_mean(self, node: Node) -> None:
        rank = len(self.graph.node(node.inputs[0]).shape or ())
        if rank != 4 or sorted(d % rank for d in node.attrs["dim"]) != [2, 3]:
            self.refuse(node, f"mean over dims {list(node.attrs['dim'])} of a {rank}-D tensor (only over the "
                              "spatial dims (2, 3) of a 4-D tensor, as global average pooling)")
        if node.attrs["keepdim"]:
            self._global(node, caffe_pb2.PoolingParameter.AVE)
            return
        pooled = f"{node.name}/pool"
        self._global(node, caffe_pb2.PoolingParameter.AVE, top=pooled)
        self.layer(node, "Flatten", name=f"{node.name}/flatten", bottoms=[pooled])

    def _eltwise(self, node: Node, operation: int) -> Any:
        shapes = [tuple(self.graph.node(i).shape or ()) for i in node.inputs]
        if len(set(shapes)) > 1:
            self.not_upstream(node, f"broadcasting Eltwise (inputs of shapes {[list(s) for s in shapes]})")
        p = self.layer(node, "Eltwise").eltwise_param
        p.operation = operation
        return p

    def op_add(self, node: Node) -> None:
        p = self._eltwise(node, caffe_pb2.EltwiseParameter.SUM)
        if node.attrs["coeffs"] is not None:
            p.coeff.extend(node.attrs["coeffs"])

    def op_mul(self, node: Node) -> None:
        self._eltwise(node, caffe_pb2.EltwiseParameter.PROD)

    def op_max(self, node: Node) -> None:
        self._eltwise(node, caffe_pb2.EltwiseParameter.MAX)

    def op_concat(self, node: Node) -> None:
        self.layer(node, "Concat").concat_param.axis = node.attrs["dim"]

    def op_flatten(self, node: Node) -> None:
        p = self.layer(node, "Flatten").flatten_param
        p.axis, p.end_axis = node.attrs["start_dim"], node.attrs["end_dim"]

    def op_linear(self, node: Node) -> None:
        rank = len(self.input_shape(node))
        p = self.layer(node, "InnerProduct").inner_product_param
        p.num_output = node.attrs["out_features"]
        p.bias_term = node.attrs["bias"]
        if rank != 2:
            p.axis = -1
        self.layout[node.name] = ("plain", node)

    def op_lrn(self, node: Node) -> None:
        a = node.attrs
        within = a["region"] == "within"
        if within and a["k"] != 1.0:
            self.refuse(node, f"k={a['k']} within a channel (Caffe's WITHIN_CHANNEL LRN fixes k = 1)")
        if a["size"] % 2 == 0:
            self.refuse(node, f"an even size {a['size']} (Caffe's LRN needs an odd local_size)")
        p = self.layer(node, "LRN").lrn_param
        p.local_size, p.alpha, p.beta = a["size"], a["alpha"], a["beta"]
        if within:
            p.norm_region = caffe_pb2.LRNParameter.WITHIN_CHANNEL
        elif a["k"] != 1.0:
            p.k = a["k"]

    def op_softmax(self, node: Node) -> None:
        p = self.layer(node, "Softmax").softmax_param
        if node.attrs["dim"] != 1:
            p.axis = node.attrs["dim"]

    def _power(self, node: Node, power: float = 1.0, scale: float = 1.0, shift: float = 0.0) -> None:
        p = self.layer(node, "Power").power_param
        for key, value, default in (("power", power, 1.0), ("scale", scale, 1.0), ("shift", shift, 0.0)):
            if value != default:
                setattr(p, key, value)

    def op_affine(self, node: Node) -> None:
        self._power(node, node.attrs["power"], node.attrs["scale"], node.attrs["shift"])

    def op_sqrt(self, node: Node) -> None:
        self._power(node, _POWERS["sqrt"])

    def op_reciprocal(self, node: Node) -> None:
        self._power(node, _POWERS["reciprocal"])

    def op_softplus(self, node: Node) -> None:
        if (node.attrs["beta"], node.attrs["threshold"]) != (1.0, 20.0):
            self.refuse(node, f"beta={node.attrs['beta']}, threshold={node.attrs['threshold']} (Caffe's BNLL is "
                              "softplus with beta 1)")
        self.layer(node, "BNLL")

    def op_elu(self, node: Node) -> None:
        self.layer(node, "ELU").elu_param.alpha = node.attrs["alpha"]

    def op_prelu(self, node: Node) -> None:
        p = self.layer(node, "PReLU").prelu_param
        if node.attrs["num_parameters"] == 1:
            p.channel_shared = True
        self.layout[node.name] = ("plain", node)

    def op_sub(self, node: Node) -> None:
        self._eltwise(node, caffe_pb2.EltwiseParameter.SUM).coeff.extend([1.0, -1.0])

    def op_reshape(self, node: Node) -> None:
        self.layer(node, "Reshape").reshape_param.shape.dim.extend([0, *node.attrs["shape"]])

    def op_sum(self, node: Node) -> None:
        """Per summed axis of size k > 1, a Slice into k tops and an Eltwise SUM of them (which keeps the axis
        with size 1, i.e. keepdim); then a Reshape to the result's shape, unless the last Eltwise gives it."""
        shape = self.input_shape(node)
        dims = sorted({d % len(shape) for d in node.attrs["dim"]})
        if 0 in dims:
            raise UnsupportedOpError(f"export_prototxt: {node.where}: op 'sum' has no Caffe layer for a sum over "
                                     "the batch axis 0 (Caffe's Slice and Reshape keep the batch apart)")
        cut = [d for d in dims if shape[d] > 1]
        kept = [1 if d in dims else size for d, size in enumerate(shape)]
        src = self.blob[node.inputs[0]]
        for i, d in enumerate(cut):
            last = i == len(cut) - 1 and node.attrs["keepdim"]
            src = self.sum_axis(node, src, d, shape[d], node.name if last else f"{node.name}/sum{d}")
        if node.attrs["keepdim"] and cut:
            self.blob[node.name] = node.name
            return
        out = kept if node.attrs["keepdim"] else [size for d, size in enumerate(kept) if d not in dims]
        self.layer(node, "Reshape", bottoms=[src]).reshape_param.shape.dim.extend([0, *out[1:]])

    def sum_axis(self, node: Node, bottom: str, axis: int, size: int, name: str) -> str:
        """Slice ``axis`` of ``bottom`` into its ``size`` pieces (layer ``<node>/slice<axis>``) and add them up
        in an Eltwise layer ``name``, whose top (also ``name``) is returned."""
        pieces = [f"{node.name}/slice{axis}/{i}" for i in range(size)]
        self.add(node, f"{node.name}/slice{axis}", "Slice", [bottom], pieces).slice_param.axis = axis
        self.add(node, name, "Eltwise", pieces, [name]).eltwise_param.operation = caffe_pb2.EltwiseParameter.SUM
        return name

    def op_resize(self, node: Node) -> None:
        """Nearest upsampling by integer factors (s_h, s_w): a depthwise Deconvolution with kernel = stride = s
        and an all-ones weight, which repeats each pixel s_h x s_w times, as torch's nearest mode does."""
        _, c, h, w = self.input_shape(node)
        scale = self.integer_scale(node, (h, w))
        attrs = {"out_channels": c, "bias": False, "padding": (0, 0), "kernel_size": scale, "stride": scale,
                 "dilation": (1, 1), "groups": c}
        _conv_param(self.layer(node, "Deconvolution").convolution_param, attrs)
        self.layout[node.name] = ("fixed", torch.ones(c, 1, *scale))

    def integer_scale(self, node: Node, size: tuple[int, int]) -> tuple[int, int]:
        """The integer factors (s_h, s_w) of a nearest resize from ``size``; anything else is refused."""
        out = tuple(node.attrs["size"])
        why = None
        if node.attrs["mode"] != "nearest":
            why = f"{node.attrs['mode']} mode"
        elif any(o % i for o, i in zip(out, size)):
            why = f"a resize from {list(size)} to {list(out)}, which is not an upsampling by integer factors"
        scale = (out[0] // size[0], out[1] // size[1])
        if why is None and not _repeats_pixels(size, scale):
            why = f"a resize from {list(size)} to {list(out)}, where torch's nearest does not repeat pixels"
        if why is not None:
            raise UnsupportedOpError(f"export_prototxt: {node.where}: op 'resize' has no Caffe layer for {why} "
                                     "(Caffe has no resize layer; only nearest upsampling by integer factors is "
                                     "written, as a Deconvolution)")
        return scale

    def op_slice(self, node: Node) -> None:
        a, shape = node.attrs, self.input_shape(node)
        axis = a["dim"] % len(shape)
        if axis == 0:
            self.refuse(node, "a slice of the batch axis 0")
        if a["step"] != 1:
            self.refuse(node, f"step {a['step']} (Caffe's Slice cuts contiguous pieces)")
        start, end, _ = slice(a["start"], a["end"]).indices(shape[axis])
        if end <= start:
            self.refuse(node, f"an empty slice [{a['start']}:{a['end']}] of an axis of {shape[axis]}")
        self.cut(node, self.blob[node.inputs[0]], node.name, axis, (start, end), shape[axis])
        self.blob[node.name] = node.name

    def op_pad(self, node: Node) -> None:
        """A crop (no positive amount) as Slice layers; otherwise an AutoMTL Pad layer (refused in the caffe
        dialect)."""
        a = node.attrs
        left, right, top, bottom = a["pads"]
        if max(left, right, top, bottom) > 0:
            if self.caffe:
                self.refuse(node, f"padding {[left, right, top, bottom]} (Caffe has no padding layer; only crops, "
                                  "i.e. pads <= 0, are written, as Slice layers; dialect='automtl' writes a Pad "
                                  "layer)")
            p = self.layer(node, "Pad").pad_param
            p.pads.extend(a["pads"])
            if a["mode"] != "constant":
                p.mode = _PAD_MODES[a["mode"]]
            if a["value"] != 0.0:
                p.value = a["value"]
            return
        shape = self.input_shape(node)
        rank, src = len(shape), self.blob[node.inputs[0]]
        cuts = [(rank - 1, -left, shape[-1] + right), (rank - 2, -top, shape[-2] + bottom)]
        cuts = [c for c in cuts if (c[1], c[2]) != (0, shape[c[0]])] or [(1, 0, shape[1])]
        for i, (axis, start, end) in enumerate(cuts):
            name = node.name if i == len(cuts) - 1 else f"{node.name}/axis{axis}"
            self.cut(node, src, name, axis, (start, end), shape[axis])
            src = name
        self.blob[node.name] = node.name

    def op_permute(self, node: Node) -> None:
        self.layer(node, "Permute").permute_param.order.extend(node.attrs["dims"])

    def op_layernorm(self, node: Node) -> None:
        a = node.attrs
        p = self.layer(node, "LayerNorm").layer_norm_param
        p.axis, p.eps = a["dim"], a["eps"]
        if a["affine"]:
            self.layout[node.name] = ("plain", node)
        else:
            p.affine = False

    def op_tensor(self, node: Node) -> None:
        """Upstream's Parameter layer; a constant (not trainable) one has learning-rate multiplier 0."""
        layer = self.layer(node, "Parameter", bottoms=[])
        layer.parameter_param.shape.dim.extend(node.attrs["shape"])
        if not node.attrs["trainable"]:
            layer.param.add(lr_mult=0.0, decay_mult=0.0)


def _repeats_pixels(size: tuple[int, int], scale: tuple[int, int]) -> bool:
    """Whether torch's nearest resize of ``size`` by ``scale`` takes each source pixel ``scale`` times, per axis."""
    for n, s in zip(size, scale):
        src = torch.arange(n, dtype=torch.float32).view(1, 1, n, 1)
        taken = torch.nn.functional.interpolate(src, size=(n * s, 1), mode="nearest").flatten()
        if not torch.equal(taken, src.flatten().repeat_interleave(s)):
            return False
    return True


def _check_outputs(graph: Graph, order: list[Node]) -> None:
    unread = [n.name for n in order if n.op != "input" and not graph.consumers(n.name)]
    if unread != list(graph.outputs):
        raise GraphError(f"export_prototxt: graph '{graph.name}' has outputs {graph.outputs}, but a prototxt's "
                         f"outputs are the blobs no layer reads, in layer order, which would be {unread}. Remove "
                         "dead nodes, and add an identity node for an output that other nodes also read")


def _weights_format(weights: bool | str, dialect: str) -> str | None:
    if dialect not in DIALECTS:
        raise AutomtlError(f"export_prototxt: dialect={dialect!r}; use one of {', '.join(map(repr, DIALECTS))}")
    if weights is True:
        return _DEFAULT_WEIGHTS[dialect]
    if weights is False:
        return None
    if weights not in WEIGHT_SUFFIXES:
        raise AutomtlError(f"export_prototxt: weights={weights!r}; use True (the dialect's format), False, "
                           f"{' or '.join(map(repr, WEIGHT_SUFFIXES))}")
    return str(weights)


def _weights_writer(graph: Graph, writer: _Writer, fmt: str, target: Path) -> Callable[[Path], None]:
    """What writes the weights file; a .caffemodel too large for protobuf is refused here, before any writing."""
    if fmt == "caffemodel":
        stored = [n.name for n in graph.nodes() if n.op == "tensor"]
        if stored:
            raise UnsupportedOpError(f"export_prototxt: {target}: the stored tensors {stored[:3]} (Parameter "
                                     "layers) are not written to a .caffemodel; write the weights as safetensors "
                                     "(weights='safetensors')")
        check_caffemodel_size(writer.net, writer.layout, target)

        def write_caffe(tmp: Path) -> None:
            with tmp.open("wb") as f:
                write_caffemodel(writer.net, writer.layout, f)
        return write_caffe
    tensors = graph_tensors(graph)
    tensors.update({f"{layer}/weight": t for layer, (_, t) in writer.layout.items() if isinstance(t, torch.Tensor)})
    return lambda tmp: save_file(tensors, str(tmp))


def export_prototxt(graph: Graph, path: str | Path, *, weights: bool | str = True, comment: str | None = None,
                    dialect: str = "automtl") -> Path:
    """Write ``graph`` as a Caffe prototxt at ``path``, and its weights beside it; returns ``path``.

    ``dialect`` is ``"automtl"`` (default: one-layer batch norms and automtl's extension layers, which
    round-trip everything and keep the form earlier files have) or ``"caffe"`` (only layers upstream
    BVLC Caffe reads: BatchNorm + Scale pairs; see the module docstring). ``weights`` is ``True`` (the
    dialect's format: ``path.with_suffix('.safetensors')`` for automtl, ``.caffemodel`` for caffe),
    ``"safetensors"``, ``"caffemodel"`` or ``False`` (no weights). ``comment`` (optional) is written first
    as ``#`` lines. Nothing is replaced until both files are complete, so a failed export leaves existing
    files untouched. Read them back with ``load_prototxt(path, weights=<the weights file>)``.
    """
    path = Path(path)
    fmt = _weights_format(weights, dialect)
    order = graph.topological_order()
    if not graph.outputs:
        raise GraphError(f"export_prototxt: graph '{graph.name}' declares no outputs")
    _check_outputs(graph, order)
    writer = _Writer(graph, dialect)
    net = writer.write()
    header = "".join(f"# {line}".rstrip() + "\n" for line in comment.splitlines()) if comment else ""
    text = header + text_format.MessageToString(net)

    def write_text(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    if fmt is None:
        atomic_write(path, write_text)
        return path
    target = path.with_suffix(WEIGHT_SUFFIXES[fmt])
    if target.resolve() == path.resolve():
        raise AutomtlError(f"export_prototxt: {path}: the network and its weights would both be written to this "
                           "file; give the prototxt a .prototxt suffix")
    write_weights = _weights_writer(graph, writer, fmt, target)

    def write_both(tmp: Path) -> None:
        # The weights go to a temporary file, the prototxt is replaced, then the weights: a failure
        # anywhere before leaves both existing files as they were.
        write_weights(tmp)
        atomic_write(path, write_text)

    atomic_write(target, write_both)
    return path


__all__ = ["DIALECTS", "WEIGHT_SUFFIXES", "export_prototxt"]
