"""Registry ops of the multi-task graph: a unit's branches combined by gates (``mix``) or by a choice (``select``).

A multi-task graph has a second input, ``gates``, of shape [tasks, units, 3]: the weights of the share,
specific and skip branches of every unit for every task (Gumbel-softmax samples when training the policy,
1/3 each for pre-training). Binding the gates to a discrete policy turns each ``mix`` into a ``select``,
which the pruning passes then remove by reading the chosen branch directly.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ShapeError
from .ops import Attr, Lowering, OpDef, Shape, _numel, register

BRANCHES = ("share", "specific", "skip")


def mix(share: torch.Tensor, specific: torch.Tensor, skip: torch.Tensor, gates: torch.Tensor, *, task: int,
        unit: int) -> torch.Tensor:
    """g0 * share + g1 * specific + g2 * skip with g = gates[task, unit]: a unit's output in soft mode."""
    g = gates[task, unit]
    return share * g[0] + specific * g[1] + skip * g[2]


def select(share: torch.Tensor, specific: torch.Tensor, skip: torch.Tensor, *, choice: str) -> torch.Tensor:
    """The branch ``choice`` names: a unit's output under a discrete policy."""
    return (share, specific, skip)[BRANCHES.index(choice)]


def _branches_shape(ins: list[Shape], op: str) -> Shape:
    if len({tuple(s) for s in ins[:3]}) != 1:
        raise ShapeError(f"op '{op}' needs three branches of one shape, got {[list(s) for s in ins[:3]]}")
    return ins[0]


def _mix_shape(a: dict[str, Any], ins: list[Shape]) -> Shape:
    gates = ins[3]
    if len(gates) != 3 or gates[2] != 3 or not (a["task"] < gates[0] and a["unit"] < gates[1]):
        raise ShapeError(f"op 'mix' reads gates[{a['task']}, {a['unit']}] from gates of shape {list(gates)}; "
                         "they must be [tasks, units, 3] and cover that entry")
    return _branches_shape(ins, "mix")


register(OpDef(name="mix", doc="gates[task, unit] · (share, specific, skip): a unit's soft output.", arity=(4, 4),
               attrs={"task": Attr("int", low=0), "unit": Attr("int", low=0)}, shape=_mix_shape,
               flops=lambda a, ins, out: 3 * _numel(out),
               lower=lambda a, p, b: Lowering(function=mix, kwargs={"task": a["task"], "unit": a["unit"]})))
register(OpDef(name="select", doc="One of (share, specific, skip), chosen by a discrete policy.", arity=(3, 3),
               attrs={"choice": Attr("str", choices=BRANCHES)}, shape=lambda a, ins: _branches_shape(ins, "select"),
               flops=lambda a, ins, out: 0,
               lower=lambda a, p, b: Lowering(function=select, kwargs={"choice": a["choice"]})))
