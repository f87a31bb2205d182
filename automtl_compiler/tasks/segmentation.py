"""Semantic segmentation: pixel-wise cross-entropy; mIoU and pixel accuracy from a confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import AutomtlError
from .base import Metric, TaskType, align_dense, check_resize, zero_loss

MIOU_CLASS_RULES: tuple[str, ...] = ("present", "nonzero_tp")


class SegmentationMetric(Metric):
    """Confusion-matrix accumulator: ``miou`` and ``pixel_acc`` (both fractions in [0, 1], higher is better).

    The confusion matrix ``M[t, p]`` counts valid pixels of true class ``t`` predicted as ``p`` (prediction =
    arg-max over channels). Valid pixels have a target in ``[0, num_classes)``, not ``ignore_index``, and a
    true mask value when a mask is given. ``IoU_c = M[c,c] / (sum_p M[c,p] + sum_t M[t,c] - M[c,c])`` and mIoU
    averages it over

    - ``classes="present"`` (default): classes with a non-empty union, i.e. present in the target or in the
      prediction on some valid pixel. A class absent from both is excluded (its IoU is 0/0), the standard
      rule (MTAN skips such classes too).
    - ``classes="nonzero_tp"``: classes with ``M[c,c] > 0`` only, the rule AdaShare's and AutoMTL's evaluation
      code applies (``if conf_mat[i, i] != 0``). It also drops classes that occur but are never predicted
      correctly, so it reads higher; use it only to compare with numbers from those projects.

    ``pixel_acc = trace(M) / sum(M)`` over all valid pixels of all batches (AdaShare averages per-batch
    accuracies weighted by batch size, which equals this when every batch has as many valid pixels). With no
    valid pixel at all, both metrics are NaN.
    """

    def __init__(self, num_classes: int | None = None, ignore_index: int = 255, resize: str = "target",
                 classes: str = "present") -> None:
        if classes not in MIOU_CLASS_RULES:
            raise AutomtlError(f"classes={classes!r} is not an mIoU class rule; use one of "
                               f"{', '.join(MIOU_CLASS_RULES)}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.resize = check_resize(resize)
        self.classes = classes
        self.confusion: torch.Tensor | None = None
        if num_classes is not None:
            self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def reset(self) -> None:
        if self.confusion is not None:
            self.confusion.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        pred, target, mask = align_dense(pred.detach(), target.detach(), mask, self.resize, "segment_semantic")
        c = pred.shape[1]
        if self.confusion is None:
            self.num_classes = c
            self.confusion = torch.zeros(c, c, dtype=torch.int64)
        elif c != self.num_classes:
            raise AutomtlError(f"segment_semantic: the prediction has {c} channels, the metric counts "
                               f"{self.num_classes} classes")
        if target.dim() == 4:
            target = target[:, 0]
        labels = pred.argmax(dim=1)
        target = target.long()
        valid = (target >= 0) & (target < c) & (target != self.ignore_index)
        if mask is not None:
            valid &= (mask.reshape(valid.shape) if mask.dim() == 4 else mask).bool()
        idx = target[valid] * c + labels[valid]
        self.confusion += torch.bincount(idx, minlength=c * c).reshape(c, c).cpu()

    def compute(self) -> dict[str, float]:
        if self.confusion is None or int(self.confusion.sum()) == 0:
            return {"miou": float("nan"), "pixel_acc": float("nan")}
        m = self.confusion.double()
        tp = m.diagonal()
        union = m.sum(dim=0) + m.sum(dim=1) - tp
        keep = union > 0 if self.classes == "present" else tp > 0
        miou = float((tp[keep] / union[keep]).mean()) if bool(keep.any()) else 0.0
        return {"miou": miou, "pixel_acc": float(tp.sum() / m.sum())}

    def state(self) -> dict[str, torch.Tensor]:
        """``confusion`` (int64 ``[C, C]``; ``[0, 0]`` while the class count is still unknown)."""
        if self.confusion is None:
            return {"confusion": torch.zeros(0, 0, dtype=torch.int64)}
        return {"confusion": self.confusion.clone()}

    def merge_states(self, states: Sequence[dict[str, torch.Tensor]]) -> None:
        for st in states:
            other = st["confusion"]
            if other.dim() == 2 and other.numel() == 0:
                continue
            square = other.dim() == 2 and other.shape[0] == other.shape[1]
            if not square or (self.num_classes is not None and other.shape[0] != self.num_classes):
                raise AutomtlError(f"segment_semantic: cannot merge a confusion matrix of shape "
                                   f"{tuple(other.shape)} into one of {self.num_classes} classes")
            c = other.shape[0]
            if self.confusion is None:
                self.num_classes = c
                self.confusion = torch.zeros(c, c, dtype=torch.int64)
            self.confusion += other.to("cpu", torch.int64)


class SegmentSemantic(TaskType):
    """Semantic segmentation with ``num_classes`` classes.

    Prediction: logits ``[N, C, h, w]``. Target: class ids ``[N, H, W]`` (or ``[N, 1, H, W]``), any integer or
    float dtype. Loss: mean cross-entropy over valid pixels (``F.cross_entropy`` with ``ignore_index``, as
    AdaShare/AutoMTL's ``nn.CrossEntropyLoss(ignore_index=...)``); target values outside ``[0, C)`` are
    ignored as well, so MTAN's ``-1`` labels need no remapping. ``class_weights`` (e.g. Taskonomy's
    ``semseg_prior_factor.npy``) weight the classes as ``nn.CrossEntropyLoss(weight=...)`` does. A batch
    without a valid pixel has loss 0.

    Options: ``num_classes`` (None: taken from the prediction), ``ignore_index`` (255, the value real-data
    readers in this package use), ``resize`` ("target" | "prediction", see :mod:`.base`), ``class_weights``,
    ``miou_classes`` ("present" | "nonzero_tp", see :class:`SegmentationMetric`).
    """

    kind = "segment_semantic"
    metric_directions: ClassVar[dict[str, bool]] = {"miou": True, "pixel_acc": True}

    def __init__(self, num_classes: int | None = None, ignore_index: int = 255, resize: str = "target",
                 class_weights: Sequence[float] | torch.Tensor | None = None, miou_classes: str = "present") -> None:
        if num_classes is not None and num_classes < 1:
            raise AutomtlError(f"segment_semantic: num_classes must be positive, got {num_classes}")
        if miou_classes not in MIOU_CLASS_RULES:
            raise AutomtlError(f"miou_classes={miou_classes!r} is not an mIoU class rule; use one of "
                               f"{', '.join(MIOU_CLASS_RULES)}")
        self.num_classes = num_classes
        self.ignore_index = int(ignore_index)
        self.resize = check_resize(resize)
        self.miou_classes = miou_classes
        self.class_weights = None
        if class_weights is not None:
            w = torch.as_tensor(class_weights, dtype=torch.float32).flatten()
            if num_classes is not None and w.numel() != num_classes:
                raise AutomtlError(f"segment_semantic: {w.numel()} class weights for {num_classes} classes")
            self.class_weights = w

    @property
    def out_channels(self) -> int | None:
        return self.num_classes

    def options(self) -> dict:
        return {"num_classes": self.num_classes, "ignore_index": self.ignore_index, "resize": self.resize,
                "miou_classes": self.miou_classes}

    def loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        pred, target, mask = align_dense(pred, target, mask, self.resize, self.kind)
        c = pred.shape[1]
        if self.num_classes is not None and c != self.num_classes:
            raise AutomtlError(f"segment_semantic: the prediction has {c} channels, expected {self.num_classes}")
        if target.dim() == 4:
            target = target[:, 0]
        target = target.long()
        invalid = (target < 0) | (target >= c)
        if mask is not None:
            invalid |= ~(mask.reshape(target.shape) if mask.dim() == 4 else mask).bool()
        ignore = self.ignore_index
        target = target.masked_fill(invalid, ignore)
        if bool((target == ignore).all()):
            return zero_loss(pred)
        weight = None if self.class_weights is None else self.class_weights.to(pred.device, pred.dtype)
        return F.cross_entropy(pred, target, weight=weight, ignore_index=ignore)

    def new_metric(self) -> SegmentationMetric:
        return SegmentationMetric(self.num_classes, self.ignore_index, self.resize, self.miou_classes)
