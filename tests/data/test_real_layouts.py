"""Real-layout readers over tiny written datasets (exact decoding), their errors, the folder dataset, the registry."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from automtl_compiler.data import (
    Cityscapes,
    FolderDataset,
    NYUv2,
    Taskonomy,
    available_datasets,
    collate,
    get_dataset,
    register_dataset,
)
from automtl_compiler.data import registry as registry_module
from automtl_compiler.errors import AutomtlError, FileFormatError
from automtl_compiler.tasks.base import nearest_resize
from tests.realdata import (
    folder_palette,
    write_cityscapes,
    write_folder,
    write_nyuv2,
    write_taskonomy,
)
from tests.userdata import ToyDataset

ALL_KINDS = {"segment_semantic": "segment_semantic", "depth_zbuffer": "depth_zbuffer", "normal": "normal",
             "classification": "classification"}


def chw(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(arr, -1, 0))).float()


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


# ============================================================================ MTAN layout (NYUv2, Cityscapes)

def test_nyuv2_gives_exactly_the_written_values(tmp_path):
    written = write_nyuv2(tmp_path, n_train=3, n_val=2, hw=(12, 20))
    for split in ("train", "val"):
        ds = get_dataset("nyuv2", root=tmp_path, split=split, augment=False)
        assert len(ds) == len(written[split])
        for i, ref in enumerate(written[split]):
            img, tgt = ds[i]
            assert torch.equal(img, chw(ref["image"]))
            label = torch.from_numpy(ref["label"]).long()
            assert torch.equal(tgt["segment_semantic"], torch.where(label < 0, 255, label))
            assert int((tgt["segment_semantic"] == 255).sum()) == 4
            assert torch.equal(tgt["depth_zbuffer"], chw(ref["depth"]))
            assert float(tgt["depth_zbuffer"][0, 1, 0]) == 0.0
            assert torch.equal(tgt["normal"], chw(ref["normal"]))
    assert get_dataset("nyuv2", root=tmp_path).augment and not get_dataset("nyuv2", root=tmp_path, split="val").augment


def test_cityscapes_label_sets(tmp_path):
    written = write_cityscapes(tmp_path, n_train=2, n_val=1, classes=(7, 19))
    for classes in (7, 19):
        ds = get_dataset("cityscapes", root=tmp_path, split="val", num_classes=classes)
        _, tgt = ds[0]
        label = torch.from_numpy(written["val"][0][f"label_{classes}"]).long()
        assert torch.equal(tgt["segment_semantic"], torch.where(label < 0, 255, label))
        assert torch.equal(tgt["depth_zbuffer"], chw(written["val"][0]["depth"]))
        assert ds.num_classes == {"segment_semantic": classes, "depth_zbuffer": 1}


def test_mtan_label_outside_class_count_names_file_value_and_count(tmp_path):
    write_nyuv2(tmp_path, n_train=1, n_val=2, hw=(8, 8))
    label = np.zeros((8, 8), np.float32)
    label[3, 3] = 20
    np.save(tmp_path / "val" / "label" / "1.npy", label)
    ds = NYUv2(tmp_path, "val")                           # checked lazily: construction does not read labels
    ds[0]
    with pytest.raises(FileFormatError) as err:
        ds[1]
    text = one_line(err)
    assert "label/1.npy" in text.replace("\\", "/") and "20" in text and "13 classes" in text
    label[3, 3] = 255                                     # the ignore index itself is allowed
    label[4, 4] = -3                                      # negatives mean "no label"
    np.save(tmp_path / "val" / "label" / "1.npy", label)
    seg = ds[1][1]["segment_semantic"]
    assert int(seg[3, 3]) == 255 and int(seg[4, 4]) == 255 and int(seg[0, 0]) == 0
    label[5, 5] = 2.5
    np.save(tmp_path / "val" / "label" / "1.npy", label)
    with pytest.raises(FileFormatError, match="not an integer"):
        ds[1]


def test_cityscapes_label_outside_set(tmp_path):
    write_cityscapes(tmp_path, n_train=1, n_val=1, hw=(8, 8), classes=(7,))
    np.save(tmp_path / "val" / "label_7" / "0.npy", np.full((8, 8), 7, np.float32))
    with pytest.raises(FileFormatError, match=r"label_7[/\\]0\.npy: label value 7 .*7 classes") as err:
        Cityscapes(tmp_path, "val")[0]
    assert "num_classes" in one_line(err)


def test_mtan_target_size_differs_from_image(tmp_path):
    write_nyuv2(tmp_path, n_train=1, n_val=1, hw=(8, 8))
    np.save(tmp_path / "val" / "normal" / "0.npy", np.zeros((8, 9, 3), np.float32))
    with pytest.raises(FileFormatError, match=r"normal[/\\]0\.npy.*\(8, 9, 3\)"):
        NYUv2(tmp_path, "val")[0]


def test_truncated_npy_is_rejected_before_allocating(tmp_path):
    write_nyuv2(tmp_path, n_train=1, n_val=1, hw=(8, 8))
    path = tmp_path / "val" / "depth" / "0.npy"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(FileFormatError, match=r"depth[/\\]0\.npy.*truncated or corrupt"):
        NYUv2(tmp_path, "val")[0]
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1,), np.float64))
    header["shape"] = (1 << 40,)                          # claims 8 TiB
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
    with pytest.raises(FileFormatError, match="more than"):
        NYUv2(tmp_path, "val")[0]


# ============================================================================ Taskonomy

def expected_taskonomy(ref: dict, units: str = "log") -> dict[str, torch.Tensor]:
    d = torch.from_numpy(ref["depth"].astype(np.float64))
    valid = d < 64500
    depth = torch.log1p(d) / math.log(2 ** 16) if units == "log" else d / 512
    seg = torch.from_numpy(ref["seg"].astype(np.int64))
    normal = torch.from_numpy(ref["normal"].astype(np.float64)).permute(2, 0, 1) / 255 * 2 - 1
    return {"segment_semantic": torch.where(seg > 0, seg - 1, 255),
            "depth_zbuffer": torch.where(valid, depth, 0.0)[None],
            "normal": torch.where(valid[None], normal, 0.0)}


@pytest.mark.parametrize("index", [None, "root", "split"])
def test_taskonomy_closed_form_decoding(tmp_path, index):
    written = write_taskonomy(tmp_path, n_train=3, n_val=2, hw=(12, 12), index=index)
    if index is not None:
        assert (tmp_path / "taskonomy.json").is_file()
    for split in ("train", "val"):
        ds = Taskonomy(tmp_path, split, resolution=(12, 12), augment=False)
        assert len(ds) == len(written[split])
        for i, ref in enumerate(written[split]):
            img, tgt = ds[i]
            assert torch.allclose(img, chw(ref["rgb"]) / 255, atol=1e-6)
            exp = expected_taskonomy(ref)
            assert torch.equal(tgt["segment_semantic"], exp["segment_semantic"])
            assert int(tgt["segment_semantic"][0, 0]) == 255
            assert torch.allclose(tgt["depth_zbuffer"].double(), exp["depth_zbuffer"], atol=1e-6)
            assert bool((tgt["depth_zbuffer"][0, 2, :5] == 0).all())
            assert torch.allclose(tgt["normal"].double(), exp["normal"], atol=1e-6)
            assert bool((tgt["normal"][:, 2, :5] == 0).all())
    metres = Taskonomy(tmp_path, "val", resolution=(12, 12), depth_units="metres", tasks=["depth_zbuffer"])
    exp = expected_taskonomy(written["val"][0], units="metres")
    assert torch.allclose(metres[0][1]["depth_zbuffer"].double(), exp["depth_zbuffer"], atol=1e-5)


def test_taskonomy_json_rows_follow_the_index(tmp_path):
    write_taskonomy(tmp_path, n_train=3, n_val=1, index="root")
    table = json.loads((tmp_path / "taskonomy.json").read_text())
    assert set(table) == {"train", "test"} and all(len(row) == 4 for row in table["train"])
    table["train"] = table["train"][:2]
    (tmp_path / "taskonomy.json").write_text(json.dumps(table))
    assert len(Taskonomy(tmp_path, "train")) == 2


def test_taskonomy_label_out_of_range_and_void(tmp_path):
    written = write_taskonomy(tmp_path, n_train=1, n_val=0, hw=(8, 8))
    seg_path = tmp_path / "train" / written["train"][0]["paths"][1]
    seg = written["train"][0]["seg"].copy()
    seg[4, 4] = 255                                       # void: no label
    Image.fromarray(seg).save(seg_path)
    ds = Taskonomy(tmp_path, "train", resolution=(8, 8), augment=False)
    assert int(ds[0][1]["segment_semantic"][4, 4]) == 255
    seg[5, 5] = 19
    Image.fromarray(seg).save(seg_path)
    with pytest.raises(FileFormatError) as err:
        ds[0]
    text = one_line(err)
    assert seg_path.name in text and "19" in text and "17" in text


def test_taskonomy_label_png_of_other_size_than_rgb(tmp_path):
    written = write_taskonomy(tmp_path, n_train=1, n_val=0, hw=(8, 8))
    for col, name in ((1, "segmentsemantic"), (3, "depth_zbuffer"), (2, "normal")):
        root = tmp_path / name
        shutil.copytree(tmp_path / "train", root / "train")
        path = root / "train" / written["train"][0]["paths"][col]
        arr = np.array(Image.open(path))
        Image.fromarray(arr[:, :6].copy()).save(path)
        with pytest.raises(FileFormatError) as err:
            Taskonomy(root, "train", resolution=(8, 8))[0]
        text = one_line(err)
        assert path.name in text and "8x6" in text and "8x8" in text


# ============================================================================ folder dataset

FOLDER_TASKS = {"seg": "segment_semantic", "depth": "depth_zbuffer", "surface": "normal", "scene": "classification",
                "flow": "optical_flow"}


def expected_folder(ref: dict, fmt: str, depth_scale: float = 1000.0) -> dict[str, torch.Tensor]:
    seg = torch.from_numpy(ref["seg"].astype(np.int64))
    if fmt == "png":
        depth = torch.from_numpy(ref["depth"].astype(np.float32)) / depth_scale
        rgb = ref["surface"]
        normal = chw(rgb) / 255 * 2 - 1
        normal[:, (rgb == 0).all(axis=2)] = 0.0
    else:
        depth = torch.from_numpy(ref["depth"])
        normal = chw(ref["surface"])
    return {"seg": torch.where(seg < 0, 255, seg), "depth": depth[None], "surface": normal,
            "scene": torch.tensor(ref["scene"]), "flow": torch.from_numpy(ref["flow"])}


@pytest.mark.parametrize("style", ["subfolders", "lists"])
@pytest.mark.parametrize("fmt", ["png", "npy"])
def test_folder_gives_the_written_values(tmp_path, style, fmt):
    written = write_folder(tmp_path, n_train=3, n_val=2, hw=(10, 14), style=style, fmt=fmt, tasks=FOLDER_TASKS)
    for split in ("train", "val"):
        ds = get_dataset("folder", root=tmp_path, split=split, tasks=FOLDER_TASKS, num_classes={"seg": 5, "scene": 5},
                         augment=False)
        assert ds.tasks == tuple(FOLDER_TASKS) and ds.task_kinds == FOLDER_TASKS
        assert ds.stems == [s["stem"] for s in written[split]]
        assert ds.num_classes == {"seg": 5, "depth": 1, "surface": 3, "scene": 5, "flow": None}
        for i, ref in enumerate(written[split]):
            img, tgt = ds[i]
            assert img.dtype == torch.float32 and torch.equal(img, chw(ref["image"]) / 255)
            exp = expected_folder(ref, fmt)
            assert list(tgt) == list(FOLDER_TASKS)
            assert tgt["seg"].dtype == torch.int64 and torch.equal(tgt["seg"], exp["seg"])
            assert int((tgt["seg"] == 255).sum()) >= 3
            assert tgt["depth"].dtype == torch.float32 and torch.allclose(tgt["depth"], exp["depth"])
            assert float(tgt["depth"][0, 1, 0]) == 0.0
            assert torch.allclose(tgt["surface"], exp["surface"]) and bool((tgt["surface"][:, 1, :3] == 0).all())
            assert tgt["scene"].dtype == torch.int64 and tgt["scene"].shape == () and torch.equal(tgt["scene"], exp["scene"])
            assert torch.equal(tgt["flow"], exp["flow"])
    batch = collate([ds[0], ds[1]])
    assert batch[0].shape == (2, 3, 10, 14) and batch[1]["scene"].shape == (2,)


def test_folder_palette_png_index_is_the_class(tmp_path):
    written = write_folder(tmp_path, n_train=2, n_val=0, style="subfolders", palette=True, num_classes=6,
                           tasks={"segment_semantic": "segment_semantic"})
    path = tmp_path / "train" / "segment_semantic" / "train0.png"
    with Image.open(path) as im:
        assert im.mode == "P" and im.getpalette()[:6] == folder_palette()[:6]
    ds = FolderDataset(tmp_path, "train", tasks=["segment_semantic"], num_classes=6, augment=False)
    assert torch.equal(ds[0][1]["segment_semantic"], torch.from_numpy(written["train"][0]["segment_semantic"]).long())


def test_folder_16bit_labels_greyscale_and_jpeg_images(tmp_path):
    write_folder(tmp_path, n_train=2, n_val=0, tasks={"seg": "segment_semantic"}, num_classes=3)
    labels = np.full((16, 24), 300, np.uint16)
    labels[0, 0] = 2
    Image.fromarray(labels).save(tmp_path / "train" / "seg" / "train0.png")
    ds = FolderDataset(tmp_path, "train", tasks={"seg": "segment_semantic"}, augment=False)  # no class count
    assert int(ds[0][1]["seg"][1, 1]) == 300 and int(ds[0][1]["seg"][0, 0]) == 2
    grey = np.arange(16 * 24, dtype=np.uint8).reshape(16, 24)
    Image.fromarray(grey).save(tmp_path / "train" / "image" / "train1.png")
    img = ds[1][0]
    assert img.shape == (3, 16, 24) and torch.equal(img[0], img[2])
    assert torch.equal(img[1], torch.from_numpy(grey).float() / 255)
    (tmp_path / "train" / "image" / "train1.png").unlink()
    yy, xx = np.mgrid[0:16, 0:24]
    rgb = np.stack([xx * 10, yy * 15, xx * 5 + yy * 5], axis=2).astype(np.uint8)      # smooth: JPEG keeps it
    Image.fromarray(rgb).save(tmp_path / "train" / "image" / "train1.JPG", quality=95, subsampling=0)
    ds = FolderDataset(tmp_path, "train", tasks={"seg": "segment_semantic"}, augment=False)
    img = ds[1][0]
    assert img.shape == (3, 16, 24) and float((img - chw(rgb) / 255).abs().max()) < 0.05
    Image.fromarray(labels).save(tmp_path / "train" / "image" / "train0.png")      # a 16-bit image
    with pytest.raises(FileFormatError, match=r"train0\.png: a 16-bit image; images must be 8-bit"):
        ds[0]


def test_folder_npy_layout_variants(tmp_path):
    written = write_folder(tmp_path, n_train=1, n_val=0, fmt="npy", tasks={"d": "depth", "n": "normal"})
    ref = written["train"][0]
    np.save(tmp_path / "train" / "d" / "train0.npy", ref["d"][..., None])          # [H, W, 1]
    np.save(tmp_path / "train" / "n" / "train0.npy", np.ascontiguousarray(ref["n"].transpose(2, 0, 1)))  # [3, H, W]
    ds = FolderDataset(tmp_path, "train", tasks={"d": "depth", "n": "normal"})
    assert ds.task_kinds == {"d": "depth_zbuffer", "n": "normal"}
    _, tgt = ds.load(0)
    assert torch.equal(tgt["d"], torch.from_numpy(ref["d"])[None])
    assert torch.equal(tgt["n"], chw(ref["n"]))
    depth = ref["d"].copy()
    depth[2, 2] = np.nan
    np.save(tmp_path / "train" / "d" / "train0.npy", depth)
    assert float(ds.load(0)[1]["d"][0, 2, 2]) == 0.0                                  # non-finite: no measurement


def test_folder_depth_scale_option(tmp_path):
    written = write_folder(tmp_path, n_train=1, n_val=0, tasks={"depth_zbuffer": "depth_zbuffer"}, depth_scale=256.0)
    ds = get_dataset("folder", root=tmp_path, tasks=["depth_zbuffer"], depth_scale=256.0)
    raw = torch.from_numpy(written["train"][0]["depth_zbuffer"].astype(np.float32))
    assert torch.equal(ds.load(0)[1]["depth_zbuffer"][0], raw / 256.0)


def test_folder_resolution_resizes_image_and_targets(tmp_path):
    write_folder(tmp_path, n_train=1, n_val=0, hw=(12, 16), tasks=FOLDER_TASKS)
    plain = FolderDataset(tmp_path, "train", tasks=FOLDER_TASKS, augment=False)
    small = FolderDataset(tmp_path, "train", tasks=FOLDER_TASKS, augment=False, resolution=(6, 10))
    (img0, t0), (img, t) = plain[0], small[0]
    assert img.shape == (3, 6, 10) and float(img.min()) >= 0 and float(img.max()) <= 1
    resized = torch.nn.functional.interpolate(img0[None], size=(6, 10), mode="bilinear", antialias=True)[0]
    assert torch.allclose(img, resized.clamp(0, 1))
    for k in ("seg", "depth", "surface", "flow"):
        assert torch.equal(t[k], nearest_resize(t0[k], (6, 10))), k
    assert torch.equal(t["scene"], t0["scene"])


def test_folder_augment_flips_with_normal_x_negated(tmp_path):
    write_folder(tmp_path, n_train=2, n_val=1, tasks=FOLDER_TASKS)
    plain = FolderDataset(tmp_path, "train", tasks=FOLDER_TASKS, augment=False)
    aug = get_dataset("folder", root=tmp_path, split="train", tasks=FOLDER_TASKS)
    assert aug.augment and not get_dataset("folder", root=tmp_path, split="val", tasks=FOLDER_TASKS).augment
    flipped = kept = 0
    for epoch in range(10):
        aug.set_epoch(epoch)
        (img, t), (img0, t0) = aug[1], plain[1]
        assert torch.equal(t["scene"], t0["scene"])
        if torch.equal(img, img0):
            kept += 1
            continue
        flipped += 1
        assert torch.equal(img, img0.flip(-1))
        for k in ("seg", "depth", "flow"):
            assert torch.equal(t[k], t0[k].flip(-1)), k
        assert torch.equal(t["surface"][0], -t0["surface"][0].flip(-1))
        assert torch.equal(t["surface"][1:], t0["surface"][1:].flip(-1))
        assert torch.equal(aug[1][0], img)                # same (seed, epoch, index): same draw
    assert flipped and kept


def test_folder_tasks_discovered_and_split_files(tmp_path):
    write_folder(tmp_path, n_train=3, n_val=2, style="lists")
    ds = FolderDataset(tmp_path, "val")
    assert set(ds.tasks) == set(ALL_KINDS) and ds.stems == ["val0", "val1"]
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "mine.txt").write_text("train2\ntrain0.png  # extensions and comments are fine\n")
    ds = get_dataset("folder", root=tmp_path, split="train", split_files={"train": "lists/mine.txt"})
    assert ds.stems == ["train2", "train0"]                                           # list order
    with pytest.raises(AutomtlError, match="split_files names no list file for split 'val'"):
        get_dataset("folder", root=tmp_path, split="val", split_files={"train": "lists/mine.txt"})


def test_folder_natural_order(tmp_path):
    write_folder(tmp_path, n_train=12, n_val=0, hw=(4, 4), tasks={"depth_zbuffer": "depth_zbuffer"})
    ds = FolderDataset(tmp_path, "train")
    assert ds.stems == [f"train{i}" for i in range(12)]


def test_collate_of_different_sizes_names_the_fix(tmp_path):
    write_folder(tmp_path, n_train=2, n_val=0, tasks={"depth_zbuffer": "depth_zbuffer"})
    rgb = np.zeros((8, 8, 3), np.uint8)
    Image.fromarray(rgb).save(tmp_path / "train" / "image" / "train1.png")
    Image.fromarray(np.ones((8, 8), np.uint16)).save(tmp_path / "train" / "depth_zbuffer" / "train1.png")
    ds = FolderDataset(tmp_path, "train", augment=False)
    with pytest.raises(AutomtlError, match="resize"):
        collate([ds[0], ds[1]])
    ds = FolderDataset(tmp_path, "train", augment=False, resolution=(8, 8))
    assert collate([ds[0], ds[1]])[0].shape == (2, 3, 8, 8)


# ----------------------------------------------------------------------------- folder errors

def test_folder_missing_root_and_layout(tmp_path):
    with pytest.raises(FileFormatError, match="nowhere: directory not found") as err:
        get_dataset("folder", root=tmp_path / "nowhere")
    assert "image" in one_line(err)
    (tmp_path / "other").mkdir()
    with pytest.raises(FileFormatError, match=r"no train/ folder and no train\.txt list file .*found other"):
        get_dataset("folder", root=tmp_path)
    (tmp_path / "train").mkdir()
    with pytest.raises(FileFormatError, match=r"train[/\\]image: directory not found"):
        get_dataset("folder", root=tmp_path)
    with pytest.raises(AutomtlError, match="root"):
        get_dataset("folder")


def test_folder_image_without_target_names_the_missing_file(tmp_path):
    write_folder(tmp_path, n_train=3, n_val=0, tasks=FOLDER_TASKS)
    (tmp_path / "train" / "surface" / "train1.png").unlink()
    with pytest.raises(FileFormatError) as err:
        FolderDataset(tmp_path, "train", tasks=FOLDER_TASKS)                           # at construction
    text = one_line(err)
    assert "surface" in text and "train1.png" in text and "'surface'" in text


def test_folder_list_file_stem_that_does_not_exist(tmp_path):
    write_folder(tmp_path, n_train=2, n_val=1, style="lists")
    (tmp_path / "val.txt").write_text("# val\nval0\n\nval7\n")
    with pytest.raises(FileFormatError, match=r"val\.txt:4: no image 'val7'"):
        FolderDataset(tmp_path, "val")
    (tmp_path / "val.txt").write_text("val0\nval0\n")
    with pytest.raises(FileFormatError, match=r"val\.txt:2: 'val0' is listed twice \(also on line 1\)"):
        FolderDataset(tmp_path, "val")


def test_folder_label_outside_class_count(tmp_path):
    write_folder(tmp_path, n_train=1, n_val=0, tasks={"seg": "segment_semantic"}, num_classes=4)
    labels = np.zeros((16, 24), np.uint8)
    labels[2, 2] = 9
    labels[3, 3] = 255
    Image.fromarray(labels).save(tmp_path / "train" / "seg" / "train0.png")
    ds = FolderDataset(tmp_path, "train", tasks={"seg": "segment_semantic"}, num_classes=4)
    with pytest.raises(FileFormatError) as err:
        ds[0]
    text = one_line(err)
    assert "seg" in text and "train0.png" in text and "value 9" in text and "4 classes" in text
    ds = FolderDataset(tmp_path, "train", tasks={"seg": "segment_semantic"}, num_classes=10, augment=False)
    assert int(ds[0][1]["seg"][3, 3]) == 255 and int(ds[0][1]["seg"][2, 2]) == 9


@pytest.mark.parametrize("task,shape", [("seg", (16, 20)), ("depth", (15, 24)), ("surface", (16, 23, 3))])
def test_folder_target_size_differs_from_image(tmp_path, task, shape):
    write_folder(tmp_path, n_train=1, n_val=0, fmt="npy", tasks=FOLDER_TASKS)
    np.save(tmp_path / "train" / task / "train0.npy", np.zeros(shape, np.float32 if task != "seg" else np.int64))
    with pytest.raises(FileFormatError, match=rf"{task}[/\\]train0\.npy") as err:
        FolderDataset(tmp_path, "train", tasks=FOLDER_TASKS)[0]
    assert "16" in one_line(err) and "24" in str(err.value)


def test_folder_png_target_of_other_size(tmp_path):
    write_folder(tmp_path, n_train=1, n_val=0, tasks={"seg": "segment_semantic"})
    Image.fromarray(np.zeros((16, 20), np.uint8)).save(tmp_path / "train" / "seg" / "train0.png")
    with pytest.raises(FileFormatError, match=r"train0\.png: target of 16x20 .* is 16x24"):
        FolderDataset(tmp_path, "train", tasks={"seg": "segment_semantic"})[0]


def test_folder_wrong_file_kinds(tmp_path):
    write_folder(tmp_path, n_train=1, n_val=0, tasks={"seg": "segment_semantic", "depth": "depth_zbuffer"})
    Image.fromarray(np.zeros((16, 24, 3), np.uint8)).save(tmp_path / "train" / "seg" / "train0.png")
    Image.fromarray(np.zeros((16, 24), np.uint8)).save(tmp_path / "train" / "depth" / "train0.png")
    ds = FolderDataset(tmp_path, "train", tasks={"seg": "segment_semantic", "depth": "depth_zbuffer"})
    with pytest.raises(FileFormatError, match=r"seg[/\\]train0\.png: a RGB label image"):
        ds[0]
    ds = FolderDataset(tmp_path, "train", tasks={"depth": "depth_zbuffer"})
    with pytest.raises(FileFormatError, match=r"depth[/\\]train0\.png: .*must be 16-bit"):
        ds[0]
    with pytest.raises(FileFormatError, match=r"kind 'segmentation'.*must be \.npy"):
        FolderDataset(tmp_path, "train", tasks={"seg": "segmentation"})
    shutil.copy(tmp_path / "train" / "image" / "train0.png", tmp_path / "train" / "image" / "train0.jpg")
    with pytest.raises(FileFormatError, match="both hold sample 'train0'"):
        FolderDataset(tmp_path, "train", tasks={"depth": "depth_zbuffer"})
    with pytest.raises(AutomtlError, match="'image' cannot be a task name|cannot be a task name"):
        FolderDataset(tmp_path, "train", tasks={"image": "segment_semantic"})


def test_folder_classification_csv_errors(tmp_path):
    write_folder(tmp_path, n_train=3, n_val=0, tasks={"scene": "classification"}, num_classes=3)
    csv_path = tmp_path / "train" / "scene.csv"
    assert FolderDataset(tmp_path, "train", tasks={"scene": "classification"}, num_classes=3).num_classes == {"scene": 3}
    csv_path.write_text("stem,label\ntrain0,1\ntrain1,5\ntrain2,0\n")
    with pytest.raises(FileFormatError, match=r"scene\.csv:3: class id 5 is outside the 3 classes"):
        FolderDataset(tmp_path, "train", tasks={"scene": "classification"}, num_classes=3)
    csv_path.write_text("# no header\ntrain0,1\ntrain2,0\n")
    with pytest.raises(FileFormatError, match=r"scene\.csv: no class id for 1 image.*'train1'"):
        FolderDataset(tmp_path, "train", tasks={"scene": "classification"})
    csv_path.write_text("train0,1\ntrain1,x\n")
    with pytest.raises(FileFormatError, match=r"scene\.csv:2: expected '<stem>,<class id>'"):
        FolderDataset(tmp_path, "train", tasks={"scene": "classification"})
    csv_path.unlink()
    with pytest.raises(FileFormatError, match=r"scene\.csv: file not found"):
        FolderDataset(tmp_path, "train", tasks={"scene": "classification"})


# ============================================================================ registry

@pytest.fixture
def clean_registry():
    with registry_module.DATASETS.snapshot():
        yield


def test_registry_names_and_defaults_per_dataset(clean_registry):
    assert available_datasets() == ["cityscapes", "folder", "nyuv2", "synthetic", "taskonomy"]
    register_dataset("toy", ToyDataset, defaults={"length": 3, "hw": [8, 8]})
    register_dataset("toy_big", ToyDataset, defaults={"length": 5})
    assert "toy" in available_datasets()
    toy = get_dataset("toy", split="val")
    assert len(toy) == 3 and toy[0][0].shape == (3, 8, 8)

    def greedy(split: str = "train", seen: list | None = None) -> ToyDataset:
        seen.append(split)                                # a constructor that mutates its option
        return ToyDataset(split=split, length=len(seen))

    register_dataset("greedy", greedy, defaults={"seen": []})
    assert len(get_dataset("greedy")) == len(get_dataset("greedy", split="val")) == 1   # defaults copied per call
    assert len(get_dataset("toy", length=7)) == 7
    assert len(get_dataset("toy")) == 3                                              # the option did not stick
    assert len(get_dataset("toy_big")) == 5 and get_dataset("toy_big")[0][0].shape == (3, 16, 16)
    assert len(get_dataset("synthetic", split="val")) == 1000                        # nothing leaks into synthetic
    assert len(get_dataset("synthetic", split="policy")) == 2000
    with pytest.raises(AutomtlError, match="already registered"):
        register_dataset("toy", ToyDataset)
    register_dataset("toy", ToyDataset, defaults={"length": 2}, replace=True)
    assert len(get_dataset("TOY")) == 2
    with pytest.raises(AutomtlError, match=r"bad options \['colour'\]"):
        register_dataset("toy3", ToyDataset, defaults={"colour": 1})


def test_unknown_option_names_dataset_and_accepted_options(tmp_path):
    write_nyuv2(tmp_path, n_train=1, n_val=1, hw=(4, 4))
    with pytest.raises(AutomtlError) as err:
        get_dataset("nyuv2", root=tmp_path, resolution=(4, 4))
    assert one_line(err) == (f"dataset 'nyuv2' (MTAN's layout in {tmp_path}): bad options ['resolution']; it "
                             "accepts augment, scales, flip, ignore_index, seed")
    with pytest.raises(AutomtlError, match=r"'folder': bad options \['length'\]; it accepts augment, depth_scale"):
        get_dataset("folder", root=tmp_path, length=3)
    with pytest.raises(AutomtlError, match=r"'synthetic': bad options \['depth_scale'\]; it accepts cache"):
        get_dataset("synthetic", depth_scale=3)
    with pytest.raises(AutomtlError, match="bad options"):
        get_dataset("taskonomy", root=tmp_path, resolution=5)                        # a bad value: TypeError inside


def test_tasks_reach_only_constructors_that_take_them(tmp_path):
    write_nyuv2(tmp_path, n_train=1, n_val=1, hw=(4, 4))
    ds = get_dataset("nyuv2", root=tmp_path, split="val", tasks={"depth_zbuffer": "depth_zbuffer", "normal": "normal"})
    assert ds.tasks == ("depth_zbuffer", "normal")
    assert get_dataset("nyuv2", root=tmp_path, tasks=["normal"]).tasks == ("normal",)
    with pytest.raises(AutomtlError, match="task 'seg' of kind 'segment_semantic' must be called 'segment_semantic'"):
        get_dataset("nyuv2", root=tmp_path, tasks={"seg": "segment_semantic"})
    syn = get_dataset("synthetic", split="val", length=2, tasks={"depth_zbuffer": "depth_zbuffer"})
    assert syn.tasks == ("depth_zbuffer",)
    fac = get_dataset("tests.userdata:toy_factory", split="val", tasks={"x": "custom"}, length=2)
    assert len(fac) == 2 and fac.split == "val"                                      # no tasks parameter: not passed


def test_user_class_by_path(tmp_path):
    ds = get_dataset("tests.userdata:ToyDataset", split="val", tasks={"seg": "segment_semantic", "label": "classification",
                                                                       "edges": "edge_texture"}, length=3, hw=(6, 6))
    assert isinstance(ds, ToyDataset) and ds.task_kinds == {"seg": "segment_semantic", "label": "classification",
                                                             "edges": "edge_texture"}
    img, tgt = ds[2]
    assert img.shape == (3, 6, 6) and tgt["label"].shape == () and tgt["edges"].shape == (1, 6, 6)
    assert get_dataset("tests.userdata:ToyDataset", root=tmp_path).root == tmp_path
    list_tasks = get_dataset("tests.userdata:ToyDataset", tasks=["segment_semantic", "normal"])
    assert list_tasks.task_kinds == {"segment_semantic": "segment_semantic", "normal": "normal"}
    with pytest.raises(AutomtlError) as err:
        get_dataset("tests.userdata:ToyDataset", root=tmp_path / "missing")
    assert "ToyDataset(split='train', ...) raised FileNotFoundError: no directory" in one_line(err)
    with pytest.raises(AutomtlError, match=r"ToyDataset\(split='test', \.\.\.\) raised ValueError"):
        get_dataset("tests.userdata:ToyDataset", split="test")
    with pytest.raises(AutomtlError, match=r"bad options \['colour'\]; it accepts hw, length, num_classes, seed"):
        get_dataset("tests.userdata:ToyDataset", colour="red")


def test_user_class_path_errors(tmp_path):
    with pytest.raises(AutomtlError, match="cannot import no_such_pkg_xyz.data") as err:
        get_dataset("no_such_pkg_xyz.data:Thing")
    assert "PYTHONPATH" in one_line(err)
    with pytest.raises(AutomtlError, match="module tests.userdata has no attribute Missing"):
        get_dataset("tests.userdata:Missing")
    with pytest.raises(AutomtlError, match=r"NotADataset is not a torch\.utils\.data\.Dataset subclass"):
        get_dataset("tests.userdata:NotADataset")
    with pytest.raises(AutomtlError, match=r"returned a list, not a torch\.utils\.data\.Dataset"):
        get_dataset("tests.userdata:not_a_dataset_factory")
    with pytest.raises(AutomtlError, match="SPLIT_CODES is a dict"):
        get_dataset("tests.userdata:SPLIT_CODES")
    with pytest.raises(AutomtlError, match="takes no root"):
        get_dataset("tests.userdata:toy_factory", root=tmp_path)
    with pytest.raises(AutomtlError, match="not a dataset name"):
        get_dataset("tests/userdata.py:ToyDataset")


def test_root_rules():
    for name in ("nyuv2", "cityscapes", "taskonomy", "folder"):
        with pytest.raises(AutomtlError, match="give root=<directory>"):
            get_dataset(name)
    with pytest.raises(AutomtlError, match="rendered, not read from disk.*give no root"):
        get_dataset("synthetic", root=".")


def test_set_epoch_reaches_persistent_workers(tmp_path):
    write_folder(tmp_path, n_train=4, n_val=0, hw=(6, 8), tasks={"normal": "normal"})
    ds = FolderDataset(tmp_path, "train")
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, persistent_workers=True, collate_fn=collate)
    seen = []
    for epoch in range(4):
        ds.set_epoch(epoch)
        images, _ = next(iter(loader))
        assert torch.equal(images, collate([ds[i] for i in range(4)])[0]), epoch     # the workers drew this epoch
        seen.append(images)
    assert not all(torch.equal(seen[0], s) for s in seen[1:])


class EpochKeyed(torch.utils.data.Dataset):
    """Keys ``(index, epoch)``: each worker sets the epoch itself before reading (as the trainer's loader)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch = key
        self.dataset.set_epoch(epoch)
        return self.dataset[index]


def test_set_epoch_inside_workers_stays_in_that_worker(tmp_path):
    write_folder(tmp_path, n_train=6, n_val=0, hw=(6, 8), tasks={"normal": "normal"})
    ds = FolderDataset(tmp_path, "train")
    keys = [[(i, e) for i in range(6)] for e in range(5)]                            # batches of epochs 0..4
    loader = torch.utils.data.DataLoader(EpochKeyed(ds), batch_sampler=keys, num_workers=2, collate_fn=collate,
                                         prefetch_factor=4)
    got = [b[0] for b in loader]
    for e in range(5):
        ds.set_epoch(e)
        assert torch.equal(got[e], collate([ds[i] for i in range(6)])[0]), e
    assert ds.epoch == 4 and ds._own_epoch is None
