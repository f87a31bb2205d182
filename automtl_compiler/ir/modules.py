"""Small torch modules that registry ops with tensors lower to, where no torch.nn layer fits.

Each keeps its tensors under the names the op's ``params``/``buffers`` rules give, so code generation,
tied-weight handling and checkpoints see the same keys as the IR node.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class StoredTensor(nn.Module):
    """A tensor as a value of the graph: ``value`` is a Parameter when trainable, else a buffer."""

    def __init__(self, value: torch.Tensor, trainable: bool) -> None:
        super().__init__()
        if trainable:
            self.value = nn.Parameter(value)
        else:
            self.register_buffer("value", value)

    def forward(self) -> torch.Tensor:
        return self.value


def standardised_weight(weight: torch.Tensor, eps: float, scale: float, gain: torch.Tensor | None) -> torch.Tensor:
    """(W - mean) / sqrt(var + eps) per output channel (biased variance), times ``scale`` and ``gain``.

    This is weight standardisation as NF-ResNets and BiT define it; the mean and variance run over each
    output channel's input channels and kernel window.
    """
    flat = weight.reshape(weight.shape[0], -1)
    var, mean = torch.var_mean(flat, dim=1, unbiased=False, keepdim=True)
    out = ((flat - mean) * torch.rsqrt(var + eps)).reshape_as(weight)
    if scale != 1.0:
        out = out * scale
    if gain is not None:
        out = out * gain
    return out


class StdConv2d(nn.Conv2d):
    """A conv whose weight is standardised (and optionally scaled by a learnt gain) on every call.

    The standardisation is part of the forward pass, so it trains; ``passes.fold_weights`` replaces it by a
    plain conv for inference.
    """

    def __init__(self, *args: object, eps: float, scale: float, gain: bool, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.eps = eps
        self.scale = scale
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1)) if gain else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = standardised_weight(self.weight, self.eps, self.scale, self.gain)
        return self._conv_forward(x, w, self.bias)


class LayerNormDim(nn.Module):
    """Layer norm over one dimension (``dim``): channels-first (dim 1, ConvNeXt's LayerNorm2d) or last; affine when
    ``channels`` is given."""

    def __init__(self, channels: int | None, dim: int, eps: float) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels)) if channels else None
        self.bias = nn.Parameter(torch.zeros(channels)) if channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            var, mean = torch.var_mean(x, dim=self.dim, unbiased=False, keepdim=True)
            return (x - mean) * torch.rsqrt(var + self.eps)
        rank, dim = x.dim(), self.dim % x.dim()
        if dim == rank - 1:
            return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
        to_last = [d for d in range(rank) if d != dim] + [dim]
        back = sorted(range(rank), key=to_last.__getitem__)
        y = F.layer_norm(x.permute(to_last), self.weight.shape, self.weight, self.bias, self.eps)
        return y.permute(back)


class SubsampledConv2d(nn.Conv2d):
    """A 1x1 strided convolution computed as subsampling then a stride-1 convolution: the same function.

    oneDNN's strided 1x1 weight-gradient kernel writes past its scratch buffer for channels_last inputs
    with fewer than 16 channels (oneDNN issue 6035; glibc then reports heap corruption), which a skip
    projection on the image meets; subsampling first never calls that kernel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sh, sw = self.stride
        return F.conv2d(x[:, :, ::sh, ::sw], self.weight, self.bias)
