"""Genuine Caffe deploy files: BVLC's AlexNet, CaffeNet, GoogLeNet, LeNet, CIFAR-10 full and the fully
convolutional CaffeNet of the net-surgery example, and Kaiming He's ResNet-50 and ResNet-101.

* Parameter counts equal the published ones and a closed form computed here, layer by layer.
* Numerics: random Caffe blobs, written as a binary .caffemodel, loaded by the frontend; the compiled
  graph's output equals :class:`CaffeReference`, a forward pass written here from Caffe's layer
  semantics with plain torch calls (explicit window loops for CEIL pooling and its divisors, the LRN
  formulas, BatchNorm's stored normaliser), not the project's lowering.
* Round trips IR -> prototxt + weights -> IR give the same numbers, also for the further layer types
  (Slice, Crop, Power, Deconvolution, Reshape, PReLU, ELU, BNLL, ...), and the backend refuses ops that
  Caffe has no layer for, naming node and op.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from automtl_compiler.proto import caffe_pb2
from google.protobuf import text_format

from automtl_compiler import Graph, export_prototxt, to_torch
from automtl_compiler.errors import (
    AutomtlError,
    ParseError,
    ShapeError,
    UnsupportedOpError,
)
from automtl_compiler.frontends.prototxt import load_prototxt
from automtl_compiler.passes.feature import find_feature_node
from tests.caffe_deploy_gen import (
    INCEPTION,
    RESNET_BLOCKS,
    googlenet_deploy,
    resnet_deploy,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "caffe"


@pytest.fixture(scope="module")
def deploy(tmp_path_factory) -> dict[str, Path]:
    """Every deploy file by short name; GoogLeNet and ResNet-101 are generated (see caffe_deploy_gen)."""
    out = tmp_path_factory.mktemp("generated")
    (out / "bvlc_googlenet.prototxt").write_text(googlenet_deploy())
    (out / "ResNet-101-deploy.prototxt").write_text(resnet_deploy(101))
    return {"alexnet": FIXTURES / "bvlc_alexnet.prototxt", "caffenet": FIXTURES / "bvlc_reference_caffenet.prototxt",
            "caffenet_fc": FIXTURES / "bvlc_caffenet_full_conv.prototxt", "lenet": FIXTURES / "lenet.prototxt",
            "cifar10": FIXTURES / "cifar10_full.prototxt", "resnet50": FIXTURES / "ResNet-50-deploy.prototxt",
            "googlenet": out / "bvlc_googlenet.prototxt", "resnet101": out / "ResNet-101-deploy.prototxt"}


# ---------------------------------------------------------------- closed-form parameter counts


def conv(cin: int, cout: int, k: int, groups: int = 1, bias: bool = True) -> int:
    return cout * (cin // groups) * k * k + (cout if bias else 0)


def fc(cin: int, cout: int) -> int:
    return cin * cout + cout


def alexnet() -> int:
    return (conv(3, 96, 11) + conv(96, 256, 5, 2) + conv(256, 384, 3) + conv(384, 384, 3, 2) + conv(384, 256, 3, 2)
            + fc(256 * 6 * 6, 4096) + fc(4096, 4096) + fc(4096, 1000))


def googlenet() -> int:
    total, cin = conv(3, 64, 7) + conv(64, 64, 1) + conv(64, 192, 3), 192
    for a, b_reduce, b, c_reduce, c, proj in INCEPTION.values():
        total += (conv(cin, a, 1) + conv(cin, b_reduce, 1) + conv(b_reduce, b, 3) + conv(cin, c_reduce, 1)
                  + conv(c_reduce, c, 5) + conv(cin, proj, 1))
        cin = a + b + c + proj
    return total + fc(cin, 1000)


def resnet(depth: int, conv1_bias: bool) -> int:
    """Convolutions, the Scale layers' gamma and beta (the batch norms' affine part), fc1000."""
    bn = 2
    total, cin = conv(3, 64, 7, bias=conv1_bias) + bn * 64, 64
    for blocks, width in zip(RESNET_BLOCKS[depth], (64, 128, 256, 512)):
        for i in range(blocks):
            total += conv(cin, width, 1, bias=False) + conv(width, width, 3, bias=False)
            total += conv(width, 4 * width, 1, bias=False) + bn * (2 * width + 4 * width)
            if i == 0:
                total += conv(cin, 4 * width, 1, bias=False) + bn * 4 * width
            cin = 4 * width
    return total + fc(cin, 1000)


#: name -> (closed form, published count). Published: the BVLC model zoo / torchvision tables (AlexNet,
#: GoogLeNet without auxiliary classifiers, ResNet-50/101), Caffe's MNIST example (LeNet). Kaiming He's
#: ResNet-50 deploy file gives conv1 a bias (ResNet-101's has bias_term: false): 64 more than torchvision's.
COUNTS = {
    "alexnet": (alexnet(), 60_965_224), "caffenet": (alexnet(), 60_965_224), "caffenet_fc": (alexnet(), 60_965_224),
    "lenet": (conv(1, 20, 5) + conv(20, 50, 5) + fc(50 * 4 * 4, 500) + fc(500, 10), 431_080),
    "cifar10": (conv(3, 32, 5) + conv(32, 32, 5) + conv(32, 64, 5) + fc(64 * 4 * 4, 10), None),
    "googlenet": (googlenet(), 6_998_552),
    "resnet50": (resnet(50, conv1_bias=True), 25_557_032 + 64),
    "resnet101": (resnet(101, conv1_bias=False), 44_549_160),
}


@pytest.mark.parametrize("name", list(COUNTS))
def test_parameter_counts(deploy, name):
    closed, published = COUNTS[name]
    assert load_prototxt(deploy[name]).num_parameters() == closed
    assert published is None or closed == published


def test_resnet50_literal_file_is_what_the_generator_writes():
    """The generated ResNet-101 is written exactly like the checked-in ResNet-50 (tabs, field order, blank lines)."""
    assert resnet_deploy(50) == (FIXTURES / "ResNet-50-deploy.prototxt").read_text()


# ---------------------------------------------------------------- binary .caffemodel writer (wire format)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _blob(t: torch.Tensor, legacy: bool) -> bytes:
    """A BlobProto: its shape (``shape`` or the legacy 4-D num/channels/height/width), then the packed floats."""
    proto = caffe_pb2.BlobProto()
    if legacy:
        proto.num, proto.channels, proto.height, proto.width = (1,) * (4 - t.dim()) + tuple(t.shape)
    else:
        proto.shape.dim.extend(t.shape)
    return proto.SerializeToString() + _field(5, t.detach().float().contiguous().numpy().tobytes())


def write_caffemodel(path: Path, blobs: dict[str, list[torch.Tensor]], v1: bool = False) -> Path:
    """Caffe's NetParameter with the layers' blobs; ``v1`` writes the old ``layers`` (field 2) format of the
    BVLC model-zoo files, with legacy blob shapes."""
    layers = []
    for name, tensors in blobs.items():
        if v1:   # V1LayerParameter: name = 4, blobs = 6
            layers.append(_field(2, _field(4, name.encode()) + b"".join(_field(6, _blob(t, True)) for t in tensors)))
        else:    # LayerParameter: name = 1, blobs = 7
            layers.append(_field(100, _field(1, name.encode()) + b"".join(_field(7, _blob(t, False)) for t in tensors)))
    path.write_bytes(b"".join(layers))
    return path


# ---------------------------------------------------------------- the reference: Caffe's semantics


def _pair(p, name: str, default: int) -> tuple[int, int]:
    """A 2-D size of a Caffe parameter: ``name_h``/``name_w``, else one value (or one per axis) of ``name``."""
    base = name.replace("_size", "")
    if f"{base}_h" in p.DESCRIPTOR.fields_by_name and p.HasField(f"{base}_h"):
        return getattr(p, f"{base}_h"), getattr(p, f"{base}_w")
    value = getattr(p, name)
    if isinstance(value, int):
        return (value, value) if p.HasField(name) else (default, default)
    values = list(value) or [default]
    return (values[0], values[-1])


def caffe_pool(x: torch.Tensor, kernel, stride, pad, ave: bool, ceil: bool = True) -> torch.Tensor:
    """Caffe's PoolingLayer: output size rounded up (CEIL) and the last window dropped when it starts in the
    padding; MAX over the window clipped to the input, AVE divided by the window clipped to the padded input."""
    (n, c, h, w), (kh, kw), (sh, sw), (ph, pw) = x.shape, kernel, stride, pad
    rnd = math.ceil if ceil else math.floor
    oh, ow = rnd((h + 2 * ph - kh) / sh) + 1, rnd((w + 2 * pw - kw) / sw) + 1
    if ph or pw:
        oh -= (oh - 1) * sh >= h + ph
        ow -= (ow - 1) * sw >= w + pw
    out = x.new_empty(n, c, oh, ow)
    for i in range(oh):
        hs, he = i * sh - ph, min(i * sh - ph + kh, h + ph)
        for j in range(ow):
            ws, we = j * sw - pw, min(j * sw - pw + kw, w + pw)
            window = x[:, :, max(hs, 0):min(he, h), max(ws, 0):min(we, w)]
            out[:, :, i, j] = window.sum((2, 3)) / ((he - hs) * (we - ws)) if ave else window.amax((2, 3))
    return out


def caffe_lrn(x: torch.Tensor, size: int, alpha: float, beta: float, k: float, within: bool) -> torch.Tensor:
    """ACROSS_CHANNELS: x / (k + alpha / n * sum of x^2 over n neighbouring channels) ** beta; WITHIN_CHANNEL:
    x / (1 + alpha * AVE-pool of x^2 over n x n, padded (n - 1) / 2) ** beta (Caffe ignores k there)."""
    half = (size - 1) // 2
    if within:
        mean_sq = caffe_pool(x * x, (size, size), (1, 1), (half, half), ave=True)
        return x * (1 + alpha * mean_sq) ** -beta
    sq = F.pad(x * x, (0, 0, 0, 0, half, half))
    total = sum(sq[:, i:i + x.shape[1]] for i in range(size))
    return x * (k + alpha / size * total) ** -beta


class CaffeReference:
    """A Caffe deploy net's forward pass; each layer's blobs (Caffe's layout) are drawn on first use."""

    def __init__(self, path: Path, seed: int = 0) -> None:
        self.net = text_format.Parse(path.read_text(), caffe_pb2.NetParameter())
        self.gen = torch.Generator().manual_seed(seed)
        self.blobs: dict[str, list[torch.Tensor]] = {}

    def draw(self, layer, *shapes: tuple[tuple[int, ...], float, float]) -> list[torch.Tensor]:
        """The blobs of ``layer``: (shape, mean, std) each, drawn once."""
        if layer.name not in self.blobs:
            self.blobs[layer.name] = [torch.randn(s, generator=self.gen) * std + mean for s, mean, std in shapes]
        return self.blobs[layer.name]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        values = {next(iter(self.net.input), "data"): x}
        for layer in self.net.layer:
            if layer.type == "Input":
                values[layer.top[0]] = x
                continue
            outs = getattr(self, layer.type)(layer, *(values[b] for b in layer.bottom))
            values.update(zip(layer.top, outs if isinstance(outs, list) else [outs]))
        return values

    def Convolution(self, layer, x):
        p = layer.convolution_param
        (kh, kw), g = _pair(p, "kernel_size", 0), p.group
        fan = x.shape[1] // g * kh * kw
        w, *b = self.draw(layer, ((p.num_output, x.shape[1] // g, kh, kw), 0.0, (2 / fan) ** 0.5),
                          *([((p.num_output,), 0.0, 0.1)] if p.bias_term else []))
        return F.conv2d(x, w, b[0] if b else None, _pair(p, "stride", 1), _pair(p, "pad", 0), _pair(p, "dilation", 1),
                        g)

    def Deconvolution(self, layer, x):
        p = layer.convolution_param
        (kh, kw), g = _pair(p, "kernel_size", 0), p.group
        w, *b = self.draw(layer, ((x.shape[1], p.num_output // g, kh, kw), 0.0, 0.3),
                          *([((p.num_output,), 0.0, 0.1)] if p.bias_term else []))
        return F.conv_transpose2d(x, w, b[0] if b else None, _pair(p, "stride", 1), _pair(p, "pad", 0), 0, g,
                                  _pair(p, "dilation", 1))

    def InnerProduct(self, layer, x):
        p = layer.inner_product_param
        axis = p.axis % x.dim()
        rows = x.reshape(math.prod(x.shape[:axis]), -1)
        shape = (rows.shape[1], p.num_output) if p.transpose else (p.num_output, rows.shape[1])
        w, *b = self.draw(layer, (shape, 0.0, (2 / rows.shape[1]) ** 0.5),
                          *([((p.num_output,), 0.0, 0.1)] if p.bias_term else []))
        y = rows @ (w if p.transpose else w.T) + (b[0] if b else 0)
        return y.reshape(*x.shape[:axis], p.num_output)

    def BatchNorm(self, layer, x):
        c, factor = x.shape[1], 2.5   # Caffe stores mean and variance times a moving-average normaliser
        mean, var, _ = self.draw(layer, ((c,), 0.0, 0.1 * factor), ((c,), factor, 0.2 * factor), ((1,), factor, 0.0))
        shape = (1, -1, 1, 1)
        return (x - (mean / factor).view(shape)) / torch.sqrt((var / factor).view(shape) + layer.batch_norm_param.eps)

    def Scale(self, layer, x):
        gamma, *beta = self.draw(layer, ((x.shape[1],), 1.0, 0.1),
                                 *([((x.shape[1],), 0.0, 0.1)] if layer.scale_param.bias_term else []))
        return x * gamma.view(1, -1, 1, 1) + (beta[0].view(1, -1, 1, 1) if beta else 0)

    def PReLU(self, layer, x):
        (slope,) = self.draw(layer, ((1 if layer.prelu_param.channel_shared else x.shape[1],), 0.25, 0.1))
        return x.clamp(min=0) + slope.view(1, -1, 1, 1) * x.clamp(max=0)

    def Pooling(self, layer, x):
        p = layer.pooling_param
        ave = p.pool == caffe_pb2.PoolingParameter.AVE
        if p.global_pooling:
            return caffe_pool(x, x.shape[2:], (1, 1), (0, 0), ave)
        return caffe_pool(x, _pair(p, "kernel_size", 0), _pair(p, "stride", 1), _pair(p, "pad", 0), ave,
                          p.round_mode == caffe_pb2.PoolingParameter.CEIL)

    def LRN(self, layer, x):
        p = layer.lrn_param
        return caffe_lrn(x, p.local_size, p.alpha, p.beta, p.k, p.norm_region == caffe_pb2.LRNParameter.WITHIN_CHANNEL)

    def ReLU(self, layer, x):
        return x.clamp(min=0) + layer.relu_param.negative_slope * x.clamp(max=0)

    def ELU(self, layer, x):
        return torch.where(x > 0, x, layer.elu_param.alpha * (torch.exp(x) - 1))

    def BNLL(self, layer, x):
        return torch.where(x > 0, x + torch.log1p(torch.exp(-x)), torch.log1p(torch.exp(x)))

    def Power(self, layer, x):
        p = layer.power_param
        return (p.shift + p.scale * x) ** p.power

    def Eltwise(self, layer, *xs):
        p, E = layer.eltwise_param, caffe_pb2.EltwiseParameter
        if p.operation == E.PROD:
            return math.prod(xs[1:], start=xs[0])
        if p.operation == E.MAX:
            return torch.stack(xs).amax(0)
        return sum(c * x for c, x in zip(list(p.coeff) or [1.0] * len(xs), xs))

    def Slice(self, layer, x):
        p = layer.slice_param
        edges = [0, *p.slice_point, x.shape[p.axis]]
        return [x.narrow(p.axis, a, b - a) for a, b in itertools.pairwise(edges)]

    def Crop(self, layer, x, ref):
        p = layer.crop_param
        offsets = list(p.offset) or [0]
        for i, d in enumerate(range(p.axis, x.dim())):
            x = x.narrow(d, offsets[i if len(offsets) > 1 else 0], ref.shape[d])
        return x

    def Reshape(self, layer, x):
        """Reshape from axis 0 (the only form used here): 0 copies a dim, -1 is inferred."""
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(layer.reshape_param.shape.dim)]
        return x.reshape(dims)

    def Softmax(self, layer, x):
        return torch.softmax(x, layer.softmax_param.axis)

    def Concat(self, layer, *xs):
        return torch.cat(xs, layer.concat_param.axis)

    def Flatten(self, layer, x):
        return x.flatten(layer.flatten_param.axis, layer.flatten_param.end_axis)

    def Split(self, layer, x):
        return [x] * len(layer.top)

    def Silence(self, layer, *xs):
        return []

    def Dropout(self, layer, x):
        return x

    def Sigmoid(self, layer, x):
        return 1 / (1 + torch.exp(-x))

    def TanH(self, layer, x):
        return torch.tanh(x)

    def AbsVal(self, layer, x):
        return x.abs()

    def Exp(self, layer, x):
        return x.exp()

    def Log(self, layer, x):
        return x.log()


# ---------------------------------------------------------------- numerics and round trips


def run(graph: Graph, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return to_torch(graph).eval()(x)


def close(out: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


#: name -> (input shape: the smallest the fixed kernels allow, unless noted; compared blob; softmax; round trip).
#: AlexNet/CaffeNet run at 67x67 (pool5 becomes 1x1, so fc6 has 256 inputs); the fully convolutional CaffeNet's
#: 6x6 fc6-conv needs 227x227; the 7x7 pool5 of GoogLeNet and the ResNets needs 223x223 and 195x195.
NUMERICS = {
    "lenet": ((2, 1, 28, 28), "prob", "keep", True),
    "cifar10": ((2, 3, 32, 32), "prob", "keep", True),
    "alexnet": ((1, 3, 67, 67), "fc8", "drop", True),
    "caffenet": ((1, 3, 67, 67), "fc8", "drop", False),
    "caffenet_fc": ((1, 3, 227, 227), "fc8-conv", "drop", False),
    "googlenet": ((1, 3, 223, 223), "loss3/classifier", "drop", True),
    "resnet50": ((1, 3, 195, 195), "fc1000", "drop", True),
    "resnet101": ((1, 3, 195, 195), "fc1000", "drop", False),
}


@pytest.mark.parametrize("name", list(NUMERICS))
def test_deploy_numerics_against_caffe_semantics(deploy, tmp_path, name):
    shape, blob, softmax, round_trip = NUMERICS[name]
    reference = CaffeReference(deploy[name])
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    expected = reference.forward(x)[blob]
    weights = write_caffemodel(tmp_path / "w.caffemodel", reference.blobs)
    graph = load_prototxt(deploy[name], input_shape=shape, weights=weights, softmax=softmax)
    assert graph.node(graph.outputs[0]).shape == tuple(expected.shape)
    out = run(graph, x)
    close(out, expected)
    if round_trip:
        path = export_prototxt(graph, tmp_path / "back.prototxt")
        back = load_prototxt(path, weights=path.with_suffix(".safetensors"), softmax=softmax)
        assert [n.op for n in back.topological_order()] == [n.op for n in graph.topological_order()]
        close(run(back, x), out)   # not bit-exact: oneDNN's summation order follows the tensors' alignment


def test_v1_caffemodel_with_legacy_blob_shapes(deploy, tmp_path):
    """The BVLC model zoo's weights are V1 files (``layers``, 4-D num/channels/height/width blobs)."""
    reference = CaffeReference(deploy["lenet"])
    x = torch.randn(2, 1, 28, 28)
    expected = reference.forward(x)["ip2"]
    v1 = write_caffemodel(tmp_path / "v1.caffemodel", reference.blobs, v1=True)
    close(run(load_prototxt(deploy["lenet"], input_shape=(2, 1, 28, 28), weights=v1), x), expected)


def test_backbone_defaults_cut_at_the_last_spatial_tensor(deploy):
    """A final Softmax is dropped unless kept; a 7x7 pool over a 7x7 map is global pooling, so the trunk of a
    ResNet or GoogLeNet ends at its last block, and LeNet's at the pooling before the first fc. (At 67x67,
    AlexNet's 3x3 pool5 covers all of conv5's 3x3 map: global too, so its trunk ends at relu5.)"""
    shapes = {"resnet50": (1, 3, 224, 224), "googlenet": (1, 3, 224, 224), "alexnet": (1, 3, 67, 67),
              "lenet": (1, 1, 28, 28)}
    features = {"resnet50": "res5c_relu", "googlenet": "inception_5b/output", "alexnet": "relu5", "lenet": "pool2"}
    for name, feature in features.items():
        graph = load_prototxt(deploy[name], input_shape=shapes[name])
        assert "prob" not in graph and find_feature_node(graph) == feature
    kept = load_prototxt(deploy["lenet"], softmax="keep")
    assert kept.outputs == ["prob"] and kept.node("prob").op == "softmax" and kept.node("prob").attrs["dim"] == 1
    assert load_prototxt(deploy["caffenet_fc"]).outputs == ["fc8-conv"]
    with pytest.raises(AutomtlError, match="softmax='maybe'.*drop, keep"):
        load_prototxt(deploy["lenet"], softmax="maybe")


# ---------------------------------------------------------------- further layer types

EXTRAS = """name: "extras"
input: "data"
input_shape { dim: 2 dim: 6 dim: 10 dim: 11 }
layer { name: "split" type: "Split" bottom: "data" top: "a" top: "b" }
layer { name: "slice" type: "Slice" bottom: "a" top: "s1" top: "s2" top: "s3"
        slice_param { axis: 1 slice_point: 2 slice_point: 5 } }
layer { name: "mute" type: "Silence" bottom: "s3" }
layer { name: "mpool" type: "Pooling" bottom: "s2" top: "mpool"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 pad: 1 } }
layer { name: "pow" type: "Power" bottom: "s1" top: "pow" power_param { power: 2 scale: 0.5 shift: 1.5 } }
layer { name: "deconv" type: "Deconvolution" bottom: "s2" top: "deconv"
        convolution_param { num_output: 4 kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "crop" type: "Crop" bottom: "deconv" bottom: "b" top: "crop" crop_param { axis: 2 offset: 3 offset: 4 } }
layer { name: "prelu" type: "PReLU" bottom: "crop" top: "prelu" }
layer { name: "elu" type: "ELU" bottom: "pow" top: "elu" elu_param { alpha: 0.7 } }
layer { name: "shared" type: "PReLU" bottom: "elu" top: "shared" prelu_param { channel_shared: true } }
layer { name: "cat" type: "Concat" bottom: "prelu" bottom: "shared" top: "cat" }
layer { name: "within" type: "LRN" bottom: "cat" top: "within"
        lrn_param { local_size: 3 alpha: 0.3 beta: 0.6 k: 2 norm_region: WITHIN_CHANNEL } }
layer { name: "across" type: "LRN" bottom: "within" top: "across"
        lrn_param { local_size: 5 alpha: 0.2 beta: 0.8 k: 1.5 } }
layer { name: "bnll" type: "BNLL" bottom: "across" top: "bnll" }
layer { name: "log" type: "Log" bottom: "bnll" top: "log" }
layer { name: "abs" type: "AbsVal" bottom: "log" top: "abs" }
layer { name: "exp" type: "Exp" bottom: "b" top: "exp" }
layer { name: "tanh" type: "TanH" bottom: "exp" top: "exp" }
layer { name: "prod" type: "Eltwise" bottom: "abs" bottom: "exp" top: "prod" eltwise_param { operation: PROD } }
layer { name: "max" type: "Eltwise" bottom: "prod" bottom: "cat" top: "max" eltwise_param { operation: MAX } }
layer { name: "sum" type: "Eltwise" bottom: "max" bottom: "cat" top: "sum" eltwise_param { coeff: 0.5 coeff: -1 } }
layer { name: "lrelu" type: "ReLU" bottom: "sum" top: "sum" relu_param { negative_slope: 0.1 } }
layer { name: "pool" type: "Pooling" bottom: "sum" top: "pool"
        pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "soft" type: "Softmax" bottom: "pool" top: "soft" }
layer { name: "reshape" type: "Reshape" bottom: "soft" top: "reshape"
        reshape_param { shape { dim: 0 dim: 6 dim: -1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "reshape" top: "ip" inner_product_param { num_output: 5 axis: 2 } }
layer { name: "ipt" type: "InnerProduct" bottom: "ip" top: "ipt" inner_product_param { num_output: 3 transpose: true } }
layer { name: "sig" type: "Sigmoid" bottom: "ipt" top: "sig" }
layer { name: "final" type: "Softmax" bottom: "sig" top: "final" }
"""


def test_further_layer_types_numerics_and_round_trip(tmp_path):
    path = tmp_path / "extras.prototxt"
    path.write_text(EXTRAS)
    reference = CaffeReference(path)
    x = torch.randn(2, 6, 10, 11, generator=torch.Generator().manual_seed(2))
    expected = reference.forward(x)
    graph = load_prototxt(path, weights=write_caffemodel(tmp_path / "w.caffemodel", reference.blobs))
    ops = {n.name: n.op for n in graph.nodes()}
    assert ops["slice/s1"] == ops["slice/s2"] == ops["crop"] == "slice" and "slice/s3" not in graph
    assert [ops[n] for n in ("pow", "deconv", "prelu", "elu", "within", "bnll", "soft", "reshape")] == \
        ["affine", "conv_transpose2d", "prelu", "elu", "lrn", "softplus", "softmax", "reshape"]
    assert graph.node("within").attrs["k"] == 1.0 and graph.node("shared").params["weight"].shape == (1,)
    assert graph.outputs == ["mpool", "sig"] and "final" not in graph
    # CEIL rounding: AVE 3/2 pad 1 over 10 rows ends with a window cut to the padded input (divisor 2, not 3);
    # MAX 2/2 pad 1 over 11 columns drops a 7th window that would start in the padding
    assert graph.node("pool").shape == (2, 6, 6, 6) and graph.node("mpool").shape == (2, 3, 6, 6)
    for out, name in zip(run(graph, x), graph.outputs):
        close(out, expected[name])
    exported = export_prototxt(graph, tmp_path / "back.prototxt")
    text = exported.read_text()
    for part in ('type: "Slice"', 'type: "Silence"', 'type: "Deconvolution"', 'type: "Power"', 'type: "BNLL"',
                 "norm_region: WITHIN_CHANNEL", 'type: "Reshape"', "channel_shared: true", "axis: -1"):
        assert part in text, part
    back = load_prototxt(exported, weights=exported.with_suffix(".safetensors"))
    for out, again in zip(run(back, x), run(graph, x)):
        close(out, again)


# ---------------------------------------------------------------- export: ops with and without a Caffe layer


def one_op(op: str, attrs: dict, shape=(1, 4, 6, 6), binary: bool = False) -> Graph:
    """A graph of one node ``n`` (of the input ``x``, and of ``sigmoid(x)`` when ``binary``)."""
    g = Graph("one")
    g.add_input("x", shape)
    if binary:
        g.add_node("s", "sigmoid", ["x"])
    g.add_node("n", op, ["x", "s"] if binary else ["x"], attrs)
    g.set_outputs(["n"])
    return g.materialise()


@pytest.mark.parametrize("op,attrs,shape", [
    ("sqrt", {}, (1, 4, 6, 6)), ("reciprocal", {}, (1, 4, 6, 6)), ("exp", {}, (1, 4, 6, 6)),
    ("pad", {"pads": (-1, -2, 0, -3)}, (1, 4, 6, 7)), ("pad", {"pads": (0, 0, 0, 0)}, (1, 4, 6, 6)),
    ("slice", {"dim": -1, "start": 1, "end": -2}, (1, 4, 6, 7)),
    ("slice", {"dim": 1, "start": 0, "end": 4}, (1, 4, 6, 6)),
    ("conv_transpose2d", {"out_channels": 6, "kernel_size": 2, "stride": 2, "groups": 2, "bias": True}, (1, 4, 5, 5)),
    ("linear", {"out_features": 3, "bias": True}, (1, 4, 6)), ("sub", {}, (1, 4, 6, 6)),
])
def test_export_writes_caffe_layers_that_read_back_to_the_same_numbers(tmp_path, op, attrs, shape):
    g = one_op(op, attrs, shape, binary=op == "sub")
    path = export_prototxt(g, tmp_path / "one.prototxt")
    back = load_prototxt(path, weights=path.with_suffix(".safetensors"))
    x = torch.rand(shape) + 0.5
    torch.testing.assert_close(run(back, x), run(g, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("op,attrs,binary,match", [
    ("div", {}, 1, "op 'div' has no Caffe layer"),
    ("permute", {"dims": (0, 2, 3, 1)}, 0, "op 'permute' has no Caffe layer"),
    ("resize", {"size": (12, 12), "mode": "bilinear"}, 0, "op 'resize' has no Caffe layer"),
    ("layernorm", {}, 0, "op 'layernorm' has no Caffe layer"),
    ("groupnorm", {"num_groups": 2}, 0, "op 'groupnorm' has no Caffe layer"),
    ("sum", {"dim": (0,)}, 0, "op 'sum' has no Caffe layer"),
    ("amax", {"dim": (1,)}, 0, "op 'amax' has no Caffe layer"),
    ("erf", {}, 0, "op 'erf' has no Caffe layer"),
    ("mish", {}, 0, "op 'mish' has no Caffe layer"),
    ("lrn", {"size": 3, "k": 2.0, "region": "within"}, 0, "k=2.0 within a channel"),
    ("conv_transpose2d", {"out_channels": 2, "kernel_size": 3, "stride": 2, "output_padding": 1}, 0, "output_padding"),
    ("pad", {"pads": (1, 1, 0, 0)}, 0, "Caffe has no padding layer"),
    ("slice", {"dim": 2, "start": 0, "end": 6, "step": 2}, 0, "step 2"),
    ("lrn", {"size": 4}, 0, "odd local_size"),
    ("softplus", {"beta": 2.0}, 0, "BNLL"),
])
def test_export_refuses_what_caffe_cannot_express(tmp_path, op, attrs, binary, match):
    # permute, layernorm and positive pads are AutoMTL dialect layers (tests/backends/test_prototxt_extensions.py).
    dialects = ["caffe"] if op in ("permute", "layernorm", "pad") else ["automtl", "caffe"]
    for dialect in dialects:
        with pytest.raises(UnsupportedOpError, match=match) as info:
            export_prototxt(one_op(op, attrs, binary=bool(binary)), tmp_path / "x.prototxt", dialect=dialect)
        assert "node 'n'" in str(info.value)
        assert not (tmp_path / "x.prototxt").exists()


# ---------------------------------------------------------------- frontend errors


SMALL = """name: "e"
input: "data"
input_shape { dim: 1 dim: 4 dim: 6 dim: 6 }
"""


@pytest.mark.parametrize("layer,error,match", [
    ('type: "LRN" bottom: "data" top: "y" lrn_param { local_size: 4 }', ParseError, "odd size"),
    ('type: "Slice" bottom: "data" top: "y" top: "z" slice_param { axis: 0 }', UnsupportedOpError, "batch axis"),
    ('type: "Slice" bottom: "data" top: "y" top: "z" slice_param { slice_point: 4 slice_point: 2 }', ParseError,
     "need 3 tops"),
    ('type: "Slice" bottom: "data" top: "y" top: "z" top: "w"', ParseError, "3 equal parts"),
    ('type: "Reshape" bottom: "data" top: "y" reshape_param { shape { dim: -1 dim: 36 } }', UnsupportedOpError,
     "batch dimension"),
    ('type: "Reshape" bottom: "data" top: "y" reshape_param { shape { dim: 0 dim: 5 dim: -1 } }', ShapeError,
     "cannot infer"),
    ('type: "Crop" bottom: "data" bottom: "data" top: "y" crop_param { offset: 1 }', ShapeError, "exceeds"),
    ('type: "InnerProduct" bottom: "data" top: "y" inner_product_param { num_output: 2 axis: 0 }',
     UnsupportedOpError, "batch"),
])
def test_frontend_errors_name_the_layer(tmp_path, layer, error, match):
    path = tmp_path / "e.prototxt"
    path.write_text(SMALL + f'layer {{\n  name: "bad"\n  {layer}\n}}\n')
    with pytest.raises(error, match=match) as info:
        load_prototxt(path)
    assert "'bad'" in str(info.value) and str(path) in str(info.value)
