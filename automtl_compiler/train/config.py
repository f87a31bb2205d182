"""Training configuration: YAML in, validated and resolved dict out.

A config is a nested mapping; every key has a default here (``DEFAULTS``), so a file only states what
differs. ``--set a.b=value`` overrides are applied before validation (values parsed as YAML scalars).
Unknown keys and wrong types are errors that name the dotted key and say what is expected.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from ..errors import AutomtlError, FileFormatError, require_file

DEFAULTS: dict[str, Any] = {
    "backbone": "torchvision:resnet18",
    "backbone_weights": None,
    "backbone_weights_strict": True,
    "input_size": None,
    "output_stride": 16,
    "feature_node": None,
    "dataset": {"name": "synthetic", "root": None, "loader": "shared", "workers": 0, "options": {},
                "split_options": {}},
    "tasks": {
        "segment_semantic": {"head": "aspp", "hidden": 64, "weight": 1.0, "options": {}},
        "depth_zbuffer": {"head": "aspp", "hidden": 64, "weight": 1.0, "options": {}},
        "normal": {"head": "aspp", "hidden": 64, "weight": 1.0, "options": {}},
    },
    "scheduler": {"name": "sum"},
    "stages": {
        "pretrain": {"iters": 80, "lr": 1e-3, "betas": [0.5, 0.999], "weight_decay": 1e-4},
        "policy": {"iters": 120, "network_steps": 20, "policy_steps": 10, "network_lr": 1e-2,
                   "momentum": 0.9, "network_weight_decay": 1e-4, "policy_lr": 0.05,
                   "policy_weight_decay": 5e-4, "reg_weight": 5e-4, "tau": 5.0, "tau_decay": 0.965,
                   "tau_every": 10},
        "sample": {"strategy": "sample", "seed": 0, "share_first": 0, "candidates": 4},
        "posttrain": {"iters": 200, "lr": 1e-3, "betas": [0.5, 0.999], "weight_decay": 1e-4,
                      "step_size": 4000, "gamma": 0.5, "init": "policy"},
    },
    "batch_size": 8,
    "eval_every": 100,
    "eval_batches": None,
    "checkpoint_every": 50,
    "seed": 0,
    "device": "auto",
    "bf16": False,
    "tensorboard": False,
    "baselines": None,
}

_CHOICES = {"stages.sample.strategy": ("sample", "argmax"), "stages.posttrain.init": ("policy", "fresh"),
            "device": ("auto", "cpu", "cuda"), "dataset.loader": ("shared", "per_task")}
_TASK_KEYS = {"type": str, "head": str, "hidden": int, "weight": float, "options": dict, "head_options": dict,
              "channels": int}
_FREE_FORM = ("scheduler", "dataset.options", "dataset.split_options")


def _merge(base: dict[str, Any], over: dict[str, Any], where: str) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        path = f"{where}.{key}" if where else key
        if where == "" and key == "tasks":
            out[key] = value  # the task list replaces the default one; entries are checked below
        elif where in _FREE_FORM or path.startswith("tasks."):
            out[key] = value
        elif key not in base:
            raise AutomtlError(f"config: unknown key '{path}'; known keys here: {', '.join(sorted(base))}")
        elif isinstance(base[key], dict) and base[key] and isinstance(value, dict):
            out[key] = _merge(base[key], value, path)
        else:
            out[key] = value
    return out


def _check_type(value: Any, default: Any, path: str) -> Any:
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise AutomtlError(f"config: '{path}' must be true or false, got {value!r}")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise AutomtlError(f"config: '{path}' must be a whole number, got {value!r}")
        if value < 0:
            raise AutomtlError(f"config: '{path}' must not be negative, got {value}")
    elif isinstance(default, float):
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise AutomtlError(f"config: '{path}' must be a number, got {value!r}")
        return float(value)
    elif isinstance(default, str) and not isinstance(value, str):
        raise AutomtlError(f"config: '{path}' must be a string, got {value!r}")
    elif isinstance(default, list) and not isinstance(value, list):
        raise AutomtlError(f"config: '{path}' must be a list, got {value!r}")
    return value


def _validate(cfg: dict[str, Any], defaults: dict[str, Any], where: str = "") -> None:
    for key, default in defaults.items():
        path = f"{where}.{key}" if where else key
        if key == "tasks" and not where:
            continue
        if isinstance(default, dict) and default and path not in _FREE_FORM:
            if not isinstance(cfg[key], dict):
                raise AutomtlError(f"config: '{path}' must be a mapping")
            _validate(cfg[key], default, path)
            continue
        cfg[key] = _check_type(cfg[key], default, path)
        if path in _CHOICES and cfg[key] not in _CHOICES[path]:
            raise AutomtlError(f"config: '{path}' is {cfg[key]!r}; use one of {', '.join(_CHOICES[path])}")


def _validate_tasks(tasks: Any) -> None:
    if not isinstance(tasks, dict) or not tasks:
        raise AutomtlError("config: 'tasks' must map task kinds to settings, e.g. tasks: {depth_zbuffer: {}}")
    for name, spec in tasks.items():
        if spec is None:
            tasks[name] = spec = {}
        if not isinstance(spec, dict):
            raise AutomtlError(f"config: 'tasks.{name}' must be a mapping of {sorted(_TASK_KEYS)}")
        for key, value in spec.items():
            if key not in _TASK_KEYS:
                raise AutomtlError(f"config: unknown key 'tasks.{name}.{key}'; known: {', '.join(sorted(_TASK_KEYS))}")
            kind = _TASK_KEYS[key]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = spec[key] = float(value)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise AutomtlError(f"config: 'tasks.{name}.{key}' must be a {kind.__name__}, got {value!r}")
        spec.setdefault("head", "aspp")
        spec.setdefault("hidden", 64)
        spec.setdefault("weight", 1.0)
        spec.setdefault("options", {})
        spec.setdefault("head_options", {})
        _check_named(spec["head"], f"tasks.{name}.head", "head")
        if "type" in spec:
            _check_named(spec["type"], f"tasks.{name}.type", "task type")
        else:
            _check_named(name, f"tasks.{name}", "task type", hint=f" (or give its type: tasks.{name}.type)")


def _check_named(value: str, key: str, what: str, hint: str = "") -> None:
    """A head or task type is a built-in or registered name, or ``package.module:Class`` (imported when the
    model is built, since the config is the user's own)."""
    from ..classpath import is_class_path
    from ..nn.heads import BUILTIN_HEADS, HEAD_TYPES
    from ..tasks import ALIASES, TASK_TYPES

    known = sorted({*BUILTIN_HEADS, *HEAD_TYPES} if what == "head" else {*TASK_TYPES, *ALIASES})
    if not is_class_path(value) and value not in known:
        raise AutomtlError(f"config: '{key}' is {value!r}; use one of {', '.join(known)}, a name registered with "
                           f"register_{what.split()[0]}, or package.module:Class{hint}")


def _validate_dataset(d: dict[str, Any]) -> None:
    """The dataset section: a name (registered or ``package.module:Class``), mappings of options."""
    if not isinstance(d["name"], str) or not d["name"]:
        raise AutomtlError(f"config: 'dataset.name' must be a dataset name or package.module:Class, got {d['name']!r}")
    if d["root"] is not None and not isinstance(d["root"], str):
        raise AutomtlError(f"config: 'dataset.root' must be a directory path, got {d['root']!r}")
    if not isinstance(d["options"], dict):
        raise AutomtlError(f"config: 'dataset.options' must be a mapping of the dataset's options, got {d['options']!r}")
    splits = d["split_options"]
    if not isinstance(splits, dict) or not all(isinstance(v, dict) for v in splits.values()):
        raise AutomtlError("config: 'dataset.split_options' must map a split name to options, e.g. "
                           f"{{val: {{length: 256}}}}, got {splits!r}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """'stages.pretrain.iters=10' -> (['stages', 'pretrain', 'iters'], 10)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise AutomtlError(f"--set '{text}' must be KEY=VALUE with a dotted key, e.g. stages.pretrain.iters=10")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise AutomtlError(f"--set '{text}': cannot read the value ({e})") from None
    return key.split("."), value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> dict[str, Any]:  # type: ignore[assignment]
    """Read a YAML config (or the defaults when ``path`` is None), apply ``overrides``, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = require_file(path, "config file")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark else str(p)
            raise FileFormatError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(raw, dict):
            raise FileFormatError(f"{p}: a config must be a YAML mapping of keys to values")
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise AutomtlError(f"--set '{text}': '{k}' is not a mapping")
        node[keys[-1]] = value
    cfg = _merge(DEFAULTS, raw, "")
    _validate(cfg, DEFAULTS)
    _validate_tasks(cfg["tasks"])
    _validate_dataset(cfg["dataset"])
    cap = cfg["eval_batches"]
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise AutomtlError("config: 'eval_batches' caps the validation batches: a number >= 1, or null for the "
                           "whole validation split")
    if cfg["backbone_weights"] is not None and not isinstance(cfg["backbone_weights"], str):
        raise AutomtlError(f"config: 'backbone_weights' must be a file path, got {cfg['backbone_weights']!r}")
    if not isinstance(cfg["scheduler"], dict) or "name" not in cfg["scheduler"]:
        raise AutomtlError("config: 'scheduler' must be a mapping with a 'name', e.g. {name: sum}")
    size = cfg["input_size"]
    if size is not None and not (isinstance(size, list) and len(size) == 2
                                 and all(isinstance(s, int) and not isinstance(s, bool) and 0 < s <= 16384
                                         for s in size)):
        raise AutomtlError(f"config: 'input_size' must be [height, width] (each 1..16384) or null for the size of "
                           f"the validation images, got {size!r}")
    if cfg["output_stride"] is not None and (not isinstance(cfg["output_stride"], int)
                                             or cfg["output_stride"] not in (4, 8, 16, 32)):
        raise AutomtlError(f"config: 'output_stride' must be 8, 16 or 32 (or null), got {cfg['output_stride']!r}")
    if cfg["batch_size"] < 1:
        raise AutomtlError("config: 'batch_size' must be at least 1")
    return cfg


def dump_config(cfg: dict[str, Any]) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(cfg, sort_keys=False)
