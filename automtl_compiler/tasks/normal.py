"""Surface-normal estimation: 1 − cosine similarity over valid pixels; angle-error statistics in degrees."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import AutomtlError
from .base import DenseTask, ExactSum, Metric, align_dense, check_resize, zero_loss


def normal_valid(target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``[N, H, W]`` validity: the target normal is non-zero and finite, and ``mask`` is true where given.

    A zero normal marks a missing measurement in MTAN's NYUv2 (MTAN's rule: channel sum != 0; we test each
    component, which also keeps normals whose components happen to sum to 0). Readers in
    :mod:`automtl_compiler.data` write zero normals at invalid pixels.
    """
    valid = (target != 0).any(dim=1) & torch.isfinite(target).all(dim=1)
    if mask is not None:
        valid &= (mask[:, 0] if mask.dim() == 4 else mask).bool()
    return valid


def angle_degrees(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Angle in degrees between the rows of two ``[P, 3]`` tensors, computed as ``atan2(|a×b|, a·b)``
    in float64 (exact at 0° and 90°, unlike ``acos`` of a rounded cosine). Both are normalised first
    (the result does not depend on their lengths); a zero prediction counts as 90° off, as a zero vector
    after ``F.normalize`` has cosine 0 in AdaShare's code.
    """
    a = pred.double()
    b = target.double()
    ang = torch.rad2deg(torch.atan2(torch.linalg.cross(a, b).norm(dim=1), (a * b).sum(dim=1)))
    zero = (a == 0).all(dim=1)
    return torch.where(zero, torch.full_like(ang, 90.0), ang)


class NormalMetric(Metric):
    """Angle error (degrees) between predicted and true normals over every valid pixel of every batch:

    ``angle_mean`` and ``angle_median`` (lower is better) and ``within_11.25``, ``within_22.5``,
    ``within_30``: the share (fraction in [0, 1], higher is better) of pixels with an error ``<=`` the
    threshold (AdaShare/AutoMTL compare with ``<=`` and print percent). Predictions are normalised first,
    so only their direction matters. The median needs every pixel's angle, which the accumulator keeps
    (float32, on the CPU). With no valid pixel all metrics are NaN.

    Every statistic is a function of the multiset of angles (the mean an exact sum rounded once, see
    :class:`ExactSum`; the median from a sort; the shares from integer counts), so the metrics are identical
    bit for bit however the pixels are split into batches or shards.
    """

    THRESHOLDS = (11.25, 22.5, 30.0)

    def __init__(self, resize: str = "target") -> None:
        self.resize = check_resize(resize)
        self.reset()

    def reset(self) -> None:
        self.angles: list[torch.Tensor] = []

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        pred, target, mask = align_dense(pred.detach(), target.detach(), mask, self.resize, "normal")
        _check_channels(pred, target)
        valid = normal_valid(target, mask)
        p = pred.permute(0, 2, 3, 1)[valid]
        t = target.permute(0, 2, 3, 1)[valid]
        self.angles.append(angle_degrees(p, t).float().cpu())

    def compute(self) -> dict[str, float]:
        ang = torch.cat(self.angles) if self.angles else torch.zeros(0)
        if ang.numel() == 0:
            return dict.fromkeys(Normal.metric_directions, float("nan"))
        a = ang.double()
        n = a.numel()
        total = ExactSum()
        total.add(a)
        out = {"angle_mean": total.mean(n), "angle_median": float(_median(a))}
        for th in self.THRESHOLDS:
            out[f"within_{th:g}"] = int((a <= th).sum()) / n
        return out

    def state(self) -> dict[str, torch.Tensor]:
        """``angles``: every angle seen, in order (float32 ``[P]``)."""
        return {"angles": torch.cat(self.angles) if self.angles else torch.zeros(0)}

    def merge_states(self, states: Sequence[dict[str, torch.Tensor]]) -> None:
        for st in states:
            angles = st["angles"].reshape(-1).to("cpu", torch.float32)
            if angles.numel():
                self.angles.append(angles)


def _median(x: torch.Tensor) -> torch.Tensor:
    """The median as numpy defines it (mean of the two middle values for an even count)."""
    s, _ = x.sort()
    n = s.numel()
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def _check_channels(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape[1] != 3 or target.dim() != 4 or target.shape[1] != 3:
        raise AutomtlError(f"normal: prediction and target must be [N, 3, H, W], got {tuple(pred.shape)} and "
                           f"{tuple(target.shape)}")


class Normal(DenseTask):
    """Surface normals (three channels, unit vectors in the camera frame).

    Prediction ``[N, 3, h, w]`` (any length: it is normalised); target ``[N, 3, H, W]``. Loss, as in AdaShare
    and AutoMTL: ``1 − mean cos(pred, target)`` over valid pixels, both ``F.normalize``-d per pixel. Valid
    pixels: see :func:`normal_valid` (non-zero target normal, plus the optional mask). A batch without a
    valid pixel has loss 0.
    """

    kind = "normal"
    metric_directions: ClassVar[dict[str, bool]] = {
        "angle_mean": False, "angle_median": False, "within_11.25": True, "within_22.5": True, "within_30": True}

    @property
    def out_channels(self) -> int:
        return 3

    def loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        pred, target, mask = align_dense(pred, target, mask, self.resize, self.kind)
        _check_channels(pred, target)
        valid = normal_valid(target, mask)
        if not bool(valid.any()):
            return zero_loss(pred)
        p = F.normalize(pred.permute(0, 2, 3, 1)[valid], dim=1)
        t = F.normalize(target.permute(0, 2, 3, 1)[valid].to(pred.dtype), dim=1)
        return 1.0 - (p * t).sum(dim=1).mean()

    def new_metric(self) -> NormalMetric:
        return NormalMetric(self.resize)
