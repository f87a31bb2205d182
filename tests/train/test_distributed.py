"""Training across processes (gloo on localhost): two ranks of batch B end with the weights of one process of
batch 2B, every stage included; only rank 0 writes; schedulers that cannot be split are refused at start."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from automtl_compiler.errors import AutomtlError
from automtl_compiler.train.batches import StepSampler
from automtl_compiler.train.run import train
from tests.train.test_run_safety import TINY


class BiasFreeBackbone(torch.nn.Module):
    """Two conv units, each conv without a bias before its batch norm (as in ResNets): a bias there has a
    gradient of exactly zero in exact arithmetic, so Adam turns its rounding noise into full steps that no
    two summation orders share."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(4)
        self.conv2 = torch.nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


#: every stage, a few steps each; batch norms synchronised and no dropout in the heads, so that two half-batches
#: are one batch (a rank draws dropout masks for its own samples: no split of a batch can repeat one process's)
BASE = [t for t in TINY if not t.startswith(("backbone", "batch_size", "checkpoint_every", "eval_every"))] + [
    "backbone=tests.train.test_distributed:BiasFreeBackbone",
    "checkpoint_every=0", "eval_every=0", "sync_batchnorm=true", "precision=fp32", "stages.sample.candidates=2",
    "stages.sample.calibration_batches=0"] + [
    f"tasks.{t}.head_options.dropout=0" for t in ("segment_semantic", "depth_zbuffer", "normal")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, overrides: list[str], out: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    try:
        train(None, overrides, out, progress=False)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_ranks(world: int, overrides: list[str], out: Path) -> None:
    mp.start_processes(_rank, args=(world, free_port(), overrides, str(out)), nprocs=world, join=True,
                       start_method="spawn")


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    index = json.loads((out / "checkpoints" / "last.json").read_text())
    return load_file(str(out / "checkpoints" / index["weights"]))


def test_sampler_shards_the_global_batch_in_rank_order():
    one = StepSampler(40, 8, 3, "pretrain")
    parts = [StepSampler(40, 4, 3, "pretrain", rank=r, world=2) for r in range(2)]
    for step in range(12):
        assert one.keys(step) == parts[0].keys(step) + parts[1].keys(step)


def test_two_processes_equal_one_process_with_their_batches_together(tmp_path):
    run_ranks(2, BASE + ["batch_size=2"], tmp_path / "two")
    torch.set_num_threads(1)
    train(None, BASE + ["batch_size=4"], tmp_path / "one", progress=False)
    two, one = final_weights(tmp_path / "two"), final_weights(tmp_path / "one")
    assert sorted(two) == sorted(one)
    worst = max(float((two[k].double() - one[k].double()).abs().max()) for k in one if one[k].is_floating_point())
    assert worst < 1e-5, worst
    report_two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report_two["batch"] == {"per_process": 2, "processes": 2, "effective": 4}
    assert json.loads((tmp_path / "two" / "policy.json").read_text()) == \
        json.loads((tmp_path / "one" / "policy.json").read_text())


def assert_same_run(two: Path, one: Path) -> None:
    """The two runs' last checkpoints (weights, optimiser moments, scheduler state) agree to 1e-5."""
    a, b = final_weights(two), final_weights(one)
    assert sorted(a) == sorted(b)
    worst = {k: float((a[k].double() - b[k].double()).abs().max()) for k in b if b[k].is_floating_point()}
    assert max(worst.values()) < 1e-5, sorted(worst.items(), key=lambda kv: -kv[1])[:5]


#: IMTL at each level: the feature level needs the trunk all tasks share, which only post-train has
IMTL = {
    "features": ["scheduler={name: imtl, method: hybrid, level: features, loss_lr: 0.05}",
                 "scheduler.stages=[posttrain]", "stages.sample.share_first=2"],
    "params": ["scheduler={name: imtl, method: hybrid, level: params, loss_lr: 0.05}"],
}


@pytest.mark.parametrize("level", list(IMTL))
def test_imtl_on_two_processes_equals_one_process_with_their_batches_together(tmp_path, level: str):
    sets = BASE + IMTL[level]
    run_ranks(2, sets + ["batch_size=2"], tmp_path / "two")
    torch.set_num_threads(1)
    train(None, sets + ["batch_size=4"], tmp_path / "one", progress=False)
    assert_same_run(tmp_path / "two", tmp_path / "one")
    scales = final_weights(tmp_path / "one")["module/scheduler/log_scale"]
    assert float(scales.abs().max()) > 1e-3  # the loss scales were trained, so their agreement means something


def test_a_scheduler_that_cannot_be_split_is_refused_at_start(tmp_path, monkeypatch):
    from automtl_compiler.train import trainer as trainer_module
    from automtl_compiler.train.distributed import DistContext

    monkeypatch.setattr(trainer_module, "context_from_env",
                        lambda device: (DistContext(0, 2, 0, "gloo"), torch.device("cpu")))
    with pytest.raises(AutomtlError, match="cannot run across 2 processes"):
        trainer_module.check_distributable(
            trainer_module.TrainConfig.from_dict(__import__("automtl_compiler.train.config", fromlist=["x"])
                                                 .load_config(None, BASE + ["scheduler.name=metagf"])),
            *trainer_module.make_scheduler(trainer_module.TrainConfig.from_dict(
                __import__("automtl_compiler.train.config", fromlist=["x"]).load_config(None, BASE + ["scheduler.name=metagf"]))),
            DistContext(0, 2, 0, "gloo"))


def _cli(out: Path, extra: list[str]) -> list[str]:
    sets = [s for s in BASE if not s.startswith("checkpoint_every")] + ["batch_size=2", "checkpoint_every=1", *extra]
    return [sys.executable, "-m", "automtl_compiler.cli.main", "train", "--out", str(out), "--nproc-per-node", "2",
            *[a for s in sets for a in ("--set", s)]]


def _worker_of_rank(launcher: int, rank: int) -> int | None:
    """The pid of the worker process of ``rank`` started by ``launcher`` (from /proc)."""
    children = subprocess.run(["pgrep", "-P", str(launcher)], capture_output=True, text=True, check=False)
    for pid in map(int, children.stdout.split()):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    return None


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker processes through /proc")
def test_killing_one_rank_stops_the_run_and_the_same_command_resumes_to_the_same_weights(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(_cli(tmp_path / "whole", []), env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    launcher = subprocess.Popen(_cli(tmp_path / "killed", []), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    index = tmp_path / "killed" / "checkpoints" / "last.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if index.exists() and json.loads(index.read_text() or "{}").get("state", {}).get("stage") == "policy":
            break
        time.sleep(0.05)
    worker = _worker_of_rank(launcher.pid, 1)
    assert worker is not None, "rank 1's worker was not found"
    os.kill(worker, signal.SIGKILL)
    _, err = launcher.communicate(timeout=120)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert launcher.returncode == 2 and len(errors) == 1 and "rank 1 of 2 failed: killed by SIGKILL" in errors[0], err
    assert not (tmp_path / "killed" / "report.json").exists()
    again = subprocess.run(_cli(tmp_path / "killed", []), env=env, capture_output=True, text=True, timeout=600,
                           check=False)
    assert again.returncode == 0, again.stderr[-2000:]
    whole, killed = final_weights(tmp_path / "whole"), final_weights(tmp_path / "killed")
    assert sorted(whole) == sorted(killed)
    for k in whole:
        assert torch.equal(whole[k], killed[k]), k


def _buffers_rank(rank: int, world: int, port: int, out: str) -> None:
    from automtl_compiler.train.distributed import DistContext, broadcast_buffers

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.Conv2d(3, 2, 1), torch.nn.BatchNorm2d(2))
        with torch.no_grad():
            for i, b in enumerate(model.buffers()):
                b.fill_(10 * rank + i)
        broadcast_buffers(model, DistContext(rank, world, rank, "gloo"))
        torch.save([b.clone() for b in model.buffers()], f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_without_sync_batchnorm_every_rank_gets_rank_0s_running_statistics(tmp_path):
    mp.start_processes(_buffers_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    zero, one = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert [b.dtype for b in zero] == [torch.float32, torch.float32, torch.int64] * 2
    for i, (a, b) in enumerate(zip(zero, one)):
        assert torch.equal(a, b) and torch.all(a == i), i


def _weights_rank(rank: int, world: int, port: int, out: str) -> None:
    from automtl_compiler.train.distributed import DistContext, check_same_weights

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = torch.nn.Conv2d(3, 2, 1)
        ctx = DistContext(rank, world, rank, "gloo")
        check_same_weights(model, ctx)  # the same seed: equal
        with torch.no_grad():
            model.bias[0] += rank * 1e-3
        try:
            check_same_weights(model, ctx)
            outcome = "passed"
        except AutomtlError as e:
            outcome = str(e)
        Path(f"{out}/rank{rank}.txt").write_text(outcome)
    finally:
        torch.distributed.destroy_process_group()


def test_ranks_that_built_other_initial_weights_are_an_error(tmp_path):
    mp.start_processes(_weights_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    assert (tmp_path / "rank0.txt").read_text() == "passed"
    assert "rank 1 built other initial weights than rank 0" in (tmp_path / "rank1.txt").read_text()
