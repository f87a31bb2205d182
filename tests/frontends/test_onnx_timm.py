"""ONNX frontend on timm's CNN families (issue 14): models exported by both torch.onnx exporters give
onnxruntime's numbers after load_onnx -> to_torch; hand-built models check every new op mapping (slice, split,
gather, pad, resize, transpose, reshape, softmax, reductions, layer/group/instance norm, arithmetic with
constants, weight standardisation folded at load time) against onnxruntime; unsupported settings are errors
naming the node and the op."""

from __future__ import annotations

import contextlib
import importlib
import io
import warnings
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from automtl_compiler import to_torch
from automtl_compiler.errors import UnsupportedOpError
from automtl_compiler.frontends.onnx import load_onnx
from tests.helpers import randomise_bn

ort = pytest.importorskip("onnxruntime")
timm = pytest.importorskip("timm")

N = helper.make_node
INT64_MAX = 2**63 - 1


# ---------------------------------------------------------------- helpers

def export(model: nn.Module, x: torch.Tensor, path, exporter: str) -> None:
    """torch.onnx.export with the TorchScript exporter (opset 17) or the torch.export one (its default opset)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17)
        else:
            torch.onnx.export(model, (x,), str(path), dynamo=True, verbose=False)


def run_ort(path, x: np.ndarray) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def assert_close(got, want) -> None:
    """rtol 1e-3, atol 1e-4 of the output's scale: random-weight networks (inception_v3's logits reach 1e10)
    have outputs where float32 rounding alone exceeds an absolute 1e-4."""
    got, want = torch.as_tensor(got), torch.as_tensor(np.asarray(want))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * max(1.0, float(want.abs().max())))


def ops(graph) -> Counter:
    return Counter(n.op for n in graph.nodes())


def timm_model(name: str) -> nn.Module:
    """A timm model with random weights, batch-norm statistics and layer scales (not all equal)."""
    torch.manual_seed(0)
    model = randomise_bn(timm.create_model(name, pretrained=False, num_classes=10)).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith("gamma"):
                p.copy_(torch.rand(p.shape) + 0.5)
    return model


def exported_parity(model: nn.Module, exporter: str, tmp_path, size: int = 64):
    """Export ``model``, load the file, and check the graph against onnxruntime and against the module."""
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    path = tmp_path / f"{exporter}.onnx"
    export(model, x, path, exporter)
    graph = load_onnx(path)
    with torch.no_grad():
        got = to_torch(graph).eval()(x)
        want = model(x)
    assert float(want.abs().max()) > 1e-2
    assert_close(got, run_ort(path, x.numpy())[0])
    assert_close(got, want)
    return graph


def model_file(tmp_path, nodes, inits=(), *, opset: int = 17, shape=(1, 4, 8, 8), outputs=("y",),
               name: str = "m.onnx"):
    """Save a hand-built model on x of ``shape``; every initialiser is float32 unless it is an ndarray."""
    tensors = [numpy_helper.from_array(v if isinstance(v, np.ndarray) and v.dtype != np.float64
                                       else np.asarray(v, dtype=np.float32), k) for k, v in dict(inits).items()]
    graph = helper.make_graph(nodes, "hand", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def ort_parity(path, shape=(1, 4, 8, 8), seed: int = 0):
    """Load ``path`` and check every output against onnxruntime (to rtol 1e-4, atol 1e-5); returns the graph."""
    graph = load_onnx(path)
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    want = run_ort(path, x)
    with torch.no_grad():
        got = to_torch(graph).eval()(torch.from_numpy(x))
    got = got if isinstance(got, tuple) else (got,)
    assert len(got) == len(want)
    for g, w in zip(got, want):  # small float32 graphs of order-one values: a tight tolerance
        torch.testing.assert_close(g, torch.from_numpy(w), rtol=1e-4, atol=1e-5)
    return graph


def ints(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def const(name: str, value, dtype=np.float32) -> onnx.NodeProto:
    return N("Constant", [], [name], name=name, value=numpy_helper.from_array(np.asarray(value, dtype)))


# ---------------------------------------------------------------- timm models through both exporters

# model -> (exporter, IR ops the model must use)
TIMM = {
    ("skresnet18", "torchscript"): {"slice", "concat", "sum", "softmax"},          # split, stack, selective kernel
    ("ghostnetv2_100", "torchscript"): {"resize", "avgpool2d", "sigmoid"},       # DFC attention: Shape -> Resize
    ("tf_efficientnet_b0", "torchscript"): {"pad", "silu"},                       # TF "same" padding as Pad
    ("convnext_atto", "torchscript"): {"layernorm", "gelu", "tensor", "mul"},     # LayerNorm2d, layer scale
    ("resnest14d", "dynamo"): {"reshape", "permute", "softmax", "sum"},          # split attention (radix 2)
    ("convnext_atto", "dynamo"): {"layernorm", "gelu", "tensor"},
}


@pytest.mark.parametrize("name,exporter", list(TIMM), ids=[f"{n}-{e}" for n, e in TIMM])
def test_timm_parity(name, exporter, tmp_path):
    model = timm_model(name)
    graph = exported_parity(model, exporter, tmp_path)
    counts = ops(graph)
    assert TIMM[name, exporter] <= set(counts), sorted(counts)
    assert counts["conv2d"] == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    if name == "convnext_atto":  # Transpose -> LayerNormalization -> Transpose is one channels-first layer norm
        assert counts["permute"] == 0 and all(n.attrs["dim"] == 1 for n in graph.nodes() if n.op == "layernorm")
        gammas = [n for n in graph.nodes() if n.op == "tensor"]
        assert gammas and all(n.attrs["trainable"] and "value" in n.params for n in gammas)  # layer scales


def test_inception_v3(tmp_path):
    """inception_v3 (functional average pools with count_include_pad, max pools, 15 concatenations) matches
    onnxruntime and timm; its random-weight logits are of order 1e9, hence the scale-relative tolerance."""
    graph = exported_parity(timm_model("inception_v3"), "torchscript", tmp_path, size=75)
    pools = [n for n in graph.nodes() if n.op == "avgpool2d"]
    assert len(pools) == 9 and all(n.attrs["count_include_pad"] and n.attrs["padding"] == (1, 1) for n in pools)


class StdConvNet(nn.Module):
    """timm's weight-standardised convolutions (StdConv2d, and ScaledStdConv2d with its gain) and an adaptive
    average pooling (to a size that does not divide its input, torch.export writes a GatherND region)."""

    def __init__(self, pool: tuple[int, int]) -> None:
        super().__init__()
        layers = importlib.import_module("timm.layers")
        self.conv1 = layers.StdConv2d(3, 8, 3, stride=2, eps=1e-5)
        self.conv2 = layers.ScaledStdConv2d(8, 6, 3, stride=4, gain_init=1.5)
        self.pool = nn.AdaptiveAvgPool2d(pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.relu(self.conv2(torch.relu(self.conv1(x)))))


# the TorchScript exporter refuses an adaptive pooling whose size does not divide the input (5x5 -> 3x2)
@pytest.mark.parametrize("exporter,pool", [("torchscript", (1, 1)), ("dynamo", (3, 2))])
def test_weight_standardisation_folded_and_adaptive_pool(exporter, pool, tmp_path):
    model = StdConvNet(pool).eval()
    with torch.no_grad():
        model.conv2.gain.mul_(torch.linspace(0.5, 2.0, 6).view(-1, 1, 1, 1))
    x = torch.randn(1, 3, 32, 32)
    path = tmp_path / "std.onnx"
    export(model, x, path, exporter)
    graph = load_onnx(path)
    assert [n.op for n in graph.topological_order()] == ["input", "conv2d", "relu", "conv2d", "relu",
                                                         "adaptive_avgpool2d"]
    convs = [n for n in graph.topological_order() if n.op == "conv2d"]
    w = model.conv1.weight
    std = (w - w.mean((1, 2, 3), keepdim=True)) / torch.sqrt(w.var((1, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(convs[0].params["weight"], std.detach(), rtol=1e-4, atol=1e-5)
    assert graph.node(graph.outputs[0]).shape == (1, 6, *pool)
    with torch.no_grad():
        got = to_torch(graph).eval()(x)
        assert_close(got, model(x))
    assert_close(got, run_ort(path, x.numpy())[0])


# ---------------------------------------------------------------- hand-built: slicing and reshaping

@pytest.mark.parametrize("opset", [13, 18])
def test_slice_split_gather_reshape(opset, tmp_path):
    split = [N("Split", ["x", "sizes"], ["s0", "s1", "s2"], name="split", axis=1)] if opset < 18 else \
        [N("Split", ["x"], ["s0", "s1", "s2"], name="split", axis=-3, num_outputs=3)]
    nodes = [
        N("Slice", ["x", "st", "en", "ax", "sp"], ["sl"], name="slice"),
        N("Slice", ["x", "st2", "en2", "ax2"], ["y2"], name="slice_h"),
        *split,
        N("Concat", ["s2", "s0", "s1"], ["y3"], name="cat", axis=1),
        N("Gather", ["x", "two"], ["g"], name="select", axis=1),              # x[:, 2] (a scalar index)
        N("Unsqueeze", ["g", "one"], ["y4"], name="unsqueeze"),
        N("Gather", ["x", "evens"], ["y5"], name="evens", axis=1),           # x[:, 0:6:2]
        N("Transpose", ["x"], ["t"], name="transpose", perm=[0, 2, 3, 1]),
        N("Reshape", ["t", "shape"], ["r"], name="reshape"),                # [1, 8, 8, 6] -> [1, 3, 2, 64]
        N("Squeeze", ["y4", "one"], ["sq"], name="squeeze"),
        N("Expand", ["r", "same"], ["re"], name="expand_noop"),
        N("Relu", ["re"], ["y6"], name="relu"),
        N("Relu", ["sl"], ["y1"], name="relu_sl"),
        N("Relu", ["sq"], ["y7"], name="relu_sq"),
    ]
    inits = {"st": ints(1, -6), "en": ints(5, INT64_MAX), "ax": ints(1, 3), "sp": ints(2, 1), "st2": ints(0),
             "en2": ints(-1), "ax2": ints(2), "sizes": ints(1, 2, 3), "two": np.array(2, np.int64), "one": ints(1),
             "evens": ints(0, 2, 4), "shape": ints(1, 3, 2, 64), "same": ints(1, 1, 64)}
    path = model_file(tmp_path, nodes, inits, opset=opset, shape=(1, 6, 8, 8),
                      outputs=[f"y{i}" for i in range(1, 8)])
    graph = ort_parity(path, shape=(1, 6, 8, 8))
    counts = ops(graph)
    assert counts["slice"] == 2 + 1 + 3 + 1 + 1 and counts["permute"] == 1
    assert graph.node("reshape").op == "reshape" and graph.node("reshape").attrs["shape"] == (3, 2, 64)
    assert graph.node("slice").attrs == {"dim": 3, "start": 2, "end": 8, "step": 1}
    assert graph.node("slice/dim1").attrs == {"dim": 1, "start": 1, "end": 4, "step": 2}


def test_gather_regroups_a_flattened_batch(tmp_path):
    """torch.export's as_strided: Reshape(x, [-1]) then Gather(arange) is a reshape that keeps the batch."""
    nodes = [N("Reshape", ["x", "flat"], ["f"], name="flatten_all"),
             N("Gather", ["f", "idx"], ["y"], name="as_strided", axis=0)]
    path = model_file(tmp_path, nodes, {"flat": ints(-1), "idx": np.arange(32, dtype=np.int64).reshape(1, 2, 16)},
                      shape=(1, 4, 2, 4))
    graph = ort_parity(path, shape=(1, 4, 2, 4))
    assert [n.op for n in graph.topological_order()] == ["input", "reshape"]


# ---------------------------------------------------------------- hand-built: padding

def test_pads_and_asymmetric_windows(tmp_path):
    rng = np.random.default_rng(0)
    nodes = [
        N("Pad", ["x", "p1", "half"], ["y1"], name="pad_const"),
        N("Pad", ["x", "p2"], ["y2"], name="pad_reflect", mode="reflect"),
        N("Pad", ["x", "p3", "", "axes"], ["y3"], name="pad_edge", mode="edge"),
        N("Conv", ["x", "w"], ["y4"], name="conv_asym", pads=[0, 1, 1, 2]),
        N("Conv", ["x", "w"], ["y5"], name="conv_same", auto_pad="SAME_UPPER", strides=[2, 2]),
        N("MaxPool", ["x"], ["y6"], name="pool_same", auto_pad="SAME_LOWER", kernel_shape=[3, 3], strides=[2, 2]),
        N("Pad", ["x", "p4", "minus_inf"], ["xi"], name="pad_inf"),
        N("MaxPool", ["xi"], ["y7"], name="pool_tf", kernel_shape=[3, 3], strides=[2, 2]),
        N("AveragePool", ["x"], ["y8"], name="avg_asym", kernel_shape=[3, 3], pads=[0, 0, 1, 1], count_include_pad=1),
    ]
    inits = {"p1": ints(0, 0, 1, 2, 0, 0, 3, 0), "half": np.float32(0.5), "p2": ints(0, 0, 2, 1, 0, 0, 1, 2),
             "p3": ints(1, 0, 0, 3), "axes": ints(2, 3), "p4": ints(0, 0, 0, 0, 0, 0, 1, 1),
             "minus_inf": np.float32(-np.inf), "w": rng.standard_normal((5, 4, 3, 3)).astype(np.float32)}
    path = model_file(tmp_path, nodes, inits, opset=18, outputs=[f"y{i}" for i in range(1, 9)])
    graph = ort_parity(path)
    assert graph.node("pad_const").attrs == {"pads": (2, 0, 1, 3), "mode": "constant", "value": 0.5}
    assert graph.node("pad_reflect").attrs["mode"] == "reflect"
    assert graph.node("pad_edge").attrs["mode"] == "replicate"
    assert graph.node("conv_asym").attrs["padding"] == (0, 1)
    assert graph.node("conv_asym/pad").attrs["pads"] == (0, 1, 0, 1)
    assert graph.node("conv_same/pad").attrs["pads"] == (0, 1, 0, 1)  # SAME_UPPER: the odd pixel at the end
    assert graph.node("pool_same/pad").attrs["pads"] == (1, 0, 1, 0)  # SAME_LOWER: at the start


# ---------------------------------------------------------------- hand-built: resizing

def test_resize_modes(tmp_path):
    def resize(name, out, mode, ctm, scales=None, sizes=None, **kw):
        return N("Resize", ["x", "", scales or "", sizes or ""], [out], name=name, mode=mode,
                 coordinate_transformation_mode=ctm, **kw)

    nodes = [
        resize("up2", "y1", "nearest", "asymmetric", scales="s2", nearest_mode="floor"),
        resize("to7x9", "y2", "nearest", "asymmetric", sizes="z79", nearest_mode="floor"),
        resize("half_pixel_up", "y3", "nearest", "half_pixel", scales="s2"),  # round_prefer_floor: same pixels
        resize("bilinear", "y4", "linear", "half_pixel", sizes="z1012"),
        resize("aligned", "y5", "linear", "align_corners", sizes="z79"),
        resize("down", "y6", "linear", "pytorch_half_pixel", sizes="z34"),
    ]
    inits = {"s2": np.array([1, 1, 2, 2], np.float32), "z79": ints(1, 2, 7, 9), "z1012": ints(1, 2, 10, 12),
             "z34": ints(1, 2, 3, 4)}
    path = model_file(tmp_path, nodes, inits, opset=18, shape=(1, 2, 5, 6), outputs=[f"y{i}" for i in range(1, 7)])
    graph = ort_parity(path, shape=(1, 2, 5, 6))
    assert graph.node("up2").attrs == {"size": (10, 12), "mode": "nearest", "align_corners": False}
    assert graph.node("aligned").attrs == {"size": (7, 9), "mode": "bilinear", "align_corners": True}


# ---------------------------------------------------------------- hand-built: arithmetic and activations

def test_arithmetic_with_constants_and_math_ops(tmp_path):
    rng = np.random.default_rng(1)
    nodes = [
        N("Add", ["x", "three"], ["a"], name="plus3"),
        N("Sub", ["one_half", "x"], ["b"], name="rsub"),
        N("Div", ["x", "four"], ["c"], name="div4"),
        N("Abs", ["x"], ["ax"], name="abs"),
        N("Add", ["ax", "one"], ["pos"], name="pos"),
        N("Div", ["two", "pos"], ["d"], name="rdiv"),
        N("Pow", ["pos", "p15"], ["e"], name="pow"),
        N("Pow", ["pos", "half"], ["f"], name="pow_half"),
        N("Mul", ["x", "gamma"], ["g"], name="scale"),                       # initialiser: trainable tensor
        const("beta", rng.standard_normal((1, 4, 1, 1))),
        N("Add", ["x", "beta"], ["h"], name="shift"),                        # Constant node: a buffer
        N("Sqrt", ["pos"], ["i1"], name="sqrt"), N("Log", ["pos"], ["i2"], name="log"),
        N("Neg", ["pos"], ["np"], name="neg"), N("Exp", ["np"], ["i3"], name="exp"),
        N("Erf", ["x"], ["i4"], name="erf"), N("Reciprocal", ["pos"], ["i5"], name="recip"),
        N("Max", ["x", "quarter"], ["i6"], name="max_c"), N("Min", ["x", "half"], ["i7"], name="min_c"),
        N("Softplus", ["x"], ["sp"], name="softplus"), N("Tanh", ["sp"], ["th"], name="tanh"),
        N("Mul", ["x", "th"], ["i8"], name="mish"),                          # x * tanh(softplus(x)): mish
        N("Elu", ["x"], ["i9"], name="elu", alpha=0.5), N("PRelu", ["x", "slope"], ["i10"], name="prelu"),
        N("Sub", ["x", "gamma"], ["i11"], name="sub_t"), N("Div", ["x", "pos"], ["i12"], name="div_dyn"),
        N("Sum", ["a", "b", "c", "d", "e", "f", "g", "h", "i1", "i2", "i3", "i4", "i5", "i6", "i7", "i8", "i9",
                  "i10", "i11", "i12"], ["y1"], name="total"),
        N("Softmax", ["x"], ["y2"], name="softmax", axis=1),
        N("ReduceSum", ["x", "hw"], ["y3"], name="rsum", keepdims=0),
        N("ReduceMax", ["x"], ["y4"], name="rmax", axes=[1], keepdims=1),
        N("ReduceMax", ["x"], ["y5"], name="gmax", axes=[2, 3], keepdims=1),
    ]
    inits = {"three": 3.0, "one_half": 1.5, "four": 4.0, "one": 1.0, "two": 2.0, "p15": 1.5, "half": 0.5,
             "quarter": 0.25, "gamma": rng.standard_normal((4, 1, 1)), "slope": rng.uniform(0, 0.5, (4, 1, 1)),
             "hw": ints(2, 3)}
    path = model_file(tmp_path, nodes, inits, outputs=[f"y{i}" for i in range(1, 6)])
    graph = ort_parity(path)
    assert graph.node("plus3").op == "affine" and graph.node("plus3").attrs["shift"] == 3.0
    assert graph.node("rsub").attrs == {"scale": -1.0, "shift": 1.5, "power": 1.0}
    assert graph.node("pow_half").op == "sqrt" and graph.node("mish").op == "mish"
    assert (graph.node("max_c").op, graph.node("min_c").op) == ("clip", "clip")
    tensors = {n.source: n for n in graph.nodes() if n.op == "tensor"}
    assert tensors["gamma"].attrs["trainable"] and "value" in tensors["gamma"].params
    assert not tensors["beta"].attrs["trainable"] and "value" in tensors["beta"].buffers
    assert graph.node("rsum").op == "sum" and graph.node("gmax").op == "adaptive_maxpool2d"


# ---------------------------------------------------------------- hand-built: normalisation and layers

def test_norms_and_layers(tmp_path):
    rng = np.random.default_rng(2)

    def r(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    nodes = [
        N("Transpose", ["x"], ["t"], name="to_last", perm=[0, 2, 3, 1]),
        N("LayerNormalization", ["t", "ln_w", "ln_b"], ["tn"], name="ln2d", epsilon=1e-6),
        N("Transpose", ["tn"], ["y1"], name="to_first", perm=[0, 3, 1, 2]),
        N("LayerNormalization", ["x", "chw_w"], ["y2"], name="ln_chw", axis=1),
        # a layer norm written out: (x - mean) / sqrt(var + eps) * w + b over the channels
        N("ReduceMean", ["x", "c_axis"], ["mu"], name="mean", keepdims=1),
        N("Sub", ["x", "mu"], ["dev"], name="dev"),
        N("Pow", ["dev", "two"], ["sq"], name="square"),
        N("ReduceMean", ["sq", "c_axis"], ["var"], name="var", keepdims=1),
        N("Add", ["var", "eps"], ["ve"], name="var_eps"),
        N("Sqrt", ["ve"], ["sd"], name="std"),
        N("Div", ["dev", "sd"], ["nrm"], name="normed"),
        N("Mul", ["nrm", "ln_w4"], ["sc"], name="ln_scale"),
        N("Add", ["sc", "ln_b4"], ["y3"], name="ln_shift"),
        N("InstanceNormalization", ["x", "ln_w", "ln_b"], ["y5"], name="inorm"),
        N("LRN", ["x"], ["y6"], name="lrn", size=3, alpha=0.5, beta=0.75, bias=2.0),
        N("ConvTranspose", ["x", "wt", "bt"], ["y7"], name="deconv", strides=[2, 2], pads=[1, 1, 1, 1],
          output_padding=[1, 1]),
        N("Transpose", ["x"], ["t2"], name="channels_last", perm=[0, 2, 3, 1]),
        N("MatMul", ["t2", "mw"], ["mm"], name="fc"), N("Add", ["mm", "mb"], ["y8"], name="fc_bias"),
    ]
    inits = {"ln_w": r(4) + 1, "ln_b": r(4), "chw_w": r(4, 6, 6), "c_axis": ints(1), "two": 2.0, "eps": 1e-5,
             "ln_w4": r(4, 1, 1), "ln_b4": r(4, 1, 1), "wt": r(4, 3, 3, 3),
             "bt": r(3), "mw": r(4, 5), "mb": r(5)}
    path = model_file(tmp_path, nodes, inits, opset=18, shape=(1, 4, 6, 6),
                      outputs=[f"y{i}" for i in (1, 2, 3, 5, 6, 7, 8)])
    graph = ort_parity(path, shape=(1, 4, 6, 6))
    assert graph.node("ln2d").op == "layernorm" and graph.node("ln2d").attrs["dim"] == 1
    assert graph.node("ln2d").source == "to_last + ln2d + to_first"
    assert graph.node("ln_chw/norm").params["weight"].shape == (144,)
    assert graph.node("inorm").op == "groupnorm" and graph.node("inorm").attrs["num_groups"] == 4
    assert graph.node("fc").op == "linear" and graph.node("fc").shape == (1, 6, 6, 5)
    assert graph.node("deconv").op == "conv_transpose2d" and graph.node("deconv").shape == (1, 3, 12, 12)


def test_group_normalization(tmp_path):
    """GroupNormalization as opset 21 defines it (one scale and bias per channel)."""
    rng = np.random.default_rng(4)
    nodes = [N("GroupNormalization", ["x", "s", "b"], ["y"], name="gn", num_groups=2, epsilon=1e-3)]
    path = model_file(tmp_path, nodes, {"s": rng.standard_normal(4) + 1, "b": rng.standard_normal(4)}, opset=21)
    graph = ort_parity(path)
    assert graph.node("gn").op == "groupnorm" and graph.node("gn").attrs["num_groups"] == 2


def test_weight_standardisation_in_the_graph_is_folded(tmp_path):
    """Weight standardisation computed from initialisers is evaluated at load time: one plain conv2d."""
    rng = np.random.default_rng(3)
    w, gain = rng.standard_normal((8, 3, 3, 3)).astype(np.float32), rng.uniform(0.5, 2, (8, 1, 1, 1))
    nodes = [
        N("ReduceMean", ["w"], ["m"], name="w_mean", axes=[1, 2, 3], keepdims=1),
        N("Sub", ["w", "m"], ["c"], name="w_centre"),
        N("Mul", ["c", "c"], ["c2"], name="w_square"),
        N("ReduceMean", ["c2"], ["v"], name="w_var", axes=[1, 2, 3], keepdims=1),
        N("Add", ["v", "eps"], ["ve"], name="w_eps"),
        N("Sqrt", ["ve"], ["s"], name="w_std"),
        N("Div", ["c", "s"], ["ws"], name="w_standard"),
        N("Mul", ["ws", "gain"], ["wg"], name="w_gain"),
        N("Conv", ["x", "wg"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    path = model_file(tmp_path, nodes, {"w": w, "gain": gain, "eps": 1e-6}, shape=(1, 3, 8, 8))
    graph = ort_parity(path, shape=(1, 3, 8, 8))
    assert [n.op for n in graph.topological_order()] == ["input", "conv2d"]
    want = (w - w.mean((1, 2, 3), keepdims=True)) / np.sqrt(w.var((1, 2, 3), keepdims=True) + 1e-6) * gain
    np.testing.assert_allclose(graph.node("conv").params["weight"].numpy(), want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("nodes,inits,message", [
    ([N("Slice", ["x", "z", "o", "z"], ["y"], name="cut_batch")], {"z": ints(0), "o": ints(1)},
     r"node 'cut_batch' \(op Slice\).*batch dimension"),
    ([N("Gather", ["x", "i"], ["y"], name="shuffle", axis=1)], {"i": ints(2, 0, 3)},
     r"node 'shuffle' \(op Gather\).*indices \[2, 0, 3\]"),
    ([N("Resize", ["x", "", "s"], ["y"], name="cubic", mode="cubic")], {"s": np.array([1, 1, 2, 2], np.float32)},
     r"node 'cubic' \(op Resize\).*mode='cubic'"),
    ([N("Resize", ["x", "", "s"], ["y"], name="ceil", mode="nearest", coordinate_transformation_mode="asymmetric",
        nearest_mode="ceil")], {"s": np.array([1, 1, 2, 2], np.float32)},
     r"node 'ceil' \(op Resize\).*differs from torch's nearest"),
    ([N("Pad", ["x", "p"], ["y"], name="pad_c")], {"p": ints(0, 1, 0, 0, 0, 1, 0, 0)},
     r"node 'pad_c' \(op Pad\).*last two dims"),
    ([N("Pad", ["x", "p"], ["y"], name="wrap", mode="wrap")], {"p": ints(0, 0, 1, 1, 0, 0, 1, 1)},
     r"node 'wrap' \(op Pad\).*mode='wrap'"),
    ([N("Unsqueeze", ["x", "z"], ["y"], name="unsq")], {"z": ints(0)},
     r"node 'unsq' \(op Unsqueeze\).*before the batch dimension"),
    ([N("Softmax", ["x"], ["y"], name="sm", axis=0)], {}, r"node 'sm' \(op Softmax\).*batch dimension"),
    ([N("ReduceSum", ["x", "z"], ["y"], name="rs")], {"z": ints(0)}, r"node 'rs' \(op ReduceSum\).*batch"),
    ([N("Min", ["x", "x"], ["y"], name="mn")], {}, r"node 'mn' \(op Min\).*no IR op"),
    ([N("Mul", ["x", "big"], ["y"], name="grow")], {"big": np.ones((2, 1, 1, 1, 1), np.float32)},
     r"node 'grow' \(op Mul\).*change the batch dimension"),
    ([N("Mod", ["x", "x"], ["y"], name="mod", fmod=1)], {}, r"node 'mod' \(op Mod\) is not supported"),
], ids=["slice-batch", "gather-shuffle", "resize-cubic", "resize-ceil", "pad-channels", "pad-wrap",
        "unsqueeze-batch", "softmax-batch", "reduce-batch", "min-dynamic", "broadcast-batch", "unknown-op"])
def test_unsupported_settings_name_node_and_op(nodes, inits, message, tmp_path):
    path = model_file(tmp_path, nodes, inits, shape=(2, 4, 8, 8), opset=18)
    with pytest.raises(UnsupportedOpError, match=message):
        load_onnx(path)


def test_tolerance_helper_fails_on_a_real_difference():
    with pytest.raises(AssertionError):
        assert_close(torch.ones(3) * (1 + 2e-3), np.ones(3))
