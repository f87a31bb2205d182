"""SuperModel speed and memory: soft training step, hard inference, against their references in one run.

Run: ``python -m benchmarks.supermodel`` (defaults: AutoMTL's DeepLab ResNet-34 from
``models/deeplab_resnet34.prototxt``, 2 tasks, ASPP heads with hidden 1024, input 2x3x224x224, 2 threads).

Rows, each a median of ``--repeat`` runs after a warm-up:
  build               build_supermodel(backbone, heads) with the heads already made
  (a) soft step       forward_all(mode="soft") for all tasks, sum of losses and regularisers, backward
  (a') per task       the same work with one call per task (as AutoMTL runs it)
  (b) hard, all-share forward_all in hard mode, every unit shared (initial logits)
  (b) hard, sampled   forward_all in fixed mode with a policy sampled from random logits
  (b') per task       hard mode, one call per task (AutoMTL's inference)
  (c) backbone+heads  the compiled backbone once and the T heads on its one feature map (the floor)
Peak RSS of the soft step is measured in a fresh process per variant.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from pathlib import Path

import torch

from automtl_compiler import build_supermodel, load_backbone, to_torch
from automtl_compiler.nn.heads import ASPPHead

from .common import in_fresh_process, median_seconds, peak_rss_mb, print_table

ROOT = Path(__file__).resolve().parent.parent
BACKBONE = ROOT / "models" / "deeplab_resnet34.prototxt"


def make(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The backbone graph, the heads and the SuperModel for these options."""
    torch.manual_seed(0)
    graph = load_backbone(args.backbone, input_shape=(1, 3, args.size, args.size))
    channels = graph.node(graph.outputs[0]).shape[1]
    heads = {f"task{i}": ASPPHead(channels, 13 if i == 0 else 1, hidden=args.hidden) for i in range(args.tasks)}
    return graph, heads, build_supermodel(graph, heads)


def soft_step(model, x: torch.Tensor, per_task: bool) -> None:  # type: ignore[no-untyped-def]
    """One soft-mode training step's forward and backward (losses: means of the outputs)."""
    if per_task:
        outs = {t: model(x, task=t, mode="soft") for t in model.tasks}
    else:
        outs = model.forward_all(x, mode="soft")
    loss = sum(outs[t].mean() + model.policy_regulariser(t) for t in model.tasks)
    loss.backward()
    model.zero_grad(set_to_none=True)


def _rss_child(args: argparse.Namespace, per_task: bool, queue: mp.Queue) -> None:
    torch.set_num_threads(args.threads)
    _, _, model = make(args)
    model.train()
    x = torch.randn(args.batch, 3, args.size, args.size)
    soft_step(model, x, per_task)
    queue.put(peak_rss_mb())


def soft_step_peak_mb(args: argparse.Namespace, per_task: bool) -> float:
    """Peak resident memory (MB) of a fresh process that builds the model and runs one soft step."""
    return in_fresh_process(_rss_child, args, per_task)


def run(args: argparse.Namespace) -> str:
    torch.set_num_threads(args.threads)
    graph, heads, model = make(args)
    build = median_seconds(lambda: build_supermodel(graph, heads), repeat=args.repeat)
    x = torch.randn(args.batch, 3, args.size, args.size)
    x1 = torch.randn(1, 3, args.size, args.size)
    model.train()
    soft = median_seconds(lambda: soft_step(model, x, False), repeat=args.repeat)
    soft_each = median_seconds(lambda: soft_step(model, x, True), repeat=args.repeat)
    model.eval()
    backbone = to_torch(graph.copy()).eval()
    gen = torch.Generator().manual_seed(1)
    sampled = build_supermodel(graph, heads).eval()
    with torch.no_grad():
        for p in sampled.policy_parameters():
            p.copy_(torch.randn(3, generator=gen))
    policy = sampled.sample_policy("sample", seed=0)
    rows = []
    with torch.no_grad():
        for batch, inp in ((1, x1), (args.batch, x)):
            floor = median_seconds(lambda: _floor(backbone, heads, inp), repeat=args.repeat)
            share = median_seconds(lambda: model.forward_all(inp), repeat=args.repeat)
            mixed = median_seconds(lambda: sampled.forward_all(inp, mode="fixed", policy=policy), repeat=args.repeat)
            each = median_seconds(lambda: [model(inp, task=t) for t in model.tasks], repeat=args.repeat)
            rows += [[f"(c) backbone once + {args.tasks} heads, B={batch}", f"{floor * 1e3:.0f}", "1.00"],
                     [f"(b) hard all tasks, all-share, B={batch}", f"{share * 1e3:.0f}", f"{share / floor:.2f}"],
                     [f"(b) fixed all tasks, sampled policy, B={batch}", f"{mixed * 1e3:.0f}", f"{mixed / floor:.2f}"],
                     [f"(b') hard one call per task, all-share, B={batch}", f"{each * 1e3:.0f}", f"{each / floor:.2f}"]]
    rss = soft_step_peak_mb(args, False)
    rss_each = soft_step_peak_mb(args, True)
    rows = [["build SuperModel (heads given)", f"{build * 1e3:.0f}", ""],
            [f"(a) soft step, forward_all, B={args.batch}", f"{soft * 1e3:.0f}", f"{soft / soft_each:.2f} of (a')"],
            [f"(a') soft step, one call per task, B={args.batch}", f"{soft_each * 1e3:.0f}", "1.00"],
            ["(a) peak RSS MB", f"{rss:.0f}", f"{rss / rss_each:.2f} of (a')"],
            ["(a') peak RSS MB", f"{rss_each:.0f}", "1.00"]] + rows
    counts = sum(policy.counts()[t]["share"] for t in policy.tasks)
    print(f"SuperModel benchmark: {Path(args.backbone).name}, {args.tasks} tasks, ASPP hidden {args.hidden}, "
          f"input {args.size}x{args.size}, {args.threads} threads, median of {args.repeat}; sampled policy shares "
          f"{counts} of {len(policy.tasks) * len(model.units)} unit choices")
    return print_table(["measurement", "ms (or MB)", "ratio"], rows)


def _floor(backbone, heads, inp):  # type: ignore[no-untyped-def]
    feature = backbone(inp)
    return [head(feature) for head in heads.values()]


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default=str(BACKBONE))
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    return parser


def main(argv: list[str] | None = None) -> None:
    start = time.perf_counter()
    run(parser().parse_args(argv))
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
