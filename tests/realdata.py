"""Tiny datasets written in the real on-disk layouts, for tests (and CLI end-to-end runs).

Every writer is deterministic (seeded), writes into ``root`` (created if needed) exactly the files and
formats the matching reader of :mod:`automtl_compiler.data` documents, and returns what it wrote as
``{split: [sample, ...]}`` with the samples in the order the reader returns them; each sample is a dict of
the raw arrays as stored (plus ``"stem"``/``"path"`` names where the layout has them).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from automtl_compiler.tasks import ALIASES

Written = dict[str, list[dict[str, Any]]]

NYUV2_CLASSES = 13
TASKONOMY_CLASSES = 17
TASKONOMY_DEPTH_INVALID = 65535


def _save_png(path: Path, arr: np.ndarray, palette: Sequence[int] | None = None) -> None:
    """Save ``arr`` as an image; the format follows the suffix (PNG, or JPEG at quality 95)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr)
    if palette is not None:
        im.putpalette(list(palette))                    # an "L" image becomes "P" with the same indices
    if path.suffix.lower() in (".jpg", ".jpeg"):
        im.save(path, quality=95)
    else:
        im.save(path)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, arr)


def _unit_normals(rng: np.random.Generator, hw: tuple[int, int]) -> np.ndarray:
    n = rng.normal(size=(*hw, 3)).astype(np.float32)
    n[..., 2] = -np.abs(n[..., 2]) - 0.1                  # facing the camera (z forward)
    return (n / np.linalg.norm(n, axis=2, keepdims=True)).astype(np.float32)


def _mtan_sample(rng: np.random.Generator, hw: tuple[int, int], label_sets: Mapping[str, int],
                 normals: bool) -> dict[str, np.ndarray]:
    h, w = hw
    out: dict[str, np.ndarray] = {"image": rng.random((h, w, 3), dtype=np.float32)}
    for folder, classes in label_sets.items():
        label = rng.integers(0, classes, (h, w)).astype(np.float32)
        label[0, : min(4, w)] = -1.0                       # MTAN's "no label"
        out[folder] = label
    depth = rng.uniform(0.5, 8.0, (h, w, 1)).astype(np.float32)
    depth[min(1, h - 1), : min(3, w)] = 0.0                # no measurement
    out["depth"] = depth
    if normals:
        normal = _unit_normals(rng, hw)
        normal[min(1, h - 1), : min(3, w)] = 0.0
        out["normal"] = normal
    return out


def _write_mtan(root: Path, counts: Mapping[str, int], hw: tuple[int, int], label_sets: Mapping[str, int],
                normals: bool, seed: int) -> Written:
    rng = np.random.default_rng(seed)
    written: Written = {}
    for split, n in counts.items():
        written[split] = []
        for i in range(n):
            arrays = _mtan_sample(rng, hw, label_sets, normals)
            for folder, arr in arrays.items():
                _save_npy(root / split / folder / f"{i}.npy", arr)
            written[split].append(arrays)
    return written


def write_nyuv2(root: str | Path, n_train: int = 4, n_val: int = 2, hw: tuple[int, int] = (16, 24),
                seed: int = 0) -> Written:
    """NYUv2 in MTAN's preprocessed layout: ``<root>/{train,val}/{image,label,depth,normal}/<i>.npy``.

    float32 arrays: image [H, W, 3] in [0, 1), label [H, W] with ids 0..12 and -1 (no label) at the first
    four pixels of row 0, depth [H, W, 1] metres in [0.5, 8) with 0 at row 1, columns 0..2, normal
    [H, W, 3] unit vectors with 0 at the same pixels. Returns ``{split: [{"image", "label", "depth",
    "normal"}, ...]}`` in index order.
    """
    return _write_mtan(Path(root), {"train": n_train, "val": n_val}, hw, {"label": NYUV2_CLASSES}, True, seed)


def write_cityscapes(root: str | Path, n_train: int = 4, n_val: int = 2, hw: tuple[int, int] = (16, 32),
                     classes: Sequence[int] = (7, 19), seed: int = 0) -> Written:
    """Cityscapes in MTAN's preprocessed layout: ``<root>/{train,val}/{image,label_<c>,depth}/<i>.npy``.

    One ``label_<c>`` folder per entry of ``classes`` (ids 0..c-1, -1 at the first four pixels of row 0),
    depth [H, W, 1] inverse depth with 0 (invalid) at row 1, columns 0..2; no normals. Returns
    ``{split: [{"image", "label_<c>", ..., "depth"}, ...]}``.
    """
    return _write_mtan(Path(root), {"train": n_train, "val": n_val}, hw,
                       {f"label_{c}": int(c) for c in classes}, False, seed)


TASKONOMY_DOMAINS = (("rgb", "rgb"), ("segment_semantic", "segmentsemantic"), ("normal", "normal"),
                     ("depth_zbuffer", "depth_zbuffer"))


def write_taskonomy(root: str | Path, n_train: int = 3, n_val: int = 2, hw: tuple[int, int] = (16, 16),
                    buildings: Sequence[str] = ("allensville", "beechwood"), index: str | None = None,
                    seed: int = 0) -> Written:
    """Tiny Taskonomy in its own naming scheme, the samples spread over ``buildings``::

        <root>/<split>/<building>/rgb/point_<p>_view_<v>_domain_rgb.png                       8-bit RGB
        <root>/<split>/<building>/segment_semantic/point_<p>_view_<v>_domain_segmentsemantic.png  8-bit
        <root>/<split>/<building>/normal/point_<p>_view_<v>_domain_normal.png                 8-bit RGB
        <root>/<split>/<building>/depth_zbuffer/point_<p>_view_<v>_domain_depth_zbuffer.png   16-bit

    Labels are stored as class + 1 (1..17) with 0 (unlabelled) at pixel (0, 0); depth in 1/512 m in
    [100, 20000) with 65535 (no measurement) at row 2, columns 0..4. ``index``: ``None`` for the scanned
    layout; ``"root"`` also writes ``<root>/taskonomy.json`` with rows relative to ``<root>`` (AdaShare),
    ``"split"`` with rows relative to the split folder (AutoMTL); the val rows go under the key ``test``
    (Taskonomy's name; the reader's ``val`` falls back to it). Returns ``{split: [{"rgb", "seg",
    "normal", "depth", "paths"}, ...]}`` in the reader's order (buildings, then file names, sorted).
    """
    if index not in (None, "root", "split"):
        raise ValueError(f"index must be None, 'root' or 'split', got {index!r}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    written: Written = {}
    table: dict[str, list[list[str]]] = {}
    for split, n in (("train", n_train), ("val", n_val)):
        samples = []
        for i in range(n):
            building = buildings[i % len(buildings)]
            stem = f"point_{i}_view_{i % 3}_domain_"
            rgb = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
            seg = rng.integers(1, TASKONOMY_CLASSES + 1, hw, dtype=np.uint8)
            seg[0, 0] = 0
            normal = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
            depth = rng.integers(100, 20000, hw).astype(np.uint16)
            depth[min(2, hw[0] - 1), :5] = TASKONOMY_DEPTH_INVALID
            paths = []
            for (folder, domain), arr in zip(TASKONOMY_DOMAINS, (rgb, seg, normal, depth)):
                rel = f"{building}/{folder}/{stem}{domain}.png"
                _save_png(root / split / rel, arr)
                paths.append(rel)
            samples.append({"rgb": rgb, "seg": seg, "normal": normal, "depth": depth, "paths": paths})
        samples.sort(key=lambda s: (s["paths"][0].split("/")[0], s["paths"][0].rsplit("/", 1)[1]))
        written[split] = samples
        if index is not None:
            table["train" if split == "train" else "test"] = [
                [(f"{split}/{p}" if index == "root" else p) for p in s["paths"]] for s in samples]
    if index is not None:
        (root / "taskonomy.json").write_text(json.dumps(table, indent=1))
    return written


DEFAULT_FOLDER_TASKS = {"segment_semantic": "segment_semantic", "depth_zbuffer": "depth_zbuffer",
                        "normal": "normal", "classification": "classification"}


def folder_palette() -> list[int]:
    """The RGB palette :func:`write_folder` gives palette label PNGs: colours unrelated to the indices."""
    return [int(v) for k in range(256) for v in ((37 * k + 11) % 256, (91 * k + 7) % 256, (53 * k + 200) % 256)]


def write_folder(root: str | Path, n_train: int = 4, n_val: int = 2, hw: tuple[int, int] = (16, 24),
                 style: str = "subfolders", tasks: Mapping[str, str] | None = None, fmt: str = "png",
                 num_classes: int = 5, palette: bool = False, depth_scale: float = 1000.0,
                 image_ext: str = ".png", seed: int = 0) -> Written:
    """A user's dataset in the ``folder`` layout (see :class:`automtl_compiler.data.FolderDataset`).

    ``style="subfolders"``: ``<root>/{train,val}/image/<stem><image_ext>``, ``<root>/<split>/<task>/<stem>.<fmt>``,
    ``<root>/<split>/<task>.csv``; ``style="lists"``: flat ``<root>/image/``, ``<root>/<task>/``,
    ``<root>/<task>.csv`` and list files ``<root>/train.txt``, ``<root>/val.txt`` (with a comment and a blank
    line). Stems are ``<split><i>`` (``train0``, ``train1``, ..., natural order). ``tasks`` maps names to
    kinds (default one task of each built-in kind, named after it); custom kinds get ``.npy`` float32
    [2, H, W] arrays.

    Stored formats with ``fmt="png"``: image 8-bit RGB; labels 8-bit grey (or palette PNG with
    ``palette``: index = class id, colours from :func:`folder_palette`) with ids 0..num_classes-1 and 255
    (ignore) at the first three pixels of row 0; depth 16-bit millimetres (metres * ``depth_scale``) with
    0 at row 1, columns 0..2; normals 8-bit RGB with (0, 0, 0) (invalid) at the same pixels. With
    ``fmt="npy"``: labels int64 [H, W] with -1 instead of 255, depth float32 [H, W] metres, normals
    float32 [H, W, 3] unit vectors (0 where invalid). Classification: ``<task>.csv`` with the header
    ``stem,label`` and ids 0..num_classes-1. Returns ``{split: [{"stem", "image", <task name>: stored
    array or class id}, ...]}`` in the reader's order.
    """
    if style not in ("subfolders", "lists"):
        raise ValueError(f"style must be 'subfolders' or 'lists', got {style!r}")
    if fmt not in ("png", "npy"):
        raise ValueError(f"fmt must be 'png' or 'npy', got {fmt!r}")
    root = Path(root)
    tasks = {name: ALIASES.get(kind, kind) for name, kind in (DEFAULT_FOLDER_TASKS if tasks is None else tasks).items()}
    rng = np.random.default_rng(seed)
    h, w = hw
    written: Written = {}
    csv_rows: dict[tuple[str, str], list[str]] = {}
    for split, n in (("train", n_train), ("val", n_val)):
        base = root / split if style == "subfolders" else root
        samples = []
        for i in range(n):
            stem = f"{split}{i}"
            sample: dict[str, Any] = {"stem": stem, "image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8)}
            _save_png(base / "image" / f"{stem}{image_ext}", sample["image"])
            for name, kind in tasks.items():
                if kind == "classification":
                    value = int(rng.integers(0, num_classes))
                    csv_key = (split if style == "subfolders" else "", name)
                    csv_rows.setdefault(csv_key, ["stem,label"]).append(f"{stem},{value}")
                    sample[name] = value
                    continue
                arr = _folder_target(rng, kind, hw, fmt, num_classes, depth_scale)
                ext = ".npy" if fmt == "npy" or kind not in ("segment_semantic", "depth_zbuffer", "normal") else ".png"
                path = base / name / f"{stem}{ext}"
                if ext == ".npy":
                    _save_npy(path, arr)
                else:
                    _save_png(path, arr, folder_palette() if palette and kind == "segment_semantic"
                              else None)
                sample[name] = arr
            samples.append(sample)
        written[split] = samples
        if style == "lists":
            lines = ["# stems of the " + split + " split", "", *[s["stem"] for s in samples]]
            (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    for (split, name), rows in csv_rows.items():
        (root / split / f"{name}.csv").write_text("\n".join(rows) + "\n")
    return written


def _folder_target(rng: np.random.Generator, kind: str, hw: tuple[int, int], fmt: str, num_classes: int,
                   depth_scale: float) -> np.ndarray:
    h, w = hw
    r1 = min(1, h - 1)
    if kind == "segment_semantic":
        lab = rng.integers(0, num_classes, hw)
        lab[0, :3] = 255 if fmt == "png" else -1
        return lab.astype(np.uint8) if fmt == "png" else lab.astype(np.int64)
    if kind == "depth_zbuffer":
        metres = rng.uniform(0.3, 10.0, hw)
        metres[r1, :3] = 0.0
        if fmt == "png":
            return np.round(metres * depth_scale).astype(np.uint16)
        return metres.astype(np.float32)
    if kind == "normal":
        if fmt == "png":
            rgb = rng.integers(1, 256, (h, w, 3), dtype=np.uint8)
            rgb[r1, :3] = 0
            return rgb
        n = _unit_normals(rng, hw)
        n[r1, :3] = 0.0
        return n
    return rng.normal(size=(2, h, w)).astype(np.float32)
