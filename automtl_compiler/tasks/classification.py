"""Image-level classification: cross-entropy; accuracy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import AutomtlError
from .base import Metric, TaskType, zero_loss


def _check(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if pred.dim() != 2:
        raise AutomtlError(f"classification: the prediction must be logits [N, C], got {tuple(pred.shape)}")
    target = target.reshape(-1)
    if target.shape[0] != pred.shape[0]:
        raise AutomtlError(f"classification: {target.shape[0]} targets for {pred.shape[0]} predictions")
    return target.long()


class ClassificationMetric(Metric):
    """``accuracy``: the share (fraction in [0, 1], higher is better) of samples whose arg-max logit is the
    target class. Samples with a target of ``ignore_index`` or a false mask are skipped."""

    def __init__(self, ignore_index: int = -100) -> None:
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        self.correct = 0
        self.total = 0

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        target = _check(pred.detach(), target.detach())
        valid = target != self.ignore_index
        if mask is not None:
            valid &= mask.reshape(-1).bool()
        self.correct += int((pred.detach().argmax(dim=1) == target)[valid].sum())
        self.total += int(valid.sum())

    def compute(self) -> dict[str, float]:
        return {"accuracy": self.correct / self.total if self.total else float("nan")}

    def state(self) -> dict[str, torch.Tensor]:
        """``counts`` = [correct, total] (int64)."""
        return {"counts": torch.tensor([self.correct, self.total], dtype=torch.int64)}

    def merge_states(self, states: Sequence[dict[str, torch.Tensor]]) -> None:
        for st in states:
            correct, total = (int(v) for v in st["counts"].reshape(-1))
            self.correct += correct
            self.total += total


class Classification(TaskType):
    """Image-level classification into ``num_classes`` classes.

    Prediction: logits ``[N, C]``; target: class ids ``[N]``. Loss: mean cross-entropy
    (``F.cross_entropy`` with ``ignore_index``, default -100 as in PyTorch) over samples with a true
    ``mask`` value when a mask is given.
    """

    kind = "classification"
    metric_directions: ClassVar[dict[str, bool]] = {"accuracy": True}

    def __init__(self, num_classes: int | None = None, ignore_index: int = -100) -> None:
        if num_classes is not None and num_classes < 1:
            raise AutomtlError(f"classification: num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = int(ignore_index)

    @property
    def out_channels(self) -> int | None:
        return self.num_classes

    def options(self) -> dict:
        return {"num_classes": self.num_classes, "ignore_index": self.ignore_index}

    def loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        target = _check(pred, target)
        if self.num_classes is not None and pred.shape[1] != self.num_classes:
            raise AutomtlError(f"classification: the prediction has {pred.shape[1]} logits, expected "
                               f"{self.num_classes}")
        if mask is not None:
            target = target.masked_fill(~mask.reshape(-1).bool(), self.ignore_index)
        if bool((target == self.ignore_index).all()):
            return zero_loss(pred)
        return F.cross_entropy(pred, target, ignore_index=self.ignore_index)

    def new_metric(self) -> ClassificationMetric:
        return ClassificationMetric(self.ignore_index)
