"""ONNX frontend: an ``.onnx`` file (opsets 13 to 21) -> Graph.

The file is read with ``onnx.load`` (external data included) and converted node by node, in the file's
order, onto registry ops. Shapes follow from the registry's shape rules at the input shape, so shape
arithmetic in the file (``Shape -> Gather -> Unsqueeze -> Concat -> Reshape`` and the like) is evaluated
at load time, together with every node whose inputs are all constants (weight standardisation computed from
initialisers, for instance, becomes the standardised weight). Patterns that exporters emit for one layer
become one IR node (:mod:`.onnx_patterns`); the per-op mappings are in :mod:`.onnx_ops` (arithmetic,
layers, normalisation) and :mod:`.onnx_layout` (reshapes, slices, padding, resizing). Arithmetic with a
constant becomes ``affine`` (a scalar) or a ``tensor`` node and the binary op (a tensor; trainable when it is
an initialiser of the file, such as a layer scale).

Initialisers become the nodes' parameters (copied); every tensor comes from the file. Anything without a
mapping is an :class:`UnsupportedOpError` naming the ONNX node and its op type; a missing, corrupt or
malformed file is a :class:`FileFormatError`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import limits
from ..errors import (
    AutomtlError,
    FileFormatError,
    GraphError,
    ShapeError,
    UnsupportedOpError,
    require_file,
)
from ..ir.graph import Graph
from ..ir.ops import get_op
from .onnx_layout import LAYOUT_HANDLERS, LayoutOps
from .onnx_ops import OP_HANDLERS, LayerOps
from .onnx_patterns import PatternMatcher
from .onnx_util import (
    BOUNDED_BY_INPUTS,
    DEFAULT_DOMAINS,
    NOT_FOLDABLE,
    NodeError,
    as_tensor,
    initialiser,
    result_bytes,
)

MIN_OPSET, MAX_OPSET = 13, 21
# ops whose handler converts every output (the others may use only their first output)
_MULTI_OUTPUT = {"Split"}


class _Converter(PatternMatcher, LayerOps, LayoutOps):
    """Walks the ONNX graph once and emits IR nodes."""

    def __init__(self, model: Any, path: Path, opset: int, input_shape: tuple[int, ...] | None) -> None:
        import onnx

        self.onnx = onnx
        self.model = model
        self.g = model.graph
        self.path = path
        self.opset = opset
        self.graph = Graph(path.stem or self.g.name or "onnx")
        self.const: dict[str, np.ndarray] = {}
        self.value: dict[str, str] = {}
        self.used_names: set[str] = set()
        self.declared_batch: int | None = None
        self.batch_overridden = False
        self.checker_ctx = onnx.checker.C.CheckerContext()
        self.checker_ctx.ir_version = model.ir_version
        self.checker_ctx.opset_imports = {("" if imp.domain == "ai.onnx" else imp.domain): imp.version
                                          for imp in model.opset_import}

        if len(self.g.sparse_initializer):
            raise UnsupportedOpError(f"{path}: sparse initialisers are not supported; save the model with dense "
                                     "initialisers")
        for init in self.g.initializer:
            try:
                self.const[init.name] = initialiser(init)
            except Exception as e:  # a corrupt tensor record
                raise FileFormatError(f"{path}: initialiser '{init.name}' cannot be read ({e}); the file is "
                                      "corrupt or incomplete, re-export it") from None
        # constants that are the file's own tensors (initialisers, or Identity of them): learnt values
        self.learnt: set[str] = set(self.const)
        self.tensor_nodes: dict[str, str] = {}
        self.nodes = list(self.g.node)
        self.outputs = [o.name for o in self.g.output]
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        for i, node in enumerate(self.nodes):
            for t in node.output:
                if t:
                    self.producer[t] = i
            for t in node.input:
                if t:
                    self.consumers.setdefault(t, []).append(i)
        self.skip: set[int] = set()
        self.current = 0
        self.folded_bytes = 0
        self.fused: dict[int, tuple[str, dict[str, Any], list[str], str, str]] = {}
        self._add_input(input_shape)

    # ------------------------------------------------------------ helpers
    def node_name(self, node: Any, index: int) -> str:
        """The ONNX node's name, or ``OpType_index`` for a nameless node."""
        return node.name or f"{node.op_type}_{index}"

    def describe(self, node: Any, index: int) -> str:
        op = node.op_type if node.domain in DEFAULT_DOMAINS else f"{node.domain}.{node.op_type}"
        return f"{self.path}: node '{self.node_name(node, index)}' (op {op})"

    def attrs(self, node: Any) -> dict[str, Any]:
        out = {}
        for a in node.attribute:
            v = self.onnx.helper.get_attribute_value(a)
            out[a.name] = v.decode() if isinstance(v, bytes) else v
        return out

    def unique(self, name: str) -> str:
        base, n = name, 1
        while name in self.used_names:
            n += 1
            name = f"{base}_{n}"
        self.used_names.add(name)
        return name

    def is_const(self, t: str) -> bool:
        return t in self.const

    def dyn(self, node: Any, i: int) -> str:
        """The IR node computing input ``i`` of ``node`` (a tensor computed at run time)."""
        if i >= len(node.input) or not node.input[i]:
            raise NodeError(f"input {i} is missing")
        t = node.input[i]
        if t in self.value:
            return self.value[t]
        if t in self.const:
            raise NodeError(f"input {i} ('{t}') is a constant; only tensors computed from the graph input "
                             "are supported there")
        raise NodeError(f"input '{t}' is not produced by any earlier node, initialiser or graph input "
                         "(the file is malformed or not topologically sorted)")

    def cin(self, node: Any, i: int, what: str, required: bool = True) -> np.ndarray | None:
        """Input ``i`` of ``node`` as a constant (an initialiser, or something evaluated at load time)."""
        if i >= len(node.input) or not node.input[i]:
            if required:
                raise NodeError(f"the {what} (input {i}) is missing")
            return None
        t = node.input[i]
        if t in self.const:
            return self.const[t]
        if t in self.value:
            raise NodeError(f"the {what} ('{t}') is computed at run time; it must be a constant (initialiser)")
        raise NodeError(f"input '{t}' is not produced by any earlier node, initialiser or graph input")

    def shape_of(self, ir_name: str) -> tuple[int, ...]:
        return tuple(self.graph.node(ir_name).shape)  # type: ignore[arg-type]

    def single_use(self, t: str) -> bool:
        return len(self.consumers.get(t, [])) == 1 and t not in self.outputs

    def emit(self, node: Any, op: str, attrs: dict[str, Any], inputs: list[str], *,
             params: dict[str, torch.Tensor] | None = None, buffers: dict[str, torch.Tensor] | None = None,
             name: str | None = None, source: str | None = None, output: str | None = None,
             bind: bool = True) -> str:
        """Add one IR node (its shape computed now, so later shape arithmetic can use it); with ``bind`` it
        computes ``output`` (default: the node's first output)."""
        name = self.unique(name or self.node_name(node, self.current))
        opdef = get_op(op, f"node '{name}'")
        norm = opdef.normalise_attrs(attrs, f"node '{name}'")
        shape = tuple(opdef.shape(norm, [self.shape_of(i) for i in inputs]))
        self.graph.add_node(name, op, inputs, attrs, params=params, buffers=buffers, shape=shape,
                            source=source if source is not None else (node.name or None))
        if bind:
            self.value[output or node.output[0]] = name
        return name

    def aux(self, node: Any, op: str, attrs: dict[str, Any], inputs: list[str], suffix: str, **kw: Any) -> str:
        """An extra IR node of ``node`` (a pad before its convolution, say), named ``<node>/<suffix>``."""
        return self.emit(node, op, attrs, inputs, name=f"{self.node_name(node, self.current)}/{suffix}",
                         bind=False, **kw)

    def tensor_node(self, node: Any, t: str) -> str:
        """A ``tensor`` IR node holding the constant ``t`` (one per constant); trainable when it is one of the
        file's initialisers (a learnt value such as a layer scale), a buffer when computed or a Constant."""
        if t in self.tensor_nodes:
            return self.tensor_nodes[t]
        a = self.const[t]
        if not np.issubdtype(a.dtype, np.floating):
            raise NodeError(f"the constant operand '{t}' is of type {a.dtype}; only float constants are supported")
        trainable = t in self.learnt
        value = {"value": as_tensor(a)}
        name = self.aux(node, "tensor", {"shape": list(a.shape), "trainable": trainable}, [],
                        t.split("/")[-1] or "const", source=t, params=value if trainable else None,
                        buffers=None if trainable else value)
        self.tensor_nodes[t] = name
        return name

    def alias(self, node: Any, ir_name: str) -> None:
        self.value[node.output[0]] = ir_name

    # ------------------------------------------------------------ input
    def _add_input(self, input_shape: tuple[int, ...] | None) -> None:
        real = [i for i in self.g.input if i.name not in self.const]
        if not real:
            raise FileFormatError(f"{self.path}: the model has no graph input (every input is an initialiser)")
        if len(real) > 1:
            raise UnsupportedOpError(f"{self.path}: the model has {len(real)} inputs "
                                     f"({', '.join(i.name for i in real[:8])}{', ...' if len(real) > 8 else ''}); "
                                     "a backbone takes exactly one image input. Export the model with a single "
                                     "input (and with export_params=True, so that weights are initialisers)")
        inp = real[0]
        ttype = inp.type.tensor_type if inp.type.HasField("tensor_type") else None
        if ttype is None:
            raise UnsupportedOpError(f"{self.path}: input '{inp.name}' is not a tensor")
        if ttype.elem_type != self.onnx.TensorProto.FLOAT:
            kind = self.onnx.TensorProto.DataType.Name(ttype.elem_type)
            raise UnsupportedOpError(f"{self.path}: input '{inp.name}' is of type {kind}; only float32 models are "
                                     "supported. Export the model in float32")
        dims: list[int | str | None] | None = None
        if ttype.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in ttype.shape.dim]
            if dims and isinstance(dims[0], int) and dims[0] > 0:
                self.declared_batch = dims[0]
        if input_shape is not None:
            shape = tuple(int(s) for s in input_shape)
            if any(s <= 0 for s in shape):
                raise AutomtlError(f"input_shape {list(shape)} must have positive dimensions")
            if dims is not None and len(dims) != len(shape):
                raise ShapeError(f"{self.path}: input '{inp.name}' has rank {len(dims)} ({self._show(dims)}), "
                                 f"but input_shape {list(shape)} has rank {len(shape)}")
            self.batch_overridden = self.declared_batch is not None and shape[0] != self.declared_batch
        else:
            if dims is None:
                raise ShapeError(f"{self.path}: input '{inp.name}' declares no shape; pass input_shape, e.g. "
                                 "(1, 3, 224, 224)")
            shape_list = [d if isinstance(d, int) and d > 0 else None for d in dims]
            if shape_list and shape_list[0] is None:
                shape_list[0] = 1  # a dynamic batch dimension
            unknown = [i for i, d in enumerate(shape_list) if d is None]
            if unknown:
                raise ShapeError(f"{self.path}: input '{inp.name}' has shape {self._show(dims)} with symbolic "
                                 f"dimension(s) at position(s) {unknown}; pass input_shape to fix them, e.g. "
                                 f"input_shape={tuple(d if d is not None else 224 for d in shape_list)}")
            shape = tuple(shape_list)  # type: ignore[arg-type]
        name = self.unique(inp.name)
        self.graph.add_input(name, shape, source=inp.name)
        self.value[inp.name] = name

    @staticmethod
    def _show(dims: list[Any]) -> str:
        return "[" + ", ".join("?" if d in (None, 0) else str(d) for d in dims) + "]"

    # ------------------------------------------------------------ conversion
    def convert(self) -> Graph:
        self.find_patterns()
        for idx, node in enumerate(self.nodes):
            if idx in self.skip:
                continue
            self.current = idx
            try:
                self.visit(idx, node)
            except NodeError as e:
                raise UnsupportedOpError(f"{self.describe(node, idx)}: {e}") from None
            except ShapeError as e:
                raise ShapeError(f"{self.describe(node, idx)}: {e}") from None
            except AutomtlError as e:
                if str(self.path) in str(e):
                    raise
                raise type(e)(f"{self.describe(node, idx)}: {e}") from None
            except Exception as e:  # anything a malformed node can provoke
                raise UnsupportedOpError(f"{self.describe(node, idx)} cannot be converted: "
                                         f"{type(e).__name__}: {e}") from None
        outs = []
        for t in self.outputs:
            if t in self.value:
                outs.append(self.value[t])
            elif t in self.const:
                raise UnsupportedOpError(f"{self.path}: graph output '{t}' is a constant (it does not depend on "
                                         "the input); remove it from the model's outputs")
            else:
                raise FileFormatError(f"{self.path}: graph output '{t}' is not produced by any node")
        if not outs:
            raise FileFormatError(f"{self.path}: the model declares no outputs")
        self.graph.set_outputs(outs)
        self._remove_dead_nodes()
        return self.graph

    def _remove_dead_nodes(self) -> None:
        live = set(self.graph.outputs)
        for n in reversed(self.graph.topological_order()):
            if n.name in live:
                live.update(n.inputs)
        for n in reversed(self.graph.topological_order()):
            if n.name not in live and n.op != "input":
                self.graph.remove_node(n.name)

    def visit(self, idx: int, node: Any) -> None:
        if node.domain not in DEFAULT_DOMAINS:
            raise UnsupportedOpError(f"{self.describe(node, idx)} is not supported: operators outside the "
                                     "standard ONNX domain have no IR mapping")
        try:
            self.onnx.checker.check_node(node, self.checker_ctx)
        except self.onnx.checker.ValidationError as e:
            raise FileFormatError(f"{self.describe(node, idx)} is malformed: {str(e).strip().splitlines()[0]}; "
                                  "re-export the model") from None
        if idx in self.fused:
            self.visit_fused(node, *self.fused[idx])
            return
        op = node.op_type
        if op == "Constant":
            self.const[node.output[0]] = self._constant_value(node)
            return
        if op in ("Shape", "Size") and node.input[0] in self.value:
            shape = self.shape_of(self.value[node.input[0]])
            if op == "Size":
                self.const[node.output[0]] = np.array(math.prod(shape), dtype=np.int64)
            else:
                at = self.attrs(node)
                start, end = at.get("start", 0), at.get("end", len(shape))
                self.const[node.output[0]] = np.array(shape[slice(start, end)], dtype=np.int64)
            return
        inputs = [t for t in node.input if t]
        if inputs and all(self.is_const(t) for t in inputs) and op not in NOT_FOLDABLE:
            self.fold(node)
            return
        if op == "GatherND" and self.recover_adaptive_avgpool(idx, node):
            return
        handler = HANDLERS.get(op)
        if handler is None:
            raise UnsupportedOpError(f"{self.describe(node, idx)} is not supported; supported ops: "
                                     f"{', '.join(sorted(HANDLERS))} (and any op whose inputs are all constants, "
                                     "which is evaluated at load time). Replace it in the model or export the "
                                     "network only up to it")
        for extra in node.output[1:] if op not in _MULTI_OUTPUT else ():
            if extra and (extra in self.consumers or extra in self.outputs):
                raise NodeError(f"its output #{list(node.output).index(extra)} ('{extra}') is used; only the "
                                 "first output is supported")
        handler(self, node)

    def _constant_value(self, node: Any) -> np.ndarray:
        from onnx import numpy_helper

        at = {a.name: a for a in node.attribute}
        if "value" in at:
            return numpy_helper.to_array(at["value"].t)
        if "value_float" in at:
            return np.array(at["value_float"].f, dtype=np.float32)
        if "value_floats" in at:
            return np.array(list(at["value_floats"].floats), dtype=np.float32)
        if "value_int" in at:
            return np.array(at["value_int"].i, dtype=np.int64)
        if "value_ints" in at:
            return np.array(list(at["value_ints"].ints), dtype=np.int64)
        raise NodeError(f"a Constant with attribute(s) {sorted(at)} is not supported")

    def fold(self, node: Any) -> None:
        """Evaluate a node whose inputs are all constants, with onnx's reference implementation."""
        if node.op_type == "Identity":
            self.const[node.output[0]] = self.const[node.input[0]]
            if node.input[0] in self.learnt:
                self.learnt.add(node.output[0])
            return
        from onnx.reference import ReferenceEvaluator

        feeds = {t: self.const[t] for t in node.input if t}
        self.budget_fold(node, feeds)
        try:
            results = ReferenceEvaluator(node, opsets={"": self.opset}).run(None, feeds)
        except Exception as e:
            raise NodeError(f"evaluating it on its constant inputs failed ({type(e).__name__}: {e})") from None
        for t, r in zip(node.output, results):
            if t:
                self.const[t] = np.asarray(r)

    def budget_fold(self, node: Any, feeds: dict[str, np.ndarray]) -> None:
        """Count the bytes evaluating ``node`` will make against MAX_FOLD_BYTES, before evaluating it."""
        size = result_bytes(node, feeds, self.opset)
        if size is None:
            if node.op_type not in BOUNDED_BY_INPUTS:
                raise limits.LimitError(
                    "the size of its result cannot be computed before evaluating it on its constant inputs, so it "
                    "is not evaluated (a guard against inputs that expand to gigabytes); export the model with "
                    "constant folding (torch.onnx.export(..., do_constant_folding=True)) or simplify it with "
                    "onnxsim")
            rank = max([a.ndim for a in feeds.values()] + [1])
            size = rank * sum(int(a.size) for a in feeds.values()) * 8
        self.folded_bytes += size
        limits.check("MAX_FOLD_BYTES", self.folded_bytes, "the size in bytes of the constants evaluated at load "
                     f"time (this node's result of {size:,} bytes included)")

    def visit_fused(self, node: Any, kind: str, info: dict[str, Any], xs: list[str], name: str,
                    source: str) -> None:
        if any(x not in self.value for x in xs):  # the "input" turned out constant: evaluate as written
            raise NodeError("a recognised pattern has a constant input; this is not supported")
        x = self.value[xs[0]]
        if kind == "matmul_add":
            w, b = self.const.get(info["weight"]), self.const.get(info["bias"])
            if w is None or b is None:
                raise NodeError("MatMul + Add with a weight or bias computed at run time is not supported")
            self.emit(node, "linear", {"out_features": w.shape[1], "bias": True}, [x],
                      params={"weight": as_tensor(w.T), "bias": as_tensor(b.reshape(-1))}, name=name, source=source)
        elif kind == "layernorm2d":
            channels = self.shape_of(x)[1]
            weight, bias = self.norm_affine(info["scale"], info["bias"], channels)
            self.emit(node, "layernorm", {"dim": 1, "eps": info["eps"]}, [x],
                      params={"weight": weight, "bias": bias}, name=name, source=source)
        else:
            self.emit(node, kind, info, [x], name=name, source=source)


HANDLERS: dict[str, Callable[[_Converter, Any], None]] = {**OP_HANDLERS, **LAYOUT_HANDLERS}  # type: ignore[dict-item]


def _read(path: Path) -> Any:
    import onnx

    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf decode errors, missing external data, ...
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileFormatError(f"{path}: not a readable ONNX model ({detail}); check that the file is a complete "
                              "ONNX file (with its external .data file beside it, if it has one), or re-export "
                              "it with torch.onnx.export") from None
    if not model.HasField("graph") or not model.opset_import or not len(model.graph.node):
        raise FileFormatError(f"{path}: not an ONNX model (no graph, nodes or opset were found); check that the "
                              "file is a complete ONNX file, or re-export it with torch.onnx.export")
    if len(model.functions):
        try:
            import onnx.inliner

            model = onnx.inliner.inline_local_functions(model)
        except Exception as e:
            raise FileFormatError(f"{path}: the model's local functions cannot be inlined ({e}); re-export it "
                                  "without export_modules_as_functions") from None
    return model


def _opset(model: Any, path: Path) -> int:
    versions = [imp.version for imp in model.opset_import if imp.domain in DEFAULT_DOMAINS]
    if not versions:
        raise FileFormatError(f"{path}: the model imports no standard ONNX opset; re-export it with "
                              "torch.onnx.export")
    opset = max(versions)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise FileFormatError(f"{path}: ONNX opset {opset} is not supported (opsets {MIN_OPSET} to {MAX_OPSET} "
                              "are); re-export with torch.onnx.export(..., opset_version=17) or convert it with "
                              "onnx.version_converter.convert_version(model, 17)")
    return opset


def load_onnx(path: str | Path, *, input_shape: tuple[int, ...] | None = None) -> Graph:
    """Read an ONNX model (opsets 13 to 21, one float32 input) into a Graph with shapes and copied tensors.

    The input's shape comes from the file (a symbolic batch dimension becomes 1) unless ``input_shape``
    is given. Raises FileFormatError for a missing, corrupt or malformed file, UnsupportedOpError for an
    operator (or operator setting) with no IR mapping, naming the ONNX node and its op type.
    """
    p = require_file(path, "ONNX model")
    model = _read(p)
    opset = _opset(model, p)
    try:
        graph = _Converter(model, p, opset, tuple(input_shape) if input_shape is not None else None).convert()
    except AutomtlError as e:
        if str(p) in str(e):
            raise
        raise type(e)(f"{p}: {e}") from None
    try:
        return graph.materialise(seed=None)
    except ShapeError as e:
        shape = list(graph.node(graph.inputs[0]).shape or ())
        raise ShapeError(f"{p}: {e}; the input shape was {shape}: pass the input_shape the model expects") from None
    except GraphError as e:
        raise type(e)(f"{p}: {e}") from None
