"""SuperModel: exact references for every branch and mode, parameter counts, policies, files."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from automtl_compiler import build_supermodel
from automtl_compiler.backends.torch_codegen import module_name, to_torch
from automtl_compiler.errors import AutomtlError, FileFormatError
from automtl_compiler.nn.heads import ASPPHead, ClassificationHead
from automtl_compiler.nn.policy import Policy, gumbel_softmax
from automtl_compiler.nn.supermodel import SuperModel
from tests.helpers import Tiny, randomise_bn

TASKS = ("seg", "depth")
SHAPE = (2, 3, 64, 64)



@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    tv = randomise_bn(torchvision.models.resnet18()).eval()
    heads = {t: ASPPHead(512, 3, hidden=16) for t in TASKS}
    sm = build_supermodel(tv, heads, input_shape=SHAPE).eval()
    return tv, sm


def trunk(tv: nn.Module) -> nn.Module:
    return nn.Sequential(*list(tv.children())[:-2])


def module_at(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    *parents, leaf = path.split(".")
    for p in parents:
        root = getattr(root, p)
    return root, leaf


def policy_with(sm: SuperModel, default: str, **overrides: str) -> Policy:
    return Policy({t: {u: overrides.get(u, default) for u in sm.unit_names} for t in sm.tasks})


def test_all_share_equals_backbone_and_heads(resnet):
    tv, sm = resnet
    x = torch.randn(*SHAPE)
    with torch.no_grad():
        feats = trunk(tv)(x)
        for t in TASKS:
            torch.testing.assert_close(sm(x, task=t), sm.heads[t](feats), rtol=1e-5, atol=1e-5)


def test_all_specific_equals_backbone_with_task_weights(resnet):
    tv, sm = resnet
    task = "depth"
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for u in sm.units:
            branch = sm.specific[module_name(u.conv)][task]
            branch.conv.weight.add_(torch.randn(branch.conv.weight.shape, generator=gen) * 0.01)
            branch.bn.running_mean.add_(0.05)
    ref = copy.deepcopy(tv)
    for u in sm.units:
        branch = sm.specific[module_name(u.conv)][task]
        for ir_name, mod in ((u.conv, branch.conv), (u.bn, branch.bn)):
            parent, leaf = module_at(ref, sm.mt.graph.node(ir_name).source)
            setattr(parent, leaf, mod)
    x = torch.randn(*SHAPE)
    with torch.no_grad():
        got = sm(x, task=task, mode="fixed", policy=policy_with(sm, "specific"))
        torch.testing.assert_close(got, sm.heads[task](trunk(ref)(x)), rtol=1e-5, atol=1e-5)
        share = sm(x, task=task, mode="fixed", policy=policy_with(sm, "share"))
    assert not torch.allclose(got, share), "specific weights were perturbed: outputs must differ"


def test_skip_with_equal_shapes_removes_the_unit(resnet):
    tv, sm = resnet
    unit = sm.mt.unit("layer1_0_conv2")
    assert unit.skip.identity and unit.bn == "layer1_0_bn2"
    ref = copy.deepcopy(tv)
    ref.layer1[0].conv2 = nn.Identity()
    ref.layer1[0].bn2 = nn.Identity()
    x = torch.randn(*SHAPE)
    with torch.no_grad():
        got = sm(x, task="seg", mode="fixed", policy=policy_with(sm, "share", layer1_0_conv2="skip"))
        torch.testing.assert_close(got, sm.heads["seg"](trunk(ref)(x)), rtol=1e-5, atol=1e-5)


def test_skip_with_shape_change_is_projection(resnet):
    tv, sm = resnet
    unit = sm.mt.unit("layer2_0_conv1")
    assert not unit.skip.identity and unit.skip.pad == (0, 0, 0, 0)
    proj = sm.skip["layer2_0_conv1"]["seg"]
    assert proj.conv.kernel_size == (1, 1) and proj.conv.stride == (2, 2) and proj.conv.in_channels == 64
    ref = copy.deepcopy(tv)
    ref.layer2[0].conv1 = nn.Conv2d(64, 128, 1, stride=2, bias=False)
    ref.layer2[0].conv1.weight.data.copy_(proj.conv.weight)
    ref.layer2[0].bn1 = copy.deepcopy(proj.bn)
    x = torch.randn(*SHAPE)
    with torch.no_grad():
        got = sm(x, task="seg", mode="fixed", policy=policy_with(sm, "share", layer2_0_conv1="skip"))
        torch.testing.assert_close(got, sm.heads["seg"](trunk(ref)(x)), rtol=1e-5, atol=1e-5)


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    heads = {t: ClassificationHead(8, 2) for t in TASKS}
    sm = build_supermodel(randomise_bn(Tiny()), heads, input_shape=(2, 3, 8, 8)).eval()
    with torch.no_grad():
        for p in sm.policy_parameters():
            p.copy_(torch.randn(3))
    return sm


def by_hand(sm: SuperModel, x: torch.Tensor, task: str, weights: torch.Tensor) -> torch.Tensor:
    """Each unit's output as the weighted sum of its three branches, computed module by module."""
    for i, u in enumerate(sm.units):
        key = module_name(u.conv)
        share = sm.backbone[module_name(u.bn)](sm.backbone[key](x))
        spec = sm.specific[key][task].bn(sm.specific[key][task].conv(x))
        skip = sm.skip[key][task].bn(sm.skip[key][task].conv(x)) if key in sm.skip else x
        x = weights[i, 0] * share + weights[i, 1] * spec + weights[i, 2] * skip
        if i == 0:
            x = F.relu(x)
    return sm.heads[task](x)


def test_soft_mode_with_seeded_noise_equals_weighted_sum(tiny):
    x = torch.randn(2, 3, 8, 8)
    got = tiny.forward_all(x, mode="soft", tau=2.0, generator=torch.Generator().manual_seed(7))
    gates = gumbel_softmax(torch.stack([tiny.logits(t) for t in tiny.tasks]), 2.0, torch.Generator().manual_seed(7))
    assert torch.allclose(gates.sum(-1), torch.ones(2, 2))
    for ti, t in enumerate(tiny.tasks):
        torch.testing.assert_close(got[t], by_hand(tiny, x, t, gates[ti]), rtol=1e-5, atol=1e-5)


def test_pretrain_mode_is_mean_of_branches(tiny):
    x = torch.randn(2, 3, 8, 8)
    third = torch.full((2, 3), 1 / 3)
    for t in tiny.tasks:
        torch.testing.assert_close(tiny(x, task=t, mode="pretrain"), by_hand(tiny, x, t, third))


def test_hard_mode_follows_argmax_of_logits(tiny):
    x = torch.randn(2, 3, 8, 8)
    for t in tiny.tasks:
        onehot = F.one_hot(tiny.logits(t).argmax(-1), 3).float()
        torch.testing.assert_close(tiny(x, task=t, mode="hard"), by_hand(tiny, x, t, onehot))


def test_gradients_reach_logits_only_in_soft_mode(tiny):
    x = torch.randn(2, 3, 8, 8)
    tiny.train()
    tiny.forward_all(x, mode="soft")["seg"].sum().backward()
    assert tiny.policy["conv1"]["seg"].grad.abs().sum() > 0
    assert tiny.policy["conv1"]["depth"].grad is None or tiny.policy["conv1"]["depth"].grad.abs().sum() == 0
    tiny.zero_grad(set_to_none=True)
    for mode, kw in (("hard", {}), ("fixed", {"policy": tiny.sample_policy(seed=1)})):
        tiny.forward_all(x, mode=mode, **kw)["seg"].sum().backward()
        assert all(p.grad is None for p in tiny.policy_parameters()), mode
        assert any(p.grad is not None for p in tiny.network_parameters())


def test_regulariser_closed_form(tiny):
    g = gumbel_softmax(tiny.logits("seg"), 3.0, torch.Generator().manual_seed(5))
    depth_weight = torch.tensor([1.0, 0.5])  # D = 2 levels: conv1 at depth 0, conv2 at depth 1
    want = sum(depth_weight[i] * (F.softplus(6 * (g[i, 1] - g[i, 0])) + F.softplus(6 * (g[i, 2] - g[i, 0])))
               for i in range(2))
    got = tiny.policy_regulariser("seg", tau=3.0, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, want)
    got.backward()
    assert tiny.policy["conv2"]["seg"].grad.abs().sum() > 0


@pytest.mark.parametrize("tasks,millions", [(2, 64.55), (3, 86.18), (5, 129.45)])
def test_parameter_counts_for_resnet34(tasks, millions):
    backbone = torchvision.models.resnet34()
    heads = {f"t{i}": ASPPHead(512, 2, hidden=4) for i in range(tasks)}
    sm = build_supermodel(backbone, heads, input_shape=(1, 3, 64, 64))
    counts = sm.parameter_counts()
    convs = [m for m in trunk(backbone).modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in trunk(backbone).modules() if isinstance(m, nn.BatchNorm2d)]
    skips = [u.skip for u in sm.units if not u.skip.identity]
    formula = (sum(c.weight.numel() for c in convs) * (1 + tasks)
               + tasks * sum(s.in_channels * s.out_channels + 2 * s.out_channels for s in skips)
               + (1 + tasks) * sum(2 * b.num_features for b in bns))
    assert counts["total"] - counts["heads"] - counts["policy"] == formula
    assert formula / 1e6 == pytest.approx(millions, abs=0.005)
    assert counts["policy"] == 3 * tasks * len(convs) == 3 * tasks * len(sm.units)


def test_bundled_automtl_resnet34_counts():
    """AutoMTL's DeepLab ResNet-34 (the bundled prototxt), T = 3: the figure from the AutoMTL setting."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "models" / "deeplab_resnet34.prototxt"
    heads = {f"t{i}": ASPPHead(512, 2, hidden=4) for i in range(3)}
    sm = build_supermodel(str(path), heads, input_shape=(1, 3, 64, 64))
    counts = sm.parameter_counts()
    assert counts["total"] - counts["heads"] - counts["policy"] == 86_182_592
    assert len(sm.units) == 36 and sm.mt.num_levels == 33


def test_forward_all_equals_per_task_calls_and_shares_work(resnet):
    _, sm = resnet
    x = torch.randn(*SHAPE)
    mixed = policy_with(sm, "share")
    mixed.choices["depth"]["layer3_0_conv1"] = "specific"
    with torch.no_grad():
        for mode, kw in (("hard", {}), ("fixed", {"policy": mixed}), ("pretrain", {})):
            both = sm.forward_all(x, mode=mode, **kw)
            for t in TASKS:
                torch.testing.assert_close(both[t], sm(x, task=t, mode=mode, **kw), rtol=0, atol=0)
    shared = sm.generated_code("hard")
    assert shared.count("self.backbone.layer1_0_conv1(") == 1 and shared.count("self.backbone.layer4_1_conv2(") == 1
    split = sm.generated_code("fixed", policy=mixed)
    assert split.count("self.backbone.layer2_1_conv2(") == 1, "units before the first difference run once"
    assert split.count("self.backbone.layer4_1_conv2(") == 2, "after it, each task has its own path"
    soft = sm.generated_code("soft")
    assert soft.count("self.backbone.conv1(") == 1, "the image's share conv is computed once for all tasks"


def test_policy_sampling_json_and_validation(tmp_path, resnet):
    _, sm = resnet
    p = sm.sample_policy("sample", seed=3)
    assert p.choices == sm.sample_policy("sample", seed=3).choices
    assert sm.sample_policy("argmax").counts()["seg"]["share"] == len(sm.units)
    path = p.save(tmp_path / "policy.json")
    assert Policy.load(path).choices == p.choices
    bad = Policy({t: dict(c) for t, c in p.choices.items()})
    bad.choices["seg"]["nope"] = "share"
    with pytest.raises(AutomtlError, match="unknown node.*nope"):
        sm.set_policy(bad)
    with pytest.raises(AutomtlError, match="tasks"):
        sm.set_policy(Policy({"seg": p.choices["seg"]}))
    (tmp_path / "junk.json").write_text("[1, 2]")
    with pytest.raises(FileFormatError, match="junk.json"):
        Policy.load(tmp_path / "junk.json")
    dist = sm.policy_distribution()
    assert dist["seg"]["conv1"] == pytest.approx([1 / 3] * 3)


def test_save_load_round_trip(tmp_path, tiny):
    tiny.set_policy(tiny.sample_policy(seed=2))
    tiny.save(tmp_path / "sm")
    again = SuperModel.load(tmp_path / "sm").eval()
    x = torch.randn(2, 3, 8, 8)
    for mode in ("hard", "fixed", "pretrain"):
        for t in TASKS:
            torch.testing.assert_close(again(x, task=t, mode=mode), tiny(x, task=t, mode=mode), rtol=0, atol=0)
    assert set(again.state_dict()) == set(tiny.state_dict())
    (tmp_path / "sm" / "weights.safetensors").write_bytes(b"not weights")
    with pytest.raises(FileFormatError, match="weights.safetensors"):
        SuperModel.load(tmp_path / "sm")


def test_state_dict_names_say_node_task_and_branch(tiny):
    names = set(tiny.state_dict())
    assert {"backbone.conv1.weight", "specific.conv1.seg.conv.weight", "specific.conv1.depth.bn.running_mean",
            "skip.conv1.seg.conv.weight", "policy.conv2.depth", "heads.seg.fc.weight"} <= names


def test_bad_task_specs_are_clear_errors():
    with pytest.raises(AutomtlError, match="duplicate|identifier"):
        build_supermodel(Tiny(), {"a b": ClassificationHead(8, 2)}, input_shape=(1, 3, 8, 8))
    with pytest.raises(AutomtlError, match="non-empty"):
        build_supermodel(Tiny(), {}, input_shape=(1, 3, 8, 8))
    sm = build_supermodel(Tiny(), {"a": ClassificationHead(8, 2)}, input_shape=(1, 3, 8, 8))
    with pytest.raises(AutomtlError, match="unknown task 'b'"):
        sm(torch.randn(1, 3, 8, 8), task="b")
    with pytest.raises(AutomtlError, match="unknown mode"):
        sm(torch.randn(1, 3, 8, 8), mode="warm")
    with pytest.raises(AutomtlError, match="needs a policy"):
        sm(torch.randn(1, 3, 8, 8), mode="fixed")


@pytest.mark.parametrize("name,channels", [("mobilenet_v3_large", 960), ("efficientnet_b0", 1280),
                                           ("mnasnet1_0", 1280), ("vgg16_bn", 512)])
def test_feature_node_skips_squeeze_excitation_pooling(name, channels):
    from automtl_compiler import load_backbone
    from automtl_compiler.passes.feature import find_feature_node

    graph = load_backbone(torchvision.models.get_model(name), input_shape=(1, 3, 64, 64))
    shape = graph.node(find_feature_node(graph)).shape
    assert shape[1] == channels and shape[2] * shape[3] > 1


def test_strided_skip_projection_equals_the_strided_conv_in_value_and_gradient():
    from automtl_compiler.ir.graph import Graph

    g = Graph("skip")
    g.add_input("x", (2, 3, 9, 9))
    g.add_node("proj", "conv2d", ["x"], {"out_channels": 8, "kernel_size": 1, "stride": 2})
    g.set_outputs(["proj"])
    skip = to_torch(g.materialise(seed=0))
    assert type(skip.proj).__name__ == "SubsampledConv2d", "the oneDNN 6035 workaround must be in the lowering"
    conv = nn.Conv2d(3, 8, 1, stride=2, bias=False)
    conv.weight = nn.Parameter(skip.proj.weight.detach().clone())
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    y = skip(x)
    want = conv(x)
    torch.testing.assert_close(y, want)
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, skip.proj.weight), g)
    wx, ww = torch.autograd.grad(want, (x, conv.weight), g)
    torch.testing.assert_close(gx, wx)
    torch.testing.assert_close(gw, ww)


def test_channels_last_soft_step_runs(tmp_path):
    """A soft step in channels_last used to corrupt the heap (oneDNN's strided 1x1 weight gradient on the
    3-channel image, in the first unit's skip projection); run it in a child process so a crash is a failure,
    not the end of the test session."""
    import subprocess
    import sys

    script = tmp_path / "step.py"
    script.write_text(
        "import torch, torchvision\n"
        "from automtl_compiler import build_supermodel\n"
        "from automtl_compiler.nn.heads import ASPPHead\n"
        "torch.set_num_threads(1)\n"
        "torch.manual_seed(0)\n"
        "heads = {t: ASPPHead(512, 2, hidden=8, rates=(1,)) for t in ('a', 'b')}\n"
        "sm = build_supermodel(torchvision.models.resnet18(), heads, input_shape=(2, 3, 96, 96))\n"
        "sm = sm.to(memory_format=torch.channels_last)\n"
        "x = torch.randn(2, 3, 96, 96).to(memory_format=torch.channels_last)\n"
        "for _ in range(3):\n"
        "    outs = sm.forward_all(x, mode='soft', tau=5.0)\n"
        "    loss = sum(o.square().mean() for o in outs.values()) + sm.policy_regulariser('a')\n"
        "    loss.backward()\n"
        "print('ok')\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_a_supermodel_saved_before_the_multitask_ir_loads_with_the_same_outputs(tmp_path):
    """tests/fixtures/supermodel_v1 was written by automtl before the branches were IR nodes (commit 023db14,
    with its outputs): the format is unchanged, so it loads and computes the same numbers in every mode."""
    import json
    import shutil
    from pathlib import Path

    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "supermodel_v1"
    recorded = json.loads((fixture / "outputs.json").read_text())
    sm = SuperModel.load(fixture).eval()
    x = torch.linspace(-1, 1, 3 * 64).reshape(1, 3, 8, 8)
    with torch.no_grad():
        for mode, outputs in recorded.items():
            got = sm.forward_all(x, mode=mode)
            for t, want in outputs.items():
                torch.testing.assert_close(got[t], torch.tensor(want), rtol=1e-5, atol=1e-6)
    again = tmp_path / "again"
    shutil.copytree(fixture, again)
    sm.save(again)
    assert (again / "weights.safetensors").read_bytes() == (fixture / "weights.safetensors").read_bytes()
