"""Multi-task compilation of timm backbones built from the new ops: the feature node is found by itself,
the all-share SuperModel equals the timm model's own ``forward_features`` followed by the heads, and a
mixed policy prunes to a compact model equal to the SuperModel under that policy."""

from __future__ import annotations

import pytest
import torch

from automtl_compiler import build_supermodel
from automtl_compiler.nn.compact import prune
from automtl_compiler.nn.heads import ASPPHead, ClassificationHead
from automtl_compiler.nn.policy import Policy
from tests.helpers import randomise_bn

timm = pytest.importorskip("timm")

SHAPE = (2, 3, 64, 64)
# one model per family, each exercising ops the torchvision backbones never needed
MODELS = [
    "seresnet18",            # squeeze-excitation
    "skresnet18",            # selective kernel: split, sum, softmax over branches
    "resnest14d",            # split attention: reshape, softmax across the radix
    "res2net50_14w_8s",      # channel splits (slices) and concatenations
    "tf_efficientnet_b0",    # TensorFlow 'same' padding, BatchNormAct2d, SiLU
    "mobilenetv3_small_050",  # hard-swish, SE with hard-sigmoid
    "ghostnet_100",          # cheap operations concatenated then sliced
    "convnext_atto",         # channels-last layer norm, permute, linear on 4-D, layer scale
    "nf_resnet26",           # weight standardisation with gain, scalar arithmetic
    "rexnet_100",            # channel padding by slicing and adding
    "regnety_002",           # group convs with SE
]


def _heads(channels: int) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {"seg": ASPPHead(channels, 3, hidden=4, rates=(1,)), "cls": ClassificationHead(channels, 5)}


@pytest.mark.parametrize("name", MODELS)
def test_timm_backbone_compiles_shares_and_prunes(name):
    model = randomise_bn(timm.create_model(name, pretrained=False, num_classes=10)).eval()
    x = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(1))
    called: list[torch.nn.Module] = []
    hooks = [m.register_forward_hook(lambda m, i, o: called.append(m)) for m in model.modules()
             if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        feats = model.forward_features(x)
    for h in hooks:
        h.remove()
    sm = build_supermodel(model, _heads(feats.shape[1]), input_shape=SHAPE).eval()
    assert len(sm.units) == len(called), "every conv call before the features should be a policy-able unit"
    with torch.no_grad():
        for task in ("seg", "cls"):
            torch.testing.assert_close(sm(x, task=task), sm.heads[task](feats), rtol=1e-3, atol=1e-4)
        gen = torch.Generator().manual_seed(7)
        for p in sm.specific.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.01)
        choices = ("share", "specific", "skip")
        units = sm.unit_names
        policy = Policy({t: {u: choices[(i * 7 + 3 * k + len(name)) % 3] for i, u in enumerate(units)}
                         for k, t in enumerate(sm.tasks)})
        compact = prune(sm, policy).eval()
        outs = compact(x)
        for task in sm.tasks:
            torch.testing.assert_close(outs[task], sm(x, task=task, mode="fixed", policy=policy), rtol=1e-4,
                                       atol=1e-4)


def test_timm_source_string_builds_random_weights_and_names_typos():
    from automtl_compiler import load_backbone
    from automtl_compiler.errors import AutomtlError

    graph = load_backbone("timm:resnet18", input_shape=(1, 3, 32, 32))
    assert sum(n.op == "conv2d" for n in graph.nodes()) == 20
    with pytest.raises(AutomtlError, match="timm has no model 'resnet_18'; did you mean resnet18"):
        load_backbone("timm:resnet_18")


@pytest.mark.parametrize(("name", "size"), [("vgg11", 96), ("inception_v3", 96), ("resnet18", 32),
                                            ("convnext_atto", 64)])
def test_feature_node_is_what_forward_features_returns(name, size):
    """VGG's fc6 is a conv over the whole map (and on small images follows an enlarging adaptive pool);
    Inception's last max pools and a 1x1 final map are not global pooling."""
    from automtl_compiler import load_backbone
    from automtl_compiler.passes.feature import find_feature_node

    model = timm.create_model(name, pretrained=False).eval()
    graph = load_backbone(model, input_shape=(1, 3, size, size))
    with torch.no_grad():
        want = model.forward_features(torch.randn(1, 3, size, size))
    assert graph.node(find_feature_node(graph)).shape == tuple(want.shape)
