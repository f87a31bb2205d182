"""Caffe prototxt frontend: the AutoMTL dialect, genuine Caffe (BatchNorm + Scale folding, .caffemodel
weights), numerics against hand-written torch, and errors that name file, line and layer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from automtl_compiler.proto import caffe_pb2
from safetensors.torch import save_file

from automtl_compiler import load_backbone, to_torch
from automtl_compiler.errors import (
    AutomtlError,
    FileFormatError,
    GraphError,
    ParseError,
    ShapeError,
    UnsupportedOpError,
)
from automtl_compiler.frontends.prototxt import load_prototxt
from automtl_compiler.ir.serialize import graph_tensors

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
AUTOMTL = FIXTURES / "automtl_small.prototxt"
CAFFE = FIXTURES / "caffe_small.prototxt"


def random_weights(graph, path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors for every tensor of ``graph`` (positive variances), saved to ``path``."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, t in graph_tensors(graph).items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(7, dtype=torch.long)
        elif key.endswith("running_var"):
            out[key] = torch.rand(t.shape, generator=gen) + 0.5
        else:
            out[key] = torch.randn(t.shape, generator=gen) * 0.5
    save_file(out, str(path))
    return out


def run(graph, x: torch.Tensor):
    with torch.no_grad():
        return to_torch(graph).eval()(x)


def write(tmp_path: Path, text: str, name: str = "net.prototxt") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------- AutoMTL dialect


def test_automtl_dialect_structure():
    g = load_prototxt(AUTOMTL)
    assert g.inputs == ["blob1"]                       # the declared input, aliased to bottom "data"
    assert g.node("conv1").inputs == ["blob1"]
    assert g.outputs == ["relu3"]
    # closed form: conv 7x7/2 pad 3: (19 + 6 - 7) // 2 + 1 = 10; CEIL max pool 3/2 pad 1: ceil(9 / 2) + 1 = 6
    assert g.node("conv1").shape == (2, 8, 10, 10)
    assert g.node("max_pool1").shape == (2, 8, 6, 6)
    assert g.node("relu3").shape == (2, 8, 6, 6)
    assert g.node("max_pool1").attrs["ceil_mode"] is True
    assert g.node("conv2").attrs["dilation"] == (2, 2) and g.node("conv2").attrs["padding"] == (2, 2)
    bn = g.node("batch_norm2")
    assert bn.attrs == {"eps": 0.001, "momentum": 0.1, "affine": True, "track_running_stats": True}
    assert g.node("batch_norm1").attrs["eps"] == 1e-05               # float32 field read back as 1e-05 exactly
    # in-place relu2 (top == bottom): conv3 reads relu2's value, not batch_norm2's
    assert g.node("conv3").inputs == ["relu2"]
    assert g.node("add1").op == "add" and g.node("add1").inputs == ["max_pool1", "batch_norm3"]
    assert g.node("conv1").source == "automtl_small.prototxt:11"
    # AutoMTL counts the batch-norm affine parameters: 8*3*49 + 2 * 8*8*9 + 3 * 16
    assert g.num_parameters() == 1176 + 1152 + 48


def test_automtl_dialect_numerics_against_hand_written_torch(tmp_path):
    g = load_prototxt(AUTOMTL)
    w = random_weights(g, tmp_path / "w.safetensors")
    g = load_prototxt(AUTOMTL, weights=tmp_path / "w.safetensors")
    assert int(g.node("batch_norm1").buffers["num_batches_tracked"]) == 7

    def bn(x, name, eps):
        return F.batch_norm(x, w[f"{name}/running_mean"], w[f"{name}/running_var"], w[f"{name}/weight"],
                            w[f"{name}/bias"], training=False, eps=eps)

    x = torch.randn(2, 3, 19, 19)
    h = F.relu(bn(F.conv2d(x, w["conv1/weight"], stride=2, padding=3), "batch_norm1", 1e-5))
    pooled = F.max_pool2d(h, 3, 2, 1, ceil_mode=True)
    h = F.relu(bn(F.conv2d(pooled, w["conv2/weight"], padding=2, dilation=2), "batch_norm2", 1e-3))
    h = bn(F.conv2d(h, w["conv3/weight"], padding=2, dilation=2), "batch_norm3", 1e-5)
    expected = F.relu(pooled + h)
    torch.testing.assert_close(run(g, x), expected, rtol=1e-5, atol=1e-5)


def test_automtl_input_shape_variants(tmp_path):
    text = AUTOMTL.read_text()
    legacy = text.replace("input_dim: 2\ninput_dim: 3\ninput_dim: 19\ninput_dim: 19\n",
                          "input_shape { dim: 1 dim: 3 dim: 27 dim: 27 }\n")
    assert legacy != text
    g = load_prototxt(write(tmp_path, legacy))
    assert g.node("blob1").shape == (1, 3, 27, 27)
    assert g.node("relu3").shape == (1, 8, 8, 8)
    g = load_prototxt(AUTOMTL, input_shape=(1, 3, 33, 33))     # the argument overrides the file
    assert g.node("blob1").shape == (1, 3, 33, 33) and g.node("relu3").shape == (1, 8, 9, 9)
    assert run(g, torch.randn(1, 3, 33, 33)).shape == (1, 8, 9, 9)
    g = load_backbone(str(AUTOMTL), input_shape=(1, 3, 33, 33))  # the dispatcher reaches this frontend
    assert g.node("relu3").shape == (1, 8, 9, 9)


def test_alias_only_when_exactly_one_input_is_unread(tmp_path):
    text = AUTOMTL.read_text().replace('input: "blob1"\n', 'input: "blob1"\ninput: "blob2"\n')
    text = text.replace("input_dim: 19\ninput_dim: 19\n", "input_dim: 19\ninput_dim: 19\n" * 2, 1)
    text = text.replace("input_dim: 2\ninput_dim: 3\n", "input_dim: 2\ninput_dim: 3\n" * 2, 1)
    path = write(tmp_path, text)
    line = text.splitlines().index('  name: "conv1"') + 1
    with pytest.raises(ParseError) as info:
        load_prototxt(path)
    msg = str(info.value)
    assert f"{path}:{line}:" in msg and "'conv1'" in msg and "'data'" in msg and "blob2" in msg


# ---------------------------------------------------------------- genuine Caffe


def blob(t: torch.Tensor, legacy: bool = False):
    b = caffe_pb2.BlobProto()
    if legacy:
        b.num, b.channels, b.height, b.width = (1,) * (4 - t.dim()) + tuple(t.shape)
    else:
        b.shape.dim.extend(t.shape)
    b.data.extend(t.reshape(-1).tolist())
    return b


def make_caffemodel(path: Path) -> dict[str, torch.Tensor]:
    """A binary .caffemodel for caffe_small (random blobs); returns the raw values by name."""
    gen = torch.Generator().manual_seed(3)

    def rnd(*shape, positive=False):
        t = torch.rand(shape, generator=gen) + 0.5 if positive else torch.randn(shape, generator=gen) * 0.5
        return t.float()

    v = {"conv1.w": rnd(6, 3, 3, 5), "conv1.b": rnd(6), "bn1.mean": rnd(6), "bn1.var": rnd(6, positive=True),
         "scale1.g": rnd(6), "scale1.b": rnd(6), "conv_a.w": rnd(6, 6, 1, 1), "bn_a.mean": rnd(6),
         "bn_a.var": rnd(6, positive=True), "conv_b.w": rnd(6, 6, 3, 3), "conv_b.b": rnd(6),
         "fc.w": rnd(7, 360), "fc.b": rnd(7)}
    net = caffe_pb2.NetParameter(name="caffe_small")
    s1, s2 = 2.5, 1.0   # Caffe stores mean and variance times the moving-average normaliser
    layers = {"conv1": [blob(v["conv1.w"]), blob(v["conv1.b"])],
              "bn1": [blob(v["bn1.mean"] * s1), blob(v["bn1.var"] * s1), blob(torch.tensor([s1]))],
              "relu1": [],
              "scale1": [blob(v["scale1.g"]), blob(v["scale1.b"])],
              "conv_a": [blob(v["conv_a.w"])],
              "bn_a": [blob(v["bn_a.mean"], legacy=True), blob(v["bn_a.var"], legacy=True), blob(torch.tensor([s2]))],
              "conv_b": [blob(v["conv_b.w"]), blob(v["conv_b.b"])],
              "fc": [blob(v["fc.w"], legacy=True), blob(v["fc.b"])]}
    for name, blobs in layers.items():
        layer = net.layer.add(name=name)
        layer.blobs.extend(blobs)
    path.write_bytes(net.SerializeToString())
    return v


def test_caffe_structure():
    g = load_prototxt(CAFFE)
    assert g.inputs == ["data"]
    assert "scale1" not in g and "loss" not in g          # Scale folded; TRAIN-only layer skipped
    bn1, bn_a = g.node("bn1"), g.node("bn_a")
    assert bn1.attrs == {"eps": 1e-05, "momentum": 0.001, "affine": True, "track_running_stats": True}
    assert bn_a.attrs == {"eps": 0.001, "momentum": 0.01, "affine": False, "track_running_stats": True}
    assert set(bn_a.params) == set() and set(bn1.params) == {"weight", "bias"}
    conv1 = g.node("conv1")
    assert conv1.attrs["kernel_size"] == (3, 5) and conv1.attrs["padding"] == (1, 2) and conv1.attrs["bias"]
    assert g.node("relu1").inputs == ["bn1"]               # in-place ReLU after the folded in-place Scale
    assert g.node("sum").attrs["coeffs"] == (0.5, -2.0)
    assert [g.node(n).op for n in ("relu6_a", "sig_b", "prod", "max", "cat")] == \
        ["relu6", "sigmoid", "mul", "max", "concat"]
    assert g.node("pool").shape == (2, 12, 6, 5)           # CEIL by default: floor would give 5x4
    assert g.node("fc/flatten").op == "flatten" and g.node("fc").inputs == ["fc/flatten"]
    assert g.outputs == ["fc", "flat"]
    assert g.node("fc").shape == (2, 7) and g.node("flat").shape == (2, 360)
    assert g.num_parameters() == 6 * 3 * 15 + 6 + 12 + 36 + 6 * 54 + 6 + 7 * 360 + 7


def test_caffe_numerics_with_caffemodel_and_scale_fold(tmp_path):
    v = make_caffemodel(tmp_path / "small.caffemodel")
    g = load_prototxt(CAFFE, weights=tmp_path / "small.caffemodel")
    torch.testing.assert_close(g.node("bn1").buffers["running_mean"], v["bn1.mean"])   # normaliser undone
    torch.testing.assert_close(g.node("bn1").params["weight"], v["scale1.g"])          # Scale folded

    def bn(x, mean, var, eps):
        shape = (1, -1, 1, 1)
        return (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)

    x = torch.randn(2, 3, 12, 10)
    c1 = F.conv2d(x, v["conv1.w"], v["conv1.b"], padding=(1, 2))
    c1 = torch.relu(bn(c1, v["bn1.mean"], v["bn1.var"], 1e-5) * v["scale1.g"].view(1, -1, 1, 1)
                    + v["scale1.b"].view(1, -1, 1, 1))
    a = torch.clamp(bn(F.conv2d(c1, v["conv_a.w"]), v["bn_a.mean"], v["bn_a.var"], 1e-3), 0, 6)
    b = torch.sigmoid(F.conv2d(c1, v["conv_b.w"], v["conv_b.b"], padding=1))
    m = torch.maximum((0.5 * a - 2 * b) * b, a)
    pool = F.avg_pool2d(torch.cat([m, c1], 1), 3, 2, ceil_mode=True)
    fc = pool.flatten(1) @ v["fc.w"].T + v["fc.b"]
    out_fc, out_flat = run(g, x)
    torch.testing.assert_close(out_fc, fc, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_flat, pool.flatten(1), rtol=1e-5, atol=1e-5)


def test_caffemodel_with_unknown_layer_blobs(tmp_path):
    make_caffemodel(tmp_path / "m.caffemodel")
    net = caffe_pb2.NetParameter()
    net.ParseFromString((tmp_path / "m.caffemodel").read_bytes())
    net.layer.add(name="extra").blobs.extend([blob(torch.zeros(3))])
    (tmp_path / "m.caffemodel").write_bytes(net.SerializeToString())
    with pytest.raises(FileFormatError, match="extra"):
        load_prototxt(CAFFE, weights=tmp_path / "m.caffemodel")


def test_split_silence_and_scale_without_bias(tmp_path):
    text = """
input: "x"
input_shape { dim: 1 dim: 2 dim: 4 dim: 4 }
layer { name: "bn" type: "BatchNorm" bottom: "x" top: "bn" }
layer { name: "sc" type: "Scale" bottom: "bn" top: "sc" }
layer { name: "split" type: "Split" bottom: "sc" top: "s1" top: "s2" }
layer { name: "sum" type: "Eltwise" bottom: "s1" bottom: "s2" top: "sum" }
layer { name: "side" type: "ReLU" bottom: "s1" top: "side" }
layer { name: "mute" type: "Silence" bottom: "side" }
"""
    g = load_prototxt(write(tmp_path, text))
    assert g.node("sum").inputs == ["bn", "bn"] and g.outputs == ["sum"]
    assert g.node("bn").attrs["affine"] and g.node("bn").attrs["momentum"] == 0.001
    torch.testing.assert_close(g.node("bn").params["bias"], torch.zeros(2))
    # a reader of the pre-Scale value cannot be served once the Scale is folded into the batch norm
    bad = text.replace('name: "side" type: "ReLU" bottom: "s1"', 'name: "side" type: "ReLU" bottom: "bn"')
    assert bad != text
    with pytest.raises(UnsupportedOpError, match="side.*bn"):
        load_prototxt(write(tmp_path, bad))


def test_leaky_relu_clip_and_extension_types(tmp_path):
    text = """
layer { name: "in" type: "Input" top: "in" input_param { shape { dim: 1 dim: 4 dim: 5 dim: 5 } } }
layer { name: "lrelu" type: "ReLU" bottom: "in" top: "lrelu" relu_param { negative_slope: 0.2 } }
layer { name: "clip" type: "Clip" bottom: "lrelu" top: "clip" clip_param { min: -1 max: 0.5 } }
layer { name: "swish" type: "Swish" bottom: "clip" top: "swish" }
layer { name: "gelu" type: "GELU" bottom: "swish" top: "gelu" }
layer { name: "tanh" type: "TanH" bottom: "gelu" top: "tanh" }
layer { name: "sd" type: "StochasticDepth" bottom: "tanh" top: "sd" dropout_param { dropout_ratio: 0.2 } }
layer { name: "gmax" type: "Pooling" bottom: "sd" top: "gmax" pooling_param { pool: MAX global_pooling: true } }
layer { name: "fpool" type: "Pooling" bottom: "sd" top: "fpool"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 round_mode: FLOOR } }
"""
    g = load_prototxt(write(tmp_path, text))
    assert g.node("lrelu").op == "leaky_relu" and g.node("lrelu").attrs["negative_slope"] == 0.2
    assert g.node("clip").attrs == {"min": -1.0, "max": 0.5}
    assert [g.node(n).op for n in ("swish", "gelu", "tanh", "sd", "gmax")] == \
        ["silu", "gelu", "tanh", "stochastic_depth", "adaptive_maxpool2d"]
    assert g.node("sd").attrs == {"p": 0.2, "mode": "row"}
    assert g.node("fpool").shape == (1, 4, 2, 2) and g.outputs == ["gmax", "fpool"]
    x = torch.randn(1, 4, 5, 5)
    y = torch.tanh(F.gelu(F.silu(torch.clamp(F.leaky_relu(x, 0.2), -1, 0.5))))
    gmax, fpool = run(g, x)
    torch.testing.assert_close(gmax, y.amax((2, 3), keepdim=True))
    torch.testing.assert_close(fpool, F.max_pool2d(y, 2, 2))


# ---------------------------------------------------------------- errors

SMALL = """name: "e"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer {
  name: "conv"
  type: "Convolution"
  bottom: "data"
  top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 }
}
"""


def test_syntax_error_has_file_line_column(tmp_path):
    path = write(tmp_path, SMALL.replace("  top: \"conv\"\n", "  top: \"conv\"\n  toop: \"x\"\n"))
    with pytest.raises(ParseError) as info:
        load_prototxt(path)
    assert f"{path}:8:3: " in str(info.value) and "toop" in str(info.value)
    assert (info.value.line, info.value.column) == (8, 3)
    path = write(tmp_path, SMALL.replace('num_output: 4', 'num_output: 4 {'), "brace.prototxt")
    with pytest.raises(ParseError, match=rf"{path}:8:\d+: "):
        load_prototxt(path)


def test_v1_layers_get_a_hint(tmp_path):
    path = write(tmp_path, 'layers { name: "a" }\n')
    with pytest.raises(ParseError, match="V1"):
        load_prototxt(path)


def test_unknown_layer_type_names_layer_type_and_line(tmp_path):
    path = write(tmp_path, SMALL + 'layer {\n  name: "weird"\n  type: "Bogus"\n  bottom: "conv"\n  top: "w"\n}\n')
    with pytest.raises(UnsupportedOpError) as info:
        load_prototxt(path)
    msg = str(info.value)
    assert f"{path}:11" in msg and "'weird'" in msg and "'Bogus'" in msg and "Convolution" in msg


@pytest.mark.parametrize("kind,match", [("SoftmaxWithLoss", "training nets"), ("Accuracy", "deploy prototxt")])
def test_layers_without_registry_op(tmp_path, kind, match):
    path = write(tmp_path, SMALL + f'layer {{ name: "x" type: "{kind}" bottom: "conv" top: "x" }}\n')
    with pytest.raises(UnsupportedOpError, match=match):
        load_prototxt(path)


def test_stochastic_pooling_is_refused(tmp_path):
    path = write(tmp_path, SMALL + 'layer { name: "p" type: "Pooling" bottom: "conv" top: "p" '
                                   'pooling_param { pool: STOCHASTIC kernel_size: 2 } }\n')
    with pytest.raises(UnsupportedOpError, match="STOCHASTIC"):
        load_prototxt(path)


def test_bottom_without_producer(tmp_path):
    path = write(tmp_path, SMALL + 'layer {\n  name: "r"\n  type: "ReLU"\n  bottom: "nowhere"\n  top: "r"\n}\n')
    with pytest.raises(ParseError) as info:
        load_prototxt(path)
    assert f"{path}:11" in str(info.value) and "'r'" in str(info.value) and "'nowhere'" in str(info.value)


def test_scale_without_batchnorm(tmp_path):
    path = write(tmp_path, SMALL + 'layer { name: "sc" type: "Scale" bottom: "conv" top: "conv" }\n')
    with pytest.raises(UnsupportedOpError, match="'sc'.*does not follow a BatchNorm"):
        load_prototxt(path)


def test_multiple_tops_and_duplicate_names(tmp_path):
    path = write(tmp_path, SMALL + 'layer { name: "r" type: "ReLU" bottom: "conv" top: "a" top: "b" }\n')
    with pytest.raises(ParseError, match="'r'.*2 tops"):
        load_prototxt(path)
    path = write(tmp_path, SMALL + 'layer { name: "conv" type: "ReLU" bottom: "conv" top: "c2" }\n')
    with pytest.raises(GraphError, match="'conv' is used twice"):
        load_prototxt(path)


def test_shape_error_names_the_layer(tmp_path):
    path = write(tmp_path, SMALL + 'layer { name: "big" type: "Convolution" bottom: "conv" top: "big" '
                                   'convolution_param { num_output: 2 kernel_size: 9 } }\n')
    with pytest.raises(ShapeError, match=r"layer 'big'.*larger than the input"):
        load_prototxt(path)


def test_missing_files():
    with pytest.raises(FileFormatError, match="not found"):
        load_prototxt("/nonexistent/net.prototxt")
    with pytest.raises(FileFormatError, match="not found"):
        load_prototxt(CAFFE, weights="/nonexistent/w.safetensors")


def test_missing_input_shape(tmp_path):
    path = write(tmp_path, 'input: "x"\nlayer { name: "r" type: "ReLU" bottom: "x" top: "r" }\n')
    with pytest.raises(ParseError, match="no declared shape"):
        load_prototxt(path)
    assert load_prototxt(path, input_shape=(1, 2, 3, 3)).node("r").shape == (1, 2, 3, 3)


def test_weights_with_wrong_shape_missing_or_unexpected(tmp_path):
    g = load_prototxt(AUTOMTL)
    w = random_weights(g, tmp_path / "ok.safetensors")
    bad = dict(w, **{"conv2/weight": torch.zeros(8, 8, 5, 5)})
    save_file(bad, str(tmp_path / "shape.safetensors"))
    with pytest.raises(ShapeError, match=r"conv2/weight.*\[8, 8, 5, 5\].*\[8, 8, 3, 3\]"):
        load_prototxt(AUTOMTL, weights=tmp_path / "shape.safetensors")
    names = dict(w)
    del names["batch_norm3/bias"]
    names["ghost/weight"] = torch.zeros(1)
    save_file(names, str(tmp_path / "names.safetensors"))
    with pytest.raises(FileFormatError, match=r"missing 1 tensor\(s\): batch_norm3/bias.*unexpected 1 tensor\(s\): "
                                              r"ghost/weight"):
        load_prototxt(AUTOMTL, weights=tmp_path / "names.safetensors")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(FileFormatError, match="unknown weights format"):
        load_prototxt(AUTOMTL, weights=tmp_path / "w.npz")


def test_errors_are_automtl_errors():
    assert issubclass(ParseError, AutomtlError) and issubclass(UnsupportedOpError, AutomtlError)


def test_full_size_automtl_dialect_resnet34(tmp_path):
    """A full DeepLab ResNet-34 in AutoMTL's dialect builds, runs on its declared size, and counts right."""
    from automtl_compiler import load_backbone, save_graph, to_torch
    from automtl_compiler.backbones import deeplab_resnet34
    from tests.automtl_dialect import write_automtl_dialect

    source = load_backbone(deeplab_resnet34().eval(), input_shape=(1, 3, 226, 226))
    path = tmp_path / "deeplab_resnet34_automtl.prototxt"
    path.write_text(write_automtl_dialect(source, (1, 3, 226, 226)))
    save_graph(source, tmp_path / "src.json")
    graph = load_prototxt(path, weights=tmp_path / "src.safetensors")
    assert graph.num_parameters() == 21_284_672
    assert graph.node(graph.outputs[0]).shape == (1, 512, 29, 29)
    x = torch.randn(1, 3, 226, 226)
    with torch.no_grad():
        torch.testing.assert_close(to_torch(graph).eval()(x), to_torch(source).eval()(x), rtol=1e-5, atol=1e-5)
