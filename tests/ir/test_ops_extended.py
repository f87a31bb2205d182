"""The ops added for timm/ONNX/Caffe coverage: each op's lowering against an independent formula written
here, its shape rule against the tensor it produces, and its ONNX export against onnxruntime."""

from __future__ import annotations

import math

import pytest
import torch

from automtl_compiler import Graph, to_torch
from automtl_compiler.backends.onnx_export import export_graph_onnx
from automtl_compiler.errors import GraphError, ShapeError

torch.manual_seed(0)
X = torch.randn(2, 6, 7, 5)


def _lrn_across(x: torch.Tensor, n: int, alpha: float, beta: float, k: float) -> torch.Tensor:
    sq = x * x
    out = torch.empty_like(x)
    c = x.shape[1]
    for i in range(c):
        lo, hi = max(0, i - (n - 1) // 2), min(c, i + n // 2 + 1)
        out[:, i] = x[:, i] / (k + alpha / n * sq[:, lo:hi].sum(1)) ** beta
    return out


def _lrn_within(x: torch.Tensor, n: int, alpha: float, beta: float, k: float) -> torch.Tensor:
    h, w = x.shape[2:]
    p = (n - 1) // 2
    padded = torch.nn.functional.pad(x * x, (p, p, p, p))
    out = torch.empty_like(x)
    for i in range(h):
        for j in range(w):
            s = padded[:, :, i:i + n, j:j + n].sum((2, 3))
            out[:, :, i, j] = x[:, :, i, j] / (k + alpha / (n * n) * s) ** beta
    return out


def _layer_norm(x: torch.Tensor, dim: int, eps: float) -> torch.Tensor:
    mean = x.mean(dim, keepdim=True)
    var = ((x - mean) ** 2).mean(dim, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def _group_norm(x: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    g = x.reshape(x.shape[0], groups, -1)
    return _layer_norm(g, 2, eps).reshape_as(x)


CASES = [
    ("slice", {"dim": 1, "start": 1, "end": 5, "step": 2}, lambda x: x[:, 1:5:2]),
    ("slice", {"dim": -1, "start": -3}, lambda x: x[..., -3:]),
    ("reshape", {"shape": [3, -1]}, lambda x: x.reshape(2, 3, 70)),
    ("permute", {"dims": [0, 2, 3, 1]}, lambda x: x.permute(0, 2, 3, 1)),
    ("resize", {"size": [14, 10]}, lambda x: x.repeat_interleave(2, 2).repeat_interleave(2, 3)),
    ("resize", {"size": [13, 9], "mode": "bilinear", "align_corners": True},
     lambda x: torch.nn.functional.interpolate(x, size=(13, 9), mode="bilinear", align_corners=True)),
    ("softmax", {"dim": 1}, lambda x: x.exp() / x.exp().sum(1, keepdim=True)),
    ("sum", {"dim": [2, 3], "keepdim": True}, lambda x: x.sum((2, 3), keepdim=True)),
    ("amax", {"dim": [1]}, lambda x: x.max(1).values),
    ("layernorm", {"dim": 1, "eps": 1e-6}, lambda x: _layer_norm(x, 1, 1e-6)),
    ("layernorm", {"dim": -1, "eps": 1e-5}, lambda x: _layer_norm(x, -1, 1e-5)),
    ("groupnorm", {"num_groups": 3}, lambda x: _group_norm(x, 3, 1e-5)),
    ("lrn", {"size": 3, "alpha": 0.1, "beta": 0.75, "k": 2.0}, lambda x: _lrn_across(x, 3, 0.1, 0.75, 2.0)),
    ("lrn", {"size": 5, "alpha": 0.2, "beta": 0.6}, lambda x: _lrn_across(x, 5, 0.2, 0.6, 1.0)),
    ("lrn", {"size": 3, "alpha": 0.3, "beta": 0.75, "region": "within"}, lambda x: _lrn_within(x, 3, 0.3, 0.75, 1.0)),
    ("affine", {"scale": 0.5, "shift": 3.0, "power": 2.0}, lambda x: (0.5 * x + 3.0) ** 2),
    ("pad", {"pads": [1, 2, 0, 3], "mode": "reflect"},
     lambda x: torch.cat([x[..., 1:2], x, x[..., -2:-1], x[..., -3:-2]], 3)[:, :, [*range(7), 5, 4, 3]]),
    ("pad", {"pads": [1, 0, 2, 0], "mode": "constant", "value": 1.5},
     lambda x: torch.nn.functional.pad(x, (1, 0, 2, 0), value=1.5)),
    ("exp", {}, torch.exp), ("abs", {}, torch.abs), ("erf", {}, lambda x: torch.tensor(
        [math.erf(v) for v in x.flatten().tolist()]).reshape(x.shape)),
    ("mish", {}, lambda x: x * torch.tanh(torch.log1p(torch.exp(x)))),
    ("softplus", {"beta": 2.0}, lambda x: torch.log1p(torch.exp(2 * x)) / 2),
    ("elu", {"alpha": 0.5}, lambda x: torch.where(x > 0, x, 0.5 * (torch.exp(x) - 1))),
]


def _single(op: str, attrs: dict, shape: tuple[int, ...] = tuple(X.shape), inputs: int = 1) -> Graph:
    g = Graph(op)
    names = [g.add_input(f"x{i}", shape).name for i in range(inputs)]
    g.add_node("y", op, names, attrs)
    g.set_outputs(["y"])
    return g.materialise(seed=0)


@pytest.mark.parametrize(("op", "attrs", "reference"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_lowering_matches_an_independent_formula(op, attrs, reference):
    g = _single(op, attrs)
    y = to_torch(g)(X)
    want = reference(X)
    assert tuple(y.shape) == g.node("y").shape == tuple(want.shape)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["slice", "reshape", "permute", "resize", "softmax", "layernorm", "lrn", "pad"])
def test_new_ops_export_to_onnx_and_match_onnxruntime(op, tmp_path):
    attrs = next(a for o, a, _ in CASES if o == op)
    export_graph_onnx(_single(op, attrs), tmp_path / f"{op}.onnx")  # raises if onnxruntime disagrees
    assert (tmp_path / f"{op}.onnx").stat().st_size > 0


def test_binary_ops_broadcast_and_tensor_constants():
    g = Graph("binary")
    g.add_input("x", (2, 3, 4, 4))
    c = torch.tensor([1.0, 2.0, 4.0]).reshape(1, 3, 1, 1)
    g.add_node("c", "tensor", [], {"shape": [1, 3, 1, 1]}, buffers={"value": c})
    g.add_node("s", "sub", ["x", "c"])
    g.add_node("d", "div", ["s", "c"])
    g.set_outputs(["d"])
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(to_torch(g.materialise(seed=None))(x), (x - c) / c)


def test_trainable_tensor_is_a_parameter_and_buffers_are_not():
    g = Graph("gamma")
    g.add_input("x", (1, 3, 2, 2))
    g.add_node("gamma", "tensor", [], {"shape": [3, 1, 1], "trainable": True}, params={"value": torch.ones(3, 1, 1)})
    g.add_node("y", "mul", ["x", "gamma"])
    g.set_outputs(["y"])
    m = to_torch(g.materialise(seed=None))
    assert [tuple(p.shape) for p in m.parameters()] == [(3, 1, 1)]


def test_standardised_conv_matches_the_formula_and_trains():
    g = Graph("std")
    g.add_input("x", (1, 4, 6, 6))
    g.add_node("conv", "conv2d", ["x"], {"out_channels": 5, "kernel_size": 3, "padding": 1, "weight_std": 1e-5,
                                         "weight_gain": True, "weight_scale": 0.25})
    g.set_outputs(["conv"])
    g = g.materialise(seed=3)
    node = g.node("conv")
    node.params["gain"] = torch.linspace(0.5, 2.0, 5).reshape(5, 1, 1, 1)
    w = node.params["weight"]
    flat = w.reshape(5, -1)
    ws = ((flat - flat.mean(1, keepdim=True)) / torch.sqrt(flat.var(1, unbiased=False, keepdim=True) + 1e-5))
    ws = ws.reshape_as(w) * 0.25 * node.params["gain"]
    x = torch.randn(1, 4, 6, 6)
    m = to_torch(g)
    torch.testing.assert_close(m(x), torch.nn.functional.conv2d(x, ws, padding=1), rtol=1e-5, atol=1e-5)
    m(x).sum().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_linear_over_the_last_dim_and_prelu_and_transposed_conv():
    g = Graph("misc")
    g.add_input("x", (2, 3, 5, 5))
    g.add_node("t", "conv_transpose2d", ["x"], {"out_channels": 4, "kernel_size": 3, "stride": 2, "padding": 1,
                                                "output_padding": 1, "bias": True})
    g.add_node("p", "prelu", ["t"], {"num_parameters": 4})
    g.add_node("nhwc", "permute", ["p"], {"dims": [0, 2, 3, 1]})
    g.add_node("fc", "linear", ["nhwc"], {"out_features": 7})
    g.set_outputs(["fc"])
    g = g.materialise(seed=1)
    x = torch.randn(2, 3, 5, 5)
    t, p, fc = g.node("t").params, g.node("p").params, g.node("fc").params
    y = torch.nn.functional.conv_transpose2d(x, t["weight"], t["bias"], stride=2, padding=1, output_padding=1)
    y = torch.where(y > 0, y, p["weight"].reshape(1, 4, 1, 1) * y)
    y = y.permute(0, 2, 3, 1) @ fc["weight"].T + fc["bias"]
    assert g.node("fc").shape == (2, 10, 10, 7)
    torch.testing.assert_close(to_torch(g)(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("op", "attrs", "error", "text"), [
    ("slice", {"dim": 1, "start": 9}, ShapeError, "is empty"),
    ("slice", {"dim": 0, "start": 1}, ShapeError, "batch dimension"),
    ("reshape", {"shape": [4, -1]}, ShapeError, "cannot reshape"),
    ("reshape", {"shape": [-1, -1]}, ShapeError, "at most one"),
    ("permute", {"dims": [0, 1, 1, 2]}, GraphError, "not a permutation"),
    ("groupnorm", {"num_groups": 4}, ShapeError, "do not split"),
    ("lrn", {"size": 4, "region": "within"}, GraphError, "odd size"),
    ("pad", {"pads": [-1, 0, 0, 0], "mode": "reflect"}, GraphError, "need mode 'constant'"),
    ("conv2d", {"out_channels": 2, "kernel_size": 1, "weight_gain": True}, GraphError, "need 'weight_std'"),
])
def test_bad_attributes_are_named_errors(op, attrs, error, text):
    with pytest.raises(error, match=text):
        _single(op, attrs)


def test_layer_norm_without_affine_matches_and_exports(tmp_path):
    g = _single("layernorm", {"dim": 1, "affine": False})
    torch.testing.assert_close(to_torch(g)(X), _layer_norm(X, 1, 1e-6), rtol=1e-5, atol=1e-5)
    export_graph_onnx(g, tmp_path / "ln.onnx")


def test_folding_weight_standardisation_keeps_the_function():
    from automtl_compiler.passes.fold_weights import fold_weight_standardisation

    g = Graph("std")
    g.add_input("x", (1, 3, 5, 5))
    g.add_node("conv", "conv2d", ["x"], {"out_channels": 4, "kernel_size": 3, "weight_std": 1e-4,
                                         "weight_gain": True, "weight_scale": 0.5})
    g.set_outputs(["conv"])
    g = g.materialise(seed=2)
    g.node("conv").params["gain"] = torch.rand(4, 1, 1, 1) + 0.5
    folded, changed = fold_weight_standardisation(g)
    assert changed and folded.node("conv").attrs["weight_std"] is None and "gain" not in folded.node("conv").params
    x = torch.randn(1, 3, 5, 5)
    torch.testing.assert_close(to_torch(folded)(x), to_torch(g)(x), rtol=1e-5, atol=1e-5)
    assert fold_weight_standardisation(folded)[1] is False
