"""policy.png: a tasks x units picture of the policy distribution, as AutoMTL's paper draws it.

Each cell mixes three colours by probability: share (blue), specific (red), skip (green).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from ..ir.serialize import atomic_write

COLOURS = {"share": (40, 90, 220), "specific": (220, 50, 50), "skip": (40, 170, 70)}


def draw_policy(distribution: dict[str, dict[str, list[float]]], path: str | Path, cell: int = 14) -> Path:
    """Draw ``distribution`` (task -> unit -> [p_share, p_specific, p_skip]) to a PNG at ``path``."""
    tasks = list(distribution)
    units = list(next(iter(distribution.values()))) if tasks else []
    left = 8 + 7 * max((len(t) for t in tasks), default=4)
    width, height = left + cell * max(1, len(units)) + 8, 30 + cell * len(tasks) + 24
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 6), f"policy: {len(units)} units (input -> feature)", fill="black")
    for row, task in enumerate(tasks):
        y = 24 + row * cell
        draw.text((4, y + 1), task, fill="black")
        for col, unit in enumerate(units):
            probs = distribution[task][unit]
            colour = tuple(int(sum(p * c[i] for p, c in zip(probs, COLOURS.values()))) for i in range(3))
            x = left + col * cell
            draw.rectangle([x, y, x + cell - 2, y + cell - 2], fill=colour)
    y = 30 + cell * len(tasks)
    x = left
    for name, colour in COLOURS.items():
        draw.rectangle([x, y, x + 10, y + 10], fill=colour)
        draw.text((x + 14, y), name, fill="black")
        x += 20 + 7 * len(name)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    return Path(path)
