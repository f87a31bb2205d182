"""The soft training step under each arithmetic, memory format and compiler, each in a fresh process.

Run: ``python -m benchmarks.training_options`` (AutoMTL's DeepLab ResNet-34 from
``models/deeplab_resnet34.prototxt``, 2 tasks, ASPP heads with hidden 1024, input 2x3x224x224, 2 threads).

Per setting, one fresh process builds the SuperModel, applies the setting as the trainer does (autocast
dtype, ``channels_last``, ``use_compiler``, ``use_checkpointing``), runs the first step (for a compiler: the compile), then times
``--repeat`` more steps; the settings take turns over ``--rounds`` rounds so that a slow moment of the
machine hits all of them. A step is what ``benchmarks.supermodel``'s (a) measures: ``forward_all`` in soft
mode, the sum of the outputs' means and the policy regularisers, backward. Peak RSS is VmHWM of that
process. The FLOP floor is the step's FLOPs (``torch.utils.flop_counter``) over the rate this machine
reaches on one large convolution in the same arithmetic.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from .common import (
    in_fresh_process,
    median_seconds,
    peak_rss_mb,
    print_table,
    wall_times,
)
from .supermodel import make

#: name -> (autocast dtype or None, channels_last, torch.compile backend or None, activation checkpointing)
SETTINGS: dict[str, tuple[torch.dtype | None, bool, str | None, bool]] = {
    "fp32": (None, False, None, False),
    "bf16": (torch.bfloat16, False, None, False),
    "bf16 + channels_last": (torch.bfloat16, True, None, False),
    "fp32 + channels_last": (None, True, None, False),
    "bf16 + inductor": (torch.bfloat16, False, "inductor", False),
    "bf16 + checkpointing": (torch.bfloat16, False, None, True),
}


def step(model, x: torch.Tensor, dtype: torch.dtype | None) -> None:  # type: ignore[no-untyped-def]
    """One soft step (forward under autocast in ``dtype``, losses in fp32, backward)."""
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        outs = model.forward_all(x, mode="soft")
    loss = sum(outs[t].float().mean() + model.policy_regulariser(t) for t in model.tasks)
    loss.backward()
    model.zero_grad(set_to_none=True)


def _child(args: argparse.Namespace, name: str, queue: Any) -> None:
    torch.set_num_threads(args.threads)
    dtype, channels_last, backend, checkpointing = SETTINGS[name]
    _, _, model = make(args)
    model.train()
    x = torch.randn(args.batch, 3, args.size, args.size)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    model.use_compiler(backend)
    model.use_checkpointing(checkpointing)
    first = wall_times(lambda: step(model, x, dtype), 1)[0]
    times = wall_times(lambda: step(model, x, dtype), args.repeat)
    queue.put((first, statistics.median(times), peak_rss_mb()))


def step_flops(args: argparse.Namespace) -> float:
    """FLOPs of one soft step (forward and backward), counted by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    _, _, model = make(args)
    model.train()
    x = torch.randn(args.batch, 3, args.size, args.size)
    with FlopCounterMode(display=False) as counter:
        step(model, x, None)
    return float(counter.get_total_flops())


def conv_rate(dtype: torch.dtype | None, threads: int) -> float:
    """FLOP/s of a large 3x3 convolution (forward and backward) in ``dtype`` on this machine."""
    torch.set_num_threads(threads)
    conv = torch.nn.Conv2d(256, 256, 3, padding=1)
    x = torch.randn(2, 256, 56, 56, requires_grad=True)
    flops = 3 * 2 * 2 * 256 * 256 * 9 * 56 * 56  # forward, input gradient, weight gradient

    def run() -> None:
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            y = conv(x)
        y.float().sum().backward()

    return flops / median_seconds(run, repeat=5, warmup=1)


def run(args: argparse.Namespace) -> str:
    names = [n for n in SETTINGS if not args.only or n in args.only]
    results: dict[str, list[tuple[float, float, float]]] = {n: [] for n in names}
    for _ in range(args.rounds):
        for name in names:
            results[name].append(in_fresh_process(_child, args, name))
    flops = step_flops(args)
    rates = {None: conv_rate(None, args.threads), torch.bfloat16: conv_rate(torch.bfloat16, args.threads)}
    base = statistics.median(r[1] for r in results[names[0]])
    base_rss = statistics.median(r[2] for r in results[names[0]])
    rows = []
    for name in names:
        first = statistics.median(r[0] for r in results[name])
        t = statistics.median(r[1] for r in results[name])
        rss = statistics.median(r[2] for r in results[name])
        floor = flops / rates[SETTINGS[name][0]]
        rows.append([name, f"{t:.2f}", f"{t / base:.2f}", f"{floor:.2f}", f"{t / floor:.1f}", f"{first:.1f}",
                     f"{rss:.0f}", f"{rss / base_rss:.2f}"])
    print(f"soft step, {args.size}x{args.size}, batch {args.batch}, ASPP hidden {args.hidden}, {args.threads} threads; "
          f"median of {args.repeat} steps per process, {args.rounds} rounds; {flops / 1e9:.0f} GFLOP per step; "
          f"large-conv rate fp32 {rates[None] / 1e9:.0f} GFLOP/s, bf16 {rates[torch.bfloat16] / 1e9:.0f} GFLOP/s")
    return print_table(["setting", "step s", f"ratio to {names[0]}", "FLOP floor s", "x floor", "first step s",
                        "peak RSS MB", "RSS ratio"], rows)


def parser() -> argparse.ArgumentParser:
    from .supermodel import parser as base

    p = base()
    p.description = __doc__.splitlines()[0]
    p.set_defaults(repeat=3)
    p.add_argument("--rounds", type=int, default=2, help="Rounds over the settings (fresh processes each).")
    p.add_argument("--only", nargs="*", choices=list(SETTINGS), help="Measure only these settings.")
    return p


def main(argv: list[str] | None = None) -> None:
    start = time.perf_counter()
    run(parser().parse_args(argv))
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
