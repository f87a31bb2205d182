"""Depth (z-buffer) estimation: L1 over valid pixels; abs/rel error and the δ thresholds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from ..errors import AutomtlError
from .base import DenseTask, ExactSum, Metric, align_dense, check_resize, zero_loss


def depth_valid(target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The validity rule: ``target > 0`` and finite, and ``mask`` true where a mask is given.

    This is MTAN's and AdaShare's rule for NYUv2/Cityscapes (depth 0 marks a missing measurement; AdaShare
    tests ``> 3e-5`` on one channel, which agrees on real data) combined with Taskonomy's explicit mask.
    Readers in :mod:`automtl_compiler.data` write 0 at invalid pixels, so no mask is needed for them.
    """
    valid = (target > 0) & torch.isfinite(target)
    if mask is not None:
        valid &= mask.reshape(valid.shape).bool() if mask.dim() == valid.dim() else mask.unsqueeze(1).bool()
    return valid


def _as_nchw(target: torch.Tensor, kind: str) -> torch.Tensor:
    if target.dim() == 3:
        return target.unsqueeze(1)
    if target.dim() == 4 and target.shape[1] == 1:
        return target
    raise AutomtlError(f"{kind}: the target must be [N, 1, H, W] or [N, H, W], got {tuple(target.shape)}")


class DepthMetric(Metric):
    """Depth metrics over every valid pixel of every batch (pooled, not averaged per batch):

    - ``abs_err`` = mean |d̂ − d| (lower is better), ``rel_err`` = mean |d̂ − d| / d (lower is better);
    - ``delta_1.25``, ``delta_1.25^2``, ``delta_1.25^3``: the share (fraction in [0, 1], higher is better) of
      pixels with ``max(d̂/d, d/d̂) <= 1.25**k`` (AdaShare/AutoMTL use ``<=``; they print the share in
      percent). A non-positive prediction fails every threshold.

    AdaShare/AutoMTL average ``abs_err``/``rel_err`` per batch, weighted by batch size; this equals the pooled
    mean when batches have as many valid pixels. With no valid pixel all metrics are NaN.

    The error sums are :class:`ExactSum` accumulators (every pixel's float64 error summed exactly, the mean
    rounded once), so the metrics are identical bit for bit however the pixels are split into batches or
    shards and in whatever order shards are merged; the counts are integers.
    """

    THRESHOLDS = (1.25, 1.25 ** 2, 1.25 ** 3)

    def __init__(self, resize: str = "target") -> None:
        self.resize = check_resize(resize)
        self.abs_sum = ExactSum()
        self.rel_sum = ExactSum()
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.abs_sum.reset()
        self.rel_sum.reset()
        self.within = [0, 0, 0]

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        target = _as_nchw(target.detach(), "depth_zbuffer")
        pred, target, mask = align_dense(pred.detach(), target, mask, self.resize, "depth_zbuffer")
        if pred.shape[1] != 1:
            raise AutomtlError(f"depth_zbuffer: the prediction must have 1 channel, got {pred.shape[1]}")
        valid = depth_valid(target, mask)
        p = pred[valid].double()
        t = target[valid].double()
        err = (p - t).abs()
        self.count += int(t.numel())
        self.abs_sum.add(err)
        self.rel_sum.add(err / t)
        ratio = torch.maximum(p / t, t / p)
        ratio = torch.where(p > 0, ratio, torch.full_like(ratio, float("inf")))
        for i, th in enumerate(self.THRESHOLDS):
            self.within[i] += int((ratio <= th).sum())

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            return dict.fromkeys(DepthZBuffer.metric_directions, float("nan"))
        n = self.count
        return {"abs_err": self.abs_sum.mean(n), "rel_err": self.rel_sum.mean(n), "delta_1.25": self.within[0] / n,
                "delta_1.25^2": self.within[1] / n, "delta_1.25^3": self.within[2] / n}

    def state(self) -> dict[str, torch.Tensor]:
        """``counts`` = [valid pixels, within δ1, δ2, δ3] (int64) and the two error sums' bins."""
        return {"counts": torch.tensor([self.count, *self.within], dtype=torch.int64),
                "abs_sum": self.abs_sum.bins.clone(), "rel_sum": self.rel_sum.bins.clone()}

    def merge_states(self, states: Sequence[dict[str, torch.Tensor]]) -> None:
        for st in states:
            counts = [int(v) for v in st["counts"].reshape(-1)]
            if len(counts) != 4:
                raise AutomtlError(f"depth_zbuffer: a metric state's counts must hold 4 numbers, got {len(counts)}")
            self.count += counts[0]
            self.within = [w + c for w, c in zip(self.within, counts[1:])]
            self.abs_sum.merge(st["abs_sum"])
            self.rel_sum.merge(st["rel_sum"])


class DepthZBuffer(DenseTask):
    """Depth estimation (z-buffer depth, one channel). Registry names ``depth_zbuffer`` and ``depth``.

    Prediction ``[N, 1, h, w]``; target ``[N, 1, H, W]`` or ``[N, H, W]``. Loss: mean absolute error over
    valid pixels (AdaShare/AutoMTL: ``nn.L1Loss`` on the masked-selected pixels; MTAN: the same sum divided
    by the number of valid pixels). Valid pixels: see :func:`depth_valid` (``target > 0``, finite, and the
    optional ``mask``). A batch without a valid pixel has loss 0.
    """

    kind = "depth_zbuffer"
    metric_directions: ClassVar[dict[str, bool]] = {
        "abs_err": False, "rel_err": False, "delta_1.25": True, "delta_1.25^2": True, "delta_1.25^3": True}

    @property
    def out_channels(self) -> int:
        return 1

    def loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        target = _as_nchw(target, self.kind)
        pred, target, mask = align_dense(pred, target, mask, self.resize, self.kind)
        if pred.shape[1] != 1:
            raise AutomtlError(f"depth_zbuffer: the prediction must have 1 channel, got {pred.shape[1]}")
        valid = depth_valid(target, mask)
        if not bool(valid.any()):
            return zero_loss(pred)
        return (pred[valid] - target[valid].to(pred.dtype)).abs().mean()

    def new_metric(self) -> DepthMetric:
        return DepthMetric(self.resize)
