"""The reader of MTAN's preprocessed ``.npy`` layout, shared by NYUv2 and Cityscapes.

Layout (https://github.com/lorenmt/mtan, ``create_dataset.py``)::

    <root>/train/image/<i>.npy      [H, W, 3] float
    <root>/train/<label dir>/<i>.npy [H, W]   float class ids, -1 = no label
    <root>/train/depth/<i>.npy      [H, W, 1] float, 0 = no measurement
    <root>/train/normal/<i>.npy     [H, W, 3] float unit normals, 0 = no measurement (NYUv2 only)
    <root>/val/...                  the same for the validation split

with ``<i>`` = 0, 1, 2, ... (MTAN counts the files in ``image/`` and reads ``<i>.npy`` for i < count; here
every ``<int>.npy`` in ``image/`` is a sample, sorted numerically).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import AutomtlError, FileFormatError
from ._common import (
    Sample,
    SharedEpoch,
    check_scales,
    check_shape,
    checked_index,
    hflip,
    hwc_to_chw,
    index_files,
    labels_to_tensor,
    load_npy,
    require_dir,
    sample_rng,
    scale_crop,
)
from .synthetic import _check_tasks

MTAN_SPLITS = ("train", "val")


class MTANLayoutDataset(SharedEpoch, Dataset):
    """Common reader; subclasses set ``name``, the task -> folder map, and the depth scaling rule."""

    name = "mtan"
    folders: ClassVar[dict[str, str]] = {}
    channels: ClassVar[dict[str, int]] = {}
    depth_power = -1.0

    def __init__(self, root: str | Path, split: str = "train", tasks: Sequence[str] | None = None,
                 augment: bool | None = None, scales: Sequence[float] = (1.0, 1.2, 1.5), flip: bool = True,
                 ignore_index: int = 255, seed: int = 0) -> None:
        if split not in MTAN_SPLITS:
            raise AutomtlError(f"{self.name}: unknown split {split!r}; use one of {', '.join(MTAN_SPLITS)}")
        self.root = Path(root)
        self.split = split
        self.tasks = _check_tasks(tasks, tuple(self.folders), self.name)
        self.augment = split == "train" if augment is None else bool(augment)
        self.scales = check_scales(scales)
        self.flip = flip
        self.ignore_index = int(ignore_index)
        self.seed = int(seed)
        self.epoch = 0
        layout = self.layout()
        require_dir(self.root, layout)
        base = require_dir(self.root / split, layout)
        self.dirs = {"image": require_dir(base / "image", layout)}
        for t in self.tasks:
            self.dirs[t] = require_dir(base / self.folders[t], layout)
        self.stems = index_files(self.dirs["image"], ".npy", layout)
        for t in self.tasks:
            present = {p.name for p in self.dirs[t].iterdir()}
            for stem in self.stems:
                if f"{stem}.npy" not in present:
                    raise FileFormatError(f"{self.dirs[t] / (stem + '.npy')}: file not found (image/{stem}.npy "
                                       f"exists); expected {layout}")

    @property
    def num_classes(self) -> dict[str, int]:
        """Output channels per returned task kind (classes for segmentation)."""
        return {t: self.channels[t] for t in self.tasks}

    def layout(self) -> str:
        dirs = ", ".join(["image", *self.folders.values()])
        return (f"MTAN's preprocessed layout <root>/{{train,val}}/{{{dirs}}}/<index>.npy with images "
                f"[H, W, 3], labels [H, W], depth [H, W, 1], normals [H, W, 3]")

    def label_hint(self) -> str:
        """What to do about a label outside the class count (said in the error)."""
        return f"{self.name} has {self.channels['segment_semantic']} classes: check that root holds {self.name}"

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, index: int) -> Sample:
        i = checked_index(index, len(self.stems))
        image, targets = self.load(i)
        if self.augment:
            rng = sample_rng(self.seed, self.epoch, i)
            image, targets = scale_crop(image, targets, rng, self.scales, self.depth_power)
            if self.flip and rng.random() < 0.5:
                image, targets = hflip(image, targets)
        return image, targets

    def load(self, i: int) -> Sample:
        """Sample ``i`` as stored, converted to the package's format (no augmentation)."""
        layout = self.layout()
        stem = self.stems[i]
        path = self.dirs["image"] / f"{stem}.npy"
        img = load_npy(path, layout)
        check_shape(img, path, "[H, W, 3]", img.ndim == 3 and img.shape[2] == 3)
        hw = img.shape[:2]
        targets: dict[str, torch.Tensor] = {}
        for t in self.tasks:
            path = self.dirs[t] / f"{stem}.npy"
            arr = load_npy(path, layout)
            if t == "segment_semantic":
                check_shape(arr, path, f"[H, W] = {list(hw)} (as its image)",
                            arr.shape == hw or arr.shape == (*hw, 1))
                targets[t] = labels_to_tensor(arr.reshape(hw), path, self.channels[t], self.ignore_index,
                                              self.label_hint())
            elif t == "depth_zbuffer":
                check_shape(arr, path, f"[H, W, 1] = {[*hw, 1]} (as its image)",
                            arr.shape == (*hw, 1) or arr.shape == hw)
                d = torch.from_numpy(np.ascontiguousarray(arr.reshape(*hw, 1), dtype=np.float32))
                targets[t] = d.permute(2, 0, 1).contiguous()
            else:
                check_shape(arr, path, f"[H, W, 3] = {[*hw, 3]} (as its image)", arr.shape == (*hw, 3))
                targets[t] = hwc_to_chw(arr)
        return hwc_to_chw(img), targets
