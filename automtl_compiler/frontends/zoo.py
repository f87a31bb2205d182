"""``torchvision:NAME`` and ``timm:NAME`` backbones: library models built with random weights (nothing is
downloaded)."""

from __future__ import annotations

import difflib

from torch import nn

from ..errors import AutomtlError


def timm_model(name: str) -> nn.Module:
    """``timm.create_model(name, pretrained=False)``; pretrained weights come from a file given as weights=."""
    try:
        import timm
    except ImportError:
        raise AutomtlError(f"backbone 'timm:{name}' needs timm: pip install timm") from None
    known = timm.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; timm.list_models() lists them"
        raise AutomtlError(f"timm has no model '{name}'{hint}")
    return timm.create_model(name, pretrained=False)


def torchvision_model(name: str) -> nn.Module:
    """A torchvision classification model with random weights (nothing is downloaded)."""
    import torchvision

    try:
        return torchvision.models.get_model(name, weights=None)
    except ValueError:
        names = ", ".join(torchvision.models.list_models(module=torchvision.models))
        raise AutomtlError(f"torchvision has no model '{name}'; known models: {names}") from None
