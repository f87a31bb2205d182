"""Starting training processes: ``python -m automtl_compiler.train`` (what torchrun starts), ``launch`` (torchrun's
machinery in automtl) and the CLI's --nproc-per-node/--nnodes/--node-rank/--rdzv-endpoint.

The launcher is run on a probe module (written to tmp_path) that records the environment each rank gets,
never on a real training run.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from automtl_compiler.errors import AutomtlError
from automtl_compiler.train import launch as launch_module
from automtl_compiler.train.launch import LAUNCHED, launch, run_training

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER_OPTIONS = {"nproc", "nnodes", "node_rank", "rdzv_endpoint"}

PROBE = '''
import json, os, sys, time
from pathlib import Path

rank, out = int(os.environ["RANK"]), Path(sys.argv[1])
keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "{launched}")
if sys.argv[2] in ("env", "gloo"):
    total = None
    if sys.argv[2] == "gloo":
        import torch
        import torch.distributed as dist

        dist.init_process_group("gloo")
        total = torch.tensor([float(rank + 1)])
        dist.all_reduce(total)
        dist.destroy_process_group()
        total = total.item()
    (out / f"rank{{rank}}.json").write_text(json.dumps({{"env": {{k: os.environ.get(k) for k in keys}},
                                                       "sum": total}}))
elif rank == 0:
    (out / "rank0.pid").write_text(str(os.getpid()))
    time.sleep(120)
else:
    while not (out / "rank0.pid").exists():
        time.sleep(0.05)
    if sys.argv[2] == "cli-error":
        from automtl_compiler.cli.main import main

        main(["inspect", "no-such-net.prototxt"])
    raise ValueError("the probe fails")
'''


@pytest.fixture
def probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A module ``launch_probe`` the workers can import; returns the directory the ranks write to."""
    (tmp_path / "launch_probe.py").write_text(PROBE.format(launched=LAUNCHED))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "ranks"
    out.mkdir()
    return out


def cli(*args: str) -> tuple[int, str, str]:
    """``automtl ARGS`` in this process: exit status, stdout, stderr."""
    from automtl_compiler.cli.main import main

    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main.main(list(args), prog_name="automtl")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def cli_error(*args: str, needles: tuple[str, ...] = ()) -> str:
    """``automtl ARGS`` must fail with one ``error:`` line holding ``needles``; returns the line."""
    code, _, err = cli(*args)
    return one_error_line(code, err, *needles)


def one_error_line(code: int, err: str, *needles: str) -> str:
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------ python -m automtl_compiler.train

def test_worker_entry_takes_the_options_of_automtl_train_but_the_launchers():
    from automtl_compiler.cli.main import train

    from automtl_compiler.train.__main__ import main as worker

    names = {p.name for p in worker.params}
    assert names == {p.name for p in train.params} - LAUNCHER_OPTIONS
    assert {"config", "out", "overrides", "resume", "overwrite"} <= names


def test_worker_entry_bad_input_is_one_line_and_exit_2(tmp_path):
    res = subprocess.run([sys.executable, "-m", "automtl_compiler.train", str(tmp_path / "missing.yaml"), "--out",
                          str(tmp_path / "run")], check=False, capture_output=True, text=True, cwd=ROOT, timeout=120)
    one_error_line(res.returncode, res.stderr, "missing.yaml: config file not found")
    assert res.stdout == "" and not (tmp_path / "run").exists()

    from automtl_compiler.train.__main__ import main as worker

    for args, needle in ([[], "Missing option '--out'"],
                         [["--out", str(tmp_path / "run"), "--set", "stages.pretrain.itres=1"],
                          "unknown key 'stages.pretrain.itres'"],
                         [["--out", str(tmp_path / "run"), "--weights-non-strict"], "--weights-non-strict needs --weights"]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as stop:
            worker.main(args, prog_name="python -m automtl_compiler.train")
        one_error_line(stop.value.code, err.getvalue(), needle)
    assert not (tmp_path / "run").exists()


def test_run_training_prints_on_rank_zero_only(monkeypatch):
    from automtl_compiler.train import run as run_module

    calls = []
    report = {"tasks": {"seg": {"miou": 0.25}}, "delta_m": {"delta_m": 1.5}}
    monkeypatch.setattr(run_module, "train", lambda *a, **k: calls.append((a, k)) or report)
    monkeypatch.setenv("RANK", "0")
    assert run_training("c.yaml", ["seed=1"], "out", resume=True, quiet=True) == [
        "seg: miou 0.25", "delta_m: +1.50%", f"wrote {Path('out') / 'report.json'}"]
    assert calls[0] == (("c.yaml", ["seed=1"], "out"),
                        {"resume": True, "overwrite": False, "progress": False, "baseline": None})
    monkeypatch.setenv("RANK", "1")
    assert run_training("c.yaml", [], "out") == []


def test_a_worker_under_torchrun_prints_its_error_and_records_it(tmp_path, monkeypatch):
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.delenv(LAUNCHED, raising=False)
    line = cli_error("inspect", "no-such-net.prototxt", needles=("no-such-net.prototxt",))
    assert json.loads(error_file.read_text())["message"] == line.removeprefix("error: ")
    monkeypatch.setenv(LAUNCHED, "1")  # automtl's launcher prints it instead
    code, _, err = cli("inspect", "no-such-net.prototxt")
    assert code == 2 and err == ""


# ---------------------------------------------------------------------------------------------------- launch

def test_launch_gives_every_rank_torchruns_environment(probe):
    launch(2, [str(probe), "gloo"], module="launch_probe")
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, got in enumerate(ranks):
        env = got["env"]
        assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == (str(r), str(r), "2", "2")
        assert env[LAUNCHED] == "1" and got["sum"] == 3.0  # a gloo all-reduce over the rendezvous' port
    assert ranks[0]["env"]["MASTER_PORT"] == ranks[1]["env"]["MASTER_PORT"] and int(ranks[0]["env"]["MASTER_PORT"]) > 0
    assert LAUNCHED not in os.environ


@pytest.mark.parametrize("how, message", [("cli-error", "no-such-net.prototxt: prototxt file not found"),
                                          ("raise", "exit status 1")])
def test_a_failing_rank_stops_the_run_with_one_line(probe, capfd, how, message):
    start = time.monotonic()
    with pytest.raises(AutomtlError) as failed:
        launch(2, [str(probe), how], module="launch_probe")
    assert time.monotonic() - start < launch_module.SHUTDOWN_SECONDS
    text = str(failed.value)
    assert "\n" not in text and text.startswith("rank 1 of 2 failed: ") and message in text, text
    pid = int((probe / "rank0.pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # rank 0, asleep in the probe, was stopped and reaped
    err = capfd.readouterr().err
    assert "elastic" not in err, err  # torch's log lines repeat the error: not shown
    if how == "cli-error":
        assert "error:" not in err, err  # the worker left its line to the launcher


def test_two_nodes_meet_at_the_rendezvous_endpoint(probe):
    """Node 1 in a new process, node 0 (which listens at the endpoint) in this one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"127.0.0.1:{port}"
    code = ("import sys; from automtl_compiler.train.launch import launch; "
            "launch(1, [sys.argv[1], 'env'], module='launch_probe', nnodes=2, node_rank=1, rdzv_endpoint=sys.argv[2])")
    node1 = subprocess.Popen([sys.executable, "-c", code, str(probe), endpoint], stderr=subprocess.PIPE, text=True)
    try:
        launch(1, [str(probe), "env"], module="launch_probe", nnodes=2, node_rank=0, rdzv_endpoint=endpoint)
        _, err = node1.communicate(timeout=120)
    finally:
        node1.kill()
    assert node1.returncode == 0, err
    ranks = [json.loads((probe / f"rank{r}.json").read_text())["env"] for r in (0, 1)]
    assert [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"]) for e in ranks] == [("0", "0", "2"), ("1", "0", "2")]
    assert {e["MASTER_PORT"] for e in ranks} == {str(port)}


def test_an_endpoint_in_use_is_one_line(probe):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        endpoint = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(AutomtlError, match=f"could not meet at {endpoint}: .*address already in use"):
            launch(2, [str(probe), "env"], module="launch_probe", rdzv_endpoint=endpoint)
    assert not list(probe.iterdir())  # no worker ran


# ------------------------------------------------------------------------------------------------------- CLI

@pytest.mark.parametrize("args, needle", [
    (["--nproc-per-node", "0"], "'--nproc-per-node': 0 is not in the range x>=1"),
    (["--nnodes", "0"], "'--nnodes': 0 is not in the range x>=1"),
    (["--nnodes", "2"], "--nnodes 2 needs --node-rank"),
    (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "node0:29500"], "--node-rank 2: give 0 to 1"),
    (["--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "node0"], "--rdzv-endpoint 'node0': write HOST:PORT"),
    (["--rdzv-endpoint", "node0:29500"], "apply when workers are started"),
    (["--nproc-per-node", "2", "--set", "nope=1"], "unknown key 'nope'"),
])
@pytest.mark.parametrize("command", ["train", "run"])
def test_launcher_options_are_checked_before_any_worker_starts(tmp_path, monkeypatch, command, args, needle):
    monkeypatch.setattr("automtl_compiler.cli.main.launch", lambda *a, **k: pytest.fail("launched"))
    cli_error(command, "--out", str(tmp_path / "run"), *args, needles=(needle,))
    assert not (tmp_path / "run").exists()


def test_a_worker_does_not_launch_workers(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    cli_error("train", "--out", str(tmp_path / "run"), "--nproc-per-node", "2",
              needles=("already rank 1 of a distributed run",))


def test_cli_starts_workers_with_its_own_options(tmp_path, monkeypatch):
    """What ``automtl train/run --nproc-per-node 2`` hands the launcher parses, in the worker, to the same values."""
    from automtl_compiler.cli.main import main

    from automtl_compiler.train.__main__ import main as worker

    calls = []
    monkeypatch.setattr("automtl_compiler.cli.main.launch", lambda nproc, args, **k: calls.append((nproc, args, k)))
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    out = str(tmp_path / "run")
    code, _, err = cli("--debug", "train", "--out", out, "--nproc-per-node", "2", "--set", "seed=3", "--resume",
                       "--quiet", "--weights", str(weights), "--nnodes", "2", "--node-rank", "1",
                       "--rdzv-endpoint", "node0:29500")
    assert code == 0, err
    nproc, args, options = calls.pop()
    assert nproc == 2 and options == {"nnodes": 2, "node_rank": 1, "rdzv_endpoint": "node0:29500"}
    assert args[-1] == "--debug"
    parsed = worker.make_context("worker", args[:-1]).params
    assert parsed == {"config": None, "out": out, "overrides": (f'backbone_weights="{weights}"',
                      "backbone_weights_strict=true", "seed=3"), "baseline": None, "resume": True,
                      "overwrite": False, "quiet": True, "weights": None, "weights_non_strict": False}

    code, _, err = cli("run", "--nproc-per-node", "2", "--quick", "--no-references", "--out", out)
    assert code == 0, err
    nproc, args, options = calls.pop()
    assert options["module"] == "automtl_compiler.cli.main" and args[0] == "run"
    parsed = main.commands["run"].make_context("run", args[1:]).params
    assert parsed["out"] == out and parsed["quick"] and parsed["no_references"] and parsed["nproc"] == 1
