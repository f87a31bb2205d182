"""Activation checkpointing of a unit's branches in generated code.

A soft-mode unit runs three branches (share, specific, skip: convs and batch norms) and mixes them; the
backward keeps every conv output (for its batch norm) and every branch output (for the gates' gradient).
:func:`checkpoint_mixes` moves each ``mix`` and the branch nodes only it uses into a submodule that runs
under ``torch.utils.checkpoint``: the backward keeps the unit's input and recomputes the branches, one unit
at a time. Batch-norm running statistics are updated once (the recomputation leaves them alone).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import fx, nn
from torch.utils.checkpoint import checkpoint

_BATCHNORM = (nn.modules.batchnorm._BatchNorm,)


@contextlib.contextmanager
def frozen_running_statistics(module: nn.Module) -> Iterator[None]:
    """Batch norms in ``module`` normalise as usual but leave their running statistics as they were."""
    saved = [(m, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
             for m in module.modules() if isinstance(m, _BATCHNORM)]
    for m, _, _ in saved:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


class CheckpointedSegment(nn.Module):
    """Runs ``inner`` under activation checkpointing when gradients are recorded, plainly otherwise."""

    def __init__(self, inner: fx.GraphModule) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self.inner(*inputs)
        return checkpoint(self.inner, *inputs, use_reentrant=False,
                          context_fn=lambda: (contextlib.nullcontext(), frozen_running_statistics(self.inner)))


def _segment(mix: fx.Node, absorbable: Callable[[fx.Node], bool]) -> list[fx.Node]:
    """``mix`` and the producers it alone needs (transitively) that ``absorbable`` admits, in graph order."""
    inside = {mix}
    frontier = [a for a in mix.all_input_nodes]
    while frontier:
        node = frontier.pop()
        if node in inside or not absorbable(node) or any(u not in inside for u in node.users):
            continue
        inside.add(node)
        frontier.extend(node.all_input_nodes)
    return [n for n in mix.graph.nodes if n in inside]


def checkpoint_mixes(gm: fx.GraphModule, is_mix: Callable[[fx.Node], bool],
                     absorbable: Callable[[fx.Node], bool]) -> fx.GraphModule:
    """``gm`` with each node ``is_mix`` admits, and the nodes that feed only it and ``absorbable`` admits,
    replaced by a :class:`CheckpointedSegment` call (in place; returns ``gm``)."""
    for k, mix in enumerate([n for n in gm.graph.nodes if is_mix(n)]):
        nodes = _segment(mix, absorbable)
        members = set(nodes)
        inputs = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a not in members))
        sub = fx.Graph()
        env = {a: sub.placeholder(a.name) for a in inputs}
        for n in nodes:
            env[n] = sub.node_copy(n, lambda a: env[a])
        sub.output(env[mix])
        name = f"checkpointed_{k}"
        gm.add_submodule(name, CheckpointedSegment(fx.GraphModule(gm, sub, class_name="UnitBranches")))
        with gm.graph.inserting_before(mix):
            call = gm.graph.call_module(name, tuple(inputs))
        mix.replace_all_uses_with(call)
        for n in reversed(nodes):
            gm.graph.erase_node(n)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
