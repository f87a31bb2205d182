"""Caffe prototxt frontend: a ``.prototxt`` (genuine Caffe or the AutoMTL dialect) -> Graph.

The text is parsed strictly against ``proto/caffe.proto`` (``NetParameter``) with protobuf's text
format parser; a syntax error or a field the schema does not know is a :class:`ParseError` carrying
``file:line:column``. Layers are then converted in file order into registry ops; each node is named
after its layer and its ``source`` is ``"<file name>:<line>"``.

What is built
    The TEST (deploy) network. Layers whose ``include``/``exclude`` rules (or a ``phase: TRAIN``
    field) exclude them from the TEST phase are skipped; ``level`` and ``stage`` rules are evaluated
    against the file's ``state`` (default level 0, no stages). A ``state { phase: TRAIN }`` in the
    file does not change this.

Inputs
    Legacy ``input`` names with four ``input_dim`` values each (or one ``input_shape`` each), and
    ``Input`` layers with ``input_param { shape }``. ``input_shape=`` overrides the declared shape
    (graphs with one input only). AutoMTL's exporter declares ``input: "blob1"`` but its first layer
    reads ``bottom: "data"``; so, when a layer reads a blob that nothing produced, and exactly one
    declared graph input is read by no layer at all, that input *is* the blob (it is aliased to the
    unknown name). Any other unproduced bottom is an error naming the layer, the blob and the line.

Blobs
    In-place layers (``top`` equal to ``bottom``) are fine: every layer makes a new IR node, and a
    later reader of a blob name sees its latest producer. ``Split`` layers alias their tops to their
    bottom (one blob, many consumers); ``Silence`` layers only mark their bottoms as read; ``Slice``
    makes one node per top that is read. Any other layer with several tops is an error (AutoMTL's own
    parser silently keeps one). The graph's outputs are the values that no layer reads, in layer order
    (graph inputs excepted, and the reference blob of a ``Crop``, which Caffe reads for its shape).

Layer types
    Input, Convolution, Deconvolution, InnerProduct (any ``axis`` after the batch axis; with
    ``transpose: true`` a .caffemodel's [in, out] weight is transposed), BatchNorm (+ Scale), Pooling
    (MAX/AVE, Caffe's default CEIL rounding, ``global_pooling``; an unpadded window as large as its
    input, such as ResNet's and GoogLeNet's 7x7 ``pool5``, is read as global pooling), LRN, ReLU
    (``negative_slope``), PReLU, ELU, Sigmoid, TanH, AbsVal, Exp and Log (base e: the schema has no
    ``exp_param``), BNLL (softplus), Power, Clip, Dropout (identity in deploy), Eltwise (SUM with
    ``coeff``, PROD, MAX), Concat, Slice, Split, Crop, Flatten, Reshape, Softmax, Silence, Parameter,
    Permute (SSD Caffe's); the types of :mod:`automtl_compiler.frontends.caffe_layers` follow Caffe's
    semantics as that module says. A *final* Softmax (one no layer reads) is dropped unless
    ``softmax="keep"``: a backbone ends at its logits or features, and the trunk is cut before the
    classifier anyway. Loss, accuracy and data layers belong to training nets and are refused with that
    advice.

Batch normalisation
    Genuine Caffe's ``BatchNorm`` has no affine part; a ``Scale`` layer that is the next reader of
    its top is folded into the batch norm as its weight (and bias, zero without ``bias_term``), and a
    Caffe BatchNorm with no Scale after it becomes ``affine=False``, and its
    ``moving_average_fraction`` f (default 0.999) becomes ``momentum = 1 - f``; ``use_global_stats``
    only selects train/test behaviour, which the torch module's mode does, so it is not stored. The
    AutoMTL dialect's PyTorch-style fields ``eps``, ``momentum``, ``affine`` and
    ``track_running_stats`` are taken as written, with PyTorch's defaults (momentum 0.1, affine true:
    AutoMTL's ResNet-34 file counts the batch-norm weights and biases among its 21,284,672
    parameters). A layer is read the PyTorch way when it uses an AutoMTL field, the Caffe way when it
    uses a Caffe-only field, and otherwise the PyTorch way only if the file uses AutoMTL extension
    fields anywhere. A ``Scale`` anywhere else is an UnsupportedOpError.

automtl extensions (written by :mod:`automtl_compiler.backends.prototxt`, read back here)
    Layer types ``Swish`` (silu; also upstream Caffe's name), ``HardSwish``, ``HardSigmoid``,
    ``GELU`` (exact form), ``Identity``, ``StochasticDepth`` (drop probability in
    ``dropout_param.dropout_ratio``, row mode) and ``ReLU6``; ``BatchNorm`` with the AutoMTL fields;
    ``Eltwise`` inputs of different shapes broadcast (upstream Caffe requires equal shapes); ``Pad``
    (``pad_param``) and ``LayerNorm`` (``layer_norm_param``), as :mod:`.caffe_layers` says. A global
    ``AVE`` ``Pooling`` layer ``P`` whose next reader is a ``Flatten`` layer named ``P/flatten``
    (axis 1 to -1) is read as one ``mean`` node over dims (2, 3) named ``P``: that is how the exporter
    writes ``mean``, and it is numerically the same computation either way.

Weights
    Without ``weights`` the tensors are initialised deterministically (``materialise(seed=0)``).
    ``weights`` is given explicitly (a sidecar next to the prototxt is never picked up on its own):
    a ``.safetensors`` or PyTorch state-dict file (``.pth``/``.pt``/``.bin``/``.ckpt``, read with
    ``weights_only=True``; checkpoints unwrapped), keyed ``<layer>/<tensor>`` as :func:`export_prototxt`
    writes it or by torch module names (``layer1.0.conv1.weight``, ``bn1.running_mean``), which name the
    layer the exporter wrote for that module (``layer1_0_conv1``; see
    :mod:`automtl_compiler.frontends.weights`), so torchvision's ImageNet ``resnet34`` file loads into
    ``models/deeplab_resnet34.prototxt`` with ``strict=False`` (its ``fc`` is not in the network). Or a
    binary ``.caffemodel`` in the current or the V1 layer format (the BVLC model-zoo files), read as
    :mod:`automtl_compiler.frontends.caffe_blobs` says: Convolution/Deconvolution/InnerProduct/PReLU
    weight and bias; BatchNorm mean, variance and Caffe's moving-average normaliser, then weight and
    bias for an affine AutoMTL batch norm; a folded Scale's gamma and beta. Every tensor the network
    needs must be given with its shape (``num_batches_tracked`` may be absent; a Caffe blob may carry
    extra size-1 axes); unexpected tensors are an error unless ``strict=False`` (a training net's
    auxiliary classifiers, say).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from google.protobuf import text_format

from ..errors import (
    AutomtlError,
    FileFormatError,
    GraphError,
    ParseError,
    ShapeError,
    UnsupportedOpError,
    require_file,
)
from ..ir.graph import Graph, Node
from ..ir.ops import get_op, tensor_shapes
from ..proto import caffe_pb2
from .caffe_blobs import read_caffemodel
from .caffe_layers import SOFTMAX_CHOICES, CaffeLayers, Folded, Layer, Unused, f32
from .weights import (
    STATE_DICT_SUFFIXES,
    TORCH_SUFFIXES,
    assign_to_graph,
    read_state_dict,
)

Shape = tuple[int, ...]

#: Layer types whose only effect is a registry op without attributes.
_SIMPLE = {"ReLU6": "relu6", "Sigmoid": "sigmoid", "TanH": "tanh", "Swish": "silu", "HardSwish": "hardswish",
           "HardSigmoid": "hardsigmoid", "Identity": "identity", "AbsVal": "abs", "Exp": "exp", "Log": "log",
           "BNLL": "softplus"}
#: Types with no registry op, and what to tell the user.
_TRAINING = "belongs to training nets; use the deploy prototxt (the one with an Input layer or `input:`)"
_NO_OP = {
    "SoftmaxWithLoss": f"a loss layer {_TRAINING}",
    "EuclideanLoss": f"a loss layer {_TRAINING}",
    "SigmoidCrossEntropyLoss": f"a loss layer {_TRAINING}",
    "Accuracy": f"an accuracy layer {_TRAINING}",
    "Data": "data layers are not part of a backbone; declare an Input layer or `input`/`input_dim` instead",
    "ImageData": "data layers are not part of a backbone; declare an Input layer or `input`/`input_dim` instead",
}
_SUPPORTED = sorted({"Input", "Convolution", "Deconvolution", "BatchNorm", "Scale", "ReLU", "PReLU", "ELU", "Clip",
                     "Pooling", "LRN", "Eltwise", "Concat", "Slice", "Crop", "Flatten", "Reshape", "InnerProduct",
                     "Softmax", "Power", "Dropout", "StochasticDepth", "GELU", "Split", "Silence", "Parameter",
                     "Permute", "Pad", "LayerNorm", *_SIMPLE})
_AUTOMTL_BN_FIELDS = ("track_running_stats", "momentum", "affine")
_CAFFE_BN_FIELDS = ("use_global_stats", "moving_average_fraction")


def _layer_lines(text: str, layers: list[Any]) -> list[int | None]:
    """Line of each layer's ``name:`` field, found by searching the text in layer order."""
    start = re.search(r"\blayer\s*\{", text)
    cursor = start.start() if start else 0
    lines: list[int | None] = []
    for layer in layers:
        found = None
        if layer.name:
            quoted = re.escape(layer.name)
            m = re.compile(r"\bname\s*:\s*([\"'])" + quoted + r"\1").search(text, cursor)
            if m:
                found = text.count("\n", 0, m.start()) + 1
                cursor = m.end()
        lines.append(found)
    return lines


def _parse_text(path: Path) -> tuple[Any, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise FileFormatError(f"{path}: not a text file (a binary .caffemodel goes in weights=, not as the "
                              "network)") from None
    except OSError as e:
        raise FileFormatError(f"{path}: cannot read ({e.strerror})") from None
    net = caffe_pb2.NetParameter()
    try:
        text_format.Parse(text, net)
    except text_format.ParseError as e:
        message = re.sub(r"^\d+:\d+ : ", "", str(e))
        if 'no field named "layers"' in message:
            hint = ("this is the old V1 layer format (`layers { type: CONVOLUTION }`); upgrade it with Caffe's "
                    "upgrade_net_proto_text tool")
        elif "no field named" in message or "has no value named" in message:
            hint = ("the field or value is not in automtl's Caffe schema (proto/caffe.proto: upstream Caffe plus "
                    "the AutoMTL dialect); check the spelling, or remove options of other Caffe forks")
        else:
            hint = "the file must be a Caffe NetParameter in protobuf text format; check braces, quotes and colons"
        raise ParseError(f"{message} ({hint})", path=path, line=e.GetLine(), column=e.GetColumn()) from None
    return net, text


def _rule_matches(rule: Any, level: int, stages: set[str]) -> bool:
    if rule.HasField("phase") and rule.phase != caffe_pb2.TEST:
        return False
    if rule.HasField("min_level") and level < rule.min_level:
        return False
    if rule.HasField("max_level") and level > rule.max_level:
        return False
    if any(s not in stages for s in rule.stage):
        return False
    return not any(s in stages for s in rule.not_stage)


def _in_test_net(layer: Any, level: int, stages: set[str]) -> bool:
    if layer.HasField("phase") and layer.phase != caffe_pb2.TEST:
        return False
    if layer.include:
        return any(_rule_matches(r, level, stages) for r in layer.include)
    return not any(_rule_matches(r, level, stages) for r in layer.exclude)


def _pool_pair(p: Any, name: str, default: int | None, where: str) -> tuple[int, int] | None:
    base = name.replace("_size", "")
    h, w = f"{base}_h", f"{base}_w"
    if p.HasField(h) or p.HasField(w):
        if p.HasField(name):
            raise ParseError(f"{where}: both `{name}` and `{h}`/`{w}` are given; use one")
        if not (p.HasField(h) and p.HasField(w)):
            raise ParseError(f"{where}: `{h}` and `{w}` must be given together")
        return (getattr(p, h), getattr(p, w))
    if p.HasField(name):
        v = getattr(p, name)
        return (v, v)
    return None if default is None else (default, default)


class _Builder(CaffeLayers):
    """Converts the layers of one NetParameter, in order, into a Graph."""

    def __init__(self, path: Path, net: Any, text: str, input_shape: tuple[int, ...] | None,
                 softmax: str = "drop") -> None:
        self.path = path
        self.net = net
        self.softmax = softmax
        self.graph = Graph(net.name or path.stem)
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        level, stages = net.state.level, set(net.state.stage)
        lines = _layer_lines(text, list(net.layer))
        self.layers = [Layer(i, l, lines[i]) for i, l in enumerate(net.layer) if _in_test_net(l, level, stages)]
        self.blobs: dict[str, str | Folded] = {}
        self.read_anywhere = {b for layer in self.layers for b in layer.proto.bottom}
        self.unread_inputs: list[str] = []
        self.produced: list[str] = []            # non-input nodes in the order they were made
        self.silenced: set[str] = set()          # nodes read by Silence layers (so not outputs)
        self.absorbed: dict[int, str] = {}       # layer index -> node it was folded into
        self.caffe_layout: dict[str, tuple[str, str]] = {}   # layer name -> (kind, node) for .caffemodel
        self.optional: set[str] = set()          # tensor keys a weights file may omit
        self.automtl_dialect = self._uses_automtl_fields()

    # ------------------------------------------------------------ helpers
    def loc(self, layer: Layer) -> str:
        return f"{self.path}:{layer.line}" if layer.line else f"{self.path}"

    def describe(self, layer: Layer) -> str:
        return f"{self.loc(layer)}: layer '{layer.proto.name}' (type {layer.proto.type})"

    def source(self, layer: Layer) -> str:
        return f"{self.path.name}:{layer.line}" if layer.line else self.path.name

    def _uses_automtl_fields(self) -> bool:
        for layer in self.net.layer:
            bn = layer.batch_norm_param
            if layer.HasField("batch_norm_param") and any(bn.HasField(f) for f in _AUTOMTL_BN_FIELDS):
                return True
            for field in ("relu_param", "dropout_param", "elu_param"):
                if layer.HasField(field) and getattr(layer, field).HasField("inplace"):
                    return True
        return False

    def next_reader(self, pos: int, blob: str) -> int | None:
        """Position (in ``self.layers``) of the next layer after ``pos`` that reads ``blob`` before it is rewritten."""
        for j in range(pos + 1, len(self.layers)):
            layer = self.layers[j].proto
            if blob in layer.bottom:
                return j
            if blob in layer.top:
                return None
        return None

    def read(self, layer: Layer, blob: str) -> str:
        """The IR node holding ``blob``'s current value for a reader ``layer``."""
        value = self.blobs.get(blob)
        if isinstance(value, Folded):
            raise UnsupportedOpError(f"{self.describe(layer)}: reads blob '{blob}', {value.reason}")
        if value is not None:
            return value
        if len(self.unread_inputs) == 1:
            alias = self.unread_inputs.pop()
            self.blobs[blob] = alias
            return alias
        declared = f"; unread graph inputs: {self.unread_inputs}" if self.unread_inputs else ""
        raise ParseError(f"layer '{layer.proto.name}' reads bottom '{blob}', which no earlier layer produces and "
                         f"which is not a graph input{declared}. Declare it with `input`/`input_dim` or an Input "
                         "layer, or fix the layer order", path=self.path, line=layer.line)

    def node_name(self, name: str, layer: Layer) -> str:
        if name in self.graph:
            raise GraphError(f"{self.describe(layer)}: the name '{name}' is used twice (layer names must be unique, "
                             "and differ from the graph input names)")
        return name

    def emit(self, layer: Layer, op: str, inputs: list[str], attrs: dict[str, Any] | None = None,
             name: str | None = None) -> Node:
        """Add a node and infer its shape now (later layers, e.g. InnerProduct, need it)."""
        name = self.node_name(name or layer.proto.name, layer)
        node = self.graph.add_node(name, op, inputs, attrs or {}, source=self.source(layer))
        opdef = get_op(op)
        ins = [self.graph.node(i).shape for i in inputs]
        try:
            node.shape = tuple(opdef.shape(node.attrs, ins))  # type: ignore[arg-type]
            tensor_shapes(opdef, node.attrs, ins)  # type: ignore[arg-type]
        except ShapeError as e:
            raise ShapeError(f"{self.describe(layer)}: {e} (input shapes {[list(s) for s in ins]})") from None
        self.produced.append(name)
        return node

    def write(self, layer: Layer, node: str) -> None:
        tops = list(layer.proto.top)
        if len(tops) != 1:
            raise ParseError(f"layer '{layer.proto.name}' (type {layer.proto.type}) has {len(tops)} tops "
                             f"{tops}; only Input and Split layers may have more or fewer than one",
                             path=self.path, line=layer.line)
        self.blobs[tops[0]] = node

    def bottoms(self, layer: Layer, count: int | None = None) -> list[str]:
        names = list(layer.proto.bottom)
        if count is not None and len(names) != count:
            raise ParseError(f"layer '{layer.proto.name}' (type {layer.proto.type}) needs {count} bottom(s), "
                             f"has {len(names)}", path=self.path, line=layer.line)
        return [self.read(layer, b) for b in names]

    # ------------------------------------------------------------ inputs
    def declare_inputs(self) -> None:
        net = self.net
        names = list(net.input)
        if net.input_shape and net.input_dim:
            raise ParseError("both `input_shape` and `input_dim` are given; use one", path=self.path)
        if net.input_shape:
            if len(net.input_shape) != len(names):
                raise ParseError(f"{len(names)} `input` names but {len(net.input_shape)} `input_shape` entries",
                                 path=self.path)
            shapes: list[Shape | None] = [tuple(s.dim) for s in net.input_shape]
        elif net.input_dim:
            if len(net.input_dim) != 4 * len(names):
                raise ParseError(f"{len(names)} `input` names need {4 * len(names)} `input_dim` values "
                                 f"(4 each), found {len(net.input_dim)}", path=self.path)
            dims = list(net.input_dim)
            shapes = [tuple(dims[4 * i:4 * i + 4]) for i in range(len(names))]
        else:
            shapes = [None] * len(names)
        for name, shape in zip(names, shapes):
            self.add_input(name, shape, None)
            if name not in self.read_anywhere:
                self.unread_inputs.append(name)

    def add_input(self, name: str, shape: Shape | None, layer: Layer | None) -> None:
        if name in self.graph:
            raise GraphError(f"{self.describe(layer) if layer else self.path}: input name '{name}' is used twice")
        if shape is None:
            if self.input_shape is None:
                raise ParseError(f"input '{name}' has no declared shape; add `input_dim`s / `input_param {{ shape "
                                 "}`, or pass input_shape", path=self.path, line=layer.line if layer else None)
            shape = self.input_shape
        if any(d <= 0 for d in shape):
            raise ParseError(f"input '{name}' has shape {list(shape)}; every dimension must be positive",
                             path=self.path, line=layer.line if layer else None)
        self.graph.add_input(name, shape, source=self.source(layer) if layer else self.path.name)
        self.blobs[name] = name

    def apply_input_override(self) -> None:
        if self.input_shape is None:
            return
        inputs = self.graph.inputs
        if len(inputs) != 1:
            raise AutomtlError(f"{self.path}: input_shape= overrides the shape of a single input, but the network "
                               f"has {len(inputs)} inputs {inputs}")
        node = self.graph.node(inputs[0])
        node.attrs = get_op("input").normalise_attrs({"shape": self.input_shape}, f"{self.path}: input_shape=")
        node.shape = node.attrs["shape"]

    # ------------------------------------------------------------ layers
    def build(self) -> Graph:
        self.declare_inputs()
        # Input layers first declare their blobs; the override needs them all.
        pending_override = True
        for pos, layer in enumerate(self.layers):
            if layer.proto.type != "Input" and pending_override:
                self.apply_input_override()
                pending_override = False
            if layer.index in self.absorbed:
                continue
            try:
                self.convert(pos, layer)
            except ParseError:
                raise
            except AutomtlError as e:
                text = str(e)
                if str(self.path) not in text:
                    text = f"{self.describe(layer)}: {text}"
                raise type(e)(text) from None
        if pending_override:
            self.apply_input_override()
        outputs = [n for n in self.produced if not self.graph.consumers(n) and n not in self.silenced]
        if not outputs:
            raise GraphError(f"{self.path}: the network has no layers that compute anything")
        self.graph.set_outputs(outputs)
        return self.graph

    def convert(self, pos: int, layer: Layer) -> None:
        p, kind = layer.proto, layer.proto.type
        handler: Callable[[int, Layer], None] | None = getattr(self, f"layer_{kind}", None)
        if kind in _SIMPLE:
            self.write(layer, self.emit(layer, _SIMPLE[kind], self.bottoms(layer, 1)).name)
        elif handler is not None:
            handler(pos, layer)
        else:
            reason = _NO_OP.get(kind, "no mapping onto the op registry")
            raise UnsupportedOpError(f"{self.loc(layer)}: layer '{p.name}' has type '{kind}': {reason}. "
                                     f"Supported layer types: {', '.join(_SUPPORTED)}")

    def layer_Input(self, pos: int, layer: Layer) -> None:
        tops, shapes = list(layer.proto.top), list(layer.proto.input_param.shape)
        if not tops:
            raise ParseError(f"Input layer '{layer.proto.name}' has no top", path=self.path, line=layer.line)
        if len(shapes) not in (0, 1, len(tops)):
            raise ParseError(f"Input layer '{layer.proto.name}' has {len(tops)} tops but {len(shapes)} shapes "
                             "(give one shape, or one per top)", path=self.path, line=layer.line)
        for i, top in enumerate(tops):
            shape = tuple(shapes[i if len(shapes) > 1 else 0].dim) if shapes else None
            name = layer.proto.name if len(tops) == 1 and layer.proto.name else top
            self.add_input(name, shape, layer)
            self.blobs[top] = name
            if top not in self.read_anywhere:
                self.unread_inputs.append(name)

    def layer_Split(self, pos: int, layer: Layer) -> None:
        (src,) = self.bottoms(layer, 1)
        for top in layer.proto.top:
            self.blobs[top] = src

    def layer_Silence(self, pos: int, layer: Layer) -> None:
        if layer.proto.top:
            raise ParseError(f"Silence layer '{layer.proto.name}' must have no tops", path=self.path, line=layer.line)
        read = [b for b in layer.proto.bottom if not isinstance(self.blobs.get(b), Unused)]
        self.silenced.update(self.read(layer, b) for b in read)

    def layer_Convolution(self, pos: int, layer: Layer) -> None:
        node = self.emit(layer, "conv2d", self.bottoms(layer, 1), self.conv_attrs(layer))
        self.caffe_layout[layer.proto.name] = ("plain", node.name)
        self.write(layer, node.name)

    def layer_BatchNorm(self, pos: int, layer: Layer) -> None:
        p = layer.proto.batch_norm_param
        (bottom,) = self.bottoms(layer, 1)
        top = layer.proto.top[0] if len(layer.proto.top) == 1 else None
        scale_pos = self.next_reader(pos, top) if top is not None else None
        scale = self.layers[scale_pos] if scale_pos is not None else None
        if scale is not None and scale.proto.type != "Scale":
            scale = None
        if scale is not None and p.HasField("affine") and p.affine:
            raise UnsupportedOpError(f"{self.describe(scale)}: follows BatchNorm '{layer.proto.name}', which is "
                                     "already affine (affine: true); a second scale cannot be folded into it")
        if any(p.HasField(f) for f in _AUTOMTL_BN_FIELDS):
            pytorch_style = True
        elif any(p.HasField(f) for f in _CAFFE_BN_FIELDS):
            pytorch_style = False
        else:
            pytorch_style = self.automtl_dialect
        affine = True if scale is not None else p.affine if p.HasField("affine") else pytorch_style
        if p.HasField("momentum") or (pytorch_style and not p.HasField("moving_average_fraction")):
            momentum = f32(p.momentum)
        else:  # Caffe's running averages keep `moving_average_fraction` of the old value
            momentum = f32(1.0 - f32(p.moving_average_fraction))
        attrs = {"eps": f32(p.eps), "momentum": momentum, "affine": affine,
                 "track_running_stats": p.track_running_stats}
        node = self.emit(layer, "batchnorm2d", [bottom], attrs)
        self.caffe_layout[layer.proto.name] = ("bn", node.name)
        self.optional.add(f"{node.name}/num_batches_tracked")
        self.write(layer, node.name)
        if scale is not None:
            self.fold_scale(scale, node, top)  # type: ignore[arg-type]

    def fold_scale(self, scale: Layer, bn: Node, bn_top: str) -> None:
        s, where = scale.proto, self.describe(scale)
        sp = s.scale_param
        if len(s.bottom) != 1:
            raise UnsupportedOpError(f"{where}: a Scale with {len(s.bottom)} bottoms (scaling by another blob) "
                                     "cannot be folded into a batch norm")
        if sp.axis != 1 or sp.num_axes != 1:
            raise UnsupportedOpError(f"{where}: only per-channel scales (axis 1, num_axes 1) fold into a batch norm")
        if len(s.top) != 1:
            raise ParseError(f"Scale layer '{s.name}' must have one top", path=self.path, line=scale.line)
        self.absorbed[scale.index] = bn.name
        self.caffe_layout[s.name] = ("scale", bn.name)
        if not sp.bias_term:
            self.optional.add(f"{bn.name}/bias")
        if s.top[0] != bn_top:
            self.blobs[bn_top] = Folded(f"the output of BatchNorm '{bn.name}' before Scale '{s.name}', which "
                                         "automtl folded into the batch norm; read the Scale's top instead")
        self.blobs[s.top[0]] = bn.name

    def layer_Scale(self, pos: int, layer: Layer) -> None:
        raise UnsupportedOpError(f"{self.describe(layer)}: a Scale layer is supported only as the affine part of "
                                 "the BatchNorm whose output it reads next (it is folded into that batch norm); "
                                 "this one does not follow a BatchNorm")

    def layer_ReLU(self, pos: int, layer: Layer) -> None:
        slope = f32(layer.proto.relu_param.negative_slope)
        inputs = self.bottoms(layer, 1)
        node = self.emit(layer, "leaky_relu", inputs, {"negative_slope": slope}) if slope else \
            self.emit(layer, "relu", inputs)
        self.write(layer, node.name)

    def layer_Clip(self, pos: int, layer: Layer) -> None:
        p = layer.proto.clip_param
        if not (p.HasField("min") and p.HasField("max")):
            raise ParseError(f"Clip layer '{layer.proto.name}' needs clip_param {{ min max }}", path=self.path,
                             line=layer.line)
        node = self.emit(layer, "clip", self.bottoms(layer, 1), {"min": f32(p.min), "max": f32(p.max)})
        self.write(layer, node.name)

    def layer_GELU(self, pos: int, layer: Layer) -> None:
        self.write(layer, self.emit(layer, "gelu", self.bottoms(layer, 1), {"approximate": "none"}).name)

    def layer_Dropout(self, pos: int, layer: Layer) -> None:
        p = f32(layer.proto.dropout_param.dropout_ratio)
        self.write(layer, self.emit(layer, "dropout", self.bottoms(layer, 1), {"p": p}).name)

    def layer_StochasticDepth(self, pos: int, layer: Layer) -> None:
        if not layer.proto.dropout_param.HasField("dropout_ratio"):
            raise ParseError(f"StochasticDepth layer '{layer.proto.name}' needs dropout_param {{ dropout_ratio }} "
                             "(the drop probability)", path=self.path, line=layer.line)
        p = f32(layer.proto.dropout_param.dropout_ratio)
        node = self.emit(layer, "stochastic_depth", self.bottoms(layer, 1), {"p": p, "mode": "row"})
        self.write(layer, node.name)

    def layer_Pooling(self, pos: int, layer: Layer) -> None:
        p, where = layer.proto.pooling_param, self.describe(layer)
        P = caffe_pb2.PoolingParameter
        if p.pool == P.STOCHASTIC:
            raise UnsupportedOpError(f"{where}: STOCHASTIC pooling has no IR op (use MAX or AVE)")
        inputs = self.bottoms(layer, 1)
        if p.global_pooling:
            if p.HasField("kernel_size") or p.HasField("kernel_h") or p.HasField("kernel_w"):
                raise ParseError(f"Pooling layer '{layer.proto.name}': global_pooling and a kernel size are "
                                 "exclusive", path=self.path, line=layer.line)
            size = tuple(p.adaptive_output_size) or (1, 1)
            if len(size) != 2 or 0 in size:
                raise ParseError(f"Pooling layer '{layer.proto.name}': adaptive_output_size needs two positive "
                                 f"values [h, w], got {list(size)}", path=self.path, line=layer.line)
            if size == (1, 1) and p.pool == P.AVE and self.fuse_mean(pos, layer, inputs):
                return
            op = "adaptive_avgpool2d" if p.pool == P.AVE else "adaptive_maxpool2d"
            self.write(layer, self.emit(layer, op, inputs, {"output_size": size}).name)
            return
        kernel = _pool_pair(p, "kernel_size", None, where)
        if kernel is None:
            raise ParseError(f"Pooling layer '{layer.proto.name}' needs kernel_size (or kernel_h/kernel_w, or "
                             "global_pooling: true)", path=self.path, line=layer.line)
        attrs: dict[str, Any] = {"kernel_size": kernel, "stride": _pool_pair(p, "stride", 1, where),
                                 "padding": _pool_pair(p, "pad", 0, where),
                                 "ceil_mode": p.round_mode == P.CEIL}
        if attrs["padding"] == (0, 0) and kernel == self.shape_of(inputs[0])[2:]:
            # One window over the whole input (ResNet's and GoogLeNet's 7x7 pool5) is global pooling; as
            # such, feature detection sees that the spatial dims end here.
            op = "adaptive_avgpool2d" if p.pool == P.AVE else "adaptive_maxpool2d"
            self.write(layer, self.emit(layer, op, inputs, {"output_size": (1, 1)}).name)
            return
        if p.pool == P.MAX:
            node = self.emit(layer, "maxpool2d", inputs, attrs)
        else:
            # Caffe averages over the window clipped to the padded input, as torch does with
            # count_include_pad=True (also in ceil mode).
            node = self.emit(layer, "avgpool2d", inputs, {**attrs, "count_include_pad": True})
        self.write(layer, node.name)

    def fuse_mean(self, pos: int, layer: Layer, inputs: list[str]) -> bool:
        """A global AVE pool read next by Flatten ``<pool>/flatten`` (axis 1..-1) is one ``mean`` node."""
        tops = list(layer.proto.top)
        if len(tops) != 1:
            return False
        j = self.next_reader(pos, tops[0])
        if j is None:
            return False
        flat = self.layers[j]
        fp = flat.proto.flatten_param
        if (flat.proto.type != "Flatten" or flat.proto.name != f"{layer.proto.name}/flatten"
                or list(flat.proto.bottom) != tops or len(flat.proto.top) != 1 or fp.axis != 1 or fp.end_axis != -1):
            return False
        if len(self.graph.node(inputs[0]).shape or ()) != 4:
            return False
        node = self.emit(layer, "mean", inputs, {"dim": (2, 3), "keepdim": False})
        self.absorbed[flat.index] = node.name
        if flat.proto.top[0] != tops[0]:
            self.blobs[tops[0]] = Folded(f"the 4-D global average of layer '{node.name}', which was read with its "
                                          f"Flatten '{flat.proto.name}' as one mean; read the Flatten's top instead")
        self.blobs[flat.proto.top[0]] = node.name
        return True

    def layer_Eltwise(self, pos: int, layer: Layer) -> None:
        p, E = layer.proto.eltwise_param, caffe_pb2.EltwiseParameter
        inputs = self.bottoms(layer)
        if len(inputs) < 2:
            raise ParseError(f"Eltwise layer '{layer.proto.name}' needs at least 2 bottoms, has {len(inputs)}",
                             path=self.path, line=layer.line)
        if p.coeff and p.operation != E.SUM:
            raise ParseError(f"Eltwise layer '{layer.proto.name}': coeff is only allowed with operation SUM",
                             path=self.path, line=layer.line)
        if p.operation == E.SUM:
            coeffs = None
            if p.coeff:
                if len(p.coeff) != len(inputs):
                    raise ParseError(f"Eltwise layer '{layer.proto.name}' has {len(p.coeff)} coeff values for "
                                     f"{len(inputs)} bottoms", path=self.path, line=layer.line)
                coeffs = [f32(c) for c in p.coeff]
            node = self.emit(layer, "add", inputs, {"coeffs": coeffs})
        else:
            node = self.emit(layer, "mul" if p.operation == E.PROD else "max", inputs)
        self.write(layer, node.name)

    def layer_Concat(self, pos: int, layer: Layer) -> None:
        p = layer.proto.concat_param
        axis = p.axis if p.HasField("axis") or not p.HasField("concat_dim") else p.concat_dim
        self.write(layer, self.emit(layer, "concat", self.bottoms(layer), {"dim": axis}).name)

    def layer_Flatten(self, pos: int, layer: Layer) -> None:
        p = layer.proto.flatten_param
        node = self.emit(layer, "flatten", self.bottoms(layer, 1), {"start_dim": p.axis, "end_dim": p.end_axis})
        self.write(layer, node.name)

    def layer_InnerProduct(self, pos: int, layer: Layer) -> None:
        p, where = layer.proto.inner_product_param, self.describe(layer)
        if not p.HasField("num_output"):
            raise ParseError(f"layer '{layer.proto.name}': inner_product_param needs num_output", path=self.path,
                             line=layer.line)
        (src,) = self.bottoms(layer, 1)
        rank = len(self.shape_of(src))
        axis = self.axis(layer, p.axis, rank) if rank else 0
        if axis == 0:
            raise UnsupportedOpError(f"{where}: InnerProduct over axis {p.axis} of a {rank}-D blob would mix the "
                                     "samples of a batch; only axes after the batch axis 0 are supported")
        if axis < rank - 1:
            # Caffe flattens every axis from `axis` on; the IR's linear op wants that as an explicit node.
            name = f"{layer.proto.name}/flatten"
            src = self.emit(layer, "flatten", [src], {"start_dim": axis, "end_dim": -1}, name=name).name
        node = self.emit(layer, "linear", [src], {"out_features": p.num_output, "bias": p.bias_term})
        self.caffe_layout[layer.proto.name] = ("transposed" if p.transpose else "plain", node.name)
        self.write(layer, node.name)


# ---------------------------------------------------------------- weights


def _no_tensors(path: Path) -> bool:
    """Whether the safetensors file at ``path`` is a valid file holding no tensors (only its header is read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return not list(f.keys())
    except (SafetensorError, OSError, ValueError):
        return False   # read_state_dict reports what is wrong with it


def _load_weights(graph: Graph, path: Path, layout: dict[str, tuple[str, str]], optional: set[str],
                  strict: bool) -> None:
    suffix = path.suffix.lower()
    if suffix == ".caffemodel":
        given = read_caffemodel(path, layout, strict)
    elif suffix == ".safetensors" and _no_tensors(path):
        given = {}   # the sidecar export_prototxt writes for a graph without tensors
    elif suffix in STATE_DICT_SUFFIXES:
        given = read_state_dict(path)
    else:
        raise FileFormatError(f"{path}: unknown weights format '{suffix or 'no suffix'}'; give a .safetensors or "
                              f"PyTorch state_dict ({', '.join(TORCH_SUFFIXES)}) file, or a binary .caffemodel")
    assign_to_graph(graph, given, path, strict=strict, optional=optional, squeeze_ok=suffix == ".caffemodel")


def load_prototxt(path: str | Path, *, input_shape: tuple[int, ...] | None = None,
                  weights: str | Path | None = None, strict: bool = True, softmax: str = "drop") -> Graph:
    """Read a Caffe ``.prototxt`` (genuine or AutoMTL dialect) into a materialised Graph.

    ``input_shape`` overrides the single input's declared shape. ``weights`` (optional, never implied) is
    a ``.safetensors`` or PyTorch state-dict file keyed ``<layer>/<tensor>`` (as ``export_prototxt``
    writes) or by torch module names (``layer1.0.conv1.weight``), or a binary ``.caffemodel``; without it
    tensors are initialised with ``materialise(seed=0)``. ``strict=False`` ignores tensors the network
    does not use. ``softmax`` says what a final Softmax layer (whose output no layer reads) becomes:
    ``"drop"`` (default: the graph ends at the logits, as a backbone should) or ``"keep"`` (a softmax
    node, for the deploy net's exact output). See the module docstring for the dialect rules.
    """
    if softmax not in SOFTMAX_CHOICES:
        raise AutomtlError(f"load_prototxt: softmax={softmax!r}; use one of {', '.join(SOFTMAX_CHOICES)}")
    path = require_file(path, "prototxt file")
    net, text = _parse_text(path)
    builder = _Builder(path, net, text, input_shape, softmax)
    graph = builder.build()
    if weights is not None:
        graph.materialise(complete=False)
        _load_weights(graph, require_file(weights, "weights file"), builder.caffe_layout, builder.optional, strict)
    return graph.materialise(seed=0)


__all__ = ["f32", "load_prototxt"]
