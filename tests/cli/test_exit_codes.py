"""Every error a user can cause ends the CLI with exit 2 and one line on stderr; ``internal error`` (exit 1)
is left for bugs. Each case runs the CLI's entry point
(in this process; the cases that could end the process in a new one).

``--debug`` may be written anywhere on the command line; it prints the traceback before the same one line and
does not change the exit status (2 for user errors, 1 for internal errors).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from automtl_compiler.errors import AutomtlError
from automtl_compiler.train.config import MAX_ALIASES, load_config
from tests.helpers import Tiny

ROOT = Path(__file__).resolve().parents[2]
TINY = ["tests.helpers:Tiny", "--input-shape", "1,3,16,16"]


def run_fresh(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """The CLI in a new process: for cases that could end the process itself (``os:abort``)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "automtl_compiler.cli.main", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300, check=False)


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """The CLI's own entry point in this process (the same code path as the ``automtl`` command, without
    the interpreter start-up): exit status, stdout and stderr as a subprocess would report them."""
    import contextlib
    import io

    from automtl_compiler.cli.main import main

    out, err, code = io.StringIO(), io.StringIO(), 0
    old = Path.cwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main.main(list(args), prog_name="automtl")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(old)
    return subprocess.CompletedProcess(["automtl", *args], code, out.getvalue(), err.getvalue())


def user_error(res: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Assert exit 2 with exactly one ``error:`` line, no traceback and no internal error; return the line."""
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr[-2000:]
    assert lines[0].startswith("error: ") and "internal error" not in res.stderr and "Traceback" not in res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SuperModel (``sm``), an argmax policy (``policy.json``) and its compact model (``cm``)."""
    from automtl_compiler import build_supermodel, load_backbone
    from automtl_compiler.nn.compact import prune
    from automtl_compiler.nn.heads import make_head

    root = tmp_path_factory.mktemp("models")
    graph = load_backbone(Tiny(), input_shape=(1, 3, 16, 16))
    heads = {t: make_head({"type": "aspp", "in_channels": 8, "num_classes": k, "hidden": 4})
             for t, k in (("seg", 3), ("depth", 1))}
    model = build_supermodel(graph, heads, feature_node="bn2")
    model.save(root / "sm")
    policy = model.sample_policy("argmax")
    policy.save(root / "policy.json")
    prune(model, policy).save(root / "cm")
    return root


@pytest.fixture
def unwritable(tmp_path: Path) -> Path:
    """A directory this process cannot create files in (a read-only directory; /sys/kernel for root)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        (ro / "probe").write_text("x")
    except PermissionError:
        return ro
    (ro / "probe").unlink()
    ro.chmod(0o755)
    sys_dir = Path("/sys/kernel")
    try:
        (sys_dir / "automtl-probe").mkdir()
    except OSError:
        return sys_dir
    pytest.skip("no unwritable directory available")


# ------------------------------------------------------------------------------------------------- configs

@pytest.mark.parametrize("override,needles", [
    ("stages.pretrain.lr=.nan", ["'stages.pretrain.lr'", "finite number > 0", "nan"]),
    ("stages.policy.network_lr=-0.01", ["'stages.policy.network_lr'", "> 0"]),
    ("stages.policy.tau_every=0", ["'stages.policy.tau_every'", "1..1000000000"]),
    ("tasks={seg: {type: segment_semantic, channels: 0}}", ["'tasks.seg.channels'", "1..65536"]),
    ("output_stride=4", ["'output_stride'", "8, 16, 32"]),
    ("eval_batches=0", ["'eval_batches'", "null"]),
])
def test_config_values_out_of_range(tmp_path: Path, override: str, needles: list[str]) -> None:
    res = run("train", "--out", str(tmp_path / "run"), "--quiet", "--set", override)
    user_error(res, *needles)
    assert not (tmp_path / "run").exists()


def test_config_needs_a_step_per_policy_cycle(tmp_path: Path) -> None:
    res = run("train", "--out", str(tmp_path / "run"), "--set", "stages.policy.network_steps=0",
              "--set", "stages.policy.policy_steps=0")
    user_error(res, "network_steps", "policy_steps", "at least 1")


def test_binary_config_names_the_file(tmp_path: Path) -> None:
    config = tmp_path / "weights.yaml"
    config.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00" + bytes(range(256)))
    user_error(run("train", str(config), "--out", str(tmp_path / "run")), str(config), "not a text file")


def test_huge_integer_in_config(tmp_path: Path) -> None:
    config = tmp_path / "big.yaml"
    config.write_text("stages:\n  pretrain:\n    iters: " + "9" * 5000 + "\n")
    line = user_error(run("train", str(config), "--out", str(tmp_path / "run")), str(config), "digits")
    assert len(line) < 300


def bomb(levels: int = 9, width: int = 9) -> str:
    """A YAML alias bomb nested as a value: ``width ** levels`` strings from a few hundred bytes."""
    names = "abcdefghijklmnopqrstuvwxyz"
    rows = [f"  {names[0]}: &{names[0]} [{','.join('x' * width)}]"]
    for i in range(1, levels):
        rows.append(f"  {names[i]}: &{names[i]} [{','.join([f'*{names[i - 1]}'] * width)}]")
    return "stages:\n pretrain:\n  lr:\n" + "\n".join("  " + r for r in rows) + "\n"


def test_yaml_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    config = tmp_path / "bomb.yaml"
    config.write_text(bomb())
    assert len(config.read_bytes()) < 420
    start = time.perf_counter()
    with pytest.raises(AutomtlError, match="aliases"):
        load_config(config)
    assert time.perf_counter() - start < 3
    line = user_error(run("train", str(config), "--out", str(tmp_path / "run")), str(config), "aliases")
    assert len(line) < 300


def test_yaml_expansion_bound_with_few_aliases(tmp_path: Path) -> None:
    config = tmp_path / "wide.yaml"
    config.write_text(bomb(levels=7, width=7))  # 42 aliases, 7**7 = 823,543 values
    start = time.perf_counter()
    with pytest.raises(AutomtlError, match="expanded"):
        load_config(config)
    assert time.perf_counter() - start < 3
    with pytest.raises(AutomtlError, match="contains itself"):
        load_config(None, ["stages.pretrain.lr=&a [*a]"])
    ok = tmp_path / "ok.yaml"
    ok.write_text("stages:\n  pretrain: &p {iters: 3}\n  posttrain: {iters: 3}\n")
    assert load_config(ok)["stages"]["pretrain"]["iters"] == 3
    assert MAX_ALIASES >= 8


@pytest.mark.parametrize("overrides,key", [
    (["stages.pretrain.betas=[0.5, 1.0]"], "stages.pretrain.betas[1]"),
    (["stages.posttrain.betas=[0.5]"], "stages.posttrain.betas"),
    (["dataset.workers=100000"], "dataset.workers"),
    (["stages.pretrain.weight_decay=-1"], "stages.pretrain.weight_decay"),
    (["stages.policy.momentum=1.5"], "stages.policy.momentum"),
    (["stages.policy.tau=0"], "stages.policy.tau"),
    (["stages.policy.tau_decay=0"], "stages.policy.tau_decay"),
    (["stages.policy.tau_decay=1.01"], "stages.policy.tau_decay"),
    (["stages.posttrain.gamma=0"], "stages.posttrain.gamma"),
    (["stages.posttrain.step_size=0"], "stages.posttrain.step_size"),
    (["stages.posttrain.lr=inf"], "stages.posttrain.lr"),
    (["stages.policy.policy_lr=" + "9" * 400], "stages.policy.policy_lr"),
    (["stages.policy.iters=-1"], "stages.policy.iters"),
    (["batch_size=0"], "batch_size"),
    (["checkpoint_every=-1"], "checkpoint_every"),
    (["eval_every=-5"], "eval_every"),
    (["seed=-1"], "seed"),
    (["seed=99999999999"], "seed"),
    (["tasks.normal.hidden=0"], "tasks.normal.hidden"),
    (["tasks.normal.hidden=100000"], "tasks.normal.hidden"),
    (["tasks.normal.weight=-1"], "tasks.normal.weight"),
    (["input_size=[0, 32]"], "input_size"),
    (["input_size=[32, 100000]"], "input_size"),
    (["output_stride=true"], "output_stride"),
    (["feature_node=[1]"], "feature_node"),
])
def test_config_ranges_name_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(AutomtlError, match=re.escape(f"'{key}'")) as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value) and len(str(info.value)) < 400


def test_config_boundaries_are_accepted() -> None:
    cfg = load_config(None, ["stages.policy.network_steps=0", "stages.policy.tau_decay=1", "stages.posttrain.gamma=1",
                             "stages.policy.momentum=0", "stages.pretrain.betas=[0, 0.999]", "eval_every=0",
                             "checkpoint_every=0", "output_stride=8", "stages.pretrain.lr=1e-3", "eval_batches=1"])
    assert cfg["stages"]["pretrain"]["lr"] == 1e-3 and math.isclose(cfg["stages"]["policy"]["tau_decay"], 1.0)


# ------------------------------------------------------------------------------------------------ backbones

def test_config_backbone_os_abort_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "abort.yaml"
    config.write_text("backbone: os:abort\ninput_size: [16, 16]\n")
    res = run_fresh("train", str(config), "--out", str(tmp_path / "run"), "--quiet")
    assert res.returncode >= 0, "the process was killed"
    user_error(res, "os:abort")


@pytest.mark.parametrize("entry,needle", [("sys:exit", "sys:exit"), ("posix:_exit", "posix:_exit"),
                                          ("torch:randn", "builtin"), ("json:dumps", "needs arguments"),
                                          ("tests.cli.test_exit_codes:exits", "SystemExit")])
def test_entry_points_that_are_not_backbones(entry: str, needle: str) -> None:
    from automtl_compiler.frontends import _call_entry

    with pytest.raises(AutomtlError, match=needle):
        _call_entry(entry)


def exits() -> None:
    """An entry point that ends the process."""
    sys.exit(3)


def test_inspect_os_abort_is_one_line() -> None:
    res = run_fresh("inspect", "os:abort")
    assert res.returncode >= 0
    user_error(res, "os:abort")


# -------------------------------------------------------------------------------------------------- weights

def tiny_weights(path: Path, change: str) -> Path:
    state = {k: v.clone() for k, v in Tiny().state_dict().items()}
    weight = state["conv1.weight"]
    state["conv1.weight"] = {"int8": weight.to(torch.int8), "bool": weight > 0, "complex": weight.to(torch.complex64),
                             "nan": weight.index_fill(0, torch.tensor([0]), math.nan),
                             "inf": torch.full_like(weight, math.inf)}[change].contiguous()
    save_file(state, str(path))
    return path


@pytest.mark.parametrize("change,needle", [("int8", "int8"), ("complex", "complex64"), ("nan", "NaN/inf")])
def test_weights_of_the_wrong_kind_are_refused(tmp_path: Path, change: str, needle: str) -> None:
    path = tiny_weights(tmp_path / f"{change}.safetensors", change)
    user_error(run("inspect", *TINY, "--weights", str(path)), str(path), "conv1.weight", needle)


@pytest.mark.parametrize("change", ["bool", "inf"])
def test_weights_checks_in_process(tmp_path: Path, change: str) -> None:
    from automtl_compiler.frontends.weights import load_into_module

    path = tiny_weights(tmp_path / f"{change}.safetensors", change)
    module = Tiny()
    before = module.conv1.weight.detach().clone()
    with pytest.raises(AutomtlError, match="conv1.weight"):
        load_into_module(module, path)
    assert torch.equal(module.conv1.weight, before)


def test_supermodel_weights_with_nan_are_refused(models: Path, tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file

    sm = tmp_path / "sm"
    shutil.copytree(models / "sm", sm)
    state = load_file(str(sm / "weights.safetensors"))
    key = next(k for k in state if k.endswith("weight") and state[k].is_floating_point())
    state[key] = torch.full_like(state[key], math.nan)
    save_file(state, str(sm / "weights.safetensors"))
    user_error(run("inspect", str(sm)), "weights.safetensors", key, "NaN")


# -------------------------------------------------------------------------------------------- model files

def edit_json(src: Path, dst: Path, name: str, change: dict) -> Path:
    import shutil

    shutil.copytree(src, dst)
    doc = json.loads((dst / name).read_text())
    for key, value in change.items():
        if value is None:
            del doc[key]
        else:
            doc[key] = value
    (dst / name).write_text(json.dumps(doc))
    return dst


@pytest.mark.parametrize("change,needle", [({"heads": None}, "'heads' is missing"), ({"tasks": "seg"}, "'tasks'")])
def test_supermodel_json_keys(models: Path, tmp_path: Path, change: dict, needle: str) -> None:
    sm = edit_json(models / "sm", tmp_path / "sm", "supermodel.json", change)
    user_error(run("inspect", str(sm)), "supermodel.json", needle)


@pytest.mark.parametrize("change,needle", [({"policy": None}, "'policy' is missing"),
                                           ({"reference": {"x": 1}}, "'reference'")])
def test_compact_json_keys(models: Path, tmp_path: Path, change: dict, needle: str) -> None:
    cm = edit_json(models / "cm", tmp_path / "cm", "compact.json", change)
    user_error(run("export", str(cm), "-o", str(tmp_path / "m.onnx"), "--no-verify"), "compact.json", needle)


def test_policy_with_a_huge_integer(models: Path, tmp_path: Path) -> None:
    doc = json.loads((models / "policy.json").read_text())
    task = next(iter(doc["choices"]))
    node = next(iter(doc["choices"][task]))
    text = json.dumps(doc).replace(f'"{node}": "', f'"{node}": {"9" * 5000}, "x": "', 1)
    policy = tmp_path / "policy.json"
    policy.write_text(text)
    line = user_error(run("prune", str(models / "sm"), "--policy", str(policy), "-o", str(tmp_path / "cm")),
                      str(policy), "digits")
    assert len(line) < 300 and not (tmp_path / "cm").exists()


# ------------------------------------------------------------------------------------------ unwritable outputs

@pytest.mark.parametrize("command", ["sample", "prune", "compile", "convert", "export", "train"])
def test_unwritable_output_is_one_line(models: Path, unwritable: Path, command: str) -> None:
    out = unwritable / {"sample": "p.json", "convert": "g.json", "export": "m.onnx"}.get(command, "out")
    args = {"sample": ["sample", str(models / "sm"), "-o", str(out)],
            "prune": ["prune", str(models / "sm"), "--policy", str(models / "policy.json"), "-o", str(out)],
            "compile": ["compile", *TINY, "--task", "a:2", "-o", str(out)],
            "convert": ["convert", *TINY, "-o", str(out)],
            "export": ["export", str(models / "cm"), "-o", str(out), "--no-verify"],
            "train": ["train", "--out", str(out), "--quiet", "--set", "stages.pretrain.iters=1"]}[command]
    line = user_error(run(*args))
    assert str(unwritable) in line and ("ermi" in line or "not permitted" in line), line


# ---------------------------------------------------------------------------------------------------- --debug

def test_debug_after_the_subcommand(tmp_path: Path) -> None:
    res = run("inspect", "missing.onnx", "--debug", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" in res.stderr and "No such option" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: missing.onnx")
    res = run("train", "--out", str(tmp_path / "run"), "--set", "output_stride=4", "--debug")
    assert res.returncode == 2 and "'output_stride'" in res.stderr.strip().splitlines()[-1]


def test_internal_error_is_exit_1_with_traceback_only_on_debug(models: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from automtl_compiler.cli.main import main

    from automtl_compiler.nn.supermodel import SuperModel

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(SuperModel, "load", broken)
    sm = str(models / "sm")
    for argv, traceback in ((["inspect", sm], False), (["inspect", sm, "--debug"], True)):
        with pytest.raises(SystemExit) as info:
            main.main(argv)
        err = capsys.readouterr().err
        assert info.value.code == 1 and ("Traceback" in err) == traceback
        assert err.strip().splitlines()[-1].startswith("internal error: RuntimeError: a bug")
