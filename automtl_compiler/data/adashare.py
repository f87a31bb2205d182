"""NYUv2 (40 classes) and Cityscapes in the JSON-indexed layouts AdaShare distributes and AutoMTL trains on.

AutoMTL's paper experiments do not use MTAN's 13-class archive (see :mod:`.nyuv2`) but AdaShare's data: a
JSON index at the dataset root mapping split names to rows of file paths. The readers here decode those
files the way AutoMTL's ``data/dataloader/nyuv2_dataloader.py`` and ``cityscapes_dataloader.py`` do, and
return samples in this package's format; each class docstring lists where they differ and why.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import AutomtlError, FileFormatError
from ..tasks.base import bilinear_resize, nearest_resize
from ._common import (
    Sample,
    check_same_size,
    checked_index,
    hflip,
    integer_labels,
    load_npy,
    read_image,
    read_index_rows,
    require_dir,
    sample_rng,
    scale_pad_crop,
)
from .synthetic import _check_tasks

# Caffe's ImageNet mean in B, G, R order: AutoMTL/AdaShare subtract it from BGR images in 0..255, the
# input convention of the Caffe-converted DeepLab-ResNet weights they start from.
CAFFE_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)
NORMALIZE = ("caffe_bgr", "none")
NORMAL_DECODING = ("signed", "automtl")
# Our split names -> the JSON's keys. AutoMTL's notebooks train on ``train`` (``train1``/``train2`` are the
# halves for weight and policy updates) and evaluate on ``test``.
SPLIT_KEYS = {"train": "train", "train1": "train1", "train2": "train2", "val": "test", "test": "test"}
TRAIN_SPLITS = ("train", "train1", "train2")
DEPTH_MIN = 3e-5               # AutoMTL's depth mask: valid where depth > 3e-5 (pixel2pixel_loss.py:46)
NYU_VOID = 255                 # "no label" in AdaShare's label files (NYUv2 PNGs; also accepted for Cityscapes)
NORMAL_INVALID = 255           # a normal pixel with any channel at 255 has no normal (pixel2pixel_loss.py:30)
MIN_NORMAL_LENGTH = 0.5        # a decoded signed normal shorter than this is a placeholder, not a normal


def _header_shape(path: Path, layout: str) -> tuple[int, ...]:
    """The shape declared by a ``.npy`` header, read without loading the array (sizes are checked first)."""
    if not path.is_file():
        raise FileFormatError(f"{path}: file not found; expected {layout}")
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, _ = reader(f)
    except (ValueError, OSError, EOFError, TypeError) as exc:
        raise FileFormatError(f"{path}: not a readable .npy array ({exc}); expected {layout}") from None
    return tuple(int(s) for s in shape)


def _image_hw(path: Path, layout: str) -> tuple[int, int]:
    """Height and width of an image file from its header (nothing is decoded)."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise FileFormatError(f"{path}: file not found; expected {layout}")
    try:
        with Image.open(path) as im:
            w, h = im.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise FileFormatError(f"{path}: not a readable image ({exc}); expected {layout}") from None
    return int(h), int(w)


def _plane_hw(shape: tuple[int, ...], path: Path, what: str) -> tuple[int, int]:
    """``(H, W)`` of an ``[H, W]`` or ``[H, W, 1]`` array shape; a FileFormatError otherwise."""
    if len(shape) == 2 or (len(shape) == 3 and shape[2] == 1):
        return shape[0], shape[1]
    raise FileFormatError(f"{path}: array of shape {shape}, expected {what} [H, W] or [H, W, 1]")


class _AdaShareIndexed(Dataset):
    """Shared machinery of the AdaShare readers: JSON index, split names, augmentation, normalisation."""

    name: ClassVar[str]
    index_name: ClassVar[str]
    available: ClassVar[tuple[str, ...]]
    default_crop: ClassVar[tuple[int, int]]
    row_columns: ClassVar[tuple[str, ...]]       # what each JSON row holds, in order
    layout: ClassVar[str]

    def __init__(self, root: str | Path, split: str = "train", tasks: Sequence[str] | None = None,
                 crop: tuple[int, int] | None = None, augment: bool | None = None, flip: bool = True,
                 ignore_index: int = 255, seed: int = 0, normalize: str = "caffe_bgr",
                 index_file: str | Path | None = None) -> None:
        if split not in SPLIT_KEYS:
            raise AutomtlError(f"{self.name}: unknown split {split!r}; use one of {', '.join(SPLIT_KEYS)} "
                               "('val' reads the JSON's 'test' rows)")
        if normalize not in NORMALIZE:
            raise AutomtlError(f"{self.name}: normalize must be one of {', '.join(NORMALIZE)}, got {normalize!r}")
        self.root = require_dir(Path(root), self.layout)
        self.split = split
        self.tasks = _check_tasks(tasks, self.available, self.name)
        c = self.default_crop if crop is None else crop
        if len(c) != 2 or any(int(v) < 1 for v in c):
            raise AutomtlError(f"{self.name}: crop must be (height, width) of positive sizes, got {crop!r}")
        self.crop = (int(c[0]), int(c[1]))
        self.augment = split in TRAIN_SPLITS if augment is None else bool(augment)
        self.flip = bool(flip)
        self.ignore_index = int(ignore_index)
        self.normalize = normalize
        self.seed = int(seed)
        self.epoch = 0
        self.index_file = Path(index_file) if index_file is not None else self.root / self.index_name
        self.rows = self._read_index(self.index_file)
        self._check_files()

    # --- index ---
    def _read_index(self, path: Path) -> list[tuple[str, ...]]:
        key = SPLIT_KEYS[self.split]
        rows = read_index_rows(path, [key], self.row_columns, self.split, self.layout)
        if not rows:
            raise FileFormatError(f"{path}: entry {key!r} lists no samples; expected {self.layout}")
        return rows

    def _columns(self) -> list[int]:
        """The row columns this reader opens for its tasks (the image first)."""
        raise NotImplementedError

    def _check_files(self) -> None:
        """Every file the requested tasks need exists: a missing one is reported now, naming it and its row."""
        cols = self._columns()
        for i, row in enumerate(self.rows):
            for c in cols:
                p = self.root / row[c]
                if not p.is_file():
                    raise FileFormatError(f"{p}: file not found (row {i} of {self.index_file.name}"
                                          f"[{SPLIT_KEYS[self.split]!r}], column {self.row_columns[c]}); "
                                          f"expected {self.layout}")

    # --- labels ---
    def _labels(self, arr: np.ndarray, path: Path, num_classes: int) -> torch.Tensor:
        """Class ids as int64 ``[H, W]``: negative values, 255 and ``ignore_index`` mean no label and become
        ``ignore_index``; any other value ``>= num_classes`` (or a fractional or non-finite one) is an error
        naming the file, the largest such value and how many pixels hold one."""
        lab = integer_labels(arr, path)
        void = (lab < 0) | (lab == NYU_VOID) | (lab == self.ignore_index)
        bad = ~void & (lab >= num_classes)
        if bool(bad.any()):
            raise FileFormatError(
                f"{path}: label value {int(lab[bad].max())} ({int(bad.sum())} pixels) is outside the {num_classes} "
                f"classes 0..{num_classes - 1} (negative values, {NYU_VOID} and ignore_index {self.ignore_index} "
                f"mean no label); check that this column of {self.index_file.name} holds {num_classes}-class labels")
        return lab.masked_fill(void, self.ignore_index)

    def _check_ignore_index(self, num_classes: int) -> None:
        if 0 <= self.ignore_index < num_classes:
            raise AutomtlError(f"{self.name}: ignore_index {self.ignore_index} is one of the {num_classes} class ids "
                               f"0..{num_classes - 1}; use a value outside them (255 or -1)")

    @staticmethod
    def _depth(arr: np.ndarray) -> torch.Tensor:
        """Depth ``[1, H, W]`` float32 with 0 where AutoMTL's mask says invalid (not ``> 3e-5``, or not finite)."""
        d = torch.from_numpy(np.ascontiguousarray(arr.reshape(arr.shape[0], arr.shape[1])).astype(np.float32))
        valid = (d > DEPTH_MIN) & torch.isfinite(d)
        return torch.where(valid, d, 0.0).unsqueeze(0)

    # --- samples ---
    def set_epoch(self, epoch: int) -> None:
        """Choose the augmentation draw: sample ``i`` in epoch ``e`` is augmented the same way in every run."""
        self.epoch = int(epoch)

    @property
    def num_classes(self) -> dict[str, int]:
        """Output channels per requested task (class count for segmentation)."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.rows)

    def _flip_normals(self) -> tuple[str, ...]:
        """Targets whose x component a horizontal mirror negates."""
        return ()

    def _decode(self, i: int) -> Sample:
        """Sample ``i`` at its stored size, the image not yet mean-subtracted (BGR 0..255 or RGB 0..1)."""
        raise NotImplementedError

    def _finish(self, image: torch.Tensor) -> torch.Tensor:
        if self.normalize == "caffe_bgr":
            return image - torch.tensor(CAFFE_MEAN_BGR, dtype=torch.float32)[:, None, None]
        return image

    def load(self, i: int) -> Sample:
        """Sample ``i`` decoded and normalised at its stored size (no augmentation, no resizing)."""
        image, targets = self._decode(checked_index(i, len(self.rows)))
        return self._finish(image), targets

    def __getitem__(self, index: int) -> Sample:
        i = checked_index(index, len(self.rows))
        image, targets = self._decode(i)
        if self.augment:
            rng = sample_rng(self.seed, self.epoch, i)
            image, targets = scale_pad_crop(image, targets, rng, self.crop, self.ignore_index)
            if self.flip and rng.random() < 0.5:
                image, targets = hflip(image, targets, normals=self._flip_normals())
        else:
            image = bilinear_resize(image[None], self.crop)[0]
            targets = {k: nearest_resize(v, self.crop) for k, v in targets.items()}
        return self._finish(image), targets


class AdaShareNYUv2(_AdaShareIndexed):
    """NYUv2 with 40 classes, depth and normals, as AdaShare distributes it and AutoMTL reads it.

    **Layout.** ``<root>/nyu_v2_3task.json`` maps ``train``, ``train1``, ``train2`` and ``test`` to rows
    ``[img, seg, normal, depth]`` of paths relative to ``<root>`` (AutoMTL ``nyuv2_dataloader.py:29-32,100``;
    AdaShare's samples name the folders ``img/``, ``seg/``, ``normal_mask/``, ``depth/``). Our ``val`` reads
    ``test``. ``img``: 8-bit colour PNG/JPEG (AutoMTL ``cv2.imread``, BGR). ``seg``: 8-bit greyscale PNG,
    ids 0..39, 255 = no label. ``normal``: 8-bit RGB PNG. ``depth``: ``.npy`` ``[H, W]`` float metres.
    Every target must have its image's size (checked from file headers before decoding).

    **Decoding.**

    - image, ``normalize="caffe_bgr"`` (default): ``[3, H, W]`` float32 in **B, G, R** order, values
      ``0..255`` minus the Caffe mean ``(104.00698793, 116.66876762, 122.67891434)`` (AutoMTL :25-26,
      :116-117): what AutoMTL's Caffe-converted DeepLab-ResNet weights expect. ``"none"``: R, G, B in [0, 1].
    - ``segment_semantic``: ``[H, W]`` int64; 255 (and negative values) become ``ignore_index``
      (AutoMTL's ``CrossEntropyLoss(ignore_index=255)``, ``pixel2pixel_loss.py:104``); other values >= 40
      are an error naming the file.
    - ``depth_zbuffer``: ``[1, H, W]`` float32, 0 where AutoMTL's mask is false: depth ``<= 3e-5`` or NaN
      (``pixel2pixel_loss.py:46``, ``pixel2pixel_metrics.py:88``); infinities also become 0.
    - ``normal``: invalid where any channel is 255 (AutoMTL keeps pixels with ``max < 255``,
      ``pixel2pixel_loss.py:30``; AdaShare's files store (255, 255, 255) there); invalid pixels are 0.
      ``normal_decoding="signed"`` (default): the PNG's R, G, B are x, y, z encoded as ``v / 127.5 - 1``,
      renormalised to unit length; pixels shorter than 0.5 after decoding (AdaShare's files hold
      (127, 127, 127) placeholders) are also invalid; a horizontal flip negates x.
      ``normal_decoding="automtl"``: AutoMTL never maps the values: its loss and metric take the cosine
      between the prediction and the raw ``[B, G, R]`` vector in 0..255 (``pixel2pixel_loss.py:34-36``), so
      the target is that vector normalised (channels B, G, R), and a flip leaves it unchanged (AutoMTL
      mirrors the pixels only, :55-60). Use it to reproduce AutoMTL's normal numbers; the angles are then
      between such all-positive vectors, not between surface normals.

    **Augmentation** (``augment``, default on for ``train``/``train1``/``train2``), as AutoMTL (:38-89):
    rescale by ``s`` in [0.5, 1.5) (image bilinear, targets nearest), mirror with probability 1/2 (when
    ``flip``), pad centred to ``crop`` and take a random ``crop`` window; padding is image 0 (before the
    mean is subtracted, as AutoMTL), labels ``ignore_index``, depth and normals 0 (invalid). Draws come from
    ``(seed, epoch, index)``; call :meth:`set_epoch` each epoch. Otherwise (``val``/``test``) image and
    targets are resized to ``crop`` (AutoMTL :91-97; image bilinear, targets nearest).

    **Differences from AutoMTL:** the default normal decoding (above); we mirror after cropping (the same
    distribution: the crop offset is uniform and the padding centred); the rescaled image is not rounded
    to 8 bits (cv2 rounds a uint8 resize); a 16-bit or palette label PNG is an error (cv2 would convert
    it to grey levels).
    """

    name = "nyuv2"
    index_name = "nyu_v2_3task.json"
    available = ("segment_semantic", "normal", "depth_zbuffer")
    default_crop = (321, 321)
    row_columns = ("img", "seg", "normal", "depth")
    layout = ("AdaShare's NYUv2 layout: <root>/nyu_v2_3task.json mapping train/train1/train2/test to rows "
              "[img, seg, normal, depth] of paths relative to <root> (8-bit colour image, 8-bit greyscale "
              "label PNG with ids 0..39 and 255 = no label, 8-bit RGB normal PNG, depth .npy [H, W])")
    NUM_CLASSES = 40
    COLUMN: ClassVar[dict[str, int]] = {"segment_semantic": 1, "normal": 2, "depth_zbuffer": 3}

    def __init__(self, root: str | Path, split: str = "train", tasks: Sequence[str] | None = None,
                 crop: tuple[int, int] | None = (321, 321), augment: bool | None = None, flip: bool = True,
                 ignore_index: int = 255, seed: int = 0, normalize: str = "caffe_bgr",
                 normal_decoding: str = "signed", index_file: str | Path | None = None) -> None:
        if normal_decoding not in NORMAL_DECODING:
            raise AutomtlError(f"nyuv2: normal_decoding must be one of {', '.join(NORMAL_DECODING)}, "
                               f"got {normal_decoding!r}")
        self.normal_decoding = normal_decoding
        super().__init__(root, split, tasks, crop, augment, flip, ignore_index, seed, normalize, index_file)
        if "segment_semantic" in self.tasks:
            self._check_ignore_index(self.NUM_CLASSES)

    def _columns(self) -> list[int]:
        return [0] + [self.COLUMN[t] for t in self.tasks]

    @property
    def num_classes(self) -> dict[str, int]:
        """``{segment_semantic: 40, normal: 3, depth_zbuffer: 1}`` restricted to the requested tasks."""
        out = {"segment_semantic": self.NUM_CLASSES, "normal": 3, "depth_zbuffer": 1}
        return {t: out[t] for t in self.tasks}

    def _flip_normals(self) -> tuple[str, ...]:
        return ("normal",) if self.normal_decoding == "signed" else ()

    def _decode(self, i: int) -> Sample:
        row = self.rows[i]
        img_path = self.root / row[0]
        rgb, _ = read_image(img_path, "an 8-bit colour image (PNG or JPEG)", rgb=True)
        hw = rgb.shape[:2]
        pixels = np.ascontiguousarray(rgb[..., ::-1] if self.normalize == "caffe_bgr" else rgb, dtype=np.float32)
        image = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
        if self.normalize == "none":
            image = image / 255.0
        targets: dict[str, torch.Tensor] = {}
        for task in self.tasks:
            path = self.root / row[self.COLUMN[task]]
            if task == "depth_zbuffer":
                what = "a depth .npy [H, W] of the image's size"
                check_same_size(path, _plane_hw(_header_shape(path, what), path, "depth"), img_path, hw)
                targets[task] = self._depth(load_npy(path, what))
                continue
            check_same_size(path, _image_hw(path, "an 8-bit PNG"), img_path, hw)
            if task == "segment_semantic":
                targets[task] = self._seg(path)
            else:
                targets[task] = self._normal(path)
        return image, targets

    def _seg(self, path: Path) -> torch.Tensor:
        arr, mode = read_image(path, "an 8-bit greyscale label PNG", palette_to_rgb=False)
        if arr.ndim != 2 or mode in ("P", "PA"):
            raise FileFormatError(f"{path}: a {mode} image; AutoMTL reads labels as one greyscale channel: save "
                                  "class ids 0..39 (255 = no label) as an 8-bit greyscale ('L') PNG")
        if mode != "L":
            raise FileFormatError(f"{path}: a {mode} image; save class ids 0..39 (255 = no label) as an 8-bit "
                                  "greyscale ('L') PNG")
        return self._labels(arr, path, self.NUM_CLASSES)

    def _normal(self, path: Path) -> torch.Tensor:
        raw, _ = read_image(path, "an 8-bit RGB normal PNG", rgb=True)
        v = torch.from_numpy(np.ascontiguousarray(raw)).permute(2, 0, 1).float()
        valid = (v < NORMAL_INVALID).all(dim=0)
        if self.normal_decoding == "signed":
            n = v / 127.5 - 1.0
            length = n.norm(dim=0)
            valid &= length >= MIN_NORMAL_LENGTH
        else:
            n = v.flip(0)
            length = n.norm(dim=0)
            valid &= length > 0
        n = n / length.clamp_min(1e-12)
        return torch.where(valid.unsqueeze(0), n, 0.0)


class AdaShareCityscapes(_AdaShareIndexed):
    """Cityscapes (segmentation, depth) as AdaShare preprocessed it and AutoMTL reads it.

    **Layout.** ``<root>/cityscape.json`` maps ``train``, ``train1``, ``train2`` and ``test`` to rows
    ``[image, depth, label_2, label_7, label_19]`` of ``.npy`` paths relative to ``<root>`` (AutoMTL
    ``cityscapes_dataloader.py:27-30,103``; ``cityscapes_dataloader_adashare.py:107-112`` reads the same
    rows). Our ``val`` reads ``test``. ``image``: ``[H, W, 3]`` float RGB in [0, 1]; labels ``[H, W]``
    (or ``[H, W, 1]``) with ids ``0..C-1`` and -1 = no label; depth ``[H, W, 1]`` (or ``[H, W]``). AutoMTL's
    own loader uses the 19-class column; ``num_classes`` (2, 7 or 19, default 19) picks the column as
    AdaShare's ``num_class`` does (``cityscapes_dataloader_adashare.py:122-131``).

    **Decoding.** Image, ``normalize="caffe_bgr"`` (default): channels reversed to B, G, R, times 255,
    minus the Caffe mean (AutoMTL :105, :118-119); ``"none"``: the stored R, G, B in [0, 1]. An image that is
    not float or has values outside [0, 1] is an error (AutoMTL would silently multiply it by 255).
    ``segment_semantic``: ``[H, W]`` int64, -1 (any negative value, and 255) becomes ``ignore_index``
    (AutoMTL's ``CrossEntropyLoss(ignore_index=-1)``, ``pixel2pixel_loss.py:93``); other values
    ``>= num_classes`` are an error naming the file. ``depth_zbuffer``: ``[1, H, W]`` float32, 0 where
    AutoMTL's mask is false (``<= 3e-5`` or NaN, ``pixel2pixel_loss.py:46``) or the value is infinite.

    **Augmentation** (``augment``, default on for the train splits): as :class:`AdaShareNYUv2` (AutoMTL
    :49-95; labels padded with ``ignore_index``, depth with 0). Otherwise image and targets are resized to
    ``crop`` (default 256x512). AutoMTL evaluates Cityscapes at the stored size without resizing (its
    resize is commented out, :115-116; its mean array has the crop size, so the stored size must be the
    crop size): give ``crop`` equal to the stored size (AdaShare's data: 256x512) for the same result.
    AutoMTL's notebooks train with ``crop=(224, 224)`` and evaluate at 256x512.
    """

    name = "cityscapes"
    index_name = "cityscape.json"
    available = ("segment_semantic", "depth_zbuffer")
    default_crop = (256, 512)
    row_columns = ("image", "depth", "label_2", "label_7", "label_19")
    layout = ("AdaShare's Cityscapes layout: <root>/cityscape.json mapping train/train1/train2/test to rows "
              "[image, depth, label_2, label_7, label_19] of .npy paths relative to <root> (image [H, W, 3] "
              "float RGB in [0, 1], depth [H, W, 1], labels [H, W] with -1 = no label)")
    LABEL_COLUMN: ClassVar[dict[int, int]] = {2: 2, 7: 3, 19: 4}
    IMAGE_TOLERANCE = 1e-3

    def __init__(self, root: str | Path, split: str = "train", tasks: Sequence[str] | None = None,
                 crop: tuple[int, int] | None = (256, 512), augment: bool | None = None, flip: bool = True,
                 ignore_index: int = 255, seed: int = 0, normalize: str = "caffe_bgr", num_classes: int = 19,
                 index_file: str | Path | None = None) -> None:
        if num_classes not in self.LABEL_COLUMN:
            raise AutomtlError(f"cityscapes: num_classes must be 2, 7 or 19 (the label sets AdaShare stores), "
                               f"got {num_classes!r}")
        self.seg_classes = int(num_classes)
        super().__init__(root, split, tasks, crop, augment, flip, ignore_index, seed, normalize, index_file)
        if "segment_semantic" in self.tasks:
            self._check_ignore_index(self.seg_classes)

    def _column(self, task: str) -> int:
        return 1 if task == "depth_zbuffer" else self.LABEL_COLUMN[self.seg_classes]

    def _columns(self) -> list[int]:
        return [0] + [self._column(t) for t in self.tasks]

    @property
    def num_classes(self) -> dict[str, int]:
        """``{segment_semantic: num_classes (19 by default), depth_zbuffer: 1}`` for the requested tasks."""
        out = {"segment_semantic": self.seg_classes, "depth_zbuffer": 1}
        return {t: out[t] for t in self.tasks}

    def _decode(self, i: int) -> Sample:
        row = self.rows[i]
        img_path = self.root / row[0]
        what = "an image .npy [H, W, 3] of float RGB in [0, 1]"
        shape = _header_shape(img_path, what)
        if len(shape) != 3 or shape[2] != 3:
            raise FileFormatError(f"{img_path}: array of shape {shape}, expected {what}")
        hw = shape[:2]
        wanted = {t: (self.root / row[self._column(t)]) for t in self.tasks}
        for task, path in wanted.items():
            kind = "depth" if task == "depth_zbuffer" else "labels"
            check_same_size(path, _plane_hw(_header_shape(path, f"a {kind} .npy"), path, kind), img_path, hw)
        arr = load_npy(img_path, what)
        if arr.dtype.kind != "f":
            raise FileFormatError(f"{img_path}: image of dtype {arr.dtype}; expected {what} (AutoMTL multiplies "
                                  "it by 255): divide 8-bit images by 255 and save them as float32")
        tol = self.IMAGE_TOLERANCE
        if arr.size and not (np.isfinite(arr).all() and arr.min() >= -tol and arr.max() <= 1 + tol):
            raise FileFormatError(f"{img_path}: image values span {float(np.nanmin(arr))}..{float(np.nanmax(arr))} "
                                  f"(or are not finite); expected {what} (AutoMTL multiplies it by 255)")
        if self.normalize == "caffe_bgr":
            pixels = np.ascontiguousarray(arr[..., ::-1], dtype=np.float32) * 255.0
        else:
            pixels = np.ascontiguousarray(arr, dtype=np.float32)
        image = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
        targets: dict[str, torch.Tensor] = {}
        for task, path in wanted.items():
            if task == "depth_zbuffer":
                targets[task] = self._depth(load_npy(path, "a depth .npy [H, W, 1]"))
            else:
                lab = load_npy(path, f"a label .npy [H, W] with ids 0..{self.seg_classes - 1}, -1 = no label")
                targets[task] = self._labels(lab.reshape(hw), path, self.seg_classes)
        return image, targets
