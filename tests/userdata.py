"""A user's own dataset classes, as a config names them: ``dataset: {name: tests.userdata:ToyDataset}``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

SPLIT_CODES = {"train": 0, "val": 1, "policy": 2}


class ToyDataset(Dataset):
    """Deterministic random multi-task samples, built as ``ToyDataset(root=..., split=..., tasks=..., **options)``.

    ``tasks`` maps task names to kinds (what :func:`automtl_compiler.data.get_dataset` passes; default
    ``{"segment_semantic": "segment_semantic", "depth_zbuffer": "depth_zbuffer"}``). Targets per kind:
    ``segment_semantic`` [H, W] int64 in ``0..num_classes-1``, ``depth_zbuffer`` [1, H, W] positive
    float32, ``normal`` [3, H, W] unit float32, ``classification`` int64 scalar, any other kind [1, H, W]
    float32. ``root`` is optional; when given it must be an existing directory (FileNotFoundError
    otherwise, as a real reader would raise). Sample ``i`` depends only on ``(seed, split, i)``.
    """

    def __init__(self, root: str | Path | None = None, split: str = "train", tasks: Mapping[str, str] | None = None,
                 length: int = 8, hw: tuple[int, int] = (16, 16), num_classes: int = 3, seed: int = 0) -> None:
        if root is not None and not Path(root).is_dir():
            raise FileNotFoundError(f"no directory {root}")
        if split not in SPLIT_CODES:
            raise ValueError(f"unknown split {split!r}")
        self.root, self.split = root, split
        self.task_kinds = dict(tasks or {"segment_semantic": "segment_semantic", "depth_zbuffer": "depth_zbuffer"})
        self.tasks = tuple(self.task_kinds)
        self.length, self.hw, self.classes, self.seed = int(length), (int(hw[0]), int(hw[1])), int(num_classes), seed

    @property
    def num_classes(self) -> dict[str, int | None]:
        """Output channels per task (``None`` for custom kinds)."""
        fixed = {"segment_semantic": self.classes, "classification": self.classes, "depth_zbuffer": 1, "normal": 3}
        return {name: fixed.get(kind) for name, kind in self.task_kinds.items()}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, SPLIT_CODES[self.split], index])
        h, w = self.hw
        image = torch.from_numpy(rng.random((3, h, w), dtype=np.float32))
        targets: dict[str, torch.Tensor] = {}
        for name, kind in self.task_kinds.items():
            if kind == "segment_semantic":
                targets[name] = torch.from_numpy(rng.integers(0, self.classes, (h, w)))
            elif kind == "depth_zbuffer":
                targets[name] = torch.from_numpy(rng.uniform(0.5, 5.0, (1, h, w)).astype(np.float32))
            elif kind == "normal":
                n = rng.normal(size=(3, h, w)).astype(np.float32)
                targets[name] = torch.from_numpy(n / np.linalg.norm(n, axis=0, keepdims=True))
            elif kind == "classification":
                targets[name] = torch.tensor(int(rng.integers(0, self.classes)))
            else:
                targets[name] = torch.from_numpy(rng.normal(size=(1, h, w)).astype(np.float32))
        return image, targets


def toy_factory(split: str = "train", length: int = 4) -> ToyDataset:
    """A factory function instead of a class (``tests.userdata:toy_factory``): no root, no tasks parameter."""
    return ToyDataset(split=split, length=length)


def not_a_dataset_factory(split: str = "train") -> list[int]:
    """A factory that returns something other than a Dataset."""
    return [1, 2, 3]


class NotADataset:
    """A class that is not a ``torch.utils.data.Dataset``."""

    def __init__(self, split: str = "train") -> None:
        self.split = split
