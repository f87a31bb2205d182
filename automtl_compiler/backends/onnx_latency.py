"""Latency of several ONNX files side by side (``automtl bench A.onnx B.onnx ...``).

The files are timed round-robin - one run of each file on each provider per round - so that a slow spell
of a shared machine touches every file alike, and each row carries its ratio to the first file's row on
the same provider.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import AutomtlError


def compare_latency(paths: Sequence[str | Path], *, providers: Sequence[str] = ("cpu",), batch: int = 1,
                    repeat: int = 10, warmup: int = 2, threads: int | None = None) -> list[dict[str, Any]]:
    """Median latency of each file on each provider: rows of file, precision, provider, batch, input_shape,
    median_ms, images_per_s, ratio (to the first file on the same provider), in file then provider order.

    Every file is fed the first file's seeded random input, so they must take the same input shape.
    """
    from ..runtime import InferenceSession
    from .onnx_precision import precision_of

    if batch < 1 or repeat < 1 or warmup < 0:
        raise AutomtlError("batch and repeat must be at least 1 and warmup at least 0")
    keys = [(Path(p), provider) for p in paths for provider in providers]
    sessions = {key: InferenceSession(key[0], provider=key[1], threads=threads, spin=False) for key in keys}
    first = sessions[keys[0]]
    x = first.example_input(batch)
    for (path, _), session in sessions.items():
        for axis, (want, got) in enumerate(zip(session.input_shape, x.shape)):
            if isinstance(want, int) and want > 0 and want != got:
                raise AutomtlError(f"{path} takes input {session.input_shape} but {keys[0][0]} gives "
                                   f"{list(x.shape)} (axis {axis}); compare files with the same input")
    for session in sessions.values():
        for _ in range(warmup):
            session.run(x)
    times: dict[tuple[Path, str], list[float]] = {key: [] for key in keys}
    for _ in range(repeat):
        for key, session in sessions.items():
            start = time.perf_counter()
            session.run(x)
            times[key].append(time.perf_counter() - start)
    precision = {path: precision_of(session.metadata) for (path, _), session in sessions.items()}
    medians = {key: statistics.median(t) for key, t in times.items()}
    return [{"file": str(path), "precision": precision[path], "provider": sessions[(path, provider)].device,
             "batch": batch, "input_shape": list(x.shape), "median_ms": medians[(path, provider)] * 1e3,
             "images_per_s": batch / medians[(path, provider)],
             "ratio": medians[(path, provider)] / medians[(keys[0][0], provider)], "runs": repeat}
            for path, provider in keys]
