"""Graph IR: registry shape rules against torch, validator, serialisation, codegen behaviour."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx

from automtl_compiler import Graph, load_graph, save_graph, to_torch
from automtl_compiler.errors import (
    AutomtlError,
    FileFormatError,
    GraphError,
    ShapeError,
)
from automtl_compiler.ir import REGISTRY

REQUIRED_OPS = {"conv2d", "batchnorm2d", "relu", "relu6", "clip", "silu", "sigmoid", "hardswish", "hardsigmoid",
                "gelu", "maxpool2d", "avgpool2d", "adaptive_avgpool2d", "adaptive_maxpool2d", "add", "mul", "max",
                "concat", "flatten", "linear", "dropout", "identity", "mean"}


def small_graph() -> Graph:
    g = Graph("small")
    g.add_input("x", (2, 3, 17, 17))
    g.add_node("conv", "conv2d", ["x"], {"out_channels": 8, "kernel_size": 3, "padding": 1, "bias": True})
    g.add_node("bn", "batchnorm2d", ["conv"])
    g.add_node("act", "relu", ["bn"])
    g.add_node("res", "add", ["act", "conv"], {"coeffs": [1.0, -0.5]})
    g.add_node("pool", "maxpool2d", ["res"], {"kernel_size": 3, "stride": 2, "ceil_mode": True})
    g.add_node("se", "adaptive_avgpool2d", ["pool"], {"output_size": 1})
    g.add_node("gate", "sigmoid", ["se"])
    g.add_node("scaled", "mul", ["pool", "gate"])
    g.add_node("cat", "concat", ["scaled", "pool"], {"dim": 1})
    g.add_node("gap", "mean", ["cat"], {"dim": [2, 3]})
    g.add_node("fc", "linear", ["gap"], {"out_features": 5})
    g.set_outputs(["fc"])
    return g.materialise(seed=0)


def test_registry_has_the_required_ops():
    assert REQUIRED_OPS <= set(REGISTRY)
    for op in REGISTRY.values():
        assert op.doc, op.name


@settings(max_examples=60, deadline=None)
@given(size=st.integers(5, 23), k=st.integers(1, 5), s=st.integers(1, 3), p=st.integers(0, 2), d=st.integers(1, 2),
       groups=st.sampled_from([1, 2, 4]), bias=st.booleans())
def test_conv_shape_params_and_flops_match_torch(size, k, s, p, d, groups, bias):
    if size + 2 * p < d * (k - 1) + 1:
        return
    g = Graph()
    g.add_input("x", (1, 4, size, size))
    g.add_node("c", "conv2d", ["x"], {"out_channels": 8, "kernel_size": k, "stride": s, "padding": p,
                                      "dilation": d, "groups": groups, "bias": bias})
    g.set_outputs(["c"])
    g.materialise(seed=1)
    ref = torch.nn.Conv2d(4, 8, k, s, p, d, groups, bias)
    y = ref(torch.zeros(1, 4, size, size))
    assert g.node("c").shape == tuple(y.shape)
    assert g.num_parameters() == sum(t.numel() for t in ref.parameters())
    macs = y.numel() * (4 // groups) * k * k + (y.numel() if bias else 0)
    assert g.flops() == macs


@settings(max_examples=80, deadline=None)
@given(size=st.integers(3, 20), k=st.integers(1, 4), s=st.integers(1, 3), p=st.integers(0, 2),
       ceil=st.booleans(), kind=st.sampled_from(["maxpool2d", "avgpool2d"]))
def test_pool_shape_rule_matches_torch_including_ceil_mode(size, k, s, p, ceil, kind):
    if p > k // 2 or size + 2 * p < k:
        return
    g = Graph()
    g.add_input("x", (1, 2, size, size + 1))
    g.add_node("p", kind, ["x"], {"kernel_size": k, "stride": s, "padding": p, "ceil_mode": ceil})
    g.set_outputs(["p"])
    g.materialise()
    x = torch.randn(1, 2, size, size + 1)
    fn = torch.nn.functional.max_pool2d if kind == "maxpool2d" else torch.nn.functional.avg_pool2d
    ref = fn(x, k, s, p, ceil_mode=ceil)
    assert g.node("p").shape == tuple(ref.shape)
    torch.testing.assert_close(to_torch(g)(x), ref)


def test_codegen_matches_hand_written_reference():
    g = small_graph()
    m = to_torch(g).eval()
    x = torch.randn(2, 3, 17, 17)
    n = {k: g.node(k) for k in ("conv", "bn", "fc")}
    F = torch.nn.functional
    conv = F.conv2d(x, n["conv"].params["weight"], n["conv"].params["bias"], padding=1)
    bn = F.batch_norm(conv, n["bn"].buffers["running_mean"], n["bn"].buffers["running_var"],
                      n["bn"].params["weight"], n["bn"].params["bias"], False, 0.1, 1e-5)
    res = F.relu(bn) - 0.5 * conv
    pool = F.max_pool2d(res, 3, 2, ceil_mode=True)
    scaled = pool * torch.sigmoid(pool.mean((2, 3), keepdim=True))
    feat = torch.cat([scaled, pool], 1).mean((2, 3))
    ref = F.linear(feat, n["fc"].params["weight"], n["fc"].params["bias"])
    torch.testing.assert_close(m(x), ref)
    assert g.node("fc").shape == tuple(ref.shape) == (2, 5)


def test_generated_module_trains_and_is_traceable():
    g = small_graph()
    m = to_torch(g).train()
    x = torch.randn(2, 3, 17, 17)
    m(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    assert m.bn.num_batches_tracked.item() == 1
    assert not torch.equal(m.bn.running_mean, torch.zeros(8))
    assert "def forward" in m.code and "self.conv" in m.code
    traced = fx.symbolic_trace(m.eval())
    torch.testing.assert_close(traced(x), m(x))
    assert torch.equal(g.node("bn").buffers["running_mean"], m.bn.running_mean), "module shares the graph's tensors"
    assert m.conv.weight.data_ptr() == g.node("conv").params["weight"].data_ptr()


def test_save_load_round_trip(tmp_path):
    g = small_graph()
    path = save_graph(g, tmp_path / "g.json")
    assert (tmp_path / "g.safetensors").exists()
    h = load_graph(path)
    assert [n.name for n in h.topological_order()] == [n.name for n in g.topological_order()]
    assert h.num_parameters() == g.num_parameters() and h.flops() == g.flops()
    x = torch.randn(2, 3, 17, 17)
    torch.testing.assert_close(to_torch(h).eval()(x), to_torch(g).eval()(x), rtol=0, atol=0)


def test_load_rejects_corrupt_and_foreign_files(tmp_path):
    path = save_graph(small_graph(), tmp_path / "g.json")
    (tmp_path / "g.safetensors").write_bytes(b"\x80\x04garbage that is not safetensors")
    with pytest.raises(FileFormatError, match="g.safetensors"):
        load_graph(path)
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(FileFormatError, match="not an automtl graph"):
        load_graph(tmp_path / "other.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(FileFormatError, match="bad.json"):
        load_graph(tmp_path / "bad.json")
    with pytest.raises(FileFormatError, match="not found"):
        load_graph(tmp_path / "missing.json")


def test_load_reports_edited_structure(tmp_path):
    path = save_graph(small_graph(), tmp_path / "g.json")
    doc = json.loads(path.read_text())
    doc["nodes"][1]["inputs"] = ["nowhere"]
    path.write_text(json.dumps(doc))
    with pytest.raises(GraphError, match="nowhere"):
        load_graph(path)


def test_validator_reports_each_kind_of_problem():
    g = small_graph()
    g.node("act").inputs = ["ghost"]
    with pytest.raises(GraphError, match="ghost.*dangling"):
        g.validate()

    g = small_graph()
    g.node("conv").shape = (2, 8, 99, 99)
    with pytest.raises(ShapeError, match="conv.*conflicts"):
        g.validate()

    g = small_graph()
    g.node("act").params["stray"] = torch.zeros(3)
    with pytest.raises(GraphError, match="act.*unused tensor.*stray"):
        g.validate()

    g = small_graph()
    g.node("conv").params["weight"] = torch.zeros(8, 3, 5, 5)
    with pytest.raises(ShapeError, match="weight.*expected"):
        g.validate()

    g = small_graph()
    g.nx.add_edge("fc", "conv")
    g.node("conv").inputs.append("fc")
    with pytest.raises(GraphError, match="cycle|takes 1"):
        g.validate()


def test_builder_rejects_bad_nodes():
    g = Graph()
    g.add_input("x", (1, 3, 8, 8))
    with pytest.raises(GraphError, match="unknown op 'conv3d'"):
        g.add_node("c", "conv3d", ["x"])
    with pytest.raises(GraphError, match="needs attribute 'out_channels'"):
        g.add_node("c", "conv2d", ["x"], {"kernel_size": 3})
    with pytest.raises(GraphError, match="no attribute"):
        g.add_node("c", "relu", ["x"], {"inplace": True})
    with pytest.raises(GraphError, match="not produced"):
        g.add_node("c", "relu", ["y"])
    with pytest.raises(GraphError, match="takes 2 to"):
        g.add_node("c", "add", ["x"])
    g.add_node("c", "conv2d", ["x"], {"out_channels": 4, "kernel_size": 3, "groups": 2})
    g.set_outputs(["c"])
    with pytest.raises(ShapeError, match="divisible by groups"):
        g.materialise()
    assert isinstance(ShapeError("x"), AutomtlError)


def test_summary_lists_every_node_and_totals():
    g = small_graph()
    text = g.summary()
    for n in g.nodes():
        assert n.name in text
    assert f"{g.num_parameters():,} parameters" in text
    assert "2x5" in text
