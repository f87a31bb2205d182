"""Data loading throughput: NYUv2 in MTAN's layout (288x384 ``.npy`` samples) through a DataLoader.

Run: ``python -m benchmarks.data_loading``. Writes ``--samples`` training samples of 288x384 (MTAN's NYUv2
size, float32 ``.npy`` as the archive stores them) to a temporary directory, then iterates
``DataLoader(NYUv2(root, "train"), batch_size=8, collate_fn=collate, num_workers=W,
persistent_workers=W > 0)`` for each W in ``--workers``, with the reader's default training augmentation
(random scale-crop and flip). The files are flushed to disk before timing; the first epoch of each loader is a warm-up (worker start, page cache); the
figure is the median of the following ``--epochs`` epochs' batches per second, and the ratio is against
``W = 0`` (all loading in the main process) measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from torch.utils.data import DataLoader

from automtl_compiler.data import NYUv2, collate

from .common import print_table

HW = (288, 384)


def epoch_rates(loader: DataLoader, epochs: int) -> list[float]:
    """Batches per second of each epoch after one warm-up epoch."""
    rates = []
    for epoch in range(epochs + 1):
        loader.dataset.set_epoch(epoch)
        start = time.perf_counter()
        n = sum(1 for _ in loader)
        if epoch:
            rates.append(n / (time.perf_counter() - start))
    return rates


def run(samples: int, batch_size: int, workers: list[int], epochs: int, threads: int, augment: bool) -> str:
    """Write the dataset, time every loader and print the table."""
    from tests.realdata import write_nyuv2

    torch.set_num_threads(threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_nyuv2(tmp, n_train=samples, n_val=0, hw=HW)
        os.sync()                    # flush the fresh files first: write-back would slow the first loader timed
        reference = None
        for w in workers:
            loader = DataLoader(NYUv2(tmp, "train", augment=augment), batch_size=batch_size, num_workers=w,
                                collate_fn=collate, persistent_workers=w > 0)
            rate = statistics.median(epoch_rates(loader, epochs))
            del loader
            reference = rate if reference is None else reference
            rows.append([f"{w} workers", f"{rate:.1f}", f"{rate / reference:.2f}", f"{rate * batch_size:.0f}"])
    print(f"NYUv2 (MTAN layout) loading, {samples} samples of {HW[0]}x{HW[1]}, batch {batch_size}, "
          f"augment={'on' if augment else 'off'}, median of {epochs} epochs after a warm-up, {threads} threads "
          f"in the main process")
    return print_table(["loader", "batches/s", f"ratio vs {workers[0]} workers", "samples/s"], rows)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=64, help="Training samples written (default 64).")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="num_workers values; the first is "
                   "the reference of the ratio.")
    p.add_argument("--epochs", type=int, default=3, help="Timed epochs per loader, after one warm-up epoch.")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the main process.")
    p.add_argument("--no-augment", action="store_true", help="Read without the training augmentation.")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    run(args.samples, args.batch_size, args.workers, args.epochs, args.threads, not args.no_augment)


if __name__ == "__main__":
    main()
