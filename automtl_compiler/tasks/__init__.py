"""Task types: per task a criterion, a metric accumulator and the direction of each metric.

>>> from automtl_compiler.tasks import get_task
>>> seg = get_task("segment_semantic", num_classes=13)
>>> metric = seg.new_metric()          # then metric.update(pred, target) per batch, metric.compute()
>>> seg.metric_directions
{'miou': True, 'pixel_acc': True}

Kinds (each also the key of its target in a dataset's targets dict): ``segment_semantic``,
``depth_zbuffer`` (alias ``depth``), ``normal``, ``classification``. Your own :class:`TaskType` subclass is
named by ``package.module:Class`` or registered under a name with :func:`register_task`. :func:`delta_m`
compares a multi-task model with single-task baselines.
"""

from __future__ import annotations

from .base import Metric, TaskType, bilinear_resize, nearest_resize
from .classification import Classification, ClassificationMetric
from .delta import delta_m
from .depth import DepthMetric, DepthZBuffer, depth_valid
from .normal import Normal, NormalMetric, angle_degrees, normal_valid
from .registry import (
           ALIASES,
           TASK_TYPES,
           available_tasks,
           canonical_kind,
           get_task,
           register_task,
           task_class,
)
from .segmentation import SegmentationMetric, SegmentSemantic

__all__ = ["ALIASES", "TASK_TYPES", "Classification", "ClassificationMetric", "DepthMetric", "DepthZBuffer",
           "Metric", "Normal", "NormalMetric", "SegmentSemantic", "SegmentationMetric", "TaskType",
           "angle_degrees", "available_tasks", "bilinear_resize", "canonical_kind", "delta_m", "depth_valid",
           "get_task", "nearest_resize", "normal_valid", "register_task", "task_class"]
