"""Tiny NYUv2 and Cityscapes in AdaShare's JSON-indexed layouts (the ones AutoMTL's paper experiments read).

Each writer is deterministic (seeded), writes the files and the JSON index into ``root`` (created if
needed) and returns what it wrote as ``{json split key: [sample, ...]}`` in index order; each sample holds
the raw arrays as stored and ``"paths"``, its JSON row. Marked pixels have known values for closed-form
checks (see each writer).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

Written = dict[str, list[dict[str, Any]]]

NYU_CLASSES = 40
NYU_SPLITS = ("train", "train1", "train2", "test")
CITYSCAPES_LABEL_SETS = (2, 7, 19)
KNOWN_RGB = (10, 20, 30)              # the colour at pixel (0, 0) of every NYUv2 image


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        np.save(path, arr)
    elif path.suffix in (".jpg", ".jpeg"):
        Image.fromarray(arr).save(path, quality=95)
    else:
        Image.fromarray(arr).save(path)


def _split_sizes(n_train: int, n_test: int) -> dict[str, int]:
    """``train1``/``train2`` get the first and second half of ``train``, as AutoMTL's index has it."""
    half = n_train // 2
    return {"train": n_train, "train1": half, "train2": n_train - half, "test": n_test}


def nyu_normal_pixels(n: np.ndarray) -> np.ndarray:
    """Unit normals ``[..., 3]`` (x, y, z) encoded as AdaShare's PNG bytes (R, G, B), kept below 255."""
    return np.clip(np.rint((n + 1.0) * 127.5), 0, 254).astype(np.uint8)


def write_adashare_nyuv2(root: str | Path, n_train: int = 4, n_test: int = 2, hw: tuple[int, int] = (12, 16),
                         seed: int = 0, image_suffix: str = ".png") -> Written:
    """NYUv2 as AdaShare distributes it::

        <root>/nyu_v2_3task.json          {"train": rows, "train1": rows, "train2": rows, "test": rows}
        <root>/img/<id><image_suffix>     8-bit RGB (PNG, or JPEG with ".jpg")
        <root>/seg/<id>.png               8-bit greyscale, ids 0..39, 255 = no label
        <root>/normal_mask/<id>.png       8-bit RGB normals, (n + 1) * 127.5 clipped to 0..254
        <root>/depth/<id>.npy             float32 [H, W] metres

    with rows ``[img, seg, normal, depth]`` relative to ``<root>``; ``train1``/``train2`` are halves of
    ``train``. Marked pixels: image (0, 0) is RGB ``KNOWN_RGB``; seg row 0, columns 0..2 are 255 and
    (1, 0) is 39; normals at (2, 0..2) are (255, 255, 255), (2, 3) is (255, 128, 128) (one channel at
    255: invalid for AutoMTL) and (2, 4) is (127, 127, 127) (a placeholder); depth at (3, 0..1) is 0,
    (3, 2) is 1e-5 (below AutoMTL's 3e-5) and (3, 3) is NaN. ``hw`` must be at least 4 x 5.
    """
    if hw[0] < 4 or hw[1] < 5:
        raise ValueError(f"hw must be at least (4, 5), got {hw}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    sizes = _split_sizes(n_train, n_test)
    made: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    uid = 0
    for split in ("train", "test"):
        for _ in range(sizes[split]):
            rgb = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
            rgb[0, 0] = KNOWN_RGB
            seg = rng.integers(0, NYU_CLASSES, hw, dtype=np.uint8)
            seg[0, :3] = 255
            seg[1, 0] = NYU_CLASSES - 1
            n = rng.normal(size=(*hw, 3))
            normal = nyu_normal_pixels(n / np.linalg.norm(n, axis=-1, keepdims=True))
            normal[2, :3] = 255
            normal[2, 3] = (255, 128, 128)
            normal[2, 4] = 127
            depth = rng.uniform(0.5, 10.0, hw).astype(np.float32)
            depth[3, :2] = 0.0
            depth[3, 2] = 1e-5
            depth[3, 3] = np.nan
            stem = f"{uid:04d}"
            paths = [f"img/{stem}{image_suffix}", f"seg/{stem}.png", f"normal_mask/{stem}.png", f"depth/{stem}.npy"]
            for rel, arr in zip(paths, (rgb, seg, normal, depth)):
                _save(root / rel, arr)
            made[split].append({"img": rgb, "seg": seg, "normal": normal, "depth": depth, "paths": paths})
            uid += 1
    half = sizes["train1"]
    written: Written = {"train": made["train"], "train1": made["train"][:half], "train2": made["train"][half:],
                        "test": made["test"]}
    (root / "nyu_v2_3task.json").write_text(json.dumps({k: [s["paths"] for s in v] for k, v in written.items()}))
    return written


def write_adashare_cityscapes(root: str | Path, n_train: int = 4, n_test: int = 2, hw: tuple[int, int] = (8, 16),
                              seed: int = 0) -> Written:
    """Cityscapes as AdaShare preprocessed it::

        <root>/cityscape.json                       {"train": rows, "train1": rows, "train2": rows, "test": rows}
        <root>/<train|test>/image/<id>.npy          float32 [H, W, 3] RGB in [0, 1]
        <root>/<train|test>/depth/<id>.npy          float32 [H, W, 1], 0 = no measurement
        <root>/<train|test>/label_<c>/<id>.npy      float32 [H, W], ids 0..c-1, -1 = no label (c = 2, 7, 19)

    with rows ``[image, depth, label_2, label_7, label_19]`` relative to ``<root>``. Marked pixels: image
    (0, 0) is RGB (0.25, 0.5, 1.0); every label set has -1 at row 0, columns 0..1 and ``c - 1`` at (1, 0);
    depth is 0 at (2, 0..1) and 1e-5 at (2, 2). ``hw`` must be at least 3 x 3.
    """
    if hw[0] < 3 or hw[1] < 3:
        raise ValueError(f"hw must be at least (3, 3), got {hw}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    sizes = _split_sizes(n_train, n_test)
    made: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    for split in ("train", "test"):
        for i in range(sizes[split]):
            image = rng.random((*hw, 3), dtype=np.float32)
            image[0, 0] = (0.25, 0.5, 1.0)
            depth = rng.uniform(0.01, 0.2, (*hw, 1)).astype(np.float32)
            depth[2, :2, 0] = 0.0
            depth[2, 2, 0] = 1e-5
            sample: dict[str, Any] = {"image": image, "depth": depth}
            paths = [f"{split}/image/{i}.npy", f"{split}/depth/{i}.npy"]
            for c in CITYSCAPES_LABEL_SETS:
                lab = rng.integers(0, c, hw).astype(np.float32)
                lab[0, :2] = -1.0
                lab[1, 0] = c - 1
                sample[f"label_{c}"] = lab
                paths.append(f"{split}/label_{c}/{i}.npy")
            for rel, key in zip(paths, ("image", "depth", "label_2", "label_7", "label_19")):
                _save(root / rel, sample[key])
            sample["paths"] = paths
            made[split].append(sample)
    half = sizes["train1"]
    written: Written = {"train": made["train"], "train1": made["train"][:half], "train2": made["train"][half:],
                        "test": made["test"]}
    (root / "cityscape.json").write_text(json.dumps({k: [s["paths"] for s in v] for k, v in written.items()}))
    return written
