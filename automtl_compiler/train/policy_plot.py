"""policy.png and the report's policy data: per task, P(share / specific / skip) at every unit and the choice.

One panel per task, one stacked bar per unit (input on the left, feature on the right), the unit's name on
the axis and the sampled branch outlined in black, drawn with matplotlib's object API (no pyplot state,
no display needed), so the picture is readable without the report beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..ir.serialize import atomic_write
from ..passes.multitask import BRANCHES

COLOURS = {"share": "#2f5fd0", "specific": "#d64541", "skip": "#3aa655"}


def policy_data(distribution: dict[str, dict[str, list[float]]], choices: dict[str, dict[str, str]] | None,
                depths: dict[str, int] | None = None) -> dict[str, Any]:
    """The report's ``policy_units``: unit names (input to feature) and depths, and per task the three
    probabilities and the chosen branch at every unit (``choices`` None: no policy drawn yet)."""
    tasks = list(distribution)
    units = list(distribution[tasks[0]]) if tasks else []
    out: dict[str, Any] = {"units": units, "branches": list(BRANCHES), "tasks": {}}
    if depths is not None:
        out["depths"] = [depths[u] for u in units]
    for t in tasks:
        entry: dict[str, Any] = {b: [round(float(distribution[t][u][i]), 6) for u in units]
                                 for i, b in enumerate(BRANCHES)}
        if choices is not None:
            entry["choice"] = [choices[t][u] for u in units]
        out["tasks"][t] = entry
    return out


def draw_policy(data: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Draw ``data`` (as made by :func:`policy_data`) to a PNG at ``path``, written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    units, tasks = data["units"], list(data["tasks"])
    width = max(8.0, 0.42 * len(units) + 2.0)
    fig = Figure(figsize=(width, 1.0 + 2.3 * max(1, len(tasks))), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(max(1, len(tasks)), 1, sharex=True, squeeze=False)[:, 0]
    xs = range(len(units))
    for ax, task in zip(axes, tasks):
        entry = data["tasks"][task]
        bottom = [0.0] * len(units)
        for branch in BRANCHES:
            ax.bar(xs, entry[branch], bottom=bottom, width=0.8, color=COLOURS[branch], label=branch)
            if "choice" in entry:
                for i, chosen in enumerate(entry["choice"]):
                    if chosen == branch:
                        ax.add_patch(Rectangle((i - 0.4, bottom[i]), 0.8, entry[branch][i], fill=False,
                                               edgecolor="black", linewidth=2.0))
            bottom = [b + p for b, p in zip(bottom, entry[branch])]
        ax.set_ylim(0, 1)
        ax.set_xlim(-0.6, len(units) - 0.4)
        ax.set_ylabel(f"{task}\nP(branch)", fontsize=9)
        ax.set_yticks([0, 0.5, 1])
        ax.grid(axis="y", alpha=0.3)
    labels = [f"{u} ({d})" for u, d in zip(units, data["depths"])] if "depths" in data else units
    axes[-1].set_xticks(list(xs), labels, rotation=60, ha="right", fontsize=8)
    axes[-1].set_xlabel("unit (depth): input → feature" if "depths" in data else "unit: input → feature")
    handles = [Patch(color=COLOURS[b], label=b) for b in BRANCHES]
    handles.append(Patch(facecolor="white", edgecolor="black", linewidth=2.0, label="sampled choice"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return Path(path)
