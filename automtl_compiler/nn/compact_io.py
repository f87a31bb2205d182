"""Save and load a CompactModel: ``compact.json`` (tasks, heads, policy, reference counts),
``graph.json`` + ``graph.safetensors`` (the pruned IR; a shared tensor is stored once) and
``heads.safetensors``. No pickle anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from ..errors import brief
from ..ir.serialize import atomic_write, load_graph, save_graph
from .heads import build_heads, head_spec
from .policy import Policy, read_document
from .supermodel_io import (
    MISSING,
    check_tasks_and_heads,
    damaged,
    load_state,
    output_directory,
    save_state,
)

if TYPE_CHECKING:
    from .compact import CompactModel

FORMAT = "automtl-compact"
#: The counts ``reference`` records (compact.json), each a whole number >= 0.
REFERENCE_KEYS = ("supermodel_params", "single_task_params", "trunk_params", "trunk_flops")


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


def load_compact(cls: type[CompactModel], directory: str | Path, heads: dict[str, nn.Module] | None = None,
                 trust_code: bool = False) -> CompactModel:
    """Read a directory written by :func:`save_compact`.

    Heads are rebuilt as by :func:`~automtl_compiler.nn.supermodel_io.load_supermodel`: a
    ``package.module:Class`` head is imported only with ``trust_code=True``.
    """
    directory = Path(directory)
    meta = directory / "compact.json"
    doc = read_document(meta, "compact model description (compact.json)", FORMAT, 1)
    tasks = check_tasks_and_heads(doc, meta)
    if not isinstance(doc.get("policy"), dict):
        raise damaged(meta, "policy", "the policy the model was pruned to", doc.get("policy", MISSING))
    policy = Policy.from_json(doc["policy"], str(meta))
    if sorted(policy.tasks) != sorted(tasks):
        raise damaged(meta, "policy", f"a policy of the tasks {brief(tasks)}", sorted(policy.tasks))
    reference = doc.get("reference")
    if reference and not (isinstance(reference, dict) and sorted(reference) == sorted(REFERENCE_KEYS)
                          and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63
                                  for v in reference.values())):
        raise damaged(meta, "reference", f"null or whole numbers >= 0 for {', '.join(REFERENCE_KEYS)}", reference)
    built = build_heads(doc["heads"], heads, str(meta), trust_code=trust_code)
    graph = load_graph(directory / "graph.json")
    model = cls(graph, tasks, built, policy, reference)
    load_state(model.heads, directory / "heads.safetensors")
    return model
