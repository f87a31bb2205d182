"""Task types: losses and metrics against closed-form values, resizing rules, Δm, and the registry."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from automtl_compiler.errors import AutomtlError
from automtl_compiler.tasks import (
    DepthZBuffer,
    TaskType,
    available_tasks,
    delta_m,
    get_task,
    nearest_resize,
)


def logits_for(labels: torch.Tensor, num_classes: int, scale: float = 10.0) -> torch.Tensor:
    """[N, H, W] labels -> [N, C, H, W] logits whose arg-max is ``labels``."""
    return F.one_hot(labels.clamp(0, num_classes - 1), num_classes).permute(0, 3, 1, 2).float() * scale


# --------------------------------------------------------------------------------------------- registry

def test_registry_kinds_and_alias():
    assert available_tasks() == ["classification", "depth_zbuffer", "normal", "segment_semantic"]
    assert isinstance(get_task("depth"), DepthZBuffer)
    assert get_task("depth").kind == "depth_zbuffer"
    for kind in available_tasks():
        task = get_task(kind)
        assert isinstance(task, TaskType)
        assert task.kind == kind
        assert set(task.metric_directions) == set(task.new_metric().compute())


def test_registry_unknown_kind_lists_known():
    with pytest.raises(AutomtlError) as err:
        get_task("keypoints2d")
    msg = str(err.value)
    assert "keypoints2d" in msg
    for kind in ("segment_semantic", "depth_zbuffer", "depth", "normal", "classification"):
        assert kind in msg


def test_registry_bad_option_is_automtl_error():
    with pytest.raises(AutomtlError, match="segment_semantic"):
        get_task("segment_semantic", num_clases=3)
    with pytest.raises(AutomtlError, match="resize"):
        get_task("normal", resize="bicubic")


# --------------------------------------------------------------------------------------------- segmentation

def test_segmentation_miou_exact_2x2():
    # confusion (rows = truth): t0->p0: 1, t1->p1: 2, t1->p0: 1; class 2 in neither -> excluded
    target = torch.tensor([[[0, 1], [1, 1]]])
    pred = logits_for(torch.tensor([[[0, 1], [0, 1]]]), 3)
    metric = get_task("segment_semantic", num_classes=3).new_metric()
    metric.update(pred, target)
    assert metric.confusion.tolist() == [[1, 0, 0], [1, 2, 0], [0, 0, 0]]
    out = metric.compute()
    assert out["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2, abs=1e-12)
    assert out["pixel_acc"] == pytest.approx(3 / 4, abs=1e-12)


def test_segmentation_class_rules_present_vs_adashare():
    # class 2 occurs but is never predicted right: IoU 0 counts under "present", not under "nonzero_tp"
    target = torch.tensor([[[0, 1], [2, 2]]])
    pred = logits_for(torch.tensor([[[0, 1], [1, 1]]]), 3)
    present = get_task("segment_semantic").new_metric()
    adashare = get_task("segment_semantic", miou_classes="nonzero_tp").new_metric()
    present.update(pred, target)
    adashare.update(pred, target)
    assert present.compute()["miou"] == pytest.approx((1 + 1 / 3 + 0) / 3, abs=1e-12)
    assert adashare.compute()["miou"] == pytest.approx((1 + 1 / 3) / 2, abs=1e-12)


def test_segmentation_ignore_index_really_ignored():
    labels = torch.tensor([[[0, 1, 2], [2, 1, 0]]])
    pred = torch.randn(1, 3, 2, 3, generator=torch.Generator().manual_seed(0))
    task = get_task("segment_semantic", num_classes=3)
    ignored = labels.clone()
    ignored[0, 0, 0] = 255
    ignored[0, 1, 2] = -1            # MTAN's "no label" value is ignored as well
    loss = task.loss(pred, ignored)
    keep = ignored[0] >= 0
    keep &= ignored[0] != 255
    expected = F.cross_entropy(pred[0].permute(1, 2, 0)[keep], labels[0][keep])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # metric: flipping the prediction at ignored pixels changes nothing
    m1, m2 = task.new_metric(), task.new_metric()
    p2 = pred.clone()
    p2[0, :, 0, 0] = torch.tensor([0.0, 0.0, 100.0])
    p2[0, :, 1, 2] = torch.tensor([100.0, 0.0, 0.0])
    m1.update(pred, ignored)
    m2.update(p2, ignored)
    assert m1.compute() == m2.compute()
    assert int(m1.confusion.sum()) == 4


def test_segmentation_configurable_ignore_index_and_all_ignored():
    task = get_task("segment_semantic", num_classes=2, ignore_index=7)
    pred = torch.zeros(1, 2, 1, 2, requires_grad=True)
    loss = task.loss(pred, torch.tensor([[[7, 7]]]))
    assert loss.item() == 0.0
    loss.backward()                      # still differentiable, no NaN
    assert torch.equal(pred.grad, torch.zeros_like(pred))
    assert task.loss(pred, torch.tensor([[[0, 7]]])).item() == pytest.approx(math.log(2))


def test_segmentation_batch_split_invariance():
    gen = torch.Generator().manual_seed(1)
    pred = torch.randn(6, 4, 5, 5, generator=gen)
    target = torch.randint(0, 4, (6, 5, 5), generator=gen)
    whole, parts = get_task("segment_semantic").new_metric(), get_task("segment_semantic").new_metric()
    whole.update(pred, target)
    parts.update(pred[:1], target[:1])
    parts.update(pred[1:], target[1:])
    assert whole.compute() == parts.compute()


def test_segmentation_class_weights_match_torch():
    gen = torch.Generator().manual_seed(2)
    pred = torch.randn(2, 3, 4, 4, generator=gen)
    target = torch.randint(0, 3, (2, 4, 4), generator=gen)
    w = [0.5, 2.0, 1.0]
    loss = get_task("segment_semantic", class_weights=w).loss(pred, target)
    assert loss.item() == pytest.approx(F.cross_entropy(pred, target, weight=torch.tensor(w)).item(), rel=1e-6)


# --------------------------------------------------------------------------------------------- depth

def depth_case():
    # four valid pixels with ratios 1, 1.5, 1.25, 2.5 and one invalid pixel (target 0) far off
    pred = torch.tensor([1.0, 3.0, 2.5, 10.0, 100.0]).reshape(1, 1, 1, 5)
    target = torch.tensor([1.0, 2.0, 2.0, 4.0, 0.0]).reshape(1, 1, 1, 5)
    return pred, target


def test_depth_metrics_exact():
    pred, target = depth_case()
    metric = get_task("depth_zbuffer").new_metric()
    metric.update(pred, target)
    out = metric.compute()
    assert out["abs_err"] == pytest.approx((0 + 1 + 0.5 + 6) / 4, abs=1e-12)
    assert out["rel_err"] == pytest.approx((0 + 0.5 + 0.25 + 1.5) / 4, abs=1e-12)
    assert out["delta_1.25"] == 2 / 4           # ratio exactly 1.25 counts (<=)
    assert out["delta_1.25^2"] == 3 / 4
    assert out["delta_1.25^3"] == 3 / 4


def test_depth_loss_excludes_invalid_pixels_and_masks():
    pred, target = depth_case()
    task = get_task("depth")
    assert task.loss(pred, target).item() == pytest.approx(7.5 / 4)
    target_nan = target.clone()
    target_nan[..., 1] = float("nan")
    assert task.loss(pred, target_nan).item() == pytest.approx(6.5 / 3)
    mask = torch.tensor([True, True, True, False, True]).reshape(1, 1, 1, 5)
    assert task.loss(pred, target, mask=mask).item() == pytest.approx(1.5 / 3)
    metric = task.new_metric()
    metric.update(pred, target, mask=mask.reshape(1, 1, 5))
    assert metric.compute()["abs_err"] == pytest.approx(0.5)
    assert task.loss(pred, torch.zeros_like(target)).item() == 0.0


def test_depth_nonpositive_prediction_fails_thresholds():
    metric = get_task("depth").new_metric()
    metric.update(torch.tensor([-2.0, 0.0]).reshape(1, 1, 1, 2), torch.tensor([2.0, 2.0]).reshape(1, 1, 1, 2))
    out = metric.compute()
    assert out["delta_1.25^3"] == 0.0
    assert out["abs_err"] == pytest.approx(3.0)


# --------------------------------------------------------------------------------------------- normals

def normal_case():
    # target +z everywhere except an invalid (zero) pixel; predictions at 0°, 90°, 45°, 0° (scaled)
    target = torch.tensor([[0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 0]], dtype=torch.float32)
    pred = torch.tensor([[0, 0, 1], [1, 0, 0], [0, 1, 1], [0, 0, 5], [1, 0, 0]], dtype=torch.float32)
    as_map = lambda x: x.T.reshape(1, 3, 1, 5)
    return as_map(pred), as_map(target)


def test_normal_angle_stats_exact():
    pred, target = normal_case()
    metric = get_task("normal").new_metric()
    metric.update(pred, target)
    out = metric.compute()
    assert out["angle_mean"] == pytest.approx((0 + 90 + 45 + 0) / 4, abs=1e-9)
    assert out["angle_median"] == pytest.approx((0 + 45) / 2, abs=1e-9)
    assert out["within_11.25"] == 2 / 4
    assert out["within_22.5"] == 2 / 4
    assert out["within_30"] == 2 / 4


def test_normal_exact_right_angle_and_zero():
    metric = get_task("normal").new_metric()
    pred = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]]).T.reshape(1, 3, 1, 2)
    target = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]).T.reshape(1, 3, 1, 2)
    metric.update(pred, target)
    assert sorted(torch.cat(metric.angles).tolist()) == [0.0, 90.0]


def test_normal_loss_is_one_minus_mean_cosine_over_valid():
    pred, target = normal_case()
    loss = get_task("normal").loss(pred, target)
    assert loss.item() == pytest.approx(1 - (1 + 0 + math.sqrt(0.5) + 1) / 4, abs=1e-6)


# --------------------------------------------------------------------------------------------- classification

def test_classification_loss_and_accuracy():
    pred = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [0.0, 5.0, 0.0], [1.0, 0.0, 0.0]])
    target = torch.tensor([0, 1, 1, 2])
    task = get_task("classification", num_classes=3)
    assert task.loss(pred, target).item() == pytest.approx(F.cross_entropy(pred, target).item())
    metric = task.new_metric()
    metric.update(pred[:2], target[:2])
    metric.update(pred[2:], target[2:])
    assert metric.compute() == {"accuracy": 0.5}
    with pytest.raises(AutomtlError, match="logits"):
        task.loss(pred[:, :, None, None], target)


# --------------------------------------------------------------------------------------------- resizing

def test_nearest_resize_matches_interpolate():
    gen = torch.Generator().manual_seed(3)
    for size_in, size_out in [((7, 5), (3, 2)), ((3, 2), (7, 5)), ((16, 16), (4, 4)), ((10, 13), (21, 8))]:
        x = torch.randn(2, 3, *size_in, generator=gen)
        assert torch.equal(nearest_resize(x, size_out), F.interpolate(x, size=size_out, mode="nearest"))
    labels = torch.randint(0, 200, (1, 9, 9), generator=gen)
    assert nearest_resize(labels, (3, 3)).dtype == torch.int64


def test_resize_target_default_uses_nearest_target():
    gen = torch.Generator().manual_seed(4)
    pred = torch.rand(2, 1, 2, 2, generator=gen) + 0.5
    target = torch.rand(2, 1, 4, 4, generator=gen) + 0.5
    task = get_task("depth")
    assert task.loss(pred, target).item() == pytest.approx((pred - target[..., ::2, ::2]).abs().mean().item())
    seg_pred = torch.randn(2, 3, 2, 2, generator=gen)
    labels = torch.randint(0, 3, (2, 4, 4), generator=gen)
    assert get_task("segment_semantic").loss(seg_pred, labels).item() == pytest.approx(
        F.cross_entropy(seg_pred, labels[..., ::2, ::2]).item())


def test_resize_prediction_upsamples_bilinearly():
    gen = torch.Generator().manual_seed(5)
    pred = torch.rand(1, 1, 2, 2, generator=gen) + 0.5
    target = torch.rand(1, 1, 4, 4, generator=gen) + 0.5
    up = F.interpolate(pred, size=(4, 4), mode="bilinear", align_corners=False)
    task = get_task("depth", resize="prediction")
    assert task.loss(pred, target).item() == pytest.approx((up - target).abs().mean().item())
    metric = task.new_metric()
    metric.update(pred, target)
    assert metric.compute()["abs_err"] == pytest.approx((up - target).abs().mean().item())
    normal_task = get_task("normal", resize="prediction")
    assert normal_task.new_metric().resize == "prediction"


def test_loss_gradients_flow():
    gen = torch.Generator().manual_seed(6)
    cases = {
        "segment_semantic": (torch.randn(2, 3, 4, 4, generator=gen), torch.randint(0, 3, (2, 8, 8), generator=gen)),
        "depth_zbuffer": (torch.rand(2, 1, 4, 4, generator=gen), torch.rand(2, 1, 8, 8, generator=gen) + 0.1),
        "normal": (torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 8, 8, generator=gen)),
        "classification": (torch.randn(2, 5, generator=gen), torch.tensor([1, 4])),
    }
    for kind, (pred, target) in cases.items():
        pred.requires_grad_(True)
        loss = get_task(kind).loss(pred, target)
        assert loss.dim() == 0 and torch.isfinite(loss)
        loss.backward()
        assert pred.grad is not None and bool(pred.grad.abs().sum() > 0), kind


# --------------------------------------------------------------------------------------------- delta_m

DIRS = {"segment_semantic": get_task("segment_semantic").metric_directions,
        "depth_zbuffer": get_task("depth").metric_directions}


def test_delta_m_lower_better_improvement_is_positive():
    single = {"depth_zbuffer": {"abs_err": 0.5}}
    multi = {"depth_zbuffer": {"abs_err": 0.4}}
    out = delta_m(multi, single, DIRS)
    assert out["per_task"]["depth_zbuffer"] == pytest.approx(20.0)
    assert out["delta_m"] == pytest.approx(20.0)


def test_delta_m_mean_over_metrics_then_tasks():
    single = {"segment_semantic": {"miou": 0.4, "pixel_acc": 0.5},
              "depth_zbuffer": {"abs_err": 0.5, "rel_err": 0.2}}
    multi = {"segment_semantic": {"miou": 0.44, "pixel_acc": 0.45},
             "depth_zbuffer": {"abs_err": 0.6, "rel_err": 0.2, "delta_1.25": 0.9}}   # extras ignored
    out = delta_m(multi, single, DIRS)
    assert out["per_task"]["segment_semantic"] == pytest.approx((10.0 - 10.0) / 2)
    assert out["per_task"]["depth_zbuffer"] == pytest.approx((-20.0 + 0.0) / 2)
    assert out["delta_m"] == pytest.approx((0.0 - 10.0) / 2)


def test_delta_m_errors():
    with pytest.raises(AutomtlError, match="rel_err"):
        delta_m({"depth_zbuffer": {"abs_err": 1.0}}, {"depth_zbuffer": {"abs_err": 1.0, "rel_err": 1.0}}, DIRS)
    with pytest.raises(AutomtlError, match="undefined"):
        delta_m({"depth_zbuffer": {"abs_err": 1.0}}, {"depth_zbuffer": {"abs_err": 0.0}}, DIRS)
    with pytest.raises(AutomtlError, match="normal"):
        delta_m({"normal": {"angle_mean": 1.0}}, {"normal": {"angle_mean": 2.0}}, DIRS)


# --------------------------------------------------------------------------------------------- properties

@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6), st.integers(2, 6), st.integers(0, 2**31 - 1))
def test_perfect_prediction_gives_ideal_metrics(n, h, w, c, seed):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n, h, w), generator=gen)
    seg = get_task("segment_semantic", num_classes=c)
    m = seg.new_metric()
    m.update(logits_for(labels, c), labels)
    assert m.compute() == {"miou": 1.0, "pixel_acc": 1.0}

    depth = torch.rand(n, 1, h, w, generator=gen) * 10 + 0.01
    m = get_task("depth").new_metric()
    m.update(depth.clone(), depth)
    assert m.compute() == {"abs_err": 0.0, "rel_err": 0.0, "delta_1.25": 1.0, "delta_1.25^2": 1.0,
                           "delta_1.25^3": 1.0}
    assert get_task("depth").loss(depth.clone(), depth).item() == 0.0

    normals = F.normalize(torch.randn(n, 3, h, w, generator=gen), dim=1)
    scale = torch.rand(n, 1, h, w, generator=gen) * 3 + 0.1        # length must not matter
    m = get_task("normal").new_metric()
    m.update(normals * scale, normals)
    out = m.compute()
    assert out["angle_mean"] == pytest.approx(0.0, abs=1e-4)
    assert out["angle_median"] == pytest.approx(0.0, abs=1e-4)
    assert (out["within_11.25"], out["within_22.5"], out["within_30"]) == (1.0, 1.0, 1.0)
    assert get_task("normal").loss(normals, normals).item() == pytest.approx(0.0, abs=1e-6)

    classes = torch.randint(0, c, (n,), generator=gen)
    m = get_task("classification").new_metric()
    m.update(F.one_hot(classes, c).float(), classes)
    assert m.compute() == {"accuracy": 1.0}
