"""One training run over several processes, as ``torchrun`` starts them: who am I, and what the ranks share.

A process started by ``torchrun`` (or ``automtl train --nproc-per-node N``) finds ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` in its environment; :func:`context_from_env` joins the process group (NCCL when the run uses
CUDA, gloo otherwise) and picks the device (``device: auto`` means this rank's ``LOCAL_RANK`` GPU). Without
those variables the run is the ordinary single process (``world == 1``) and nothing here talks to anyone.

What ranks share, and how it is kept equal:
- the weights and policy logits: built from the same seed on every rank, checked equal at start
  (:func:`check_same_weights`), and after every backward the gradients are averaged over the ranks
  (:func:`average_gradients`) - the all-reduce that ``DistributedDataParallel`` does, done after the gradient
  scheduler rather than inside autograd hooks, because schedulers compute gradients with
  ``torch.autograd.grad``, which DDP's hooks never see;
- the random draws (batches, Gumbel noise, dropout, the sampled policy): seeded by (seed, stage, step) on
  every rank, so they are the same;
- the files: only rank 0 writes (:attr:`DistContext.is_main`); the others wait at :func:`barrier`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import AutomtlError


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run: ``rank`` of ``world`` processes (``local_rank`` on its machine)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


SINGLE = DistContext()


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise AutomtlError(f"environment variable {name}={value!r} is not a whole number; start the run with "
                           "torchrun or automtl train --nproc-per-node N") from None


def context_from_env(device: str) -> tuple[DistContext, torch.device]:
    """The run's context and this rank's device for the config's ``device`` (auto | cpu | cuda | cuda:K).

    Joins the default process group when ``WORLD_SIZE`` > 1 (once per process).
    """
    world = _env_int("WORLD_SIZE") or 1
    rank, local = _env_int("RANK") or 0, _env_int("LOCAL_RANK") or 0
    if world < 1 or not 0 <= rank < world:
        raise AutomtlError(f"RANK={rank} and WORLD_SIZE={world} do not fit together; start the run with torchrun")
    cuda = device in ("auto", "cuda") and torch.cuda.is_available() or device.startswith("cuda:")
    if device == "cuda" and not torch.cuda.is_available():
        raise AutomtlError("device: cuda was asked for but no CUDA GPU is usable here; use device: cpu or auto")
    if cuda and device in ("auto", "cuda"):
        torch_device = torch.device("cuda", local % max(1, torch.cuda.device_count()))
    else:
        torch_device = torch.device("cpu" if device == "auto" else device)
    if world == 1:
        return SINGLE, torch_device
    backend = "nccl" if torch_device.type == "cuda" else "gloo"
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistContext(rank, world, local, backend), torch_device


def barrier(ctx: DistContext) -> None:
    """Wait until every rank is here (nothing on one process)."""
    if ctx.distributed:
        dist.barrier()


def average_gradients(params: list[nn.Parameter], ctx: DistContext) -> None:
    """Replace each parameter's gradient by its mean over the ranks, in one flat all-reduce.

    Every rank runs the same model under the same policy, so the same parameters have gradients everywhere.
    """
    if not ctx.distributed:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= ctx.world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The sum of ``t`` over the ranks, as a new tensor (``t`` itself on one process); ``t`` is not changed."""
    if not ctx.distributed:
        return t
    total = t.detach().clone()
    dist.all_reduce(total)
    return total


def check_same_weights(model: nn.Module, ctx: DistContext) -> None:
    """Every rank must start from rank 0's weights (each builds them from the same seed); a difference is an
    error, not a silent broadcast: it means the ranks do not run the same config or the same code."""
    if not ctx.distributed:
        return
    with torch.no_grad():
        local = torch.stack([t.double().sum() for t in model.state_dict().values() if t.is_floating_point()])
        first = local.clone()
        dist.broadcast(first, src=0)
    if not torch.equal(local, first):
        raise AutomtlError(f"rank {ctx.rank} built other initial weights than rank 0; every rank must run the same "
                           "config and the same automtl version (start them with one torchrun command)")


def broadcast_buffers(model: nn.Module, ctx: DistContext) -> None:
    """Give every rank rank 0's buffers (batch-norm running statistics), as ``DistributedDataParallel`` does
    before each forward: without synchronised batch norm each rank's statistics follow its own batches.

    One broadcast per dtype, as DDP coalesces them: hundreds of small broadcasts cost their latency each
    (the ResNet-18 SuperModel's 304 buffers: 130-175 ms a step with gloo on 2 busy cores, ~3 ms coalesced)."""
    if not ctx.distributed:
        return
    with torch.no_grad():
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for b in model.buffers():
            by_dtype.setdefault(b.dtype, []).append(b)
        for group in by_dtype.values():
            flat = torch.cat([b.reshape(-1) for b in group])
            dist.broadcast(flat, src=0)
            offset = 0
            for b in group:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()


def broadcast_int(value: int, ctx: DistContext) -> int:
    """Rank 0's ``value`` on every rank (for a choice every rank must make alike)."""
    if not ctx.distributed:
        return value
    t = torch.tensor([int(value)])
    dist.broadcast(t, src=0)
    return int(t)
