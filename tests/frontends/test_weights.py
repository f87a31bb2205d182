"""Pretrained weights for every backbone source: .pth and .safetensors state dicts give the same outputs as
the torch model holding them; checkpoint wrappings; one-line errors for missing, unexpected and mis-shaped
tensors; files that carry code are refused without running them; the CLI's --weights."""

from __future__ import annotations

import importlib.resources
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from automtl_compiler import load_backbone, save_graph, to_torch
from automtl_compiler.backbones import DeepLabResNet34
from automtl_compiler.errors import AutomtlError, FileFormatError, ShapeError
from automtl_compiler.frontends.weights import (
    WeightsMismatchError,
    fx_name,
    read_state_dict,
)
from automtl_compiler.ir.serialize import graph_tensors
from tests.helpers import Tiny, randomise_bn, randomised

ROOT = Path(__file__).resolve().parents[2]
SMALL = (1, 3, 16, 16)


def tiny(seed: int) -> Tiny:
    """A Tiny backbone with seeded random weights and batch-norm statistics, in eval mode."""
    torch.manual_seed(seed)
    return randomise_bn(Tiny(), seed=seed).eval()


def save(state: dict, path: Path) -> Path:
    """Write ``state`` with torch.save or, for a .safetensors path, safetensors."""
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous().clone() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def run_ir(graph, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return to_torch(graph).eval()(x)


def run_torch(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module.eval()(x)


def assert_same(graph, module: nn.Module, shape: tuple[int, ...] = SMALL, atol: float = 1e-5) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(run_ir(graph, x), run_torch(module, x), rtol=1e-5, atol=atol)


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- every source kind

@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_nn_module_source_gets_the_weights_and_is_not_modified(tmp_path, suffix):
    src = tiny(1)
    path = save(src.state_dict(), tmp_path / f"w{suffix}")
    target = tiny(2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    graph = load_backbone(target, input_shape=SMALL, weights=path)
    assert_same(graph, src)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_torchvision_source(tmp_path, suffix):
    model = randomised("resnet18")
    path = save(model.state_dict(), tmp_path / f"resnet18{suffix}")
    graph = load_backbone("torchvision:resnet18", input_shape=(1, 3, 64, 64), weights=path)
    assert_same(graph, model, (1, 3, 64, 64))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_entry_point_source(tmp_path, suffix):
    src = tiny(4)
    path = save(src.state_dict(), tmp_path / f"w{suffix}")
    assert_same(load_backbone("tests.helpers:Tiny", input_shape=SMALL, weights=path), src)


def imagenet_like_resnet34(tmp_path: Path, suffix: str) -> tuple[dict[str, torch.Tensor], Path]:
    """A torchvision resnet34 state dict (random weights and batch-norm statistics, with its fc), saved."""
    state = randomised("resnet34").state_dict()
    return state, save(state, tmp_path / f"resnet34{suffix}")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_paper_setting_imagenet_resnet34_into_deeplab_prototxt(tmp_path, suffix):
    """torchvision's resnet34 file loads into the built-in DeepLab ResNet-34 prototxt (fc ignored)."""
    packaged = importlib.resources.files("automtl_compiler.models") / "deeplab_resnet34.prototxt"
    assert packaged.read_text() == (ROOT / "models" / "deeplab_resnet34.prototxt").read_text()
    state, path = imagenet_like_resnet34(tmp_path, suffix)
    graph = load_backbone(str(packaged), input_shape=(1, 3, 64, 64), weights=path, strict=False)
    reference = DeepLabResNet34()
    incompatible = reference.load_state_dict(state, strict=False)
    assert incompatible.missing_keys == [] and sorted(incompatible.unexpected_keys) == ["fc.bias", "fc.weight"]
    assert_same(graph, reference, (1, 3, 64, 64))
    with pytest.raises(WeightsMismatchError) as error:
        load_backbone(str(packaged), input_shape=(1, 3, 64, 64), weights=path)
    message = one_line(error)
    assert str(path) in message and "unexpected 2 tensor(s): fc.bias, fc.weight" in message
    assert "missing" not in message.split("do not match")[1] and "strict=False" in message


def test_builtin_models_path_works_from_any_directory(tmp_path, monkeypatch):
    """``models/deeplab_resnet34.prototxt`` (as the configs write it) is the packaged file outside the repo."""
    state, _ = imagenet_like_resnet34(tmp_path, ".pth")
    monkeypatch.chdir(tmp_path)
    graph = load_backbone("models/deeplab_resnet34.prototxt", input_shape=(1, 3, 64, 64), weights="resnet34.pth",
                          strict=False)
    reference = DeepLabResNet34()
    reference.load_state_dict(state, strict=False)
    assert_same(graph, reference, (1, 3, 64, 64))
    with pytest.raises(FileFormatError, match="not found"):
        load_backbone("models/no_such_model.prototxt")


def test_prototxt_with_ir_keys_still_loads(tmp_path):
    from automtl_compiler import export_prototxt

    src = tiny(5)
    graph = load_backbone(src, input_shape=SMALL)
    export_prototxt(graph, tmp_path / "tiny.prototxt")
    loaded = load_backbone(tmp_path / "tiny.prototxt", weights=tmp_path / "tiny.safetensors")
    assert_same(loaded, src)
    torch.save(graph_tensors(graph), tmp_path / "ir.pt")
    assert_same(load_backbone(tmp_path / "tiny.prototxt", weights=tmp_path / "ir.pt"), src)


def test_prototxt_layer_names_follow_fx_naming(tmp_path):
    """State-dict names map onto the layers the exporter named after torch.fx nodes (CamelCase, nesting)."""
    from automtl_compiler import export_prototxt

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.convA = nn.Conv2d(3, 4, 3, padding=1)
            self.Stage = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.Stage(self.convA(x))

    torch.manual_seed(6)
    src = randomise_bn(Odd()).eval()
    graph = load_backbone(src, input_shape=SMALL)
    assert {fx_name("convA"), fx_name("Stage.0"), fx_name("Stage.1")} <= {n.name for n in graph.nodes()}
    export_prototxt(graph, tmp_path / "odd.prototxt", weights=False)
    path = save(src.state_dict(), tmp_path / "odd.pth")
    assert_same(load_backbone(tmp_path / "odd.prototxt", weights=path), src)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_json_source_weights_override_the_sidecar(tmp_path, suffix):
    save_graph(load_backbone(tiny(7), input_shape=SMALL), tmp_path / "g.json")
    save_graph(load_backbone(tiny(7), input_shape=SMALL), tmp_path / "bare.json", tensors=False)
    src = tiny(8)
    by_module = save(src.state_dict(), tmp_path / f"modules{suffix}")
    by_ir = save(graph_tensors(load_backbone(src, input_shape=SMALL)), tmp_path / f"ir{suffix}")
    for graph_file in ("g.json", "bare.json"):
        for weights in (by_module, by_ir):
            assert_same(load_backbone(tmp_path / graph_file, weights=weights), src)


def test_onnx_source_refuses_weights(tmp_path):
    from automtl_compiler.backends.onnx_export import export_graph_onnx

    export_graph_onnx(load_backbone(tiny(9), input_shape=SMALL), tmp_path / "t.onnx", verify=False)
    path = save(tiny(10).state_dict(), tmp_path / "w.pth")
    with pytest.raises(AutomtlError, match="carries its own weights") as error:
        load_backbone(tmp_path / "t.onnx", weights=path)
    assert str(tmp_path / "t.onnx") in one_line(error)
    assert load_backbone(tmp_path / "t.onnx").num_parameters() > 0


# ---------------------------------------------------------------- wrappings

def test_checkpoint_wrappings(tmp_path):
    src = tiny(11)
    state = src.state_dict()
    other = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    prefixed = {f"module.{k}": v for k, v in state.items()}
    files = {
        "state_dict.pth": {"state_dict": state, "epoch": 3, "arch": "tiny"},
        "model.pt": {"model": state, "optimizer": {"lr": 0.1, "state": {}}},
        "ddp.pth": prefixed,
        "ckpt_ddp.ckpt": {"state_dict": prefixed, "hyper_parameters": {"lr": 1e-3}},
        "ema_only.pth": {"state_dict_ema": state, "step": 5},
        "regular_over_ema.pth": {"model_ema": other, "model": state},
        "non_tensor_entries.bin": {**state, "version": 2, "notes": "x"},
        "compiled.pth": {f"_orig_mod.{k}": v for k, v in state.items()},
    }
    for name, content in files.items():
        torch.save(content, tmp_path / name)
        assert_same(load_backbone(Tiny(), input_shape=SMALL, weights=tmp_path / name), src)
    assert sorted(read_state_dict(tmp_path / "ddp.pth")) == sorted(state)


# ---------------------------------------------------------------- mismatches

def test_missing_unexpected_and_misshaped_tensors(tmp_path):
    state = tiny(12).state_dict()
    missing = {k: v for k, v in state.items() if k != "conv2.weight"}
    unexpected = {**state, "fc.weight": torch.zeros(10, 8), "fc.bias": torch.zeros(10)}
    misshaped = {**state, "conv1.weight": torch.zeros(4, 3, 5, 5)}
    no_counter = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    for name, content in {"missing": missing, "unexpected": unexpected, "misshaped": misshaped,
                          "no_counter": no_counter}.items():
        torch.save(content, tmp_path / f"{name}.pth")
    for source in (Tiny(), "tests.helpers:Tiny"):
        for strict in (True, False):
            with pytest.raises(FileFormatError, match=r"missing 1 tensor\(s\): conv2.weight") as error:
                load_backbone(source, input_shape=SMALL, weights=tmp_path / "missing.pth", strict=strict)
            assert str(tmp_path / "missing.pth") in one_line(error)
            with pytest.raises(ShapeError, match=r"mis-shaped 1 tensor\(s\): conv1.weight \[4, 3, 5, 5\] "
                                                 r"\(needs \[4, 3, 3, 3\]\)"):
                load_backbone(source, input_shape=SMALL, weights=tmp_path / "misshaped.pth", strict=strict)
            load_backbone(source, input_shape=SMALL, weights=tmp_path / "no_counter.pth", strict=strict)
        with pytest.raises(WeightsMismatchError, match=r"unexpected 2 tensor\(s\): fc.bias, fc.weight") as error:
            load_backbone(source, input_shape=SMALL, weights=tmp_path / "unexpected.pth")
        assert "missing" not in one_line(error).split("do not match")[1]
        load_backbone(source, input_shape=SMALL, weights=tmp_path / "unexpected.pth", strict=False)


def test_mismatch_lists_the_first_few_and_counts(tmp_path):
    state = randomised("resnet18").state_dict()
    torch.save({f"backbone.{k}": v for k, v in state.items()}, tmp_path / "prefixed.pth")
    with pytest.raises(WeightsMismatchError) as error:
        load_backbone("torchvision:resnet18", input_shape=(1, 3, 32, 32), weights=tmp_path / "prefixed.pth")
    message = one_line(error)
    needed = [k for k in state if not k.endswith("num_batches_tracked")]
    assert f"missing {len(needed)} tensor(s)" in message and f"unexpected {len(state)} tensor(s)" in message
    assert message.count(", ...") == 2 and "all start with 'backbone.'" in message
    with pytest.raises(WeightsMismatchError, match="all start with 'backbone.'") as error:
        load_backbone(ROOT / "models" / "resnet18.prototxt", input_shape=(1, 3, 32, 32),
                      weights=tmp_path / "prefixed.pth", strict=False)
    assert f"unexpected {len(state)}" not in one_line(error)


def test_graph_sources_mismatch(tmp_path):
    save_graph(load_backbone(tiny(13), input_shape=SMALL), tmp_path / "g.json")
    state = tiny(14).state_dict()
    torch.save({**{k: v for k, v in state.items() if k != "bn1.bias"}, "ghost.weight": torch.zeros(1)},
               tmp_path / "bad.pth")
    with pytest.raises(WeightsMismatchError, match=r"missing 1 tensor\(s\): bn1/bias; unexpected 1 tensor\(s\): "
                                                   r"ghost.weight"):
        load_backbone(tmp_path / "g.json", weights=tmp_path / "bad.pth")
    torch.save({**state, "conv1.bias": torch.zeros(5)}, tmp_path / "shape.pth")
    with pytest.raises(ShapeError, match=r"conv1.bias -> conv1/bias \[5\] \(needs \[4\]\)"):
        load_backbone(tmp_path / "g.json", weights=tmp_path / "shape.pth", strict=False)


# ---------------------------------------------------------------- bad files

def test_nonexistent_weights_file_is_an_error_for_every_source(tmp_path):
    save_graph(load_backbone(tiny(15), input_shape=SMALL), tmp_path / "g.json")
    for source in (Tiny(), "torchvision:resnet18", "tests.helpers:Tiny", tmp_path / "g.json",
                   ROOT / "models" / "deeplab_resnet34.prototxt"):
        with pytest.raises(FileFormatError, match="not found") as error:
            load_backbone(source, input_shape=(1, 3, 32, 32), weights=tmp_path / "nope.pth")
        assert "nope.pth" in one_line(error)


class _Evil:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_carrying_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    state = tiny(16).state_dict()
    (tmp_path / "legacy.pth").write_bytes(pickle.dumps({"state_dict": state, "hook": _Evil(marker)}, protocol=2))
    torch.save({"state_dict": state, "hook": _Evil(marker)}, tmp_path / "zipped.pt")
    for name in ("legacy.pth", "zipped.pt"):
        for source in (Tiny(), ROOT / "models" / "deeplab_resnet34.prototxt"):
            with pytest.raises(FileFormatError, match="contains code or Python objects") as error:
                load_backbone(source, input_shape=(1, 3, 32, 32), weights=tmp_path / name)
            message = one_line(error)
            assert name in message and "safetensors" in message
            assert not marker.exists()


def test_other_bad_files(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a pickle at all")
    with pytest.raises(FileFormatError, match="not a PyTorch state_dict file"):
        load_backbone(Tiny(), input_shape=SMALL, weights=tmp_path / "junk.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(FileFormatError, match="corrupt safetensors"):
        load_backbone(Tiny(), input_shape=SMALL, weights=tmp_path / "junk.safetensors")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(FileFormatError, match="not a state dict"):
        load_backbone(Tiny(), input_shape=SMALL, weights=tmp_path / "tensor.pth")
    torch.save({"epoch": 3}, tmp_path / "empty.pth")
    with pytest.raises(FileFormatError, match="holds no tensors"):
        load_backbone(Tiny(), input_shape=SMALL, weights=tmp_path / "empty.pth")
    (tmp_path / "w.caffemodel").write_bytes(b"")
    with pytest.raises(FileFormatError, match="unknown weights format '.caffemodel'"):
        load_backbone("torchvision:resnet18", weights=tmp_path / "w.caffemodel")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(FileFormatError, match="unknown weights format '.npz'"):
        load_backbone(ROOT / "models" / "deeplab_resnet34.prototxt", weights=tmp_path / "w.npz")


# ---------------------------------------------------------------- CLI

def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "automtl_compiler.cli.main", *args], capture_output=True,
                          text=True, timeout=300, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_weights(tmp_path):
    model = randomised("resnet18")
    torch.save(model.state_dict(), tmp_path / "r18.pth")
    out = tmp_path / "r18.json"
    res = cli("convert", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--weights", str(tmp_path / "r18.pth"),
              "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert_same(load_backbone(out), model, (1, 3, 32, 32))

    torch.save({**model.state_dict(), "extra.weight": torch.zeros(2)}, tmp_path / "extra.pth")
    res = cli("inspect", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--weights", str(tmp_path / "extra.pth"))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "extra.pth" in res.stderr and "unexpected 1 tensor(s): extra.weight" in res.stderr
    assert "--weights-non-strict" in res.stderr
    res = cli("inspect", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--weights", str(tmp_path / "extra.pth"),
              "--weights-non-strict", "--json")
    assert res.returncode == 0, res.stderr

    (tmp_path / "bad.pth").write_bytes(b"garbage")
    res = cli("compile", "torchvision:resnet18", "--task", "seg:3", "--input-shape", "1,3,32,32",
              "--weights", str(tmp_path / "bad.pth"), "-o", str(tmp_path / "sm"))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert res.stderr.startswith("error:") and "bad.pth" in res.stderr and not (tmp_path / "sm").exists()


def test_cli_weights_options_on_every_loading_command():
    from automtl_compiler.cli.main import main
    from click.testing import CliRunner

    for name in ("inspect", "convert", "compile"):
        text = CliRunner().invoke(main, [name, "--help"]).output
        assert "--weights" in text and "--weights-non-strict" in text and "safetensors" in text
    result = CliRunner().invoke(main, ["inspect", "torchvision:resnet18", "--weights-non-strict"])
    assert result.exit_code == 2 and "--weights-non-strict needs --weights" in result.output
