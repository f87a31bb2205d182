"""A user's own multi-task data in a plain folder layout: one image folder, one folder of targets per task.

Layout, either split sub-folders::

    <root>/<split>/image/<stem>.{png,jpg,jpeg}
    <root>/<split>/<task name>/<stem>.{png,npy}
    <root>/<split>/<task name>.csv              classification tasks: lines "<stem>,<class id>"

or one flat set of folders with a list file per split (one stem per line; ``#`` starts a comment)::

    <root>/image/<stem>.{png,jpg,jpeg}
    <root>/<task name>/<stem>.{png,npy}
    <root>/<task name>.csv
    <root>/train.txt, <root>/val.txt            (other names: option split_files={"train": ..., "val": ...})

See :class:`FolderDataset` for the per-kind file formats.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import AutomtlError, FileFormatError
from ..tasks import ALIASES, TASK_TYPES
from ..tasks.base import nearest_resize
from ._common import (
    Sample,
    SharedEpoch,
    check_same_size,
    checked_index,
    hflip,
    labels_to_tensor,
    load_npy,
    natural_key,
    read_image,
    require_dir,
    sample_rng,
)

IMAGE_EXTS = (".png", ".jpg", ".jpeg")
TARGET_EXTS = (".png", ".npy")
SPATIAL_KINDS = ("segment_semantic", "depth_zbuffer", "normal")
CLASS_KINDS = ("segment_semantic", "classification")
LAYOUT = ("the folder layout <root>/<split>/image/<stem>.{png,jpg,jpeg} with <root>/<split>/<task>/<stem>.{png,npy} "
          "(and <root>/<split>/<task>.csv for classification), or <root>/image/, <root>/<task>/ with list files "
          "<root>/train.txt, <root>/val.txt")
_STEM_OK = re.compile(r"[^/\\]+")


def _kind_of(name: str, kind: Any) -> str:
    if not isinstance(name, str) or not isinstance(kind, str) or not name or not kind:
        raise AutomtlError(f"folder dataset: tasks must map task names to kinds (strings), got {name!r}: {kind!r}")
    if name == "image" or not _STEM_OK.fullmatch(name) or name in (".", ".."):
        raise AutomtlError(f"folder dataset: {name!r} cannot be a task name (it names the target folder; "
                           "'image' is the images' folder)")
    return ALIASES.get(kind, kind)


def _list_dir(folder: Path, exts: Sequence[str]) -> dict[str, Path]:
    """``stem -> file`` for the files of ``folder`` with one of ``exts`` (case-insensitive); one file a stem."""
    out: dict[str, Path] = {}
    for p in folder.iterdir():
        ext = p.suffix.lower()
        if ext not in exts or not p.is_file():
            continue
        if p.stem in out:
            raise FileFormatError(f"{p}: and {out[p.stem].name} both hold sample {p.stem!r}; keep one of them")
        out[p.stem] = p
    return out


class FolderDataset(SharedEpoch, Dataset):
    """A user's own multi-task data: images plus one folder (or CSV) of targets per task.

    **Layout.** ``<root>/<split>/image/`` and ``<root>/<split>/<task name>/`` when ``<root>/<split>/`` exists
    (any split name: ``train``, ``val``, ...); otherwise flat ``<root>/image/``, ``<root>/<task name>/`` with
    the split's stems listed in ``<root>/<split>.txt`` (or in the file ``split_files[split]``, relative to
    ``root``): one stem per line, blank lines and ``#`` comments ignored. Samples are the images of the split
    in natural order (``2`` before ``10``) for sub-folders, in list order for list files. Every image needs
    a target file for every task (checked at construction: a missing one is an error naming it).

    **Images**: ``<stem>.png``/``.jpg``/``.jpeg``, 8-bit RGB or greyscale (converted to RGB), returned as
    [3, H, W] float32 in [0, 1]. Images of 16 bits per channel are rejected.

    **Targets**, by task kind (``tasks`` maps task name -> kind; a name is also its folder's name):

    - ``segment_semantic``: ``<stem>.png``, single-channel 8- or 16-bit, or a palette PNG whose palette
      *index* is the class id; or ``<stem>.npy``, an integer array [H, W]. Returned [H, W] int64. Negative
      values and ``ignore_index`` (default 255) mean "no label"; with ``num_classes`` known, any other
      value ``>= num_classes`` is an error naming the file.
    - ``depth_zbuffer``: ``<stem>.png``, 16-bit single-channel, divided by ``depth_scale`` (default 1000:
      millimetres -> metres); or ``<stem>.npy`` float [H, W] / [H, W, 1], taken as stored. 0 means no
      measurement (non-finite values are set to 0). Returned [1, H, W] float32.
    - ``normal``: ``<stem>.png``, 8-bit RGB mapped from [0, 255] to [-1, 1] (``v / 255 * 2 - 1``), a black
      pixel (0, 0, 0) meaning no measurement (returned as the zero vector); or ``<stem>.npy`` float
      [H, W, 3] or [3, H, W] as stored (0 = no measurement). Returned [3, H, W] float32, x right, y down.
    - ``classification``: no folder; ``<root>/<split>/<task name>.csv`` (flat layout: ``<root>/<task
      name>.csv``) with lines ``<stem>,<class id>`` (an optional header line, ``#`` comments). Returned as
      an int64 scalar.
    - any other kind (the user's own): ``<stem>.npy``, returned as a float32 tensor of the stored shape.

    Every [H, W] target must have its image's size (an error naming the file otherwise).

    **Options.** ``resolution`` (height, width) resizes every sample (image bilinear with antialiasing,
    targets nearest); without it all samples must already have one size to be batched. ``augment``
    (default: on for ``train``) flips left-right with probability 1/2 (normals' x negated), drawn from
    ``(seed, epoch, index)``; call :meth:`set_epoch` each epoch. ``num_classes``: an int (every segmentation
    and classification task) or ``{task name: classes}``; unknown counts are ``None`` in :attr:`num_classes`
    and must then be given to the trainer (``tasks.<name>.channels``).
    """

    name = "folder"

    def __init__(self, root: str | Path, split: str = "train", tasks: Mapping[str, str] | Sequence[str] | None = None,
                 resolution: Sequence[int] | None = None, augment: bool | None = None,
                 num_classes: int | Mapping[str, int] | None = None, ignore_index: int = 255,
                 depth_scale: float = 1000.0, split_files: Mapping[str, str | Path] | None = None,
                 seed: int = 0) -> None:
        if not isinstance(split, str) or not _STEM_OK.fullmatch(split) or split in (".", ".."):
            raise AutomtlError(f"folder dataset: bad split name {split!r}; use a folder name such as 'train'")
        self.root = require_dir(Path(root), LAYOUT)
        self.split = split
        self.resolution = self._check_resolution(resolution)
        self.augment = split == "train" if augment is None else bool(augment)
        self.ignore_index = int(ignore_index)
        if not depth_scale or not np.isfinite(depth_scale) or depth_scale <= 0:
            raise AutomtlError(f"folder dataset: depth_scale must be a positive number, got {depth_scale!r}")
        self.depth_scale = float(depth_scale)
        self.seed = int(seed)
        self.epoch = 0

        self.base, list_file = self._find_split(split_files)
        image_dir = require_dir(self.base / "image", LAYOUT)
        self.task_kinds = self._tasks(tasks)
        self.tasks = tuple(self.task_kinds)
        self._classes = self._class_counts(num_classes)

        images = _list_dir(image_dir, IMAGE_EXTS)
        self.stems = self._read_list(list_file, images, image_dir) if list_file else sorted(images, key=natural_key)
        if not self.stems:
            where = list_file if list_file else image_dir
            raise FileFormatError(f"{where}: no samples (images are <stem>.png/.jpg/.jpeg); expected {LAYOUT}")
        self.images = [images[s] for s in self.stems]
        self.targets: dict[str, list[Path]] = {}
        self.class_ids: dict[str, list[int]] = {}
        for name, kind in self.task_kinds.items():
            if kind == "classification":
                self.class_ids[name] = self._read_csv(self.base / f"{name}.csv", name)
            else:
                self.targets[name] = self._index_targets(name, kind)

    # --- construction ---
    @staticmethod
    def _check_resolution(resolution: Sequence[int] | None) -> tuple[int, int] | None:
        if resolution is None:
            return None
        try:
            h, w = (int(v) for v in resolution)
        except (TypeError, ValueError):
            raise AutomtlError(f"folder dataset: resolution must be [height, width], got {resolution!r}") from None
        if h < 1 or w < 1:
            raise AutomtlError(f"folder dataset: resolution must be positive, got {list(resolution)}")
        return h, w

    def _find_split(self, split_files: Mapping[str, str | Path] | None) -> tuple[Path, Path | None]:
        """The folder holding ``image/`` and the task folders, and the split's list file (flat layout)."""
        if split_files is not None:
            if not isinstance(split_files, Mapping):
                raise AutomtlError(f"folder dataset: split_files must map split names to list files, got "
                                   f"{split_files!r}")
            if self.split not in split_files:
                raise AutomtlError(f"folder dataset: split_files names no list file for split {self.split!r} "
                                   f"(it has {', '.join(map(str, split_files)) or 'none'})")
            list_file = self.root / split_files[self.split]
            if not list_file.is_file():
                raise FileFormatError(f"{list_file}: list file of split {self.split!r} not found (from split_files)")
            return self.root, list_file
        if (self.root / self.split).is_dir():
            return self.root / self.split, None
        list_file = self.root / f"{self.split}.txt"
        if list_file.is_file():
            return self.root, list_file
        present = sorted(p.name for p in self.root.iterdir() if p.is_dir() or p.suffix == ".txt")
        raise FileFormatError(f"{self.root}: no {self.split}/ folder and no {self.split}.txt list file for split "
                              f"{self.split!r} (found {', '.join(present) or 'nothing'}); expected {LAYOUT}")

    def _tasks(self, tasks: Mapping[str, str] | Sequence[str] | None) -> dict[str, str]:
        if tasks is None:
            found = {p.name: ALIASES.get(p.name, p.name) for p in sorted(self.base.iterdir())
                     if p.is_dir() and ALIASES.get(p.name, p.name) in SPATIAL_KINDS}
            found.update({p.stem: "classification" for p in sorted(self.base.glob("*.csv"))
                          if ALIASES.get(p.stem, p.stem) == "classification"})
            if not found:
                raise FileFormatError(f"{self.base}: no target folder named after a task kind "
                                      f"({', '.join(SPATIAL_KINDS)}) and no classification.csv; name the tasks "
                                      "with the tasks option ({name: kind})")
            return found
        if isinstance(tasks, str):
            tasks = [tasks]
        pairs = tasks.items() if isinstance(tasks, Mapping) else ((t, t) for t in tasks)
        out = {name: _kind_of(name, kind) for name, kind in pairs}
        if not out:
            raise AutomtlError("folder dataset: tasks is empty; name at least one task")
        return out

    def _class_counts(self, num_classes: int | Mapping[str, int] | None) -> dict[str, int | None]:
        given: dict[str, Any]
        if num_classes is None:
            given = {}
        elif isinstance(num_classes, Mapping):
            unknown = [k for k in num_classes if k not in self.task_kinds]
            if unknown:
                raise AutomtlError(f"folder dataset: num_classes names unknown task(s) {', '.join(map(str, unknown))}"
                                   f"; the tasks are {', '.join(self.tasks)}")
            given = dict(num_classes)
        else:
            given = {t: num_classes for t, k in self.task_kinds.items() if k in CLASS_KINDS}
        out: dict[str, int | None] = {}
        for t, k in self.task_kinds.items():
            n = given.get(t)
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
                raise AutomtlError(f"folder dataset: num_classes of task {t!r} must be a positive integer, got {n!r}")
            out[t] = {"depth_zbuffer": 1, "normal": 3}.get(k, n)
        return out

    def _read_list(self, list_file: Path, images: dict[str, Path], image_dir: Path) -> list[str]:
        try:
            lines = list_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise FileFormatError(f"{list_file}: unreadable list file ({exc}); expected one stem per line") from None
        stems: list[str] = []
        seen: dict[str, int] = {}
        for no, line in enumerate(lines, 1):
            stem = line.split("#", 1)[0].strip()
            if not stem:
                continue
            if stem not in images and Path(stem).suffix.lower() in IMAGE_EXTS and Path(stem).stem in images:
                stem = Path(stem).stem
            if stem not in images:
                raise FileFormatError(f"{list_file}:{no}: no image {stem!r} in {image_dir} (looked for "
                                      f"{stem}.png, .jpg, .jpeg); remove the line or add the image")
            if stem in seen:
                raise FileFormatError(f"{list_file}:{no}: {stem!r} is listed twice (also on line {seen[stem]})")
            seen[stem] = no
            stems.append(stem)
        return stems

    def _index_targets(self, name: str, kind: str) -> list[Path]:
        folder = require_dir(self.base / name, f"<stem>.png or <stem>.npy targets of task {name!r}; {LAYOUT}")
        files = _list_dir(folder, TARGET_EXTS)
        out = []
        for stem, image in zip(self.stems, self.images):
            path = files.get(stem)
            if path is None:
                raise FileFormatError(f"{folder / stem}.png: file not found (nor {stem}.npy): image {image} needs a "
                                      f"target for task {name!r}; add it or leave the image out")
            if kind not in SPATIAL_KINDS and path.suffix.lower() != ".npy":
                known = ", ".join(sorted(TASK_TYPES))
                raise FileFormatError(f"{path}: task {name!r} has kind {kind!r}, not a built-in kind ({known}), so "
                                      "its targets must be .npy arrays; check the kind's spelling")
            out.append(path)
        return out

    def _read_csv(self, path: Path, name: str) -> list[int]:
        if not path.is_file():
            raise FileFormatError(f"{path}: file not found; classification task {name!r} reads its labels from "
                                  "<task>.csv with lines '<stem>,<class id>'")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise FileFormatError(f"{path}: unreadable ({exc}); expected lines '<stem>,<class id>'") from None
        labels: dict[str, int] = {}
        first = True
        for no, row in enumerate(csv.reader(text.splitlines()), 1):
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            cells = [c.strip() for c in row]
            is_int = len(cells) == 2 and re.fullmatch(r"[+-]?\d+", cells[1]) is not None
            if first and len(cells) == 2 and not is_int:
                first = False
                continue                                    # a header line such as "stem,label"
            first = False
            if not is_int:
                raise FileFormatError(f"{path}:{no}: expected '<stem>,<class id>' (an integer id), got {','.join(row)!r}")
            stem, value = cells[0], int(cells[1])
            n = self._classes[name]
            if value < 0:
                raise FileFormatError(f"{path}:{no}: class id {value} is negative; class ids count from 0")
            if n is not None and value >= n:
                raise FileFormatError(f"{path}:{no}: class id {value} is outside the {n} classes 0..{n - 1} of task "
                                      f"{name!r}; fix the file or the num_classes option")
            if stem in labels and labels[stem] != value:
                raise FileFormatError(f"{path}:{no}: {stem!r} has two class ids ({labels[stem]} and {value})")
            labels[stem] = value
        missing = [s for s in self.stems if s not in labels]
        if missing:
            raise FileFormatError(f"{path}: no class id for {len(missing)} image(s) of split {self.split!r}, e.g. "
                                  f"{missing[0]!r}; add a line '{missing[0]},<class id>'")
        return [labels[s] for s in self.stems]

    # --- samples ---
    @property
    def num_classes(self) -> dict[str, int | None]:
        """Output channels per task: 1 for depth, 3 for normals, classes for segmentation/classification
        when given by the ``num_classes`` option (else ``None``), ``None`` for other kinds."""
        return dict(self._classes)

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, index: int) -> Sample:
        i = checked_index(index, len(self.stems))
        image, targets = self.load(i)
        if self.augment and sample_rng(self.seed, self.epoch, i).random() < 0.5:
            hw = tuple(image.shape[-2:])
            spatial = {k: v for k, v in targets.items() if v.dim() >= 2 and tuple(v.shape[-2:]) == hw}
            normals = [k for k in spatial if self.task_kinds[k] == "normal"]
            image, flipped = hflip(image, spatial, normals)
            targets = {k: flipped.get(k, v) for k, v in targets.items()}
        return image, targets

    def load(self, i: int) -> Sample:
        """Sample ``i`` decoded (and resized to ``resolution``), without augmentation."""
        image_path = self.images[i]
        rgb, _ = read_image(image_path, "an 8-bit RGB or greyscale image", rgb=True)
        hw = rgb.shape[:2]
        image = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)
        targets: dict[str, torch.Tensor] = {}
        for name, kind in self.task_kinds.items():
            if kind == "classification":
                targets[name] = torch.tensor(self.class_ids[name][i], dtype=torch.int64)
                continue
            path = self.targets[name][i]
            if kind == "segment_semantic":
                targets[name] = self._labels(path, name, image_path, hw)
            elif kind == "depth_zbuffer":
                targets[name] = self._depth(path, image_path, hw)
            elif kind == "normal":
                targets[name] = self._normal(path, image_path, hw)
            else:
                arr = load_npy(path, f"a numeric .npy array (task {name!r})")
                targets[name] = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        if self.resolution is not None and tuple(hw) != self.resolution:
            image = F.interpolate(image[None], size=self.resolution, mode="bilinear", align_corners=False,
                                  antialias=True)[0].clamp(0, 1)
            targets = {k: nearest_resize(v, self.resolution) if v.dim() >= 2 and tuple(v.shape[-2:]) == tuple(hw)
                       else v for k, v in targets.items()}
        return image, targets

    @staticmethod
    def _plane(arr: np.ndarray, path: Path, what: str) -> np.ndarray:
        """A single-channel [H, W] view of ``arr`` stored as [H, W], [H, W, 1] or [1, H, W]."""
        if arr.ndim == 3 and arr.shape[2] == 1:
            return arr[..., 0]
        if arr.ndim == 3 and arr.shape[0] == 1:
            return arr[0]
        if arr.ndim != 2:
            raise FileFormatError(f"{path}: array of shape {arr.shape}; expected {what}")
        return arr

    def _labels(self, path: Path, name: str, image_path: Path, hw: tuple[int, ...]) -> torch.Tensor:
        what = "class ids as a single-channel 8/16-bit PNG, a palette PNG or an integer .npy [H, W]"
        if path.suffix.lower() == ".png":
            arr, mode = read_image(path, what, palette_to_rgb=False)
            if arr.ndim != 2:
                raise FileFormatError(f"{path}: a {mode} label image with {arr.shape[2]} channels; save class ids "
                                      "as a single-channel (8- or 16-bit) or palette PNG")
        else:
            arr = self._plane(load_npy(path, what), path, "[H, W] integer class ids")
        check_same_size(path, arr.shape, image_path, hw)
        n = self._classes[name]
        hint = f"fix the file or the num_classes of task {name!r}" if n is not None else ""
        return labels_to_tensor(arr, path, n, self.ignore_index, hint)

    def _depth(self, path: Path, image_path: Path, hw: tuple[int, ...]) -> torch.Tensor:
        what = "depth as a 16-bit single-channel PNG or a float .npy [H, W]"
        if path.suffix.lower() == ".png":
            arr, mode = read_image(path, what, palette_to_rgb=False)
            if arr.ndim != 2 or arr.dtype == np.uint8 or arr.dtype == np.bool_:
                raise FileFormatError(f"{path}: a {mode} image with {arr.dtype} values; depth PNGs must be 16-bit "
                                      f"single-channel (value / depth_scale = metres), or save a float .npy")
            depth = arr.astype(np.float32) / np.float32(self.depth_scale)
        else:
            depth = self._plane(load_npy(path, what), path, "[H, W] or [H, W, 1] depth").astype(np.float32)
        check_same_size(path, depth.shape, image_path, hw)
        depth = np.where(np.isfinite(depth), depth, np.float32(0.0))
        return torch.from_numpy(np.ascontiguousarray(depth))[None]

    def _normal(self, path: Path, image_path: Path, hw: tuple[int, ...]) -> torch.Tensor:
        what = "normals as an 8-bit RGB PNG or a float .npy [H, W, 3]"
        if path.suffix.lower() == ".png":
            arr, mode = read_image(path, what, palette_to_rgb=False)
            if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.dtype != np.uint8:
                raise FileFormatError(f"{path}: a {mode} image of shape {arr.shape}; normal PNGs must be 8-bit RGB")
            check_same_size(path, arr.shape[:2], image_path, hw)
            rgb = arr[..., :3]
            n = rgb.astype(np.float32) / np.float32(255.0) * np.float32(2.0) - np.float32(1.0)
            n[(rgb == 0).all(axis=2)] = 0.0
            return torch.from_numpy(np.ascontiguousarray(n.transpose(2, 0, 1)))
        arr = load_npy(path, what)
        if arr.shape == (*hw, 3):
            arr = arr.transpose(2, 0, 1)
        elif arr.shape != (3, *hw):
            raise FileFormatError(f"{path}: array of shape {arr.shape}, expected [H, W, 3] or [3, H, W] with its "
                                  f"image's size {hw[0]}x{hw[1]} ({image_path})")
        n = arr.astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(np.where(np.isfinite(n), n, np.float32(0.0))))
