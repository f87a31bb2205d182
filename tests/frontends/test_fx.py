"""torch.fx frontend: exact parity with torchvision models, FLOPs against torchvision's tables, errors."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from automtl_compiler import load_backbone, to_torch
from automtl_compiler.errors import AutomtlError, ShapeError, UnsupportedOpError
from tests.helpers import randomised

FAST = ["resnet18", "mobilenet_v2", "mobilenet_v3_large", "mnasnet1_0", "efficientnet_b0"]
SLOW = ["resnet34", "resnet50", "vgg16_bn", "densenet121"]



def check_parity(name: str) -> None:
    model = randomised(name)
    shape = (2, 3, 64, 64)
    graph = load_backbone(model, input_shape=shape)
    compiled = to_torch(graph).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    assert graph.num_parameters() == sum(p.numel() for p in model.parameters())
    assert graph.node(graph.outputs[0]).shape == (2, 1000)


@pytest.mark.parametrize("name", FAST)
def test_fx_parity(name):
    check_parity(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_fx_parity_large(name):
    check_parity(name)


@pytest.mark.parametrize("name,weights", [("resnet18", "ResNet18_Weights"), ("mobilenet_v2", "MobileNet_V2_Weights"),
                                          ("mnasnet1_0", "MNASNet1_0_Weights")])
def test_conv_and_linear_flops_match_torchvision_tables(name, weights):
    graph = load_backbone(torchvision.models.get_model(name, weights=None))
    macs = sum(graph.node_flops(n) for n in graph.nodes() if n.op in ("conv2d", "linear"))
    assert macs / 1e9 == pytest.approx(getattr(torchvision.models, weights).DEFAULT.meta["_ops"], abs=6e-4)


def test_torchvision_source_string():
    graph = load_backbone("torchvision:resnet18", input_shape=(1, 3, 32, 32))
    assert graph.num_parameters() == 11_689_512
    with pytest.raises(AutomtlError, match="no model 'resnet19'"):
        load_backbone("torchvision:resnet19")


def test_compiled_module_round_trips_through_fx_again():
    graph = load_backbone(randomised("mobilenet_v2"), input_shape=(1, 3, 32, 32))
    again = load_backbone(to_torch(graph).eval(), input_shape=(1, 3, 32, 32))
    assert [n.op for n in again.topological_order()] == [n.op for n in graph.topological_order()]
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(to_torch(again).eval()(x), to_torch(graph).eval()(x), rtol=0, atol=0)


class WithCumsum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.ReLU(), Cumsummer()))

    def forward(self, x):
        return self.body(x)


class Cumsummer(nn.Module):
    def forward(self, x):
        return torch.cumsum(x, dim=1)


def test_unknown_call_names_fx_node_and_module_path():
    with pytest.raises(UnsupportedOpError, match=r"cumsum.*module 'body\.1\.1'"):
        load_backbone(WithCumsum(), input_shape=(1, 3, 8, 8))


def test_unknown_layer_names_the_module():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm([4, 6, 6]))
    with pytest.raises(UnsupportedOpError, match=r"module '1'.*LayerNorm"):
        load_backbone(model, input_shape=(1, 3, 8, 8))


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


def test_untraceable_module_gives_advice():
    with pytest.raises(UnsupportedOpError, match="could not trace DataDependent.*ONNX"):
        load_backbone(DataDependent(), input_shape=(1, 3, 8, 8))


def test_wrong_input_shape_is_a_clear_error():
    with pytest.raises(ShapeError, match=r"node 'conv1'.*weight.*input shape was \[1, 1, 32, 32\]"):
        load_backbone(torchvision.models.resnet18(), input_shape=(1, 1, 32, 32))


def test_view_that_moves_the_batch_is_rejected():
    class Viewer(nn.Module):
        def forward(self, x):
            return x.view(-1)

    with pytest.raises(UnsupportedOpError, match="view.*moves the batch dimension"):
        load_backbone(Viewer(), input_shape=(2, 3, 4, 4))


def test_view_flatten_is_mapped():
    class Viewer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(48, 2)

        def forward(self, x):
            return self.fc(x.view(x.size(0), -1))

    model = Viewer().eval()
    graph = load_backbone(model, input_shape=(2, 3, 4, 4))
    assert [n.op for n in graph.topological_order()] == ["input", "flatten", "linear"]
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(to_torch(graph)(x), model(x))


def test_training_state_is_preserved():
    model = torchvision.models.resnet18().train()
    load_backbone(model, input_shape=(1, 3, 32, 32))
    assert model.training and model.bn1.num_batches_tracked.item() == 0


def test_graph_copies_a_users_weights_unless_the_module_is_its_own():
    from automtl_compiler.frontends.fx import from_module

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    ptr = model[0].weight.data_ptr()
    copied = from_module(model, input_shape=(1, 3, 8, 8))
    shared = from_module(model, input_shape=(1, 3, 8, 8), copy_tensors=False)
    conv = next(n for n in copied.nodes() if n.op == "conv2d").name
    assert copied.node(conv).params["weight"].data_ptr() != ptr
    assert shared.node(conv).params["weight"].data_ptr() == ptr
    torch.testing.assert_close(copied.node(conv).params["weight"], model[0].weight.detach())
