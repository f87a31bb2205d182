"""Training and evaluation batches: deterministic per step, loaded by ``DataLoader`` workers.

Training batch ``step`` of a stage is a function of ``(seed, stage, step)`` alone: the epoch's shuffled
order comes from a generator seeded by ``(seed, stage, epoch)`` and every sample is augmented with the
draw of ``(its index, epoch)``. So a run resumed at any step sees the batches the uninterrupted run saw,
whatever the number of workers (the loaders draw their worker seeds from their own generators, never
from the global one that seeds dropout). Batches are read ahead by ``torch.utils.data.DataLoader`` workers
(``dataset.workers``; persistent, pinned memory on CUDA) when they are asked for in order, which is how
the stages ask; any other access (a meta scheduler replaying a step) is served directly, with the same
result.

Validation goes over the whole split once, in order (:func:`eval_loader`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data import collate
from ..errors import AutomtlError

Batch = tuple[torch.Tensor, dict[str, torch.Tensor]]
STAGES = ("pretrain", "policy", "sample", "posttrain")


def step_seed(seed: int, stage: str, step: int) -> int:
    """A seed for one step of one stage, independent of how the run got there."""
    return (seed * 1_000_003 + STAGES.index(stage) * 7_919_317 + step) % (2**63 - 1)


def set_epoch(dataset: Any, epoch: int) -> None:
    """Call ``set_epoch`` on ``dataset`` or on the dataset it wraps (``Subset``, task views)."""
    while dataset is not None:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
            return
        dataset = getattr(dataset, "dataset", None)


class EpochView(Dataset):
    """``dataset`` addressed by ``(index, epoch)`` pairs: each sample gets its epoch's augmentation draw,
    also inside a worker process (which holds its own copy of the dataset)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[tuple[int, int]]) -> list[Any]:
        epochs = {e for _, e in keys}
        if len(epochs) != 1:
            raise AutomtlError(f"a batch mixes epochs {sorted(epochs)}")
        set_epoch(self.dataset, epochs.pop())
        indices = [i for i, _ in keys]
        many = getattr(self.dataset, "__getitems__", None)
        return many(indices) if many is not None else [self.dataset[i] for i in indices]


class StepSampler(Sampler[list[tuple[int, int]]]):
    """Yields the ``(index, epoch)`` keys of batch ``start``, ``start + 1``, ... without end.

    With ``world`` processes, step ``k``'s global batch (``batch_size * world`` samples, drawn as one
    process would draw a batch of that size) is split in rank order and this rank gets part ``rank``: the
    ranks together see exactly the batch one process with the effective batch size sees.
    """

    def __init__(self, length: int, batch_size: int, seed: int, stage: str, rank: int = 0, world: int = 1) -> None:
        self.length, self.batch_size, self.seed, self.stage = length, batch_size, seed, stage
        self.rank, self.world = rank, world
        self.start = 0
        self._order: tuple[int, torch.Tensor] | None = None

    def keys(self, step: int) -> list[tuple[int, int]]:
        """The keys of this rank's part of batch ``step``: position ``step`` of the epochs' shuffled orders
        (a short last batch of an epoch is filled from the start of the same order)."""
        size = self.batch_size * self.world
        per_epoch = max(1, self.length // size)
        epoch, pos = divmod(step, per_epoch)
        if self._order is None or self._order[0] != epoch:
            gen = torch.Generator().manual_seed(step_seed(self.seed, self.stage, epoch))
            self._order = (epoch, torch.randperm(self.length, generator=gen))
        order = self._order[1]
        idx = order[pos * size:(pos + 1) * size].tolist()
        while len(idx) < size:
            idx += order[:size - len(idx)].tolist()
        mine = idx[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return [(i, epoch) for i in mine]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start
        while True:
            yield self.keys(step)
            step += 1

    def __len__(self) -> int:  # never exhausted; DataLoader only needs it for len(loader)
        return 2**62


class Batches:
    """Deterministic training batches of one split for one stage; see the module docstring."""

    def __init__(self, dataset: Any, batch_size: int, seed: int, stage: str, *, workers: int = 0,
                 pin_memory: bool = False, tasks: tuple[str, ...] | None = None, rank: int = 0,
                 world: int = 1) -> None:
        if len(dataset) == 0:
            raise AutomtlError(f"the {stage} data split is empty")
        self.dataset, self.batch_size, self.seed, self.stage = dataset, batch_size, seed, stage
        self.rank, self.world = rank, world
        #: The tasks these batches are drawn for (None: every task), e.g. a target task's labelled part.
        self.tasks = tasks
        self.workers, self.pin_memory = workers, pin_memory
        self.view = EpochView(dataset)
        self.sampler = StepSampler(len(dataset), batch_size, seed, stage, rank, world)
        self._loader: DataLoader | None = None
        self._iter: Iterator[Batch] | None = None
        self._next = -1

    def batch(self, step: int) -> Batch:
        """Batch ``step``: the next one from the workers when asked for in order, else read directly."""
        if self.workers == 0:
            return collate(self.view.__getitems__(self.sampler.keys(step)))
        if self._iter is None or step != self._next:
            if self._loader is None:
                self._loader = DataLoader(self.view, batch_sampler=self.sampler, num_workers=self.workers,
                                          collate_fn=collate, pin_memory=self.pin_memory, persistent_workers=True,
                                          generator=torch.Generator().manual_seed(self.seed))
            self.sampler.start = step
            self._iter = iter(self._loader)
        self._next = step + 1
        return next(self._iter)

    def for_task(self, i: int) -> Batches:
        """The batches of the ``i``-th task's own loader (AutoMTL's per-task loaders): another order."""
        return Batches(self.dataset, self.batch_size, self.seed + 1 + i, self.stage, workers=self.workers,
                       pin_memory=self.pin_memory, rank=self.rank, world=self.world)

    def close(self) -> None:
        """Stop the worker processes (a new request starts them again)."""
        self._iter = None
        self._loader = None
        self._next = -1


def labelled_part(dataset: Any, fraction: float, seed: int) -> Any:
    """The first ``fraction`` (at least one sample) of ``dataset`` in an order drawn from ``seed``: the part
    whose target labels a semi-supervised scheduler (TMT) uses."""
    from torch.utils.data import Subset

    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    keep = max(1, round(min(fraction, 1.0) * len(dataset)))
    return Subset(dataset, order[:keep].tolist())


def eval_loader(dataset: Any, batch_size: int, workers: int = 0, pin_memory: bool = False, *,
                allow_empty: bool = False) -> DataLoader:
    """The whole validation split once, in order (no shuffling, the last batch may be short); an empty one
    only where ``allow_empty`` (a rank's share of a split smaller than the ranks' batches)."""
    if len(dataset) == 0 and not allow_empty:
        raise AutomtlError("the validation split is empty; evaluation needs at least one sample")
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate,
                      pin_memory=pin_memory, generator=torch.Generator().manual_seed(0))
