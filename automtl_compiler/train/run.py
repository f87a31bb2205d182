"""``train``: config -> datasets, task types, Trainer -> run directory (the CLI calls this)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from ..errors import AutomtlError
from ..ir.serialize import atomic_write
from .config import dump_config, load_config, validate_config
from .distributed import SINGLE, DistContext, barrier, context_from_env
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


MARKER = ".automtl-run.json"
MARKER_FORMAT = "automtl-run"
#: What a run directory holds, recorded in its marker: a directory is only resumed by a run of its kind.
KINDS = {"train": "a training run (automtl train)",
         "baseline-single-task": "single-task references (automtl train --baseline single-task)",
         "baseline-all-share": "an all-share reference (automtl train --baseline all-share)",
         "reference": "the reference of one task", "run": "a pipeline run (automtl run)"}


def read_marker(out: Path) -> dict[str, Any] | None:
    """The marker of the run directory ``out`` (None when there is none or it is not ours)."""
    try:
        doc = json.loads((out / MARKER).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("format") == MARKER_FORMAT else None


def write_marker(out: Path, kind: str) -> None:
    """Mark ``out`` as a run directory of ``kind`` (kept when it already carries a marker)."""
    out.mkdir(parents=True, exist_ok=True)
    if read_marker(out) is None:
        doc = {"format": MARKER_FORMAT, "version": 1, "kind": kind,
               "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        text = json.dumps(doc, indent=1)
        atomic_write(out / MARKER, lambda tmp: tmp.write_text(text))


def is_run_dir(out: Path, cfg: dict[str, Any] | None = None) -> bool:
    """Whether ``out`` is an automtl run directory: it carries the marker, or it was written before markers
    existed (``config.yaml`` with ``checkpoints/last.json`` in it or in a per-task folder of a single-task
    reference), or its ``config.yaml`` is that of ``cfg`` (a run killed before its first checkpoint)."""
    if read_marker(out) is not None:
        return True
    saved = out / "config.yaml"
    if not saved.is_file():
        return False
    if (out / "checkpoints" / "last.json").is_file() or any(out.glob("*/checkpoints/last.json")):
        return True
    return cfg is not None and _same_config(saved, cfg)


def _same_config(saved: Path, cfg: dict[str, Any]) -> bool:
    """Whether the saved config is ``cfg``, both with every key's default filled in (so a run written before a
    key existed, or under a key's old name, is the same run)."""
    try:
        return validate_config(yaml.safe_load(saved.read_text())) == validate_config(yaml.safe_load(dump_config(cfg)))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AutomtlError):
        return False


def _decide(out: Path, cfg: dict[str, Any], *, resume: bool, overwrite: bool, kind: str) -> str:
    """``new``, ``resume`` or ``replace`` for ``out``; an AutomtlError when none of them is safe."""
    if resume and overwrite:
        raise AutomtlError("--resume and --overwrite contradict each other; pass one of them")
    if out.exists() and not out.is_dir():
        raise AutomtlError(f"{out} exists and is not a directory; choose another --out")
    if not out.exists() or not any(out.iterdir()):
        if resume:
            raise AutomtlError(f"{out}: nothing to resume (no run there); drop --resume to start a new run")
        return "new"
    if not is_run_dir(out, cfg):
        raise AutomtlError(f"{out} exists and is not a run directory (it has no {MARKER}); choose another --out")
    if overwrite:
        here = Path.cwd().resolve()
        if out.resolve() == here or out.resolve() in here.parents:
            raise AutomtlError(f"{out}: cannot replace the directory automtl runs in; run it from elsewhere or "
                               "choose another --out")
        return "replace"
    marker = read_marker(out) or {}
    found = marker.get("kind") if isinstance(marker.get("kind"), str) else None
    same_kind = found in (None, kind)
    if same_kind and marker and not (out / "config.yaml").exists():
        return "resume"  # marked, then stopped before its config was written: nothing to keep
    if not same_kind or not _same_config(out / "config.yaml", cfg):
        what = (f"{KINDS.get(found, repr(found))}, not {KINDS.get(kind, kind)}"
                if not same_kind else "a run with a different config")
        raise AutomtlError(f"{out} holds {what}; pass --overwrite to replace it, or choose another --out")
    return "resume"


def prepare_run_dir(out: Path, cfg: dict[str, Any], *, resume: bool, overwrite: bool, kind: str = "train") -> bool:
    """Decide what to do with ``out`` without changing anything; True when an earlier run of the same
    config is resumed.

    A directory is reused only by the same config and kind of run (then the run resumes) or, with
    ``overwrite``, replaced when it is an automtl run (see :func:`is_run_dir`). Any other non-empty
    directory is refused whatever the options: it may hold the user's own files.
    """
    return _decide(out, cfg, resume=resume, overwrite=overwrite, kind=kind) == "resume"


class RunDir:
    """A run directory in use; with ``--overwrite`` the run it replaces waits aside until :meth:`commit`."""

    def __init__(self, out: Path, resumed: bool, replaced: Path | None) -> None:
        self.out, self.resumed, self.replaced = out, resumed, replaced

    def commit(self) -> None:
        """The new run has a checkpoint: delete the run it replaces (called after every checkpoint)."""
        if self.replaced is not None:
            shutil.rmtree(self.replaced, ignore_errors=True)
            self.replaced = None


def _aside_name(out: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = out.parent / f".{out.name}.replaced-{stamp}"
    n = 1
    while target.exists():
        target = out.parent / f".{out.name}.replaced-{stamp}-{n}"
        n += 1
    return target


def _left_aside(out: Path) -> list[Path]:
    """Runs that were being replaced by ``out`` when automtl was killed (before the new run's first checkpoint)."""
    prefix = f".{out.name}.replaced-"
    parent = out.absolute().parent
    return sorted(p for p in parent.iterdir() if p.name.startswith(prefix)) if parent.is_dir() else []


def _warn(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@contextmanager
def run_directory(out: Path, cfg: dict[str, Any], *, resume: bool, overwrite: bool, kind: str,
                  ctx: DistContext = SINGLE) -> Iterator[RunDir]:
    """Open ``out`` for a run of ``cfg`` (call it once the config is validated and the datasets built).

    The marker is written before anything else. A run replaced by ``overwrite`` is moved to a hidden
    sibling ``.<name>.replaced-<time>``; it is deleted at the new run's first checkpoint (``commit``) or
    when the new run ends, and put back, with a note on stderr, when the new run fails before that.
    With several processes rank 0 prepares the directory and the others wait for it (if rank 0 fails,
    torchrun stops them); only rank 0's handle replaces or restores anything.
    """
    out = Path(out)
    if not ctx.is_main:
        barrier(ctx)
        yield RunDir(out, resumed=False, replaced=None)
        return
    decision = _decide(out, cfg, resume=resume, overwrite=overwrite, kind=kind)
    for left in _left_aside(out):
        _warn(f"note: {left} holds a run that was being replaced by {out} when automtl was stopped; move it back "
              "or delete it")
    replaced = None
    if decision == "replace":
        replaced = _aside_name(out.absolute())
        os.replace(out, replaced)
    handle = RunDir(out, decision == "resume", replaced)
    try:
        write_marker(out, kind)
        barrier(ctx)
        yield handle
    except BaseException:
        if handle.replaced is not None:
            shutil.rmtree(out, ignore_errors=True)
            try:
                os.replace(handle.replaced, out)
            except OSError as e:
                _warn(f"note: the new run stopped before its first checkpoint; the run it was replacing is in "
                      f"{handle.replaced} (it could not be moved back: {e.strerror or e})")
            else:
                _warn(f"note: the new run stopped before its first checkpoint; the run it was replacing is back in "
                      f"{out}")
        raise
    handle.commit()


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
    kind = "train" if baseline is None else f"baseline-{baseline}"
    ctx, _ = context_from_env(cfg["device"])
    with run_directory(out, cfg, resume=resume, overwrite=overwrite, kind=kind, ctx=ctx) as run_dir:
        types = make_task_types(cfg, datasets["train"])
        if baseline == "single-task":
            return train_single_task_references(cfg, out, datasets=datasets, task_types=types, progress=progress,
                                                on_checkpoint=run_dir.commit)
        if baseline == "all-share":
            trainer = Trainer(reference_budget(cfg), out, datasets=datasets, task_types=types, progress=progress,
                              baseline=True)
        else:
            trainer = Trainer(cfg, out, datasets=datasets, task_types=types, progress=progress)
        trainer.on_checkpoint = run_dir.commit
        return trainer.run()


def reference_budget(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config of a reference: one post-train run with as many steps as all stages of ``cfg`` together."""
    budget = copy.deepcopy(cfg)
    budget["stages"]["posttrain"]["iters"] = sum(cfg["stages"][s]["iters"] for s in ("pretrain", "policy", "posttrain"))
    budget["baselines"] = None
    return budget


def train_single_task_references(cfg: dict[str, Any], out: Path, *, datasets: dict[str, Any],
                                 task_types: dict[str, Any], progress: bool = True,
                                 on_checkpoint: Callable[[], None] | None = None) -> dict[str, Any]:
    """One backbone + head per task (in ``out/<task>``), each with the multi-task run's step budget; the
    merged ``out/report.json`` is what ``baselines:`` reads. A killed run resumes task by task.

    ``out`` and every ``out/<task>`` carry a run marker; ``on_checkpoint`` is called after each checkpoint
    (what replaces an earlier run with ``--overwrite`` waits for)."""
    budget = reference_budget(cfg)
    budget["scheduler"] = {"name": "sum"}  # one task: nothing to schedule
    ctx, _ = context_from_env(cfg["device"])
    if ctx.is_main:
        write_marker(out, "baseline-single-task")
        (out / "config.yaml").write_text(dump_config(cfg))
    reports = {}
    for task in cfg["tasks"]:
        one = copy.deepcopy(budget)
        one["tasks"] = {task: cfg["tasks"][task]}
        if ctx.is_main:
            write_marker(out / task, "reference")
        barrier(ctx)
        trainer = Trainer(one, out / task, datasets=datasets, task_types={task: task_types[task]},
                          progress=progress, baseline=True)
        trainer.on_checkpoint = on_checkpoint
        reports[task] = trainer.run()
    merged = {"tasks": {t: r["tasks"][t] for t, r in reports.items()},
              "parameters": {"single_task_total": sum(r["parameters"]["compact"] for r in reports.values())}}
    if ctx.is_main:
        text = json.dumps(merged, indent=1)
        atomic_write(out / "report.json", lambda tmp: tmp.write_text(text))
    barrier(ctx)
    return merged
