"""Small tensor functions that some registry ops lower to.

They are module-level functions (not lambdas) so that generated torch.fx code can import and call them,
and so that ``torch.onnx.export`` traces them to plain ONNX ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def weighted_sum(*xs: torch.Tensor, coeffs: tuple[float, ...] | None = None) -> torch.Tensor:
    """Sum of the inputs, each scaled by its coefficient when coefficients are given (Caffe Eltwise SUM)."""
    if coeffs is None:
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out
    out = xs[0] * coeffs[0] if coeffs[0] != 1.0 else xs[0]
    for x, c in zip(xs[1:], coeffs[1:]):
        out = out + (x * c if c != 1.0 else x)
    return out


def product(*xs: torch.Tensor) -> torch.Tensor:
    """Elementwise product of all inputs, with broadcasting."""
    out = xs[0]
    for x in xs[1:]:
        out = out * x
    return out


def maximum(*xs: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum of all inputs, with broadcasting."""
    out = xs[0]
    for x in xs[1:]:
        out = torch.maximum(out, x)
    return out


def concat(*xs: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Concatenate the inputs along ``dim``."""
    return torch.cat(xs, dim=dim)


def affine(x: torch.Tensor, scale: float = 1.0, shift: float = 0.0, power: float = 1.0) -> torch.Tensor:
    """(scale * x + shift) ** power, skipping the parts that are the identity (Caffe's Power layer)."""
    if scale != 1.0:
        x = x * scale
    if shift != 0.0:
        x = x + shift
    if power != 1.0:
        x = torch.pow(x, power)
    return x


def slice_dim(x: torch.Tensor, dim: int = 0, start: int = 0, end: int = 0, step: int = 1) -> torch.Tensor:
    """``x[..., start:end:step, ...]`` along ``dim`` (Python slicing semantics)."""
    index = (slice(None),) * (dim % x.dim()) + (slice(start, end, step),)
    return x[index]


def reshape_batch(x: torch.Tensor, shape: tuple[int, ...] = ()) -> torch.Tensor:
    """Reshape every sample to ``shape``, keeping the batch dimension (so exported graphs keep a dynamic batch)."""
    return x.reshape(x.shape[0], *shape)


def resize(x: torch.Tensor, size: tuple[int, int] = (1, 1), mode: str = "nearest",
           align_corners: bool = False) -> torch.Tensor:
    """Resize the last two dims to ``size`` (nearest as torch and ONNX 'asymmetric/floor', or bilinear)."""
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode=mode, align_corners=align_corners)


def pad2d(x: torch.Tensor, pads: tuple[int, ...] = (0, 0, 0, 0), mode: str = "constant",
          value: float = 0.0) -> torch.Tensor:
    """Pad (or, with negative amounts, crop) the last two dims by (left, right, top, bottom)."""
    if mode == "constant":
        return F.pad(x, pads, value=value) if value != 0.0 else F.pad(x, pads)
    return F.pad(x, pads, mode=mode)


def lrn(x: torch.Tensor, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0,
        region: str = "across") -> torch.Tensor:
    """Local response normalisation across channels (torch/ONNX/Caffe) or within a channel (Caffe)."""
    if region == "across":
        return F.local_response_norm(x, size, alpha, beta, k)
    mean_sq = F.avg_pool2d(x * x, size, stride=1, padding=(size - 1) // 2, count_include_pad=True)
    return x / (k + alpha * mean_sq).pow(beta)
