"""Small tensor functions that some registry ops lower to.

They are module-level functions (not lambdas) so that generated torch.fx code can import and call them,
and so that ``torch.onnx.export`` traces them to plain ONNX ops.
"""

from __future__ import annotations

import torch


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
