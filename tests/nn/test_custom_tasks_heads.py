"""Custom task types and heads: by class path and by registration, saved and loaded, pruned, exported, and
the rule that model files never run code without the caller's consent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from automtl_compiler import CompactModel, Policy, SuperModel, build_supermodel, prune
from automtl_compiler.backends.onnx_export import export_onnx
from automtl_compiler.classpath import UntrustedCodeError
from automtl_compiler.errors import AutomtlError
from automtl_compiler.nn import heads as heads_module
from automtl_compiler.nn.heads import (
    ASPPHead,
    create_head,
    head_spec,
    make_head,
    register_head,
)
from automtl_compiler.tasks import TASK_TYPES, available_tasks, get_task, register_task
from tests.custom_parts import MeanAbsTask, PixelHead, PoolHead
from tests.helpers import Tiny, randomise_bn

PIXEL = "tests.custom_parts:PixelHead"
TASK = "tests.custom_parts:MeanAbsTask"
SHAPE = (2, 3, 8, 8)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_registries():
    """Every registration a test makes is undone, so that other test files see the built-ins only."""
    with TASK_TYPES.snapshot(), heads_module.HEAD_TYPES.snapshot():
        yield


def one_line(err: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def marker_module(root: Path, name: str) -> Path:
    """A head module whose import writes a marker file; returns the marker's path."""
    marker = root / f"{name}.imported"
    (root / f"{name}.py").write_text(
        "from pathlib import Path\n"
        "import torch\n"
        "from torch import nn\n"
        f"Path({str(marker)!r}).write_text('imported')\n"
        "class MarkedHead(nn.Module):\n"
        "    def __init__(self, in_channels, num_classes, scale=1.0):\n"
        "        super().__init__()\n"
        "        self.scale = scale\n"
        "        self.conv = nn.Conv2d(in_channels, num_classes, 1)\n"
        "    def forward(self, feature):\n"
        "        return self.conv(feature) * self.scale\n")
    return marker


def tiny_supermodel(heads: dict[str, torch.nn.Module]) -> SuperModel:
    torch.manual_seed(0)
    sm = build_supermodel(randomise_bn(Tiny()), heads, input_shape=SHAPE).eval()
    with torch.no_grad():
        for p in sm.policy_parameters():
            p.copy_(torch.randn(p.shape))
    return sm


def mixed_policy(sm: SuperModel) -> Policy:
    first, second = sm.unit_names
    return Policy({t: {first: "share", second: "specific" if i == 0 else "share"} for i, t in enumerate(sm.tasks)})


def assert_same_outputs(a: torch.nn.Module, b: torch.nn.Module, **kwargs: object) -> None:
    """Equal outputs for every task: ``forward_all`` of SuperModels, ``forward`` of CompactModels."""
    x = torch.randn(*SHAPE)
    with torch.no_grad():
        if isinstance(a, SuperModel):
            want, got = a.forward_all(x, **kwargs), b.forward_all(x, **kwargs)
        else:
            want, got = a(x, **kwargs), b(x, **kwargs)
    for task in want:
        torch.testing.assert_close(got[task], want[task], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------- task types

def test_task_by_class_path_gives_loss_and_metric():
    task = get_task(TASK, channels=2, weight=0.5)
    assert isinstance(task, MeanAbsTask) and task.out_channels == 2
    assert task.metric_directions == {"mae": False}
    pred, target = torch.ones(2, 2, 4, 4), torch.zeros(2, 2, 4, 4)
    assert float(task.loss(pred, target)) == pytest.approx(0.5)
    metric = task.new_metric()
    metric.update(pred, target)
    assert metric.compute() == {"mae": pytest.approx(1.0)}


def test_task_by_registration_call_and_decorator():
    assert register_task("mean_abs", MeanAbsTask) is MeanAbsTask
    assert isinstance(get_task("mean_abs", weight=2.0), MeanAbsTask)
    assert "mean_abs" in available_tasks()
    register_task("mean_abs", MeanAbsTask)  # the same class again is fine

    @register_task("double_abs")
    class DoubleAbs(MeanAbsTask):
        def loss(self, pred, target, mask=None):  # type: ignore[no-untyped-def]
            return 2 * super().loss(pred, target, mask)

    assert float(get_task("double_abs").loss(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))) == 2.0
    with pytest.raises(AutomtlError) as err:
        register_task("mean_abs", DoubleAbs)
    one_line(err, "already registered", "replace=True")
    register_task("mean_abs", DoubleAbs, replace=True)
    assert isinstance(get_task("mean_abs"), DoubleAbs)
    with pytest.raises(AutomtlError) as err:
        register_task("depth", MeanAbsTask)
    one_line(err, "built-in")
    with pytest.raises(AutomtlError) as err:
        register_task("plain", PoolHead)  # type: ignore[type-var]
    one_line(err, "not a TaskType subclass")


@pytest.mark.parametrize(("path", "needles"), [
    ("tests.custom_parts:", ["is not a class path", "package.module:Class"]),
    ("tests.no_such_module:Task", ["tests.no_such_module:Task", "cannot import", "ModuleNotFoundError"]),
    ("tests.custom_parts:Missing", ["tests.custom_parts:Missing", "no attribute"]),
    ("tests.custom_parts:NotATask", ["tests.custom_parts:NotATask", "not a subclass of automtl_compiler.tasks.TaskType"]),
    ("tests.custom_parts:PixelHead", ["tests.custom_parts:PixelHead", "not a subclass"]),
    ("tests.custom_parts:HalfTask", ["tests.custom_parts:HalfTask", "abstract", "loss"]),
])
def test_task_class_path_errors(path, needles):
    with pytest.raises(AutomtlError) as err:
        get_task(path)
    one_line(err, *needles)


def test_task_errors_name_the_class_path(tmp_path, monkeypatch):
    with pytest.raises(AutomtlError) as err:
        get_task(TASK, chanels=3)
    one_line(err, TASK, "chanels")
    (tmp_path / "automtl_broken_task.py").write_text("raise RuntimeError('broken\\nmodule')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(AutomtlError) as err:
        get_task("automtl_broken_task:Task")
    one_line(err, "automtl_broken_task:Task", "RuntimeError", "broken module")
    with pytest.raises(AutomtlError) as err:
        get_task("keypoints")
    one_line(err, "keypoints", "segment_semantic", "package.module:Class")


# --------------------------------------------------------------------------------------------- heads

def test_head_by_class_path_records_its_arguments():
    head = create_head(PIXEL, 8, 3, hidden=5)
    assert isinstance(head, PixelHead) and head.conv.out_channels == 5
    spec = head_spec(head)
    assert spec == {"type": PIXEL, "in_channels": 8, "num_classes": 3, "options": {"hidden": 5}}
    json.dumps(spec)
    again = make_head(spec, trust_code=True)
    assert isinstance(again, PixelHead) and head_spec(again) == spec
    with pytest.raises(UntrustedCodeError) as err:
        make_head(spec)
    one_line(err, PIXEL, "trust_code=True", "register_head")
    out = heads_module.apply_head(head, torch.randn(2, 8, 4, 4), torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 3, 16, 16)


def test_builtin_heads_by_name_keep_their_specs():
    aspp = create_head("aspp", 8, 3, hidden=4, rates=(1, 2))
    assert isinstance(aspp, ASPPHead) and head_spec(aspp)["type"] == "aspp"
    assert isinstance(make_head(head_spec(aspp)), ASPPHead)
    assert head_spec(create_head("cls", 8, 2)) == {"type": "cls", "in_channels": 8, "num_classes": 2}

    class HandMade(ASPPHead):  # inherits ASPPHead's spec but is another class
        pass

    assert head_spec(HandMade(8, 3, hidden=2))["type"] == "custom"
    assert head_spec(torch.nn.Conv2d(8, 3, 1))["type"] == "custom"
    with pytest.raises(AutomtlError) as err:  # options that JSON cannot hold are refused when saving
        head_spec(create_head("tests.custom_parts:PoolHead", 8, 2, scale=torch.tensor(2.0)))
    one_line(err, "tests.custom_parts:PoolHead", "cannot be saved", "not JSON")


def test_head_by_registration_call_and_decorator():
    assert register_head("pool", PoolHead) is PoolHead
    head = create_head("pool", 8, 4, scale=2.0)
    assert head_spec(head) == {"type": "pool", "in_channels": 8, "num_classes": 4, "options": {"scale": 2.0}}
    assert isinstance(make_head(head_spec(head)), PoolHead)  # registered: no trust needed

    @register_head("pixel2")
    class Pixel2(PixelHead):
        pass

    assert isinstance(create_head("pixel2", 8, 1), Pixel2)
    # a class path of a registered class is not imported, so it needs no trust either
    assert isinstance(make_head(head_spec(create_head("tests.custom_parts:PoolHead", 8, 2))), PoolHead)
    for name, needle in (("aspp", "built-in"), ("custom", "built-in"), ("a:b", "not a head type name")):
        with pytest.raises(AutomtlError) as err:
            register_head(name, PoolHead)
        one_line(err, needle)
    with pytest.raises(AutomtlError) as err:
        register_head("pool", PixelHead)
    one_line(err, "already registered")
    with pytest.raises(AutomtlError) as err:
        register_head("task", MeanAbsTask)  # type: ignore[type-var]
    one_line(err, "not a torch.nn.Module subclass")


@pytest.mark.parametrize(("name", "options", "needles"), [
    ("tests.custom_parts:NotATask", {}, ["tests.custom_parts:NotATask", "not a subclass of torch.nn.Module"]),
    ("tests.custom_parts:Nope", {}, ["tests.custom_parts:Nope", "no attribute"]),
    ("tests.nowhere:Head", {}, ["tests.nowhere:Head", "cannot import"]),
    ("tests.custom_parts:", {}, ["not a class path"]),
    (PIXEL, {"hiden": 3}, [PIXEL, "hiden"]),
    ("fpn", {}, ["unknown head type 'fpn'", "aspp", "package.module:Class"]),
    ("aspp", {"hidden": 0}, ["aspp", "positive"]),
])
def test_head_errors(name, options, needles):
    with pytest.raises(AutomtlError) as err:
        create_head(name, 8, 3, **options)
    one_line(err, *needles)


# --------------------------------------------------------------------------------------------- models

def test_supermodel_and_compact_round_trip_with_custom_heads(tmp_path):
    register_head("pool", PoolHead)
    heads = {"seg": create_head(PIXEL, 8, 3, hidden=4), "cls": create_head("pool", 8, 5, scale=0.5)}
    sm = tiny_supermodel(heads)
    sm.save(tmp_path / "sm")
    saved = json.loads((tmp_path / "sm" / "supermodel.json").read_text())["heads"]
    assert saved == {"seg": {"type": PIXEL, "in_channels": 8, "num_classes": 3, "options": {"hidden": 4}},
                     "cls": {"type": "pool", "in_channels": 8, "num_classes": 5, "options": {"scale": 0.5}}}
    with pytest.raises(UntrustedCodeError) as err:
        SuperModel.load(tmp_path / "sm")
    one_line(err, str(tmp_path / "sm" / "supermodel.json"), f"task 'seg' has head {PIXEL}, which is code",
             "--trust-code", "register_head")
    again = SuperModel.load(tmp_path / "sm", trust_code=True).eval()
    assert isinstance(again.heads["seg"], PixelHead) and isinstance(again.heads["cls"], PoolHead)
    for mode in ("hard", "pretrain"):
        assert_same_outputs(sm, again, mode=mode)
    assert f"head {PIXEL}" in again.summary()

    compact = prune(again, mixed_policy(again)).eval()
    x = torch.randn(*SHAPE)
    with torch.no_grad():
        assert compact(x)["seg"].shape == (2, 3, 8, 8)
    compact.save(tmp_path / "cm")
    with pytest.raises(UntrustedCodeError) as err:
        CompactModel.load(tmp_path / "cm")
    one_line(err, "compact.json", PIXEL, "--trust-code")
    loaded = CompactModel.load(tmp_path / "cm", trust_code=True).eval()
    assert_same_outputs(compact, loaded)

    # the registered head alone needs no trust; unregistered, it names what to do
    sm_pool = tiny_supermodel({"cls": create_head("pool", 8, 2)})
    sm_pool.save(tmp_path / "pool")
    assert isinstance(SuperModel.load(tmp_path / "pool").heads["cls"], PoolHead)
    heads_module.HEAD_TYPES.unregister("pool")
    with pytest.raises(AutomtlError) as err:
        SuperModel.load(tmp_path / "pool", trust_code=True)
    one_line(err, "'pool'", "not registered", "register_head")
    assert isinstance(SuperModel.load(tmp_path / "pool", heads={"cls": PoolHead(8, 2)}).heads["cls"], PoolHead)


def test_onnx_export_of_compact_model_with_custom_heads(tmp_path):
    heads = {"seg": create_head(PIXEL, 8, 3, hidden=4), "cls": create_head("tests.custom_parts:PoolHead", 8, 5)}
    compact = prune(tiny_supermodel(heads), Policy({"seg": {"conv1": "share", "conv2": "specific"},
                                                    "cls": {"conv1": "share", "conv2": "share"}})).eval()
    compact.save(tmp_path / "cm")
    loaded = CompactModel.load(tmp_path / "cm", trust_code=True).eval()
    path = export_onnx(loaded, tmp_path / "m.onnx")  # verified against PyTorch by onnxruntime
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 8, 8)
    got = dict(zip(["seg", "cls"], session.run(["seg", "cls"], {"input": x.numpy()})))
    with torch.no_grad():
        want = loaded(x)
    for task in ("seg", "cls"):
        np.testing.assert_allclose(got[task], want[task].numpy(), rtol=1e-4, atol=1e-5)
    export_onnx(loaded, tmp_path / "hw.onnx", task="seg", dynamic_hw=True)  # the head upsamples to any size


# --------------------------------------------------------------------------------------------- the trust rule

def saved_marked_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str,
                        **options: float) -> tuple[Path, Path, SuperModel]:
    """A SuperModel (``sm``) and its compact model (``cm``) saved with a head from the marker module
    ``name`` (in ``tmp_path / "mods"``, on sys.path), then the module forgotten and its marker deleted."""
    mods = tmp_path / "mods"
    mods.mkdir()
    marker = marker_module(mods, name)
    monkeypatch.syspath_prepend(str(mods))
    try:
        sm = tiny_supermodel({"a": create_head(f"{name}:MarkedHead", 8, 2, **options), "b": create_head("cls", 8, 3)})
        sm.save(tmp_path / "sm")
        prune(sm, mixed_policy(sm)).save(tmp_path / "cm")
    finally:
        sys.modules.pop(name, None)
    marker.unlink()
    return mods, marker, sm


def test_model_files_import_no_code_without_consent(tmp_path, monkeypatch):
    name = "automtl_marker_head_api"
    _, marker, sm = saved_marked_models(tmp_path, monkeypatch, name, scale=2.0)
    try:
        for load, where in ((SuperModel.load, "sm"), (CompactModel.load, "cm")):
            with pytest.raises(UntrustedCodeError) as err:
                load(tmp_path / where)
            one_line(err, f"task 'a' has head {name}:MarkedHead, which is code", "--trust-code")
            assert not marker.exists() and name not in sys.modules
            again = load(tmp_path / where, trust_code=True).eval()
            assert marker.exists()
            if where == "sm":
                assert_same_outputs(sm, again, mode="hard")
            marker.unlink()
            sys.modules.pop(name)
    finally:
        sys.modules.pop(name, None)


def test_cli_commands_take_trust_code(tmp_path, monkeypatch):
    name = "automtl_marker_head_cli"
    mods, marker, _ = saved_marked_models(tmp_path, monkeypatch, name)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(mods), str(REPO), os.environ.get("PYTHONPATH", "")])}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "automtl_compiler.cli.main", *args], capture_output=True,
                              text=True, cwd=tmp_path, env=env, timeout=300, check=False)

    res = run("inspect", "sm")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "which is code; rerun with --trust-code" in res.stderr and not marker.exists()
    res = run("inspect", "sm", "--trust-code")
    assert res.returncode == 0, res.stderr
    assert f"head {name}:MarkedHead" in res.stdout and marker.exists()
    res = run("export", "cm", "-o", "m.onnx", "--trust-code")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "m.onnx").is_file()
