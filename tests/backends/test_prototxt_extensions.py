"""AutoMTL prototxt dialect layers for permute, asymmetric pad and layer norm (plus upstream's Parameter layer).

References are independent of the exporter: the layer text written out by hand, SSD Caffe's and upstream
Caffe's field numbers, torch's own permute / pad / layer norm, a layer norm computed from its mean and
variance, and the timm modules themselves.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from automtl_compiler.proto import caffe_pb2
from google.protobuf import text_format
from torch import nn

from automtl_compiler import Graph, export_prototxt, load_backbone, to_torch
from automtl_compiler.errors import ParseError, UnsupportedOpError
from automtl_compiler.frontends.prototxt import load_prototxt
from tests.helpers import randomise_bn


def one_op(op: str, attrs: dict, shape: tuple[int, ...] = (1, 4, 5, 6), seed: int = 0) -> Graph:
    """The graph x -> ``op`` named ``n``, its tensors random (a layer norm's weight and bias too)."""
    g = Graph("ext")
    g.add_input("x", shape)
    g.add_node("n", op, ["x"], attrs)
    g.set_outputs(["n"])
    g.materialise(seed=seed)
    gen = torch.Generator().manual_seed(seed)
    for t in g.node("n").params.values():
        t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
    return g


def run(graph: Graph, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return to_torch(graph).eval()(x)


def layer_text(path: Path, name: str) -> str:
    """The text of layer ``name`` in the prototxt at ``path``, its lines stripped."""
    net = text_format.Parse(path.read_text(), caffe_pb2.NetParameter())
    (layer,) = [layer for layer in net.layer if layer.name == name]
    return " ".join(line.strip() for line in text_format.MessageToString(layer).splitlines())


def round_trip(graph: Graph, tmp_path: Path, weights: str = "safetensors") -> Graph:
    path = export_prototxt(graph, tmp_path / "ext.prototxt", weights=weights)
    suffix = ".safetensors" if weights == "safetensors" else ".caffemodel"
    return load_prototxt(path, weights=path.with_suffix(suffix))


# ---------------------------------------------------------------- the schema


def test_field_numbers_follow_ssd_caffe_upstream_and_the_automtl_range():
    fields = caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name
    assert fields["permute_param"].number == 202                    # SSD Caffe's number
    assert caffe_pb2.PermuteParameter.DESCRIPTOR.fields_by_name["order"].number == 1
    assert fields["parameter_param"].number == 145                  # upstream BVLC Caffe's number
    for name in ("pad_param", "layer_norm_param"):
        assert 1300 <= fields[name].number <= 1399
    numbers = [f.number for f in caffe_pb2.LayerParameter.DESCRIPTOR.fields]
    assert len(numbers) == len(set(numbers))
    # SSD Caffe's binary form: field 202 (tag 0xd2 0x0c), then `order` unpacked, as proto2 writes it there.
    layer = caffe_pb2.LayerParameter(permute_param=caffe_pb2.PermuteParameter(order=[0, 2, 1, 3]))
    assert layer.SerializeToString() == b"\xd2\x0c\x08" + b"".join(b"\x08" + bytes([d]) for d in (0, 2, 1, 3))


# ---------------------------------------------------------------- text of each layer


@pytest.mark.parametrize("op,attrs,text", [
    ("permute", {"dims": (0, 2, 3, 1)},
     'name: "n" type: "Permute" bottom: "x" top: "n" permute_param { order: 0 order: 2 order: 3 order: 1 }'),
    ("pad", {"pads": (0, 1, 0, 1)},
     'name: "n" type: "Pad" bottom: "x" top: "n" pad_param { pads: 0 pads: 1 pads: 0 pads: 1 }'),
    ("pad", {"pads": (2, -1, 0, 1), "value": -1.5},
     'name: "n" type: "Pad" bottom: "x" top: "n" pad_param { pads: 2 pads: -1 pads: 0 pads: 1 value: -1.5 }'),
    ("pad", {"pads": (1, 2, 2, 1), "mode": "reflect"},
     'name: "n" type: "Pad" bottom: "x" top: "n" pad_param { pads: 1 pads: 2 pads: 2 pads: 1 mode: REFLECT }'),
    ("layernorm", {"dim": 1, "eps": 1e-6},
     'name: "n" type: "LayerNorm" bottom: "x" top: "n" layer_norm_param { axis: 1 eps: 1e-06 }'),
    ("layernorm", {"dim": -1, "eps": 1e-5, "affine": False},
     'name: "n" type: "LayerNorm" bottom: "x" top: "n" layer_norm_param { axis: -1 eps: 1e-05 affine: false }'),
])
def test_layer_text(tmp_path, op, attrs, text):
    path = export_prototxt(one_op(op, attrs), tmp_path / "ext.prototxt")
    assert layer_text(path, "n") == text


def test_stored_tensors_are_parameter_layers(tmp_path):
    g = Graph("p")
    g.add_input("x", (1, 3, 4, 4))
    g.add_node("gamma", "tensor", [], {"shape": (1, 3, 1, 1), "trainable": True})
    g.add_node("shift", "tensor", [], {"shape": (3, 1, 1)})
    g.add_node("m", "mul", ["x", "gamma"])
    g.add_node("n", "add", ["m", "shift"])
    g.set_outputs(["n"])
    g.materialise(seed=0)
    g.node("gamma").params["value"].copy_(torch.tensor([0.5, 2.0, -1.0]).view(1, 3, 1, 1))
    g.node("shift").buffers["value"].copy_(torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1))
    path = export_prototxt(g, tmp_path / "p.prototxt")
    assert layer_text(path, "gamma") == ('name: "gamma" type: "Parameter" top: "gamma" parameter_param { shape { '
                                         'dim: 1 dim: 3 dim: 1 dim: 1 } }')
    assert layer_text(path, "shift") == ('name: "shift" type: "Parameter" top: "shift" param { lr_mult: 0.0 '
                                         'decay_mult: 0.0 } parameter_param { shape { dim: 3 dim: 1 dim: 1 } }')
    back = load_prototxt(path, weights=path.with_suffix(".safetensors"))
    assert back.node("gamma").attrs["trainable"] and not back.node("shift").attrs["trainable"]
    x = torch.rand(1, 3, 4, 4)
    expected = x * torch.tensor([0.5, 2.0, -1.0]).view(1, 3, 1, 1) + torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1)
    torch.testing.assert_close(run(back, x), expected)
    with pytest.raises(UnsupportedOpError, match="weights='safetensors'"):
        export_prototxt(g, tmp_path / "q.prototxt", weights="caffemodel")
    assert not (tmp_path / "q.prototxt").exists()


# ---------------------------------------------------------------- numbers


def layer_norm_reference(x: torch.Tensor, dim: int, eps: float, weight=None, bias=None) -> torch.Tensor:
    mean = x.mean(dim, keepdim=True)
    var = ((x - mean) ** 2).mean(dim, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        view = [1] * x.dim()
        view[dim] = -1
        y = y * weight.view(view) + bias.view(view)
    return y


@pytest.mark.parametrize("op,attrs,reference", [
    ("permute", {"dims": (0, 3, 1, 2)}, lambda x, g: x.permute(0, 3, 1, 2)),
    ("permute", {"dims": (0, 2, 1, 3)}, lambda x, g: x.transpose(1, 2)),
    ("pad", {"pads": (0, 1, 0, 1)}, lambda x, g: F.pad(x, (0, 1, 0, 1))),
    ("pad", {"pads": (1, 2, 2, 1), "value": 0.25}, lambda x, g: F.pad(x, (1, 2, 2, 1), value=0.25)),
    ("pad", {"pads": (2, -1, -2, 1)}, lambda x, g: F.pad(x, (2, -1, -2, 1))),
    ("pad", {"pads": (2, 1, 0, 3), "mode": "reflect"}, lambda x, g: F.pad(x, (2, 1, 0, 3), mode="reflect")),
    ("pad", {"pads": (0, 3, 1, 0), "mode": "replicate"}, lambda x, g: F.pad(x, (0, 3, 1, 0), mode="replicate")),
    ("layernorm", {"dim": 1, "eps": 1e-6},
     lambda x, g: layer_norm_reference(x, 1, 1e-6, g.node("n").params["weight"], g.node("n").params["bias"])),
    ("layernorm", {"dim": -1, "eps": 1e-5},
     lambda x, g: F.layer_norm(x, (6,), g.node("n").params["weight"], g.node("n").params["bias"], 1e-5)),
    ("layernorm", {"dim": 2, "eps": 1e-3, "affine": False}, lambda x, g: layer_norm_reference(x, 2, 1e-3)),
])
def test_round_trip_gives_the_same_op_and_numbers(tmp_path, op, attrs, reference):
    g = one_op(op, attrs)
    back = round_trip(g, tmp_path)
    node = back.node("n")
    assert node.op == op and node.attrs == g.node("n").attrs
    x = torch.randn(1, 4, 5, 6)
    with torch.no_grad():
        expected = reference(x, g)
    torch.testing.assert_close(run(g, x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run(back, x), expected, rtol=1e-5, atol=1e-5)


def test_layer_norm_weights_are_the_layers_blobs_in_a_caffemodel(tmp_path):
    g = one_op("layernorm", {"dim": 1})
    path = export_prototxt(g, tmp_path / "ln.prototxt", weights="caffemodel")
    (layer,) = [layer for layer in caffe_pb2.NetParameter.FromString(path.with_suffix(".caffemodel").read_bytes())
                .layer if layer.blobs]
    params = g.node("n").params
    assert [list(b.data) for b in layer.blobs] == [params["weight"].tolist(), params["bias"].tolist()]
    back = load_prototxt(path, weights=path.with_suffix(".caffemodel"))
    x = torch.randn(1, 4, 5, 6)
    torch.testing.assert_close(run(back, x), run(g, x))


def test_channels_last_block_of_permute_layernorm_linear(tmp_path):
    """ConvNeXt's block without conv_mlp: NCHW -> NHWC, layer norm over -1, linear, back to NCHW."""
    g = Graph("cl")
    g.add_input("x", (1, 4, 5, 6))
    g.add_node("to_nhwc", "permute", ["x"], {"dims": (0, 2, 3, 1)})
    g.add_node("norm", "layernorm", ["to_nhwc"], {"dim": -1})
    g.add_node("fc", "linear", ["norm"], {"out_features": 4, "bias": True})
    g.add_node("to_nchw", "permute", ["fc"], {"dims": (0, 3, 1, 2)})
    g.set_outputs(["to_nchw"])
    g.materialise(seed=3)
    x = torch.randn(1, 4, 5, 6)
    fc = g.node("fc").params
    expected = F.linear(F.layer_norm(x.permute(0, 2, 3, 1), (4,), eps=1e-6), fc["weight"], fc["bias"])
    back = round_trip(g, tmp_path)
    torch.testing.assert_close(run(back, x), expected.permute(0, 3, 1, 2), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- dialect="caffe" and bad files


@pytest.mark.parametrize("op,attrs,match", [
    ("permute", {"dims": (0, 2, 3, 1)}, "op 'permute' has no Caffe layer"),
    ("layernorm", {}, "op 'layernorm' has no Caffe layer"),
    ("pad", {"pads": (0, 1, 0, 1)}, "Caffe has no padding layer"),
])
def test_caffe_dialect_refuses_them(tmp_path, op, attrs, match):
    with pytest.raises(UnsupportedOpError, match=match) as info:
        export_prototxt(one_op(op, attrs), tmp_path / "x.prototxt", dialect="caffe")
    assert "node 'n'" in str(info.value) and "dialect='automtl'" in str(info.value)
    assert not (tmp_path / "x.prototxt").exists()


HEAD = 'name: "e"\ninput: "data"\ninput_shape { dim: 1 dim: 2 dim: 3 dim: 4 }\n'


def test_ssd_permute_with_a_partial_order(tmp_path):
    """SSD Caffe appends the axes not listed, in order: order [0, 3] of a 4-D blob is (0, 3, 1, 2)."""
    path = tmp_path / "ssd.prototxt"
    path.write_text(HEAD + 'layer { name: "p" type: "Permute" bottom: "data" top: "p" '
                           'permute_param { order: 0 order: 3 } }\n')
    x = torch.randn(1, 2, 3, 4)
    torch.testing.assert_close(run(load_prototxt(path), x), x.permute(0, 3, 1, 2))


@pytest.mark.parametrize("layer,match", [
    ('type: "Permute" bottom: "data" top: "y" permute_param { order: 0 order: 0 }', "distinct axes"),
    ('type: "Permute" bottom: "data" top: "y" permute_param { order: 4 }', "distinct axes"),
    ('type: "Pad" bottom: "data" top: "y" pad_param { pads: 1 pads: 1 }', "needs 4 pads"),
    ('type: "LayerNorm" bottom: "data" top: "y" layer_norm_param { axis: 4 }', "out of range"),
    ('type: "Parameter" top: "y" parameter_param { }', "positive dims"),
])
def test_bad_layers_name_the_layer(tmp_path, layer, match):
    path = tmp_path / "e.prototxt"
    path.write_text(HEAD + f'layer {{\n  name: "bad"\n  {layer}\n}}\n')
    with pytest.raises(ParseError, match=match) as info:
        load_prototxt(path)
    assert "'bad'" in str(info.value) and str(path) in str(info.value)


# ---------------------------------------------------------------- the timm families


def randomise(model: nn.Module) -> nn.Module:
    """Non-trivial batch-norm statistics, layer-norm affines and layer scales, so none is a no-op."""
    randomise_bn(model)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    return model.eval()


@pytest.mark.parametrize("name,layer_type", [
    ("resnest14d", "Permute"), ("tf_efficientnet_b0", "Pad"), ("convnext_atto", "LayerNorm"),
])
def test_timm_family_round_trips(tmp_path, name, layer_type):
    torch.manual_seed(0)
    model = randomise(timm.create_model(name, pretrained=False))
    graph = load_backbone(model, input_shape=(1, 3, 64, 64))
    path = export_prototxt(graph, tmp_path / f"{name}.prototxt")
    assert f'type: "{layer_type}"' in path.read_text()
    back = load_backbone(path, weights=path.with_suffix(".safetensors"))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    out = run(back, x)
    scale = expected.abs().max().item()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * scale)
