"""Module names never alias: IR node names that differ only in characters Python cannot hold, keywords,
torch attributes or NFKC forms get distinct attributes, identically in to_torch, the SuperModel and the
compact model; task names that cannot be module keys are one clear error."""

from __future__ import annotations

import dataclasses
import keyword
import unicodedata

import onnx
import pytest
import torch
from torch import nn

from automtl_compiler import build_supermodel, load_backbone
from automtl_compiler.backends.names import Namer, is_reserved, module_name
from automtl_compiler.backends.onnx_export import export_onnx
from automtl_compiler.backends.torch_codegen import to_torch
from automtl_compiler.errors import AutomtlError
from automtl_compiler.ir.graph import Graph
from automtl_compiler.nn.compact import CompactModel, prune
from automtl_compiler.nn.heads import ClassificationHead
from automtl_compiler.nn.policy import Policy
from automtl_compiler.nn.supermodel import SuperModel
from automtl_compiler.passes.multitask import insert_task_branches
from tests.helpers import Tiny

TASKS = ("seg", "depth")
SHAPE = (2, 3, 8, 8)

# pairs of node names that map onto one candidate attribute (or that torch or Python reserve)
PAIRS = [("inc/1x1", "inc_1x1"), ("c.1", "c_1"), ("\ufb01", "fi"), ("training", "forward"),
         ("_modules", "state_dict"), ("1x1", "n_1x1"), ("class", "n_class"), ("training_", "keys")]


def attribute_ok(name: str) -> bool:
    return (name.isidentifier() and not keyword.iskeyword(name) and unicodedata.normalize("NFKC", name) == name
            and not is_reserved(name))


def randomise_graph(graph: Graph, seed: int = 0) -> Graph:
    """Distinct values in every tensor and real batch-norm statistics, so that any aliasing shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for node in graph.nodes():
            for tensor in node.params.values():
                tensor.add_(torch.randn(tensor.shape, generator=gen) * 0.2)
            if node.op == "batchnorm2d":
                node.buffers["running_mean"].copy_(torch.randn(node.buffers["running_mean"].shape, generator=gen))
                node.buffers["running_var"].copy_(torch.rand(node.buffers["running_var"].shape, generator=gen) + 0.5)
    return graph


def colliding_graph() -> Graph:
    """Each pair is two parallel convs over the same value, summed; the names of each pair collide. The
    input is called ``self``; a conv + batch-norm unit collides with itself (``inc/3x3`` and ``inc_3x3``) and a
    stride-2 pair has skip projections."""
    g = Graph("collide")
    g.add_input("self", SHAPE)
    prev = "self"
    for i, (a, b) in enumerate(PAIRS):
        stride = 2 if i == 3 else 1
        for name in (a, b):
            g.add_node(name, "conv2d", [prev], {"out_channels": 4, "kernel_size": 3, "padding": 1, "stride": stride})
        g.add_node(f"sum{i}", "add", [a, b])
        g.add_node(f"relu{i}", "relu", [f"sum{i}"])
        prev = f"relu{i}"
    g.add_node("inc/3x3", "conv2d", [prev], {"out_channels": 6, "kernel_size": 3, "padding": 1})
    g.add_node("inc_3x3", "batchnorm2d", ["inc/3x3"])
    g.add_node("out", "relu", ["inc_3x3"])
    g.set_outputs(["out"])
    return randomise_graph(g.materialise(seed=0))


PROTOTXT = """
name: "caffe_names"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "inc/1x1" type: "Convolution" bottom: "data" top: "inc/1x1"
        convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "inc_1x1" type: "Convolution" bottom: "data" top: "inc_1x1"
        convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "sum" type: "Eltwise" bottom: "inc/1x1" bottom: "inc_1x1" top: "sum" }
layer { name: "c.1" type: "Convolution" bottom: "sum" top: "c.1"
        convolution_param { num_output: 6 kernel_size: 3 pad: 1 stride: 2 bias_term: false } }
layer { name: "c_1" type: "BatchNorm" bottom: "c.1" top: "c.1" }
layer { name: "c_1/scale" type: "Scale" bottom: "c.1" top: "c.1" scale_param { bias_term: true } }
layer { name: "class" type: "ReLU" bottom: "c.1" top: "c.1" }
layer { name: "1x1" type: "Convolution" bottom: "c.1" top: "1x1" convolution_param { num_output: 6 kernel_size: 1 } }
layer { name: "n_1x1" type: "Convolution" bottom: "c.1" top: "n_1x1" convolution_param { num_output: 6 kernel_size: 1 } }
layer { name: "cat" type: "Concat" bottom: "1x1" bottom: "n_1x1" top: "cat" }
layer { name: "relu" type: "ReLU" bottom: "cat" top: "cat" }
"""


def heads(channels: int) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {t: ClassificationHead(channels, 3) for t in TASKS}


def supermodel(graph: Graph) -> SuperModel:
    channels = graph.node(graph.outputs[0]).shape[1]
    sm = build_supermodel(graph.copy(), heads(channels), feature_node=graph.outputs[0]).eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # task-owned copies start equal to the shared weights: make them differ
        for p in [*sm.specific.parameters(), *sm.skip.parameters(), *sm.policy_parameters()]:
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return sm


def share_policy(sm: SuperModel) -> Policy:
    return Policy({t: {u: "share" for u in sm.unit_names} for t in sm.tasks})


@pytest.fixture(scope="module", params=["graph", "prototxt"])
def backbone(request, tmp_path_factory) -> Graph:
    if request.param == "graph":
        return colliding_graph()
    path = tmp_path_factory.mktemp("proto") / "names.prototxt"
    path.write_text(PROTOTXT)
    return randomise_graph(load_backbone(str(path)))


# ------------------------------------------------------------------------------------------- the rule

def test_rule_keeps_ordinary_names_and_old_translations():
    """Names that were already unique and valid keep the attribute the earlier rule gave them (so saved
    SuperModels keep their weight names)."""
    old = {"conv1": "conv1", "layer1_0_conv1": "layer1_0_conv1", "1x1": "n_1x1", "class": "n_class",
           "graph": "graph_", "a.b": "a_b", "c/2": "c_2", "bn-2": "bn_2", "\u00e9": "\u00e9", "": "n_"}
    assert {k: module_name(k) for k in old} == old
    namer = Namer()
    assert {k: namer(k) for k in old} == old


@pytest.mark.parametrize("pair", PAIRS + [("ﬁx", "fix"), ("a b", "a-b"), ("x", "x"), ("e\u0301", "\u00e9")])
def test_namer_gives_distinct_valid_attributes(pair):
    namer = Namer()
    a, b = namer(pair[0]), namer(pair[1])
    assert attribute_ok(a) and attribute_ok(b)
    assert (a == b) == (pair[0] == pair[1])
    assert namer(pair[0]) == a and namer.mapping == {pair[0]: a, pair[1]: b}


def test_reserved_and_collision_chains():
    namer = Namer()
    names = [namer(n) for n in ("training", "training_", "forward", "_modules", "state_dict", "keys", "ﬁ", "fi",
                                "fi_")]
    assert names == ["training_", "training__", "forward_", "_modules_", "state_dict_", "keys_", "fi", "fi_",
                     "fi__"]
    assert all(attribute_ok(n) for n in names)


# ------------------------------------------------------------------------------------------- parity

def test_to_torch_keeps_colliding_nodes_apart():
    graph = colliding_graph()
    gm = to_torch(graph)
    mapping = gm.meta["automtl_module_names"]
    convs = [n.name for n in graph.nodes() if n.op == "conv2d"]
    assert sorted(mapping) == sorted(n.name for n in graph.nodes() if n.op in ("conv2d", "batchnorm2d"))
    assert len(set(mapping.values())) == len(mapping)
    for node in convs:
        assert torch.equal(getattr(gm, mapping[node]).weight, graph.node(node).params["weight"])
    assert "def forward(self, self_)" in gm.code, "an input called 'self' is not the module's self"
    torch.testing.assert_close(gm(torch.zeros(*SHAPE)).shape, torch.Size([2, 6, 4, 4]))


def test_all_share_supermodel_equals_backbone(backbone):
    sm = supermodel(backbone)
    assert len(set(sm.module_names.values())) == len(sm.module_names)
    ref = to_torch(backbone.copy()).eval()
    x = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = ref(x)
        for t in TASKS:
            want = sm.heads[t](feats)
            for mode, kw in (("fixed", {"policy": share_policy(sm)}), ("hard", {})):
                if mode == "hard":
                    for p in sm.policy.values():
                        p[t].copy_(torch.tensor([5.0, 0.0, 0.0]))
                torch.testing.assert_close(sm(x, task=t, mode=mode, **kw), want, rtol=1e-6, atol=1e-6)


def test_supermodel_modules_belong_to_their_nodes(backbone):
    sm = supermodel(backbone)
    for u in sm.units:
        key = sm.module_key(u.conv)
        assert torch.equal(sm.backbone[key].weight, backbone.node(u.conv).params["weight"])
        assert set(sm.specific[key]) == set(TASKS) and set(sm.policy[key]) == set(TASKS)
    with pytest.raises(AutomtlError, match="no module"):
        sm.module_key("sum0")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pruned_model_equals_supermodel_in_fixed_mode(backbone, seed):
    sm = supermodel(backbone)
    policy = sm.sample_policy("sample", seed=seed)
    compact = prune(sm, policy).eval()
    x = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        outs = compact(x)
        for t in TASKS:
            want = sm(x, task=t, mode="fixed", policy=policy)
            torch.testing.assert_close(outs[t], want, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(compact(x, task=t), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("choice", ["share", "specific", "skip"])
def test_uniform_policies_prune_to_equal_models(choice):
    sm = supermodel(colliding_graph())
    policy = Policy({t: {u: choice for u in sm.unit_names} for t in sm.tasks})
    compact = prune(sm, policy).eval()
    x = torch.randn(*SHAPE)
    with torch.no_grad():
        for t in TASKS:
            torch.testing.assert_close(compact(x)[t], sm(x, task=t, mode="fixed", policy=policy), rtol=1e-6,
                                       atol=1e-6)


# ------------------------------------------------------------------------------------------- files

def test_supermodel_save_load_round_trip(backbone, tmp_path):
    sm = supermodel(backbone)
    sm.set_policy(sm.sample_policy(seed=3))
    sm.save(tmp_path / "sm")
    again = SuperModel.load(tmp_path / "sm").eval()
    assert again.module_names == sm.module_names
    assert list(again.state_dict()) == list(sm.state_dict())
    x = torch.randn(*SHAPE)
    with torch.no_grad():
        for mode in ("hard", "fixed", "pretrain"):
            for t in TASKS:
                torch.testing.assert_close(again(x, task=t, mode=mode), sm(x, task=t, mode=mode), rtol=0, atol=0)


def test_compact_save_load_and_onnx_export(backbone, tmp_path):
    sm = supermodel(backbone)
    policy = sm.sample_policy(seed=1)
    compact = prune(sm, policy).eval()
    compact.save(tmp_path / "c")
    again = CompactModel.load(tmp_path / "c").eval()
    x = torch.randn(*SHAPE)
    with torch.no_grad():
        for t in TASKS:
            torch.testing.assert_close(again(x)[t], compact(x)[t], rtol=0, atol=0)
    path = export_onnx(again, tmp_path / "names.onnx")
    assert [o.name for o in onnx.load(str(path)).graph.output] == list(TASKS)


def test_state_dict_names_of_ordinary_names_are_unchanged():
    sm = build_supermodel(Tiny(), heads(8), input_shape=SHAPE)
    assert sm.module_names == {"conv1": "conv1", "bn1": "bn1", "conv2": "conv2", "bn2": "bn2"}
    assert {"backbone.conv1.weight", "specific.conv2.seg.bn.running_var", "skip.conv1.depth.conv.weight",
            "policy.conv2.seg"} <= set(sm.state_dict())


# ------------------------------------------------------------------------------------------- task names

@pytest.mark.parametrize("task,message", [
    ("training", "clashes with a torch attribute"), ("forward", "clashes with a torch attribute"),
    ("_modules", "clashes with a torch attribute"), ("keys", "clashes with a torch attribute"),
    ("a.b", "identifier"), ("", "identifier"), ("class", "keyword"), ("\ufb01", "NFKC")])
def test_task_names_that_cannot_be_module_keys_are_one_clear_error(task, message):
    with pytest.raises(AutomtlError, match=message) as info:
        build_supermodel(Tiny(), {task: ClassificationHead(8, 2)}, input_shape=SHAPE)
    assert repr(task) in str(info.value) and "rename the task" in str(info.value)
    assert "\n" not in str(info.value)
    mt = insert_task_branches(load_backbone(Tiny(), input_shape=SHAPE), ["ok"])
    with pytest.raises(AutomtlError, match=message):
        SuperModel(dataclasses.replace(mt, tasks=[task]), {task: ClassificationHead(8, 2)})


def test_task_names_near_reserved_ones_work(tmp_path):
    tasks = ("training_task", "fi", "n_class")
    sm = build_supermodel(colliding_graph(), {t: ClassificationHead(6, 2) for t in tasks}, feature_node="out").eval()
    policy = sm.sample_policy(seed=0)
    compact = prune(sm, policy).eval()
    x = torch.randn(*SHAPE)
    with torch.no_grad():
        for t in tasks:
            torch.testing.assert_close(compact(x)[t], sm(x, task=t, mode="fixed", policy=policy), rtol=1e-6,
                                       atol=1e-6)
    export_onnx(compact, tmp_path / "tasks.onnx")


def test_compact_model_checks_task_names():
    sm = build_supermodel(Tiny(), heads(8), input_shape=SHAPE)
    compact = prune(sm, share_policy(sm))
    with pytest.raises(AutomtlError, match="'training'.*torch attribute"):
        CompactModel(compact.graph, ["training", "depth"], {"training": compact.heads["seg"],
                                                             "depth": compact.heads["depth"]}, compact.policy)
