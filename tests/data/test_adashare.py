"""AdaShare-layout NYUv2 (40 classes) and Cityscapes readers: decoding, resizing, augmentation, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from automtl_compiler.data._common import hflip, sample_rng, scale_pad_crop
from automtl_compiler.data.adashare import (
    CAFFE_MEAN_BGR,
    AdaShareCityscapes,
    AdaShareNYUv2,
)
from automtl_compiler.errors import AutomtlError, FileFormatError
from tests.adashare_data import (
    KNOWN_RGB,
    write_adashare_cityscapes,
    write_adashare_nyuv2,
)

HW = (12, 16)
MEAN = torch.tensor(CAFFE_MEAN_BGR, dtype=torch.float32)


@pytest.fixture()
def nyu(tmp_path):
    return tmp_path, write_adashare_nyuv2(tmp_path, hw=HW)


@pytest.fixture()
def city(tmp_path):
    return tmp_path, write_adashare_cityscapes(tmp_path, hw=(8, 16))


def nyu_raw(root, **kw) -> AdaShareNYUv2:
    """A reader returning samples at the stored size (no augmentation; the crop equals the stored size)."""
    return AdaShareNYUv2(root, augment=False, crop=HW, **kw)


# ============================================================================ NYUv2 decoding

def test_nyu_image_caffe_bgr_and_none(nyu):
    root, raw = nyu
    img, _ = nyu_raw(root)[0]
    assert img.shape == (3, *HW) and img.dtype == torch.float32
    r, g, b = KNOWN_RGB
    expected = torch.tensor([b - 104.00698793, g - 116.66876762, r - 122.67891434], dtype=torch.float32)
    assert torch.allclose(img[:, 0, 0], expected, atol=1e-4)
    bgr = torch.from_numpy(raw["train"][0]["img"][..., ::-1].copy()).permute(2, 0, 1).float()
    assert torch.allclose(img, bgr - MEAN[:, None, None], atol=1e-4)
    plain, _ = nyu_raw(root, normalize="none")[0]
    assert torch.allclose(plain[:, 0, 0], torch.tensor(KNOWN_RGB, dtype=torch.float32) / 255, atol=1e-7)
    assert float(plain.min()) >= 0.0 and float(plain.max()) <= 1.0


def test_nyu_labels_ignore_and_class_count(nyu):
    root, raw = nyu
    ds = nyu_raw(root)
    assert ds.num_classes == {"segment_semantic": 40, "normal": 3, "depth_zbuffer": 1}
    seg = ds[1][1]["segment_semantic"]
    assert seg.shape == HW and seg.dtype == torch.int64
    assert seg[0, :3].tolist() == [255, 255, 255] and int(seg[1, 0]) == 39
    assert torch.equal(seg, torch.from_numpy(raw["train"][1]["seg"].astype(np.int64)))
    seg = nyu_raw(root, ignore_index=-1, tasks=["segment_semantic"])[1][1]["segment_semantic"]
    assert seg[0, :3].tolist() == [-1, -1, -1] and int(seg[1, 0]) == 39
    with pytest.raises(AutomtlError, match="ignore_index 3"):
        nyu_raw(root, ignore_index=3)


def test_nyu_normals_signed_and_automtl(nyu):
    root, raw = nyu
    stored = raw["train"][0]["normal"].astype(np.float64)
    n = nyu_raw(root)[0][1]["normal"]
    assert n.shape == (3, *HW) and n.dtype == torch.float32
    for y, x in [(0, 0), (5, 7), (11, 15)]:
        v = stored[y, x] / 127.5 - 1.0
        assert np.allclose(n[:, y, x].numpy(), v / np.linalg.norm(v), atol=1e-6)
    # AutoMTL's invalid pixels (a channel at 255) and the (127, 127, 127) placeholder are 0
    assert float(n[:, 2, :5].abs().max()) == 0.0
    valid = (n != 0).any(dim=0)
    assert int(valid.sum()) == HW[0] * HW[1] - 5
    assert torch.allclose(n.norm(dim=0)[valid], torch.ones(()), atol=1e-6)
    a = nyu_raw(root, normal_decoding="automtl")[0][1]["normal"]
    bgr = stored[5, 7, ::-1]
    assert np.allclose(a[:, 5, 7].numpy(), bgr / np.linalg.norm(bgr), atol=1e-6)
    assert float(a[:, 2, :4].abs().max()) == 0.0
    assert np.allclose(a[:, 2, 4].numpy(), np.full(3, 3 ** -0.5), atol=1e-6)    # valid for AutoMTL
    with pytest.raises(AutomtlError, match="normal_decoding"):
        nyu_raw(root, normal_decoding="rgb")


def test_nyu_depth_invalid_is_zero(nyu):
    root, raw = nyu
    d = nyu_raw(root, tasks=["depth"])[0][1]["depth_zbuffer"]
    assert d.shape == (1, *HW) and d.dtype == torch.float32
    assert d[0, 3, :4].tolist() == [0.0, 0.0, 0.0, 0.0]          # 0, 0, 1e-5 (<= 3e-5), NaN
    stored = raw["train"][0]["depth"]
    assert float(d[0, 5, 6]) == pytest.approx(float(stored[5, 6]))
    assert int((d > 0).sum()) == HW[0] * HW[1] - 4


def test_nyu_jpeg_images(tmp_path):
    write_adashare_nyuv2(tmp_path, hw=HW, image_suffix=".jpg")
    img, tgt = AdaShareNYUv2(tmp_path, "val", crop=HW)[0]
    assert img.shape == (3, *HW) and set(tgt) == {"segment_semantic", "normal", "depth_zbuffer"}


# ============================================================================ splits and val resizing

def test_splits_map_to_json_keys(nyu):
    root, _ = nyu
    assert [len(AdaShareNYUv2(root, s)) for s in ("train", "train1", "train2", "test", "val")] == [4, 2, 2, 2, 2]
    assert AdaShareNYUv2(root, "train2").augment and not AdaShareNYUv2(root, "val").augment
    assert AdaShareNYUv2(root, "val").crop == (321, 321)
    with pytest.raises(AutomtlError, match="unknown split 'validation'"):
        AdaShareNYUv2(root, "validation")


def test_val_resizes_to_crop(nyu):
    root, raw = nyu
    ds = AdaShareNYUv2(root, "val", crop=(24, 32))
    img, tgt = ds[1]
    assert img.shape == (3, 24, 32) and tgt["normal"].shape == (3, 24, 32)
    assert tgt["segment_semantic"].shape == (24, 32) and tgt["depth_zbuffer"].shape == (1, 24, 32)
    seg = raw["test"][1]["seg"].astype(np.int64)
    assert torch.equal(tgt["segment_semantic"], torch.from_numpy(seg.repeat(2, 0).repeat(2, 1)))
    at_size = AdaShareNYUv2(root, "val", crop=HW)
    assert torch.equal(tgt["normal"][:, ::2, ::2], at_size[1][1]["normal"])
    small = AdaShareNYUv2(root, "val", crop=(6, 8))[1][1]["segment_semantic"]
    assert torch.equal(small, torch.from_numpy(seg[::2, ::2]))
    ref = torch.nn.functional.interpolate((at_size[1][0] + MEAN[:, None, None])[None], size=(24, 32),
                                          mode="bilinear", align_corners=False)[0] - MEAN[:, None, None]
    assert torch.allclose(img, ref, atol=1e-4)


# ============================================================================ augmentation

def test_augmentation_deterministic_per_seed_epoch_index(nyu):
    root, _ = nyu
    a = AdaShareNYUv2(root, "train", crop=(10, 10), seed=3)
    b = AdaShareNYUv2(root, "train", crop=(10, 10), seed=3)
    x1, t1 = a[2]
    x2, t2 = b[2]
    assert x1.shape == (3, 10, 10) and t1["normal"].shape == (3, 10, 10)
    assert torch.equal(x1, x2) and all(torch.equal(t1[k], t2[k]) for k in t1)
    draws = set()
    for epoch in range(6):
        a.set_epoch(epoch)
        draws.add(a[2][0].numpy().tobytes())
    assert len(draws) > 1
    a.set_epoch(0)
    assert torch.equal(a[2][0], x1)
    assert not torch.equal(AdaShareNYUv2(root, "train", crop=(10, 10), seed=4)[2][0], x1)


@pytest.mark.parametrize("decoding", ["signed", "automtl"])
def test_augmentation_matches_pipeline(nyu, decoding):
    """Rescale + pad/crop + mirror from ``sample_rng(seed, epoch, index)``, mean subtracted after padding;
    a mirror negates the normals' x only with signed decoding (AutoMTL leaves its raw vectors unchanged)."""
    root, _ = nyu
    crop = (20, 20)
    ds = AdaShareNYUv2(root, "train", crop=crop, seed=5, normal_decoding=decoding)
    plain = AdaShareNYUv2(root, "train", crop=crop, normal_decoding=decoding, augment=False)
    flipped = 0
    for epoch in range(8):
        ds.set_epoch(epoch)
        img, tgt = ds[1]
        raw_img, raw_t = plain.load(1)
        rng = sample_rng(5, epoch, 1)
        e_img, e_t = scale_pad_crop(raw_img + MEAN[:, None, None], raw_t, rng, crop, 255)
        if rng.random() < 0.5:
            flipped += 1
            e_img, e_t = hflip(e_img, e_t, normals=("normal",) if decoding == "signed" else ())
        assert torch.allclose(img, e_img - MEAN[:, None, None], atol=1e-4)
        assert all(torch.equal(tgt[k], e_t[k]) for k in tgt)
        # the crop exceeds the image for scales below 5/3: padding is black before the mean (-mean after),
        # no label, depth 0 and normal 0
        # (the writer's void, invalid-depth and invalid-normal pixels never coincide, so these are padding)
        pad = (tgt["segment_semantic"] == 255) & (tgt["depth_zbuffer"][0] == 0) & (tgt["normal"] == 0).all(0)
        assert bool(pad.any())
        assert torch.allclose(img[:, pad], -MEAN[:, None].expand(3, int(pad.sum())), atol=1e-4)
    assert 0 < flipped < 8


# ============================================================================ Cityscapes

def test_cityscapes_decoding(city):
    root, raw = city
    assert AdaShareCityscapes(root, "val").crop == (256, 512)
    ds = AdaShareCityscapes(root, "val", crop=(8, 16))
    assert ds.num_classes == {"segment_semantic": 19, "depth_zbuffer": 1} and len(ds) == 2
    img, tgt = ds[0]
    r, g, b = 0.25, 0.5, 1.0
    expected = torch.tensor([b * 255 - 104.00698793, g * 255 - 116.66876762, r * 255 - 122.67891434])
    assert torch.allclose(img[:, 0, 0], expected, atol=1e-4)
    stored = raw["test"][0]
    assert torch.allclose(img, torch.from_numpy(stored["image"][..., ::-1].copy()).permute(2, 0, 1) * 255
                          - MEAN[:, None, None], atol=1e-3)
    seg = tgt["segment_semantic"]
    assert seg.dtype == torch.int64 and seg[0, :2].tolist() == [255, 255] and int(seg[1, 0]) == 18
    lab = stored["label_19"].astype(np.int64)
    assert torch.equal(seg[lab >= 0], torch.from_numpy(lab[lab >= 0]))
    d = tgt["depth_zbuffer"]
    assert d.shape == (1, 8, 16) and d[0, 2, :3].tolist() == [0.0, 0.0, 0.0]
    assert float(d[0, 5, 5]) == pytest.approx(float(stored["depth"][5, 5, 0]))
    plain = AdaShareCityscapes(root, "val", crop=(8, 16), normalize="none")[0][0]
    assert torch.allclose(plain[:, 0, 0], torch.tensor([r, g, b]))


def test_cityscapes_label_sets_resize_and_augment(city):
    root, raw = city
    seven = AdaShareCityscapes(root, "test", crop=(8, 16), num_classes=7, tasks=["segment_semantic"], ignore_index=-1)
    assert seven.num_classes == {"segment_semantic": 7}
    seg = seven[1][1]["segment_semantic"]
    assert seg[0, :2].tolist() == [-1, -1] and int(seg[1, 0]) == 6
    with pytest.raises(AutomtlError, match="2, 7 or 19"):
        AdaShareCityscapes(root, num_classes=40)
    big = AdaShareCityscapes(root, "val", crop=(16, 32))[1]
    assert big[0].shape == (3, 16, 32) and big[1]["depth_zbuffer"].shape == (1, 16, 32)
    lab = raw["test"][1]["label_19"].astype(np.int64)
    expected = torch.from_numpy(np.where(lab < 0, 255, lab).repeat(2, 0).repeat(2, 1))
    assert torch.equal(big[1]["segment_semantic"], expected)
    tr = AdaShareCityscapes(root, "train", crop=(6, 6), seed=1)
    x, t = tr[3]
    assert x.shape == (3, 6, 6) and t["segment_semantic"].shape == (6, 6)
    assert torch.equal(x, AdaShareCityscapes(root, "train", crop=(6, 6), seed=1)[3][0])


# ============================================================================ errors

def test_missing_root_json_and_split(tmp_path):
    with pytest.raises(FileFormatError, match="nowhere: directory not found"):
        AdaShareNYUv2(tmp_path / "nowhere")
    with pytest.raises(FileFormatError, match="nyu_v2_3task.json: index file not found"):
        AdaShareNYUv2(tmp_path)
    with pytest.raises(FileFormatError, match="cityscape.json: index file not found"):
        AdaShareCityscapes(tmp_path)
    (tmp_path / "nyu_v2_3task.json").write_text(json.dumps({"train": []}))
    with pytest.raises(FileFormatError, match=r"nyu_v2_3task.json: no entry 'test' for split 'val' \(found 'train'\)"):
        AdaShareNYUv2(tmp_path, "val")
    with pytest.raises(FileFormatError, match="lists no samples"):
        AdaShareNYUv2(tmp_path, "train")
    (tmp_path / "nyu_v2_3task.json").write_text(json.dumps({"train": [["a.png", "b.png"]]}))
    with pytest.raises(FileFormatError, match=r"rows \[img, seg, normal, depth\]"):
        AdaShareNYUv2(tmp_path, "train")
    (tmp_path / "nyu_v2_3task.json").write_text("{broken")
    with pytest.raises(FileFormatError, match="not valid JSON"):
        AdaShareNYUv2(tmp_path)


def test_missing_row_file(nyu):
    root, raw = nyu
    (root / raw["test"][1]["paths"][3]).unlink()
    with pytest.raises(FileFormatError, match=r"depth/0005.npy: file not found \(row 1 of nyu_v2_3task.json"):
        AdaShareNYUv2(root, "val")
    assert len(AdaShareNYUv2(root, "val", tasks=["segment_semantic", "normal"])) == 2   # depth not needed


def test_label_out_of_range(nyu, city):
    root, raw = nyu
    seg = raw["train"][0]["seg"].copy()
    seg[4, :3] = 41
    seg[5, 0] = 40
    Image.fromarray(seg).save(root / raw["train"][0]["paths"][1])
    with pytest.raises(FileFormatError, match=r"seg/0000.png: label value 41 \(4 pixels\) is outside the 40 classes"):
        nyu_raw(root)[0]
    croot, craw = city
    lab = craw["train"][2]["label_19"].copy()
    lab[3, 3] = 19
    np.save(croot / craw["train"][2]["paths"][4], lab)
    with pytest.raises(FileFormatError, match=r"label_19/2.npy: label value 19 \(1 pixels\) is outside the 19"):
        AdaShareCityscapes(croot, "train")[2]


def test_target_size_differs_from_image(nyu, city):
    root, raw = nyu
    Image.fromarray(np.zeros((6, 8), np.uint8)).save(root / raw["train"][0]["paths"][1])
    np.save(root / raw["train"][1]["paths"][3], np.ones((6, 8), np.float32))
    Image.fromarray(np.zeros((12, 15, 3), np.uint8)).save(root / raw["train"][2]["paths"][2])
    with pytest.raises(FileFormatError, match=r"seg/0000.png: target of 6x8 .*/img/0000.png is 12x16"):
        nyu_raw(root)[0]
    with pytest.raises(FileFormatError, match=r"depth/0001.npy: target of 6x8"):
        nyu_raw(root)[1]
    with pytest.raises(FileFormatError, match=r"normal_mask/0002.png: target of 12x15"):
        nyu_raw(root)[2]
    croot, craw = city
    np.save(croot / craw["train"][0]["paths"][1], np.ones((4, 16, 1), np.float32))
    with pytest.raises(FileFormatError, match=r"depth/0.npy: target of 4x16"):
        AdaShareCityscapes(croot, "train")[0]


def test_bad_files(nyu, city):
    root, raw = nyu
    np.save(root / raw["train"][0]["paths"][3], np.array([{"a": 1}] * 4, dtype=object).reshape(2, 2),
            allow_pickle=True)
    with pytest.raises(FileFormatError, match="depth/0000.npy"):
        nyu_raw(root, tasks=["depth"])[0]
    palette = Image.fromarray(raw["train"][1]["seg"]).convert("P")
    palette.save(root / raw["train"][1]["paths"][1])
    with pytest.raises(FileFormatError, match="seg/0001.png: a P image"):
        nyu_raw(root)[1]
    croot, craw = city
    np.save(croot / craw["train"][0]["paths"][0], (craw["train"][0]["image"] * 255).astype(np.float32))
    with pytest.raises(FileFormatError, match=r"image/0.npy: image values span .* \[0, 1\]"):
        AdaShareCityscapes(croot, "train")[0]
    np.save(croot / craw["train"][1]["paths"][0], np.zeros((8, 16), np.float32))
    with pytest.raises(FileFormatError, match=r"image/1.npy: array of shape \(8, 16\)"):
        AdaShareCityscapes(croot, "train")[1]
    with pytest.raises(AutomtlError, match="normalize"):
        AdaShareCityscapes(croot, normalize="imagenet")
    with pytest.raises(AutomtlError, match="no targets for task 'normal'"):
        AdaShareCityscapes(croot, tasks=["normal"])
