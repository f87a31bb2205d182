"""Validation metrics of a run and where they are written: ``metrics.jsonl`` and TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import AutomtlError
from ..nn.policy import Policy
from ..nn.supermodel import SuperModel
from .batches import eval_loader
from .settings import TrainConfig


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
                 device: torch.device, board: Any = None) -> None:
        self.cfg, self.out, self.model, self.val, self.device, self.board = cfg, out, model, val, device, board
        self.tasks, self.task_types = cfg.task_names, task_types
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
        cap, seen = self.cfg.eval_batches, 0
        for i, (x, targets) in enumerate(self.loader()):
            if cap is not None and i >= cap:
                break
            outs = self.model.forward_all(x.to(self.device), mode=mode, policy=policy)
            for t in self.tasks:
                metrics[t].update(outs[t].float(), targets[t].to(self.device))
            seen += x.shape[0]
        self.model.train()
        self.evaluated = {"split": "val", "samples": seen, "split_samples": len(self.val),
                          "whole_split": seen == len(self.val)}
        return {t: m.compute() for t, m in metrics.items()}

    def loader(self) -> Any:
        """The validation loader (made once, its workers kept)."""
        if self._loader is None:
            self._loader = eval_loader(self.val, self.cfg.batch_size, self.cfg.dataset.workers,
                                       self.device.type == "cuda")
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
