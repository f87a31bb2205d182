"""User-side task types and heads, importable as ``tests.custom_parts:Class`` by the custom-parts tests.

Nothing here registers itself on import: the tests register what they need and undo it afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from automtl_compiler.tasks import Metric, TaskType


class MeanAbsMetric(Metric):
    """``mae``: the mean absolute error over every element seen."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.total = 0.0
        self.count = 0

    def update(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        self.total += float((pred.detach() - target.detach()).abs().sum())
        self.count += target.numel()

    def compute(self) -> dict[str, float]:
        return {"mae": self.total / self.count if self.count else float("nan")}


class MeanAbsTask(TaskType):
    """A dense regression task with a weighted L1 loss."""

    kind = "mean_abs"
    metric_directions: ClassVar[dict[str, bool]] = {"mae": False}

    def __init__(self, channels: int = 1, weight: float = 1.0) -> None:
        self.channels = channels
        self.weight = weight

    @property
    def out_channels(self) -> int:
        return self.channels

    def loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.weight * (pred - target).abs().mean()

    def new_metric(self) -> MeanAbsMetric:
        return MeanAbsMetric()


class HalfTask(TaskType):
    """Abstract: defines no loss, metric or channels."""


class NotATask:
    """A class that is no TaskType and no nn.Module."""


class PixelHead(nn.Module):
    """Conv3x3 -> ReLU -> Conv1x1, bilinearly upsampled to the input size."""

    def __init__(self, in_channels: int, num_classes: int, hidden: int = 4, upsample_to_input: bool = True) -> None:
        super().__init__()
        self.upsample_to_input = upsample_to_input
        self.conv = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.out = nn.Conv2d(hidden, num_classes, 1)

    def forward(self, feature: torch.Tensor, input_size: Sequence[int] | None = None) -> torch.Tensor:
        y = self.out(torch.relu(self.conv(feature)))
        if input_size is not None:
            y = F.interpolate(y, size=tuple(input_size), mode="bilinear", align_corners=False)
        return y


class PoolHead(nn.Module):
    """Global average pooling, a linear layer and a fixed scale."""

    def __init__(self, in_channels: int, num_classes: int, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.fc(feature.mean(dim=(2, 3))) * self.scale
