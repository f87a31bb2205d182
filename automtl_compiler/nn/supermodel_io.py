"""Save and load a SuperModel as a directory of JSON and safetensors (never pickle).

Layout: ``supermodel.json`` (tasks, heads, fixed policy), ``backbone.json`` (the trunk's IR structure)
and ``weights.safetensors`` (the whole state dict, names as in ``SuperModel.state_dict()``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors.torch import save_file
from torch import nn

from .. import limits
from ..errors import AutomtlError, FileFormatError, brief, one_line, require_file
from ..frontends.weights import copy_into_module
from ..ir.serialize import atomic_write, load_graph, load_safetensors, save_graph
from ..passes.multitask import insert_task_branches
from .heads import build_heads, head_spec
from .policy import MAX_NAME, MAX_TASKS, Policy, read_document

if TYPE_CHECKING:
    from .supermodel import SuperModel

FORMAT = "automtl-supermodel"
#: Stands for a key a document lacks (``damaged(..., got=MISSING)``).
MISSING = object()
#: Integer fields of a recorded head spec, each a whole number in 1..limits MAX_CHANNELS.
HEAD_SIZES = ("in_channels", "num_classes", "hidden")


def damaged(path: str | Path, key: str, expected: str, got: object) -> FileFormatError:
    """The error for a key of a model description that is missing or of the wrong kind."""
    found = "is missing" if got is MISSING else f"is {brief(got)}"
    return FileFormatError(f"{path}: '{key}' {found}; it must be {expected} (the file is damaged or was not "
                           "written by automtl; write it again with automtl)")


def check_tasks_and_heads(doc: dict, path: str | Path) -> list[str]:
    """Check the ``tasks`` and ``heads`` of a model description (supermodel.json, compact.json): a list of
    distinct task names and a head spec per task; returns the tasks."""
    tasks = doc.get("tasks", MISSING)
    if (not isinstance(tasks, list) or not 0 < len(tasks) <= MAX_TASKS
            or not all(isinstance(t, str) and 0 < len(t) <= MAX_NAME for t in tasks) or len(set(tasks)) != len(tasks)):
        raise damaged(path, "tasks", f"a list of 1..{MAX_TASKS} distinct task names", tasks)
    heads = doc.get("heads", MISSING)
    if not isinstance(heads, dict) or sorted(heads) != sorted(tasks):
        raise damaged(path, "heads", f"a mapping from each task ({brief(tasks)}) to its head spec", heads)
    for task, spec in heads.items():
        key = f"heads.{one_line(task, 40)}"
        if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
            raise damaged(path, key, "a head spec with a \"type\"", spec)
        high = limits.get("MAX_CHANNELS")
        for field in HEAD_SIZES:
            value = spec.get(field, 1)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= high:
                raise damaged(path, f"{key}.{field}", f"a whole number in 1..{high}", value)
        if spec.get("options") is not None and not isinstance(spec["options"], dict):
            raise damaged(path, f"{key}.options", "a mapping of the head's options", spec["options"])
    return tasks


def output_directory(directory: str | Path) -> Path:
    """Create ``directory`` if needed; a file in its place is an error (it is never replaced)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise AutomtlError(f"{directory} exists and is not a directory; choose another output path")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def save_supermodel(model: SuperModel, directory: str | Path) -> Path:
    """Write ``model`` into ``directory`` (created if needed); each file is replaced atomically."""
    directory = output_directory(directory)
    heads = {t: head_spec(h) for t, h in model.heads.items()}
    doc = {"format": FORMAT, "version": 1, "tasks": model.tasks, "feature_node": model.mt.feature_node,
           "heads": heads, "fixed_policy": model.fixed_policy.to_json() if model.fixed_policy else None}
    save_state(model, directory / "weights.safetensors")
    save_graph(model.mt.trunk, directory / "backbone.json", tensors=False)
    atomic_write(directory / "supermodel.json", lambda tmp: tmp.write_text(json.dumps(doc, indent=1)))
    return directory


def save_state(module: nn.Module, path: Path) -> None:
    """Write ``module.state_dict()`` to a safetensors file (atomically)."""
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp)))


def load_state(module: nn.Module, path: Path) -> None:
    """Load a safetensors state dict into ``module``; a corrupt or mismatched file (missing, unexpected or
    mis-shaped tensors, a dtype that does not fit, NaN or infinity) is a FileFormatError naming it."""
    wpath = require_file(path, path.name)
    copy_into_module(module, load_safetensors(wpath), wpath, counters_optional=False,
                     hint="the file does not belong to this model description; write the model again with automtl")


def load_supermodel(cls: type[SuperModel], directory: str | Path, heads: dict[str, nn.Module] | None = None,
                    trust_code: bool = False) -> SuperModel:
    """Read a directory written by :func:`save_supermodel`.

    Built-in and registered heads are rebuilt from their specs; a head recorded as
    ``package.module:Class`` is imported only with ``trust_code=True`` (model files never run code on
    their own); heads made by hand (spec type ``custom``) must be passed in ``heads``.
    """
    directory = Path(directory)
    meta_path = directory / "supermodel.json"
    doc = read_document(meta_path, "SuperModel description (supermodel.json)", FORMAT, 1)
    tasks = check_tasks_and_heads(doc, meta_path)
    if doc.get("feature_node") is not None and not isinstance(doc["feature_node"], str):
        raise damaged(meta_path, "feature_node", "a node name or null", doc["feature_node"])
    fixed = doc.get("fixed_policy")
    if fixed is not None and not isinstance(fixed, dict):
        raise damaged(meta_path, "fixed_policy", "a policy or null", fixed)
    policy = Policy.from_json(fixed, str(meta_path)) if fixed else None
    graph = load_graph(directory / "backbone.json")
    built = build_heads(doc["heads"], heads, str(meta_path), trust_code=trust_code)
    model = cls(insert_task_branches(graph, tasks), built)
    load_state(model, directory / "weights.safetensors")
    if policy is not None:
        model.set_policy(policy.check(model.tasks, model.unit_names, where=str(meta_path)))
    return model
