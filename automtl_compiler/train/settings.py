"""The training config as typed, frozen dataclasses: what the trainer's parts read.

A config file is checked by :func:`~.config.validate_config` (unknown keys, wrong types and values out of
range are errors naming the dotted key); :meth:`TrainConfig.from_dict` runs that check and then reads the
checked mapping into the sections below, so a field here always holds a value of its declared type. The
mapping itself stays what a run writes to ``config.yaml`` and compares on resume.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from ..errors import AutomtlError
from .config import validate_config

#: The stages a gradient scheduler may run in (sampling trains nothing).
TRAINING_STAGES = ("pretrain", "policy", "posttrain")


@dataclass(frozen=True)
class PretrainSettings:
    """Pre-training (mean of the branches) with Adam."""

    iters: int
    lr: float
    betas: tuple[float, float]
    weight_decay: float


@dataclass(frozen=True)
class PolicySettings:
    """Policy training: ``network_steps`` SGD steps of the weights, then ``policy_steps`` Adam steps of the
    policy logits (plus ``reg_weight`` times the regulariser); the Gumbel temperature ``tau`` is multiplied by
    ``tau_decay`` every ``tau_every`` policy steps."""

    iters: int
    network_steps: int
    policy_steps: int
    network_lr: float
    momentum: float
    network_weight_decay: float
    policy_lr: float
    policy_weight_decay: float
    reg_weight: float
    tau: float
    tau_decay: float
    tau_every: int


@dataclass(frozen=True)
class SampleSettings:
    """How the policy is drawn and which of ``candidates`` candidates is kept."""

    strategy: str
    seed: int
    share_first: int
    candidates: int
    cost_weight: float
    max_macs_ratio: float | None
    calibration_batches: int


@dataclass(frozen=True)
class PosttrainSettings:
    """Post-training of the network on the fixed policy (Adam, step-wise LR decay); ``init`` is ``policy``
    (keep the trained weights) or ``fresh`` (the initial ones)."""

    iters: int
    lr: float
    betas: tuple[float, float]
    weight_decay: float
    step_size: int
    gamma: float
    init: str


@dataclass(frozen=True)
class StageSettings:
    """The four stages, in the order they run."""

    pretrain: PretrainSettings
    policy: PolicySettings
    sample: SampleSettings
    posttrain: PosttrainSettings


@dataclass(frozen=True)
class SchedulerSettings:
    """The gradient scheduler: its registered ``name``, the ``stages`` it is asked to run in (None: every
    stage it can) and its own ``options`` (checked by the scheduler when it is created)."""

    name: str
    stages: tuple[str, ...] | None
    options: dict[str, Any]


@dataclass(frozen=True)
class TaskSettings:
    """One task: its ``type`` (None: the task's name), head and loss weight."""

    type: str | None
    head: str
    hidden: int
    weight: float
    options: dict[str, Any]
    head_options: dict[str, Any]
    channels: int | None

    def head_kwargs(self) -> dict[str, Any]:
        """The head's constructor options (ASPP's ``hidden`` width unless the head options set it)."""
        options = dict(self.head_options)
        if self.head == "aspp":
            options.setdefault("hidden", self.hidden)
        return options


@dataclass(frozen=True)
class DatasetSettings:
    """Where the samples come from and how they are loaded (``shared`` or ``per_task`` batches)."""

    name: str
    root: str | None
    loader: str
    workers: int
    options: dict[str, Any]
    split_options: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class TrainConfig:
    """A whole training config; see ``train.config.DEFAULTS`` for every key's default."""

    backbone: str
    backbone_weights: str | None
    backbone_weights_strict: bool
    input_size: tuple[int, int] | None
    output_stride: int | None
    feature_node: str | None
    dataset: DatasetSettings
    tasks: dict[str, TaskSettings]
    scheduler: SchedulerSettings
    stages: StageSettings
    batch_size: int
    eval_every: int
    eval_batches: int | None
    checkpoint_every: int
    seed: int
    device: str
    precision: str
    channels_last: bool
    compile: str
    activation_checkpointing: bool
    sync_batchnorm: bool
    tensorboard: bool
    baselines: str | None

    @property
    def task_names(self) -> list[str]:
        """The tasks in config order (the order of the heads, losses and reports)."""
        return list(self.tasks)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> TrainConfig:
        """The typed form of a config mapping (partial or resolved); the mapping is checked first, so an
        unknown key, a wrong type or a value out of range is an AutomtlError naming the key."""
        if not isinstance(cfg, dict):
            raise AutomtlError(f"config: a config is a mapping of keys to values, got {type(cfg).__name__}")
        c = validate_config(copy.deepcopy(cfg))
        stages = c["stages"]
        return cls(
            backbone=c["backbone"], backbone_weights=c["backbone_weights"],
            backbone_weights_strict=c["backbone_weights_strict"],
            input_size=tuple(c["input_size"]) if c["input_size"] is not None else None,  # type: ignore[arg-type]
            output_stride=c["output_stride"], feature_node=c["feature_node"],
            dataset=DatasetSettings(**c["dataset"]),
            tasks={name: TaskSettings(**{"type": None, "channels": None, **spec}) for name, spec in c["tasks"].items()},
            scheduler=_scheduler(c["scheduler"]),
            stages=StageSettings(
                pretrain=PretrainSettings(**{**stages["pretrain"], "betas": tuple(stages["pretrain"]["betas"])}),
                policy=PolicySettings(**stages["policy"]), sample=SampleSettings(**stages["sample"]),
                posttrain=PosttrainSettings(**{**stages["posttrain"], "betas": tuple(stages["posttrain"]["betas"])})),
            batch_size=c["batch_size"], eval_every=c["eval_every"], eval_batches=c["eval_batches"],
            checkpoint_every=c["checkpoint_every"], seed=c["seed"], device=c["device"], precision=c["precision"],
            channels_last=c["channels_last"], compile=c["compile"],
            activation_checkpointing=c["activation_checkpointing"],
            sync_batchnorm=c["sync_batchnorm"], tensorboard=c["tensorboard"], baselines=c["baselines"])


def _scheduler(section: dict[str, Any]) -> SchedulerSettings:
    """The scheduler section: ``name``, the optional ``stages`` list, every other key an option."""
    asked = section.get("stages")
    if asked is not None and (not isinstance(asked, list) or any(s not in TRAINING_STAGES for s in asked)):
        raise AutomtlError(f"config: 'scheduler.stages' must be a list of {', '.join(TRAINING_STAGES)}, "
                           f"got {asked!r}")
    options = {k: v for k, v in section.items() if k not in ("name", "stages")}
    return SchedulerSettings(name=section["name"], stages=tuple(asked) if asked is not None else None,
                             options=options)
