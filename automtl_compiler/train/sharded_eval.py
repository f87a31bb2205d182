"""Validation sharded across the processes of a distributed run, with the metrics reduced exactly.

Each rank evaluates one contiguous block of the validation split (:func:`shard_bounds`) and
:func:`reduce_metrics` all-gathers every metric's accumulators (:meth:`Metric.state`: confusion matrices,
counts, exact sums, kept angles) and merges them in rank order into every rank's metric. The blocks start
at multiples of the batch size, so the ranks run the very batches a single process would; the merged
accumulators equal the single-process ones, hence so do the metrics, bit for bit: what is reduced is the
confusion matrix and the sums, never an average of per-rank means.

The exchange uses tensors only (no pickling): the sizes first, then one byte buffer per rank holding a
header (per tensor: dtype, number of dimensions, shape) and the tensors' bytes, padded to the longest.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import AutomtlError
from ..tasks.base import Metric, mergeable, unmergeable_message

#: Dtypes a metric state may use, by the code written into the exchange header.
STATE_DTYPES: tuple[torch.dtype, ...] = (torch.int64, torch.float64, torch.float32, torch.int32, torch.bool,
                                         torch.uint8, torch.float16, torch.bfloat16, torch.int16, torch.int8)


def shard_bounds(n: int, batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """The block ``[start, stop)`` of an ``n``-sample split that ``rank`` of ``world`` evaluates.

    The split's batches (the last one possibly partial) are dealt out in order, as contiguous runs:
    ``batches // world`` to each rank, one more to each of the last ``batches % world`` ranks (so the
    rank ending on the partial batch is one with more of them). The blocks, in rank order, cover ``[0, n)``
    once; each starts at a multiple of ``batch_size``, so every rank runs exactly the batches of a
    one-process evaluation; no rank runs more than ``ceil(batches / world)`` batches; the block sizes differ
    by at most ``batch_size``. With fewer batches than ranks, the first ranks get empty blocks.
    """
    for name, value, least in (("n", n, 0), ("batch_size", batch_size, 1), ("world", world, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise AutomtlError(f"shard_bounds: {name} must be an integer >= {least}, got {value!r}")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < world:
        raise AutomtlError(f"shard_bounds: rank must be an integer in [0, {world}), got {rank!r}")
    full, partial = divmod(n, batch_size)
    batches = full + (partial > 0)
    per, extra = divmod(batches, world)

    def first_batch(r: int) -> int:
        return r * per + max(0, r - (world - extra))

    start = min(first_batch(rank) * batch_size, n)
    stop = min(first_batch(rank + 1) * batch_size, n)
    return start, stop


def check_mergeable(metrics: Mapping[str, Metric]) -> None:
    """Raise an :class:`AutomtlError` naming the first metric class that cannot be reduced across processes
    (call it when a distributed run starts, before any training)."""
    for task, metric in metrics.items():
        if not mergeable(metric):
            raise AutomtlError(f"task {task!r}: {unmergeable_message(type(metric))}")


def _dtype_code(dtype: torch.dtype, where: str) -> int:
    if dtype not in STATE_DTYPES:
        raise AutomtlError(f"{where}: a metric state tensor has dtype {dtype}, which cannot be exchanged; use "
                           f"one of {', '.join(str(d) for d in STATE_DTYPES)}")
    return STATE_DTYPES.index(dtype)


def _pack(states: list[tuple[str, dict[str, torch.Tensor]]]) -> tuple[torch.Tensor, int]:
    """One uint8 buffer: the int64 header, then every tensor's bytes; and the header's length in bytes."""
    header: list[int] = []
    blobs: list[torch.Tensor] = []
    for task, state in states:
        header.append(len(state))
        for key in sorted(state):
            t = state[key].detach().cpu().contiguous()
            header += [_dtype_code(t.dtype, f"task {task!r}, state {key!r}"), t.dim(), *t.shape]
            blobs.append(t.reshape(-1).view(torch.uint8))
    head = torch.tensor(header, dtype=torch.int64).view(torch.uint8)
    return torch.cat([head, *blobs]), head.numel()


def _unpack(buf: torch.Tensor, head_bytes: int, states: list[tuple[str, dict[str, torch.Tensor]]],
            rank: int) -> list[dict[str, torch.Tensor]]:
    """Rank ``rank``'s states from its buffer, checked against this rank's own keys and dtypes."""
    header = buf[:head_bytes].clone().view(torch.int64).tolist()
    pos, offset, out = 0, head_bytes, []
    for task, mine in states:
        count = header[pos]
        pos += 1
        if count != len(mine):
            raise AutomtlError(f"task {task!r}: rank {rank} sent {count} metric state tensors, this rank has "
                               f"{len(mine)}; every rank must run the same tasks and metrics")
        got: dict[str, torch.Tensor] = {}
        for key in sorted(mine):
            code, ndim = header[pos], header[pos + 1]
            shape = header[pos + 2:pos + 2 + ndim]
            pos += 2 + ndim
            dtype = STATE_DTYPES[code]
            if dtype != mine[key].dtype or ndim != mine[key].dim():
                raise AutomtlError(f"task {task!r}, state {key!r}: rank {rank} sent {dtype} with {ndim} "
                                   f"dimensions, this rank has {mine[key].dtype} with {mine[key].dim()}")
            size = torch.Size(shape).numel() * mine[key].element_size()
            got[key] = buf[offset:offset + size].clone().view(dtype).reshape(shape)
            offset += size
        out.append(got)
    return out


def _all_gather(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t)
    return parts


def _comm_device(ctx: Any) -> torch.device:
    """``ctx.device`` if it has one, else the device the process group's backend exchanges tensors on."""
    device = getattr(ctx, "device", None)
    if device is not None:
        return torch.device(device)
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_metrics(metrics: dict[str, Metric], ctx: Any) -> None:
    """Make every rank's ``metrics`` those of the whole split: gather each rank's accumulators and merge
    them in rank order (a no-op when ``ctx.world == 1``).

    ``ctx`` has ``rank`` and ``world``, and optionally ``device``: where the collective's tensors live
    (without it, the current GPU under NCCL, else the CPU). Every rank must call this with the same task
    names and metric kinds.
    """
    world = int(ctx.world)
    if world <= 1:
        return
    check_mergeable(metrics)
    device = _comm_device(ctx)
    states = [(task, metrics[task].state()) for task in sorted(metrics)]
    buf, head_bytes = _pack(states)
    sizes = _all_gather(torch.tensor([head_bytes, buf.numel()], dtype=torch.int64, device=device), world)
    sizes = [(int(s[0]), int(s[1])) for s in sizes]
    longest = max(total for _, total in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[:buf.numel()] = buf
    gathered = _all_gather(padded.to(device), world)
    per_rank = [_unpack(g[:total].cpu(), head, states, r)
                for r, (g, (head, total)) in enumerate(zip(gathered, sizes, strict=True))]
    for i, (task, _) in enumerate(states):
        metrics[task].reset()
        metrics[task].merge_states([per_rank[r][i] for r in range(world)])
