"""Data loading throughput of the trainer's batches with 0 and more DataLoader workers, measured in one run.

Run: ``python -m benchmarks.data_loading``. Writes ``--samples`` training samples in two real layouts to a
temporary directory: NYUv2 in MTAN's archive (288x384 float32 ``.npy``, the reader's scale-crop and flip)
and NYUv2 in AdaShare's layout as AutoMTL's paper reads it (480x640 PNG images and labels, ``.npy`` depth,
rescale / pad / 321x321 crop, Caffe-style input). For each layout and each W in ``--workers`` it reads
consecutive training batches through :class:`automtl_compiler.train.batches.Batches` (the trainer's own
path: per-step deterministic batches, persistent workers, per-epoch augmentation draws). The files are
flushed to disk first, the first epoch is a warm-up (worker start, page cache), and the figure is batches
per second over the following ``--epochs`` epochs; the ratio is against the first W, same layout, same run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from automtl_compiler.data import get_dataset
from automtl_compiler.train.batches import Batches

from .common import print_table

LAYOUTS = {"mtan": "NYUv2, MTAN's archive, 288x384 .npy", "adashare": "NYUv2, AdaShare's layout, 480x640 PNG, crop 321"}


def write(layout: str, root: Path, samples: int) -> None:
    """``samples`` training samples (and 1 validation sample) of ``layout`` under ``root``."""
    if layout == "mtan":
        from tests.realdata import write_nyuv2

        write_nyuv2(root, n_train=samples, n_val=1, hw=(288, 384))
    else:
        from tests.adashare_data import write_adashare_nyuv2

        write_adashare_nyuv2(root, n_train=samples, n_test=1, hw=(480, 640))


def rate(batches: Batches, per_epoch: int, epochs: int) -> float:
    """Batches per second over ``epochs`` epochs of consecutive steps, after one warm-up epoch."""
    for step in range(per_epoch):
        batches.batch(step)
    start = time.perf_counter()
    for step in range(per_epoch, per_epoch * (epochs + 1)):
        batches.batch(step)
    return per_epoch * epochs / (time.perf_counter() - start)


def run(samples: int, batch_size: int, workers: list[int], epochs: int, threads: int, layouts: list[str]) -> str:
    """Write the datasets, time the trainer's batches for every worker count and print the table."""
    torch.set_num_threads(threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layout in layouts:
            root = Path(tmp) / layout
            write(layout, root, samples)
            os.sync()                # flush the fresh files first: write-back would slow the first loader timed
            dataset = get_dataset("nyuv2", root=root, split="train")
            reference = None
            for w in workers:
                batches = Batches(dataset, batch_size, 0, "pretrain", workers=w)
                r = rate(batches, max(1, len(dataset) // batch_size), epochs)
                batches.close()
                reference = r if reference is None else reference
                rows.append([LAYOUTS[layout], f"{w}", f"{r:.1f}", f"{r / reference:.2f}", f"{r * batch_size:.0f}"])
    print(f"trainer batches (Batches), {samples} training samples, batch {batch_size}, training augmentation, "
          f"{epochs} epochs after a warm-up, {threads} torch threads in the main process")
    return print_table(["data", "workers", "batches/s", f"ratio vs {workers[0]} workers", "samples/s"], rows)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=64, help="Training samples written (default 64).")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="num_workers values; the first is "
                   "the reference of the ratio.")
    p.add_argument("--epochs", type=int, default=3, help="Timed epochs per loader, after one warm-up epoch.")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the main process.")
    p.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=["mtan", "adashare"])
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    run(args.samples, args.batch_size, args.workers, args.epochs, args.threads, args.layouts)


if __name__ == "__main__":
    main()
