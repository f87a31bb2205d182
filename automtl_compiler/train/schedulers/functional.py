"""Autograd helpers the schedulers share: which parameters a tensor depends on, and forwards with
substituted weights (``torch.func.functional_call`` over a stage's forward, no model copies)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .base import StepContext


def autograd_leaves(roots: Iterable[torch.Tensor], stop: object | None = None) -> list[torch.Tensor]:
    """The leaf tensors (trainable parameters) the autograd graphs of ``roots`` reach, in a fixed order.

    The walk does not go past the autograd node ``stop`` (e.g. the producer of a shared feature).
    """
    found: list[torch.Tensor] = []
    stack = []
    for r in roots:
        if r.grad_fn is not None:
            stack.append(r.grad_fn)
        elif r.requires_grad:
            found.append(r)
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen or node is stop:
            continue
        seen.add(id(node))
        var = getattr(node, "variable", None)
        if var is not None:
            found.append(var)
            continue
        for child, _ in reversed(node.next_functions):
            if child is not None and id(child) not in seen:
                stack.append(child)
    unique: dict[int, torch.Tensor] = {}
    for t in found:
        unique.setdefault(id(t), t)
    return list(unique.values())


def trunk_parameters(z: torch.Tensor, params: list[nn.Parameter]) -> list[nn.Parameter]:
    """The parameters of ``params`` that ``z`` depends on (found by walking its autograd graph)."""
    leaves = {id(t) for t in autograd_leaves([z])}
    return [p for p in params if id(p) in leaves and p.requires_grad]


class _Bound(nn.Module):
    """Holds ``model`` as a child so that functional_call can reparametrise it while ``fn`` runs."""

    def __init__(self, model: nn.Module, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


def call_with(model: nn.Module, tensors: dict[str, torch.Tensor], fn: Callable[..., Any], *args: Any,
              **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` with the tensors of ``model`` named in ``tensors`` replaced by those values.

    ``fn`` is any function that runs ``model``'s modules (e.g. the stage's forward, which runs generated fx
    code sharing the model's submodule objects); the swap is done on those module objects by
    torch.func.functional_call, so autograd flows into the given tensors and the model is left unchanged.
    """
    return torch.func.functional_call(_Bound(model, fn), {f"model.{k}": v for k, v in tensors.items()},
                                      args, kwargs)


def accumulate_grad(param: torch.Tensor, grad: torch.Tensor) -> None:
    """Add ``grad`` to ``param.grad`` in the parameter's dtype (the trainer zeroes gradients before the step)."""
    grad = grad.to(param.dtype)
    param.grad = grad if param.grad is None else param.grad + grad


def trainable(ctx: StepContext | None, losses: list[torch.Tensor]) -> list[torch.Tensor]:
    """The step's parameters that require gradients, or (no step context) the leaves ``losses`` reach."""
    if ctx is None:
        return autograd_leaves(losses)
    return [p for p in ctx.params if p.requires_grad]
