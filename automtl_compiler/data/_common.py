"""Helpers shared by the real-dataset readers: safe ``.npy``/PNG loading, shape checks, augmentation."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import AutomtlError, FileFormatError
from ..tasks.base import nearest_resize

Sample = tuple[torch.Tensor, dict[str, torch.Tensor]]

# The value written at invalid pixels, per task: labels get the ignore index (set by the reader), depth and
# normals get 0, which the tasks' validity rules treat as missing.
INVALID_FILL = {"depth_zbuffer": 0.0, "normal": 0.0}


def checked_index(index: int, length: int) -> int:
    """``index`` as a non-negative position (negative counts from the end); IndexError when out of range."""
    i = int(index)
    if i < 0:
        i += length
    if not 0 <= i < length:
        raise IndexError(f"index {index} out of range for a dataset of {length} samples")
    return i


def require_dir(path: Path, layout: str) -> Path:
    """``path`` if it is a directory, else FileFormatError saying which layout was expected."""
    if not path.exists():
        raise FileFormatError(f"{path}: directory not found; expected {layout}")
    if not path.is_dir():
        raise FileFormatError(f"{path}: is not a directory; expected {layout}")
    return path


MAX_PIXELS = 1 << 28          # largest image accepted from a file (268 M pixels), checked before decoding
WIDE_MODES = {"I;16": "16-bit", "I;16B": "16-bit", "I;16L": "16-bit", "I;16N": "16-bit", "I": "32-bit integer",
              "F": "32-bit float"}
MAX_ARRAY_BYTES = 1 << 33     # largest .npy accepted (8 GiB): a corrupt header cannot exhaust memory


def load_npy(path: Path, layout: str) -> np.ndarray:
    """``numpy.load(path, allow_pickle=False)`` with every failure turned into a FileFormatError.

    The header is read first: an array whose declared size disagrees with the file's size (truncated or
    corrupt), exceeds ``MAX_ARRAY_BYTES`` or holds Python objects is rejected before anything is allocated.
    """
    if not path.is_file():
        raise FileFormatError(f"{path}: file not found; expected {layout}")
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            if dtype.hasobject:
                raise ValueError("it holds Python objects (pickled data), which are never loaded")
            declared = math.prod(shape) * dtype.itemsize
            if declared > MAX_ARRAY_BYTES:
                raise ValueError(f"its header declares {declared} bytes, more than the {MAX_ARRAY_BYTES} accepted")
            remaining = path.stat().st_size - f.tell()
            if remaining != declared:
                raise ValueError(f"its header declares shape {shape} of {dtype} ({declared} bytes) but "
                                 f"{remaining} bytes follow: truncated or corrupt")
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, TypeError) as exc:
        raise FileFormatError(f"{path}: not a readable .npy array ({exc}); expected {layout}") from None
    if not isinstance(arr, np.ndarray):
        raise FileFormatError(f"{path}: holds an archive, not one array; expected {layout}")
    if arr.dtype.kind not in "biuf":
        raise FileFormatError(f"{path}: has dtype {arr.dtype}, not a numeric array; expected {layout}")
    return arr


def read_image(path: Path, layout: str, *, palette_to_rgb: bool = True, rgb: bool = False) -> tuple[np.ndarray, str]:
    """An image file as ``(array, PIL mode of the file)``: uint8 grey/RGB, uint16/int32 for 16-bit grey.

    With ``palette_to_rgb`` palette and RGBA images are converted to RGB; without it a palette image gives
    its palette indices. With ``rgb`` every 8-bit image is converted to RGB [H, W, 3] uint8 and images of
    more than 8 bits per channel are an error. The size is checked before the pixels are decoded.
    """
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise FileFormatError(f"{path}: file not found; expected {layout}")
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise FileFormatError(f"{path}: image of {w}x{h} pixels is larger than the {MAX_PIXELS} accepted")
            mode = im.mode
            if rgb and mode in WIDE_MODES:
                raise FileFormatError(f"{path}: a {WIDE_MODES[mode]} image; images must be 8-bit RGB or greyscale "
                                      "(convert it, e.g. with PIL: im.convert('RGB'))")
            im.load()
            if rgb:
                return np.array(im if mode == "RGB" else im.convert("RGB")), mode
            if palette_to_rgb and mode in ("P", "PA", "RGBA"):
                return np.array(im.convert("RGB")), mode
            return np.array(im), mode
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise FileFormatError(f"{path}: not a readable image ({exc}); expected {layout}") from None


def load_png(path: Path, layout: str) -> np.ndarray:
    """A PNG as a numpy array (uint8 RGB/grey, or uint16/int32 for 16-bit images; palette and RGBA
    images converted to RGB)."""
    return read_image(path, layout)[0]


def integer_labels(arr: np.ndarray, path: Path) -> torch.Tensor:
    """Stored class ids as an int64 tensor; NaN, infinite or fractional values are a FileFormatError."""
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise FileFormatError(f"{path}: labels contain NaN or infinity; class ids must be integers")
        frac = arr != np.floor(arr)
        if frac.any():
            raise FileFormatError(f"{path}: label value {float(arr[frac].flat[0])} is not an integer class id")
    return torch.from_numpy(np.ascontiguousarray(arr).astype(np.int64))


def labels_to_tensor(arr: np.ndarray, path: Path, num_classes: int | None, ignore_index: int,
                     hint: str = "") -> torch.Tensor:
    """Class ids as int64. Negative values become ``ignore_index`` (a value equal to it is kept: no
    label); any other value ``>= num_classes`` (when known), and fractional or non-finite values, are a
    FileFormatError naming the file, the value and the class count (``hint`` says what to do)."""
    lab = integer_labels(arr, path)
    lab = lab.masked_fill(lab < 0, ignore_index)
    if num_classes is not None:
        bad = (lab >= num_classes) & (lab != ignore_index)
        if bool(bad.any()):
            raise FileFormatError(
                f"{path}: label value {int(lab[bad].max())} ({int(bad.sum())} pixels) is outside the "
                f"{num_classes} classes 0..{num_classes - 1} (negative values and {ignore_index} mean no label); "
                f"{hint or 'fix the labels or give the right number of classes'}")
    return lab


def check_same_size(path: Path, hw: Sequence[int], image_path: Path, image_hw: Sequence[int]) -> None:
    """FileFormatError unless a target's height/width ``hw`` equals its image's ``image_hw``."""
    if tuple(hw) != tuple(image_hw):
        raise FileFormatError(f"{path}: target of {hw[0]}x{hw[1]} (height x width) but its image {image_path} is "
                              f"{image_hw[0]}x{image_hw[1]}; every target must have its image's size")


def natural_key(text: str) -> list[tuple[int, int, str]]:
    """Sort key ordering embedded numbers by value (``img2`` before ``img10``)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text) if part]


def check_shape(arr: np.ndarray, path: Path, expected: str, ok: bool) -> None:
    if not ok:
        raise FileFormatError(f"{path}: array of shape {arr.shape}, expected {expected}")


def hwc_to_chw(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(arr, -1, 0), dtype=np.float32))


def index_files(folder: Path, suffix: str, layout: str) -> list[str]:
    """Stems of ``<int><suffix>`` files in ``folder``, sorted numerically; an error if there are none."""
    stems = []
    for p in folder.iterdir():
        if p.name.endswith(suffix) and p.name[: -len(suffix)].isdigit():
            stems.append(p.name[: -len(suffix)])
    if not stems:
        raise FileFormatError(f"{folder}: no <index>{suffix} files; expected {layout}")
    return sorted(stems, key=int)


class SharedEpoch:
    """``epoch`` and ``set_epoch`` for augmenting datasets, working with DataLoader worker processes.

    Workers hold copies of the dataset (made once with ``persistent_workers``). ``set_epoch`` called in the
    main process writes the epoch into shared memory, so workers that never call it themselves see it at
    the next ``iter(loader)``. ``set_epoch`` called inside a worker (a loader that sends the epoch along with
    each batch's indices) sets that worker's own epoch, which then takes precedence there and does not
    touch any other process.
    """

    _epoch_cell: torch.Tensor | None = None
    _own_epoch: int | None = None

    @property
    def epoch(self) -> int:
        """The epoch whose augmentation draws ``__getitem__`` uses."""
        if self._own_epoch is not None:
            return self._own_epoch
        return 0 if self._epoch_cell is None else int(self._epoch_cell)

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.set_epoch(value)

    def set_epoch(self, epoch: int) -> None:
        """Choose the augmentation draw: sample ``i`` in epoch ``e`` is augmented the same way in every run."""
        from torch.utils.data import get_worker_info

        if get_worker_info() is not None:
            self._own_epoch = int(epoch)
            return
        if self._epoch_cell is None:
            self._epoch_cell = torch.zeros((), dtype=torch.int64).share_memory_()
        self._epoch_cell.fill_(int(epoch))
        self._own_epoch = None


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The augmentation generator of one sample in one epoch (independent of worker and call order)."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, index, 0x5EED]))


def hflip(image: torch.Tensor, targets: dict[str, torch.Tensor], normals: Sequence[str] = ("normal",)) -> Sample:
    """Mirror left-right; the targets named in ``normals`` get their x component negated (the x axis points
    right in the image)."""
    out = {k: v.flip(-1) for k, v in targets.items()}
    for k in normals:
        if k in out:
            out[k] = out[k].clone()
            out[k][0] = -out[k][0]
    return image.flip(-1), out


def scale_crop(image: torch.Tensor, targets: dict[str, torch.Tensor], rng: np.random.Generator,
               scales: Sequence[float], depth_power: float) -> Sample:
    """MTAN's augmentation (``RandomScaleCrop``): pick a scale ``s`` from ``scales``, crop a random window of
    ``(H/s, W/s)`` and resize it back to ``(H, W)``: the image bilinearly (``align_corners=True``, as MTAN),
    every target with nearest sampling (labels stay ids; invalid pixels are not blended in). Zooming in by
    ``s`` makes the scene look ``s`` times closer, so depth is multiplied by ``s ** depth_power``: -1 for
    metric depth (MTAN divides NYUv2 depth by ``s``), +1 for inverse depth (disparity).
    """
    h, w = image.shape[-2:]
    s = float(scales[int(rng.integers(0, len(scales)))])
    ch, cw = max(1, int(h / s)), max(1, int(w / s))
    i, j = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    if (ch, cw) == (h, w):
        return image, targets
    image = F.interpolate(image[None, :, i:i + ch, j:j + cw], size=(h, w), mode="bilinear", align_corners=True)[0]
    out = {}
    for k, v in targets.items():
        v = nearest_resize(v[..., i:i + ch, j:j + cw], (h, w))
        if k == "depth_zbuffer":
            v = v * (s ** depth_power)
        out[k] = v
    return image, out


def scale_pad_crop(image: torch.Tensor, targets: dict[str, torch.Tensor], rng: np.random.Generator,
                   crop: tuple[int, int], ignore_index: int) -> Sample:
    """AutoMTL/AdaShare's augmentation for Taskonomy: rescale by a random factor in [0.5, 1.5) (image
    bilinear, targets nearest), then take a random ``crop``-sized window, padding first (centred) when the
    image is smaller: the image with 0, labels with ``ignore_index``, depth and normals with 0 (invalid)."""
    h, w = image.shape[-2:]
    s = 0.5 + float(rng.random())
    nh, nw = max(1, int(h * s)), max(1, int(w * s))
    image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
    targets = {k: nearest_resize(v, (nh, nw)) for k, v in targets.items()}
    ph, pw = max(nh, crop[0]), max(nw, crop[1])
    top, left = (ph - nh) // 2, (pw - nw) // 2

    def pad(x: torch.Tensor, fill: float) -> torch.Tensor:
        if (ph, pw) == (nh, nw):
            return x
        out = torch.full((*x.shape[:-2], ph, pw), fill, dtype=x.dtype)
        out[..., top:top + nh, left:left + nw] = x
        return out

    image = pad(image, 0.0)
    targets = {k: pad(v, INVALID_FILL.get(k, ignore_index)) for k, v in targets.items()}
    i, j = int(rng.integers(0, ph - crop[0] + 1)), int(rng.integers(0, pw - crop[1] + 1))
    sl = (..., slice(i, i + crop[0]), slice(j, j + crop[1]))
    return image[sl], {k: v[sl] for k, v in targets.items()}


def check_scales(scales: Sequence[float]) -> tuple[float, ...]:
    out = tuple(float(s) for s in scales)
    if not out or any(not math.isfinite(s) or s < 1.0 for s in out):
        raise AutomtlError(f"scales must be a non-empty list of numbers >= 1, got {list(scales)}")
    return out


def read_index_rows(path: Path, keys: Sequence[str], columns: Sequence[str], split: str,
                    layout: str) -> list[tuple[str, ...]]:
    """The rows of a JSON sample index (AdaShare/AutoMTL's ``{split: [[path, ...], ...]}``): the first of
    ``keys`` the file has, each row's first ``len(columns)`` path strings. A missing or malformed file, no
    entry for the split, or rows of the wrong shape are a FileFormatError naming the file."""
    import json

    from ..limits import loads_json

    if not path.is_file():
        raise FileFormatError(f"{path}: index file not found; expected {layout}")
    try:
        info = loads_json(path.read_text(), str(path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FileFormatError(f"{path}: not valid JSON ({exc}); expected {layout}") from None
    key = next((k for k in keys if isinstance(info, dict) and k in info), None)
    if key is None:
        found = ", ".join(map(repr, info)) if isinstance(info, dict) else f"a {type(info).__name__}"
        raise FileFormatError(f"{path}: no entry {keys[0]!r} for split {split!r} (found {found or 'none'}); "
                              f"expected {layout}")
    rows, n = info[key], len(columns)
    if not isinstance(rows, list) or not all(
            isinstance(r, list) and len(r) >= n and all(isinstance(x, str) for x in r[:n]) for r in rows):
        raise FileFormatError(f"{path}: entry {key!r} must be a list of rows [{', '.join(columns)}, ...] of path "
                              f"strings; expected {layout}")
    return [tuple(r[:n]) for r in rows]

