"""Task heads: DeepLab ASPP for pixel tasks (as AutoMTL uses it) and a classification head.

Any ``nn.Module`` that takes the backbone's feature map can serve as a head; these two are the defaults.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ASPPHead(nn.Module):
    """Atrous spatial pyramid pooling head (DeepLab-v2 style, as in AutoMTL/AdaShare).

    For each rate r: Conv3x3(C -> hidden, padding r, dilation r) -> ReLU -> Dropout(0.5) ->
    Conv1x1(hidden -> hidden) -> ReLU -> Dropout(0.5) -> Conv1x1(hidden -> K); the branch outputs are
    summed. ``hidden=1024`` reproduces AutoMTL (about 23 M parameters on a 512-channel feature); smaller
    values suit CPU work. The output is at the feature resolution unless ``upsample_to_input`` is set, in
    which case ``forward`` takes the input size (bilinear, align_corners=False).
    """

    def __init__(self, in_channels: int, num_classes: int, hidden: int = 1024,
                 rates: Sequence[int] = (6, 12, 18, 24), dropout: float = 0.5,
                 upsample_to_input: bool = False) -> None:
        super().__init__()
        if in_channels <= 0 or num_classes <= 0 or hidden <= 0 or not rates:
            raise ValueError("ASPPHead needs positive in_channels, num_classes, hidden and at least one rate")
        self.upsample_to_input = upsample_to_input
        self.spec = {"type": "aspp", "in_channels": in_channels, "num_classes": num_classes, "hidden": hidden,
                     "rates": list(rates), "dropout": dropout, "upsample_to_input": upsample_to_input}
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=r, dilation=r), nn.ReLU(),
                          nn.Dropout(dropout), nn.Conv2d(hidden, hidden, 1), nn.ReLU(), nn.Dropout(dropout),
                          nn.Conv2d(hidden, num_classes, 1))
            for r in rates)

    def forward(self, x: torch.Tensor, input_size: Sequence[int] | None = None) -> torch.Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        if self.upsample_to_input and input_size is not None:
            out = F.interpolate(out, size=tuple(input_size), mode="bilinear", align_corners=False)
        return out


class ClassificationHead(nn.Module):
    """Global average pooling followed by a linear classifier, for image-level tasks."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        if in_channels <= 0 or num_classes <= 0:
            raise ValueError("ClassificationHead needs positive in_channels and num_classes")
        self.spec = {"type": "cls", "in_channels": in_channels, "num_classes": num_classes}
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def apply_head(head: nn.Module, feature: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Run ``head`` on ``feature``; heads that upsample to the input get the input's spatial size."""
    if getattr(head, "upsample_to_input", False):
        return head(feature, input_size=x.shape[-2:])
    return head(feature)


def head_spec(head: nn.Module) -> dict:
    """The JSON spec of a head: its constructor arguments for built-in heads, its class for custom ones."""
    spec = getattr(head, "spec", None)
    return dict(spec) if spec else {"type": "custom", "class": f"{type(head).__module__}.{type(head).__qualname__}"}


def build_heads(specs: dict[str, dict], given: dict[str, nn.Module] | None, where: str) -> dict[str, nn.Module]:
    """Heads from their specs; ``given`` overrides by task and must supply every custom head."""
    from ..errors import AutomtlError

    heads: dict[str, nn.Module] = {}
    for task, spec in specs.items():
        if given and task in given:
            heads[task] = given[task]
        elif spec.get("type") == "custom":
            raise AutomtlError(f"{where}: task '{task}' has a custom head ({spec.get('class')}); pass it as "
                               f"heads={{'{task}': module}} to load")
        else:
            heads[task] = make_head(spec)
    return heads


def make_head(spec: dict) -> nn.Module:
    """Build a head from its JSON spec (``{"type": "aspp" | "cls", ...constructor arguments}``)."""
    from ..errors import AutomtlError

    kinds = {"aspp": ASPPHead, "cls": ClassificationHead}
    args = {k: v for k, v in spec.items() if k != "type"}
    if spec.get("type") not in kinds:
        raise AutomtlError(f"unknown head type {spec.get('type')!r}; use one of {sorted(kinds)}")
    try:
        return kinds[spec["type"]](**args)
    except (TypeError, ValueError) as e:
        raise AutomtlError(f"bad {spec['type']} head spec {args}: {e}") from None
