"""Training configuration: YAML in, validated and resolved dict out.

A config is a nested mapping; every key has a default here (``DEFAULTS``), so a file only states what
differs. ``--set a.b=value`` overrides are applied before validation (values parsed as YAML scalars).
Unknown keys, wrong types and values out of range (:data:`RANGES`) are errors that name the dotted key and
say what is allowed.

Config files are read with a YAML loader that refuses more than :data:`MAX_ALIASES` aliases, a document that
expands to more than :data:`MAX_NODES` nodes, and files over :data:`MAX_CONFIG_BYTES`, before anything is
constructed (an "alias bomb" of a few hundred bytes would otherwise expand to gigabytes).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..backends.names import check_task_name
from ..errors import (
    AutomtlError,
    FileFormatError,
    brief,
    one_line,
    require_file,
    value_error_text,
)

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
                   "momentum": 0.9, "network_weight_decay": 1e-4, "policy_lr": 0.1,
                   "policy_weight_decay": 5e-4, "reg_weight": 0.02, "tau": 5.0, "tau_decay": 0.965,
                   "tau_every": 10},
        "sample": {"strategy": "sample", "seed": 0, "share_first": 0, "candidates": 16, "cost_weight": 0.0,
                   "max_macs_ratio": 0.7, "calibration_batches": 16},
        "posttrain": {"iters": 200, "lr": 1e-3, "betas": [0.5, 0.999], "weight_decay": 1e-4,
                      "step_size": 4000, "gamma": 0.5, "init": "policy"},
    },
    "batch_size": 8,
    "eval_every": 100,
    "eval_batches": None,
    "checkpoint_every": 50,
    "seed": 0,
    "device": "auto",
    "precision": "auto",
    "channels_last": True,
    "compile": "none",
    "activation_checkpointing": False,
    "sync_batchnorm": False,
    "tensorboard": False,
    "baselines": None,
}

#: Largest config file read.
MAX_CONFIG_BYTES = 1 << 20
#: Most YAML aliases (``*name``) a config may use.
MAX_ALIASES = 64
#: Most YAML nodes a config may hold once its aliases are expanded.
MAX_NODES = 100_000
#: Upper bound of counters (iterations, steps, intervals) and of channel counts.
MAX_COUNT = 10**9
MAX_CHANNELS = 65536
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class Bound:
    """An allowed range of a numeric config value; ``None`` is an open end, ``*_open`` excludes the end."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def admits(self, value: float) -> bool:
        """Whether ``value`` (finite) lies in the range."""
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or (value < self.high or (not self.high_open and value == self.high))

    def text(self, whole: bool) -> str:
        """The range in words, e.g. ``a finite number > 0`` or ``a whole number in 1..65536``."""
        kind = "a whole number" if whole else "a finite number"
        if whole and self.low is not None and self.high is not None:
            return f"{kind} in {self.low}..{self.high}"
        if self.low is not None and self.high is not None:
            return f"{kind} in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{kind} {'>' if self.low_open else '>='} {self.low}"
        return kind


_POSITIVE = Bound(0, None, low_open=True)
_NON_NEGATIVE = Bound(0)
_COUNT = Bound(0, MAX_COUNT)
_AT_LEAST_ONE = Bound(1, MAX_COUNT)
_SEED = Bound(0, MAX_SEED)
_FRACTION = Bound(0, 1, low_open=True)  # (0, 1]: decay factors

#: The allowed range of every numeric key (lists: of each element). Keys not named here are not numbers.
RANGES: dict[str, Bound] = {
    "dataset.workers": Bound(0, 256),
    "stages.pretrain.iters": _COUNT, "stages.pretrain.lr": _POSITIVE,
    "stages.pretrain.betas": Bound(0, 1, high_open=True), "stages.pretrain.weight_decay": _NON_NEGATIVE,
    "stages.policy.iters": _COUNT, "stages.policy.network_steps": _COUNT, "stages.policy.policy_steps": _COUNT,
    "stages.policy.network_lr": _POSITIVE, "stages.policy.momentum": Bound(0, 1),
    "stages.policy.network_weight_decay": _NON_NEGATIVE, "stages.policy.policy_lr": _POSITIVE,
    "stages.policy.policy_weight_decay": _NON_NEGATIVE, "stages.policy.reg_weight": _NON_NEGATIVE,
    "stages.policy.tau": _POSITIVE, "stages.policy.tau_decay": _FRACTION, "stages.policy.tau_every": _AT_LEAST_ONE,
    "stages.sample.seed": _SEED, "stages.sample.share_first": _COUNT, "stages.sample.candidates": Bound(0, 1000),
    "stages.sample.cost_weight": _NON_NEGATIVE, "stages.sample.calibration_batches": _COUNT,
    "stages.sample.max_macs_ratio": _FRACTION,
    "stages.posttrain.iters": _COUNT, "stages.posttrain.lr": _POSITIVE,
    "stages.posttrain.betas": Bound(0, 1, high_open=True), "stages.posttrain.weight_decay": _NON_NEGATIVE,
    "stages.posttrain.step_size": _AT_LEAST_ONE, "stages.posttrain.gamma": _FRACTION,
    "batch_size": Bound(1, MAX_CHANNELS), "eval_every": _COUNT, "eval_batches": _AT_LEAST_ONE,
    "checkpoint_every": _COUNT, "seed": _SEED,
}
#: The allowed range of the numeric keys of every ``tasks.<name>`` entry.
TASK_RANGES: dict[str, Bound] = {"hidden": Bound(1, MAX_CHANNELS), "channels": Bound(1, MAX_CHANNELS),
                                 "weight": _NON_NEGATIVE}
OUTPUT_STRIDES = (8, 16, 32)

_CHOICES = {"stages.sample.strategy": ("sample", "argmax"), "stages.posttrain.init": ("policy", "fresh"),
            "device": ("auto", "cpu", "cuda"),
            "precision": ("auto", "fp32", "bf16", "fp16"), "compile": ("none", "inductor", "aot_eager"),
            "dataset.loader": ("shared", "per_task")}
_TASK_KEYS = {"type": str, "head": str, "hidden": int, "weight": float, "options": dict, "head_options": dict,
              "channels": int}
_FREE_FORM = ("scheduler", "dataset.options", "dataset.split_options")


def _merge(base: dict[str, Any], over: dict[str, Any], where: str) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if not isinstance(key, str):
            raise AutomtlError(f"config: key {brief(key)}{f' under {where!r}' if where else ''} is not a name; "
                               "keys are strings")
        path = f"{where}.{key}" if where else key
        if where == "" and key == "tasks":
            out[key] = value  # the task list replaces the default one; entries are checked below
        elif where in _FREE_FORM or path.startswith("tasks."):
            out[key] = value
        elif key not in base:
            raise AutomtlError(f"config: unknown key {brief(path)}; known keys here: {', '.join(sorted(base))}")
        elif isinstance(base[key], dict) and base[key] and isinstance(value, dict):
            out[key] = _merge(base[key], value, path)
        else:
            out[key] = value
    return out


def _number(value: Any, path: str, bound: Bound, whole: bool) -> Any:
    """``value`` checked against ``bound``: a finite float (or an int when ``whole``), else an AutomtlError."""
    if whole:
        ok = isinstance(value, int) and not isinstance(value, bool) and bound.admits(value)
    else:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            try:
                value = float(value)
            except OverflowError:
                ok = False
            ok = ok and math.isfinite(value) and bound.admits(value)
    if not ok:
        raise AutomtlError(f"config: '{path}' must be {bound.text(whole)}, got {brief(value)}")
    return value


#: Keys with a value by default that may still be set to null (``output_stride: null`` keeps the backbone's strides,
#: ``max_macs_ratio: null`` sets no compute budget).
NULLABLE = ("output_stride", "stages.sample.max_macs_ratio")


def _check_type(value: Any, default: Any, path: str) -> Any:
    if default is None or (value is None and path in NULLABLE):
        return value
    if value is None:
        raise AutomtlError(f"config: '{path}' must not be null; leave the key out to use its default ({brief(default)})")
    bound = RANGES.get(path)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise AutomtlError(f"config: '{path}' must be true or false, got {brief(value)}")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise AutomtlError(f"config: '{path}' must be a whole number, got {brief(value)}")
        if bound is not None:
            return _number(value, path, bound, whole=True)
    elif isinstance(default, float):
        return _number(value, path, bound or Bound(), whole=False)
    elif isinstance(default, str) and not isinstance(value, str):
        raise AutomtlError(f"config: '{path}' must be a string, got {brief(value)}")
    elif isinstance(default, list):
        if not isinstance(value, list):
            raise AutomtlError(f"config: '{path}' must be a list, got {brief(value)}")
        if bound is not None:
            if len(value) != len(default):
                raise AutomtlError(f"config: '{path}' must be a list of {len(default)} numbers, got {brief(value)}")
            return [_number(v, f"{path}[{i}]", bound, whole=False) for i, v in enumerate(value)]
    return value


def _validate(cfg: dict[str, Any], defaults: dict[str, Any], where: str = "") -> None:
    for key, default in defaults.items():
        path = f"{where}.{key}" if where else key
        if key == "tasks" and not where:
            continue
        if isinstance(default, dict) and default and path not in _FREE_FORM:
            if not isinstance(cfg[key], dict):
                raise AutomtlError(f"config: '{path}' must be a mapping, got {brief(cfg[key])}")
            _validate(cfg[key], default, path)
            continue
        cfg[key] = _check_type(cfg[key], default, path)
        if path in _CHOICES and cfg[key] not in _CHOICES[path]:
            raise AutomtlError(f"config: '{path}' is {brief(cfg[key])}; use one of {', '.join(_CHOICES[path])}")


def _validate_tasks(tasks: Any) -> None:
    if not isinstance(tasks, dict) or not tasks:
        raise AutomtlError("config: 'tasks' must map task kinds to settings, e.g. tasks: {depth_zbuffer: {}}")
    for name, spec in tasks.items():
        if not isinstance(name, str) or not name:
            raise AutomtlError(f"config: task name {brief(name)} under 'tasks' must be a non-empty string")
        key_of = f"tasks.{one_line(name, 40)}"
        try:
            check_task_name(name)
        except AutomtlError as e:
            raise AutomtlError(f"config: '{key_of}': {e}") from None
        if spec is None:
            tasks[name] = spec = {}
        if not isinstance(spec, dict):
            raise AutomtlError(f"config: '{key_of}' must be a mapping of {sorted(_TASK_KEYS)}")
        for key, value in spec.items():
            if key not in _TASK_KEYS:
                raise AutomtlError(f"config: unknown key '{key_of}.{one_line(key, 40)}'; known: "
                                   f"{', '.join(sorted(_TASK_KEYS))}")
            kind = _TASK_KEYS[key]
            if key in TASK_RANGES:
                spec[key] = _number(value, f"{key_of}.{key}", TASK_RANGES[key], whole=kind is int)
            elif not isinstance(value, kind) or isinstance(value, bool):
                raise AutomtlError(f"config: '{key_of}.{key}' must be a {kind.__name__}, got {brief(value)}")
        spec.setdefault("head", "aspp")
        spec.setdefault("hidden", 64)
        spec.setdefault("weight", 1.0)
        spec.setdefault("options", {})
        spec.setdefault("head_options", {})
        _check_named(spec["head"], f"{key_of}.head", "head")
        if "type" in spec:
            _check_named(spec["type"], f"{key_of}.type", "task type")
        else:
            _check_named(name, key_of, "task type", hint=f" (or give its type: {key_of}.type)")


def _check_named(value: str, key: str, what: str, hint: str = "") -> None:
    """A head or task type is a built-in or registered name, or ``package.module:Class`` (imported when the
    model is built, since the config is the user's own)."""
    from ..classpath import is_class_path
    from ..nn.heads import BUILTIN_HEADS, HEAD_TYPES
    from ..tasks import ALIASES, TASK_TYPES

    known = sorted({*BUILTIN_HEADS, *HEAD_TYPES} if what == "head" else {*TASK_TYPES, *ALIASES})
    if not is_class_path(value) and value not in known:
        raise AutomtlError(f"config: '{key}' is {brief(value)}; use one of {', '.join(known)}, a name registered "
                           f"with register_{what.split()[0]}, or package.module:Class{hint}")


def _validate_dataset(d: dict[str, Any]) -> None:
    """The dataset section: a name (registered or ``package.module:Class``), mappings of options."""
    if not isinstance(d["name"], str) or not d["name"]:
        raise AutomtlError(f"config: 'dataset.name' must be a dataset name or package.module:Class, got "
                           f"{brief(d['name'])}")
    if d["root"] is not None and not isinstance(d["root"], str):
        raise AutomtlError(f"config: 'dataset.root' must be a directory path, got {brief(d['root'])}")
    if not isinstance(d["options"], dict):
        raise AutomtlError(f"config: 'dataset.options' must be a mapping of the dataset's options, got "
                           f"{brief(d['options'])}")
    splits = d["split_options"]
    if not isinstance(splits, dict) or not all(isinstance(v, dict) for v in splits.values()):
        raise AutomtlError("config: 'dataset.split_options' must map a split name to options, e.g. "
                           f"{{val: {{length: 256}}}}, got {brief(splits)}")


def _validate_rest(cfg: dict[str, Any]) -> None:
    """The keys whose default is null (any type passes the generic check) and the checks across keys."""
    for key, what in (("backbone_weights", "a file path"), ("feature_node", "a node name"),
                      ("baselines", "the path of a baseline run's report.json or directory")):
        if cfg[key] is not None and (not isinstance(cfg[key], str) or not cfg[key]):
            raise AutomtlError(f"config: '{key}' must be {what} or null, got {brief(cfg[key])}")
    if not cfg["backbone"]:
        raise AutomtlError("config: 'backbone' must name a backbone, e.g. torchvision:resnet18")
    cap, caps = cfg["eval_batches"], RANGES["eval_batches"]
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or not caps.admits(cap)):
        raise AutomtlError(f"config: 'eval_batches' caps the validation batches: {caps.text(True)}, or null for the "
                           f"whole validation split, got {brief(cap)}")
    scheduler = cfg["scheduler"]
    if not isinstance(scheduler, dict) or not isinstance(scheduler.get("name"), str):
        raise AutomtlError(f"config: 'scheduler' must be a mapping with a 'name', e.g. {{name: sum}}, got "
                           f"{brief(scheduler)}")
    size = cfg["input_size"]
    if size is not None and not (isinstance(size, list) and len(size) == 2
                                 and all(isinstance(s, int) and not isinstance(s, bool) and 0 < s <= 16384
                                         for s in size)):
        raise AutomtlError(f"config: 'input_size' must be [height, width] (each 1..16384) or null for the size of "
                           f"the validation images, got {brief(size)}")
    stride = cfg["output_stride"]
    if stride is not None and (isinstance(stride, bool) or stride not in OUTPUT_STRIDES):
        raise AutomtlError(f"config: 'output_stride' must be one of {', '.join(map(str, OUTPUT_STRIDES))} (or "
                           f"null), got {brief(stride)}")
    policy = cfg["stages"]["policy"]
    if policy["network_steps"] + policy["policy_steps"] < 1:
        raise AutomtlError("config: 'stages.policy.network_steps' + 'stages.policy.policy_steps' must be at least "
                           "1 (each policy-stage cycle takes that many steps), got 0 + 0")


class _ConfigLoader(yaml.SafeLoader):
    """The safe loader, counting the aliases it composes (at most MAX_ALIASES)."""

    aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                mark = self.peek_event().start_mark
                raise yaml.MarkedYAMLError(problem=f"more than {MAX_ALIASES} aliases (*name); write the values "
                                                   "out instead", problem_mark=mark)
        return super().compose_node(parent, index)


def _expanded_size(node: yaml.Node) -> int:
    """How many nodes ``node`` stands for with every alias expanded, stopping past MAX_NODES; a node that
    contains itself (``&a [*a]``) is a YAMLError."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(n: yaml.Node) -> int:
        if id(n) in sizes:
            return sizes[id(n)]
        if id(n) in open_nodes:
            raise yaml.MarkedYAMLError(problem="a value contains itself through an alias", problem_mark=n.start_mark)
        open_nodes.add(id(n))
        total = 1
        children: list[yaml.Node] = []
        if isinstance(n, yaml.SequenceNode):
            children = list(n.value)
        elif isinstance(n, yaml.MappingNode):
            children = [c for pair in n.value for c in pair]
        for child in children:
            total += size(child)
            if total > MAX_NODES:
                break
        open_nodes.discard(id(n))
        sizes[id(n)] = total
        return total

    return size(node)


def _safe_yaml(text: str) -> Any:
    """``yaml.safe_load(text)`` within the bounds above; a bound exceeded is a YAMLError, a value Python
    cannot hold (a 5000-digit integer, 2021-02-30) a ValueError, nesting too deep a RecursionError."""
    loader = _ConfigLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node) > MAX_NODES:
            raise yaml.MarkedYAMLError(problem=f"more than {MAX_NODES} values once its aliases are expanded",
                                       problem_mark=node.start_mark)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def parse_override(text: str) -> tuple[list[str], Any]:
    """'stages.pretrain.iters=10' -> (['stages', 'pretrain', 'iters'], 10)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise AutomtlError(f"--set {brief(text)} must be KEY=VALUE with a dotted key, e.g. stages.pretrain.iters=10")
    try:
        value = _safe_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise AutomtlError(f"--set {brief(text)}: cannot read the value ({one_line(getattr(e, 'problem', None) or e)})"
                           ) from None
    except (ValueError, RecursionError) as e:
        raise AutomtlError(f"--set {brief(text)}: cannot read the value ({value_error_text(e)})") from None
    return key.split("."), value


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML config file holds (not yet merged or validated); any problem is a FileFormatError."""
    p = require_file(path, "config file")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise FileFormatError(f"{p}: {p.stat().st_size} bytes is too large for a config (at most "
                              f"{MAX_CONFIG_BYTES}); is this the right file?")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise FileFormatError(f"{p}: not a text file (byte {e.start} is not UTF-8); a config is YAML text") from None
    try:
        raw = _safe_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark else str(p)
        raise FileFormatError(f"{where}: not valid YAML ({one_line(getattr(e, 'problem', None) or e)})") from None
    except ValueError as e:
        raise FileFormatError(f"{p}: a value cannot be read ({value_error_text(e)}); check the numbers and dates in "
                              "the file") from None
    except RecursionError:
        raise FileFormatError(f"{p}: nested too deeply to be a config") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise FileFormatError(f"{p}: a config must be a YAML mapping of keys to values")
    return raw


def load_config(path: str | Path | None, overrides: list[str] = ()) -> dict[str, Any]:  # type: ignore[assignment]
    """Read a YAML config (or the defaults when ``path`` is None), apply ``overrides``, validate."""
    raw: dict[str, Any] = read_config_file(path) if path is not None else {}
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise AutomtlError(f"--set {brief(text)}: '{one_line(k, 40)}' is not a mapping")
        node[keys[-1]] = value
    return validate_config(raw)


def validate_config(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` merged over the defaults and checked: unknown keys, wrong types, values out of range and
    inconsistent settings are AutomtlErrors naming the dotted key. A checked config passes unchanged."""
    cfg = _merge(DEFAULTS, _renamed_keys(raw), "")
    _validate(cfg, DEFAULTS)
    _validate_tasks(cfg["tasks"])
    _validate_dataset(cfg["dataset"])
    _validate_rest(cfg)
    return cfg


def _renamed_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with keys of earlier versions in their current form: ``bf16: true|false`` (before
    ``precision``) becomes ``precision: bf16|fp32``, so a run written then resumes in the arithmetic it
    trained in."""
    if not isinstance(raw, dict) or "bf16" not in raw:
        return raw
    raw = dict(raw)
    old = raw.pop("bf16")
    if not isinstance(old, bool):
        raise AutomtlError(f"config: 'bf16' must be true or false, got {brief(old)} (it is now 'precision: bf16')")
    if "precision" in raw:
        raise AutomtlError("config: set 'precision' only; 'bf16' is its old name")
    raw["precision"] = "bf16" if old else "fp32"
    return raw


def dump_config(cfg: dict[str, Any]) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(cfg, sort_keys=False)
