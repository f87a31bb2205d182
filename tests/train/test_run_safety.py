"""Run-directory safety and checkpoint integrity: --overwrite never deletes what is not a run (nor a run,
before the new one has a checkpoint), corrupt checkpoints are noticed and fall back to the one before,
and a run killed many times at random moments ends with the weights of an uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from automtl_compiler.errors import AutomtlError
from automtl_compiler.train import checkpoint as ckpt_module
from automtl_compiler.train.run import MARKER, train

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "synthetic-quick.yaml"
#: test_train.py's TINY with a two-conv backbone (150 KB checkpoints; no torchvision to import per process).
TINY = ["backbone=tests.train.test_run_safety:TinyBackbone", "input_size=[16, 16]", "output_stride=null",
        "dataset.options.length=24", "tasks.segment_semantic.hidden=8", "tasks.depth_zbuffer.hidden=8",
        "tasks.normal.hidden=8", "batch_size=4", "eval_batches=1", "stages.pretrain.iters=3", "stages.policy.iters=6",
        "stages.policy.network_steps=2", "stages.policy.policy_steps=1", "stages.policy.tau_every=2",
        "stages.posttrain.iters=3", "checkpoint_every=1", "eval_every=2"]
NO_STEPS = ["stages.pretrain.iters=0", "stages.policy.iters=0", "stages.posttrain.iters=0"]


class TinyBackbone(torch.nn.Module):
    """Two conv units with batch norms (the second of stride 2): the backbone of these runs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(4)
        self.conv2 = torch.nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    index = json.loads((run / "checkpoints" / "last.json").read_text())
    assert index["state"]["done"]
    return load_file(str(run / "checkpoints" / index["weights"]))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def tree(path: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under ``path``."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def cli(*args: str) -> tuple[int, str]:
    """``automtl ARGS`` in this process: exit status and stderr."""
    import contextlib
    import io

    from automtl_compiler.cli.main import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        main([*args], prog_name="automtl")
    return e.value.code, err.getvalue()


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def flip_mantissas(weights: Path, flips: int = 2000, seed: int = 0) -> None:
    """Flip ``flips`` random mantissa bits of the float32 model tensors in a safetensors file, in place
    (the exponents are untouched, so every value stays finite)."""
    raw = bytearray(weights.read_bytes())
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + size])
    start = 8 + size
    spans = [(start + v["data_offsets"][0], start + v["data_offsets"][1]) for k, v in header.items()
             if k.startswith("model/") and v["dtype"] == "F32" and v["data_offsets"][1] > v["data_offsets"][0]]
    words = np.concatenate([np.arange(a, b, 4) for a, b in spans])
    rng = np.random.default_rng(seed)
    for offset, bit in zip(rng.choice(words, size=flips, replace=False), rng.integers(0, 23, size=flips)):
        value = np.frombuffer(raw, dtype="<u4", count=1, offset=int(offset))[0] ^ np.uint32(1 << int(bit))
        raw[offset:offset + 4] = struct.pack("<I", int(value))
    floats = np.concatenate([np.frombuffer(raw[a:b], dtype="<f4") for a, b in spans])
    assert np.isfinite(floats).all()
    weights.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted TINY run (never modified: tests copy it)."""
    run = tmp_path_factory.mktemp("safety") / "whole"
    train(CONFIG, TINY, run, progress=False)
    return run


def copy_of(run: Path, tmp_path: Path, name: str = "run") -> Path:
    target = tmp_path / name
    shutil.copytree(run, target)
    return target


# ------------------------------------------------------------------ --overwrite
def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path):
    thesis = tmp_path / "thesis"
    (thesis / "chapters").mkdir(parents=True)
    (thesis / "notes.txt").write_text("mine")
    (thesis / "chapters" / "one.tex").write_text("\\chapter{One}")
    (thesis / "config.yaml").write_text("title: my thesis\n")  # a config.yaml of the user's own
    before = tree(thesis)
    for extra in ([], ["batch_size=0"]):  # a good config, then a bad one
        code, err = cli("train", str(CONFIG), "--out", str(thesis), "--overwrite", *sets(TINY + extra))
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "internal error" not in err
        if not extra:
            assert "is not a run directory" in err and "choose another --out" in err
        assert "--overwrite" not in err and "delete" not in err and "remove" not in err
        assert tree(thesis) == before
    with pytest.raises(AutomtlError, match="not a run directory"):
        train(CONFIG, TINY, thesis, overwrite=True, progress=False)
    assert tree(thesis) == before
    assert not list(tmp_path.glob(".*replaced*"))


def test_overwrite_keeps_the_old_run_when_the_new_config_fails(whole, tmp_path, monkeypatch, capsys):
    run = copy_of(whole, tmp_path)
    before = tree(run)
    with pytest.raises(AutomtlError, match="batch_size"):  # fails before anything is touched
        train(CONFIG, TINY + ["batch_size=0"], run, overwrite=True, progress=False)
    assert tree(run) == before
    code, err = cli("train", str(CONFIG), "--out", str(run), "--overwrite", "--quiet",
                    *sets(TINY + ["seed=5", f"baselines={tmp_path / 'missing' / 'report.json'}"]))
    assert code == 2 and "report.json" in err.strip().splitlines()[-1], err
    assert tree(run) == before

    from automtl_compiler.train import run as run_module

    for failure in (AutomtlError("the new run failed"), KeyboardInterrupt()):  # after the old run was moved aside
        def failing(*args, failure=failure, **kwargs):
            assert (run / MARKER).exists() and not (run / "checkpoints").exists()  # the old run is aside
            raise failure

        monkeypatch.setattr(run_module, "Trainer", failing)
        capsys.readouterr()
        with pytest.raises(type(failure)):
            train(CONFIG, TINY + ["seed=5"], run, overwrite=True, progress=False)
        assert "the run it was replacing is back in" in capsys.readouterr().err
        assert tree(run) == before
    assert not list(tmp_path.glob(".*replaced*"))


def test_overwrite_replaces_a_run_and_a_legacy_run(whole, tmp_path):
    run = copy_of(whole, tmp_path)
    (run / "old.txt").write_text("of the old run")
    train(CONFIG, TINY + NO_STEPS, run, overwrite=True, progress=False)
    assert not (run / "old.txt").exists()
    assert "iters: 0" in (run / "config.yaml").read_text()
    assert json.loads((run / MARKER).read_text())["kind"] == "train"
    assert not list(tmp_path.glob(".*replaced*")), "the replaced run is deleted"

    legacy = copy_of(whole, tmp_path, "legacy")  # written before run markers: config.yaml + checkpoints/last.json
    (legacy / MARKER).unlink()
    with pytest.raises(AutomtlError, match="different config.*--overwrite"):
        train(CONFIG, TINY + NO_STEPS, legacy, progress=False)
    train(CONFIG, TINY + NO_STEPS, legacy, overwrite=True, progress=False)
    assert (legacy / MARKER).exists() and "iters: 0" in (legacy / "config.yaml").read_text()


def test_pipeline_run_directories_are_marked_and_replaced_safely(tmp_path, monkeypatch, capsys):
    from automtl_compiler import pipeline
    from automtl_compiler.train import run as run_module

    out = tmp_path / "run"
    pipeline.run(CONFIG, out, overrides=TINY, progress=False, latency_repeat=3)
    kinds = {str(d.relative_to(out)): json.loads((d / MARKER).read_text())["kind"]
             for d in [out, out / "references", *(out / "references").iterdir()] if (d / MARKER).exists()}
    assert kinds == {".": "run", "references": "baseline-single-task", **{
        f"references/{t}": "reference" for t in ("segment_semantic", "depth_zbuffer", "normal")}}
    before = tree(out)
    with pytest.raises(AutomtlError, match="a pipeline run .automtl run., not a training run"):
        train(CONFIG, TINY, out, progress=False)

    def failing(*args, **kwargs):
        raise AutomtlError("the references failed")

    monkeypatch.setattr(run_module, "train_single_task_references", failing)
    with pytest.raises(AutomtlError, match="the references failed"):
        pipeline.run(CONFIG, out, overrides=[*TINY, "seed=3"], progress=False, overwrite=True)
    assert "is back in" in capsys.readouterr().err
    assert tree(out) == before, "the references and the run are untouched"
    monkeypatch.undo()
    pipeline.run(CONFIG, out, overrides=[*TINY, "seed=3"], progress=False, overwrite=True, references=False,
                 latency_repeat=3)
    assert not (out / "references").exists() and "seed: 3" in (out / "config.yaml").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


# ------------------------------------------------------------------ corrupt checkpoints
class Crash(Exception):
    """A simulated crash of the training process."""


def test_bit_flipped_checkpoint_falls_back_to_the_previous_one(whole, tmp_path, monkeypatch, capsys):
    from automtl_compiler.train import loop

    real, calls = loop.save_checkpoint, []

    def crashing(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(args[4]["stage"])
        if len(calls) == 7:  # policy step 3 (after 3 pre-train checkpoints, the stage's last, policy 1..3)
            raise Crash
        return result

    monkeypatch.setattr(loop, "save_checkpoint", crashing)
    run = tmp_path / "run"
    with pytest.raises(Crash):
        train(CONFIG, TINY, run, progress=False)
    monkeypatch.setattr(loop, "save_checkpoint", real)
    ckpt = run / "checkpoints"
    last, previous = (json.loads((ckpt / n).read_text()) for n in ("last.json", "previous.json"))
    assert (last["state"]["stage"], last["state"]["step"], previous["state"]["step"]) == ("policy", 3, 2)
    flip_mantissas(ckpt / last["weights"])

    capsys.readouterr()
    train(CONFIG, TINY, run, progress=False)
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, err
    assert str(ckpt / "last.json") in warnings[0] and "SHA-256" in warnings[0] and "policy step 2" in warnings[0]
    assert (ckpt / "last.json.corrupt").exists()
    assert_same_weights(whole, run)


def corrupt_step(doc: dict) -> None:
    doc["state"]["step"] = "ten"


def corrupt_missing(doc: dict) -> None:
    del doc["optimizers"]


def corrupt_step_resealed(doc: dict) -> None:  # the checksum recomputed: the type check still catches it
    doc["state"]["step"] = "ten"
    doc["state_sha256"] = ckpt_module._state_digest(doc)


CORRUPTIONS = {"step-ten": (corrupt_step, "'state.step' is 'ten'"),
               "missing-key": (corrupt_missing, "'optimizers' is missing"),
               "step-ten-resealed": (corrupt_step_resealed, "'state.step' is 'ten'")}


def edit_index(path: Path, corrupt) -> None:
    doc = json.loads(path.read_text())
    corrupt(doc)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("case", [*CORRUPTIONS, "bad-json", "truncated-weights"])
def test_corrupt_newest_checkpoint_falls_back(whole, tmp_path, capsys, case):
    run = copy_of(whole, tmp_path)
    ckpt = run / "checkpoints"
    if case == "bad-json":
        (ckpt / "last.json").write_text((ckpt / "last.json").read_text()[:100])
        reason = "not valid JSON"
    elif case == "truncated-weights":
        weights = ckpt / json.loads((ckpt / "last.json").read_text())["weights"]
        weights.write_bytes(weights.read_bytes()[:1000])
        reason = "bytes, the index says"
    else:
        corrupt, reason = CORRUPTIONS[case]
        edit_index(ckpt / "last.json", corrupt)
    capsys.readouterr()
    train(CONFIG, TINY, run, progress=False)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and str(ckpt / "last.json") in err and reason in err, err
    assert "internal error" not in err
    assert_same_weights(whole, run)  # the previous checkpoint is post-train's last step: the same weights


def test_no_intact_checkpoint_is_exit_2_naming_the_file(whole, tmp_path):
    run = copy_of(whole, tmp_path)
    ckpt = run / "checkpoints"
    edit_index(ckpt / "last.json", corrupt_step)
    edit_index(ckpt / "previous.json", corrupt_missing)
    before = tree(run)
    res = subprocess.run([sys.executable, "-m", "automtl_compiler.cli.main", "train", str(CONFIG), "--out", str(run),
                          "--quiet", *sets(TINY)], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         check=False)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert str(ckpt / "last.json") in lines[0] and str(ckpt / "previous.json") in lines[0]
    assert "'state.step' is 'ten'" in lines[0] and "'optimizers' is missing" in lines[0]
    assert "--overwrite" not in lines[0] and "another --out" in lines[0]
    assert tree(run) == before, "nothing is moved or deleted when there is nothing to fall back to"

    flipped = copy_of(whole, tmp_path, "flipped")  # bit flips in both tensor files
    for name in ("last.json", "previous.json"):
        flip_mantissas(flipped / "checkpoints" / json.loads((flipped / "checkpoints" / name).read_text())["weights"])
    with pytest.raises(AutomtlError, match=r"last.json: checkpoint is corrupt \(its tensor file .* SHA-256.*\), and "
                                           r"so is the one before it"):
        train(CONFIG, TINY, flipped, progress=False)


# ------------------------------------------------------------------ kills
SCRIPT = """
import sys
from automtl_compiler.train.run import train
train(sys.argv[1], sys.argv[3:], sys.argv[2], progress=False)
"""
KILL_ARGS = [*TINY, "stages.policy.iters=12", "stages.posttrain.iters=8"]  # 28 checkpoints


def serial(ckpt: Path) -> int:
    """The serial number of the newest checkpoint (0 before the first)."""
    return json.loads((ckpt / "last.json").read_text())["serial"] if (ckpt / "last.json").exists() else 0


def mid_write(ckpt: Path) -> bool:
    """Whether a checkpoint write was under way: files no index names, or both indexes naming one serial."""
    if not ckpt.exists():
        return False
    docs = [json.loads((ckpt / n).read_text()) for n in ("last.json", "previous.json") if (ckpt / n).exists()]
    named = {d["weights"] for d in docs}
    stray = [p for p in ckpt.iterdir() if p.name.endswith(".tmp") or (p.suffix == ".safetensors" and p.name not in named)]
    return bool(stray) or (len(docs) == 2 and docs[0]["serial"] == docs[1]["serial"])


def wait_for_kill_moment(mode: str, proc: subprocess.Popen, ckpt: Path, rng: random.Random) -> None:
    """Wait for the moment to kill ``proc`` at: ``startup`` (2-5 s after it started: before or around its
    first checkpoint), ``mid-write`` (its next checkpoint's tensor file written, the indexes not yet) or
    ``random`` (0-0.5 s after it wrote a checkpoint)."""
    if mode == "startup":
        time.sleep(rng.uniform(2.0, 5.0))
        return
    first, deadline = serial(ckpt), time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if serial(ckpt) > first and (mode != "mid-write" or mid_write(ckpt)):
            break
        time.sleep(0.005)
    if mode == "random":
        time.sleep(rng.uniform(0.0, 0.5))


@pytest.mark.slow
def test_many_random_kills_end_with_the_uninterrupted_weights(tmp_path):
    """Killed 10 times at random moments (at least 3 while a checkpoint is being written, a window the
    test hook widens) and restarted each time, a run ends with the weights of an uninterrupted one; no
    kill leaves a corrupt checkpoint and no restart warns."""
    start = time.monotonic()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = tmp_path / "whole"
    reference = subprocess.Popen([sys.executable, "-c", SCRIPT, str(CONFIG), str(whole), *KILL_ARGS], cwd=ROOT,
                                 env=env)
    run = tmp_path / "killed"
    ckpt = run / "checkpoints"
    rng = random.Random(20240611)
    kills, during_write, lives = 0, 0, 0
    env_paused = {**env, ckpt_module.PAUSE_ENV: "0.15"}
    while kills < 10:
        lives += 1
        log = tmp_path / f"life-{lives}.err"
        with open(log, "w") as err:
            proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(CONFIG), str(run), *KILL_ARGS], cwd=ROOT,
                                    env=env_paused, stderr=err)
        mode = ("mid-write", "random", "random")[kills % 3] if kills else "startup"
        wait_for_kill_moment(mode, proc, ckpt, rng)
        if proc.poll() is not None:
            break  # the run finished
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        during_write += mid_write(ckpt)
        for name in ("last.json", "previous.json"):  # both checkpoints survive every kill intact
            if (ckpt / name).exists():
                assert isinstance(ckpt_module._verify(ckpt / name), ckpt_module.Checkpoint), (name, kills)
        assert "warning" not in log.read_text() and "Traceback" not in log.read_text(), log.read_text()
    final = subprocess.run([sys.executable, "-c", SCRIPT, str(CONFIG), str(run), *KILL_ARGS], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300, check=False)
    assert final.returncode == 0 and "warning" not in final.stderr, final.stderr
    assert reference.wait(timeout=300) == 0
    assert kills == 10 and during_write >= 3, (kills, during_write)
    assert_same_weights(whole, run)
    assert json.loads((whole / "policy.json").read_text()) == json.loads((run / "policy.json").read_text())
    print(f"\nkills survived: {kills}, during a checkpoint write: {during_write}, lives: {lives + 1}, "
          f"{time.monotonic() - start:.0f} s")


def test_a_run_written_before_a_config_key_existed_is_the_same_run(tmp_path):
    """Upgrading mid-run: the saved config lacks keys added since (and has ``bf16``, the old name of
    ``precision``); with defaults filled in it is the run's config, so the run resumes rather than being
    refused as a different one."""
    import yaml

    from automtl_compiler.train.config import dump_config, load_config
    from automtl_compiler.train.run import is_run_dir

    cfg = load_config(CONFIG, [*TINY, "precision=fp32"])
    old = yaml.safe_load(dump_config(cfg))
    del old["precision"], old["activation_checkpointing"], old["channels_last"], old["compile"]
    old["bf16"] = False
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump(old))
    assert is_run_dir(out, cfg)
    assert not is_run_dir(out, load_config(CONFIG, [*TINY, "precision=bf16"])), "bf16: false is fp32"


def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_the_old_checkpoint(tmp_path):
    import errno

    target = tmp_path / "state-2.safetensors"
    (tmp_path / "state-1.safetensors").write_bytes(b"old")

    def full(path: Path) -> None:
        path.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(AutomtlError, match="could not write checkpoint .*No space left.*free space and run the same"):
        ckpt_module._durable_write(target, full)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state-1.safetensors"], "no partial file is left"
