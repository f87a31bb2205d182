"""ONNX frontend: an ``.onnx`` file (opsets 13 to 21) -> Graph.

The file is read with ``onnx.load`` (external data included) and converted node by node, in the file's
order, onto registry ops. Shapes follow from the registry's shape rules at the input shape, so shape
arithmetic in the file (``Shape -> Gather -> Unsqueeze -> Concat -> Reshape`` and the like) is evaluated
at load time, together with every node whose inputs are all constants. A few multi-node patterns that
exporters emit for one layer are recognised and become one IR node:

* ``x * Sigmoid(x)`` -> ``silu``; ``x * HardSigmoid(x)`` (alpha 1/6, beta 1/2) -> ``hardswish``;
* ``x * 0.5 * (1 + Erf(x / sqrt(2)))`` in any association -> ``gelu`` (exact);
* ``MatMul(x, W) + b`` -> ``linear``.

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

MIN_OPSET, MAX_OPSET = 13, 21
_DEFAULT_DOMAINS = ("", "ai.onnx")
# ops that must not be evaluated at load time even when their inputs are constant
_NOT_FOLDABLE = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                 "Bernoulli", "If", "Loop", "Scan"}
_TOL = 1e-5
# constant inputs up to this many elements are given to onnx's shape inference as data (shape arithmetic)
_DATA_FOR_INFERENCE = 2**16
# ops whose result has at most (rank of an input) x (elements of all inputs) values of at most 8 bytes
_BOUNDED_BY_INPUTS = {"NonZero", "Unique", "Compress", "TopK", "Slice", "Squeeze", "Unsqueeze", "Reshape",
                      "Identity", "Cast", "CastLike", "Transpose", "Flatten", "Split", "Concat", "GatherElements",
                      "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "Abs", "Neg", "Sqrt",
                      "Floor", "Ceil", "Round", "Not", "Sign", "Shape", "Size"}


class _NodeError(Exception):
    """A node cannot be converted; the converter adds the file, node name and op type."""


def _is_scalar(a: np.ndarray | None, value: float) -> bool:
    return a is not None and a.size == 1 and abs(float(a.reshape(-1)[0]) - value) <= _TOL * max(1.0, abs(value))


def _is_real(value: Any) -> bool:
    """Whether an attribute value is a plain number (not a tensor, list, string or bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _initialiser(init: Any) -> np.ndarray:
    """An initialiser as an array; raw float32 data is viewed, not copied (``_tensor`` makes the one copy)."""
    import onnx
    from onnx import numpy_helper

    if init.data_type == onnx.TensorProto.FLOAT and init.raw_data and not init.external_data \
            and len(init.raw_data) == 4 * math.prod(init.dims):
        return np.frombuffer(init.raw_data, dtype="<f4").reshape(tuple(init.dims))
    return numpy_helper.to_array(init)


def _result_bytes(node: Any, feeds: dict[str, np.ndarray], opset: int) -> int | None:
    """Bytes of the results of ``node`` on the constant ``feeds``, from onnx's shape inference (with the
    small inputs given as data), computed without evaluating the node; None when it cannot be known."""
    from onnx import defs, helper, numpy_helper, shape_inference

    try:
        schema = defs.get_schema(node.op_type, opset, "")
        types = {t: helper.make_tensor_type_proto(helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape))
                 for t, a in feeds.items()}
        data = {t: numpy_helper.from_array(a, t) for t, a in feeds.items() if a.size <= _DATA_FOR_INFERENCE}
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


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A float32 torch copy of a numpy array (parameters of the IR are float32)."""
    return torch.from_numpy(np.array(a, dtype=np.float32, copy=True))


def _flatten_range(src: tuple[int, ...], dst: tuple[int, ...]) -> tuple[int, int] | None:
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


class _Converter:
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
                self.const[init.name] = _initialiser(init)
            except Exception as e:  # a corrupt tensor record
                raise FileFormatError(f"{path}: initialiser '{init.name}' cannot be read ({e}); the file is "
                                      "corrupt or incomplete, re-export it") from None
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
        op = node.op_type if node.domain in _DEFAULT_DOMAINS else f"{node.domain}.{node.op_type}"
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
            raise _NodeError(f"input {i} is missing")
        t = node.input[i]
        if t in self.value:
            return self.value[t]
        if t in self.const:
            raise _NodeError(f"input {i} ('{t}') is a constant; only tensors computed from the graph input "
                             "are supported there")
        raise _NodeError(f"input '{t}' is not produced by any earlier node, initialiser or graph input "
                         "(the file is malformed or not topologically sorted)")

    def cin(self, node: Any, i: int, what: str, required: bool = True) -> np.ndarray | None:
        """Input ``i`` of ``node`` as a constant (an initialiser, or something evaluated at load time)."""
        if i >= len(node.input) or not node.input[i]:
            if required:
                raise _NodeError(f"the {what} (input {i}) is missing")
            return None
        t = node.input[i]
        if t in self.const:
            return self.const[t]
        if t in self.value:
            raise _NodeError(f"the {what} ('{t}') is computed at run time; it must be a constant (initialiser)")
        raise _NodeError(f"input '{t}' is not produced by any earlier node, initialiser or graph input")

    def shape_of(self, ir_name: str) -> tuple[int, ...]:
        return tuple(self.graph.node(ir_name).shape)  # type: ignore[arg-type]

    def single_use(self, t: str) -> bool:
        return len(self.consumers.get(t, [])) == 1 and t not in self.outputs

    def emit(self, node: Any, op: str, attrs: dict[str, Any], inputs: list[str], *,
             params: dict[str, torch.Tensor] | None = None, buffers: dict[str, torch.Tensor] | None = None,
             name: str | None = None, source: str | None = None, output: str | None = None) -> str:
        """Add one IR node (its shape computed now, so later shape arithmetic can use it)."""
        name = self.unique(name or self.node_name(node, self.current))
        opdef = get_op(op, f"node '{name}'")
        norm = opdef.normalise_attrs(attrs, f"node '{name}'")
        shape = tuple(opdef.shape(norm, [self.shape_of(i) for i in inputs]))
        self.graph.add_node(name, op, inputs, attrs, params=params, buffers=buffers, shape=shape,
                            source=source if source is not None else (node.name or None))
        self.value[output or node.output[0]] = name
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

    # ------------------------------------------------------------ patterns
    def _literals(self) -> dict[str, np.ndarray]:
        """Constants known without evaluating anything: initialisers, Constant nodes, Identity of those."""
        lit = dict(self.const)
        for node in self.nodes:
            if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS and node.output:
                try:
                    lit[node.output[0]] = self._constant_value(node)
                except (_NodeError, ValueError, TypeError):
                    pass  # reported when the node is converted
            elif node.op_type == "Identity" and node.input and node.input[0] in lit:
                lit[node.output[0]] = lit[node.input[0]]
        return lit

    def find_patterns(self) -> None:
        lit = self._literals()

        def prod(t: str) -> Any:
            i = self.producer.get(t)
            return (i, self.nodes[i]) if i is not None else (None, None)

        def op_is(node: Any, op: str) -> bool:
            return node is not None and node.op_type == op and node.domain in _DEFAULT_DOMAINS

        def other(node: Any, t: str) -> str | None:
            ins = list(node.input)
            if len(ins) != 2 or t not in ins:
                return None
            return ins[1] if ins[0] == t else ins[0]

        def sole_consumer(t: str) -> tuple[int | None, Any]:
            if not self.single_use(t):
                return None, None
            i = self.consumers[t][0]
            return i, self.nodes[i]

        for idx, node in enumerate(self.nodes):
            if node.domain not in _DEFAULT_DOMAINS:
                continue
            if node.op_type == "Mul" and len(node.input) == 2:
                self._match_gated(idx, node, lit, prod)
            elif node.op_type == "Erf":
                self._match_gelu(idx, node, lit, prod, op_is, other, sole_consumer)
            elif node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in lit:
                j, add = sole_consumer(node.output[0])
                if op_is(add, "Add") and j not in self.fused:
                    c = other(add, node.output[0])
                    w = lit[node.input[1]]
                    if c is not None and c in lit and w.ndim == 2 and lit[c].size == w.shape[1] \
                            and lit[c].ndim <= 2 and lit[c].shape[-1] == w.shape[1]:
                        self.skip.add(idx)
                        self.fused[j] = ("matmul_add", {"weight": node.input[1], "bias": c}, [node.input[0]],
                                         node.name, f"{node.name} + {add.name}")

    def _match_gated(self, idx: int, node: Any, lit: dict[str, np.ndarray], prod: Callable[[str], Any]) -> None:
        """x * Sigmoid(x) -> silu, x * HardSigmoid(x) -> hardswish."""
        a, b = node.input
        for x, gate in ((a, b), (b, a)):
            gi, gnode = prod(gate)
            if gnode is None or gnode.domain not in _DEFAULT_DOMAINS or list(gnode.input) != [x] \
                    or not self.single_use(gate) or x in lit:
                continue
            if gnode.op_type == "Sigmoid":
                op = "silu"
            elif gnode.op_type == "HardSigmoid":
                at = self.attrs(gnode)
                alpha, beta = at.get("alpha", 0.2), at.get("beta", 0.5)
                if not (_is_real(alpha) and _is_real(beta)) or abs(alpha - 1 / 6) > _TOL or abs(beta - 0.5) > _TOL:
                    continue  # not the pattern (a malformed attribute is reported when the node is converted)
                op = "hardswish"
            else:
                continue
            self.skip.add(gi)
            self.fused[idx] = (op, {}, [x], node.name, f"{gnode.name} + {node.name}")
            return

    def _match_gelu(self, idx: int, erf: Any, lit: dict[str, np.ndarray], prod: Callable[[str], Any],
                    op_is: Callable[[Any, str], bool], other: Callable[[Any, str], str | None],
                    sole_consumer: Callable[[str], Any]) -> None:
        """0.5 * x * (1 + erf(x / sqrt(2))), with the products in any order -> gelu."""
        di, div = prod(erf.input[0])
        if div is None or not self.single_use(erf.input[0]) or len(div.input) != 2:
            return
        x, c = div.input
        if not ((op_is(div, "Div") and _is_scalar(lit.get(c), math.sqrt(2)))
                or (op_is(div, "Mul") and _is_scalar(lit.get(c), 1 / math.sqrt(2)))):
            if op_is(div, "Mul") and _is_scalar(lit.get(x), 1 / math.sqrt(2)):
                x, c = c, x
            else:
                return
        if x in lit:
            return
        ai, add = sole_consumer(erf.output[0])
        if not op_is(add, "Add") or not _is_scalar(lit.get(other(add, erf.output[0]) or ""), 1.0):
            return
        m1i, m1 = sole_consumer(add.output[0])
        if not op_is(m1, "Mul"):
            return
        y = other(m1, add.output[0])
        if y is None:
            return
        chain = [di, idx, ai]
        if y == x:
            m2i, m2 = sole_consumer(m1.output[0])
            if not op_is(m2, "Mul") or not _is_scalar(lit.get(other(m2, m1.output[0]) or ""), 0.5):
                return
            chain.append(m1i)
            last_i, last = m2i, m2
        elif _is_scalar(lit.get(y), 0.5):
            m2i, m2 = sole_consumer(m1.output[0])
            if not op_is(m2, "Mul") or other(m2, m1.output[0]) != x:
                return
            chain.append(m1i)
            last_i, last = m2i, m2
        else:
            hi, half = prod(y)
            if not op_is(half, "Mul") or not self.single_use(y) or other(half, x) is None \
                    or not _is_scalar(lit.get(other(half, x) or ""), 0.5):
                return
            chain.append(hi)
            last_i, last = m1i, m1
        if last_i in self.fused or any(i in self.fused for i in chain):
            return
        self.skip.update(chain)
        self.fused[last_i] = ("gelu", {"approximate": "none"}, [x], last.name,
                              " + ".join(self.nodes[i].name for i in sorted([*chain, last_i])))

    # ------------------------------------------------------------ conversion
    def convert(self) -> Graph:
        self.find_patterns()
        for idx, node in enumerate(self.nodes):
            if idx in self.skip:
                continue
            self.current = idx
            try:
                self.visit(idx, node)
            except _NodeError as e:
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
        if node.domain not in _DEFAULT_DOMAINS:
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
        if inputs and all(self.is_const(t) for t in inputs) and op not in _NOT_FOLDABLE:
            self.fold(node)
            return
        handler = _HANDLERS.get(op)
        if handler is None:
            raise UnsupportedOpError(f"{self.describe(node, idx)} is not supported; supported ops: "
                                     f"{', '.join(sorted(_HANDLERS))} (and any op whose inputs are all constants, "
                                     "which is evaluated at load time). Replace it in the model or export the "
                                     "network only up to it")
        for extra in node.output[1:]:
            if extra and (extra in self.consumers or extra in self.outputs):
                raise _NodeError(f"its output #{list(node.output).index(extra)} ('{extra}') is used; only the "
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
        raise _NodeError(f"a Constant with attribute(s) {sorted(at)} is not supported")

    def fold(self, node: Any) -> None:
        """Evaluate a node whose inputs are all constants, with onnx's reference implementation."""
        if node.op_type == "Identity":
            self.const[node.output[0]] = self.const[node.input[0]]
            return
        from onnx.reference import ReferenceEvaluator

        feeds = {t: self.const[t] for t in node.input if t}
        self.budget_fold(node, feeds)
        try:
            results = ReferenceEvaluator(node, opsets={"": self.opset}).run(None, feeds)
        except Exception as e:
            raise _NodeError(f"evaluating it on its constant inputs failed ({type(e).__name__}: {e})") from None
        for t, r in zip(node.output, results):
            if t:
                self.const[t] = np.asarray(r)

    def budget_fold(self, node: Any, feeds: dict[str, np.ndarray]) -> None:
        """Count the bytes evaluating ``node`` will make against MAX_FOLD_BYTES, before evaluating it."""
        size = _result_bytes(node, feeds, self.opset)
        if size is None:
            if node.op_type not in _BOUNDED_BY_INPUTS:
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
            raise _NodeError("a recognised pattern has a constant input; this is not supported")
        x = self.value[xs[0]]
        if kind == "matmul_add":
            w, b = self.const.get(info["weight"]), self.const.get(info["bias"])
            if w is None or b is None:
                raise _NodeError("MatMul + Add with a weight or bias computed at run time is not supported")
            self.emit(node, "linear", {"out_features": w.shape[1], "bias": True}, [x],
                      params={"weight": _tensor(w.T), "bias": _tensor(b.reshape(-1))}, name=name, source=source)
        else:
            self.emit(node, kind, info, [x], name=name, source=source)

    # ------------------------------------------------------------ layers
    def padding(self, node: Any, at: dict[str, Any], hw: tuple[int, ...], kernel: list[int], strides: list[int],
                dilations: list[int]) -> tuple[int, int]:
        auto = at.get("auto_pad", "NOTSET")
        if auto == "NOTSET":
            pads = list(at.get("pads", [0] * 4))
            if len(pads) != 4:
                raise _NodeError(f"pads {pads} must have 4 values for a 2-D window")
            if pads[:2] != pads[2:]:
                raise _NodeError(f"asymmetric padding pads={pads} (begin {pads[:2]}, end {pads[2:]}) is not "
                                 "supported: the IR pads both sides equally. Re-export with symmetric padding")
            return pads[0], pads[1]
        if auto == "VALID":
            return 0, 0
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            out = []
            for size, k, s, d in zip(hw, kernel, strides, dilations):
                total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
                if total % 2:
                    raise _NodeError(f"auto_pad={auto} needs asymmetric padding here (total {total} along an axis "
                                     f"of size {size}), which is not supported; re-export with explicit pads")
                out.append(total // 2)
            return out[0], out[1]
        raise _NodeError(f"auto_pad={auto!r} is not supported")

    def need_rank(self, x: str, rank: int, what: str) -> tuple[int, ...]:
        shape = self.shape_of(x)
        if len(shape) != rank:
            raise _NodeError(f"{what} on a {len(shape)}-D tensor {list(shape)} is not supported; only "
                             f"{rank}-D" + (" (N, C, H, W)" if rank == 4 else ""))
        return shape

    def conv(self, node: Any) -> None:
        x = self.dyn(node, 0)
        w = self.cin(node, 1, "weight")
        b = self.cin(node, 2, "bias", required=False)
        assert w is not None
        if w.ndim != 4:
            raise _NodeError(f"only 2-D convolutions are supported (weight of shape {list(w.shape)})")
        shape = self.need_rank(x, 4, "Conv")
        at = self.attrs(node)
        kernel = list(at.get("kernel_shape", w.shape[2:]))
        if tuple(kernel) != tuple(w.shape[2:]):
            raise _NodeError(f"kernel_shape {kernel} disagrees with the weight's shape {list(w.shape)}")
        strides, dil = list(at.get("strides", [1, 1])), list(at.get("dilations", [1, 1]))
        pad = self.padding(node, at, shape[2:], kernel, strides, dil)
        params = {"weight": _tensor(w)}
        if b is not None:
            params["bias"] = _tensor(b.reshape(-1))
        self.emit(node, "conv2d", {"out_channels": w.shape[0], "kernel_size": kernel, "stride": strides,
                                   "padding": pad, "dilation": dil, "groups": at.get("group", 1),
                                   "bias": b is not None}, [x], params=params)

    def batchnorm(self, node: Any) -> None:
        x = self.dyn(node, 0)
        scale, bias, mean, var = (self.cin(node, i, what) for i, what in
                                  enumerate(["scale", "bias", "running mean", "running variance"], start=1))
        at = self.attrs(node)
        if at.get("training_mode", 0):
            raise _NodeError("training_mode=1 (batch statistics) is not supported; export the model in eval mode")
        self.need_rank(x, 4, "BatchNormalization")
        momentum = round(1.0 - float(at.get("momentum", 0.9)), 6)  # ONNX keeps the old value's share
        self.emit(node, "batchnorm2d", {"eps": at.get("epsilon", 1e-5), "momentum": momentum, "affine": True,
                                        "track_running_stats": True}, [x],
                  params={"weight": _tensor(scale), "bias": _tensor(bias)},  # type: ignore[arg-type]
                  buffers={"running_mean": _tensor(mean), "running_var": _tensor(var),  # type: ignore[arg-type]
                           "num_batches_tracked": torch.tensor(0, dtype=torch.long)})

    def clip(self, node: Any) -> None:
        x = self.dyn(node, 0)
        bounds = []
        for i, key in ((1, "min"), (2, "max")):  # inputs since opset 11 (attributes before)
            v = self.cin(node, i, key, required=False)
            if v is not None and v.size != 1:
                raise _NodeError(f"a non-scalar {key} of shape {list(v.shape)} is not supported")
            bounds.append(None if v is None else float(v.reshape(-1)[0]))
        lo, hi = bounds
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
        if abs(alpha - 1 / 6) > _TOL or abs(beta - 0.5) > _TOL:
            raise _NodeError(f"HardSigmoid with alpha={alpha:g}, beta={beta:g} is not supported; the IR's "
                             "hardsigmoid is torch's (alpha=1/6, beta=0.5)")
        self.emit(node, "hardsigmoid", {}, [self.dyn(node, 0)])

    def leaky_relu(self, node: Any) -> None:
        self.emit(node, "leaky_relu", {"negative_slope": self.attrs(node).get("alpha", 0.01)}, [self.dyn(node, 0)])

    def gelu(self, node: Any) -> None:
        approx = self.attrs(node).get("approximate", "none")
        if approx not in ("none", "tanh"):
            raise _NodeError(f"approximate={approx!r} is not supported")
        self.emit(node, "gelu", {"approximate": approx}, [self.dyn(node, 0)])

    def pool(self, node: Any) -> None:
        x = self.dyn(node, 0)
        shape = self.need_rank(x, 4, node.op_type)
        at = self.attrs(node)
        kernel = list(at["kernel_shape"])
        if len(kernel) != 2:
            raise _NodeError(f"only 2-D pooling is supported (kernel_shape {kernel})")
        strides, dil = list(at.get("strides", [1, 1])), list(at.get("dilations", [1, 1]))
        pad = self.padding(node, at, shape[2:], kernel, strides, dil)
        for p, k, d in zip(pad, kernel, dil):
            if 2 * p > d * (k - 1) + 1:
                raise _NodeError(f"padding {list(pad)} is more than half the window {kernel}; torch pooling "
                                 "cannot express it")
        attrs = {"kernel_size": kernel, "stride": strides, "padding": pad, "ceil_mode": bool(at.get("ceil_mode", 0))}
        if node.op_type == "MaxPool":
            if at.get("storage_order", 0):
                raise _NodeError("storage_order=1 is not supported")
            self.emit(node, "maxpool2d", {**attrs, "dilation": dil}, [x])
        else:
            if dil != [1, 1]:
                raise _NodeError(f"AveragePool with dilations {dil} is not supported")
            self.emit(node, "avgpool2d", {**attrs, "count_include_pad": bool(at.get("count_include_pad", 0))}, [x])

    def global_pool(self, node: Any) -> None:
        x = self.dyn(node, 0)
        self.need_rank(x, 4, node.op_type)
        op = "adaptive_avgpool2d" if node.op_type == "GlobalAveragePool" else "adaptive_maxpool2d"
        self.emit(node, op, {"output_size": (1, 1)}, [x])

    def reduce_mean(self, node: Any) -> None:
        x = self.dyn(node, 0)
        shape = self.shape_of(x)
        at = self.attrs(node)
        if self.opset >= 18:
            axes_arr = self.cin(node, 1, "axes", required=False)
            axes = None if axes_arr is None else [int(a) for a in axes_arr.reshape(-1)]
        else:
            axes = at.get("axes")
        keep = bool(at.get("keepdims", 1))
        if not axes:
            if at.get("noop_with_empty_axes", 0):
                self.emit(node, "identity", {}, [x])
                return
            axes = list(range(len(shape)))
        dims = sorted({a % len(shape) for a in axes})
        if 0 in dims:
            raise _NodeError(f"a mean over the batch dimension (axes {axes}) is not supported")
        if keep and len(shape) == 4 and dims == [2, 3]:
            self.emit(node, "adaptive_avgpool2d", {"output_size": (1, 1)}, [x])
        else:
            self.emit(node, "mean", {"dim": dims, "keepdim": keep}, [x])

    def nary(self, node: Any) -> None:
        op = node.op_type
        ins = [t for t in node.input if t]
        dyn = [t for t in ins if t in self.value]
        consts = [t for t in ins if t not in self.value]
        for t in consts:
            self.cin(node, list(node.input).index(t), "operand")  # raises if undefined
        if consts:
            self.trivial_constant_operand(node, op, ins, dyn, consts)
            return
        names = [self.value[t] for t in ins]
        if len(names) == 1:
            self.alias(node, names[0])
        elif op == "Sub":
            self.emit(node, "add", {"coeffs": (1.0, -1.0)}, names)
        elif op == "Div":
            raise _NodeError("a division of two computed tensors has no IR op")
        else:
            self.emit(node, {"Add": "add", "Sum": "add", "Mul": "mul", "Max": "max"}[op], {}, names)

    def trivial_constant_operand(self, node: Any, op: str, ins: list[str], dyn: list[str], consts: list[str]) -> None:
        """x + 0, x - 0, x * 1, x / 1 are dropped; any other constant operand is an error."""
        neutral = {"Add": 0.0, "Sum": 0.0, "Sub": 0.0, "Mul": 1.0, "Div": 1.0}.get(op)
        first_dyn = op not in ("Sub", "Div") or ins[0] in dyn
        if len(dyn) == 1 and neutral is not None and first_dyn:
            x = self.value[dyn[0]]
            out = np.broadcast_shapes(self.shape_of(x), *(self.const[c].shape for c in consts))
            if tuple(out) == self.shape_of(x) and all(np.all(self.const[c] == neutral) for c in consts):
                self.alias(node, x)
                return
        c = self.const[consts[0]]
        shown = f"the value {float(c.reshape(-1)[0]):g}" if c.size == 1 else f"a tensor of shape {list(c.shape)}"
        raise _NodeError(f"a constant operand ({shown}) is not supported: the IR's elementwise ops combine tensors "
                         "computed by the graph only")

    def concat(self, node: Any) -> None:
        ins = [self.dyn(node, i) for i, t in enumerate(node.input) if t]
        self.emit(node, "concat", {"dim": self.attrs(node).get("axis")}, ins)

    def as_flatten(self, node: Any, x: str, target: tuple[int, ...]) -> None:
        src = self.shape_of(x)
        if target == src:
            self.alias(node, x)
            return
        rng = _flatten_range(src, target)
        if rng is None:
            raise _NodeError(f"a reshape from {list(src)} to {list(target)} is not supported; only reshapes that "
                             "merge adjacent dimensions (flatten), such as [N, C, H, W] -> [N, C*H*W], are")
        start, end = rng
        self.emit(node, "flatten", {"start_dim": start, "end_dim": -1 if end == len(src) - 1 else end}, [x])

    def reshape(self, node: Any) -> None:
        x = self.dyn(node, 0)
        spec = self.cin(node, 1, "target shape")
        assert spec is not None
        src = self.shape_of(x)
        allowzero = self.attrs(node).get("allowzero", 0)
        dims = [int(s) for s in spec.reshape(-1)]
        target = self._resolve_reshape(src, dims, allowzero)
        if self.batch_overridden and dims and dims[0] == self.declared_batch and \
                (target is None or (target != src and _flatten_range(src, target) is None)):
            # a shape constant written for the file's batch size, loaded at another: keep the batch dimension
            target = self._resolve_reshape(src, [0, *dims[1:]], 0) or target
        if target is None:
            raise _NodeError(f"the target shape {dims} does not fit an input of shape {list(src)}")
        self.as_flatten(node, x, target)

    @staticmethod
    def _resolve_reshape(src: tuple[int, ...], spec: list[int], allowzero: int) -> tuple[int, ...] | None:
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

    def flatten(self, node: Any) -> None:
        x = self.dyn(node, 0)
        src = self.shape_of(x)
        axis = self.attrs(node).get("axis", 1)
        axis = axis + len(src) if axis < 0 else axis
        self.as_flatten(node, x, (math.prod(src[:axis]), math.prod(src[axis:])))

    def squeeze(self, node: Any) -> None:
        x = self.dyn(node, 0)
        src = self.shape_of(x)
        axes_arr = self.cin(node, 1, "axes", required=False)
        axes = {int(a) % len(src) for a in axes_arr.reshape(-1)} if axes_arr is not None else \
            {i for i, s in enumerate(src) if s == 1}
        if any(src[a] != 1 for a in axes):
            raise _NodeError(f"cannot squeeze axes {sorted(axes)} of a tensor of shape {list(src)}")
        self.as_flatten(node, x, tuple(s for i, s in enumerate(src) if i not in axes))

    def gemm(self, node: Any) -> None:
        x = self.dyn(node, 0)
        self.need_rank(x, 2, "Gemm")
        b = self.cin(node, 1, "weight (B)")
        c = self.cin(node, 2, "bias (C)", required=False)
        at = self.attrs(node)
        assert b is not None
        if at.get("transA", 0):
            raise _NodeError("transA=1 is not supported (the input must be [N, features])")
        w = b if at.get("transB", 0) else b.T
        alpha, beta = float(at.get("alpha", 1.0)), float(at.get("beta", 1.0))
        if alpha != 1.0:
            w = w * np.float32(alpha)
        params = {"weight": _tensor(w)}
        if c is not None:
            out = w.shape[0]
            if c.size == 1:
                c = np.full((out,), c.reshape(-1)[0], dtype=np.float32)
            elif c.ndim > 2 or c.shape[-1] != out or c.size != out:
                raise _NodeError(f"a bias C of shape {list(c.shape)} is not supported; it must be [{out}] or "
                                 f"[1, {out}]")
            params["bias"] = _tensor(c.reshape(-1) * np.float32(beta) if beta != 1.0 else c.reshape(-1))
        self.emit(node, "linear", {"out_features": w.shape[0], "bias": c is not None}, [x], params=params)

    def matmul(self, node: Any) -> None:
        x = self.dyn(node, 0)
        w = self.cin(node, 1, "weight (second operand)")
        assert w is not None
        if w.ndim != 2:
            raise _NodeError(f"a MatMul weight of shape {list(w.shape)} is not supported; it must be 2-D")
        self.need_rank(x, 2, "MatMul")
        self.emit(node, "linear", {"out_features": w.shape[1], "bias": False}, [x], params={"weight": _tensor(w.T)})

    def dropout(self, node: Any) -> None:
        x = self.dyn(node, 0)
        ratio = self.cin(node, 1, "ratio", required=False)
        p = float(ratio.reshape(-1)[0]) if ratio is not None else 0.5  # an input since opset 12
        self.emit(node, "dropout", {"p": p}, [x])

    def identity(self, node: Any) -> None:
        self.emit(node, "identity", {}, [self.dyn(node, 0)])

    def cast(self, node: Any) -> None:
        if self.attrs(node).get("to") != self.onnx.TensorProto.FLOAT:
            raise _NodeError("only casts to float32 of float32 tensors are supported")
        self.alias(node, self.dyn(node, 0))


def _unary(op: str) -> Callable[[_Converter, Any], None]:
    """A handler for a one-input, attribute-free op."""
    def handler(conv: _Converter, node: Any) -> None:
        conv.emit(node, op, {}, [conv.dyn(node, 0)])
    return handler


_HANDLERS: dict[str, Callable[[_Converter, Any], None]] = {
    "Conv": _Converter.conv,
    "BatchNormalization": _Converter.batchnorm,
    "Relu": _unary("relu"),
    "Sigmoid": _unary("sigmoid"),
    "Tanh": _unary("tanh"),
    "HardSwish": _unary("hardswish"),
    "HardSigmoid": _Converter.hardsigmoid,
    "LeakyRelu": _Converter.leaky_relu,
    "Gelu": _Converter.gelu,
    "Clip": _Converter.clip,
    "MaxPool": _Converter.pool,
    "AveragePool": _Converter.pool,
    "GlobalAveragePool": _Converter.global_pool,
    "GlobalMaxPool": _Converter.global_pool,
    "ReduceMean": _Converter.reduce_mean,
    "Add": _Converter.nary,
    "Sub": _Converter.nary,
    "Mul": _Converter.nary,
    "Div": _Converter.nary,
    "Max": _Converter.nary,
    "Sum": _Converter.nary,
    "Concat": _Converter.concat,
    "Flatten": _Converter.flatten,
    "Reshape": _Converter.reshape,
    "Squeeze": _Converter.squeeze,
    "Gemm": _Converter.gemm,
    "MatMul": _Converter.matmul,
    "Dropout": _Converter.dropout,
    "Identity": _Converter.identity,
    "Cast": _Converter.cast,
}


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
    versions = [imp.version for imp in model.opset_import if imp.domain in _DEFAULT_DOMAINS]
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
