"""Batch normalisation whose statistics are those of the whole batch across processes, on CPU and GPU.

``torch.nn.SyncBatchNorm`` needs a GPU. This one all-reduces each channel's sum, sum of squares and count
with ``torch.distributed.nn.functional.all_reduce``, which is differentiable (its backward all-reduces the
gradients), so the forward and the backward are those of one batch norm over the ranks' batches together.
It is an ``nn.BatchNorm2d`` with the same state, so checkpoints are unchanged; outside a multi-process
run, or in eval mode, it is exactly ``nn.BatchNorm2d``.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn


class SyncBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` over the batches of every rank together (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        with warnings.catch_warnings():  # torch marks it deprecated; its replacement is private and not differentiable
            warnings.simplefilter("ignore", FutureWarning)
            from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        xf = x.float()
        xd = xf.double()  # sums of squares minus squared sums lose digits in float32
        count = torch.full((1,), xf.numel() // c, dtype=torch.float64, device=x.device)
        stats = torch.cat([xd.sum((0, 2, 3)), (xd * xd).sum((0, 2, 3)), count])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            stats = all_reduce(stats)
        total = stats[-1]
        mean = stats[:c] / total
        var = (stats[c:2 * c] / total - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1  # type: ignore[operator]
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                unbiased = var * total / (total - 1).clamp_min(1)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        shape = (1, c, 1, 1)
        y = (xf - mean.float().view(shape)) * torch.rsqrt(var.float().view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def synchronise_batchnorm(model: nn.Module) -> int:
    """Make every ``nn.BatchNorm2d`` of ``model`` a :class:`SyncBatchNorm2d` in place (same object, same state,
    so generated code that calls it and the state dict are unchanged); returns how many."""
    count = 0
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = SyncBatchNorm2d
            count += 1
    return count
