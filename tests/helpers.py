"""Model builders shared by the tests."""

from __future__ import annotations

import torch
import torchvision
from torch import nn


def randomise_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """Give every batch norm non-trivial statistics and affine weights, so that it is not a no-op."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model


def randomised(name: str) -> nn.Module:
    """A torchvision model with random weights and non-trivial batch-norm statistics, in eval mode."""
    torch.manual_seed(0)
    return randomise_bn(torchvision.models.get_model(name, weights=None)).eval()


class Tiny(nn.Module):
    """Two conv units (the second changes shape, stride 2) with batch norms: the smallest SuperModel backbone."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, channels, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


class Small(nn.Module):
    """A residual net with every kind of unit: a projection skip on the image (3 -> 8), an identity skip, a
    stride-2 depthwise unit and a padding-0 unit whose skip projection crops its input."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.valid = nn.Conv2d(8, 16, 3, padding=0)
        self.bn3 = nn.BatchNorm2d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.bn1(self.c1(x)) + x)
        x = torch.relu(self.bn2(self.dw(x)))
        return torch.relu(self.bn3(self.valid(x)))
