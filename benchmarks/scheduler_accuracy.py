"""Accuracy of the gradient schedulers on the synthetic scenes: Δm against single-task references.

Run: ``python -m benchmarks.scheduler_accuracy`` (defaults: the built-in config's model - ResNet-18 at
output stride 16, three dense tasks at 64x64 - trained for 200 steps per run, seeds 0, 1, 2).

For each seed, the single-task references (one backbone + head per task, weighted sum) are trained once;
then the all-share multi-task model (one trunk, three heads - the model in which every scheduler has its
inputs, TMT's common trunk included) is trained with each scheduler for the same number of steps on the
same batches, and Δm (percent, higher is better) is computed against that seed's references. A Meta-GF
span of K steps runs T task phases of K steps each, so it does T times the work of the others per step;
the table says how long each run took. Meta-GF and TMT run the authors' loops (their defaults); the
torchjd rows need the optional extra (``pip install 'automtl-compiler[torchjd]'``). ``--only NAME ...``
runs a subset of the rows.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from automtl_compiler.train.config import load_config
from automtl_compiler.train.run import (
    make_datasets,
    make_task_types,
    resolve_input_size,
    train_single_task_references,
)
from automtl_compiler.train.trainer import Trainer

from .common import print_table

SCHEDULERS: dict[str, dict[str, Any]] = {
    "sum": {"name": "sum"},
    "imtl (hybrid, features)": {"name": "imtl"},
    "imtl (gradient, params)": {"name": "imtl", "method": "gradient", "level": "params"},
    # the authors' loop, its meta phase one pass over the span's 20 batches (a pass over all 4096 training
    # samples, 512 batches, per 20-step span would be 25 times the phases' work)
    "metagf (span 20, meta 20)": {"name": "metagf", "span": 20, "meta_batches": 20},
    "tmt (target segment_semantic)": {"name": "tmt", "target": "segment_semantic", "span": 20},
    "torchjd UPGrad (features)": {"name": "torchjd", "aggregator": "UPGrad"},
    "torchjd PCGrad (features)": {"name": "torchjd", "aggregator": "PCGrad"},
}


def run(args: argparse.Namespace) -> str:
    torch.set_num_threads(args.threads)
    out = Path(args.out or tempfile.mkdtemp(prefix="automtl-sched-acc-"))
    chosen = {name: SCHEDULERS[name] for name in (args.only or SCHEDULERS)}
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in chosen}
    for seed in args.seeds:
        sets = [f"seed={seed}", "stages.pretrain.iters=0", "stages.policy.iters=0",
                f"stages.posttrain.iters={args.steps}", "eval_every=0", "checkpoint_every=0"]
        cfg = load_config(None, sets)
        datasets = make_datasets(cfg)
        resolve_input_size(cfg, datasets)
        sets.append(f"input_size=[{cfg['input_size'][0]}, {cfg['input_size'][1]}]")
        types = make_task_types(cfg, datasets["train"])
        refs = out / f"seed{seed}" / "references"
        train_single_task_references(cfg, refs, datasets=datasets, task_types=types, progress=False)
        for name, spec in chosen.items():
            one = load_config(None, [*sets, "scheduler=" + str(spec).replace("'", ""),
                                     f"baselines={refs / 'report.json'}"])
            start = time.perf_counter()
            slug = "-".join("".join(c if c.isalnum() else " " for c in name).split())
            report = Trainer(one, out / f"seed{seed}" / slug, datasets=datasets, task_types=types, progress=False,
                             baseline=True).run()
            report["seconds"] = time.perf_counter() - start
            results[name].append(report)
            print(f"seed {seed} {name}: Δm {report['delta_m']['delta_m']:+.2f}% ({report['seconds']:.0f} s)",
                  flush=True)
    tasks = list(cfg["tasks"])
    rows = []
    for name, reports in results.items():
        dms = [r["delta_m"]["delta_m"] for r in reports]
        spread = statistics.stdev(dms) if len(dms) > 1 else 0.0
        per_task = [statistics.mean(r["delta_m"]["per_task"][t] for r in reports) for t in tasks]
        rows.append([name, f"{statistics.mean(dms):+.2f} ± {spread:.2f}", *(f"{v:+.2f}" for v in per_task),
                     f"{statistics.mean(r['seconds'] for r in reports):.0f}"])
    print(f"Scheduler accuracy: all-share ResNet-18 (output stride 16), 3 dense tasks on 64x64 synthetic scenes, "
          f"{args.steps} steps of batch {cfg['batch_size']}, seeds {', '.join(map(str, args.seeds))}; Δm in percent "
          "against single-task references with the same steps (mean ± std over seeds)")
    return print_table(["scheduler", "Δm %", *(f"Δ {t} %" for t in tasks), "s per run"], rows)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scheduler_accuracy", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="Directory for the runs (default: a temporary one).")
    p.add_argument("--only", nargs="+", choices=list(SCHEDULERS), default=None, metavar="NAME",
                   help=f"Rows to run (default: all): {'; '.join(SCHEDULERS)}.")
    return p


def main(argv: list[str] | None = None) -> None:
    run(parser().parse_args(argv))


if __name__ == "__main__":
    main()
