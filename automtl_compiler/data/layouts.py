"""NYUv2 and Cityscapes in whichever layout a directory holds.

Two preprocessed versions of each circulate: MTAN's ``.npy`` archive (13-class NYUv2 at 288x384;
Cityscapes with ``label_2/7/19``) and AdaShare's JSON-indexed one, which AutoMTL's paper uses (40-class
NYUv2 from 480x640 PNGs, ``nyu_v2_3task.json``; Cityscapes ``cityscape.json``). ``dataset: {name: nyuv2,
root: DIR}`` reads either: the index file decides.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ..errors import AutomtlError
from .adashare import AdaShareCityscapes, AdaShareNYUv2
from .cityscapes import Cityscapes
from .nyuv2 import NYUv2


def _build(name: str, cls: type[Dataset], root: str | Path, split: str, tasks: Sequence[str] | None,
           options: dict[str, Any], layout: str) -> Dataset:
    accepted = [k for k in inspect.signature(cls).parameters if k not in ("root", "split", "tasks")]
    unknown = sorted(k for k in options if k not in accepted)
    if unknown:
        raise AutomtlError(f"dataset {name!r} ({layout} in {root}): bad options {unknown}; it accepts "
                           f"{', '.join(accepted)}")
    return cls(root, split=split, tasks=tasks, **options)


def nyuv2(root: str | Path, split: str = "train", tasks: Sequence[str] | None = None, **options: Any) -> Dataset:
    """NYUv2: AdaShare's layout (:class:`AdaShareNYUv2`) when ``root`` holds ``nyu_v2_3task.json``, else
    MTAN's archive (:class:`NYUv2`)."""
    if (Path(root) / "nyu_v2_3task.json").is_file():
        return _build("nyuv2", AdaShareNYUv2, root, split, tasks, options, "AdaShare's layout")
    return _build("nyuv2", NYUv2, root, split, tasks, options, "MTAN's layout")


def cityscapes(root: str | Path, split: str = "train", tasks: Sequence[str] | None = None,
               **options: Any) -> Dataset:
    """Cityscapes: AdaShare/AutoMTL's layout (:class:`AdaShareCityscapes`) when ``root`` holds
    ``cityscape.json`` (or ``options`` name an ``index_file``), else MTAN's archive (:class:`Cityscapes`)."""
    if (Path(root) / "cityscape.json").is_file() or "index_file" in options:
        return _build("cityscapes", AdaShareCityscapes, root, split, tasks, options, "AdaShare's layout")
    return _build("cityscapes", Cityscapes, root, split, tasks, options, "MTAN's layout")
