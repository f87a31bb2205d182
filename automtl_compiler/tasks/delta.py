"""Δm: the average relative improvement of a multi-task model over single-task baselines.

Maninis et al. (2019, "Attentive single-tasking of multiple tasks", eq. 4), recommended by MTAN's authors
and used throughout the MTL literature::

    Δ_t  = 100 / |M_t| · Σ_{m ∈ M_t} (−1)^{l_m} · (M_mt,m − M_st,m) / M_st,m
    Δm   = 1 / T · Σ_t Δ_t

with ``l_m = 1`` when lower is better for metric ``m`` (dividing by ``|M_st,m|``, which changes nothing for
the usual positive metrics). Both are in **percent**; positive means the
multi-task model is better. Here the mean is taken per task first (each task weighs the same however many
metrics it reports), which is the form AutoMTL's per-task ``cmp`` scores take and the Δm that MTAN-style
tables quote.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from ..errors import AutomtlError


def delta_m(multi: Mapping[str, Mapping[str, float]], single: Mapping[str, Mapping[str, float]],
            directions: Mapping[str, Mapping[str, bool]]) -> dict:
    """Per-task Δ and overall Δm, in percent.

    Args:
        multi: task -> metric -> value of the multi-task model.
        single: task -> metric -> value of the single-task baseline. Its tasks and metrics are the ones
            compared; ``multi`` and ``directions`` must cover them (extra entries are ignored).
        directions: task -> metric -> True when higher is better (``task.metric_directions``).

    Returns:
        ``{"per_task": {task: Δ_t}, "delta_m": Δm}`` (floats, percent).

    Raises:
        AutomtlError: a task or metric missing from ``multi`` or ``directions``, a baseline value of 0 (the
        relative change is undefined), a non-finite value, or no task at all.
    """
    if not single:
        raise AutomtlError("delta_m: no single-task baseline given")
    per_task: dict[str, float] = {}
    for task, base in single.items():
        if task not in multi:
            raise AutomtlError(f"delta_m: task {task!r} has a baseline but no multi-task result")
        if task not in directions:
            raise AutomtlError(f"delta_m: no metric directions for task {task!r}")
        if not base:
            raise AutomtlError(f"delta_m: task {task!r} has no baseline metrics")
        terms = []
        for metric, m_st in base.items():
            if metric not in multi[task]:
                raise AutomtlError(f"delta_m: metric {metric!r} of task {task!r} is missing from the multi-task "
                                   f"results (it has {', '.join(map(repr, multi[task])) or 'none'})")
            if metric not in directions[task]:
                raise AutomtlError(f"delta_m: no direction for metric {metric!r} of task {task!r}")
            m_mt = multi[task][metric]
            if not (math.isfinite(m_st) and math.isfinite(m_mt)):
                raise AutomtlError(f"delta_m: {task}/{metric} is not finite (multi {m_mt}, single {m_st})")
            if m_st == 0:
                raise AutomtlError(f"delta_m: the baseline {task}/{metric} is 0, so its relative change is "
                                   "undefined; drop that metric")
            sign = 1.0 if directions[task][metric] else -1.0
            terms.append(sign * (m_mt - m_st) / abs(m_st))
        per_task[task] = 100.0 * sum(terms) / len(terms)
    return {"per_task": per_task, "delta_m": sum(per_task.values()) / len(per_task)}
