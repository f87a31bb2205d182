"""Pruning: any policy prunes to a model equal to the SuperModel in fixed mode, with shared work once."""

from __future__ import annotations

import networkx as nx
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from automtl_compiler import SuperModel, build_supermodel
from automtl_compiler.backends.torch_codegen import module_name
from automtl_compiler.nn.compact import CompactModel, prune
from automtl_compiler.nn.heads import ASPPHead, ClassificationHead
from automtl_compiler.nn.policy import Policy
from automtl_compiler.passes.fold_bn import fold_batchnorm
from tests.helpers import Small, randomise_bn

TASKS = ("seg", "depth", "cls")


def make_supermodel(backbone: nn.Module, shape: tuple[int, ...], channels: int) -> SuperModel:
    torch.manual_seed(0)
    heads = {"seg": ASPPHead(channels, 3, hidden=4, rates=(1, 2)), "depth": ASPPHead(channels, 1, hidden=4, rates=(1,)),
             "cls": ClassificationHead(channels, 5)}
    sm = build_supermodel(randomise_bn(backbone), heads, input_shape=shape).eval()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # every branch gets its own weights and statistics
        for p in sm.specific.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        for m in sm.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.add_(torch.randn(m.num_features, generator=gen) * 0.05)
    return sm


@pytest.fixture(scope="module")
def small() -> SuperModel:
    return make_supermodel(Small(), (2, 3, 12, 12), 16)


def unique_reachable_params(sm: SuperModel, policy: Policy) -> int:
    """Parameters reachable under ``policy`` counted from the SuperModel's modules, each tensor once."""
    seen: dict[int, int] = {}
    for task, choices in policy.choices.items():
        for u in sm.units:
            key, choice = module_name(u.conv), choices[u.conv]
            mods = ([sm.backbone[key]] + ([sm.backbone[module_name(u.bn)]] if u.bn else []) if choice == "share"
                    else list(sm.specific[key][task].values()) if choice == "specific"
                    else [sm.skip[key][task]] if key in sm.skip else [])
            for m in mods:
                seen.update({id(p): p.numel() for p in m.parameters()})
        seen.update({id(p): p.numel() for p in sm.heads[task].parameters()})
    units = {module_name(u.conv) for u in sm.units} | {module_name(u.bn) for u in sm.units if u.bn}
    for key, m in sm.backbone.items():
        if key not in units:
            seen.update({id(p): p.numel() for p in m.parameters()})
    return sum(seen.values())


policies = st.lists(st.sampled_from(["share", "specific", "skip"]), min_size=4 * len(TASKS),
                    max_size=4 * len(TASKS))


@settings(max_examples=25, deadline=None)
@given(flat=policies)
def test_any_policy_prunes_to_an_equal_model(small, flat):
    units = small.unit_names
    policy = Policy({t: dict(zip(units, flat[i * 4:(i + 1) * 4])) for i, t in enumerate(TASKS)})
    compact = prune(small, policy).eval()
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(len(flat)))
    with torch.no_grad():
        outs = compact(x)
        for t in TASKS:
            want = small(x, task=t, mode="fixed", policy=policy)
            torch.testing.assert_close(outs[t], want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(compact(x, task=t), want, rtol=1e-5, atol=1e-5)
    assert compact.num_parameters() == unique_reachable_params(small, policy)


def test_all_share_is_one_trunk_and_all_specific_is_t_trunks(small):
    share = Policy({t: {u: "share" for u in small.unit_names} for t in TASKS})
    one = prune(small, share)
    assert len(set(one.graph.outputs)) == 1
    assert sum(n.op == "conv2d" for n in one.graph.nodes()) == len(small.units)
    assert len(one.heads) == len(TASKS)
    spec = Policy({t: {u: "specific" for u in small.unit_names} for t in TASKS})
    many = prune(small, spec)
    assert len(set(many.graph.outputs)) == len(TASKS)
    assert sum(n.op == "conv2d" for n in many.graph.nodes()) == len(TASKS) * len(small.units)
    assert "stem" not in many.graph, "unused shared weights are gone"


def test_shared_conv_on_diverged_branches_is_stored_once(small):
    units = small.unit_names
    choices = {"seg": {u: "share" for u in units}, "depth": {u: "share" for u in units},
               "cls": {u: "share" for u in units}}
    choices["seg"][units[0]] = "specific"  # seg diverges at the first unit, then shares the rest
    compact = prune(small, Policy(choices))
    copies = [n for n in compact.graph.nodes() if n.source == units[-1] and n.op == "conv2d"]
    assert len(copies) == 2, "the last shared conv runs on two branches"
    assert copies[0].params["weight"] is copies[1].params["weight"]
    params = dict(compact.trunk.named_parameters())
    assert len(params) < len(dict(compact.trunk.named_parameters(remove_duplicate=False)))


def test_per_task_forward_runs_only_that_tasks_nodes(small):
    units = small.unit_names
    choices = {t: {u: "specific" for u in units} for t in TASKS}
    compact = prune(small, Policy(choices))
    code = compact._trunk_for("seg").code
    assert "depth" not in code and "cls" not in code and "seg" in code
    assert set(compact.task_nodes("seg")) & set(compact.task_nodes("cls")) == {"x"}


def test_skip_projection_with_crop(small):
    unit = small.mt.unit("valid")
    assert not unit.skip.identity and any(unit.skip.pad), "a valid-padding conv needs a cropped projection"
    policy = Policy({t: {u: "skip" for u in small.unit_names} for t in TASKS})
    compact = prune(small, policy)
    assert any(n.op == "pad" for n in compact.graph.nodes())


def test_fold_batchnorm_is_exact_in_eval(small):
    policy = small.sample_policy(seed=4)
    compact = prune(small, policy).eval()
    folded = prune(small, policy, fold_bn=True).eval()
    assert not any(n.op == "batchnorm2d" and graph_input_is_conv(folded.graph, n) for n in folded.graph.nodes())
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        a, b = compact(x), folded(x)
    for t in TASKS:
        torch.testing.assert_close(a[t], b[t], rtol=1e-5, atol=1e-5)
    folded_graph, changed = fold_batchnorm(compact.graph)
    assert changed and nx.is_directed_acyclic_graph(folded_graph.nx)


def graph_input_is_conv(graph, node) -> bool:
    return graph.node(node.inputs[0]).op == "conv2d"


def test_save_load_keeps_ties_and_outputs(tmp_path, small):
    units = small.unit_names
    choices = {t: {u: "share" for u in units} for t in TASKS}
    choices["cls"][units[0]] = "skip"
    compact = prune(small, Policy(choices)).eval()
    compact.save(tmp_path / "c")
    again = CompactModel.load(tmp_path / "c").eval()
    assert again.num_parameters() == compact.num_parameters()
    x = torch.randn(1, 3, 12, 12)
    with torch.no_grad():
        for t in TASKS:
            torch.testing.assert_close(again(x)[t], compact(x)[t], rtol=0, atol=0)
    assert "parameter saving" in compact.summary()


def test_resnet18_sampled_policy_parity():
    sm = make_supermodel(torchvision.models.resnet18(), (1, 3, 32, 32), 512)
    with torch.no_grad():
        for p in sm.policy_parameters():
            p.copy_(torch.randn(3))
    policy = sm.sample_policy(seed=0)
    compact = prune(sm, policy).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for t in TASKS:
            torch.testing.assert_close(compact(x)[t], sm(x, task=t, mode="fixed", policy=policy), rtol=1e-5,
                                       atol=1e-5)
    assert compact.num_parameters() == unique_reachable_params(sm, policy)
