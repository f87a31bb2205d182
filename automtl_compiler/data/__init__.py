"""Datasets and loaders for multi-task training.

Every dataset here is a map-style ``torch.utils.data.Dataset`` whose samples are
``(image [3, H, W] float32, {task kind: target})`` with the task kinds of :mod:`automtl_compiler.tasks`:
``segment_semantic`` [H, W] int64, ``depth_zbuffer`` [1, H, W] float32, ``normal`` [3, H, W] float32,
``classification`` int64 scalar. Each has ``tasks`` (the kinds it returns) and ``num_classes`` (output
channels per kind).

>>> from automtl_compiler.data import get_dataset, make_loaders
>>> train = get_dataset("synthetic", split="train", length=1000)
>>> loaders = make_loaders(train, ["segment_semantic", "depth_zbuffer", "normal"], batch_size=16)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ..errors import AutomtlError
from .cityscapes import Cityscapes
from .loaders import TaskLoaders, TaskView, collate, make_loaders
from .nyuv2 import NYUv2
from .synthetic import (
    SceneConfig,
    SyntheticScenes,
    render,
    render_scenes,
    sample_scene,
    scene_seed,
)
from .taskonomy import Taskonomy

DATASETS: dict[str, type[Dataset]] = {
    "synthetic": SyntheticScenes,
    "nyuv2": NYUv2,
    "cityscapes": Cityscapes,
    "taskonomy": Taskonomy,
}


def available_datasets() -> list[str]:
    """The registry's dataset names."""
    return sorted(DATASETS)


def get_dataset(name: str, root: str | Path | None = None, split: str = "train", **options: Any) -> Dataset:
    """A dataset by name: ``synthetic`` (rendered, no ``root``), ``nyuv2``, ``cityscapes``, ``taskonomy``
    (read from the directory ``root``). ``options`` go to the dataset's constructor (e.g. ``length``,
    ``resolution``, ``tasks``, ``augment``, ``num_classes``).

    Raises AutomtlError for an unknown name (listing the known ones), a real dataset without ``root``, a
    ``root`` for the synthetic dataset, or an option the dataset does not take; FileFormatError for a
    directory that does not hold the expected layout.
    """
    key = name.lower()
    if key not in DATASETS:
        raise AutomtlError(f"unknown dataset {name!r}; known datasets: {', '.join(available_datasets())}")
    cls = DATASETS[key]
    try:
        if key == "synthetic":
            if root is not None:
                raise AutomtlError("the synthetic dataset is rendered, not read: give no root")
            return cls(split=split, **options)
        if root is None:
            raise AutomtlError(f"dataset {name!r} is read from disk: give root=<directory> "
                               f"(see automtl_compiler.data.{cls.__module__.rsplit('.', 1)[-1]} for the layout)")
        return cls(root, split=split, **options)
    except TypeError as exc:
        raise AutomtlError(f"dataset {name!r}: bad options {sorted(options)}: {exc}") from None


__all__ = ["DATASETS", "Cityscapes", "NYUv2", "SceneConfig", "SyntheticScenes", "TaskLoaders", "TaskView",
           "Taskonomy", "available_datasets", "collate", "get_dataset", "make_loaders", "render",
           "render_scenes", "sample_scene", "scene_seed"]
