"""The task-type protocol shared by every task: a criterion, a metric accumulator, metric directions.

A :class:`TaskType` is a small stateless object picked by name from the registry
(:func:`automtl_compiler.tasks.get_task`). The trainer calls ``task.loss(pred, target)`` on every batch and
``metric = task.new_metric(); metric.update(pred, target); metric.compute()`` to evaluate.

Resolution. Dense predictions and their targets need not share a spatial size (heads often predict at a
fraction of the input). ``resize="target"`` (the default, as AutoMTL and AdaShare train) brings the
*target* to the prediction's size with nearest-neighbour sampling, the rule of ``F.interpolate``'s
default ``mode="nearest"`` that both projects call, for labels, depth and normals alike; nearest keeps
label ids intact and never blends valid depth/normal pixels with invalid ones. ``resize="prediction"``
instead upsamples the *prediction* bilinearly (``align_corners=False``) to the target's size, the usual
choice when reporting numbers at full resolution. Masks follow the target (nearest).

Everything here works on whatever device the tensors live on; metric accumulators keep their running
sums on the CPU in float64/int64, so the numbers do not depend on the device or on the batch split.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from ..errors import AutomtlError

Resize = Literal["target", "prediction"]
RESIZE_MODES: tuple[str, ...] = ("target", "prediction")


def nearest_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize the last two dimensions of ``x`` to ``size`` by nearest-neighbour index selection.

    Source index ``floor(i * in / out)``, the rule of ``F.interpolate(mode="nearest")``, but done by
    indexing so that integer and boolean tensors keep their dtype and values exactly.
    """
    in_h, in_w = x.shape[-2], x.shape[-1]
    out_h, out_w = int(size[0]), int(size[1])
    if (in_h, in_w) == (out_h, out_w):
        return x
    # The same float32 arithmetic as ATen's nearest kernel (scale = in / out, src = floor(dst * scale)),
    # clamped to the last row/column, so that the selected pixels agree with F.interpolate exactly.
    rows = torch.floor(torch.arange(out_h, dtype=torch.float32, device=x.device)
                       * torch.tensor(in_h / out_h, dtype=torch.float32)).long().clamp_(max=in_h - 1)
    cols = torch.floor(torch.arange(out_w, dtype=torch.float32, device=x.device)
                       * torch.tensor(in_w / out_w, dtype=torch.float32)).long().clamp_(max=in_w - 1)
    return x.index_select(-2, rows).index_select(-1, cols)


def bilinear_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of an ``[N, C, H, W]`` float tensor (``align_corners=False``); a no-op at equal size."""
    if tuple(x.shape[-2:]) == (int(size[0]), int(size[1])):
        return x
    return F.interpolate(x, size=(int(size[0]), int(size[1])), mode="bilinear", align_corners=False)


def check_resize(resize: str) -> str:
    if resize not in RESIZE_MODES:
        raise AutomtlError(f"resize={resize!r} is not a resize mode; use one of {', '.join(RESIZE_MODES)}")
    return resize


def align_dense(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None, resize: str,
                kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Bring a dense prediction ``[N, C, h, w]`` and its target/mask to one spatial size.

    ``target`` is ``[N, H, W]`` (labels) or ``[N, C', H, W]``; ``mask`` is ``[N, H, W]`` or ``[N, 1, H, W]``.
    """
    if pred.dim() != 4:
        raise AutomtlError(f"{kind}: the prediction must be [N, C, H, W], got shape {tuple(pred.shape)}")
    if target.dim() not in (3, 4) or target.shape[0] != pred.shape[0]:
        raise AutomtlError(f"{kind}: the target must be [N, H, W] or [N, C, H, W] with N={pred.shape[0]}, "
                           f"got shape {tuple(target.shape)}")
    if mask is not None and (mask.shape[0] != target.shape[0] or tuple(mask.shape[-2:]) != tuple(target.shape[-2:])):
        raise AutomtlError(f"{kind}: the mask's shape {tuple(mask.shape)} does not match the target's "
                           f"{tuple(target.shape)}")
    psize, tsize = tuple(pred.shape[-2:]), tuple(target.shape[-2:])
    if psize != tsize:
        if resize == "target":
            target = nearest_resize(target, psize)
            mask = None if mask is None else nearest_resize(mask, psize)
        else:
            pred = bilinear_resize(pred, tsize)
    return pred, target, mask


class Metric(ABC):
    """Accumulates a task's evaluation statistics over batches.

    ``update`` may be called any number of times (under ``torch.no_grad`` or not: inputs are detached);
    ``compute`` returns plain floats and leaves the state untouched; ``reset`` clears it. The result does
    not depend on how the evaluation set is split into batches.
    """

    @abstractmethod
    def update(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add one batch."""

    @abstractmethod
    def compute(self) -> dict[str, float]:
        """The metrics over every batch seen since the last reset."""

    @abstractmethod
    def reset(self) -> None:
        """Forget every batch."""


class TaskType(ABC):
    """One kind of task: its loss, its metrics and which way each metric improves.

    Attributes:
        kind: the registry name, also the key of this task's target in a dataset's targets dict.
        metric_directions: metric name -> True when higher is better, False when lower is better.
        out_channels: the channels a head must predict (``None`` when it depends on an unset option).
    """

    kind: ClassVar[str]
    metric_directions: ClassVar[dict[str, bool]]

    @property
    @abstractmethod
    def out_channels(self) -> int | None:
        """Channels of the prediction a head must produce."""

    @abstractmethod
    def loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The scalar training loss of one batch (differentiable in ``pred``)."""

    @abstractmethod
    def new_metric(self) -> Metric:
        """A fresh metric accumulator for this task."""

    def options(self) -> dict:
        """The constructor options, for configs and ``repr``."""
        return {}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


class DenseTask(TaskType):
    """A pixel-wise regression task whose one option is how prediction and target meet in size."""

    def __init__(self, resize: str = "target") -> None:
        self.resize = check_resize(resize)

    def options(self) -> dict:
        return {"resize": self.resize}


def zero_loss(pred: torch.Tensor) -> torch.Tensor:
    """A zero that still depends on ``pred`` (for a batch without a single valid pixel): no NaN, no crash."""
    return pred.sum() * 0.0
