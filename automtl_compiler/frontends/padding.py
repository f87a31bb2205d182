"""TensorFlow/ONNX 'SAME' padding, shared by the fx and ONNX frontends."""

from __future__ import annotations

import math


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """The (smaller, larger) halves of the padding that makes an output of ceil(size / stride) along one axis."""
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2
