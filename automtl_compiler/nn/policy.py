"""The Policy (plain data, JSON) and Gumbel-softmax sampling of branch weights.

A Policy maps task -> unit (conv node name) -> branch, one of ``share``, ``specific``, ``skip``. The
SuperModel, the sampler, the pruner and the exporter all read this one object.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import (
    AutomtlError,
    FileFormatError,
    brief,
    one_line,
    require_file,
    value_error_text,
)
from ..ir.serialize import atomic_write, read_json
from ..passes.multitask import BRANCHES

FORMAT = "automtl-policy"
#: Largest policy / model description JSON file read.
MAX_DOCUMENT_BYTES = 64 << 20
#: Bounds of a policy: tasks, nodes per task, characters of a task or node name.
MAX_TASKS = 1000
MAX_NODES = 100_000
MAX_NAME = 1000
SHOWN = 5


def read_document(path: str | Path, what: str, fmt: str, version: int | None = None) -> dict:
    """Read one of our JSON documents (see ``ir.serialize.read_json``); every problem is a one-line
    FileFormatError naming the file, including integers too long for Python (thousands of digits), nesting
    too deep for the parser, and files larger than MAX_DOCUMENT_BYTES."""
    p = require_file(path, what)
    size = p.stat().st_size
    if size > MAX_DOCUMENT_BYTES:
        raise FileFormatError(f"{p}: {size} bytes is too large for a {what} (at most {MAX_DOCUMENT_BYTES}); "
                              "is this the right file?")
    try:
        return read_json(p, what, fmt, version)
    except FileFormatError as e:
        if len(str(e)) <= 300:
            raise
        raise type(e)(one_line(e, 300)) from None
    except RecursionError:
        raise FileFormatError(f"{p}: nested too deeply to be a {what}") from None
    except ValueError as e:  # int() of a number with thousands of digits
        raise FileFormatError(f"{p}: not a valid {what} ({value_error_text(e)})") from None


@dataclass
class Policy:
    """A discrete policy: ``choices[task][node]`` is one of BRANCHES."""

    choices: dict[str, dict[str, str]]

    @property
    def tasks(self) -> list[str]:
        return list(self.choices)

    def check(self, tasks: list[str], nodes: list[str], where: str = "policy") -> Policy:
        """Raise AutomtlError unless this policy names exactly ``tasks`` and ``nodes`` with valid branches."""
        if sorted(self.choices) != sorted(tasks):
            raise AutomtlError(f"{where}: tasks {brief(sorted(self.choices))} do not match the model's "
                               f"{brief(sorted(tasks))}")
        for task, per_node in self.choices.items():
            unknown = sorted(set(per_node) - set(nodes))
            missing = sorted(set(nodes) - set(per_node))
            if unknown:
                raise AutomtlError(f"{where}: task {brief(task, 40)} names unknown node(s) {brief(unknown)}; the "
                                   f"model's policy-able nodes are {brief(nodes[:SHOWN])}...")
            if missing:
                raise AutomtlError(f"{where}: task {brief(task, 40)} has no choice for node(s) {brief(missing)}")
            bad = {n: c for n, c in per_node.items() if c not in BRANCHES}
            if bad:
                raise AutomtlError(f"{where}: task {brief(task, 40)} has invalid branch(es) {brief(bad)}; use one "
                                   f"of {BRANCHES}")
        return self

    def counts(self) -> dict[str, dict[str, int]]:
        """Per task, how many units take each branch."""
        return {t: {b: sum(c == b for c in per.values()) for b in BRANCHES} for t, per in self.choices.items()}

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": 1, "choices": self.choices}

    def save(self, path: str | Path) -> Path:
        """Write the policy as JSON (atomically)."""
        text = json.dumps(self.to_json(), indent=1)
        atomic_write(path, lambda tmp: tmp.write_text(text))
        return Path(path)

    @classmethod
    def from_json(cls, doc: object, where: str = "policy") -> Policy:
        """A Policy from its JSON form; anything else (wrong types, names or sizes out of bounds) is a
        FileFormatError naming ``where``."""
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("choices"), dict):
            raise FileFormatError(f"{where}: not an automtl policy (expected {{\"format\": \"{FORMAT}\", "
                                  "\"choices\": {task: {node: branch}}}})")
        choices = doc["choices"]
        if not 0 < len(choices) <= MAX_TASKS:
            raise FileFormatError(f"{where}: 'choices' must name 1..{MAX_TASKS} tasks, got {len(choices)}")
        out: dict[str, dict[str, str]] = {}
        for task, per_node in choices.items():
            if not isinstance(task, str) or not 0 < len(task) <= MAX_NAME:
                raise FileFormatError(f"{where}: task name {brief(task)} must be a string of 1..{MAX_NAME} characters")
            if not isinstance(per_node, dict) or len(per_node) > MAX_NODES:
                raise FileFormatError(f"{where}: 'choices.{one_line(task, 40)}' must map up to {MAX_NODES} node names "
                                      f"to branches ({', '.join(BRANCHES)}), got {brief(per_node)}")
            for node, branch in per_node.items():
                if not isinstance(node, str) or not 0 < len(node) <= MAX_NAME:
                    raise FileFormatError(f"{where}: task {brief(task, 40)}: node name {brief(node)} must be a "
                                          f"string of 1..{MAX_NAME} characters")
                if not isinstance(branch, str):
                    raise FileFormatError(f"{where}: task {brief(task, 40)}, node {brief(node, 40)}: the branch must "
                                          f"be one of {', '.join(BRANCHES)}, got {brief(branch)}")
            out[task] = dict(per_node)
        return cls(out)

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        """Read a policy JSON file; a malformed file is a FileFormatError naming it."""
        return cls.from_json(read_document(path, "policy file", FORMAT), str(path))


def gumbel_softmax(logits: torch.Tensor, tau: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Soft Gumbel-softmax sample over the last dimension: softmax((logits + G) / tau), G ~ Gumbel(0, 1).

    Unlike ``torch.nn.functional.gumbel_softmax`` it takes a generator, so a seeded run repeats exactly.
    """
    device = generator.device if generator is not None else logits.device
    u = torch.rand(logits.shape, generator=generator, device=device, dtype=logits.dtype).to(logits.device)
    g = -torch.log((-torch.log(u.clamp_min(1e-20))).clamp_min(1e-20))
    return torch.softmax((logits + g) / tau, dim=-1)
