"""``train``: config -> datasets, task types, Trainer -> run directory (the CLI calls this)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from ..errors import AutomtlError
from ..ir.serialize import atomic_write
from .config import dump_config, load_config
from .trainer import Trainer

SPLITS = ("train", "policy", "val")  # the synthetic scenes' splits, disjoint by construction
#: The built-in scenes' sizes when the config names none: a 4096-scene training and policy split and a
#: 256-scene validation split (the whole of which every evaluation reads).
SYNTHETIC_LENGTHS = {"train": 4096, "policy": 4096, "val": 256}


def task_kinds(cfg: dict[str, Any]) -> dict[str, str]:
    """Task name -> the kind a dataset should return for it (its ``type``, or the name itself)."""
    from ..tasks import ALIASES

    return {name: ALIASES.get(spec.get("type") or name, spec.get("type") or name)
            for name, spec in cfg["tasks"].items()}


def split_options(cfg: dict[str, Any], split: str) -> dict[str, Any]:
    """The options of one split: the dataset's ``options``, then ``split_options[split]`` over them."""
    d = cfg["dataset"]
    options = dict(d["options"])
    if d["name"] == "synthetic":
        size = {"resolution": tuple(cfg["input_size"])} if cfg["input_size"] else {}
        options = {"length": SYNTHETIC_LENGTHS[split], "cache": True, **size, **options}
    return {**options, **d["split_options"].get(split, {})}


def make_datasets(cfg: dict[str, Any]) -> dict[str, Any]:
    """The train, policy and validation splits named by the config (the policy split never overlaps train).

    The synthetic scenes have a policy split of their own; for any other dataset every fifth training
    sample is held out for the policy steps (as AdaShare/AutoMTL train the policy on a separate part of
    the training data). Options reach only the dataset they are given for.
    """
    from torch.utils.data import Subset

    from ..data import get_dataset

    d = cfg["dataset"]
    unknown = sorted(set(d["split_options"]) - set(SPLITS))
    if unknown:
        raise AutomtlError(f"config: 'dataset.split_options' names split(s) {unknown}; use {', '.join(SPLITS)}")
    kinds = task_kinds(cfg)

    def load(split: str) -> Any:
        return get_dataset(d["name"], root=d["root"], split=split, tasks=kinds, **split_options(cfg, split))

    if d["name"] == "synthetic":
        return {split: load(split) for split in SPLITS}
    if "policy" in d["split_options"]:
        raise AutomtlError("config: 'dataset.split_options.policy': the policy split of a dataset read from disk "
                           "is every fifth training sample, so it takes the train options")
    train, val = load("train"), load("val")
    held = [i for i in range(len(train)) if i % 5 == 4]
    rest = [i for i in range(len(train)) if i % 5 != 4]
    if not held:
        raise AutomtlError(f"dataset {d['name']!r}: the training split has {len(train)} sample(s); at least 5 are "
                           "needed (every fifth is held out for the policy steps)")
    subset_train, subset_policy = Subset(train, rest), Subset(train, held)
    for part in (subset_train, subset_policy):
        part.num_classes = getattr(train, "num_classes", None)  # type: ignore[attr-defined]
    return {"train": subset_train, "policy": subset_policy, "val": val}


def resolve_input_size(cfg: dict[str, Any], datasets: dict[str, Any]) -> None:
    """``input_size: null`` (the default) becomes the size of the first validation image: the size the
    backbone is traced at and the model is exported and timed at."""
    if cfg["input_size"] is None:
        image = datasets["val"][0][0]
        cfg["input_size"] = [int(image.shape[-2]), int(image.shape[-1])]


def make_task_types(cfg: dict[str, Any], dataset: Any) -> dict[str, Any]:
    """Task types (criterion + metric) for the config's tasks; class counts come from the dataset when
    the task's options do not give them."""
    from ..tasks import get_task

    types = {}
    for name, spec in cfg["tasks"].items():
        options = dict(spec.get("options") or {})
        kind = spec.get("type") or name
        if kind in ("segment_semantic", "classification") and "num_classes" not in options:
            classes = getattr(dataset, "num_classes", None)
            classes = classes.get(name) if isinstance(classes, dict) else classes
            if not classes and spec.get("channels"):
                classes = spec["channels"]
            if classes:
                options["num_classes"] = classes
        types[name] = get_task(kind, **options)
    return types


def prepare_run_dir(out: Path, cfg: dict[str, Any], *, resume: bool, overwrite: bool) -> bool:
    """Decide what to do with ``out``; returns True when an earlier run of the same config is resumed.

    A run directory is only reused by the same config (then the run resumes) or when ``overwrite`` is
    given; anything else is an error, so no run is ever overwritten by accident.
    """
    saved = out / "config.yaml"
    if overwrite and out.exists():
        shutil.rmtree(out)
    if not out.exists() or not any(out.iterdir()):
        if resume:
            raise AutomtlError(f"{out}: nothing to resume (no run there); drop --resume to start a new run")
        return False
    if not saved.exists():
        raise AutomtlError(f"{out} exists and is not a run directory; choose another --out or pass --overwrite")
    if yaml.safe_load(saved.read_text()) != yaml.safe_load(dump_config(cfg)):
        raise AutomtlError(f"{out} holds a run with a different config; pass --overwrite to replace it, or choose "
                           "another --out")
    return True


BASELINES = ("single-task", "all-share")


def train(config: str | Path | None, overrides: list[str], out: str | Path, *, resume: bool = False,
          overwrite: bool = False, progress: bool = True, baseline: str | None = None) -> dict[str, Any]:
    """Run the three stages for ``config`` into ``out`` (resuming a killed run of the same config).

    ``baseline`` trains a reference instead, with the same data and the same number of steps as all
    stages together: ``single-task`` (one backbone + head per task, in ``out/<task>``) or ``all-share``
    (one shared backbone with every head). Its ``report.json`` is what ``baselines:`` in a config reads
    to compute Δm.
    """
    cfg = load_config(config, overrides)
    if baseline is not None and baseline not in BASELINES:
        raise AutomtlError(f"unknown baseline '{baseline}'; use one of {', '.join(BASELINES)}")
    out = Path(out)
    datasets = make_datasets(cfg)
    resolve_input_size(cfg, datasets)
    prepare_run_dir(out, cfg, resume=resume, overwrite=overwrite)
    types = make_task_types(cfg, datasets["train"])
    if baseline is None:
        return Trainer(cfg, out, datasets=datasets, task_types=types, progress=progress).run()
    if baseline == "all-share":
        return Trainer(reference_budget(cfg), out, datasets=datasets, task_types=types, progress=progress,
                       baseline=True).run()
    return train_single_task_references(cfg, out, datasets=datasets, task_types=types, progress=progress)


def reference_budget(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config of a reference: one post-train run with as many steps as all stages of ``cfg`` together."""
    budget = copy.deepcopy(cfg)
    budget["stages"]["posttrain"]["iters"] = sum(cfg["stages"][s]["iters"] for s in ("pretrain", "policy", "posttrain"))
    budget["baselines"] = None
    return budget


def train_single_task_references(cfg: dict[str, Any], out: Path, *, datasets: dict[str, Any],
                                 task_types: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """One backbone + head per task (in ``out/<task>``), each with the multi-task run's step budget; the
    merged ``out/report.json`` is what ``baselines:`` reads. A killed run resumes task by task."""
    budget = reference_budget(cfg)
    budget["scheduler"] = {"name": "sum"}  # one task: nothing to schedule
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg))
    reports = {}
    for task in cfg["tasks"]:
        one = copy.deepcopy(budget)
        one["tasks"] = {task: cfg["tasks"][task]}
        reports[task] = Trainer(one, out / task, datasets=datasets, task_types={task: task_types[task]},
                                progress=progress, baseline=True).run()
    merged = {"tasks": {t: r["tasks"][t] for t, r in reports.items()},
              "parameters": {"single_task_total": sum(r["parameters"]["compact"] for r in reports.values())}}
    text = json.dumps(merged, indent=1)
    atomic_write(out / "report.json", lambda tmp: tmp.write_text(text))
    return merged
