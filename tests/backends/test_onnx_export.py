"""ONNX export of compact models: parity with PyTorch through onnxruntime, tied weights, metadata, failures."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from automtl_compiler import build_supermodel, load_backbone
from automtl_compiler.backends import onnx_export
from automtl_compiler.backends.onnx_export import export_onnx
from automtl_compiler.errors import AutomtlError
from automtl_compiler.nn.compact import prune
from automtl_compiler.nn.heads import ASPPHead, ClassificationHead
from automtl_compiler.nn.policy import Policy

SIZE = 64
ASPP_CONVS = 12  # 4 rates x 3 convs


def randomise(model: nn.Module, seed: int = 0, params: bool = True) -> nn.Module:
    """Real batch-norm statistics and, with ``params``, distinct values in every tensor (specific copies
    start equal to the shared weights)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters() if params else ():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model


def feature_node(graph) -> str:  # type: ignore[no-untyped-def]
    """The input of the backbone's last global pooling (squeeze-excitation pools come earlier)."""
    last = None
    for n in graph.topological_order():
        pools = n.op in ("adaptive_avgpool2d", "adaptive_maxpool2d") and tuple(n.attrs["output_size"]) == (1, 1)
        if pools or (n.op == "mean" and {d % 4 for d in n.attrs["dim"]} & {2, 3}):
            last = n.inputs[0]
        elif n.op in ("flatten", "linear"):
            return last or n.inputs[0]
    return last or graph.outputs[0]


def ort_run(path, x: torch.Tensor) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"input": x.numpy()})))


def assert_matches(got: np.ndarray, want: torch.Tensor, atol: float = 1e-4) -> None:
    want = want.detach().numpy()
    assert got.shape == want.shape
    assert np.max(np.abs(got - want)) <= atol * max(1.0, float(np.max(np.abs(want))))


@pytest.fixture(scope="module")
def compact():
    """ResNet-18, an ASPP and a classification task; 'seg' leaves the trunk at unit 2, so every shared
    conv after it runs on two branches with one tensor."""
    torch.manual_seed(0)
    heads = {"seg": ASPPHead(512, 3, hidden=8), "cls": ClassificationHead(512, 5)}
    sm = randomise(build_supermodel("torchvision:resnet18", heads, input_shape=(1, 3, SIZE, SIZE))).eval()
    units = sm.unit_names
    choices = {"seg": {u: "share" for u in units}, "cls": {u: "share" for u in units}}
    choices["seg"][units[2]] = "specific"
    choices["seg"][units[5]] = "skip"
    return prune(sm, Policy(choices)).eval()


@pytest.fixture(scope="module")
def exported(compact, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert export_onnx(compact, path) == path
    return path


def test_outputs_match_pytorch_at_dynamic_batch_sizes(compact, exported):
    model = onnx.load(str(exported))
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == compact.tasks == ["seg", "cls"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert model.opset_import[0].version == 17
    for batch in (1, 3, 8):
        x = torch.randn(batch, 3, SIZE, SIZE)
        got = ort_run(exported, x)
        with torch.no_grad():
            want = compact(x)
        for task in compact.tasks:
            assert_matches(got[task], want[task])


def test_static_batch(compact, tmp_path):
    path = export_onnx(compact, tmp_path / "static.onnx", input_shape=(2, 3, SIZE, SIZE), dynamic_batch=False)
    dims = [d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 3, SIZE, SIZE]
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        want = compact(x)
    got = ort_run(path, x)
    for task in compact.tasks:
        assert_matches(got[task], want[task])


def test_dynamic_height_and_width(compact, tmp_path):
    path = export_onnx(compact, tmp_path / "hw.onnx", dynamic_hw=True, task="seg")
    model = onnx.load(str(path))
    assert [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim] == ["batch", "", "height", "width"]
    assert [d.dim_param for d in model.graph.output[0].type.tensor_type.shape.dim] == \
        ["batch", "", "seg_height", "seg_width"]
    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        want = compact(x, task="seg")
    assert_matches(ort_run(path, x)["seg"], want)


@pytest.mark.parametrize("task", ["seg", "cls"])
def test_per_task_export_has_only_that_tasks_nodes(compact, exported, tmp_path, task):
    path = export_onnx(compact, tmp_path / f"{task}.onnx", task=task)
    model = onnx.load(str(path))
    assert [o.name for o in model.graph.output] == [task]
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        want = compact(x, task=task)
    assert_matches(ort_run(path, x)[task], want)
    # conv + batch norm fold into one Conv: the task's IR convs plus its head's
    ir_convs = sum(compact.graph.node(n).op == "conv2d" for n in compact.task_nodes(task))
    convs = sum(n.op_type == "Conv" for n in model.graph.node)
    assert convs == ir_convs + (ASPP_CONVS if task == "seg" else 0)
    full = onnx.load(str(exported))
    assert len(model.graph.node) < len(full.graph.node)
    assert len(model.graph.initializer) < len(full.graph.initializer)
    assert json.loads({p.key: p.value for p in model.metadata_props}["automtl.tasks"]) == [task]


def _unique_tensors(model: nn.Module) -> set[int]:
    tensors = {id(p) for p in model.parameters()}
    return tensors | {id(b) for name, b in model.named_buffers() if not name.endswith("num_batches_tracked")}


def test_shared_weights_are_one_initialiser(compact, exported, tmp_path):
    holders: dict[int, int] = {}
    for m in compact.modules():
        for p in m.parameters(recurse=False):
            holders[id(p)] = holders.get(id(p), 0) + 1
    assert sum(n > 1 for n in holders.values()) >= 10  # the fixture really ties weights across branches
    # batch norms kept as nodes: one initialiser per distinct tensor of the compact model, exactly
    path = export_onnx(compact, tmp_path / "unfolded.onnx", constant_folding=False)
    unfolded = onnx.load(str(path))
    assert len(unfolded.graph.initializer) == len(_unique_tensors(compact))
    assert any(n.op_type == "BatchNormalization" for n in unfolded.graph.node)
    # folded (the default): one Conv weight per distinct conv weight, no copies, no Identity
    model = onnx.load(str(exported))
    conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    inits = {i.name for i in model.graph.initializer}
    assert conv_weights <= inits
    assert len(conv_weights) == len({id(m.weight) for m in compact.modules() if isinstance(m, nn.Conv2d)})
    assert sum(n.op_type == "Conv" for n in model.graph.node) > len(conv_weights)  # some weights used twice
    contents = [(i.data_type, tuple(i.dims), i.raw_data) for i in model.graph.initializer]
    assert len(set(contents)) == len(contents)
    assert not any(n.op_type == "Identity" for n in model.graph.node)


def test_checker_and_metadata(compact, exported):
    model = onnx.load(str(exported))
    onnx.checker.check_model(model, full_check=True)
    meta = {p.key: json.loads(p.value) for p in model.metadata_props}
    assert meta["automtl.tasks"] == ["seg", "cls"]
    assert meta["automtl.output_shapes"] == {"seg": ["batch", 3, 2, 2], "cls": ["batch", 5]}
    assert meta["automtl.input_shape"] == ["batch", 3, SIZE, SIZE]
    assert Policy.from_json(meta["automtl.policy"]).choices == compact.policy.choices
    assert meta["automtl.format"]["name"] == "automtl-onnx"


def test_verification_failure_raises_and_leaves_no_file(compact, tmp_path, monkeypatch):
    forward = onnx_export._Outputs.forward

    def drifting(self, x):  # type: ignore[no-untyped-def]
        outs = forward(self, x)
        return outs if torch.jit.is_tracing() else tuple(o + 1e-2 for o in outs)

    monkeypatch.setattr(onnx_export._Outputs, "forward", drifting)
    path = tmp_path / "model.onnx"
    with pytest.raises(AutomtlError, match=r"output 'cls' differs from PyTorch by 0\.01.*was not written"):
        export_onnx(compact, path, task="cls")
    assert list(tmp_path.iterdir()) == []
    path.write_text("precious")
    with pytest.raises(AutomtlError, match="differs"):
        export_onnx(compact, path, task="cls")
    assert path.read_text() == "precious" and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
    assert compact.training is False
    export_onnx(compact, path, task="cls", verify=False)  # the same drift unchecked: written
    assert onnx.load(str(path)).graph.output[0].name == "cls"


def test_tolerance_scales_with_large_outputs(compact, tmp_path, monkeypatch):
    forward = onnx_export._Outputs.forward

    def drifting(self, x):  # type: ignore[no-untyped-def]
        outs = forward(self, x)
        return outs if torch.jit.is_tracing() else tuple(o * 1e6 + 1.0 for o in outs)

    monkeypatch.setattr(onnx_export._Outputs, "forward", drifting)
    with pytest.raises(AutomtlError, match=r"allowed [0-9.e+]+ = 0\.0001 x max\(1, max \|output\|"):
        export_onnx(compact, tmp_path / "m.onnx", task="cls")


@pytest.mark.parametrize("opset", [12, 22, 17.0, True])
def test_opset_out_of_range(compact, tmp_path, opset):
    with pytest.raises(AutomtlError, match="opset"):
        export_onnx(compact, tmp_path / "m.onnx", opset=opset)
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("opset", [13, 21])
def test_opset_bounds_export(compact, tmp_path, opset):
    path = export_onnx(compact, tmp_path / "m.onnx", opset=opset, task="cls")
    assert onnx.load(str(path)).opset_import[0].version == opset


@pytest.mark.parametrize("kwargs,needle", [
    ({"task": "nope"}, "unknown task 'nope'"),
    ({"input_shape": (1, 1, SIZE, SIZE)}, "1 channels but the model takes 3"),
    ({"input_shape": (1, 3, SIZE)}, "four positive numbers"),
])
def test_bad_arguments(compact, tmp_path, kwargs, needle):
    with pytest.raises(AutomtlError, match=needle):
        export_onnx(compact, tmp_path / "m.onnx", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_rejects_a_plain_module(tmp_path):
    with pytest.raises(AutomtlError, match="takes a CompactModel"):
        export_onnx(nn.Conv2d(3, 3, 1), tmp_path / "m.onnx")


def test_export_restores_training_mode(compact, tmp_path):
    compact.train()
    try:
        export_onnx(compact, tmp_path / "m.onnx", task="cls")
        assert compact.training and compact.heads["seg"].training
    finally:
        compact.eval()


# ---------------------------------------------------------------------------------------------- backbones

FAST = ["mobilenet_v3_large", "efficientnet_b0", "models/deeplab_resnet34.prototxt"]
SLOW = ["resnet34", "resnet50", "mobilenet_v2", "mnasnet1_0", "vgg16_bn", "densenet121"]


@pytest.mark.parametrize("name", FAST + [pytest.param(n, marks=pytest.mark.slow) for n in SLOW])
def test_backbone_compact_export(name, tmp_path):
    # VGG pools to 7x7 adaptively: torch exports that only when the feature map divides it (224 -> 7x7)
    size = 224 if name == "vgg16_bn" else 32
    source = name if name.endswith(".prototxt") else f"torchvision:{name}"
    graph = load_backbone(source, input_shape=(1, 3, size, size))
    feature = feature_node(graph)
    channels = graph.node(feature).shape[1]
    torch.manual_seed(0)
    heads = {"seg": ASPPHead(channels, 3, hidden=8), "cls": ClassificationHead(channels, 4)}
    sm = randomise(build_supermodel(graph, heads, feature_node=feature), params=False).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in sm.policy_parameters():
            p.copy_(torch.randn(3, generator=gen))
    policy = sm.sample_policy("sample", seed=0)
    assert {c for per in policy.counts().values() for c, n in per.items() if n} == {"share", "specific", "skip"}
    model = prune(sm, policy).eval()
    path = export_onnx(model, tmp_path / "m.onnx")  # compared with PyTorch at batch 1 and 3 inside
    assert [o.name for o in onnx.load(str(path)).graph.output] == ["seg", "cls"]
