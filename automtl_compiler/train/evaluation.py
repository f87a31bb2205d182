"""Validation metrics of a run and where they are written: ``metrics.jsonl`` and TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

from ..errors import AutomtlError
from ..nn.policy import Policy
from ..nn.supermodel import SuperModel
from .batches import eval_loader
from .distributed import SINGLE, DistContext
from .settings import TrainConfig
from .sharded_eval import check_mergeable, reduce_metrics, shard_bounds


def open_board(cfg: TrainConfig, out: Path) -> Any:
    """A TensorBoard writer into ``out/tensorboard`` when the config asks for one, else None."""
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise AutomtlError("config: 'tensorboard: true' needs the tensorboard package; install it with "
                           "pip install 'automtl-compiler[tensorboard]' or set tensorboard: false") from None
    return SummaryWriter(str(out / "tensorboard"))


class Evaluator:
    """Evaluates ``model`` on the validation split and logs what it finds into the run directory ``out``."""

    def __init__(self, cfg: TrainConfig, out: Path, model: SuperModel, *, val: Any, task_types: dict[str, Any],
                 device: torch.device, board: Any = None, dist: DistContext = SINGLE) -> None:
        self.cfg, self.out, self.model, self.val, self.device, self.board = cfg, out, model, val, device, board
        self.tasks, self.task_types, self.dist = cfg.task_names, task_types, dist
        if dist.distributed:  # a metric that cannot be reduced exactly is refused now, not after training
            check_mergeable({t: task_types[t].new_metric() for t in self.tasks})
        #: What the last evaluation covered: split, samples seen, the split's size, whether it was all of it.
        self.evaluated: dict[str, Any] = {}
        self._loader: Any = None

    @torch.no_grad()
    def evaluate(self, mode: str, policy: Policy | None = None) -> dict[str, dict[str, float]]:
        """Per-task metrics over the validation split, once and in order (hard or fixed mode, no
        gradients); ``eval_batches`` caps the batches for quick runs. The metrics accumulate over pixels
        and samples, so they do not depend on the batch size."""
        self.model.eval()
        metrics = {t: self.task_types[t].new_metric() for t in self.tasks}
        for x, targets in self.loader():
            outs = self.model.forward_all(x.to(self.device), mode=mode, policy=policy)
            for t in self.tasks:
                metrics[t].update(outs[t].float(), targets[t].to(self.device))
        reduce_metrics(metrics, self.dist)  # every rank now holds the metrics of the whole split
        self.model.train()
        n = self.samples()
        self.evaluated = {"split": "val", "samples": n, "split_samples": len(self.val), "whole_split": n == len(self.val)}
        return {t: m.compute() for t, m in metrics.items()}

    def samples(self) -> int:
        """How many validation samples an evaluation reads: the split, or ``eval_batches`` batches of it."""
        cap = self.cfg.eval_batches
        return len(self.val) if cap is None else min(len(self.val), cap * self.cfg.batch_size)

    def loader(self) -> Any:
        """This rank's validation loader (made once, its workers kept): its contiguous block of the samples
        an evaluation reads, in whole batches (:func:`~.sharded_eval.shard_bounds`)."""
        if self._loader is None:
            start, stop = shard_bounds(self.samples(), self.cfg.batch_size, self.dist.rank, self.dist.world)
            part = self.val if (start, stop) == (0, len(self.val)) else Subset(self.val, range(start, stop))
            self._loader = eval_loader(part, self.cfg.batch_size, self.cfg.dataset.workers,
                                       self.device.type == "cuda", allow_empty=self.dist.distributed)
        return self._loader

    def log_metrics(self, stage: str, step: int, metrics: dict[str, dict[str, float]]) -> None:
        """Append ``metrics`` to ``metrics.jsonl`` (and TensorBoard)."""
        line = json.dumps({"stage": stage, "step": step, "metrics": metrics})
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(line + "\n")
        if self.board is not None:
            for task, values in metrics.items():
                for key, value in values.items():
                    self.board.add_scalar(f"{stage}/val/{task}/{key}", value, step)

    def scalars(self, stage: str, info: dict[str, float], step: int) -> None:
        """A step's losses (and temperature) to TensorBoard."""
        if self.board is not None:
            for key, value in info.items():
                self.board.add_scalar(f"{stage}/{key}", value, step)

    def flush(self) -> None:
        """Write TensorBoard's buffered events (at every checkpoint)."""
        if self.board is not None:
            self.board.flush()
