"""AutoMTL's training run over a compiled SuperModel, with checkpoints that survive a kill.

:class:`Trainer` composes the parts: the typed config (:mod:`.settings`), the model built from it
(:func:`build_model`, through :func:`~automtl_compiler.build.build_from_specs`), the gradient scheduler
(:func:`make_scheduler`), the loop that steps, checkpoints and evaluates (:mod:`.loop`, :mod:`.evaluation`)
and the four stages (:mod:`.stages`). Every random choice of a step - its batch, its Gumbel noise, dropout -
is drawn from generators seeded by (seed, stage, step), so a run resumed from a checkpoint repeats the
uninterrupted run exactly (on the CPU with deterministic algorithms).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..build import HeadSpec, build_from_specs
from ..errors import AutomtlError
from ..ir.serialize import atomic_write
from ..nn.policy import Policy
from ..nn.supermodel import SuperModel
from ..nn.sync_batchnorm import synchronise_batchnorm
from . import stages
from .batches import STAGES, Batches
from .checkpoint import has_checkpoint
from .config import dump_config
from .distributed import DistContext, barrier, check_same_weights, context_from_env
from .evaluation import Evaluator, open_board
from .loop import Loop
from .precision import resolve_precision
from .schedulers import Scheduler, SpanContext, WeightedSum
from .schedulers import create as create_scheduler
from .scoring import delta_m_against, read_baseline
from .settings import TRAINING_STAGES, TrainConfig

__all__ = ["Batches", "Trainer", "build_model", "check_distributable", "make_scheduler", "read_baseline"]


def make_scheduler(cfg: TrainConfig, baseline: bool = False) -> tuple[Scheduler, tuple[str, ...]]:
    """The configured gradient scheduler and the stages it runs in (the weighted sum runs in the others);
    a baseline run (post-train only) runs it in post-train or nowhere."""
    tasks, name = cfg.task_names, cfg.scheduler.name
    options = dict(cfg.scheduler.options)
    if name == "sum":  # the sum's λ_t default to the tasks' configured weights
        options.setdefault("weights", {t: cfg.tasks[t].weight for t in tasks})
    scheduler = create_scheduler(name, tasks=tasks, **options)
    able = tuple(s for s in TRAINING_STAGES if s in scheduler.stages
                 and not (scheduler.needs_feature and s != "posttrain"))
    asked = cfg.scheduler.stages
    if asked is None:
        chosen = able
    else:
        unable = [s for s in asked if s not in able]
        if unable:
            why = ("it needs a trunk that all tasks share, which only post-train (a fixed policy) has"
                   if scheduler.needs_feature else f"it runs in {', '.join(scheduler.stages)} only")
            raise AutomtlError(f"config: scheduler '{name}' cannot run in stage(s) {unable}: {why}; set "
                               f"scheduler.stages to a subset of {list(able) or ['posttrain']}")
        chosen = asked
    if baseline:  # a baseline is one post-train run
        chosen = ("posttrain",) if "posttrain" in chosen else ()
    if not chosen:
        raise AutomtlError(f"config: scheduler '{name}' has no stage to run in here (it runs in "
                           f"{', '.join(scheduler.stages)}); use another scheduler")
    return scheduler, chosen


def check_distributable(cfg: TrainConfig, scheduler: Scheduler, stages_run: tuple[str, ...],
                        ctx: DistContext) -> None:
    """Across processes every rank averages its gradients, which is exact for a weighted sum of losses (a
    linear combination); IMTL reduces what it needs over the ranks first (``StepContext.reduce``). Any other
    scheduler combines per-task gradients non-linearly and would balance each rank's part of the batch, not
    the batch, so it is refused at start rather than run wrongly."""
    from .schedulers.imtl import IMTL  # imported when needed, as the registry does

    if not ctx.distributed or not stages_run or isinstance(scheduler, (WeightedSum, IMTL)):
        return
    raise AutomtlError(f"scheduler '{cfg.scheduler.name}' cannot run across {ctx.world} processes yet: it combines "
                       "the tasks' gradients non-linearly, so each process would balance its own part of the batch; "
                       "use scheduler sum or imtl with several processes, or run this scheduler in one process")


def build_model(cfg: TrainConfig, task_types: dict[str, Any]) -> SuperModel:
    """The config's SuperModel: its backbone read at ``input_size``, a head per task; seeded, so the
    random initial weights are the same every time."""
    if cfg.input_size is None:
        raise AutomtlError("config: 'input_size' is not known yet; set it, or resolve it from the data first "
                           "(train.run.resolve_input_size)")
    torch.manual_seed(cfg.seed)
    from ..frontends import load_backbone

    h, w = cfg.input_size
    graph = load_backbone(cfg.backbone, input_shape=(1, 3, h, w), weights=cfg.backbone_weights,
                          strict=cfg.backbone_weights_strict)
    specs = {}
    for t, spec in cfg.tasks.items():
        out = spec.channels or task_types[t].out_channels
        if not out:
            raise AutomtlError(f"config: 'tasks.{t}.channels' is needed (the dataset does not say how many "
                               "outputs this task has)")
        specs[t] = HeadSpec(spec.head, out, spec.head_kwargs())
    return build_from_specs(graph, specs, feature_node=cfg.feature_node, output_stride=cfg.output_stride)


class Trainer:
    """Runs the stages of one config into a run directory (``RUN_DIR``).

    ``cfg`` is the validated config mapping (written to ``config.yaml``); the parts read its typed form
    ``settings``. ``baseline`` trains a reference instead: every unit shared, post-train settings for the
    whole budget.
    """

    def __init__(self, cfg: dict[str, Any], out: str | Path, *, datasets: dict[str, Any], task_types: dict[str, Any],
                 progress: bool = True, baseline: bool = False) -> None:
        self.cfg, self.out, self.progress = cfg, Path(out), progress
        self.settings = s = TrainConfig.from_dict(cfg)
        self.datasets, self.task_types = datasets, task_types
        self.tasks = s.task_names
        self.dist, self.device = context_from_env(s.device)
        self.board = open_board(s, self.out) if self.dist.is_main else None
        self.scheduler, self.scheduler_stages = make_scheduler(s, baseline)
        check_distributable(s, self.scheduler, self.scheduler_stages, self.dist)
        if s.baselines:
            read_baseline(Path(s.baselines), self.tasks)  # fail now, not after training
        self.model = build_model(s, task_types).to(self.device)
        if s.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.model.use_compiler(None if s.compile == "none" else s.compile)
        self.model.use_checkpointing(s.activation_checkpointing)
        self.precision = resolve_precision(
            s.precision, self.device, self.scheduler.scales_losses or not self.scheduler_stages)
        if s.sync_batchnorm and self.dist.distributed:
            synchronise_batchnorm(self.model)
        check_same_weights(self.model, self.dist)
        self.opts, self.scheds = stages.make_optimizers(self.model, s.stages)
        self.evaluator = Evaluator(s, self.out, self.model, val=datasets.get("val"), task_types=task_types,
                                   device=self.device, board=self.board, dist=self.dist)
        self.loop = Loop(s, self.out, self.model, opts=self.opts, scheds=self.scheds, scheduler=self.scheduler,
                         scheduler_stages=self.scheduler_stages, evaluator=self.evaluator, datasets=datasets,
                         task_types=task_types, device=self.device, progress=progress, dist=self.dist,
                         precision=self.precision)
        if self.dist.distributed and self.dist.is_main and progress:
            print(f"{self.dist.world} processes ({self.dist.backend}), batch_size {s.batch_size} per process: "
                  f"effective batch size {s.batch_size * self.dist.world}", file=sys.stderr, flush=True)
        self.plain = self.loop.plain
        if baseline:
            share = Policy({t: {u: "share" for u in self.model.unit_names} for t in self.tasks})
            self.model.set_policy(share)
            self.state.update({"stage": "posttrain", "policy": share.to_json()})

    # ------------------------------------------------------------ the run
    def run(self) -> dict[str, Any]:
        """Run (or resume) every stage and write the report; returns the report."""
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(dump_config(self.cfg))
        barrier(self.dist)
        if has_checkpoint(self.out / "checkpoints"):
            self.loop.restore()
        self.model.train()
        if self.state["done"]:
            return self.report()
        run_stage: dict[str, Callable[[], None]] = {
            "pretrain": lambda: stages.pretrain(self.loop), "policy": lambda: stages.policy(self.loop),
            "sample": lambda: stages.sample(self.loop),
            "posttrain": lambda: stages.posttrain(self.loop, lambda: build_model(self.settings, self.task_types))}
        for stage in STAGES[STAGES.index(self.state["stage"]):]:
            self.state["stage"] = stage
            run_stage[stage]()
            self.state.update({"step": 0})
        self.state["done"] = True
        self.checkpoint()
        report = self.report()
        if self.dist.is_main:
            self.log_metrics("final", self.settings.stages.posttrain.iters, report["tasks"])
        return report

    def report(self) -> dict[str, Any]:
        """Final metrics, parameters, policy (counts and per-unit probabilities) and compute cost; written to
        report.json and drawn to policy.png."""
        from ..nn.compact import prune
        from ..nn.cost import compact_cost
        from .policy_plot import draw_policy, policy_data

        policy = self.model.fixed_policy or self.model.sample_policy("argmax")
        metrics = self.evaluate("fixed", policy)
        compact = prune(self.model, policy)
        units = policy_data(self.model.policy_distribution(), policy.choices, self.model.unit_depths())
        report = {"tasks": metrics, "directions": {t: self.task_types[t].metric_directions for t in self.tasks},
                  "policy": policy.counts(), "policy_units": units,
                  "parameters": {"compact": compact.num_parameters(), **compact.reference},
                  "macs": compact_cost(compact), "candidates": self.state.get("candidates", []),
                  "evaluated": self.evaluated,
                  "batch": {"per_process": self.settings.batch_size, "processes": self.dist.world,
                            "effective": self.settings.batch_size * self.dist.world},
                  "arithmetic": {"precision": self.precision.name, "why": self.precision.reason,
                                 "channels_last": self.settings.channels_last, "compile": self.settings.compile,
                                 "activation_checkpointing": self.settings.activation_checkpointing}}
        if self.settings.baselines:
            report["delta_m"] = delta_m_against(Path(self.settings.baselines), metrics, self.task_types, self.tasks)
        if self.dist.is_main:
            text = json.dumps(report, indent=1)
            atomic_write(self.out / "report.json", lambda tmp: tmp.write_text(text))
            draw_policy(units, self.out / "policy.png", title=f"policy of {self.out.name or self.out}")
        barrier(self.dist)
        return report

    # ------------------------------------------------------------ the loop's surface
    @property
    def state(self) -> dict[str, Any]:
        """The resumable state: stage, step, temperature, policy, candidates, done."""
        return self.loop.state

    @property
    def on_checkpoint(self) -> Callable[[], None] | None:
        """Called after every checkpoint (a run replacing an earlier one deletes the old one then)."""
        return self.loop.on_checkpoint

    @on_checkpoint.setter
    def on_checkpoint(self, call: Callable[[], None] | None) -> None:
        self.loop.on_checkpoint = call

    @property
    def evaluated(self) -> dict[str, Any]:
        """What the last evaluation covered (split, samples, whether it was the whole split)."""
        return self.evaluator.evaluated

    def evaluate(self, mode: str, policy: Policy | None = None) -> dict[str, dict[str, float]]:
        """Per-task validation metrics in ``mode`` (see :meth:`.Evaluator.evaluate`)."""
        return self.evaluator.evaluate(mode, policy)

    def log_metrics(self, stage: str, step: int, metrics: dict[str, dict[str, float]]) -> None:
        """Append ``metrics`` to RUN_DIR/metrics.jsonl (and TensorBoard)."""
        self.evaluator.log_metrics(stage, step, metrics)

    def losses(self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Task -> loss (float32) of ``outputs`` against ``targets``."""
        return self.loop.losses(outputs, targets)

    def checkpoint(self) -> None:
        """Save a checkpoint of the run now."""
        self.loop.checkpoint()

    def batches(self, split: str | Any, stage: str, seed_offset: int = 0) -> Batches:
        """The deterministic training batches of ``split`` for ``stage``."""
        return self.loop.batches(split, stage, seed_offset)

    def span_context(self, stage: str, mode: str, batches: Batches, start: int, count: int,
                     labelled: Batches | None = None) -> SpanContext:
        """What a meta scheduler gets for a span of ``stage`` (see :meth:`.Loop.span_context`)."""
        return self.loop.span_context(stage, mode, batches, start, count, labelled)
