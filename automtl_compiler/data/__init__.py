"""Datasets and loaders for multi-task training.

Every dataset here is a map-style ``torch.utils.data.Dataset`` whose samples are
``(image [3, H, W] float32, {task kind: target})`` with the task kinds of :mod:`automtl_compiler.tasks`:
``segment_semantic`` [H, W] int64, ``depth_zbuffer`` [1, H, W] float32, ``normal`` [3, H, W] float32,
``classification`` int64 scalar. Each has ``tasks`` (the task names it returns; the kinds for the
built-in readers) and ``num_classes`` (output channels per task).

:func:`get_dataset` builds one by registered name (``synthetic``, ``nyuv2``, ``cityscapes``, ``taskonomy``,
``folder`` for a user's own files, or a name added with :func:`register_dataset`) or by
``package.module:Class`` path to the user's own Dataset, constructed as ``Class(root=..., split=..., **options)``.

:func:`collate` stacks samples into batches ``(images [B, 3, H, W], {task: stacked targets})``:

>>> import torch
>>> from automtl_compiler.data import collate, get_dataset
>>> train = get_dataset("synthetic", split="train", length=1000)
>>> loader = torch.utils.data.DataLoader(train, batch_size=16, shuffle=True, collate_fn=collate)

Training draws its batches through :class:`automtl_compiler.train.batches.Batches` (deterministic per step, so
a resumed run sees the batches the uninterrupted run saw; one batch order per task with
``dataset.loader: per_task``).
"""

from __future__ import annotations

from . import layouts
from .adashare import AdaShareCityscapes, AdaShareNYUv2
from .cityscapes import Cityscapes
from .folder import FolderDataset
from .loaders import collate
from .nyuv2 import NYUv2
from .registry import (
    DATASETS,
    _register_builtin,
    available_datasets,
    get_dataset,
    register_dataset,
)
from .synthetic import (
    SceneConfig,
    SyntheticScenes,
    render,
    render_scenes,
    sample_scene,
    scene_seed,
)
from .taskonomy import Taskonomy

_register_builtin("synthetic", SyntheticScenes, tasks_as="names")
_register_builtin("nyuv2", layouts.nyuv2, tasks_as="names")
_register_builtin("cityscapes", layouts.cityscapes, tasks_as="names")
_register_builtin("taskonomy", Taskonomy, tasks_as="names")
_register_builtin("folder", FolderDataset, tasks_as="mapping")

__all__ = ["DATASETS", "AdaShareCityscapes", "AdaShareNYUv2", "Cityscapes", "FolderDataset", "NYUv2", "SceneConfig", "SyntheticScenes",
           "Taskonomy", "available_datasets", "collate", "get_dataset", "register_dataset",
           "render", "render_scenes", "sample_scene", "scene_seed"]
