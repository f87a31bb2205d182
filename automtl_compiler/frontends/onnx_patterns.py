"""Multi-node patterns of the ONNX frontend: sequences that exporters emit for one layer become one IR node.

* ``x * Sigmoid(x)`` -> ``silu``; ``x * HardSigmoid(x)`` (alpha 1/6, beta 1/2) -> ``hardswish``;
  ``x * Tanh(Softplus(x))`` -> ``mish``;
* ``x * 0.5 * (1 + Erf(x / sqrt(2)))`` in any association -> ``gelu`` (exact);
* ``MatMul(x, W) + b`` -> ``linear``;
* ``Transpose(0, 2, 3, 1) -> LayerNormalization(last axis) -> Transpose(0, 3, 1, 2)`` -> ``layernorm`` over
  the channels (ConvNeXt's LayerNorm2d);
* torch.export's decomposition of an adaptive average pooling whose output size does not divide the input
  (``Transpose -> GatherND -> ... -> Div``) -> ``adaptive_avgpool2d``, recognised when conversion reaches the
  GatherND and confirmed by evaluating the region (:meth:`PatternMatcher.recover_adaptive_avgpool`).

The matcher only records decisions (``self.skip``: nodes not converted on their own, ``self.fused``: the node
that emits the fused IR node); the converter emits the nodes in file order.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .onnx_util import DEFAULT_DOMAINS, TOL, NodeError, is_real, is_scalar

# nodes an exporter's decomposition of one adaptive pooling may span
_MAX_REGION = 64


def _op_is(node: Any, op: str) -> bool:
    return node is not None and node.op_type == op and node.domain in DEFAULT_DOMAINS


def _other(node: Any, t: str) -> str | None:
    """The other input of a two-input node that reads ``t``."""
    ins = list(node.input)
    if len(ins) != 2 or t not in ins:
        return None
    return ins[1] if ins[0] == t else ins[0]


class PatternMatcher:
    """Mixin of the ONNX converter: finds the patterns above before conversion starts."""

    nodes: list[Any]
    const: dict[str, np.ndarray]
    producer: dict[str, int]
    consumers: dict[str, list[int]]
    skip: set[int]
    fused: dict[int, tuple[str, dict[str, Any], list[str], str, str]]
    single_use: Callable[[str], bool]
    attrs: Callable[[Any], dict[str, Any]]
    _constant_value: Callable[[Any], np.ndarray]
    opset: int
    outputs: list[str]
    value: dict[str, str]
    shape_of: Callable[[str], tuple[int, ...]]
    emit: Callable[..., str]

    def _literals(self) -> dict[str, np.ndarray]:
        """Constants known without evaluating anything: initialisers, Constant nodes, Identity of those."""
        lit = dict(self.const)
        for node in self.nodes:
            if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS and node.output:
                try:
                    lit[node.output[0]] = self._constant_value(node)
                except (NodeError, ValueError, TypeError):
                    pass  # reported when the node is converted
            elif node.op_type == "Identity" and node.input and node.input[0] in lit:
                lit[node.output[0]] = lit[node.input[0]]
        return lit

    def _prod(self, t: str) -> tuple[int | None, Any]:
        i = self.producer.get(t)
        return (i, self.nodes[i]) if i is not None else (None, None)

    def _sole_consumer(self, t: str) -> tuple[int | None, Any]:
        if not self.single_use(t):
            return None, None
        i = self.consumers[t][0]
        return i, self.nodes[i]

    def find_patterns(self) -> None:
        """Record every pattern of the module docstring found in the file."""
        lit = self._literals()
        for idx, node in enumerate(self.nodes):
            if node.domain not in DEFAULT_DOMAINS:
                continue
            if node.op_type == "Mul" and len(node.input) == 2:
                self._match_gated(idx, node, lit)
            elif node.op_type == "Erf":
                self._match_gelu(idx, node, lit)
            elif node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in lit:
                self._match_matmul_add(idx, node, lit)
            elif node.op_type == "LayerNormalization":
                self._match_channel_layernorm(idx, node, lit)

    def _match_matmul_add(self, idx: int, node: Any, lit: dict[str, np.ndarray]) -> None:
        j, add = self._sole_consumer(node.output[0])
        if not _op_is(add, "Add") or j in self.fused:
            return
        c = _other(add, node.output[0])
        w = lit[node.input[1]]
        if c is not None and c in lit and w.ndim == 2 and lit[c].size == w.shape[1] \
                and lit[c].ndim <= 2 and lit[c].shape[-1] == w.shape[1]:
            self.skip.add(idx)
            self.fused[j] = ("matmul_add", {"weight": node.input[1], "bias": c}, [node.input[0]],
                             node.name, f"{node.name} + {add.name}")

    def _match_gated(self, idx: int, node: Any, lit: dict[str, np.ndarray]) -> None:
        """x * Sigmoid(x) -> silu, x * HardSigmoid(x) -> hardswish, x * Tanh(Softplus(x)) -> mish."""
        a, b = node.input
        for x, gate in ((a, b), (b, a)):
            gi, gnode = self._prod(gate)
            if gnode is None or gnode.domain not in DEFAULT_DOMAINS or not self.single_use(gate) or x in lit:
                continue
            chain = [gi]
            if gnode.op_type == "Tanh" and len(gnode.input) == 1:
                si, soft = self._prod(gnode.input[0])
                if not _op_is(soft, "Softplus") or list(soft.input) != [x] or not self.single_use(gnode.input[0]):
                    continue
                op = "mish"
                chain.append(si)
            elif list(gnode.input) != [x]:
                continue
            elif gnode.op_type == "Sigmoid":
                op = "silu"
            elif gnode.op_type == "HardSigmoid":
                at = self.attrs(gnode)
                alpha, beta = at.get("alpha", 0.2), at.get("beta", 0.5)
                if not (is_real(alpha) and is_real(beta)) or abs(alpha - 1 / 6) > TOL or abs(beta - 0.5) > TOL:
                    continue  # not the pattern (a malformed attribute is reported when the node is converted)
                op = "hardswish"
            else:
                continue
            if any(i in self.fused for i in chain):
                continue
            self.skip.update(chain)
            self.fused[idx] = (op, {}, [x], node.name, " + ".join(self.nodes[i].name for i in [*chain[::-1], idx]))
            return

    def _match_gelu(self, idx: int, erf: Any, lit: dict[str, np.ndarray]) -> None:
        """0.5 * x * (1 + erf(x / sqrt(2))), with the products in any order -> gelu."""
        di, div = self._prod(erf.input[0])
        if div is None or not self.single_use(erf.input[0]) or len(div.input) != 2:
            return
        x, c = div.input
        if not ((_op_is(div, "Div") and is_scalar(lit.get(c), math.sqrt(2)))
                or (_op_is(div, "Mul") and is_scalar(lit.get(c), 1 / math.sqrt(2)))):
            if _op_is(div, "Mul") and is_scalar(lit.get(x), 1 / math.sqrt(2)):
                x, c = c, x
            else:
                return
        if x in lit:
            return
        ai, add = self._sole_consumer(erf.output[0])
        if not _op_is(add, "Add") or not is_scalar(lit.get(_other(add, erf.output[0]) or ""), 1.0):
            return
        m1i, m1 = self._sole_consumer(add.output[0])
        if not _op_is(m1, "Mul"):
            return
        y = _other(m1, add.output[0])
        if y is None:
            return
        chain = [di, idx, ai]
        if y == x:
            m2i, m2 = self._sole_consumer(m1.output[0])
            if not _op_is(m2, "Mul") or not is_scalar(lit.get(_other(m2, m1.output[0]) or ""), 0.5):
                return
            chain.append(m1i)
            last_i, last = m2i, m2
        elif is_scalar(lit.get(y), 0.5):
            m2i, m2 = self._sole_consumer(m1.output[0])
            if not _op_is(m2, "Mul") or _other(m2, m1.output[0]) != x:
                return
            chain.append(m1i)
            last_i, last = m2i, m2
        else:
            hi, half = self._prod(y)
            if not _op_is(half, "Mul") or not self.single_use(y) or _other(half, x) is None \
                    or not is_scalar(lit.get(_other(half, x) or ""), 0.5):
                return
            chain.append(hi)
            last_i, last = m1i, m1
        if last_i in self.fused or any(i in self.fused for i in chain):
            return
        self.skip.update(chain)
        self.fused[last_i] = ("gelu", {"approximate": "none"}, [x], last.name,
                              " + ".join(self.nodes[i].name for i in sorted([*chain, last_i])))

    def recover_adaptive_avgpool(self, idx: int, node: Any) -> bool:
        """An adaptive average pooling to a size that does not divide the input, as torch.export decomposes it:
        ``Transpose(2, 3, 0, 1) -> GatherND -> ...(Where, Gather, Add)... -> Div``. The nodes from the GatherND on
        that depend only on the transposed input and constants are evaluated on a random input; when the region's
        one result is ``adaptive_avg_pool2d`` of it, the region becomes one ``adaptive_avgpool2d`` node (its nodes
        are skipped). Returns whether it did."""
        ti, t = self._prod(node.input[0])
        if not _op_is(t, "Transpose") or list(self.attrs(t).get("perm", [])) != [2, 3, 0, 1] \
                or ti is None or t.input[0] not in self.value:
            return False
        x = self.value[t.input[0]]
        shape = self.shape_of(x)
        if len(shape) != 4:
            return False
        region, members, produced = [ti], {ti}, set(t.output)
        for j in range(idx, min(idx + _MAX_REGION, len(self.nodes))):
            n = self.nodes[j]
            ins = [s for s in n.input if s]
            if not any(s in produced for s in ins):
                continue
            if n.domain not in DEFAULT_DOMAINS or any(s not in produced and s not in self.const for s in ins):
                return False
            region.append(j)
            members.add(j)
            produced.update(o for o in n.output if o)
            open_ = [s for s in produced if s in self.outputs
                     or any(c not in members for c in self.consumers.get(s, []))]
            size = self._adaptive_avgpool_size(region, t.input[0], shape, n.output[0]) \
                if open_ == [n.output[0]] else None
            if size is not None:
                self.skip.update(i for i in region if i > idx)
                self.emit(n, "adaptive_avgpool2d", {"output_size": size}, [x], name=n.name or None,
                          source=f"{t.name} ... {n.name} ({len(region)} nodes)")
                return True
        return False

    def _adaptive_avgpool_size(self, region: list[int], inp: str, shape: tuple[int, ...],
                               out: str) -> tuple[int, int] | None:
        """Evaluate ``region`` (ONNX nodes from ``inp`` to ``out``) on a random input of ``shape``; the output size
        when the result is torch's adaptive average pooling to that size, else None."""
        import onnx
        import torch
        from onnx import helper, numpy_helper
        from onnx.reference import ReferenceEvaluator

        nodes = [self.nodes[i] for i in region]
        inner = {o for n in nodes for o in n.output}
        consts = {s for n in nodes for s in n.input if s and s not in inner and s != inp}
        graph = helper.make_graph(
            nodes, "region", [helper.make_tensor_value_info(inp, onnx.TensorProto.FLOAT, list(shape))],
            [helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None)],
            [numpy_helper.from_array(np.asarray(self.const[s]), s) for s in sorted(consts)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        try:
            y = np.asarray(ReferenceEvaluator(model).run(None, {inp: x})[0])
        except Exception:  # noqa: BLE001 - not evaluable: not the pattern
            return None
        if y.ndim != 4 or y.shape[:2] != shape[:2]:
            return None
        want = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x), y.shape[2:]).numpy()
        return (y.shape[2], y.shape[3]) if np.allclose(y, want, rtol=1e-5, atol=1e-6) else None

    def _match_channel_layernorm(self, idx: int, ln: Any, lit: dict[str, np.ndarray]) -> None:
        """Transpose(0, 2, 3, 1) -> LayerNormalization(axis -1) -> Transpose(0, 3, 1, 2): a channels-first layer
        norm (as ConvNeXt's LayerNorm2d is written)."""
        if len(ln.input) < 2 or any(t and t in self.consumers for t in ln.output[1:]):
            return
        at = self.attrs(ln)
        if at.get("axis", -1) not in (-1, 3) or ln.input[1] not in lit \
                or (len(ln.input) > 2 and ln.input[2] and ln.input[2] not in lit):
            return
        ti, t1 = self._prod(ln.input[0])
        if not _op_is(t1, "Transpose") or list(self.attrs(t1).get("perm", [])) != [0, 2, 3, 1] \
                or not self.single_use(ln.input[0]):
            return
        t2i, t2 = self._sole_consumer(ln.output[0])
        if not _op_is(t2, "Transpose") or list(self.attrs(t2).get("perm", [])) != [0, 3, 1, 2]:
            return
        if ti in self.fused or idx in self.fused or t2i in self.fused:
            return
        self.skip.update([ti, idx])
        info = {"scale": ln.input[1], "bias": ln.input[2] if len(ln.input) > 2 else "",
                "eps": at.get("epsilon", 1e-5)}
        self.fused[t2i] = ("layernorm2d", info, [t1.input[0]], ln.name, f"{t1.name} + {ln.name} + {t2.name}")
