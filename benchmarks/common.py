"""Timing and table helpers shared by the benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any


def wall_times(fn: Callable[[], Any], repeat: int, warmup: int = 0) -> list[float]:
    """Wall times of ``repeat`` runs of ``fn()`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median_seconds(fn: Callable[[], Any], *, repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeat`` runs after ``warmup`` untimed runs."""
    return statistics.median(wall_times(fn, repeat, warmup))


def print_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Print (and return) a GitHub-markdown table, so the output pastes into the README as it is."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def in_fresh_process(target: Callable[..., None], *args: Any) -> Any:
    """Run ``target(*args, queue)`` in a fresh (spawned) process and return what it puts on the queue (a
    number or a tuple of numbers): how peak-memory figures are taken, so that each starts from an empty
    interpreter."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return value


def peak_rss_mb() -> float:
    """This process's own peak resident memory in MB (VmHWM; ``ru_maxrss`` of a spawned child would
    include what its parent had before the exec)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Start a new VmHWM peak at the current resident size (Linux ``clear_refs`` 5); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
