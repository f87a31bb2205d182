"""Data loaders for multi-task training: one shared loader, or one loader per task as AutoMTL uses them.

AutoMTL iterates one loader per task (each task sees its own batches, possibly from its own dataset);
when one dataset carries every task's targets, a single shared loader that yields all targets at once
does the same work with one forward pass of the data pipeline. :func:`make_loaders` builds either and
returns a :class:`TaskLoaders`, whose :meth:`TaskLoaders.loader` gives the loader to draw a task's batches
from in both cases.

Every batch is ``(images [B, 3, H, W], {task: stacked targets})``. Shuffling is driven by seeded
``torch.Generator`` objects, so the order of batches repeats exactly for the same ``seed`` (and differs
between epochs, as each pass advances the generator).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import AutomtlError
from ..tasks import canonical_kind

Batch = tuple[torch.Tensor, dict[str, torch.Tensor]]


def collate(samples: Sequence[tuple[Any, Mapping[str, Any]]]) -> Batch:
    """Stack ``(image, targets)`` samples into ``(images, {task: stacked targets})``.

    Targets are stacked along a new first dimension (scalar class ids become a ``[B]`` int64 tensor).
    Every sample must carry the same tasks and same-shaped tensors; otherwise AutomtlError.
    """
    if not samples:
        raise AutomtlError("collate: empty batch")
    keys = list(samples[0][1])
    for _, targets in samples[1:]:
        if list(targets) != keys:
            raise AutomtlError(f"collate: samples carry different tasks ({keys} vs {list(targets)})")
    try:
        images = torch.stack([torch.as_tensor(s[0]) for s in samples])
        out = {k: torch.stack([torch.as_tensor(s[1][k]) for s in samples]) for k in keys}
    except RuntimeError as exc:
        raise AutomtlError(f"collate: samples of different shapes cannot be stacked ({exc}); resize or crop "
                           "them to one size (e.g. the dataset option resolution: [H, W])") from None
    return images, out


class TaskView(Dataset):
    """The samples of ``dataset`` with only the targets of ``tasks`` (a view, nothing is copied).

    Forwards ``__getitems__`` (batched rendering of :class:`~.synthetic.SyntheticScenes`) and ``set_epoch``.
    """

    def __init__(self, dataset: Dataset, tasks: Sequence[str]) -> None:
        self.dataset = dataset
        self.tasks = tuple(tasks)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def _select(self, sample: tuple[Any, Mapping[str, Any]]) -> tuple[Any, dict[str, Any]]:
        image, targets = sample
        missing = [t for t in self.tasks if t not in targets]
        if missing:
            raise AutomtlError(f"the dataset's samples carry no target for task(s) {', '.join(missing)}; "
                               f"they have {', '.join(targets) or 'none'}")
        return image, {t: targets[t] for t in self.tasks}

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        return self._select(self.dataset[index])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Any, dict[str, Any]]]:
        getitems = getattr(self.dataset, "__getitems__", None)
        samples = getitems(list(indices)) if getitems is not None else [self.dataset[i] for i in indices]
        return [self._select(s) for s in samples]

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


@dataclass
class TaskLoaders:
    """The loaders of a multi-task run.

    ``shared`` is set in shared mode (one loader yielding every task's targets); ``per_task`` maps each
    task to its own loader in per-task mode. :meth:`loader` hides the difference.
    """

    tasks: tuple[str, ...]
    shared: DataLoader | None = None
    per_task: dict[str, DataLoader] = field(default_factory=dict)

    @property
    def mode(self) -> str:
        """``"shared"`` or ``"per_task"``."""
        return "shared" if self.shared is not None else "per_task"

    def loader(self, task: str) -> DataLoader:
        """The loader to draw ``task``'s batches from (the shared one in shared mode)."""
        name = canonical_kind(task)
        if name not in self.tasks:
            raise AutomtlError(f"no loader for task {task!r}; the loaders serve {', '.join(self.tasks)}")
        return self.shared if self.shared is not None else self.per_task[name]

    def set_epoch(self, epoch: int) -> None:
        """Forward ``set_epoch`` to every dataset that has it (fresh, reproducible augmentation draws)."""
        loaders = [self.shared] if self.shared is not None else list(self.per_task.values())
        for dl in loaders:
            if hasattr(dl.dataset, "set_epoch"):
                dl.dataset.set_epoch(epoch)


def _dataset_tasks(dataset: Dataset) -> tuple[str, ...] | None:
    tasks = getattr(dataset, "tasks", None)
    return tuple(tasks) if tasks is not None else None


def make_loaders(dataset_or_datasets: Dataset | Mapping[str, Dataset], tasks: Sequence[str], batch_size: int,
                 *, mode: str = "auto", shuffle: bool = True, seed: int = 0, num_workers: int = 0,
                 drop_last: bool = False, collate_fn: Callable[[list], Any] = collate,
                 **loader_options: Any) -> TaskLoaders:
    """Loaders for ``tasks`` over one dataset or one dataset per task.

    Args:
        dataset_or_datasets: a dataset whose samples are ``(image, {task: target})``, or a mapping
            ``task -> dataset`` (per-task mode; each dataset must carry its task's target).
        tasks: task kinds (aliases such as ``depth`` allowed), in the order the trainer uses.
        batch_size: samples per batch (per task in per-task mode).
        mode: ``"auto"`` (shared for one dataset, per-task for a mapping), ``"shared"`` or ``"per_task"``.
            One dataset must provide every task (it does when it has no ``tasks`` attribute, else its
            ``tasks`` must include them all). Per-task mode over one dataset gives each task its own
            loader and its own shuffled order over the same samples, as AutoMTL's per-task loaders do.
        shuffle: shuffle (with seeded generators: ``seed`` for the shared loader, ``seed + 1 + i`` for the
            ``i``-th task's loader).
        seed: the base seed of the shuffling generators.
        num_workers, drop_last, collate_fn, loader_options: passed to ``torch.utils.data.DataLoader``.
    """
    names = []
    for t in tasks:
        n = canonical_kind(t)
        if n not in names:
            names.append(n)
    if not names:
        raise AutomtlError("make_loaders: no tasks given")
    if batch_size < 1:
        raise AutomtlError(f"make_loaders: batch_size must be positive, got {batch_size}")
    if mode not in ("auto", "shared", "per_task"):
        raise AutomtlError(f"make_loaders: mode must be 'auto', 'shared' or 'per_task', got {mode!r}")

    def build(ds: Dataset, gen_seed: int) -> DataLoader:
        gen = torch.Generator().manual_seed(gen_seed)
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                          drop_last=drop_last, collate_fn=collate_fn, generator=gen, **loader_options)

    if isinstance(dataset_or_datasets, Mapping):
        if mode == "shared":
            raise AutomtlError("make_loaders: mode='shared' needs one dataset, got one per task")
        given = {canonical_kind(k): v for k, v in dataset_or_datasets.items()}
        missing = [t for t in names if t not in given]
        if missing:
            raise AutomtlError(f"make_loaders: no dataset for task(s) {', '.join(missing)}; got datasets for "
                               f"{', '.join(given)}")
        for t in names:
            have = _dataset_tasks(given[t])
            if have is not None and t not in have:
                raise AutomtlError(f"make_loaders: the dataset given for {t!r} provides {', '.join(have)}")
        loaders = {t: build(TaskView(given[t], [t]), seed + 1 + i) for i, t in enumerate(names)}
        return TaskLoaders(tuple(names), per_task=loaders)

    dataset = dataset_or_datasets
    have = _dataset_tasks(dataset)
    missing = [t for t in names if have is not None and t not in have]
    if missing:
        raise AutomtlError(f"make_loaders: the dataset has no targets for {', '.join(missing)}; it provides "
                           f"{', '.join(have or ())}")
    if mode in ("auto", "shared"):
        view = dataset if have is not None and tuple(have) == tuple(names) else TaskView(dataset, names)
        return TaskLoaders(tuple(names), shared=build(view, seed))
    loaders = {t: build(TaskView(dataset, [t]), seed + 1 + i) for i, t in enumerate(names)}
    return TaskLoaders(tuple(names), per_task=loaders)
