"""Caffe prototxt backend: IR -> prototxt (+ safetensors) -> IR round trips on torchvision models, the
automtl extension layer types, refusals, and the generated models/*.prototxt."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torchvision

from automtl_compiler import Graph, export_prototxt, load_backbone, to_torch
from automtl_compiler.errors import GraphError, UnsupportedOpError
from automtl_compiler.frontends.prototxt import load_prototxt
from tests.helpers import randomised

ROOT = Path(__file__).resolve().parents[2]
TORCHVISION_MODELS = ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "mnasnet1_0")
MODELS = TORCHVISION_MODELS + ("deeplab_resnet34",)



def same_attrs(a: dict, b: dict) -> bool:
    """Attributes equal, floats up to float32 precision (Caffe's fields are float)."""
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, float):
            if not math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-12):
                return False
        elif isinstance(x, tuple) and x and isinstance(x[0], float):
            if not all(math.isclose(u, v, rel_tol=1e-6) for u, v in zip(x, y)) or len(x) != len(y):
                return False
        elif x != y:
            return False
    return True


def assert_same_graph(g: Graph, h: Graph) -> None:
    gn, hn = g.topological_order(), h.topological_order()
    assert len(g) == len(h)
    assert [(n.name, n.op, n.inputs) for n in gn] == [(n.name, n.op, n.inputs) for n in hn]
    for a, b in zip(gn, hn):
        assert same_attrs(a.attrs, b.attrs), (a.name, a.attrs, b.attrs)
        assert a.shape == b.shape, a.name
    assert g.outputs == h.outputs
    assert g.num_parameters() == h.num_parameters()


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "mnasnet1_0"])
def test_round_trip_torchvision(tmp_path, name):
    shape = (2, 3, 64, 64)
    graph = load_backbone(randomised(name), input_shape=shape)
    path = export_prototxt(graph, tmp_path / f"{name}.prototxt")
    sidecar = tmp_path / f"{name}.safetensors"
    assert path == tmp_path / f"{name}.prototxt" and sidecar.exists()
    back = load_prototxt(path, weights=sidecar)
    assert_same_graph(graph, back)
    x = torch.randn(*shape)
    with torch.no_grad():
        torch.testing.assert_close(to_torch(back).eval()(x), to_torch(graph).eval()(x), rtol=0, atol=1e-5)
    # the sidecar is used only when passed: without it the tensors are freshly initialised
    fresh = load_prototxt(path)
    bn = next(n.name for n in graph.nodes() if n.op == "batchnorm2d")
    assert torch.equal(fresh.node(bn).buffers["running_var"], torch.ones_like(graph.node(bn).buffers["running_var"]))
    assert not torch.equal(back.node(bn).buffers["running_var"], fresh.node(bn).buffers["running_var"])


def test_mean_is_written_as_global_pool_and_flatten(tmp_path):
    graph = load_backbone(torchvision.models.get_model("mnasnet1_0", weights=None), input_shape=(1, 3, 32, 32))
    text = export_prototxt(graph, tmp_path / "m.prototxt", weights=False).read_text()
    assert not (tmp_path / "m.safetensors").exists()
    assert 'name: "mean"\n  type: "Pooling"' in text and 'name: "mean/flatten"\n  type: "Flatten"' in text
    assert "global_pooling: true" in text
    back = load_prototxt(tmp_path / "m.prototxt")
    assert back.node("mean").op == "mean" and "mean/flatten" not in back


def extension_graph() -> Graph:
    g = Graph("ext")
    g.add_input("x", (2, 4, 9, 11))
    g.add_node("conv", "conv2d", ["x"], {"out_channels": 8, "kernel_size": (3, 1), "padding": (1, 0),
                                         "stride": (2, 1), "dilation": (1, 2), "groups": 2, "bias": True})
    g.add_node("bn", "batchnorm2d", ["conv"], {"affine": False, "eps": 1e-3, "momentum": 0.3})
    g.add_node("bn_nostats", "batchnorm2d", ["bn"], {"track_running_stats": False})
    g.add_node("silu", "silu", ["bn_nostats"])
    g.add_node("hswish", "hardswish", ["silu"])
    g.add_node("hsig", "hardsigmoid", ["hswish"])
    g.add_node("gelu", "gelu", ["hsig"])
    g.add_node("ident", "identity", ["gelu"])
    g.add_node("sd", "stochastic_depth", ["ident"], {"p": 0.1})
    g.add_node("lrelu", "leaky_relu", ["sd"], {"negative_slope": 0.1})
    g.add_node("clip", "clip", ["lrelu"], {"min": -0.5, "max": 2.0})
    g.add_node("tanh", "tanh", ["clip"])
    g.add_node("relu6", "relu6", ["tanh"])
    g.add_node("drop", "dropout", ["relu6"], {"p": 0.3})
    g.add_node("mp", "maxpool2d", ["drop"], {"kernel_size": (2, 3), "stride": (1, 2), "padding": (1, 1)})
    g.add_node("ap", "avgpool2d", ["mp"], {"kernel_size": 2, "stride": 2, "ceil_mode": True})
    g.add_node("gate", "adaptive_maxpool2d", ["ap"], {"output_size": 1})
    g.add_node("sig", "sigmoid", ["gate"])
    g.add_node("se", "mul", ["ap", "sig"])                   # broadcasting product
    g.add_node("mx", "max", ["se", "ap"])
    g.add_node("sum", "add", ["mx", "se", "ap"], {"coeffs": [1.0, -0.25, 3.0]})
    g.add_node("plain", "add", ["sum", "ap"])
    g.add_node("cat", "concat", ["plain", "sum"], {"dim": -3})
    g.add_node("gap", "adaptive_avgpool2d", ["cat"], {"output_size": (1, 1)})
    g.add_node("flat", "flatten", ["gap"], {"start_dim": 1, "end_dim": 3})
    g.add_node("fc", "linear", ["flat"], {"out_features": 5, "bias": False})
    g.add_node("relu", "relu", ["fc"])
    g.set_outputs(["relu"])
    g.materialise(seed=0)
    gen = torch.Generator().manual_seed(5)
    for n in g.nodes():
        if "running_var" in n.buffers:
            n.buffers["running_var"] = torch.rand(n.buffers["running_var"].shape, generator=gen) + 0.5
            n.buffers["running_mean"] = torch.randn(n.buffers["running_mean"].shape, generator=gen)
    return g


def test_extension_types_round_trip(tmp_path):
    graph = extension_graph()
    path = export_prototxt(graph, tmp_path / "ext.prototxt")
    text = path.read_text()
    for kind in ("Swish", "HardSwish", "HardSigmoid", "GELU", "Identity", "StochasticDepth", "ReLU6", "Clip",
                 "TanH", "Dropout", "kernel_h: 3", "stride_w: 1", "dilation: 1\n    dilation: 2", "group: 2",
                 "round_mode: FLOOR", "round_mode: CEIL", "coeff: -0.25", "operation: PROD", "operation: MAX",
                 "affine: false", "track_running_stats: false", "negative_slope: 0.1", "end_axis: 3"):
        assert kind in text, kind
    back = load_prototxt(path, weights=path.with_suffix(".safetensors"))
    assert_same_graph(graph, back)
    x = torch.randn(2, 4, 9, 11)
    with torch.no_grad():
        torch.testing.assert_close(to_torch(back).eval()(x), to_torch(graph).eval()(x), rtol=0, atol=1e-6)


def test_mean_with_keepdim_reads_back_as_global_average(tmp_path):
    g = Graph("m")
    g.add_input("x", (1, 3, 5, 5))
    g.add_node("m", "mean", ["x"], {"dim": [-1, -2], "keepdim": True})
    g.set_outputs(["m"])
    back = load_prototxt(export_prototxt(g.materialise(), tmp_path / "m.prototxt"))
    assert back.node("m").op == "adaptive_avgpool2d" and back.node("m").shape == (1, 3, 1, 1)


def one_node(op: str, attrs: dict, shape=(1, 4, 6, 6)) -> Graph:
    g = Graph("one")
    g.add_input("x", shape)
    g.add_node("n", op, ["x"], attrs)
    g.set_outputs(["n"])
    return g.materialise()


@pytest.mark.parametrize("op", ["adaptive_avgpool2d", "adaptive_maxpool2d"])
def test_adaptive_pooling_to_any_size_round_trips(tmp_path, op):
    g = one_node(op, {"output_size": (3, 2)}, shape=(1, 4, 7, 9))
    path = export_prototxt(g, tmp_path / "a.prototxt")
    assert "adaptive_output_size: 3" in path.read_text()
    back = load_prototxt(path)
    assert back.node("n").op == op and back.node("n").attrs["output_size"] == (3, 2)
    x = torch.randn(1, 4, 7, 9)
    torch.testing.assert_close(to_torch(back)(x), to_torch(g)(x))


def test_vgg16_bn_round_trips(tmp_path):
    graph = load_backbone(torchvision.models.vgg16_bn().eval(), input_shape=(1, 3, 64, 64))
    path = export_prototxt(graph, tmp_path / "vgg.prototxt")
    back = load_prototxt(path, weights=path.with_suffix(".safetensors"))
    assert [n.op for n in back.topological_order()] == [n.op for n in graph.topological_order()]
    assert back.num_parameters() == graph.num_parameters() == 138_365_992


@pytest.mark.parametrize("op,attrs,match", [
    ("gelu", {"approximate": "tanh"}, "approximate='tanh'"),
    ("stochastic_depth", {"p": 0.1, "mode": "batch"}, "mode='batch'"),
    ("mean", {"dim": [1]}, r"mean over dims \[1\]"),
    ("maxpool2d", {"kernel_size": 2, "dilation": 2}, r"dilation \[2, 2\]"),
    ("avgpool2d", {"kernel_size": 3, "padding": 1, "count_include_pad": False}, "count_include_pad"),
])
def test_export_refuses_what_the_schema_cannot_carry(tmp_path, op, attrs, match):
    with pytest.raises(UnsupportedOpError, match=match):
        export_prototxt(one_node(op, attrs), tmp_path / "x.prototxt")
    assert not (tmp_path / "x.prototxt").exists() and not (tmp_path / "x.safetensors").exists()


def test_export_refuses_outputs_that_are_also_read(tmp_path):
    g = Graph("two")
    g.add_input("x", (1, 2, 3, 3))
    g.add_node("a", "relu", ["x"])
    g.add_node("b", "sigmoid", ["a"])
    g.set_outputs(["a", "b"])
    with pytest.raises(GraphError, match=r"outputs \['a', 'b'\].*\['b'\]"):
        export_prototxt(g.materialise(), tmp_path / "two.prototxt")


# ---------------------------------------------------------------- models/


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_models_load_with_torchvision_parameter_counts(name):
    path = ROOT / "models" / f"{name}.prototxt"
    assert path.read_text().startswith("# Generated by `python tools/gen_models.py`")
    graph = load_prototxt(path)
    model = torchvision.models.get_model(name, weights=None)
    assert graph.num_parameters() == sum(p.numel() for p in model.parameters())
    assert graph.node(graph.outputs[0]).shape == (1, 1000)


def test_deeplab_resnet34_matches_automtl_structure():
    """AutoMTL's DeepLab ResNet-34: 36 convs, dilation 2 and 4, output stride 8, 21,284,672 parameters."""
    graph = load_prototxt(ROOT / "models" / "deeplab_resnet34.prototxt", input_shape=(1, 3, 226, 226))
    assert graph.num_parameters() == 21_284_672
    convs = [n for n in graph.topological_order() if n.op == "conv2d"]
    assert len(convs) == 36 and sorted({n.attrs["dilation"][0] for n in convs}) == [1, 2, 4]
    assert graph.node(graph.outputs[0]).shape == (1, 512, 29, 29)
    assert [n.attrs["ceil_mode"] for n in graph.topological_order() if n.op == "maxpool2d"] == [True]


def gen_models():
    spec = importlib.util.spec_from_file_location("gen_models", ROOT / "tools" / "gen_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_models_are_up_to_date(tmp_path):
    tool = gen_models()
    assert tuple(tool.MODELS) == MODELS
    for name in MODELS:
        fresh = tool.generate(name, tmp_path)
        assert fresh.read_text() == (ROOT / "models" / f"{name}.prototxt").read_text(), \
            f"models/{name}.prototxt is stale: run python tools/gen_models.py"
    assert not list(tmp_path.glob("*.safetensors"))
