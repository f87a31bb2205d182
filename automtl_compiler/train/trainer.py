"""AutoMTL's three training stages over a compiled SuperModel, with checkpoints that survive a kill.

Stages: pre-train (mean of branches), policy-train (alternating network and policy steps with the
policy regulariser and a decaying Gumbel temperature), sample (a discrete policy), post-train (fixed
policy). Every random choice of a step - its batch, its Gumbel noise, dropout - is drawn from generators
seeded by (seed, stage, step), so a run resumed from a checkpoint repeats the uninterrupted run exactly
(on the CPU with deterministic algorithms).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..build import build_supermodel
from ..errors import AutomtlError
from ..ir.serialize import atomic_write
from ..nn.heads import create_head
from ..nn.policy import Policy
from ..nn.supermodel import SuperModel
from .batches import STAGES, Batches, eval_loader, step_seed
from .checkpoint import has_checkpoint, load_checkpoint, peek_state, save_checkpoint
from .config import dump_config
from .schedulers import (
    Combiner,
    MetaScheduler,
    Scheduler,
    SpanContext,
    StepContext,
    WeightedSum,
)
from .schedulers import create as create_scheduler

TRAINING_STAGES = ("pretrain", "policy", "posttrain")


def pick_device(name: str) -> torch.device:
    """``auto`` is CUDA when a GPU is usable, else the CPU; ``cuda`` without a GPU is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise AutomtlError("device: cuda was asked for but no CUDA GPU is usable here; use device: cpu or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


def read_baseline(path: Path, tasks: list[str]) -> dict[str, dict[str, float]]:
    """Per-task metrics of a baseline run's report.json (``automtl train --baseline ...``)."""
    try:
        single = json.loads(path.read_text())["tasks"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AutomtlError(f"baselines: {path} is not a baseline report.json ({e}); train one with "
                           "`automtl train CONFIG --baseline single-task`") from None
    missing = sorted(set(tasks) - set(single))
    if missing:
        raise AutomtlError(f"baselines: {path} has no metrics for task(s) {missing}")
    return single


class Trainer:
    """Runs the stages of one config into a run directory (``RUN_DIR``)."""

    def __init__(self, cfg: dict[str, Any], out: str | Path, *, datasets: dict[str, Any], task_types: dict[str, Any],
                 progress: bool = True, baseline: bool = False) -> None:
        self.cfg, self.out, self.progress = cfg, Path(out), progress
        self.datasets, self.task_types = datasets, task_types
        self.tasks = list(cfg["tasks"])
        self.device = pick_device(cfg["device"])
        self.board = self._open_board()
        self.scheduler, self.scheduler_stages = self._make_scheduler(baseline)
        self.plain = WeightedSum(self.tasks, {t: cfg["tasks"][t]["weight"] for t in self.tasks})
        self._prepared: str | None = None
        self._task_batches: dict[int, dict[str, Batches]] = {}
        self._eval: Any = None
        self.evaluated: dict[str, Any] = {}
        if cfg["baselines"]:
            read_baseline(Path(cfg["baselines"]), self.tasks)  # fail now, not after training
        self.model = self._build().to(self.device)
        self.state: dict[str, Any] = {"stage": "pretrain", "step": 0, "tau": cfg["stages"]["policy"]["tau"],
                                      "policy_steps": 0, "policy": None, "done": False,
                                      "scheduler_stage": None}
        self._make_optimizers()
        if baseline:  # a reference: every unit shared, trained with post-train settings for the whole budget
            share = Policy({t: {u: "share" for u in self.model.unit_names} for t in self.tasks})
            self.model.set_policy(share)
            self.state.update({"stage": "posttrain", "policy": share.to_json()})

    # ------------------------------------------------------------ construction
    def _make_optimizers(self) -> None:
        """The stages' optimisers (and post-train's LR schedule) over the model's parameters."""
        stages = self.cfg["stages"]
        self.opts = {
            "pretrain": torch.optim.Adam(self.model.network_parameters(), lr=stages["pretrain"]["lr"],
                                         betas=tuple(stages["pretrain"]["betas"]),
                                         weight_decay=stages["pretrain"]["weight_decay"]),
            "network": torch.optim.SGD(self.model.network_parameters(), lr=stages["policy"]["network_lr"],
                                       momentum=stages["policy"]["momentum"],
                                       weight_decay=stages["policy"]["network_weight_decay"]),
            "policy": torch.optim.Adam(self.model.policy_parameters(), lr=stages["policy"]["policy_lr"],
                                       weight_decay=stages["policy"]["policy_weight_decay"]),
            "posttrain": torch.optim.Adam(self.model.network_parameters(), lr=stages["posttrain"]["lr"],
                                          betas=tuple(stages["posttrain"]["betas"]),
                                          weight_decay=stages["posttrain"]["weight_decay"]),
        }
        self.scheds = {"posttrain": torch.optim.lr_scheduler.StepLR(self.opts["posttrain"],
                                                                    stages["posttrain"]["step_size"],
                                                                    stages["posttrain"]["gamma"])}

    def _make_scheduler(self, baseline: bool) -> tuple[Scheduler, tuple[str, ...]]:
        """The configured scheduler and the stages it runs in (the weighted sum runs in the others)."""
        options = {k: v for k, v in self.cfg["scheduler"].items() if k not in ("name", "stages")}
        name = self.cfg["scheduler"]["name"]
        if name == "sum":  # the sum's λ_t default to the tasks' configured weights
            options.setdefault("weights", {t: self.cfg["tasks"][t]["weight"] for t in self.tasks})
        scheduler = create_scheduler(name, tasks=self.tasks, **options)
        able = tuple(s for s in TRAINING_STAGES if s in scheduler.stages
                     and not (scheduler.needs_feature and s != "posttrain"))
        asked = self.cfg["scheduler"].get("stages")
        if asked is None:
            stages = able
        else:
            if not isinstance(asked, list) or any(s not in TRAINING_STAGES for s in asked):
                raise AutomtlError(f"config: 'scheduler.stages' must be a list of {', '.join(TRAINING_STAGES)}, "
                                   f"got {asked!r}")
            unable = [s for s in asked if s not in able]
            if unable:
                why = ("it needs a trunk that all tasks share, which only post-train (a fixed policy) has"
                       if scheduler.needs_feature else f"it runs in {', '.join(scheduler.stages)} only")
                raise AutomtlError(f"config: scheduler '{name}' cannot run in stage(s) {unable}: {why}; set "
                                   f"scheduler.stages to a subset of {list(able) or ['posttrain']}")
            stages = tuple(asked)
        if baseline:  # a baseline is one post-train run
            stages = ("posttrain",) if "posttrain" in stages else ()
        if not stages:
            raise AutomtlError(f"config: scheduler '{name}' has no stage to run in here (it runs in "
                               f"{', '.join(scheduler.stages)}); use another scheduler")
        return scheduler, stages

    def _build(self) -> SuperModel:
        torch.manual_seed(self.cfg["seed"])  # random-init backbones and heads are the same every time
        h, w = self.cfg["input_size"]
        from ..frontends import load_backbone

        graph = load_backbone(self.cfg["backbone"], input_shape=(1, 3, h, w), weights=self.cfg["backbone_weights"],
                              strict=self.cfg["backbone_weights_strict"])
        from ..passes.dilate import set_output_stride
        from ..passes.feature import find_feature_node

        if self.cfg["output_stride"]:
            graph = set_output_stride(graph, self.cfg["output_stride"])
        feature = self.cfg["feature_node"] or find_feature_node(graph)
        channels = graph.node(feature).shape[1]
        heads = {}
        for t in self.tasks:
            spec = self.cfg["tasks"][t]
            out = spec.get("channels") or self.task_types[t].out_channels
            if not out:
                raise AutomtlError(f"config: 'tasks.{t}.channels' is needed (the dataset does not say how many "
                                   "outputs this task has)")
            options = dict(spec["head_options"])
            if spec["head"] == "aspp":
                options.setdefault("hidden", spec["hidden"])
            heads[t] = create_head(spec["head"], channels, out, **options)
        return build_supermodel(graph, heads, feature_node=feature)

    # ------------------------------------------------------------ losses and evaluation
    def losses(self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Task -> loss (in float32 whatever the autocast dtype) for the outputs given."""
        return {t: self.task_types[t].loss(o.float(), targets[t].to(self.device)) for t, o in outputs.items()}

    def check_finite(self, losses: dict[str, torch.Tensor], stage: str, step: int) -> None:
        for t, v in losses.items():
            if not torch.isfinite(v):
                raise AutomtlError(f"the {t} loss is {v.item()} at {stage} step {step}; the run stopped and its last "
                                   f"checkpoint in {self.out / 'checkpoints'} is intact. Lower the learning rate "
                                   "or check the data")

    @torch.no_grad()
    def evaluate(self, mode: str, policy: Policy | None = None) -> dict[str, dict[str, float]]:
        """Per-task metrics over the validation split, once and in order (hard or fixed mode, no
        gradients); ``eval_batches`` caps the batches for quick runs. The metrics accumulate over pixels
        and samples, so they do not depend on the batch size. ``self.evaluated`` counts the samples."""
        self.model.eval()
        metrics = {t: self.task_types[t].new_metric() for t in self.tasks}
        cap, seen = self.cfg["eval_batches"], 0
        for i, (x, targets) in enumerate(self._val_loader()):
            if cap is not None and i >= cap:
                break
            outs = self.model.forward_all(x.to(self.device), mode=mode, policy=policy)
            for t in self.tasks:
                metrics[t].update(outs[t].float(), targets[t].to(self.device))
            seen += x.shape[0]
        self.model.train()
        self.evaluated = {"split": "val", "samples": seen, "split_samples": len(self.datasets["val"]),
                          "whole_split": seen == len(self.datasets["val"])}
        return {t: m.compute() for t, m in metrics.items()}

    def _val_loader(self) -> Any:
        if self._eval is None:
            self._eval = eval_loader(self.datasets["val"], self.cfg["batch_size"], self.cfg["dataset"]["workers"],
                                     self.device.type == "cuda")
        return self._eval

    def batches(self, split: str | Any, stage: str, seed_offset: int = 0) -> Batches:
        """The deterministic training batches of ``split`` (a split's name, or a dataset) for ``stage``,
        loaded by the config's workers."""
        dataset = self.datasets[split] if isinstance(split, str) else split
        return Batches(dataset, self.cfg["batch_size"], self.cfg["seed"] + seed_offset, stage,
                       workers=self.cfg["dataset"]["workers"], pin_memory=self.device.type == "cuda")

    def log_metrics(self, stage: str, step: int, metrics: dict[str, dict[str, float]]) -> None:
        line = json.dumps({"stage": stage, "step": step, "metrics": metrics})
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(line + "\n")
        if self.board is not None:
            for task, values in metrics.items():
                for key, value in values.items():
                    self.board.add_scalar(f"{stage}/val/{task}/{key}", value, step)

    def _open_board(self) -> Any:
        """A TensorBoard writer into RUN_DIR/tensorboard when the config asks for one."""
        if not self.cfg["tensorboard"]:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise AutomtlError("config: 'tensorboard: true' needs the tensorboard package; install it with "
                               "pip install 'automtl-compiler[tensorboard]' or set tensorboard: false") from None
        return SummaryWriter(str(self.out / "tensorboard"))

    # ------------------------------------------------------------ stages
    def run(self) -> dict[str, Any]:
        """Run (or resume) every stage and write the report; returns the report."""
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(dump_config(self.cfg))
        ckpt = self.out / "checkpoints"
        if has_checkpoint(ckpt):
            saved = peek_state(ckpt) or {}
            if saved.get("policy"):
                self.model.set_policy(Policy.from_json(saved["policy"]))
            if saved.get("scheduler_stage"):  # the scheduler's state in the checkpoint is that of this stage
                self._prepare_scheduler(saved["scheduler_stage"])
            opts = self.opts | self._scheduler_optimizers()
            self.state = load_checkpoint(ckpt, self.model, opts, self.scheds, modules={"scheduler": self.scheduler})
        self.model.train()
        if not self.state["done"]:
            for stage in STAGES[STAGES.index(self.state["stage"]):]:
                self.state["stage"] = stage
                getattr(self, f"_stage_{stage}")()
                self.state.update({"step": 0})
            self.state["done"] = True
            self.checkpoint()
            report = self.report()
            self.log_metrics("final", self.cfg["stages"]["posttrain"]["iters"], report["tasks"])
            return report
        return self.report()

    STAGE_OPTIMIZERS = {"pretrain": ("pretrain",), "policy": ("network", "policy"), "sample": (),
                        "posttrain": ("posttrain",)}

    #: Called after every checkpoint: a run that replaces an earlier one (``--overwrite``) deletes it then.
    on_checkpoint: Callable[[], None] | None = None

    def checkpoint(self) -> None:
        """Save the model, the current stage's optimisers (earlier stages' moments are never used again)
        and the gradient scheduler's state and optimisers; the checkpoint before it is kept as a fallback."""
        live = {k: self.opts[k] for k in self.STAGE_OPTIMIZERS[self.state["stage"]]}
        live.update(self._scheduler_optimizers())
        scheds = self.scheds if self.state["stage"] == "posttrain" else {}
        save_checkpoint(self.out / "checkpoints", self.model, live, scheds, self.state,
                        modules={"scheduler": self.scheduler})
        if self.on_checkpoint is not None:
            self.on_checkpoint()
        if self.board is not None:
            self.board.flush()

    def _scheduler_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The gradient scheduler's own optimisers, named as checkpoints store them."""
        return {f"scheduler/{k}": v for k, v in self.scheduler.optimizers().items()}

    def _stage_params(self, stage: str) -> list[torch.nn.Parameter]:
        opt = self.opts["network" if stage == "policy" else stage]
        return [p for group in opt.param_groups for p in group["params"]]

    def _prepare_scheduler(self, stage: str) -> None:
        """Give the scheduler its per-stage state once per stage (before a checkpoint restores it)."""
        if self._prepared == stage or stage not in self.scheduler_stages:
            return
        shape = None
        if stage == "posttrain":
            end = self.model.trunk_end("fixed")
            if end is None and self.scheduler.needs_feature:
                raise AutomtlError(f"scheduler '{self.cfg['scheduler']['name']}' needs a trunk that all tasks share, "
                                   "but the sampled policy gives the tasks different first layers; set "
                                   "stages.sample.share_first (e.g. 4) so that early layers are shared, or use "
                                   "another scheduler")
            shape = self.model.node_shape(end) if end is not None else None
        self.scheduler.to(self.device)
        self.scheduler.prepare(self._stage_params(stage), shape)
        self._prepared = self.state["scheduler_stage"] = stage

    def _loop(self, stage: str, iters: int, body: Callable[[int], tuple[dict[str, float], int]]) -> None:
        """Run ``body(step)`` until ``iters`` steps are done; a body returns its log and how many steps it ran."""
        bar = Progress(stage, iters, self.state["step"], self.progress)
        every, eval_every = self.cfg["checkpoint_every"], self.cfg["eval_every"]
        crossed = lambda k, a, b: bool(k) and b // k > a // k
        try:
            while self.state["step"] < iters:
                step = self.state["step"]
                torch.manual_seed(step_seed(self.cfg["seed"], stage, step))  # dropout and any other global draw
                info, count = body(step)
                self.state["step"] = step + count
                bar.update(info, count)
                if self.board is not None:
                    for key, value in info.items():
                        self.board.add_scalar(f"{stage}/{key}", value, step + count)
                if crossed(eval_every, step, step + count) and stage != "policy":
                    self.log_metrics(stage, step + count, self.evaluate(*self._eval_mode()))
                if crossed(every, step, step + count):
                    self.checkpoint()
        finally:
            bar.close()
        self.checkpoint()

    def _run_network_stage(self, stage: str, iters: int, mode: str, batches: Batches,
                           after: Callable[[int], None] = lambda count: None) -> None:
        """A stage that trains the network alone: per-step combiner steps, or a meta scheduler's spans."""
        self._prepare_scheduler(stage)
        opt = self.opts[stage]
        labelled = None
        if isinstance(self.scheduler, MetaScheduler) and stage in self.scheduler_stages:
            meta = self.scheduler
            labelled = self._labelled_batches(stage)

            def body(step: int) -> tuple[dict[str, float], int]:
                count = min(meta.span, iters - step)
                ctx = self.span_context(stage, mode, batches, step, count, labelled)
                info = meta.run_span(ctx)
                after(count)
                return info, count
        else:
            def body(step: int) -> tuple[dict[str, float], int]:
                info = self._train_step(batches, step, opt, mode, stage)
                after(1)
                return info, 1

        try:
            self._loop(stage, iters, body)
        finally:
            if labelled is not None:
                labelled.close()

    def span_context(self, stage: str, mode: str, batches: Batches, start: int, count: int,
                     labelled: Batches | None = None) -> SpanContext:
        """What a meta scheduler gets for steps ``start .. start + count - 1`` of ``stage``."""
        return SpanContext(
            model=self.model, optimizer=self.opts[stage], params=self._stage_params(stage),
            forward=lambda x, tasks=None, feature=False: self._forward(x, mode, tasks=tasks, feature=feature),
            batch=lambda k: self._to_device(batches.batch(k)), loss=self.losses, start=start, steps=count,
            device=self.device,
            task_batch=(lambda task, k: self._to_device((labelled if task in labelled.tasks else batches).batch(k)))
            if labelled is not None else None,
            seed=lambda k: torch.manual_seed(step_seed(self.cfg["seed"], stage, k)),
            check=lambda losses, k: self.check_finite(losses, stage, k),
            epoch=max(1, len(batches.dataset) // batches.batch_size))

    def _labelled_batches(self, stage: str) -> Batches | None:
        """Batches from the labelled part of the training set for a scheduler with a target task (TMT): its
        own order over that part (the whole set when ``label_fraction`` is 1), as the authors' second loader."""
        fraction = float(getattr(self.scheduler, "label_fraction", 1.0))
        target = getattr(self.scheduler, "target", None)
        if target is None:
            return None
        from torch.utils.data import Subset

        train = self.datasets["train"]
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.cfg["seed"]))
        keep = max(1, round(min(fraction, 1.0) * len(train)))
        labelled = self.batches(Subset(train, order[:keep].tolist()), stage, seed_offset=2)
        labelled.tasks = (target,)  # type: ignore[attr-defined]
        return labelled

    def _to_device(self, batch: tuple[torch.Tensor, dict[str, torch.Tensor]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, targets = batch
        return x.to(self.device), {k: v.to(self.device) for k, v in targets.items()}

    def _forward(self, x: torch.Tensor, mode: str, tau: float = 1.0, generator: torch.Generator | None = None,
                 tasks: Any = None, feature: bool = False) -> Any:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg["bf16"]):
            return self.model.forward_all(x.to(self.device), mode=mode, tau=tau, generator=generator, tasks=tasks,
                                          feature=feature)


    def _eval_mode(self) -> tuple[str, Policy | None]:
        policy = self.model.fixed_policy
        return ("fixed", policy) if policy is not None else ("hard", None)

    def _train_step(self, batches: Batches, step: int, opt: torch.optim.Optimizer, mode: str, stage: str,
                    extra: Callable[[], torch.Tensor] | None = None, tau: float = 1.0) -> dict[str, float]:
        gen = torch.Generator().manual_seed(step_seed(self.cfg["seed"], stage, step))
        if self.cfg["dataset"]["loader"] == "per_task":  # each task its own batch: no shared forward, no z
            outs, targets, z = {}, {}, None
            for t, source in self._per_task(batches).items():
                x, y = source.batch(step)
                outs[t] = self._forward(x, mode, tau, gen, tasks=[t])[t]
                targets[t] = y[t]
        else:
            x, targets = batches.batch(step)
            outs, z = self._forward(x, mode, tau, gen, feature=True)
        losses = self.losses(outs, targets)
        self.check_finite(losses, stage, step)
        opt.zero_grad(set_to_none=True)
        combiner = self.scheduler if stage in self.scheduler_stages and isinstance(self.scheduler, Combiner) else self.plain
        params = [p for group in opt.param_groups for p in group["params"] if p.requires_grad]
        combiner.backward(losses, StepContext(params=params, feature=z))
        if extra is not None:
            extra().backward()
        opt.step()
        return {t: float(v.detach()) for t, v in losses.items()}

    def _per_task(self, batches: Batches) -> dict[str, Batches]:
        """AutoMTL's per-task loaders: one deterministic batch order per task over the same split."""
        if id(batches) not in self._task_batches:
            self._task_batches[id(batches)] = {t: batches.for_task(i) for i, t in enumerate(self.tasks)}
        return self._task_batches[id(batches)]

    def _close(self, *sources: Batches) -> None:
        """Stop the workers of a finished stage's batches (and of their per-task loaders)."""
        for b in sources:
            for own in self._task_batches.pop(id(b), {}).values():
                own.close()
            b.close()

    def _stage_pretrain(self) -> None:
        batches = self.batches("train", "pretrain")
        try:
            self._run_network_stage("pretrain", self.cfg["stages"]["pretrain"]["iters"], "pretrain", batches)
        finally:
            self._close(batches)

    def _stage_policy(self) -> None:
        s = self.cfg["stages"]["policy"]
        train = self.batches("train", "policy")
        held = self.batches("policy", "policy", seed_offset=1)
        cycle = s["network_steps"] + s["policy_steps"]

        self._prepare_scheduler("policy")

        def body(step: int) -> tuple[dict[str, float], int]:
            tau = self.state["tau"]
            if step % cycle < s["network_steps"] or s["policy_steps"] == 0:
                return self._train_step(train, step, self.opts["network"], "soft", "policy", tau=tau) | {"tau": tau}, 1
            gen = torch.Generator().manual_seed(step_seed(self.cfg["seed"], "sample", step))
            reg = lambda: s["reg_weight"] * sum(self.model.policy_regulariser(t, tau=tau, generator=gen)
                                                for t in self.tasks)
            network = self.model.network_parameters()
            for p in network:  # a policy step needs no weight gradients: skip computing them
                p.requires_grad_(False)
            try:
                info = self._train_step(held, step, self.opts["policy"], "soft", "policy", extra=reg, tau=tau)
            finally:
                for p in network:
                    p.requires_grad_(True)
            self.state["policy_steps"] += 1
            if self.state["policy_steps"] % s["tau_every"] == 0:
                self.state["tau"] = tau * s["tau_decay"]
            return info | {"tau": tau}, 1

        try:
            self._loop("policy", s["iters"], body)
        finally:
            self._close(train, held)

    def _stage_sample(self) -> None:
        """Draw the policy. With ``candidates: k > 1`` the candidates are the argmax policy and k - 1 samples
        (strategy ``sample``). Those whose compute ratio (multiply-accumulates of all tasks in one call against
        the tasks one by one) exceeds ``max_macs_ratio`` are dropped unscored (the cheapest stays when none
        fits); the rest are scored on validation in fixed mode, less ``cost_weight`` times the ratio, and the
        best is kept."""
        from ..nn.cost import policy_cost

        s = self.cfg["stages"]["sample"]
        count = max(1, s["candidates"])
        policies = []
        for k in range(count):
            strategy = "argmax" if count > 1 and k == 0 else s["strategy"]
            policy = self.model.sample_policy(strategy, seed=s["seed"] + k)
            for u in self.model.unit_names[:s["share_first"]]:
                for t in self.tasks:
                    policy.choices[t][u] = "share"
            if policy not in policies:
                policies.append(policy)
        ratios = [policy_cost(self.model, p)["ratio"] for p in policies]
        budget = s["max_macs_ratio"]
        within = [budget is None or r <= budget for r in ratios]
        if not any(within):  # nothing fits the budget: the cheapest candidate(s) only
            within = [r == min(ratios) for r in ratios]
        scored = [i for i in range(len(policies)) if within[i]]
        found = self._scores([self._score_metrics(policies[i]) for i in scored]) if len(scored) > 1 else [0.0]
        accuracy: list[float | None] = [None] * len(policies)
        for i, a in zip(scored, found):
            accuracy[i] = a
        scores = [None if a is None else a - s["cost_weight"] * 100 * r for a, r in zip(accuracy, ratios)]
        pick = max(scored, key=lambda i: scores[i])
        best = policies[pick]
        self.state["candidates"] = [{"accuracy": a, "macs_ratio": r, "score": sc, "within_budget": w,
                                     "chosen": i == pick, "policy": p.counts()}
                                    for i, (a, r, sc, w, p) in enumerate(zip(accuracy, ratios, scores, within, policies))]
        self.model.set_policy(best)
        self.state["policy"] = best.to_json()
        best.save(self.out / "policy.json")
        self.checkpoint()

    def _score_metrics(self, policy: Policy) -> dict[str, dict[str, float]]:
        """Validation metrics of a candidate policy, its batch-norm statistics first re-estimated on
        ``calibration_batches`` training batches under that policy (the stage's own batches, so a resumed
        run scores alike); the model's statistics are restored afterwards."""
        from ..nn.calibrate import recalibrated_batchnorm

        count = self.cfg["stages"]["sample"]["calibration_batches"]
        if count == 0:
            return self.evaluate("fixed", policy)
        batches = self.batches("train", "sample")

        def feed() -> None:
            for k in range(count):
                self.model.forward_all(batches.batch(k)[0].to(self.device), mode="fixed", policy=policy)

        try:
            with recalibrated_batchnorm(self.model, feed):
                return self.evaluate("fixed", policy)
        finally:
            self._close(batches)

    def _scores(self, results: list[dict[str, dict[str, float]]]) -> list[float]:
        """Scale-free accuracy scores of candidates' validation metrics in percent (higher is better): Δm
        against the baselines when the config names them, else the same average of signed relative
        differences taken against the candidates' mean."""
        if self.cfg["baselines"]:
            found = [self._delta_m(r)["delta_m"] for r in results]
            if None not in found:
                return found
        scores = [0.0] * len(results)
        for t in self.tasks:
            directions = self.task_types[t].metric_directions
            for k in results[0][t]:
                mean = sum(r[t][k] for r in results) / len(results)
                if mean == 0:
                    continue
                for i, r in enumerate(results):
                    change = (r[t][k] - mean) / abs(mean) * (1 if directions.get(k, True) else -1)
                    scores[i] += 100 * change / len(results[0][t]) / len(self.tasks)
        return scores

    def _delta_m(self, metrics: dict[str, dict[str, float]]) -> dict[str, Any]:
        """Δm of ``metrics`` against the config's baselines; metrics whose baseline is 0 (no relative
        change exists) are left out and listed under ``skipped``."""
        from ..tasks import delta_m

        single = read_baseline(Path(self.cfg["baselines"]), self.tasks)
        usable = {t: {k: v for k, v in single[t].items() if v != 0} for t in self.tasks}
        usable = {t: values for t, values in usable.items() if values}
        if usable:
            directions = {t: self.task_types[t].metric_directions for t in usable}
            result = delta_m({t: metrics[t] for t in usable}, usable, directions)
        else:
            result = {"per_task": {}, "delta_m": None}
        result["skipped"] = sorted(f"{t}/{k}" for t in self.tasks for k, v in single[t].items() if v == 0)
        return result

    def _stage_posttrain(self) -> None:
        s = self.cfg["stages"]["posttrain"]
        if s["init"] == "fresh" and self.state["step"] == 0:
            policy = self.model.fixed_policy
            fresh = self._build().to(self.device)
            self.model.load_state_dict(fresh.state_dict())
            if policy is not None:
                self.model.set_policy(policy)
        batches = self.batches("train", "posttrain")

        def lr_steps(count: int) -> None:
            for _ in range(count):
                self.scheds["posttrain"].step()

        try:
            self._run_network_stage("posttrain", s["iters"], "fixed", batches, after=lr_steps)
        finally:
            self._close(batches)

    # ------------------------------------------------------------ report
    def report(self) -> dict[str, Any]:
        """Final metrics, parameters, policy (counts and per-unit probabilities) and compute cost; written to
        report.json and drawn to policy.png."""
        from ..nn.compact import prune
        from ..nn.cost import compact_cost
        from .policy_plot import draw_policy, policy_data

        policy = self.model.fixed_policy or self.model.sample_policy("argmax")
        metrics = self.evaluate("fixed", policy)
        compact = prune(self.model, policy)
        units = policy_data(self.model.policy_distribution(), policy.choices,
                            self.model.unit_depths())
        report = {"tasks": metrics, "directions": {t: self.task_types[t].metric_directions for t in self.tasks},
                  "policy": policy.counts(), "policy_units": units,
                  "parameters": {"compact": compact.num_parameters(), **compact.reference},
                  "macs": compact_cost(compact), "candidates": self.state.get("candidates", []),
                  "evaluated": self.evaluated}
        if self.cfg["baselines"]:
            report["delta_m"] = self._delta_m(metrics)
        text = json.dumps(report, indent=1)
        atomic_write(self.out / "report.json", lambda tmp: tmp.write_text(text))
        draw_policy(units, self.out / "policy.png", title=f"policy of {self.out.name or self.out}")
        return report
