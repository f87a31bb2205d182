"""Training across processes on this machine: steps/s of 1 vs 2 processes, the share of the step spent
communicating, and the bytes all-reduced per step.

Run: ``python -m benchmarks.distributed`` (defaults: torchvision ResNet-18 at output stride 16, the three
dense synthetic-scene tasks with ASPP heads of hidden width 64, 64x64 inputs, the all-share post-train
step with ``scheduler: sum``, batch 8 per process, one thread per process, gloo, ``sync_batchnorm`` off;
medians over ``--steps`` timed steps after ``--warmup`` untimed ones).

Every configuration runs in fresh processes started with ``torch.multiprocessing.spawn``; a 2-process run
gets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` (a free port of localhost), and
its Trainer joins the process group itself, as under torchrun. Each process times
``trainer.loop.train_step`` - the step a run takes, with the flat gradient all-reduce and the batch-norm
buffer broadcasts inside it.

Rows:
* ``1 process x B``, ``1 process x 2B`` and ``2 processes x B`` (one thread each): ms per step, steps/s and
  samples/s; with ``--two-threads`` also ``1 process x 2B, 2 threads``, which uses the same two cores as the
  two processes (the fair comparison on a machine this small);
* weak scaling (same per-process batch): samples/s of 2 processes x B over 1 process x B (ideal 2.00);
* strong scaling (same global batch 2B): steps/s of 2 processes x B over 1 process x 2B (ideal 2.00);
* communication in the 2-process step, as a share of it: the gradient all-reduce (``average_gradients``,
  timed by wrapping it; a barrier just before it separates the time spent waiting for the slower rank
  from the transfer itself) and the buffer broadcasts (``broadcast_buffers``);
* bytes per step: the all-reduced gradients (4 bytes x every gradient element of the trained
  parameters), the broadcast buffers, and what SyncBatchNorm would add (its statistics are all-reduced in
  its forward and backward; off by default, ``--sync-batchnorm`` turns it on, and its time then counts as
  computation here); training FLOPs per process and step (torch's FLOP counter) per all-reduced byte.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from automtl_compiler.train import loop as loop_module
from automtl_compiler.train.config import load_config
from automtl_compiler.train.run import make_datasets, make_task_types
from automtl_compiler.train.trainer import Trainer

from .common import print_table

_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def make_trainer(args: argparse.Namespace, batch: int, out: str) -> Trainer:
    """An all-share post-train Trainer with ``batch`` samples per process (the model of
    ``automtl train --baseline all-share``); it joins the process group when the environment names one."""
    sets = [f"backbone={args.backbone}", f"input_size=[{args.size}, {args.size}]", f"output_stride={args.output_stride}",
            "dataset.options.length=256", f"batch_size={batch}", "eval_every=0", "checkpoint_every=0",
            "scheduler={name: sum}", f"sync_batchnorm={str(args.sync_batchnorm).lower()}"]
    sets += [f"tasks.{t}.hidden={args.hidden}" for t in ("segment_semantic", "depth_zbuffer", "normal")]
    cfg = load_config(None, sets)
    datasets = make_datasets(cfg)
    trainer = Trainer(cfg, out, datasets=datasets, task_types=make_task_types(cfg, datasets["train"]),
                      progress=False, baseline=True)
    trainer.loop.prepare_scheduler("posttrain")
    return trainer


class CommTimer:
    """Wraps the loop's ``average_gradients`` and ``broadcast_buffers``: the seconds each takes per call (the
    all-reduce after a barrier, whose own time is the wait for the slower rank) and the bytes they move."""

    def __init__(self) -> None:
        self.wait: list[float] = []
        self.reduce: list[float] = []
        self.broadcast: list[float] = []
        self.grad_bytes = self.grad_elements = self.buffer_bytes = self.buffers = 0
        self._average = loop_module.average_gradients
        self._broadcast = loop_module.broadcast_buffers

    def install(self) -> None:
        """Put the timing wrappers where ``Loop.train_step`` looks its collectives up."""
        loop_module.average_gradients = self.average_gradients  # type: ignore[assignment]
        loop_module.broadcast_buffers = self.broadcast_buffers  # type: ignore[assignment]

    def average_gradients(self, params: list[nn.Parameter], ctx: Any) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        self.grad_elements = sum(g.numel() for g in grads)
        self.grad_bytes = sum(g.numel() * g.element_size() for g in grads)
        start = time.perf_counter()
        if ctx.distributed:
            dist.barrier()
        ready = time.perf_counter()
        self._average(params, ctx)
        self.wait.append(ready - start)
        self.reduce.append(time.perf_counter() - ready)

    def broadcast_buffers(self, model: nn.Module, ctx: Any) -> None:
        buffers = list(model.buffers())
        self.buffers, self.buffer_bytes = len(buffers), sum(b.numel() * b.element_size() for b in buffers)
        start = time.perf_counter()
        self._broadcast(model, ctx)
        self.broadcast.append(time.perf_counter() - start)


def accounting_step(trainer: Trainer, batches: Any, step: int) -> tuple[float, int]:
    """Training FLOPs of one step (torch's FLOP counter) and the bytes SyncBatchNorm would all-reduce in it:
    per batch-norm call, each channel's sum and sum of squares and the count in float64, in the forward and
    again in the backward."""
    from torch.utils.flop_counter import FlopCounterMode

    sync_bytes = [0]

    def count(module: nn.Module, inputs: Any, output: Any) -> None:
        if module.training:
            sync_bytes[0] += 2 * (2 * module.num_features + 1) * 8

    hooks = [m.register_forward_hook(count) for m in trainer.model.modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        with FlopCounterMode(display=False) as counter:
            trainer.loop.train_step(batches, step, trainer.opts["posttrain"], "fixed", "posttrain")
    finally:
        for h in hooks:
            h.remove()
    return float(counter.get_total_flops()), sync_bytes[0]


def _worker(rank: int, world: int, port: int, batch: int, threads: int, args: argparse.Namespace, queue: Any) -> None:
    """One process of a configuration: build the Trainer, time ``train_step``, put the figures on ``queue``."""
    torch.set_num_threads(threads)
    for name in _DIST_VARS:
        os.environ.pop(name, None)
    if world > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    timer = CommTimer()
    timer.install()
    with tempfile.TemporaryDirectory(prefix="automtl-distbench-") as out:
        trainer = make_trainer(args, batch, out)
        batches = trainer.loop.batches("train", "posttrain")
        opt = trainer.opts["posttrain"]
        trainer.model.train()
        for step in range(args.warmup):
            trainer.loop.train_step(batches, step, opt, "fixed", "posttrain")
        if world > 1:
            dist.barrier()
        del timer.wait[:], timer.reduce[:], timer.broadcast[:]
        times = []
        for step in range(args.warmup, args.warmup + args.steps):
            start = time.perf_counter()
            trainer.loop.train_step(batches, step, opt, "fixed", "posttrain")
            times.append(time.perf_counter() - start)
        comm = {"wait": list(timer.wait), "reduce": list(timer.reduce), "broadcast": list(timer.broadcast)}
        flops, sync_bytes = accounting_step(trainer, batches, args.warmup + args.steps) if world == 1 else (0.0, 0)
        trained = sum(p.numel() for g in opt.param_groups for p in g["params"] if p.requires_grad)
        if world > 1:
            dist.destroy_process_group()
    queue.put({"rank": rank, "step": times, **comm, "grad_bytes": timer.grad_bytes, "grad_elements": timer.grad_elements,
               "buffer_bytes": timer.buffer_bytes, "buffers": timer.buffers, "flops": flops,
               "sync_bytes": sync_bytes, "trained": trained})


def free_port() -> int:
    """A TCP port of localhost that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(args: argparse.Namespace, world: int, batch: int, threads: int = 1) -> dict[str, Any]:
    """Run one configuration (``world`` processes of ``batch`` samples, ``threads`` threads each) and return
    its medians (over the timed steps; averaged over the ranks) and byte counts."""
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)  # read by the spawned interpreters as they import torch
    try:
        queue = mp.get_context("spawn").SimpleQueue()
        mp.spawn(_worker, args=(world, free_port(), batch, threads, args, queue), nprocs=world, join=True)
    finally:
        if before is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = before
    results = [queue.get() for _ in range(world)]
    for r in results:  # a collective the step skipped (no buffer broadcasts under sync_batchnorm) took no time
        for key in ("wait", "reduce", "broadcast"):
            r[key] = r[key] or [0.0] * len(r["step"])
    med: Callable[[str], float] = lambda key: statistics.fmean(statistics.median(r[key]) for r in results)
    first = min(results, key=lambda r: r["rank"])
    figures = {key: med(key) for key in ("step", "wait", "reduce", "broadcast")}
    figures["share"] = statistics.fmean(
        statistics.median((w + r + b) / s for w, r, b, s in zip(res["wait"], res["reduce"], res["broadcast"], res["step"]))
        for res in results)
    figures.update({k: first[k] for k in ("grad_bytes", "grad_elements", "buffer_bytes", "buffers", "flops",
                                          "sync_bytes", "trained")})
    figures.update(world=world, batch=batch, threads=threads)
    return figures


def _mb(n: float) -> str:
    """Bytes in MB, or in kB below 0.1 MB."""
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def run(args: argparse.Namespace) -> str:
    """Measure every configuration, one after the other, and print (and return) the table."""
    b = args.batch
    single = measure(args, 1, b)
    single2 = measure(args, 1, 2 * b)
    pair = measure(args, 2, b)
    both_cores = measure(args, 1, 2 * b, threads=2) if args.two_threads else None

    def throughput(f: dict[str, Any]) -> str:
        s = f["step"]
        return f"{s * 1e3:.0f} ms ({1 / s:.2f} steps/s, {f['world'] * f['batch'] / s:.1f} samples/s)"

    step = pair["step"]
    weak = (2 * b / step) / (b / single["step"])
    strong = single2["step"] / step
    comm = pair["wait"] + pair["reduce"] + pair["broadcast"]
    rate = pair["grad_bytes"] / pair["reduce"] / 1e9 if pair["reduce"] > 0 else float("nan")
    grads = (f"4 x {pair['grad_elements'] / 1e6:.2f} M gradient elements; the rest of the "
             f"{pair['trained'] / 1e6:.2f} M trained parameters get none under the all-share policy")
    sync = "on: its all-reduces count as computation here" if args.sync_batchnorm else "off (the default)"
    rows = [
        [f"1 process x {b}", throughput(single), "1.00", "one thread; ratio: steps/s against this row"],
        [f"1 process x {2 * b}", throughput(single2), f"{single['step'] / single2['step']:.2f}", "one thread"],
        [f"2 processes x {b}", throughput(pair), f"{single['step'] / step:.2f}",
         f"one thread each, gloo; global batch {2 * b}"],
        [f"weak scaling: samples/s, 2 processes x {b} / 1 process x {b}", f"{2 * b / step:.1f} samples/s",
         f"{weak:.2f}", "ideal 2.00"],
        [f"strong scaling: steps/s, 2 processes x {b} / 1 process x {2 * b}", f"{1 / step:.2f} steps/s",
         f"{strong:.2f}", "ideal 2.00 (same global batch)"],
        ["gradient all-reduce per step", f"{pair['reduce'] * 1e3:.1f} ms", f"{pair['reduce'] / step:.3f}",
         f"share of the 2-process step; one flat all-reduce, {rate:.2f} GB/s of gradients"],
        ["waiting for the slower rank before it", f"{pair['wait'] * 1e3:.1f} ms", f"{pair['wait'] / step:.3f}",
         "share of the step (a barrier before the all-reduce)"],
        ["buffer broadcasts per step", f"{pair['broadcast'] * 1e3:.1f} ms", f"{pair['broadcast'] / step:.3f}",
         f"share of the step; {pair['buffers']} batch-norm buffers, one broadcast per dtype"],
        ["communication per step", f"{comm * 1e3:.1f} ms", f"{pair['share']:.3f}",
         "share of the step (median of per-step shares)"],
        ["bytes all-reduced per step (gradients)", _mb(pair["grad_bytes"]), "",
         grads],
        ["bytes broadcast per step (buffers)", _mb(pair["buffer_bytes"]), "",
         "batch-norm running statistics from rank 0"],
        ["SyncBatchNorm statistics per step", _mb(single["sync_bytes"]), "",
         f"sync_batchnorm {sync}; float64 sums, forward and backward"],
        [f"training FLOPs per step, 1 process x {b}", f"{single['flops'] / 1e9:.1f} GFLOP",
         f"{single['flops'] / max(pair['grad_bytes'], 1):.0f}", "FLOPs per all-reduced gradient byte"],
    ]
    if both_cores is not None:
        rows[3:3] = [[f"1 process x {2 * b}, 2 threads", throughput(both_cores),
                      f"{single['step'] / both_cores['step']:.2f}", "the same two cores in one process"]]
        rows[6:6] = [[f"2 processes x {b} / 1 process x {2 * b} with 2 threads", f"{1 / step:.2f} steps/s",
                      f"{both_cores['step'] / step:.2f}", "same global batch, same cores"]]
    print(f"Distributed benchmark: {args.backbone} (output stride {args.output_stride}), 3 dense tasks, ASPP hidden "
          f"{args.hidden}, input {args.size}x{args.size}, all-share post-train step (scheduler sum), gloo on "
          f"{os.cpu_count()} CPU cores, sync_batchnorm {'on' if args.sync_batchnorm else 'off'}; medians of "
          f"{args.steps} steps after {args.warmup} warm-up steps")
    return print_table(["measurement", "value", "ratio", "note"], rows)


def positive(text: str) -> int:
    """A whole number >= 1 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is less than 1")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="torchvision:resnet18")
    p.add_argument("--size", type=positive, default=64, help="Input height and width.")
    p.add_argument("--output-stride", type=int, default=16)
    p.add_argument("--hidden", type=positive, default=64, help="ASPP hidden width of each head.")
    p.add_argument("--batch", type=positive, default=8, help="Samples per process (B).")
    p.add_argument("--steps", type=positive, default=15, help="Timed steps per configuration.")
    p.add_argument("--warmup", type=positive, default=2, help="Untimed steps first.")
    p.add_argument("--sync-batchnorm", action="store_true", help="Train with sync_batchnorm: true.")
    p.add_argument("--two-threads", action="store_true",
                   help="Also time 1 process x 2B with 2 threads: the same two cores as the 2 processes.")
    return p


def main(argv: list[str] | None = None) -> None:
    run(parser().parse_args(argv))


if __name__ == "__main__":
    main()
