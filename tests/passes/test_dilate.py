"""The output-stride pass against torchvision's own dilated ResNets."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from automtl_compiler.backends.torch_codegen import to_torch
from automtl_compiler.errors import AutomtlError
from automtl_compiler.frontends import load_backbone
from automtl_compiler.passes.dilate import set_output_stride

from tests.helpers import randomise_bn


@pytest.mark.parametrize(("stride", "dilate"), [(8, [False, True, True]), (16, [False, False, True])])
def test_resnet50_equals_torchvision_dilated(stride: int, dilate: list[bool]) -> None:
    torch.manual_seed(0)
    ref = randomise_bn(torchvision.models.resnet50(replace_stride_with_dilation=dilate)).eval()
    plain = torchvision.models.resnet50().eval()
    plain.load_state_dict(ref.state_dict())
    graph = set_output_stride(load_backbone(plain, input_shape=(1, 3, 64, 64)), stride)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(to_torch(graph).eval()(x), ref(x))
    assert graph.node("layer4_2_relu_2").shape == (1, 2048, 64 // stride, 64 // stride)


def test_resnet18_keeps_weights_and_input() -> None:
    graph = load_backbone(torchvision.models.resnet18(), input_shape=(1, 3, 64, 64))
    dilated = set_output_stride(graph, 8)
    assert dilated.num_parameters() == graph.num_parameters()
    assert graph.node("layer4_1_relu_1").shape == (1, 512, 2, 2)  # the input graph is left alone
    assert dilated.node("layer4_1_relu_1").shape == (1, 512, 8, 8)
    assert dilated.node("layer4_1_conv2").attrs["dilation"] == (4, 4)
    assert dilated.node("layer3_0_conv1").attrs["dilation"] == (1, 1)  # the de-strided conv keeps its rate


def test_bad_output_stride() -> None:
    graph = load_backbone(torchvision.models.resnet18(), input_shape=(1, 3, 64, 64))
    with pytest.raises(AutomtlError, match="power of two"):
        set_output_stride(graph, 12)


def test_pool_that_cannot_drop_its_stride_is_a_clear_error() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1),
                          nn.MaxPool2d(2))
    graph = load_backbone(model, input_shape=(1, 3, 16, 16))
    assert set_output_stride(graph, 4).outputs  # nothing to change at stride 4
    with pytest.raises(AutomtlError, match="output_stride 2 does not fit"):
        set_output_stride(graph, 2)
