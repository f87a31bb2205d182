"""The Policy (plain data, JSON) and Gumbel-softmax sampling of branch weights.

A Policy maps task -> unit (conv node name) -> branch, one of ``share``, ``specific``, ``skip``. The
SuperModel, the sampler, the pruner and the exporter all read this one object.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import AutomtlError, FileFormatError
from ..ir.serialize import atomic_write, read_json
from ..passes.multitask import BRANCHES

FORMAT = "automtl-policy"


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
            raise AutomtlError(f"{where}: tasks {sorted(self.choices)} do not match the model's {sorted(tasks)}")
        for task, per_node in self.choices.items():
            unknown = sorted(set(per_node) - set(nodes))
            missing = sorted(set(nodes) - set(per_node))
            if unknown:
                raise AutomtlError(f"{where}: task '{task}' names unknown node(s) {unknown[:5]}; the model's "
                                   f"policy-able nodes are {nodes[:5]}...")
            if missing:
                raise AutomtlError(f"{where}: task '{task}' has no choice for node(s) {missing[:5]}")
            bad = {n: c for n, c in per_node.items() if c not in BRANCHES}
            if bad:
                raise AutomtlError(f"{where}: task '{task}' has invalid branch(es) {bad}; use one of {BRANCHES}")
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
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("choices"), dict):
            raise FileFormatError(f"{where}: not an automtl policy (expected {{\"format\": \"{FORMAT}\", "
                                  "\"choices\": {task: {node: branch}}}})")
        choices = doc["choices"]
        if not all(isinstance(v, dict) for v in choices.values()):
            raise FileFormatError(f"{where}: every task must map node names to branches")
        return cls({str(t): {str(n): str(c) for n, c in v.items()} for t, v in choices.items()})

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        """Read a policy JSON file; a malformed file is a FileFormatError naming it."""
        return cls.from_json(read_json(path, "policy file", FORMAT), str(path))


def gumbel_softmax(logits: torch.Tensor, tau: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Soft Gumbel-softmax sample over the last dimension: softmax((logits + G) / tau), G ~ Gumbel(0, 1).

    Unlike ``torch.nn.functional.gumbel_softmax`` it takes a generator, so a seeded run repeats exactly.
    """
    device = generator.device if generator is not None else logits.device
    u = torch.rand(logits.shape, generator=generator, device=device, dtype=logits.dtype).to(logits.device)
    g = -torch.log((-torch.log(u.clamp_min(1e-20))).clamp_min(1e-20))
    return torch.softmax((logits + g) / tau, dim=-1)
