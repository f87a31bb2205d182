"""``collate``: a list of ``(image, {task: target})`` samples -> one batch ``(images, {task: stacked targets})``.

This is the one collate function of the package: the trainer's deterministic per-step batches
(:mod:`automtl_compiler.train.batches`) and any plain ``torch.utils.data.DataLoader`` over these datasets
(``DataLoader(ds, batch_size=8, shuffle=True, collate_fn=collate)``) use it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import AutomtlError

Batch = tuple[torch.Tensor, dict[str, torch.Tensor]]


def collate(samples: Sequence[tuple[Any, Mapping[str, Any]]]) -> Batch:
    """Stack ``(image, targets)`` samples into ``(images, {task: stacked targets})``.

    Targets are stacked along a new first dimension (scalar class ids become a ``[B]`` int64 tensor).
    Every sample must carry the same tasks and same-shaped tensors; otherwise AutomtlError.
    """
    if not samples:
        raise AutomtlError("collate: empty batch")
    keys = list(samples[0][1])
    for _, targets in samples[1:]:
        if list(targets) != keys:
            raise AutomtlError(f"collate: samples carry different tasks ({keys} vs {list(targets)})")
    try:
        images = torch.stack([torch.as_tensor(s[0]) for s in samples])
        out = {k: torch.stack([torch.as_tensor(s[1][k]) for s in samples]) for k in keys}
    except RuntimeError as exc:
        raise AutomtlError(f"collate: samples of different shapes cannot be stacked ({exc}); resize or crop "
                           "them to one size (e.g. the dataset option resolution: [H, W])") from None
    return images, out

