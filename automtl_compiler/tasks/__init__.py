"""Task types: per task a criterion, a metric accumulator and the direction of each metric.

>>> from automtl_compiler.tasks import get_task
>>> seg = get_task("segment_semantic", num_classes=13)
>>> metric = seg.new_metric()          # then metric.update(pred, target) per batch, metric.compute()
>>> seg.metric_directions
{'miou': True, 'pixel_acc': True}

Kinds (each also the key of its target in a dataset's targets dict): ``segment_semantic``,
``depth_zbuffer`` (alias ``depth``), ``normal``, ``classification``. :func:`delta_m` compares a multi-task
model with single-task baselines.
"""

from __future__ import annotations

from ..errors import AutomtlError
from .base import Metric, TaskType, bilinear_resize, nearest_resize
from .classification import Classification, ClassificationMetric
from .delta import delta_m
from .depth import DepthMetric, DepthZBuffer, depth_valid
from .normal import Normal, NormalMetric, angle_degrees, normal_valid
from .segmentation import SegmentationMetric, SegmentSemantic

TASK_TYPES: dict[str, type[TaskType]] = {
    SegmentSemantic.kind: SegmentSemantic,
    DepthZBuffer.kind: DepthZBuffer,
    Normal.kind: Normal,
    Classification.kind: Classification,
}
ALIASES: dict[str, str] = {"depth": DepthZBuffer.kind}


def canonical_kind(kind: str) -> str:
    """The registry name of ``kind`` (resolving aliases such as ``depth``); AutomtlError when unknown."""
    name = ALIASES.get(kind, kind)
    if name not in TASK_TYPES:
        known = sorted([*TASK_TYPES, *ALIASES])
        raise AutomtlError(f"unknown task kind {kind!r}; known kinds: {', '.join(known)}")
    return name


def available_tasks() -> list[str]:
    """The canonical task kinds, sorted."""
    return sorted(TASK_TYPES)


def get_task(kind: str, **options) -> TaskType:
    """A task type by name, constructed with ``options`` (e.g. ``num_classes``, ``ignore_index``, ``resize``).

    Raises AutomtlError for an unknown kind (listing the known ones) or an option the task does not take.
    """
    cls = TASK_TYPES[canonical_kind(kind)]
    try:
        return cls(**options)
    except TypeError as exc:
        raise AutomtlError(f"task {kind!r}: bad options {sorted(options)}: {exc}") from None


__all__ = ["ALIASES", "TASK_TYPES", "Classification", "ClassificationMetric", "DepthMetric", "DepthZBuffer",
           "Metric", "Normal", "NormalMetric", "SegmentSemantic", "SegmentationMetric", "TaskType",
           "angle_degrees", "available_tasks", "bilinear_resize", "canonical_kind", "delta_m", "depth_valid",
           "get_task", "nearest_resize", "normal_valid"]
