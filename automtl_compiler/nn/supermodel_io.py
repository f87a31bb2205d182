"""Save and load a SuperModel as a directory of JSON and safetensors (never pickle).

Layout: ``supermodel.json`` (tasks, heads, fixed policy), ``backbone.json`` (the trunk's IR structure)
and ``weights.safetensors`` (the whole state dict, names as in ``SuperModel.state_dict()``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import AutomtlError, FileFormatError, require_file
from ..ir.serialize import atomic_write, load_graph, read_json, save_graph
from ..passes.multitask import insert_task_branches
from .heads import build_heads, head_spec
from .policy import Policy

if TYPE_CHECKING:
    from .supermodel import SuperModel

FORMAT = "automtl-supermodel"


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
    save_graph(model.mt.graph, directory / "backbone.json", tensors=False)
    atomic_write(directory / "supermodel.json", lambda tmp: tmp.write_text(json.dumps(doc, indent=1)))
    return directory


def save_state(module: nn.Module, path: Path) -> None:
    """Write ``module.state_dict()`` to a safetensors file (atomically)."""
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp)))


def load_state(module: nn.Module, path: Path) -> None:
    """Load a safetensors state dict into ``module``; a corrupt or mismatched file is a FileFormatError."""
    wpath = require_file(path, path.name)
    try:
        state = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise FileFormatError(f"{wpath}: corrupt safetensors file ({e})") from None
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise FileFormatError(f"{wpath}: weights do not match the model (missing {result.missing_keys[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]})")


def load_supermodel(directory: str | Path, heads: dict[str, nn.Module] | None = None,
                    trust_code: bool = False) -> SuperModel:
    """Read a directory written by :func:`save_supermodel`.

    Built-in and registered heads are rebuilt from their specs; a head recorded as
    ``package.module:Class`` is imported only with ``trust_code=True`` (model files never run code on
    their own); heads made by hand (spec type ``custom``) must be passed in ``heads``.
    """
    from .supermodel import SuperModel

    directory = Path(directory)
    meta_path = directory / "supermodel.json"
    doc = read_json(meta_path, "SuperModel description (supermodel.json)", FORMAT, 1)
    graph = load_graph(directory / "backbone.json")
    built = build_heads(doc["heads"], heads, str(meta_path), trust_code=trust_code)
    model = SuperModel(insert_task_branches(graph, list(doc["tasks"])), built)
    load_state(model, directory / "weights.safetensors")
    if doc.get("fixed_policy"):
        model.set_policy(Policy.from_json(doc["fixed_policy"], str(meta_path)))
    return model
