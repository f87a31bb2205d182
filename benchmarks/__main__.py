"""``python -m benchmarks``: every benchmark in one run, one table.

Each benchmark prints its own table as it finishes (figures are medians of several runs, ratios against a
reference measured in the same run); the combined table at the end repeats every row under the
benchmark's name. ``--quick`` uses smaller settings (fewer repeats, narrower heads) for a smoke run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time

from . import compile as compile_bench
from . import data_loading, distributed, inference, schedulers, supermodel
from .common import print_table

FULL: dict[str, list[str]] = {"compile": [], "supermodel": [], "inference": [], "schedulers": [], "data_loading": [],
                             "distributed": []}
QUICK: dict[str, list[str]] = {
    "compile": ["--models", "resnet18", "--repeat", "3"],
    "supermodel": ["--hidden", "64", "--size", "128", "--repeat", "2"],
    "inference": ["--hidden", "64", "--size", "128", "--batches", "1", "--repeat", "3", "--no-rss"],
    "schedulers": ["--repeat", "3", "--no-memory"],
    "data_loading": ["--samples", "16", "--epochs", "2"],
    "distributed": ["--size", "32", "--steps", "3", "--warmup", "1"],
}
MODULES = {"compile": compile_bench, "supermodel": supermodel, "inference": inference, "schedulers": schedulers,
           "data_loading": data_loading, "distributed": distributed}


def rows_of(table: str) -> list[list[str]]:
    """The body rows of a markdown table printed by a benchmark."""
    lines = [line for line in table.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="Smaller settings: a smoke run of every benchmark.")
    p.add_argument("--only", nargs="*", choices=list(MODULES), default=list(MODULES), help="Run only these.")
    args = p.parse_args(argv)
    combined = []
    for name in args.only:
        start = time.perf_counter()
        print(f"\n## {name}", flush=True)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            MODULES[name].main((QUICK if args.quick else FULL)[name])
        text = out.getvalue()
        sys.stdout.write(text)
        for row in rows_of(text):
            combined.append([name, row[0], *row[1:3], " ".join(row[3:])] + [""] * max(0, 2 - len(row[1:3])))
        print(f"({name}: {time.perf_counter() - start:.0f} s)", flush=True)
    print("\n## all benchmarks")
    print_table(["benchmark", "measurement", "value", "ratio / value", "more"], [r[:5] for r in combined])


if __name__ == "__main__":
    main()
