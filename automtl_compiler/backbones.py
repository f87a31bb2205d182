"""Backbones torchvision does not provide: AutoMTL's dilated DeepLab ResNet-34.

AutoMTL and AdaShare use a ResNet-34 whose last two stages trade stride for dilation (output stride 8),
with a ceil-mode max pool and no classifier. Built here as a plain ``nn.Module`` with random weights, so
that the project generates its own prototxt of it (``models/deeplab_resnet34.prototxt``).
"""

from __future__ import annotations

import torch
from torch import nn


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dilation: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class DeepLabResNet34(nn.Module):
    """ResNet-34 with dilation 2 and 4 in the last two stages (output stride 8), no classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        cfg = [(64, 3, 1, 1), (128, 4, 2, 1), (256, 6, 1, 2), (512, 3, 1, 4)]
        cin = 64
        for i, (cout, blocks, stride, dilation) in enumerate(cfg, start=1):
            layers = [_Block(cin, cout, stride, dilation)]
            layers += [_Block(cout, cout, 1, dilation) for _ in range(blocks - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*layers))
            cin = cout
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def deeplab_resnet34() -> DeepLabResNet34:
    """AutoMTL's DeepLab ResNet-34 backbone with random weights (21,284,672 parameters)."""
    return DeepLabResNet34()
