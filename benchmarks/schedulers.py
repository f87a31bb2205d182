"""Gradient schedulers side by side: time per training step and peak memory, as ratios to the sum.

Run: ``python -m benchmarks.schedulers`` (defaults: torchvision ResNet-18 at output stride 16, the three
dense synthetic-scene tasks with ASPP heads of hidden width 64, 64x64 inputs, batch 8, 2 threads, the
all-share post-train model so that every scheduler has its inputs; medians of round-robin runs).

Rows:
* ``sum`` - the weighted sum (one backward): the reference of every ratio;
* ``per-task backward`` - forward + one backward per task w.r.t. all parameters: the work IMTL at the
  parameter level cannot avoid (its target is <= 1.15x of this);
* ``imtl-{gradient,loss,hybrid}/{features,params}`` - IMTL's three methods at both levels (features
  target <= 1.2x sum);
* ``torchjd-{UPGrad,PCGrad}/{features,params}`` - two torchjd aggregators through the ``torchjd``
  scheduler at both levels (skipped when torchjd is not installed);
* ``metagf`` - a span of K steps (T task phases of K steps + the meta phase), per step; ``metagf meta
  batch`` - one meta-phase batch (the span with M meta batches minus the span with none, over M), target
  <= 1.5x a sum step; its peak memory with 2 and 8 meta batches shows whether memory grows;
* ``tmt`` - a step with the look-ahead meta update (the authors' loop: the step, then the labelled
  batch's forward, the look-ahead and the second update; target <= 4x a sum step).
Peak memory is the resident high-water mark of a fresh process that builds the model and runs a few
steps of that scheduler (so it includes the model, the optimiser and torch itself).
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from automtl_compiler.train.config import load_config
from automtl_compiler.train.run import make_datasets, make_task_types
from automtl_compiler.train.schedulers.base import MetaScheduler
from automtl_compiler.train.trainer import Batches, Trainer

from .common import in_fresh_process, peak_rss_mb, print_table

COMBINERS: dict[str, dict[str, Any]] = {
    "sum": {"name": "sum"},
    **{f"imtl-{m}/{lv}": {"name": "imtl", "method": m, "level": lv}
       for lv in ("features", "params") for m in ("gradient", "loss", "hybrid")},
    **{f"torchjd-{a}/{lv}": {"name": "torchjd", "aggregator": a, "level": lv}
       for lv in ("features", "params") for a in ("UPGrad", "PCGrad")},
}


def make_trainer(args: argparse.Namespace, scheduler: dict[str, Any], out: str) -> Trainer:
    """An all-share post-train Trainer (the reference model of ``automtl train --baseline all-share``)."""
    sets = [f"backbone={args.backbone}", f"input_size=[{args.size}, {args.size}]", f"output_stride={args.output_stride}",
            "dataset.options.length=256", f"batch_size={args.batch}", "eval_every=0", "checkpoint_every=0",
            "scheduler=" + str(scheduler).replace("'", "")]
    sets += [f"tasks.{t}.hidden={args.hidden}" for t in ("segment_semantic", "depth_zbuffer", "normal")]
    cfg = load_config(None, sets)
    datasets = make_datasets(cfg)
    torch.manual_seed(0)
    trainer = Trainer(cfg, out, datasets=datasets, task_types=make_task_types(cfg, datasets["train"]),
                      progress=False, baseline=True)
    trainer.loop.prepare_scheduler("posttrain")
    return trainer


def step_fn(trainer: Trainer, name: str, args: argparse.Namespace, **span: int) -> Callable[[int], Any]:
    """A function running one unit of work (a step, or a span) of ``name`` at a given step index."""
    batches = Batches(trainer.datasets["train"], args.batch, 0, "posttrain")
    opt = trainer.opts["posttrain"]
    if name == "per-task backward":
        def per_task(step: int) -> None:
            x, targets = batches.batch(step)
            losses = trainer.losses(trainer.model.forward_all(x, mode="fixed"), targets)
            params = [p for p in trainer.model.network_parameters() if p.requires_grad]
            opt.zero_grad(set_to_none=True)
            for loss in losses.values():
                for p, g in zip(params, torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)):
                    if g is not None:
                        p.grad = g if p.grad is None else p.grad + g
            opt.step()
        return per_task
    if isinstance(trainer.scheduler, MetaScheduler):
        return lambda step: trainer.scheduler.run_span(
            trainer.span_context("posttrain", "fixed", batches, span.get("start", step), span["steps"]))
    return lambda step: trainer.loop.train_step(batches, step, opt, "fixed", "posttrain")


def round_robin(calls: dict[str, Callable[[int], Any]], repeat: int) -> dict[str, float]:
    """Median seconds of each call, the calls interleaved so that they see the same machine load."""
    for fn in calls.values():
        fn(0)
    times: dict[str, list[float]] = {k: [] for k in calls}
    for i in range(repeat):
        for key, fn in calls.items():
            start = time.perf_counter()
            fn(i + 1)
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def _peak_child(args: argparse.Namespace, scheduler: dict[str, Any], steps: int, queue: mp.Queue) -> None:
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(args, scheduler, tmp)
        fn = step_fn(trainer, "x", args, steps=2)
        for i in range(steps):
            fn(i)
    queue.put(peak_rss_mb())


def peak_mb(args: argparse.Namespace, scheduler: dict[str, Any], steps: int = 3) -> float:
    """Peak resident memory (MB) of a fresh process running ``steps`` steps (or spans) of ``scheduler``."""
    return in_fresh_process(_peak_child, args, scheduler, steps)


def run(args: argparse.Namespace) -> str:
    torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="automtl-bench-")
    k, m = args.span, args.meta_batches
    metagf = {"name": "metagf", "span": k, "meta_batches": m}
    metagf0 = {"name": "metagf", "span": k, "meta_batches": 0}
    tmt = {"name": "tmt", "target": "segment_semantic", "span": 1}
    combiners = {k: v for k, v in COMBINERS.items() if v["name"] != "torchjd" or importlib.util.find_spec("torchjd")}
    trainers = {name: make_trainer(args, spec, f"{tmp}/{i}") for i, (name, spec) in enumerate(combiners.items())}
    calls = {name: step_fn(t, name, args) for name, t in trainers.items()}
    calls["per-task backward"] = step_fn(trainers["sum"], "per-task backward", args)
    meta = {"metagf span": make_trainer(args, metagf, f"{tmp}/mg"), "metagf span, no meta": make_trainer(args, metagf0, f"{tmp}/mg0"),
            "tmt": make_trainer(args, tmt, f"{tmp}/tmt")}
    calls["metagf span"] = step_fn(meta["metagf span"], "metagf", args, steps=k)
    calls["metagf span, no meta"] = step_fn(meta["metagf span, no meta"], "metagf", args, steps=k)
    calls["tmt, meta step"] = step_fn(meta["tmt"], "tmt", args, steps=1)   # update_freq 1: every step is a meta step
    med = round_robin(calls, args.repeat)
    base = med["sum"]
    rows = [["sum", f"{base * 1e3:.0f}", "1.00", ""],
            ["per-task backward", f"{med['per-task backward'] * 1e3:.0f}", f"{med['per-task backward'] / base:.2f}", ""]]
    for name in combiners:
        if name == "sum":
            continue
        ref = "sum" if name.endswith("features") else "per-task backward"
        target = "<= 1.2x sum" if ref == "sum" else "<= 1.15x per-task backward"
        rows.append([name, f"{med[name] * 1e3:.0f}", f"{med[name] / base:.2f}",
                     f"{med[name] / med[ref]:.2f}x {ref} (target {target})"])
    meta_batch = (med["metagf span"] - med["metagf span, no meta"]) / max(m, 1)
    rows.append([f"metagf per step (span {k}, {m} meta batches)", f"{med['metagf span'] / k * 1e3:.0f}",
                 f"{med['metagf span'] / k / base:.2f}", f"{len(trainers['sum'].tasks)} task phases per step"])
    rows.append(["metagf meta batch", f"{meta_batch * 1e3:.0f}", f"{meta_batch / base:.2f}", "target <= 1.5x sum"])
    rows.append(["tmt step with look-ahead", f"{med['tmt, meta step'] * 1e3:.0f}", f"{med['tmt, meta step'] / base:.2f}",
                 "target <= 4x sum"])
    if not args.no_memory:
        sum_mb = peak_mb(args, COMBINERS["sum"])
        rows.append(["peak RSS MB: sum", f"{sum_mb:.0f}", "1.00", ""])
        for label, spec in [("imtl-hybrid/features", COMBINERS["imtl-hybrid/features"]),
                            ("imtl-hybrid/params", COMBINERS["imtl-hybrid/params"]),
                            ("metagf, 2 meta batches", {**metagf, "meta_batches": 2}),
                            ("metagf, 8 meta batches", {**metagf, "meta_batches": 8}), ("tmt", tmt)]:
            mb = peak_mb(args, spec)
            rows.append([f"peak RSS MB: {label}", f"{mb:.0f}", f"{mb / sum_mb:.2f}", ""])
    print(f"Scheduler benchmark: {args.backbone} (output stride {args.output_stride}), 3 dense tasks, ASPP hidden "
          f"{args.hidden}, input {args.size}x{args.size}, batch {args.batch}, {args.threads} threads, median of "
          f"{args.repeat} round-robin runs")
    return print_table(["scheduler", "ms per step (or MB)", "ratio to sum", "note"], rows)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.schedulers", description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="torchvision:resnet18")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--output-stride", type=int, default=16)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--span", type=int, default=2, help="Meta-GF span (steps) in the timing.")
    p.add_argument("--meta-batches", type=int, default=4, help="Meta-GF meta batches in the timing.")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-memory", action="store_true", help="Skip the peak-memory subprocesses.")
    return p


def main(argv: list[str] | None = None) -> None:
    run(parser().parse_args(argv))


if __name__ == "__main__":
    main()
