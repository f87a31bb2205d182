"""export_prototxt(dialect="caffe"): upstream Caffe's BatchNorm + Scale layers and a binary .caffemodel.

References are independent of the exporter: the torch modules themselves (their outputs and parameter
shapes), upstream Caffe's blob layout written out by hand, and the field-number convention of
proto/caffe.proto (AutoMTL extensions are numbered 100-199 inside the ``*Parameter`` messages).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from automtl_compiler.proto import caffe_pb2
from click.testing import CliRunner
from google.protobuf.message import Message
from torch import nn

from automtl_compiler import Graph, export_prototxt, load_backbone, to_torch
from automtl_compiler.backends import caffe_model
from automtl_compiler.backends import prototxt as backend
from automtl_compiler.errors import AutomtlError, UnsupportedOpError
from automtl_compiler.frontends.prototxt import load_prototxt
from tests.helpers import randomised

SHAPE = (1, 3, 64, 64)
#: Layer types of upstream BVLC Caffe that the caffe dialect may write.
UPSTREAM_TYPES = {"Input", "Convolution", "Deconvolution", "InnerProduct", "BatchNorm", "Scale", "ReLU", "PReLU",
                  "ELU", "Clip", "Swish", "Sigmoid", "TanH", "AbsVal", "Exp", "Log", "BNLL", "Power", "Dropout",
                  "Pooling", "LRN", "Eltwise", "Concat", "Flatten", "Reshape", "Slice", "Silence", "Softmax"}


def parse_text(path: Path) -> caffe_pb2.NetParameter:
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), caffe_pb2.NetParameter())


def parse_binary(path: Path) -> caffe_pb2.NetParameter:
    return caffe_pb2.NetParameter.FromString(path.read_bytes())


def extension_fields(message, owner: str = "NetParameter") -> list[str]:
    """AutoMTL fields set anywhere in ``message``: numbers 100-199 inside a ``*Parameter`` other than Layer/Net."""
    found = []
    for field, value in message.ListFields():
        if owner.endswith("Parameter") and owner not in ("LayerParameter", "NetParameter") and field.number >= 100:
            found.append(f"{owner}.{field.name}")
        if field.message_type is not None:
            values = [value] if isinstance(value, Message) else value
            for v in values:
                found += extension_fields(v, field.message_type.name)
    return found


def bn_graph() -> Graph:
    """conv -> affine bn (its sole reader: in place) -> relu; conv2 read by a non-affine bn and a sigmoid."""
    g = Graph("bn")
    g.add_input("x", (2, 3, 8, 8))
    g.add_node("conv", "conv2d", ["x"], {"out_channels": 4, "kernel_size": 3, "padding": 1, "bias": True})
    g.add_node("bn", "batchnorm2d", ["conv"], {"eps": 1e-3, "momentum": 0.25})
    g.add_node("relu", "relu", ["bn"])
    g.add_node("conv2", "conv2d", ["relu"], {"out_channels": 4, "kernel_size": 1})
    g.add_node("plain", "batchnorm2d", ["conv2"], {"affine": False})
    g.add_node("gate", "sigmoid", ["conv2"])
    g.add_node("out", "add", ["plain", "gate"])
    g.set_outputs(["out"])
    g.materialise(seed=0)
    gen = torch.Generator().manual_seed(3)
    for n in g.nodes():
        for t in {**n.params, **n.buffers}.values():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
    return g


def test_batch_norm_is_upstream_batchnorm_then_scale_in_place(tmp_path):
    path = export_prototxt(bn_graph(), tmp_path / "bn.prototxt", dialect="caffe", weights=False)
    layers = {layer.name: layer for layer in parse_text(path).layer}
    names = list(layers)
    assert names == ["x", "conv", "bn", "bn/scale", "relu", "conv2", "plain", "gate", "out"]
    bn, scale = layers["bn"], layers["bn/scale"]
    assert (bn.type, list(bn.bottom), list(bn.top)) == ("BatchNorm", ["conv"], ["conv"])
    assert (scale.type, list(scale.bottom), list(scale.top)) == ("Scale", ["conv"], ["conv"])
    assert scale.scale_param.bias_term and layers["relu"].bottom == ["conv"]
    p = bn.batch_norm_param
    assert p.use_global_stats and math.isclose(p.eps, 1e-3, rel_tol=1e-6)
    assert math.isclose(p.moving_average_fraction, 0.75, rel_tol=1e-6)
    # conv2 is also read by the sigmoid, so its batch norm needs a top of its own; not affine: no Scale
    plain = layers["plain"]
    assert (plain.type, list(plain.bottom), list(plain.top)) == ("BatchNorm", ["conv2"], ["plain"])
    assert "plain/scale" not in layers and list(layers["out"].bottom) == ["plain", "gate"]
    assert extension_fields(parse_text(path)) == []
    text = path.read_text()
    assert 'type: "BatchNorm"' in text and "affine" not in text and "track_running_stats" not in text


def test_graph_round_trips_with_the_same_attributes_and_numbers(tmp_path):
    graph = bn_graph()
    path = export_prototxt(graph, tmp_path / "bn.prototxt", dialect="caffe")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bn.caffemodel", "bn.prototxt"]
    back = load_prototxt(path, weights=tmp_path / "bn.caffemodel")
    assert [(n.name, n.op, n.inputs) for n in back.topological_order()] == \
        [(n.name, n.op, n.inputs) for n in graph.topological_order()]
    for name in ("bn", "plain"):
        a, b = graph.node(name).attrs, back.node(name).attrs
        assert a.keys() == b.keys() and all(math.isclose(a[k], b[k], rel_tol=1e-6) for k in a), (a, b)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(to_torch(back).eval()(x), to_torch(graph).eval()(x), rtol=0, atol=0)


def expected_blobs(model: nn.Module) -> dict[str, list[list[int]]]:
    """Upstream Caffe's blob shapes per layer, from the torch modules (layer = module path with '_')."""
    out: dict[str, list[list[int]]] = {}
    for name, m in model.named_modules():
        layer = name.replace(".", "_")
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.PReLU)):
            out[layer] = [list(m.weight.shape)] + ([list(m.bias.shape)] if getattr(m, "bias", None) is not None
                                                   else [])
        elif isinstance(m, nn.BatchNorm2d):
            out[layer] = [[m.num_features], [m.num_features], [1]]
            if m.affine:
                out[f"{layer}/scale"] = [[m.num_features], [m.num_features]]
    return out


class Mixed(nn.Module):
    """Every layer kind with blobs: grouped conv, BN, PReLU (per channel and shared), deconvolution, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, groups=1, bias=True)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.PReLU(8)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2, groups=2, bias=True)
        self.norm = nn.BatchNorm2d(6, affine=False)
        self.shared = nn.PReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.shared(self.norm(self.up(self.act(self.bn(self.conv(x))))))
        return self.fc(torch.flatten(self.pool(y), 1))


def mixed() -> nn.Module:
    torch.manual_seed(0)
    model = Mixed()
    with torch.no_grad():
        for bn in (model.bn, model.norm):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.2, 0.2)
        model.act.weight.uniform_(-0.5, 0.5)
        model.shared.weight.fill_(-0.3)
    return model.eval()


def blob_values(blob) -> torch.Tensor:
    return torch.from_numpy(np.asarray(blob.data, dtype=np.float32)).reshape(tuple(blob.shape.dim))


@pytest.mark.parametrize("name", ["mixed", "resnet18", "mobilenet_v2"])
def test_caffemodel_holds_caffe_blobs_and_round_trips(tmp_path, name):
    model = mixed() if name == "mixed" else randomised(name)
    shape = (1, 3, 8, 8) if name == "mixed" else SHAPE
    graph = load_backbone(model, input_shape=shape)
    path = export_prototxt(graph, tmp_path / f"{name}.prototxt", dialect="caffe")
    weights = tmp_path / f"{name}.caffemodel"
    net = parse_binary(weights)
    blobs = {layer.name: [list(b.shape.dim) for b in layer.blobs] for layer in net.layer if layer.blobs}
    assert blobs == expected_blobs(model)
    assert [(a.name, a.type, list(a.bottom), list(a.top)) for a in net.layer] == \
        [(a.name, a.type, list(a.bottom), list(a.top)) for a in parse_text(path).layer]
    modules = {k.replace(".", "_"): m for k, m in model.named_modules()}
    for layer in net.layer:
        if layer.type == "BatchNorm":
            bn = modules[layer.name]
            assert torch.equal(blob_values(layer.blobs[0]), bn.running_mean)
            assert torch.equal(blob_values(layer.blobs[1]), bn.running_var)
            assert blob_values(layer.blobs[2]).tolist() == [1.0]
        elif layer.type == "Scale":
            bn = modules[layer.name.removesuffix("/scale")]
            assert torch.equal(blob_values(layer.blobs[0]), bn.weight.detach())
            assert torch.equal(blob_values(layer.blobs[1]), bn.bias.detach())
        elif layer.blobs:
            assert torch.equal(blob_values(layer.blobs[0]), modules[layer.name].weight.detach())
    back = load_prototxt(path, weights=weights)
    x = torch.randn(*shape)
    with torch.no_grad():
        torch.testing.assert_close(to_torch(back).eval()(x), model(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(to_torch(back).eval()(x), to_torch(graph).eval()(x), rtol=0, atol=0)
    assert extension_fields(parse_text(path)) == [] and {a.type for a in net.layer} <= UPSTREAM_TYPES
    relu6 = {n.name for n in graph.nodes() if n.op == "relu6"}
    assert {n.name for n in back.nodes() if n.op == "clip"} == relu6 and (name != "mobilenet_v2" or relu6)
    for node in graph.nodes():
        twin = back.node(node.name)
        for key, tensor in node.params.items():
            assert torch.equal(twin.params[key], tensor), (node.name, key)
        for key, tensor in node.buffers.items():
            if key != "num_batches_tracked":
                assert torch.equal(twin.buffers[key], tensor), (node.name, key)


def test_the_automtl_dialect_stays_the_default(tmp_path):
    path = export_prototxt(bn_graph(), tmp_path / "bn.prototxt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bn.prototxt", "bn.safetensors"]
    assert "BatchNormParameter.affine" in extension_fields(parse_text(path))
    assert 'type: "Scale"' not in path.read_text()


def test_weights_format_can_be_chosen(tmp_path):
    graph = bn_graph()
    caffe = export_prototxt(graph, tmp_path / "c.prototxt", dialect="caffe", weights="safetensors")
    automtl = export_prototxt(graph, tmp_path / "a.prototxt", weights="caffemodel")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.caffemodel", "a.prototxt", "c.prototxt",
                                                          "c.safetensors"]
    # the AutoMTL one-layer batch norm keeps its weight and bias as blobs 4 and 5
    blobs = {a.name: [list(b.shape.dim) for b in a.blobs] for a in parse_binary(tmp_path / "a.caffemodel").layer}
    assert blobs["bn"] == [[4], [4], [1], [4], [4]] and blobs["plain"] == [[4], [4], [1]]
    x = torch.randn(2, 3, 8, 8)
    want = to_torch(graph).eval()(x)
    for back in (load_prototxt(caffe, weights=tmp_path / "c.safetensors"),
                 load_prototxt(automtl, weights=tmp_path / "a.caffemodel")):
        torch.testing.assert_close(to_torch(back).eval()(x), want, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs,match", [
    ({"dialect": "bvlc"}, "dialect='bvlc'"),
    ({"weights": "onnx"}, "weights='onnx'"),
])
def test_bad_options_are_refused(tmp_path, kwargs, match):
    with pytest.raises(AutomtlError, match=match):
        export_prototxt(bn_graph(), tmp_path / "x.prototxt", **kwargs)
    assert list(tmp_path.iterdir()) == []


def one_node(op: str, attrs: dict, shape=(1, 4, 6, 6), second: bool = False) -> Graph:
    g = Graph("one")
    g.add_input("x", shape)
    inputs = ["x"]
    if second:
        g.add_node("gap", "adaptive_avgpool2d", ["x"], {"output_size": 1})
        inputs.append("gap")
    g.add_node("n", op, inputs, attrs)
    g.set_outputs(["n"])
    return g.materialise()


def precious(tmp_path: Path) -> dict[str, bytes]:
    """Files a failed export must leave exactly as they were."""
    files = {"x.prototxt": b"my network", "x.caffemodel": b"my weights"}
    tmp_path.mkdir(exist_ok=True)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return files


def untouched(tmp_path: Path, files: dict[str, bytes]) -> bool:
    return {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files


@pytest.mark.parametrize("op,attrs,second,match", [
    ("hardswish", {}, False, "no HardSwish layer"),
    ("identity", {}, False, "no Identity layer"),
    ("gelu", {}, False, "no GELU layer"),
    ("batchnorm2d", {"track_running_stats": False}, False, "without running statistics"),
    ("adaptive_avgpool2d", {"output_size": (3, 2)}, False, r"adaptive pooling to \[3, 2\]"),
    ("mul", {}, True, "broadcasting Eltwise"),
])
def test_caffe_dialect_refuses_what_upstream_cannot_read(tmp_path, op, attrs, second, match):
    graph = one_node(op, attrs, second=second)
    files = precious(tmp_path)
    with pytest.raises(UnsupportedOpError, match=match):
        export_prototxt(graph, tmp_path / "x.prototxt", dialect="caffe")
    assert untouched(tmp_path, files)
    export_prototxt(graph, tmp_path / "ok.prototxt")   # the automtl dialect writes them


def test_a_caffemodel_over_2_gib_is_refused_before_writing(tmp_path):
    g = Graph("big")
    g.add_input("x", (1, 16384))
    node = g.add_node("fc", "linear", ["x"], {"out_features": 32768, "bias": False})
    g.set_outputs(["fc"])
    node.params["weight"] = torch.zeros(1).expand(32768, 16384)   # 2 GiB of float32 that takes no memory
    files = precious(tmp_path)
    with pytest.raises(AutomtlError, match=r"2,147,483,7\d\d-byte .caffemodel, over the 2,147,483,647 bytes"):
        export_prototxt(g, tmp_path / "x.prototxt", dialect="caffe")
    assert untouched(tmp_path, files)


def test_the_size_limit_is_checked_on_the_exact_file_size(tmp_path, monkeypatch):
    graph = bn_graph()
    size = export_prototxt(graph, tmp_path / "a.prototxt", dialect="caffe").with_suffix(".caffemodel").stat().st_size
    monkeypatch.setattr(caffe_model, "CAFFEMODEL_MAX_BYTES", size)
    export_prototxt(graph, tmp_path / "b.prototxt", dialect="caffe")
    monkeypatch.setattr(caffe_model, "CAFFEMODEL_MAX_BYTES", size - 1)
    files = precious(tmp_path / "c")
    with pytest.raises(AutomtlError, match=f"a {size:,}-byte .caffemodel"):
        export_prototxt(graph, tmp_path / "c" / "x.prototxt", dialect="caffe")
    assert untouched(tmp_path / "c", files)


def test_a_failure_while_writing_leaves_no_file_behind(tmp_path, monkeypatch):
    def fail_halfway(net, layout, out) -> int:
        out.write(b"\x00" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(backend, "write_caffemodel", fail_halfway)
    with pytest.raises(OSError):
        export_prototxt(bn_graph(), tmp_path / "new.prototxt", dialect="caffe")
    assert list(tmp_path.iterdir()) == []
    files = precious(tmp_path)
    with pytest.raises(OSError):
        export_prototxt(bn_graph(), tmp_path / "x.prototxt", dialect="caffe")
    assert untouched(tmp_path, files)


def test_cli_convert_writes_genuine_caffe(tmp_path):
    from automtl_compiler.cli.main import main

    out = tmp_path / "r18.prototxt"
    result = CliRunner().invoke(main, ["convert", "torchvision:resnet18", "-o", str(out), "--input-shape",
                                       "1,3,32,32", "--dialect", "caffe"])
    assert result.exit_code == 0, result.output
    assert f"wrote {out} and {out.with_suffix('.caffemodel')}" in result.output
    layers = parse_text(out).layer
    assert [a.type for a in layers[2:4]] == ["BatchNorm", "Scale"] and extension_fields(parse_text(out)) == []
    assert load_prototxt(out, weights=out.with_suffix(".caffemodel")).num_parameters() == 11_689_512
    result = CliRunner().invoke(main, ["convert", "torchvision:resnet18", "-o", str(tmp_path / "r.onnx"),
                                       "--dialect", "caffe"])
    assert result.exit_code == 2 and "--dialect caffe applies to .prototxt outputs only" in result.output
