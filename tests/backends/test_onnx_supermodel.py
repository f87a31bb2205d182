"""SuperModel -> ONNX (soft view with a gates input, pre-training view): onnxruntime against references
computed branch by branch in PyTorch, against the model's fixed / soft / pretrain modes, the file's
inputs, outputs and metadata, bad input, and a failed export that writes nothing."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from automtl_compiler import build_supermodel
from automtl_compiler.backends import onnx_supermodel
from automtl_compiler.backends.onnx_supermodel import export_supermodel_onnx
from automtl_compiler.backends.torch_codegen import module_name
from automtl_compiler.errors import AutomtlError
from automtl_compiler.nn.heads import ASPPHead, ClassificationHead
from automtl_compiler.nn.policy import Policy, gumbel_softmax
from automtl_compiler.nn.supermodel import SuperModel
from tests.helpers import Small, Tiny, randomise_bn

BRANCHES = ("share", "specific", "skip")


def randomised(sm: SuperModel, seed: int) -> SuperModel:
    """Random policy logits, and every branch its own weights and batch-norm statistics (so that no two
    branches compute the same thing and a wrong gate shows)."""
    gen = torch.Generator().manual_seed(seed)
    randomise_bn(sm, seed)
    with torch.no_grad():
        for p in sm.specific.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        for p in sm.policy_parameters():
            p.copy_(torch.randn(3, generator=gen))
    return sm.eval()


@pytest.fixture(scope="module")
def tiny() -> SuperModel:
    torch.manual_seed(0)
    heads = {t: ClassificationHead(8, 2) for t in ("seg", "depth")}
    return randomised(build_supermodel(Tiny(), heads, input_shape=(2, 3, 8, 8)), 1)


@pytest.fixture(scope="module")
def small() -> SuperModel:
    torch.manual_seed(0)
    heads = {"seg": ASPPHead(16, 3, hidden=4, rates=(1, 2), upsample_to_input=True),
             "depth": ASPPHead(16, 1, hidden=4, rates=(1,)), "cls": ClassificationHead(16, 5)}
    return randomised(build_supermodel(Small(), heads, input_shape=(2, 3, 12, 12)), 2)


def unit(sm: SuperModel, conv: str, bn: str, x: torch.Tensor, task: str, w: torch.Tensor,
         crop: int = 0) -> torch.Tensor:
    """One unit computed module by module: w . (share, specific, skip); the skip projection (if any) reads
    the input cropped by ``crop`` on each side."""
    key = module_name(conv)
    share = sm.backbone[module_name(bn)](sm.backbone[key](x))
    spec = sm.specific[key][task].bn(sm.specific[key][task].conv(x))
    skip = x
    if key in sm.skip:
        skip = x[..., crop:x.shape[-2] - crop, crop:x.shape[-1] - crop]
        skip = sm.skip[key][task].bn(sm.skip[key][task].conv(skip))
    return w[0] * share + w[1] * spec + w[2] * skip


def tiny_by_hand(sm: SuperModel, x: torch.Tensor, task: str, w: torch.Tensor) -> torch.Tensor:
    x = F.relu(unit(sm, "conv1", "bn1", x, task, w[0]))
    return sm.heads[task](unit(sm, "conv2", "bn2", x, task, w[1]))


def small_by_hand(sm: SuperModel, x: torch.Tensor, task: str, w: torch.Tensor) -> torch.Tensor:
    a = F.relu(unit(sm, "stem", "bn0", x, task, w[0]))
    b = F.relu(unit(sm, "c1", "bn1", a, task, w[1]) + a)
    c = F.relu(unit(sm, "dw", "bn2", b, task, w[2]))
    feature = F.relu(unit(sm, "valid", "bn3", c, task, w[3], crop=1))
    head = sm.heads[task]
    return head(feature, input_size=x.shape[-2:]) if task == "seg" else head(feature)


BY_HAND: dict[str, Callable[..., torch.Tensor]] = {"tiny": tiny_by_hand, "small": small_by_hand}
UNITS = {"tiny": ["conv1", "conv2"], "small": ["stem", "c1", "dw", "valid"]}


@pytest.fixture(scope="module")
def exported(tiny, small, tmp_path_factory) -> dict[tuple[str, str], tuple[SuperModel, ort.InferenceSession, str]]:
    """Each model exported once per view (verified): (model, view) -> (model, session, path)."""
    out = {}
    for name, sm in (("tiny", tiny), ("small", small)):
        for view in ("soft", "pretrain"):
            path = export_supermodel_onnx(sm, tmp_path_factory.mktemp(name) / f"{view}.onnx", view=view)
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            out[name, view] = (sm, session, str(path))
    return out


def run(session: ort.InferenceSession, x: torch.Tensor, gates: torch.Tensor | None = None) -> list[np.ndarray]:
    feed = {"input": x.numpy()} if gates is None else {"input": x.numpy(), "gates": gates.numpy()}
    return session.run(None, feed)


def assert_matches(got: np.ndarray, want: torch.Tensor) -> None:
    want_np = want.detach().numpy()
    assert got.shape == want_np.shape
    np.testing.assert_allclose(got, want_np, rtol=0, atol=1e-4 * max(1.0, float(np.abs(want_np).max())))


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_soft_view_equals_branch_by_branch_reference(exported, name):
    sm, session, _ = exported[name, "soft"]
    assert sm.unit_names == UNITS[name]
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(3, *sm.node_shape(sm.mt.trunk.inputs[0])[1:], generator=gen)  # batch 3: not the example's 2
    gates = torch.softmax(2 * torch.randn(len(sm.tasks), len(sm.units), 3, generator=gen), -1)
    got = run(session, x, gates)
    assert len(got) == len(sm.tasks)
    with torch.no_grad():
        for ti, t in enumerate(sm.tasks):
            assert_matches(got[ti], BY_HAND[name](sm, x, t, gates[ti]))


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_one_hot_gates_equal_fixed_policy(exported, name):
    sm, session, _ = exported[name, "soft"]
    choices = {t: {u: BRANCHES[(i + k) % 3] for i, u in enumerate(sm.unit_names)} for k, t in enumerate(sm.tasks)}
    policy = Policy(choices)
    gates = torch.stack([F.one_hot(torch.tensor([BRANCHES.index(choices[t][u]) for u in sm.unit_names]), 3)
                         for t in sm.tasks]).float()
    x = torch.randn(2, *sm.node_shape(sm.mt.trunk.inputs[0])[1:], generator=torch.Generator().manual_seed(5))
    got = run(session, x, gates)
    with torch.no_grad():
        want = sm.forward_all(x, mode="fixed", policy=policy)
        shared = sm.forward_all(x, mode="fixed", policy=Policy({t: dict.fromkeys(sm.unit_names, "share")
                                                                for t in sm.tasks}))
    for ti, t in enumerate(sm.tasks):
        assert_matches(got[ti], want[t])
        assert not torch.allclose(want[t], shared[t], atol=1e-3), "the policy must change the output"


def test_soft_view_with_gumbel_gates_equals_soft_mode(exported):
    sm, session, _ = exported["small", "soft"]
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    logits = torch.stack([sm.logits(t) for t in sm.tasks]).detach()
    gates = gumbel_softmax(logits, 2.0, torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = sm.forward_all(x, mode="soft", tau=2.0, generator=torch.Generator().manual_seed(7))
    for ti, t in enumerate(sm.tasks):
        assert_matches(run(session, x, gates)[ti], want[t])


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_pretrain_view_equals_pretrain_mode(exported, name):
    sm, session, _ = exported[name, "pretrain"]
    assert [i.name for i in session.get_inputs()] == ["input"]
    x = torch.randn(1, *sm.node_shape(sm.mt.trunk.inputs[0])[1:], generator=torch.Generator().manual_seed(4))
    got = run(session, x)
    with torch.no_grad():
        want = sm.forward_all(x, mode="pretrain")
        soft = sm.forward_all(x, mode="soft", generator=torch.Generator().manual_seed(0))
    for ti, t in enumerate(sm.tasks):
        assert_matches(got[ti], want[t])
        assert not torch.allclose(want[t], soft[t], atol=1e-3), "1/3 gates must differ from sampled ones"


def test_inputs_outputs_and_metadata(exported):
    path = exported["small", "soft"][2]
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)

    def dims(value: onnx.ValueInfoProto) -> list[int | str]:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    assert [(i.name, dims(i)) for i in proto.graph.input] == [("input", ["batch", 3, 12, 12]), ("gates", [3, 4, 3])]
    assert [(o.name, dims(o)) for o in proto.graph.output] == [
        ("seg", ["batch", 3, 12, 12]), ("depth", ["batch", 1, 4, 4]), ("cls", ["batch", 5])]
    assert "share" in proto.graph.input[1].doc_string
    meta = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert meta == {
        "automtl.format": {"name": "automtl-onnx-supermodel", "version": 1}, "automtl.view": "soft",
        "automtl.tasks": ["seg", "depth", "cls"], "automtl.model_tasks": ["seg", "depth", "cls"],
        "automtl.units": ["stem", "c1", "dw", "valid"], "automtl.branches": ["share", "specific", "skip"],
        "automtl.input_name": "input", "automtl.input_shape": ["batch", 3, 12, 12],
        "automtl.example_input_shape": [2, 3, 12, 12], "automtl.gates_name": "gates", "automtl.gates_shape": [3, 4, 3],
        "automtl.output_shapes": {"seg": ["batch", 3, 12, 12], "depth": ["batch", 1, 4, 4], "cls": ["batch", 5]},
        "automtl.example_output_shapes": {"seg": [2, 3, 12, 12], "depth": [2, 1, 4, 4], "cls": [2, 5]},
        "automtl.opset": 17, "automtl.automtl_version": meta["automtl.automtl_version"]}
    pre = {p.key: json.loads(p.value) for p in onnx.load(exported["small", "pretrain"][2]).metadata_props}
    assert (pre["automtl.view"], pre["automtl.gates_name"], pre["automtl.gates_shape"]) == ("pretrain", None, None)


def test_task_subset_static_batch_and_opset(tiny, tmp_path):
    path = export_supermodel_onnx(tiny, tmp_path / "d.onnx", tasks=["depth"], dynamic_batch=False, opset=13,
                                  input_shape=(4, 3, 16, 16))
    proto = onnx.load(str(path))
    assert [o.name for o in proto.graph.output] == ["depth"]
    assert proto.opset_import[0].version == 13
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [4, 3, 16, 16]
    assert [d.dim_value for d in proto.graph.input[1].type.tensor_type.shape.dim] == [2, 2, 3]  # all tasks' gates
    x = torch.randn(4, 3, 16, 16)
    gates = torch.softmax(torch.randn(2, 2, 3), -1)
    gates[0] = float("nan")  # the seg row is not read
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy(),
                                                                                        "gates": gates.numpy()})
    with torch.no_grad():
        assert_matches(got[0], tiny_by_hand(tiny, x, "depth", gates[1]))


def test_modes_are_restored(tiny, tmp_path):
    tiny.train()
    tiny.heads["seg"].eval()
    before = {name: m.training for name, m in tiny.named_modules()}
    try:
        export_supermodel_onnx(tiny, tmp_path / "m.onnx", view="pretrain")
        assert {name: m.training for name, m in tiny.named_modules()} == before
    finally:
        tiny.eval()


def test_failed_export_writes_nothing(tiny, tmp_path, monkeypatch):
    forward = onnx_supermodel._SuperModelView.forward

    def drifting(self, *args):  # type: ignore[no-untyped-def]
        outs = forward(self, *args)
        return outs if torch.jit.is_tracing() else tuple(o + 1e-2 for o in outs)

    monkeypatch.setattr(onnx_supermodel._SuperModelView, "forward", drifting)
    path = tmp_path / "sm.onnx"
    with pytest.raises(AutomtlError, match=r"output 'seg' differs from PyTorch by 0\.01.*was not written"):
        export_supermodel_onnx(tiny, path)
    assert list(tmp_path.iterdir()) == []
    path.write_text("precious")
    with pytest.raises(AutomtlError, match="differs"):
        export_supermodel_onnx(tiny, path, view="pretrain")
    assert path.read_text() == "precious" and [p.name for p in tmp_path.iterdir()] == ["sm.onnx"]
    assert not tiny.training
    export_supermodel_onnx(tiny, path, verify=False)  # the same drift unchecked: written
    assert [o.name for o in onnx.load(str(path)).graph.output] == ["seg", "depth"]


@pytest.mark.parametrize("kwargs,message", [
    ({"tasks": ["seg", "sky"]}, r"unknown task 'sky'; the model's tasks are \['seg', 'depth'\]"),
    ({"tasks": []}, "no tasks to export"),
    ({"tasks": ["seg", "seg"]}, r"given more than once"),
    ({"view": "hard"}, r"unknown view 'hard'; use 'soft'"),
    ({"input_shape": (1, 4, 8, 8)}, "has 4 channels but the model takes 3"),
    ({"input_shape": (3, 8, 8)}, "must be four positive numbers"),
    ({"input_shape": "big"}, "is not a shape"),
    ({"opset": 12}, "opset 12 is not supported"),
])
def test_bad_input(tiny, tmp_path, kwargs, message):
    with pytest.raises(AutomtlError, match=message) as info:
        export_supermodel_onnx(tiny, tmp_path / "m.onnx", **kwargs)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_input_too_small_for_the_model(small, tmp_path):
    with pytest.raises(AutomtlError, match=r"cannot run on an input of shape \[1, 3, 4, 4\] \(.*\); choose another"):
        export_supermodel_onnx(small, tmp_path / "m.onnx", input_shape=(1, 3, 4, 4))
    assert list(tmp_path.iterdir()) == []


def test_not_a_supermodel(tmp_path):
    with pytest.raises(AutomtlError, match="takes a SuperModel.*not a Tiny"):
        export_supermodel_onnx(Tiny(), tmp_path / "m.onnx")
