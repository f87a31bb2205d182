"""Helpers shared by the real-dataset readers: safe ``.npy``/PNG loading, shape checks, augmentation."""

from __future__ import annotations

import math
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


def load_npy(path: Path, layout: str) -> np.ndarray:
    """``numpy.load(path, allow_pickle=False)`` with every failure turned into a FileFormatError."""
    if not path.is_file():
        raise FileFormatError(f"{path}: file not found; expected {layout}")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise FileFormatError(f"{path}: not a readable .npy array ({exc}); expected {layout}") from None
    if not isinstance(arr, np.ndarray):
        raise FileFormatError(f"{path}: holds an archive, not one array; expected {layout}")
    if arr.dtype.kind not in "biuf":
        raise FileFormatError(f"{path}: has dtype {arr.dtype}, not a numeric array; expected {layout}")
    return arr


def load_png(path: Path, layout: str) -> np.ndarray:
    """A PNG as a numpy array (uint8 RGB/grey, or uint16/int32 for 16-bit images)."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise FileFormatError(f"{path}: file not found; expected {layout}")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == "P" or im.mode == "RGBA":
                im = im.convert("RGB")
            return np.array(im)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise FileFormatError(f"{path}: not a readable image ({exc}); expected {layout}") from None


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


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The augmentation generator of one sample in one epoch (independent of worker and call order)."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, index, 0x5EED]))


def hflip(image: torch.Tensor, targets: dict[str, torch.Tensor]) -> Sample:
    """Mirror left-right; normals get their x component negated (the x axis points right in the image)."""
    out = {k: v.flip(-1) for k, v in targets.items()}
    if "normal" in out:
        out["normal"] = out["normal"].clone()
        out["normal"][0] = -out["normal"][0]
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
