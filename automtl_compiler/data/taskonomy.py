"""Tiny Taskonomy (segmentation, normals, depth) read the way AutoMTL and AdaShare read it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import AutomtlError, FileFormatError
from ..tasks.base import nearest_resize
from ._common import (
    Sample,
    SharedEpoch,
    check_same_size,
    checked_index,
    hflip,
    load_npy,
    load_png,
    read_index_rows,
    require_dir,
    sample_rng,
    scale_pad_crop,
)
from .synthetic import _check_tasks

TASKONOMY_TASKS = ("segment_semantic", "normal", "depth_zbuffer")
TASKONOMY_SPLITS = ("train", "val", "test", "test_small")
# file-name domain of each task in Taskonomy's naming scheme (folder name = task kind)
DOMAINS = {"segment_semantic": "segmentsemantic", "normal": "normal", "depth_zbuffer": "depth_zbuffer"}
NUM_CLASSES = 17               # segmentation classes; a PNG stores class + 1, 0 = unlabelled
UNLABELLED_HIGH = 255          # an 8-bit label value also read as "no label" (the usual void value)
DEPTH_INVALID = 64500          # raw depth values >= this are "no measurement" (AutoMTL's make_depth_mask)
LAYOUT = ("Taskonomy's layout: <root>/taskonomy.json mapping each split to rows [rgb, segment_semantic, "
          "normal, depth_zbuffer, ...] of paths relative to <root> or <root>/<split dir>; or, without the "
          "JSON, <root>/<split dir>/<building>/rgb/point_<p>_view_<v>_domain_rgb.png with the labels in "
          "<building>/{segment_semantic,normal,depth_zbuffer}/..._domain_{segmentsemantic,normal,"
          "depth_zbuffer}.png")


class Taskonomy(SharedEpoch, Dataset):
    """Tiny Taskonomy in the layout AutoMTL/AdaShare read (an assumption: see below).

    **Index.** AdaShare reads ``<root>/taskonomy.json``; AutoMTL the same file from its own ``data/utils``.
    It maps a split name (``train``, ``test``, ``test_small``; ``val`` falls back to ``test``) to rows
    ``[rgb, segment_semantic, normal, depth_zbuffer, keypoints2d, edge_texture]`` of paths, relative to
    ``<root>`` (AdaShare) or to ``<root>/train`` / ``<root>/test`` (AutoMTL); both are tried, in that order.
    Without the JSON, the split directory (``train``, ``val`` or else ``test``) is scanned in Taskonomy's
    own naming scheme (the scheme AutoMTL's commented-out scanner uses)::

        <root>/<split>/<building>/rgb/point_<p>_view_<v>_domain_rgb.png
        <root>/<split>/<building>/segment_semantic/point_<p>_view_<v>_domain_segmentsemantic.png
        <root>/<split>/<building>/normal/point_<p>_view_<v>_domain_normal.png
        <root>/<split>/<building>/depth_zbuffer/point_<p>_view_<v>_domain_depth_zbuffer.png

    **Decoding**, following AutoMTL/AdaShare: every image is first resized to ``resolution`` (256x256; image
    bilinear with antialiasing, where AutoMTL uses nearest; targets nearest). ``segment_semantic``: 8-bit
    ids, ``v - 1`` for ``1 <= v <= 17`` (17 classes), ``v = 0`` (unlabelled, AutoMTL's zero-weight mask) and
    ``v = 255`` become ``ignore_index``; other values are an error naming the file. ``normal``: 8-bit RGB
    mapped to ``[-1, 1]``. ``depth_zbuffer``: 16-bit (1/512 m); ``log(1 + d) / log(2**16)`` as AutoMTL
    (``depth_units="log"``) or ``d / 512`` metres
    (``depth_units="metres"``). Pixels with raw depth ``>= 64500`` have no measurement: their depth and
    normal targets are set to 0, the package's "invalid" value (AutoMTL passes a separate mask instead).
    If ``<root>/semseg_prior_factor.npy`` exists, ``class_weights`` holds it (pass it to
    ``get_task("segment_semantic", class_weights=...)`` for AutoMTL's weighted cross-entropy).

    Every label PNG must have its RGB image's size (an error naming the file otherwise), as the resizing
    to ``resolution`` would otherwise silently misalign them.

    **Augmentation** (``augment``, default on for ``train``), as AutoMTL: random rescale in [0.5, 1.5),
    horizontal flip (normals' x negated), random crop to ``crop`` (default ``resolution``) with padding.
    """

    name = "taskonomy"

    def __init__(self, root: str | Path, split: str = "train", tasks: Sequence[str] | None = None,
                 resolution: tuple[int, int] = (256, 256), crop: tuple[int, int] | None = None,
                 augment: bool | None = None, flip: bool = True, ignore_index: int = 255,
                 depth_units: str = "log", index_file: str | Path | None = None, seed: int = 0) -> None:
        if split not in TASKONOMY_SPLITS:
            raise AutomtlError(f"taskonomy: unknown split {split!r}; use one of {', '.join(TASKONOMY_SPLITS)}")
        if depth_units not in ("log", "metres"):
            raise AutomtlError(f"taskonomy: depth_units must be 'log' or 'metres', got {depth_units!r}")
        self.root = require_dir(Path(root), LAYOUT)
        self.split = split
        self.tasks = _check_tasks(tasks, TASKONOMY_TASKS, self.name)
        self.resolution = (int(resolution[0]), int(resolution[1]))
        self.crop = self.resolution if crop is None else (int(crop[0]), int(crop[1]))
        self.augment = split == "train" if augment is None else bool(augment)
        self.flip = flip
        self.ignore_index = int(ignore_index)
        self.depth_units = depth_units
        self.seed = int(seed)
        self.epoch = 0
        self.split_dirs = [self.root / d for d in (["train"] if split == "train" else
                                                   ["val", "test"] if split == "val" else ["test"])]
        index = Path(index_file) if index_file is not None else self.root / "taskonomy.json"
        if index_file is not None or index.is_file():
            self.rows = self._rows_from_json(index)
        else:
            self.rows = self._rows_from_scan()
        if not self.rows:
            raise FileFormatError(f"{self.root}: no samples for split {split!r}; expected {LAYOUT}")
        weights = self.root / "semseg_prior_factor.npy"
        self.class_weights = (torch.from_numpy(load_npy(weights, "a [17] float array").astype(np.float32))
                              if weights.is_file() else None)
        self._check_row(0)

    # --- index ---
    def _rows_from_json(self, path: Path) -> list[tuple[str, ...]]:
        keys = [self.split] + (["test"] if self.split == "val" else [])
        return read_index_rows(path, keys, ("rgb", *TASKONOMY_TASKS), self.split, LAYOUT)

    def _rows_from_scan(self) -> list[tuple[str, ...]]:
        base = next((d for d in self.split_dirs if d.is_dir()), None)
        if base is None:
            raise FileFormatError(f"{self.split_dirs[0]}: directory not found (and no {self.root / 'taskonomy.json'}); "
                                  f"expected {LAYOUT}")
        rows = []
        for building in sorted(p for p in base.iterdir() if p.is_dir()):
            rgb_dir = building / "rgb"
            if not rgb_dir.is_dir():
                continue
            for f in sorted(rgb_dir.glob("*_rgb.png")):
                stem = f.name[: -len("rgb.png")]
                rel = f.relative_to(self.root).as_posix()
                labels = [(building / t / f"{stem}{DOMAINS[t]}.png").relative_to(self.root).as_posix()
                          for t in ("segment_semantic", "normal", "depth_zbuffer")]
                rows.append((rel, *labels))
        return rows

    def _resolve(self, rel: str) -> Path:
        for base in [self.root, *self.split_dirs]:
            p = base / rel
            if p.is_file():
                return p
        raise FileFormatError(f"{self.root / rel}: file not found (also looked under "
                              f"{', '.join(str(d) for d in self.split_dirs)}); expected {LAYOUT}")

    def _check_row(self, i: int) -> None:
        self._resolve(self.rows[i][0])
        for t in self.tasks:
            self._resolve(self.rows[i][1 + TASKONOMY_TASKS.index(t)])

    # --- samples ---
    @property
    def num_classes(self) -> dict[str, int]:
        out = {"segment_semantic": NUM_CLASSES, "normal": 3, "depth_zbuffer": 1}
        return {t: out[t] for t in self.tasks}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Sample:
        i = checked_index(index, len(self.rows))
        image, targets = self.load(i)
        if self.augment:
            rng = sample_rng(self.seed, self.epoch, i)
            image, targets = scale_pad_crop(image, targets, rng, self.crop, self.ignore_index)
            if self.flip and rng.random() < 0.5:
                image, targets = hflip(image, targets)
        return image, targets

    def load(self, i: int) -> Sample:
        """Sample ``i`` decoded and resized to ``resolution`` (no augmentation)."""
        row = self.rows[i]
        size = self.resolution
        rgb_path = self._resolve(row[0])
        rgb = load_png(rgb_path, "an 8-bit RGB PNG")
        if rgb.ndim != 3 or rgb.shape[2] < 3:
            raise FileFormatError(f"{rgb_path}: image of shape {rgb.shape}, expected an RGB image [H, W, 3]")
        hw = rgb.shape[:2]
        image = torch.from_numpy(np.ascontiguousarray(rgb[..., :3], dtype=np.float32) / 255.0).permute(2, 0, 1)
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
        image = image.clamp(0, 1)
        targets: dict[str, torch.Tensor] = {}
        need_depth = "depth_zbuffer" in self.tasks or "normal" in self.tasks
        valid = None
        if need_depth:
            path = self._resolve(row[3])
            raw = load_png(path, "a 16-bit depth PNG")
            if raw.ndim != 2:
                raise FileFormatError(f"{path}: depth image of shape {raw.shape}, expected one channel [H, W]")
            check_same_size(path, raw.shape, rgb_path, hw)
            d = nearest_resize(torch.from_numpy(raw.astype(np.float64)), size)
            valid = d < DEPTH_INVALID
            if "depth_zbuffer" in self.tasks:
                val = torch.log1p(d) / math.log(2.0 ** 16) if self.depth_units == "log" else d / 512.0
                targets["depth_zbuffer"] = torch.where(valid, val, 0.0).float().unsqueeze(0)
        if "segment_semantic" in self.tasks:
            path = self._resolve(row[1])
            seg = load_png(path, "an 8-bit label PNG")
            if seg.ndim != 2:
                raise FileFormatError(f"{path}: label image of shape {seg.shape}, expected one channel [H, W]")
            check_same_size(path, seg.shape, rgb_path, hw)
            bad = (seg > NUM_CLASSES) & (seg != UNLABELLED_HIGH)
            if bad.any():
                raise FileFormatError(f"{path}: label value {int(seg[bad].max())} is outside Taskonomy's {NUM_CLASSES} "
                                      f"classes (stored as 1..{NUM_CLASSES}; 0 and {UNLABELLED_HIGH} mean no label); "
                                      "check that the file is a segmentsemantic PNG")
            lab = nearest_resize(torch.from_numpy(seg.astype(np.int64)), size)
            labelled = (lab > 0) & (lab != UNLABELLED_HIGH)
            targets["segment_semantic"] = torch.where(labelled, lab - 1, self.ignore_index)
        if "normal" in self.tasks:
            path = self._resolve(row[2])
            nrm = load_png(path, "an 8-bit RGB normal PNG")
            if nrm.ndim != 3 or nrm.shape[2] < 3:
                raise FileFormatError(f"{path}: normal image of shape {nrm.shape}, expected RGB [H, W, 3]")
            check_same_size(path, nrm.shape[:2], rgb_path, hw)
            n = torch.from_numpy(np.ascontiguousarray(nrm[..., :3], dtype=np.float32)).permute(2, 0, 1)
            n = nearest_resize(n, size) / 255.0 * 2.0 - 1.0
            targets["normal"] = torch.where(valid.unsqueeze(0), n, 0.0)
        return image, {t: targets[t] for t in self.tasks}
