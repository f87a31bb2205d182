"""The data of a deployment variant: calibration images and the validation split, read through a training
config's ``dataset`` section exactly as training and evaluation read them.

Calibration images come from the training split with augmentation switched off (the preprocessing of
evaluation: resizing, crops and normalisation of the dataset's options, no random flips or scales), at
evenly spaced indices, so the same config and count always give the same images. The validation split
and the number of samples compared are those of the run's evaluation (``eval_batches`` x ``batch_size``
when the config caps it, else the whole split).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import AutomtlError

#: The run directory's config, next to ``compact/`` (what ``automtl run`` writes).
RUN_CONFIG = "config.yaml"


def run_config(model_dir: str | Path) -> Path | None:
    """The config of the ``automtl run`` directory that holds ``model_dir``, or None."""
    from ..train.run import read_marker

    parent = Path(model_dir).absolute().parent
    config = parent / RUN_CONFIG
    return config if read_marker(parent) is not None and config.is_file() else None


def read_deployment_config(path: str | Path) -> dict[str, Any]:
    """A training config that names its dataset (a file without a ``dataset`` section would silently mean
    the built-in synthetic scenes, which is not what a model trained on other data was trained on)."""
    from ..train.config import load_config, read_config_file

    if "dataset" not in read_config_file(path):
        raise AutomtlError(f"{path}: the config has no 'dataset' section, so it does not say which images the model "
                           "was trained on; give the training config (for the built-in scenes write "
                           "dataset: {name: synthetic})")
    return load_config(path)


def _accepts(name: str, option: str) -> bool:
    """Whether the registered dataset ``name`` takes ``option`` (a user's ``package.module:Class`` is read
    as it is)."""
    from ..data.registry import DATASETS

    return ":" not in name and option in DATASETS.lookup(name).accepted_options()


@dataclass
class DeploymentData:
    """Calibration and validation data of one training config, for a model whose outputs are ``tasks``."""

    config: dict[str, Any]
    source: Path
    tasks: list[str]
    validation: Any
    task_types: dict[str, Any]

    @classmethod
    def from_config(cls, path: str | Path, tasks: list[str]) -> DeploymentData:
        """Read the config at ``path`` and build its validation split and task types for ``tasks``."""
        from ..train.run import make_task_types, resolve_input_size

        cfg = read_deployment_config(path)
        unknown = [t for t in tasks if t not in cfg["tasks"]]
        if unknown:
            raise AutomtlError(f"{path}: the model's task(s) {unknown} are not in the config's tasks "
                               f"{list(cfg['tasks'])}; give the config the model was trained with")
        validation = cls._split(cfg, "val")
        resolve_input_size(cfg, {"val": validation})
        types = make_task_types(cfg, validation)
        return cls(cfg, Path(path), list(tasks), validation, {t: types[t] for t in tasks})

    @staticmethod
    def _split(cfg: dict[str, Any], split: str) -> Any:
        from ..data import get_dataset
        from ..train.run import split_options, task_kinds

        d = cfg["dataset"]
        options = split_options(cfg, split)
        if split == "train" and _accepts(d["name"], "augment"):
            options["augment"] = False
        if _accepts(d["name"], "cache"):
            options["cache"] = False  # each sample is read once here
        return get_dataset(d["name"], root=d["root"], split=split, tasks=task_kinds(cfg), **options)

    def calibration_images(self, count: int) -> list[np.ndarray]:
        """``count`` training images ([3, H, W] float32) at evenly spaced indices of the training split."""
        if count < 1:
            raise AutomtlError(f"the number of calibration images must be at least 1, got {count}")
        train = self._split(self.config, "train")
        if count > len(train):
            raise AutomtlError(f"{self.source}: the training split has {len(train)} image(s); choose at most that "
                               f"many calibration images, not {count}")
        return [np.ascontiguousarray(torch.as_tensor(train[i * len(train) // count][0]).numpy(), dtype=np.float32)
                for i in range(count)]

    @property
    def samples(self) -> int:
        """How many validation samples a comparison reads: as many as the run's evaluation reads."""
        cap, batch = self.config["eval_batches"], self.config["batch_size"]
        return len(self.validation) if cap is None else min(len(self.validation), cap * batch)

    def batches(self) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
        """The compared validation samples in order, in batches of the config's batch size."""
        from torch.utils.data import Subset

        from ..train.batches import eval_loader

        part = Subset(self.validation, range(self.samples))
        for x, targets in eval_loader(part, self.config["batch_size"]):
            yield np.ascontiguousarray(x.numpy(), dtype=np.float32), targets


def check_image_size(image: np.ndarray, input_shape: list[int | str], what: str) -> None:
    """An image must have the fixed height and width of the model's input (dynamic ones take any)."""
    for axis, name in ((-2, "height"), (-1, "width")):
        want = input_shape[axis]
        if isinstance(want, int) and want > 0 and image.shape[axis] != want:
            raise AutomtlError(f"{what} is {image.shape[-2]}x{image.shape[-1]} but the model takes "
                               f"{input_shape[-2]}x{input_shape[-1]}; export at the dataset's size (--input-shape), "
                               "with --dynamic-hw, or set the dataset's resolution/crop options")


def fixed_batch(input_shape: list[int | str]) -> int | None:
    """The model's fixed batch size, or None when the batch axis is dynamic."""
    first = input_shape[0]
    return first if isinstance(first, int) and first > 0 else None


def fit_batch(x: np.ndarray, input_shape: list[int | str]) -> tuple[np.ndarray, int]:
    """``x`` (at most the fixed batch size) padded by repeating its first sample to a model's fixed batch
    size; returns it and the count of real samples."""
    fixed, n = fixed_batch(input_shape), x.shape[0]
    if fixed is None or fixed == n:
        return x, n
    return np.concatenate([x, np.repeat(x[:1], fixed - n, axis=0)]), n


@dataclass
class Comparison:
    """Validation metrics of a reference model and a variant, and their largest output differences."""

    reference: dict[str, dict[str, float]]
    variant: dict[str, dict[str, float]]
    max_abs_diff: dict[str, float]
    reference_max_abs: dict[str, float]
    samples: int
    diff_images: int


def compare_on_validation(reference: Any, variant: Any, data: DeploymentData, *, diff_images: int = 4) -> Comparison:
    """Run two sessions (:class:`~automtl_compiler.runtime.InferenceSession`) on the validation samples of
    ``data``: each task's metrics for both, and the max abs output difference on the first ``diff_images``."""
    metrics = {side: {t: data.task_types[t].new_metric() for t in data.tasks} for side in ("ref", "var")}
    diff = dict.fromkeys(data.tasks, 0.0)
    scale = dict.fromkeys(data.tasks, 0.0)
    seen = 0
    for x, targets in data.batches():
        step = x.shape[0]
        chunk = fixed_batch(reference.input_shape) or step
        for start in range(0, step, chunk):
            part = x[start:start + chunk]
            check_image_size(part[0], reference.input_shape, f"validation image {seen + start}")
            fed, real = fit_batch(part, reference.input_shape)
            outs = {"ref": reference.run(fed), "var": variant.run(fed)}
            for t in data.tasks:
                target = targets[t][start:start + real]
                for side in ("ref", "var"):
                    metrics[side][t].update(torch.from_numpy(np.ascontiguousarray(outs[side][t][:real])), target)
                shown = max(0, min(real, diff_images - seen - start))
                if shown:
                    ref_out, var_out = outs["ref"][t][:shown], outs["var"][t][:shown]
                    diff[t] = max(diff[t], float(np.max(np.abs(var_out.astype(np.float64) - ref_out))))
                    scale[t] = max(scale[t], float(np.max(np.abs(ref_out))))
        seen += step
    return Comparison({t: m.compute() for t, m in metrics["ref"].items()},
                      {t: m.compute() for t, m in metrics["var"].items()}, diff, scale, seen, min(seen, diff_images))
