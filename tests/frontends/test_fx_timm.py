"""torch.fx frontend on timm CNNs and on the torch functions they use: parity with the original modules,
the IR they map to, and errors that name the module and source line."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from automtl_compiler import to_torch
from automtl_compiler.errors import UnsupportedOpError
from automtl_compiler.frontends.fx import from_module
from tests.helpers import randomise_bn

timm = pytest.importorskip("timm")

#: model (/variant) -> (input size, IR ops its mapping must contain: the feature it covers)
MODELS = {
    "mobilenetv3_small_050": (64, {"hardswish", "hardsigmoid", "mean"}),  # BatchNormAct2d, SE with hard gate
    "skresnet18": (64, {"softmax", "sum", "reshape", "concat"}),  # selective kernel: stack, 5-D softmax
    "resnest14d": (64, {"softmax", "permute", "sum"}),  # split attention: radix softmax, view/transpose
    "res2net50_14w_8s": (64, {"slice", "concat"}),  # torch.split, per-piece convs
    "ghostnet_100": (64, {"concat"}),  # cheap-op concat, channel indexing out[:, :c, :, :] (whole here)
    "tf_efficientnet_b0": (64, {"pad"}),  # Conv2dSame: TF 'same' padding -> pad + conv2d
    "nf_resnet26": (64, {"affine"}),  # ScaledStdConv2d, scalar arithmetic (alpha, beta, gamma)
    "convnext_atto": (64, {"layernorm", "tensor"}),  # LayerNorm2d, 1x1-conv MLP, layer scale
    "convnext_atto/channels_last": (64, {"permute", "layernorm", "linear"}),  # permute, LayerNorm, Linear MLP
    "hrnet_w18_small": (64, {"resize"}),  # nearest upsampling in the fuse layers
    "inception_v3": (75, {"avgpool2d", "maxpool2d", "concat"}),  # functional pools, multi-branch concat
    "densenet121": (64, {"concat"}),  # dense concatenation
    "rexnet_100": (64, {"slice", "concat"}),  # partial-channel residual
}


VARIANTS = {"channels_last": {"conv_mlp": False}}


def _randomised(key: str) -> nn.Module:
    """The timm model with non-trivial batch-norm statistics and layer-scale gammas, in eval mode."""
    name, _, variant = key.partition("/")
    torch.manual_seed(0)
    model = randomise_bn(timm.create_model(name, pretrained=False, num_classes=10, **VARIANTS.get(variant, {})))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_timm_parity(name: str) -> None:
    size, ops = MODELS[name]
    model = _randomised(name)
    shape = (2, 3, size, size)
    graph = from_module(model, input_shape=shape)
    x = torch.randn(*shape)
    with torch.no_grad():
        torch.testing.assert_close(to_torch(graph).eval()(x), model(x), rtol=1e-3, atol=1e-4)
    assert graph.num_parameters() == sum(p.numel() for p in model.parameters())
    assert ops <= {n.op for n in graph.nodes()}
    assert graph.node(graph.outputs[0]).shape == (2, 10)


def test_weight_standardisation_stays_in_the_conv() -> None:
    graph = from_module(_randomised("nf_resnet26"), input_shape=(1, 3, 64, 64))
    convs = [n for n in graph.nodes() if n.op == "conv2d"]
    assert convs and all(n.attrs["weight_std"] is not None and n.attrs["weight_gain"] for n in convs)
    assert all(n.params["gain"].shape == (n.attrs["out_channels"], 1, 1, 1) for n in convs)


@pytest.mark.parametrize("size", [15, 16])
@pytest.mark.parametrize("layer,kernel", [("Conv2dSame", 4), ("MaxPool2dSame", 3)])
def test_tf_same_padding_is_computed_from_the_static_shape(layer: str, kernel: int, size: int) -> None:
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.pool2d_same import MaxPool2dSame

    same = Conv2dSame(3, 4, kernel_size=kernel, stride=2) if layer == "Conv2dSame" else MaxPool2dSame(kernel, 2)
    model = nn.Sequential(same).eval()
    graph = from_module(model, input_shape=(1, 3, size, size))
    total = max((-(-size // 2) - 1) * 2 + kernel - size, 0)  # TF: output size = ceil(size / stride)
    pads = [0, 0, 0, 0]  # left, right, top, bottom: a pad node's, plus the layer's own symmetric padding
    for n in graph.nodes():
        if n.op == "pad":
            pads = [a + b for a, b in zip(pads, n.attrs["pads"])]
        elif n.op in ("conv2d", "maxpool2d"):
            pads = [p + n.attrs["padding"][1 - i // 2] for i, p in enumerate(pads)]
    assert pads == [total // 2, total - total // 2] * 2
    x = torch.randn(1, 3, size, size)
    torch.testing.assert_close(to_torch(graph)(x), model(x))


def test_tracing_leaves_the_module_untouched() -> None:
    model = _randomised("convnext_atto").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    from_module(model, input_shape=(1, 3, 64, 64))
    assert model.training and set(model.state_dict()) == set(before)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class Kitchen(nn.Module):
    """Python-scalar arithmetic, in-place updates, indexing, splitting, shape control flow and resizing."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y.mul_(2.0)  # result ignored: the proxy itself must be updated
        y = (1 - y) / 6 + y ** 2 - (-y) * self.scale
        y[:, 2:5] += y[:, :3].sigmoid()
        a, b = y.chunk(2, dim=1)
        parts = torch.unbind(a, dim=1)
        s = torch.stack(parts[:2], dim=1)
        z = s + b[:, None, 1:3].squeeze(1).flatten(2).view_as(s)
        if z.shape[-1] < 16:  # static shape: decided while tracing
            z = F.interpolate(z, scale_factor=2, mode="nearest")
        z = F.pad(z, (1, 2, 0, 1), mode="reflect").transpose(2, 3)
        w = torch.max(z, dim=1, keepdim=True)[0] * z.amax((2, 3), keepdim=True).softmax(dim=1)
        return torch.cat([w, z.clamp(min=0.1)], 1).mean((2, 3))


@pytest.mark.parametrize("size", [8, 16])
def test_function_and_method_mappings_match_torch(size: int) -> None:
    model = Kitchen().eval()
    graph = from_module(model, input_shape=(2, 3, size, size))
    x = torch.randn(2, 3, size, size)
    torch.testing.assert_close(to_torch(graph)(x), model(x), rtol=1e-5, atol=1e-5)
    assert ("resize" in {n.op for n in graph.nodes()}) == (size < 16)


class Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.mean((1, 2, 3)).sum() > 0:
            return y
        return x


class Net(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1)
        self.block = nn.Sequential(nn.ReLU(), inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.stem(x))


def _line_of(cls: type, text: str) -> int:
    lines, first = inspect.getsourcelines(cls)
    return first + next(i for i, line in enumerate(lines) if text in line)


def test_untraceable_module_names_module_and_line() -> None:
    line = _line_of(Gate, "if y.mean")
    with pytest.raises(UnsupportedOpError) as info:
        from_module(Net(Gate()), input_shape=(1, 3, 8, 8))
    message = str(info.value)
    assert "could not trace Net" in message and "module 'block.1' (Gate)" in message
    assert f"test_fx_timm.py:{line}" in message and "if y.mean((1, 2, 3)).sum() > 0" in message
    assert "data-dependent" in message


class Cumsum(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(x, dim=1)


class Regroup(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(1, -1, 8, 8)


class Unused(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.cumsum(x, dim=1)  # unused: never an error
        return x * 2


@pytest.mark.parametrize("inner,text,reason", [
    (Cumsum(), "torch.cumsum", "function has no IR op"),
    (Regroup(), "x.reshape", "moves the batch dimension"),
])
def test_unmapped_call_names_node_module_and_line(inner: nn.Module, text: str, reason: str) -> None:
    line = _line_of(type(inner), text)
    with pytest.raises(UnsupportedOpError) as info:
        from_module(Net(inner), input_shape=(2, 3, 8, 8))
    message = str(info.value)
    assert f"in module 'block.1' ({type(inner).__name__})" in message and f"test_fx_timm.py:{line}" in message
    assert reason in message


def test_unmapped_call_whose_result_is_unused_is_dropped() -> None:
    graph = from_module(Net(Unused()), input_shape=(1, 3, 8, 8))
    assert [n.op for n in graph.topological_order()] == ["input", "conv2d", "relu", "affine"]
