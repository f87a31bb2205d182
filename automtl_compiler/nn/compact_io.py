"""Save and load a CompactModel: ``compact.json`` (tasks, heads, policy, reference counts),
``graph.json`` + ``graph.safetensors`` (the pruned IR; a shared tensor is stored once) and
``heads.safetensors``. No pickle anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from ..ir.serialize import atomic_write, load_graph, read_json, save_graph
from .heads import build_heads, head_spec
from .policy import Policy
from .supermodel_io import load_state, output_directory, save_state

if TYPE_CHECKING:
    from .compact import CompactModel

FORMAT = "automtl-compact"


def save_compact(model: CompactModel, directory: str | Path) -> Path:
    """Write ``model`` into ``directory`` (created if needed); each file is replaced atomically."""
    directory = output_directory(directory)
    save_graph(model.graph, directory / "graph.json")
    save_state(model.heads, directory / "heads.safetensors")
    doc = {"format": FORMAT, "version": 1, "tasks": model.tasks,
           "heads": {t: head_spec(h) for t, h in model.heads.items()}, "policy": model.policy.to_json(),
           "reference": model.reference}
    atomic_write(directory / "compact.json", lambda tmp: tmp.write_text(json.dumps(doc, indent=1)))
    return directory


def load_compact(directory: str | Path, heads: dict[str, nn.Module] | None = None,
                 trust_code: bool = False) -> CompactModel:
    """Read a directory written by :func:`save_compact`.

    Heads are rebuilt as by :func:`~automtl_compiler.nn.supermodel_io.load_supermodel`: a
    ``package.module:Class`` head is imported only with ``trust_code=True``.
    """
    from .compact import CompactModel

    directory = Path(directory)
    meta = directory / "compact.json"
    doc = read_json(meta, "compact model description (compact.json)", FORMAT, 1)
    built = build_heads(doc["heads"], heads, str(meta), trust_code=trust_code)
    graph = load_graph(directory / "graph.json")
    model = CompactModel(graph, list(doc["tasks"]), built, Policy.from_json(doc["policy"], str(meta)),
                         doc.get("reference"))
    load_state(model.heads, directory / "heads.safetensors")
    return model
