"""The training loop of one run: stepping, checkpoints, evaluation and progress.

:class:`Loop` holds what the stages share: the model (a SuperModel, seen only through its public
methods), the stages' optimisers, the gradient scheduler, the run's resumable ``state`` and its directory.
A step draws its batch, Gumbel noise and dropout from generators seeded by ``(seed, stage, step)``
(:func:`~.batches.step_seed`), so a run resumed from a checkpoint repeats the uninterrupted run.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import AutomtlError
from ..nn.policy import Policy
from ..nn.supermodel import SuperModel
from .batches import Batch, Batches, labelled_part, step_seed
from .checkpoint import load_checkpoint, peek_state, save_checkpoint
from .distributed import (
    SINGLE,
    DistContext,
    all_reduce_sum,
    average_gradients,
    barrier,
    broadcast_buffers,
)
from .evaluation import Evaluator
from .precision import FP32, Precision
from .schedulers import Combiner, Scheduler, SpanContext, StepContext, WeightedSum
from .settings import TrainConfig

#: The optimisers a stage steps (its checkpoints keep only these).
STAGE_OPTIMIZERS = {"pretrain": ("pretrain",), "policy": ("network", "policy"), "sample": (),
                    "posttrain": ("posttrain",)}


class Progress:
    """A progress bar on a terminal (tqdm), plain log lines otherwise."""

    def __init__(self, stage: str, total: int, start: int, enabled: bool = True) -> None:
        self.stage, self.total, self.enabled = stage, total, enabled
        self.bar = None
        self.last = time.monotonic()
        self.count = start
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=stage, leave=True, dynamic_ncols=True)

    def update(self, info: dict[str, float], count: int = 1) -> None:
        """Advance by ``count`` steps showing ``info`` (a line at most every 5 s without a terminal)."""
        self.count += count
        text = {k: f"{v:.4g}" for k, v in info.items()}
        if self.bar is not None:
            self.bar.set_postfix(text, refresh=False)
            self.bar.update(count)
        elif self.enabled and (time.monotonic() - self.last > 5 or self.count == self.total):
            self.last = time.monotonic()
            print(f"[{self.stage}] {self.count}/{self.total} " + " ".join(f"{k}={v}" for k, v in text.items()),
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Loop:
    """Steps, checkpoints and evaluates one run in ``out`` (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, out: Path, model: SuperModel, *, opts: dict[str, torch.optim.Optimizer],
                 scheds: dict[str, Any], scheduler: Scheduler, scheduler_stages: tuple[str, ...],
                 evaluator: Evaluator, datasets: dict[str, Any], task_types: dict[str, Any], device: torch.device,
                 progress: bool = True, dist: DistContext = SINGLE, precision: Precision = FP32) -> None:
        self.cfg, self.out, self.model, self.device, self.dist = cfg, out, model, device, dist
        self.precision = precision
        #: fp16's loss scaler (its scale is checkpointed); None in fp32 and bf16
        self.scaler = torch.amp.GradScaler(device.type) if precision.loss_scaling else None
        self.progress = progress and dist.is_main
        self.tasks = cfg.task_names
        self.datasets, self.task_types, self.evaluator = datasets, task_types, evaluator
        self.opts, self.scheds = opts, scheds
        self.scheduler, self.scheduler_stages = scheduler, scheduler_stages
        self.plain = WeightedSum(self.tasks, {t: cfg.tasks[t].weight for t in self.tasks})
        self.state: dict[str, Any] = {"stage": "pretrain", "step": 0, "tau": cfg.stages.policy.tau,
                                      "policy_steps": 0, "policy": None, "done": False, "scheduler_stage": None}
        #: Called after every checkpoint: a run that replaces an earlier one (``--overwrite``) deletes it then.
        self.on_checkpoint: Callable[[], None] | None = None
        self._prepared: str | None = None
        self._task_batches: dict[int, dict[str, Batches]] = {}

    # ------------------------------------------------------------ batches
    def batches(self, split: str | Any, stage: str, seed_offset: int = 0) -> Batches:
        """The deterministic training batches of ``split`` (a split's name, or a dataset) for ``stage``,
        loaded by the config's workers."""
        dataset = self.datasets[split] if isinstance(split, str) else split
        return Batches(dataset, self.cfg.batch_size, self.cfg.seed + seed_offset, stage,
                       workers=self.cfg.dataset.workers, pin_memory=self.device.type == "cuda",
                       rank=self.dist.rank, world=self.dist.world)

    def labelled_batches(self, stage: str) -> Batches | None:
        """Batches from the labelled part of the training set for a scheduler with a target task (TMT): its
        own order over that part (the whole set when ``label_fraction`` is 1), as the authors' second loader."""
        target = getattr(self.scheduler, "target", None)
        if target is None:
            return None
        fraction = float(getattr(self.scheduler, "label_fraction", 1.0))
        part = labelled_part(self.datasets["train"], fraction, self.cfg.seed)
        labelled = self.batches(part, stage, seed_offset=2)
        labelled.tasks = (target,)
        return labelled

    def per_task(self, batches: Batches) -> dict[str, Batches]:
        """AutoMTL's per-task loaders: one deterministic batch order per task over the same split."""
        if id(batches) not in self._task_batches:
            self._task_batches[id(batches)] = {t: batches.for_task(i) for i, t in enumerate(self.tasks)}
        return self._task_batches[id(batches)]

    def close(self, *sources: Batches) -> None:
        """Stop the workers of a finished stage's batches (and of their per-task loaders)."""
        for b in sources:
            for own in self._task_batches.pop(id(b), {}).values():
                own.close()
            b.close()

    def to_device(self, batch: Batch) -> Batch:
        x, targets = batch
        return x.to(self.device), {k: v.to(self.device) for k, v in targets.items()}

    # ------------------------------------------------------------ one step
    def forward(self, x: torch.Tensor, mode: str, tau: float = 1.0, generator: torch.Generator | None = None,
                tasks: Any = None, feature: bool = False) -> Any:
        """The model's outputs, in the run's precision, memory format and compilation."""
        x = x.to(self.device)
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.precision.autocast(self.device):
            return self.model.forward_all(x, mode=mode, tau=tau, generator=generator, tasks=tasks,
                                          feature=feature)

    def losses(self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Task -> loss (in float32 whatever the autocast dtype) for the outputs given."""
        return {t: self.task_types[t].loss(o.float(), targets[t].to(self.device)) for t, o in outputs.items()}

    def check_finite(self, losses: dict[str, torch.Tensor], stage: str, step: int) -> None:
        """A loss that is NaN or infinite stops the run (its last checkpoint stays intact)."""
        for t, v in losses.items():
            if not torch.isfinite(v):
                raise AutomtlError(f"the {t} loss is {v.item()} at {stage} step {step}; the run stopped and its last "
                                   f"checkpoint in {self.out / 'checkpoints'} is intact. Lower the learning rate "
                                   "or check the data")

    def train_step(self, batches: Batches, step: int, opt: torch.optim.Optimizer, mode: str, stage: str,
                   extra: Callable[[], torch.Tensor] | None = None, tau: float = 1.0) -> dict[str, float]:
        """One optimiser step on batch ``step``: the losses combined by the stage's scheduler (or their
        weighted sum), plus ``extra()`` (a regulariser); returns each task's loss."""
        gen = torch.Generator().manual_seed(step_seed(self.cfg.seed, stage, step))
        if self.cfg.dataset.loader == "per_task":  # each task its own batch: no shared forward, no z
            outs, targets, z = {}, {}, None
            for t, source in self.per_task(batches).items():
                x, y = source.batch(step)
                outs[t] = self.forward(x, mode, tau, gen, tasks=[t])[t]
                targets[t] = y[t]
        else:
            x, targets = batches.batch(step)
            outs, z = self.forward(x, mode, tau, gen, feature=True)
        losses = self.losses(outs, targets)
        self.check_finite(losses, stage, step)
        opt.zero_grad(set_to_none=True)
        combiner = self.scheduler if stage in self.scheduler_stages and isinstance(self.scheduler, Combiner) else self.plain
        params = [p for group in opt.param_groups for p in group["params"] if p.requires_grad]
        scale = self.scaler.scale if self.scaler is not None else lambda v: v
        combiner.backward({t: scale(v) for t, v in losses.items()},
                          StepContext(params=params, feature=z, world=self.dist.world,
                                      reduce=lambda t: all_reduce_sum(t, self.dist)))
        if extra is not None:
            scale(extra()).backward()
        average_gradients(params, self.dist)  # before unscaling: every rank then skips the same steps
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)  # not kept to the next step: its forward's peak is then without them
        if not self.cfg.sync_batchnorm:
            broadcast_buffers(self.model, self.dist)
        return {t: float(v.detach()) for t, v in losses.items()}

    def span_context(self, stage: str, mode: str, batches: Batches, start: int, count: int,
                     labelled: Batches | None = None) -> SpanContext:
        """What a meta scheduler gets for steps ``start .. start + count - 1`` of ``stage``."""
        def task_batch(task: str, k: int) -> Batch:
            own = labelled is not None and labelled.tasks is not None and task in labelled.tasks
            return self.to_device((labelled if own else batches).batch(k))  # type: ignore[union-attr]

        return SpanContext(
            model=self.model, optimizer=self.opts[stage], params=self.stage_params(stage),
            forward=lambda x, tasks=None, feature=False: self.forward(x, mode, tasks=tasks, feature=feature),
            batch=lambda k: self.to_device(batches.batch(k)), loss=self.losses, start=start, steps=count,
            device=self.device, task_batch=task_batch if labelled is not None else None,
            seed=lambda k: torch.manual_seed(step_seed(self.cfg.seed, stage, k)),
            check=lambda losses, k: self.check_finite(losses, stage, k),
            epoch=max(1, len(batches.dataset) // batches.batch_size))

    def stage_params(self, stage: str) -> list[torch.nn.Parameter]:
        """The parameters ``stage`` trains (the network's, in policy training)."""
        opt = self.opts["network" if stage == "policy" else stage]
        return [p for group in opt.param_groups for p in group["params"]]

    def prepare_scheduler(self, stage: str) -> None:
        """Give the scheduler its per-stage state once per stage (before a checkpoint restores it)."""
        if self._prepared == stage or stage not in self.scheduler_stages:
            return
        shape = None
        if stage == "posttrain":
            end = self.model.trunk_end("fixed")
            if end is None and self.scheduler.needs_feature:
                raise AutomtlError(f"scheduler '{self.cfg.scheduler.name}' needs a trunk that all tasks share, "
                                   "but the sampled policy gives the tasks different first layers; set "
                                   "stages.sample.share_first (e.g. 4) so that early layers are shared, or use "
                                   "another scheduler")
            shape = self.model.node_shape(end) if end is not None else None
        self.scheduler.to(self.device)
        self.scheduler.prepare(self.stage_params(stage), shape)
        self._prepared = self.state["scheduler_stage"] = stage

    # ------------------------------------------------------------ the loop
    def run_steps(self, stage: str, iters: int, body: Callable[[int], tuple[dict[str, float], int]]) -> None:
        """Run ``body(step)`` until ``iters`` steps are done; a body returns its log and how many steps it ran.
        Evaluates every ``eval_every`` steps (not in policy training) and checkpoints every
        ``checkpoint_every`` steps and at the end."""
        bar = Progress(stage, iters, self.state["step"], self.progress)
        every, eval_every = self.cfg.checkpoint_every, self.cfg.eval_every
        crossed = lambda k, a, b: bool(k) and b // k > a // k
        try:
            while self.state["step"] < iters:
                step = self.state["step"]
                # dropout (the one global draw): each rank its own masks for its own samples
                torch.manual_seed(step_seed(self.cfg.seed, stage, step) + self.dist.rank)
                info, count = body(step)
                self.state["step"] = step + count
                bar.update(info, count)
                self.evaluator.scalars(stage, info, step + count)
                if crossed(eval_every, step, step + count) and stage != "policy":
                    self.evaluator.log_metrics(stage, step + count, self.evaluator.evaluate(*self.eval_mode()))
                if crossed(every, step, step + count):
                    self.checkpoint()
        finally:
            bar.close()
        self.checkpoint()

    def eval_mode(self) -> tuple[str, Policy | None]:
        """Fixed mode once a policy is set, else hard (argmax) mode."""
        policy = self.model.fixed_policy
        return ("fixed", policy) if policy is not None else ("hard", None)

    # ------------------------------------------------------------ checkpoints
    def scheduler_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The gradient scheduler's own optimisers, named as checkpoints store them."""
        return {f"scheduler/{k}": v for k, v in self.scheduler.optimizers().items()}

    def checkpoint(self) -> None:
        """Save the model, the current stage's optimisers (earlier stages' moments are never used again)
        and the gradient scheduler's state and optimisers; the checkpoint before it is kept as a fallback."""
        if self.dist.is_main:  # the ranks hold the same weights and state: rank 0 writes them
            live = {k: self.opts[k] for k in STAGE_OPTIMIZERS[self.state["stage"]]}
            live.update(self.scheduler_optimizers())
            scheds = self.scheds if self.state["stage"] == "posttrain" else {}
            if self.scaler is not None:
                self.state["loss_scaler"] = self.scaler.state_dict()
            save_checkpoint(self.out / "checkpoints", self.model, live, scheds, self.state,
                            modules={"scheduler": self.scheduler})
            if self.on_checkpoint is not None:
                self.on_checkpoint()
            self.evaluator.flush()
        barrier(self.dist)

    def restore(self) -> None:
        """Continue from the run directory's checkpoint: its policy and scheduler stage first (they shape
        what is loaded), then weights, optimisers and state."""
        ckpt = self.out / "checkpoints"
        saved = peek_state(ckpt) or {}
        if saved.get("policy"):
            self.model.set_policy(Policy.from_json(saved["policy"]))
        if saved.get("scheduler_stage"):  # the scheduler's state in the checkpoint is that of this stage
            self.prepare_scheduler(saved["scheduler_stage"])
        opts = self.opts | self.scheduler_optimizers()
        self.state = load_checkpoint(ckpt, self.model, opts, self.scheds, modules={"scheduler": self.scheduler})
        if self.scaler is not None and self.state.get("loss_scaler"):
            self.scaler.load_state_dict(self.state["loss_scaler"])

