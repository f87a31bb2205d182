"""Scores of trained models: Δm against single-task baselines, and the sample stage's candidate scores."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import AutomtlError


def read_baseline(path: Path, tasks: list[str]) -> dict[str, dict[str, float]]:
    """Per-task metrics of a baseline run's report.json (``automtl train --baseline ...``)."""
    try:
        single = json.loads(path.read_text())["tasks"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AutomtlError(f"baselines: {path} is not a baseline report.json ({e}); train one with "
                           "`automtl train CONFIG --baseline single-task`") from None
    missing = sorted(set(tasks) - set(single))
    if missing:
        raise AutomtlError(f"baselines: {path} has no metrics for task(s) {missing}")
    return single


def delta_m_against(baselines: Path, metrics: dict[str, dict[str, float]], task_types: dict[str, Any],
                    tasks: list[str]) -> dict[str, Any]:
    """Δm of ``metrics`` against the baseline report at ``baselines``; metrics whose baseline is 0 (no
    relative change exists) are left out and listed under ``skipped``."""
    from ..tasks import delta_m

    single = read_baseline(baselines, tasks)
    usable = {t: {k: v for k, v in single[t].items() if v != 0} for t in tasks}
    usable = {t: values for t, values in usable.items() if values}
    if usable:
        directions = {t: task_types[t].metric_directions for t in usable}
        result = delta_m({t: metrics[t] for t in usable}, usable, directions)
    else:
        result = {"per_task": {}, "delta_m": None}
    result["skipped"] = sorted(f"{t}/{k}" for t in tasks for k, v in single[t].items() if v == 0)
    return result


def candidate_scores(results: list[dict[str, dict[str, float]]], task_types: dict[str, Any], tasks: list[str],
                     baselines: Path | None) -> list[float]:
    """Scale-free accuracy scores of candidates' validation metrics in percent (higher is better): Δm
    against ``baselines`` when given, else the same average of signed relative differences taken against
    the candidates' mean: ``100 / (T K_t) * sum_t sum_k s_k (m_k - mean_k) / |mean_k|``."""
    if baselines is not None:
        found = [delta_m_against(baselines, r, task_types, tasks)["delta_m"] for r in results]
        if None not in found:
            return found
    scores = [0.0] * len(results)
    for t in tasks:
        directions = task_types[t].metric_directions
        for k in results[0][t]:
            mean = sum(r[t][k] for r in results) / len(results)
            if mean == 0:
                continue
            for i, r in enumerate(results):
                change = (r[t][k] - mean) / abs(mean) * (1 if directions.get(k, True) else -1)
                scores[i] += 100 * change / len(results[0][t]) / len(tasks)
    return scores
