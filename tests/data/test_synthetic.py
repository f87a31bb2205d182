"""Datasets: synthetic scenes (determinism, exact geometry), MTAN/Taskonomy readers on tiny fixtures, loaders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from automtl_compiler.data import (
    NYUv2,
    SceneConfig,
    SyntheticScenes,
    Taskonomy,
    collate,
    get_dataset,
    render,
    sample_scene,
    scene_seed,
)
from automtl_compiler.data._common import hflip
from automtl_compiler.data.synthetic import camera_rays
from automtl_compiler.errors import AutomtlError, FileFormatError

TASKS = ["segment_semantic", "depth_zbuffer", "normal", "classification"]


# ============================================================================ synthetic: determinism

def test_same_seed_same_tensors_and_batch_equals_single():
    a = SyntheticScenes("train", length=6, seed=3)
    b = SyntheticScenes("train", length=6, seed=3)
    batch = a.__getitems__([0, 4, 5])
    for i, (img, tgt) in zip([0, 4, 5], batch):
        img2, tgt2 = b[i]
        assert torch.equal(img, img2)
        for k in TASKS:
            assert torch.equal(tgt[k], tgt2[k]), k


def test_rendering_independent_of_batch_and_threads():
    cfg = SceneConfig(resolution=(24, 40))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        big = render(range(10), cfg, return_aux=True)
        torch.set_num_threads(1)
        for i in (0, 7):
            one = render([i], cfg, return_aux=True)
            for k in big:
                assert torch.equal(big[k][i:i + 1], one[k]), k
    finally:
        torch.set_num_threads(threads)


def test_splits_use_disjoint_seeds():
    seeds = {split: {SyntheticScenes(split, length=50, seed=s).seed_of(i) for i in range(50) for s in (0, 1)}
             for split in ("train", "val", "policy")}
    assert len(seeds["train"]) == len(seeds["val"]) == len(seeds["policy"]) == 100
    assert not seeds["train"] & seeds["val"]
    assert not seeds["train"] & seeds["policy"]
    assert not seeds["val"] & seeds["policy"]
    assert scene_seed("val", 0, 0) != scene_seed("train", 0, 0)
    img_train, _ = SyntheticScenes("train", length=1)[0]
    img_val, _ = SyntheticScenes("val", length=1)[0]
    assert not torch.equal(img_train, img_val)


def test_sample_format():
    ds = SyntheticScenes("val", length=3, resolution=(32, 48), num_classes=8)
    img, tgt = ds[-1]
    assert img.shape == (3, 32, 48) and img.dtype == torch.float32
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    assert tgt["segment_semantic"].shape == (32, 48) and tgt["segment_semantic"].dtype == torch.int64
    assert int(tgt["segment_semantic"].max()) < 8
    assert tgt["depth_zbuffer"].shape == (1, 32, 48) and tgt["depth_zbuffer"].dtype == torch.float32
    assert tgt["normal"].shape == (3, 32, 48)
    assert tgt["classification"].shape == () and 0 <= int(tgt["classification"]) < 6
    assert ds.num_classes == {"segment_semantic": 8, "depth_zbuffer": 1, "normal": 3, "classification": 6}
    only = SyntheticScenes("val", length=3, tasks=["depth", "normal"])
    assert list(only[0][1]) == ["depth_zbuffer", "normal"]
    with pytest.raises(IndexError):
        ds[3]


def test_synthetic_options_are_checked():
    with pytest.raises(AutomtlError, match="split"):
        SyntheticScenes("test")
    with pytest.raises(AutomtlError, match="num_classes"):
        SyntheticScenes(num_classes=2)
    with pytest.raises(AutomtlError, match="disagree"):
        SyntheticScenes(size=3, length=4)
    with pytest.raises(AutomtlError, match="keypoints"):
        SyntheticScenes(tasks=["keypoints2d"])
    assert len(SyntheticScenes(size=7)) == 7


# ============================================================================ synthetic: geometry

SEEDS = list(range(12))
CFG = SceneConfig(resolution=(48, 64))


@pytest.fixture(scope="module")
def rendered():
    return render(SEEDS, CFG, return_aux=True), [sample_scene(s, CFG) for s in SEEDS]


def world_rays(scene):
    rx, ry = camera_rays(CFG)
    d_cam = torch.stack([rx.double(), ry.double(), torch.ones_like(rx, dtype=torch.float64)])  # [3, H, W]
    rot = torch.from_numpy(scene.rotation)
    return torch.einsum("ij,jhw->ihw", rot, d_cam), rot


def test_everything_rendered_and_normals_unit(rendered):
    out, _ = rendered
    depth = out["depth_zbuffer"]
    assert bool(torch.isfinite(depth).all()) and bool((depth > 0).all())
    norm = out["normal"].norm(dim=1)
    assert float((norm - 1).abs().max()) < 1e-5
    # normals face the camera: n . ray < 0 (rays in the camera frame)
    rx, ry = camera_rays(CFG)
    dot = out["normal"][:, 0] * rx + out["normal"][:, 1] * ry + out["normal"][:, 2]
    assert bool((dot < 0).all())


def test_floor_normal_and_depth_closed_form(rendered):
    out, scenes = rendered
    checked = 0
    for b, scene in enumerate(scenes):
        d_w, rot = world_rays(scene)
        floor = out["hit"][b] == 0
        assert bool(floor.any())
        expected_n = rot.T @ torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)     # world up in camera frame
        n = out["normal"][b].double()[:, floor]
        assert torch.allclose(n, expected_n[:, None].expand_as(n), atol=1e-6)
        t = -scene.position[1] / d_w[1][floor]                                       # ray-plane y = 0
        assert torch.allclose(out["depth_zbuffer"][b, 0][floor].double(), t, rtol=1e-5)
        back = out["hit"][b] == 1
        t_back = (scene.room[0] - scene.position[2]) / d_w[2][back]                 # ray-plane z = back
        assert torch.allclose(out["depth_zbuffer"][b, 0][back].double(), t_back, rtol=1e-5)
        checked += int(floor.sum())
    assert checked > 1000


def test_sphere_depth_closed_form(rendered):
    out, scenes = rendered
    seen = 0
    for b, scene in enumerate(scenes):
        d_w, _ = world_rays(scene)
        for slot in np.flatnonzero(scene.active & (scene.shape == 0)):
            sel = out["hit"][b] == 4 + slot
            if not bool(sel.any()):
                continue
            r = scene.dims[slot, 0]
            centre = torch.tensor([scene.centre[slot, 0], r, scene.centre[slot, 1]], dtype=torch.float64)
            o = torch.from_numpy(scene.position) - centre
            d = d_w[:, sel]
            a, bq = (d * d).sum(0), (o[:, None] * d).sum(0)
            c = float(o @ o) - r * r
            t = (-bq - torch.sqrt(bq * bq - a * c)) / a
            assert torch.allclose(out["depth_zbuffer"][b, 0][sel].double(), t, rtol=1e-4)
            seen += int(sel.sum())
    assert seen > 0


def test_labels_match_primitive_hit(rendered):
    out, scenes = rendered
    for b, scene in enumerate(scenes):
        hit, seg = out["hit"][b], out["segment_semantic"][b]
        assert bool((seg[hit == 0] == 0).all())
        assert bool((seg[(hit >= 1) & (hit <= 3)] == 1).all())
        for slot in range(CFG.max_objects):
            sel = hit == 4 + slot
            if bool(sel.any()):
                assert scene.active[slot]
                assert bool((seg[sel] == 2 + int(scene.cls[slot])).all())
        counts = torch.bincount(seg.flatten(), minlength=CFG.num_classes)[2:]
        assert int(out["classification"][b]) == int(counts.argmax())


def test_normals_agree_with_depth_finite_differences(rendered):
    out, _ = rendered
    rx, ry = camera_rays(CFG)
    d = out["depth_zbuffer"][:, 0].double()
    pts = torch.stack([d * rx.double(), d * ry.double(), d], dim=1)                   # back-projected [B, 3, H, W]
    du = pts[:, :, 1:-1, 2:] - pts[:, :, 1:-1, :-2]
    dv = pts[:, :, 2:, 1:-1] - pts[:, :, :-2, 1:-1]
    fd = torch.nn.functional.normalize(torch.linalg.cross(du, dv, dim=1), dim=1)
    fd = torch.where((fd * pts[:, :, 1:-1, 1:-1]).sum(1, keepdim=True) > 0, -fd, fd)  # face the camera
    gt = out["normal"].double()
    centre = gt[:, :, 1:-1, 1:-1]
    hit = out["hit"]
    h, w = hit.shape[1:]
    smooth = torch.ones_like(hit[:, 1:-1, 1:-1], dtype=torch.bool)                   # one primitive, no crease
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            smooth &= hit[:, 1 + di:h - 1 + di, 1 + dj:w - 1 + dj] == hit[:, 1:-1, 1:-1]
            smooth &= (gt[:, :, 1 + di:h - 1 + di, 1 + dj:w - 1 + dj] * centre).sum(1) > math.cos(math.radians(10))
    cos = (fd * centre).sum(1)[smooth].clamp(-1, 1)
    angles = torch.rad2deg(torch.acos(cos))
    assert smooth.float().mean() > 0.7
    assert float(angles.max()) < 3.0
    assert float(angles.median()) < 0.05
    planar = smooth & (hit[:, 1:-1, 1:-1] < 4)
    assert float(torch.rad2deg(torch.acos((fd * centre).sum(1)[planar].clamp(-1, 1))).max()) < 0.1


def test_render_speed_smoke():
    # throughput is reported, not asserted (see the module docs); this only exercises a larger batch
    out = render(range(100, 164), SceneConfig())
    assert out["image"].shape == (64, 3, 64, 64)


# ============================================================================ MTAN layout readers

def write_mtan(root: Path, n: int = 3, hw: tuple[int, int] = (16, 16), label_dirs=("label",),
               normals: bool = True, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    h, w = hw
    stored = {}
    for split in ("train", "val"):
        for i in range(n):
            img = rng.random((h, w, 3))
            label = rng.integers(0, 7, (h, w)).astype(np.float64)
            label[0, :4] = -1
            depth = rng.uniform(0.5, 5.0, (h, w, 1)).astype(np.float32)
            depth[1, :3] = 0
            normal = rng.normal(size=(h, w, 3))
            normal /= np.linalg.norm(normal, axis=2, keepdims=True)
            normal[1, :3] = 0
            arrays = {"image": img, "depth": depth}
            arrays.update({d: label for d in label_dirs})
            if normals:
                arrays["normal"] = normal
            for folder, arr in arrays.items():
                (root / split / folder).mkdir(parents=True, exist_ok=True)
                np.save(root / split / folder / f"{i}.npy", arr)
            stored[(split, i)] = arrays
    return stored


def test_nyuv2_reader_shapes_dtypes_ignore(tmp_path):
    stored = write_mtan(tmp_path)
    ds = get_dataset("nyuv2", root=tmp_path, split="val")
    assert len(ds) == 3 and ds.tasks == ("segment_semantic", "depth_zbuffer", "normal")
    img, tgt = ds[1]
    ref = stored[("val", 1)]
    assert img.shape == (3, 16, 16) and img.dtype == torch.float32
    assert torch.allclose(img, torch.from_numpy(ref["image"]).permute(2, 0, 1).float())
    seg = tgt["segment_semantic"]
    assert seg.dtype == torch.int64 and seg.shape == (16, 16)
    assert bool((seg[0, :4] == 255).all()) and int((seg == 255).sum()) == 4
    assert torch.equal(seg[1:], torch.from_numpy(ref["label"][1:]).long())
    assert tgt["depth_zbuffer"].shape == (1, 16, 16) and float(tgt["depth_zbuffer"][0, 1, 0]) == 0.0
    assert tgt["normal"].shape == (3, 16, 16)
    assert torch.allclose(tgt["normal"], torch.from_numpy(ref["normal"]).permute(2, 0, 1).float())
    assert ds.num_classes["segment_semantic"] == 13
    assert get_dataset("nyuv2", root=tmp_path, split="train").augment


def test_nyuv2_flip_mirrors_and_negates_normal_x(tmp_path):
    write_mtan(tmp_path)
    plain = NYUv2(tmp_path, "train", augment=False)
    aug = NYUv2(tmp_path, "train", scales=(1.0,))       # scale 1: only the flip remains
    flipped = kept = 0
    for epoch in range(8):
        aug.set_epoch(epoch)
        img, tgt = aug[0]
        img0, tgt0 = plain[0]
        if torch.equal(img, img0):
            kept += 1
            assert torch.equal(tgt["normal"], tgt0["normal"])
        else:
            flipped += 1
            assert torch.equal(img, img0.flip(-1))
            assert torch.equal(tgt["segment_semantic"], tgt0["segment_semantic"].flip(-1))
            assert torch.equal(tgt["depth_zbuffer"], tgt0["depth_zbuffer"].flip(-1))
            assert torch.equal(tgt["normal"][0], -tgt0["normal"][0].flip(-1))
            assert torch.equal(tgt["normal"][1:], tgt0["normal"][1:].flip(-1))
    assert flipped and kept
    aug.set_epoch(3)
    first = aug[2]
    assert torch.equal(first[0], aug[2][0])              # same (seed, epoch, index): same draw


def test_nyuv2_scale_crop(tmp_path):
    write_mtan(tmp_path)
    plain = NYUv2(tmp_path, "train", augment=False)
    aug = NYUv2(tmp_path, "train", scales=(2.0,), flip=False)
    img, tgt = aug[0]
    _, tgt0 = plain[0]
    assert img.shape == (3, 16, 16) and tgt["segment_semantic"].shape == (16, 16)
    # a 2x zoom of an 8x8 window: every target pixel repeats in 2x2 blocks, values come from the original
    seg = tgt["segment_semantic"]
    assert torch.equal(seg, seg[::2, ::2].repeat_interleave(2, 0).repeat_interleave(2, 1))
    assert set(seg.unique().tolist()) <= set(tgt0["segment_semantic"].unique().tolist())
    depth0 = set(tgt0["depth_zbuffer"].flatten().tolist())
    assert all(v * 2 in depth0 for v in tgt["depth_zbuffer"].flatten().tolist())   # depth divided by the scale


def test_hflip_helper():
    normal = torch.arange(12.0).reshape(3, 2, 2)
    _, tgt = hflip(torch.zeros(3, 2, 2), {"normal": normal})
    assert torch.equal(tgt["normal"][0], -normal[0].flip(-1))
    assert torch.equal(normal, torch.arange(12.0).reshape(3, 2, 2))   # input untouched


def test_cityscapes_reader(tmp_path):
    write_mtan(tmp_path, label_dirs=("label_7",), normals=False)
    ds = get_dataset("cityscapes", root=tmp_path, split="val")
    _, tgt = ds[0]
    assert set(tgt) == {"segment_semantic", "depth_zbuffer"}
    assert int((tgt["segment_semantic"] == 255).sum()) == 4
    assert ds.num_classes == {"segment_semantic": 7, "depth_zbuffer": 1}
    with pytest.raises(AutomtlError, match="normal"):
        get_dataset("cityscapes", root=tmp_path, tasks=["normal"])
    with pytest.raises(FileFormatError, match="label_19"):
        get_dataset("cityscapes", root=tmp_path, num_classes=19)
    with pytest.raises(AutomtlError, match="2, 7, 19"):
        get_dataset("cityscapes", root=tmp_path, num_classes=5)


def test_reader_missing_dir_and_file(tmp_path):
    with pytest.raises(FileFormatError, match="directory not found") as err:
        NYUv2(tmp_path / "nowhere")
    assert "nowhere" in str(err.value) and "image" in str(err.value)
    write_mtan(tmp_path)
    (tmp_path / "val" / "normal" / "2.npy").unlink()
    with pytest.raises(FileFormatError, match=r"normal[/\\]2\.npy"):
        NYUv2(tmp_path, "val")
    import shutil
    shutil.rmtree(tmp_path / "train" / "depth")
    with pytest.raises(FileFormatError, match=r"train[/\\]depth"):
        NYUv2(tmp_path, "train")


def test_reader_malformed_npy_names_file(tmp_path):
    write_mtan(tmp_path)
    np.save(tmp_path / "val" / "depth" / "1.npy", np.zeros((16, 15, 1), np.float32))   # wrong width
    ds = NYUv2(tmp_path, "val")
    ds[0]
    with pytest.raises(FileFormatError, match=r"depth[/\\]1\.npy.*\(16, 15, 1\)"):
        ds[1]
    np.save(tmp_path / "val" / "label" / "2.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(FileFormatError, match=r"label[/\\]2\.npy"):
        ds[2]
    (tmp_path / "val" / "image" / "0.npy").write_bytes(b"not an npy file")
    with pytest.raises(FileFormatError, match=r"image[/\\]0\.npy"):
        ds[0]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["image", "label", "depth", "normal"]),
       st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple))
def test_any_wrong_shape_is_file_format_error(tmp_path_factory, folder, shape):
    root = tmp_path_factory.mktemp("mtan")
    write_mtan(root, n=1, hw=(4, 4))
    good = {"image": (4, 4, 3), "label": (4, 4), "depth": (4, 4, 1), "normal": (4, 4, 3)}
    if shape == good[folder] or (folder in ("label", "depth") and shape in ((4, 4), (4, 4, 1))):
        return
    np.save(root / "val" / folder / "0.npy", np.ones(shape, np.float32))
    with pytest.raises(FileFormatError, match=folder):
        NYUv2(root, "val")[0]


# ============================================================================ Taskonomy

def write_taskonomy(root: Path, n: int = 2, hw: tuple[int, int] = (16, 16)) -> list[dict]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        b = root / "train" / "bldg"
        stem = f"point_{i}_view_0_domain_"
        rgb = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
        seg = rng.integers(0, 18, hw, dtype=np.uint8)
        seg[0, 0] = 0
        nrm = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
        depth = rng.integers(100, 20000, hw).astype(np.uint16)
        depth[2, :5] = 65535
        for folder, name, arr in (("rgb", "rgb", rgb), ("segment_semantic", "segmentsemantic", seg),
                                  ("normal", "normal", nrm), ("depth_zbuffer", "depth_zbuffer", depth)):
            (b / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(b / folder / f"{stem}{name}.png")
        out.append({"rgb": rgb, "seg": seg, "normal": nrm, "depth": depth})
    return out


def test_taskonomy_scan_layout_decoding(tmp_path):
    raw = write_taskonomy(tmp_path)
    ds = get_dataset("taskonomy", root=tmp_path, split="train", resolution=(16, 16), augment=False)
    assert len(ds) == 2
    img, tgt = ds[0]
    assert img.shape == (3, 16, 16) and float(img.max()) <= 1.0
    assert torch.allclose(img, torch.from_numpy(raw[0]["rgb"]).permute(2, 0, 1).float() / 255, atol=1e-6)
    seg = tgt["segment_semantic"]
    assert int(seg[0, 0]) == 255
    expected = torch.from_numpy(raw[0]["seg"].astype(np.int64)) - 1
    assert torch.equal(seg[raw[0]["seg"] > 0], expected[raw[0]["seg"] > 0])
    depth = tgt["depth_zbuffer"][0]
    assert bool((depth[2, :5] == 0).all()) and bool((tgt["normal"][:, 2, :5] == 0).all())
    d = torch.from_numpy(raw[0]["depth"].astype(np.float64))
    assert torch.allclose(depth[3:].double(), torch.log1p(d[3:]) / math.log(2 ** 16), atol=1e-6)
    assert float(tgt["normal"].abs().max()) <= 1.0


def test_taskonomy_json_index_and_augment(tmp_path):
    write_taskonomy(tmp_path)
    rows = [[f"bldg/{f}/point_{i}_view_0_domain_{n}.png" for f, n in
             (("rgb", "rgb"), ("segment_semantic", "segmentsemantic"), ("normal", "normal"),
              ("depth_zbuffer", "depth_zbuffer"))] for i in range(2)]
    # train rows relative to <root>/train (AutoMTL), test rows relative to <root> (AdaShare)
    (tmp_path / "taskonomy.json").write_text(json.dumps({"train": rows, "test": [["train/" + p for p in rows[0]]]}))
    ds = Taskonomy(tmp_path, "train", resolution=(16, 16), crop=(12, 12))
    img, tgt = ds[1]
    assert img.shape == (3, 12, 12) and tgt["normal"].shape == (3, 12, 12)
    assert len(Taskonomy(tmp_path, "val", resolution=(16, 16))) == 1      # val falls back to test
    (tmp_path / "taskonomy.json").write_text("{broken")
    with pytest.raises(FileFormatError, match="taskonomy.json"):
        Taskonomy(tmp_path, "train")


# ============================================================================ loaders and registry

def test_collate_stacks_targets():
    ds = SyntheticScenes("val", length=4)
    images, targets = collate([ds[i] for i in range(3)])
    assert images.shape == (3, 3, 64, 64)
    assert targets["classification"].shape == (3,) and targets["classification"].dtype == torch.int64
    assert targets["depth_zbuffer"].shape == (3, 1, 64, 64)
    with pytest.raises(AutomtlError, match="different tasks"):
        collate([ds[0], (ds[1][0], {"normal": ds[1][1]["normal"]})])


def test_get_dataset_registry_errors(tmp_path):
    with pytest.raises(AutomtlError) as err:
        get_dataset("imagenet")
    assert all(n in str(err.value) for n in ("synthetic", "nyuv2", "cityscapes", "taskonomy"))
    for name in ("nyuv2", "cityscapes", "taskonomy"):
        with pytest.raises(AutomtlError, match="root"):
            get_dataset(name)
    with pytest.raises(AutomtlError, match="no root"):
        get_dataset("synthetic", root=tmp_path)
    with pytest.raises(AutomtlError, match="bad options"):
        get_dataset("synthetic", lenght=3)
    assert len(get_dataset("synthetic", split="policy", length=5)) == 5
