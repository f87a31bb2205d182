"""The arithmetic a training step runs in, chosen per device.

``precision: auto`` (the default) picks the fastest setting that keeps accuracy (see the README's
performance section for the measurements): bf16 autocast where the hardware computes in bf16 natively (a
CUDA GPU that supports it; a CPU with AVX-512 BF16 or AMX), fp16 autocast with loss scaling on other CUDA
GPUs when the gradient scheduler allows it, fp32 otherwise. Weights, optimiser state, losses and
evaluation stay in fp32 whatever the choice: autocast only lowers the forward's matrix work and what it
keeps for the backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import AutomtlError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")

#: CPU flags that mean native bf16 arithmetic (x86: AVX-512 BF16 dot products, AMX tiles; Arm: BF16 extension).
_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


@dataclass(frozen=True)
class Precision:
    """A resolved precision: ``dtype`` is the autocast dtype (None: fp32, no autocast); ``loss_scaling``
    says whether losses are scaled (fp16); ``reason`` says why ``auto`` chose it."""

    name: str
    dtype: torch.dtype | None
    loss_scaling: bool
    reason: str

    def autocast(self, device: torch.device) -> torch.autocast:
        """The autocast context of a forward pass in this precision (disabled for fp32)."""
        return torch.autocast(device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)


#: fp32 arithmetic throughout (no autocast, no loss scaling), as asked for.
FP32 = Precision("fp32", None, False, "asked for")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (Linux' /proc/cpuinfo ``flags``/``Features`` lines; empty elsewhere)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def cpu_has_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether the CPU computes bf16 natively (emulated bf16 on older CPUs is slower than fp32)."""
    return any(f in cpu_flags(cpuinfo) for f in _BF16_FLAGS)


def resolve_precision(requested: str, device: torch.device, scales_losses: bool,
                      cpuinfo: str | Path = "/proc/cpuinfo") -> Precision:
    """The precision ``requested`` (one of :data:`PRECISIONS`) means on ``device``. ``scales_losses``: the
    gradient scheduler gives the same update when every loss is multiplied by one factor (fp16 needs it);
    an explicit request the device or scheduler cannot honour is an error naming the key."""
    if requested not in PRECISIONS:
        raise AutomtlError(f"config: 'precision' is {requested!r}; use one of {', '.join(PRECISIONS)}")
    cuda = device.type == "cuda"
    bf16_ok = torch.cuda.is_bf16_supported() if cuda else cpu_has_native_bf16(cpuinfo)
    if requested == "fp32":
        return FP32
    if requested == "bf16":
        return Precision("bf16", torch.bfloat16, False, "asked for" if bf16_ok else
                         "asked for (this device emulates bf16, which is slower than fp32)")
    if requested == "fp16":
        if not scales_losses:
            raise AutomtlError("config: 'precision: fp16' scales the losses to keep small gradients, and this "
                               "gradient scheduler does not give the same update for scaled losses; use "
                               "precision bf16 or fp32 with it")
        return Precision("fp16", torch.float16, True, "asked for")
    if bf16_ok:
        where = "the GPU" if cuda else "the CPU (AVX-512 BF16 / AMX)"
        return Precision("bf16", torch.bfloat16, False, f"auto: {where} computes bf16 natively")
    if cuda and scales_losses:
        return Precision("fp16", torch.float16, True, "auto: the GPU has fp16 but not bf16")
    if cuda:
        return Precision("fp32", None, False, "auto: the GPU lacks bf16 and the scheduler cannot take fp16's "
                                              "loss scaling")
    return Precision("fp32", None, False, "auto: the CPU has no native bf16")
