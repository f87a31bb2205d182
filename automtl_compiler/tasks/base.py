"""The task-type protocol shared by every task: a criterion, a metric accumulator, metric directions.

A :class:`TaskType` is a small stateless object picked by name from the registry
(:func:`automtl_compiler.tasks.get_task`). The trainer calls ``task.loss(pred, target)`` on every batch and
``metric = task.new_metric(); metric.update(pred, target); metric.compute()`` to evaluate.

Resolution. Dense predictions and their targets need not share a spatial size (heads often predict at a
fraction of the input). ``resize="target"`` (the default, as AutoMTL and AdaShare train) brings the
*target* to the prediction's size with nearest-neighbour sampling, the rule of ``F.interpolate``'s
default ``mode="nearest"`` that both projects call, for labels, depth and normals alike; nearest keeps
label ids intact and never blends valid depth/normal pixels with invalid ones. ``resize="prediction"``
instead upsamples the *prediction* bilinearly (``align_corners=False``) to the target's size, the usual
choice when reporting numbers at full resolution. Masks follow the target (nearest).

Everything here works on whatever device the tensors live on; metric accumulators keep their running
sums on the CPU as integers (counts, confusion matrices, :class:`ExactSum`) or keep the values themselves,
so the numbers do not depend on the device, on the batch split, or on how many processes evaluated.
Every built-in metric can hand its accumulators over as tensors (:meth:`Metric.state`) and add other
processes' accumulators (:meth:`Metric.merge_states`), which is how sharded validation is reduced exactly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from ..errors import AutomtlError

Resize = Literal["target", "prediction"]
RESIZE_MODES: tuple[str, ...] = ("target", "prediction")


def nearest_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize the last two dimensions of ``x`` to ``size`` by nearest-neighbour index selection.

    Source index ``floor(i * in / out)``, the rule of ``F.interpolate(mode="nearest")``, but done by
    indexing so that integer and boolean tensors keep their dtype and values exactly.
    """
    in_h, in_w = x.shape[-2], x.shape[-1]
    out_h, out_w = int(size[0]), int(size[1])
    if (in_h, in_w) == (out_h, out_w):
        return x
    # The same float32 arithmetic as ATen's nearest kernel (scale = in / out, src = floor(dst * scale)),
    # clamped to the last row/column, so that the selected pixels agree with F.interpolate exactly.
    rows = torch.floor(torch.arange(out_h, dtype=torch.float32, device=x.device)
                       * torch.tensor(in_h / out_h, dtype=torch.float32)).long().clamp_(max=in_h - 1)
    cols = torch.floor(torch.arange(out_w, dtype=torch.float32, device=x.device)
                       * torch.tensor(in_w / out_w, dtype=torch.float32)).long().clamp_(max=in_w - 1)
    return x.index_select(-2, rows).index_select(-1, cols)


def bilinear_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of an ``[N, C, H, W]`` float tensor (``align_corners=False``); a no-op at equal size."""
    if tuple(x.shape[-2:]) == (int(size[0]), int(size[1])):
        return x
    return F.interpolate(x, size=(int(size[0]), int(size[1])), mode="bilinear", align_corners=False)


def check_resize(resize: str) -> str:
    if resize not in RESIZE_MODES:
        raise AutomtlError(f"resize={resize!r} is not a resize mode; use one of {', '.join(RESIZE_MODES)}")
    return resize


def align_dense(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None, resize: str,
                kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Bring a dense prediction ``[N, C, h, w]`` and its target/mask to one spatial size.

    ``target`` is ``[N, H, W]`` (labels) or ``[N, C', H, W]``; ``mask`` is ``[N, H, W]`` or ``[N, 1, H, W]``.
    """
    if pred.dim() != 4:
        raise AutomtlError(f"{kind}: the prediction must be [N, C, H, W], got shape {tuple(pred.shape)}")
    if target.dim() not in (3, 4) or target.shape[0] != pred.shape[0]:
        raise AutomtlError(f"{kind}: the target must be [N, H, W] or [N, C, H, W] with N={pred.shape[0]}, "
                           f"got shape {tuple(target.shape)}")
    if mask is not None and (mask.shape[0] != target.shape[0] or tuple(mask.shape[-2:]) != tuple(target.shape[-2:])):
        raise AutomtlError(f"{kind}: the mask's shape {tuple(mask.shape)} does not match the target's "
                           f"{tuple(target.shape)}")
    psize, tsize = tuple(pred.shape[-2:]), tuple(target.shape[-2:])
    if psize != tsize:
        if resize == "target":
            target = nearest_resize(target, psize)
            mask = None if mask is None else nearest_resize(mask, psize)
        else:
            pred = bilinear_resize(pred, tsize)
    return pred, target, mask


class Metric(ABC):
    """Accumulates a task's evaluation statistics over batches.

    ``update`` may be called any number of times (under ``torch.no_grad`` or not: inputs are detached);
    ``compute`` returns plain floats and leaves the state untouched; ``reset`` clears it. The result does
    not depend on how the evaluation set is split into batches.

    To be evaluated across several processes a metric also implements :meth:`state` and
    :meth:`merge_states`; a subclass without them works on one process, and distributed evaluation refuses
    it at start (:func:`mergeable`).
    """

    @abstractmethod
    def update(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add one batch."""

    @abstractmethod
    def compute(self) -> dict[str, float]:
        """The metrics over every batch seen since the last reset."""

    @abstractmethod
    def reset(self) -> None:
        """Forget every batch."""

    def state(self) -> dict[str, torch.Tensor]:
        """The accumulators as CPU tensors (tensors only, so that processes can all-gather them).

        The keys, dtypes and number of dimensions must not depend on what was seen (an empty accumulator
        still gives every key, e.g. with a zero-sized dimension), since every process sends the same keys.
        """
        raise AutomtlError(unmergeable_message(type(self)))

    def merge_states(self, states: Sequence[dict[str, torch.Tensor]]) -> None:
        """Add the accumulators ``states`` (from :meth:`state` of metrics of the same kind and options), in
        order, after what this metric has seen: as if their batches had been passed to ``update`` next."""
        raise AutomtlError(unmergeable_message(type(self)))


def mergeable(metric: Metric) -> bool:
    """Whether ``metric``'s class implements :meth:`Metric.state` and :meth:`Metric.merge_states`."""
    cls = type(metric)
    return cls.state is not Metric.state and cls.merge_states is not Metric.merge_states


def unmergeable_message(cls: type) -> str:
    """Why a metric class cannot be reduced across processes, and what its author should implement."""
    return (f"the metric {cls.__module__}.{cls.__qualname__} cannot be evaluated across processes: it does "
            "not implement state() -> dict[str, torch.Tensor] (its accumulators as tensors) and "
            "merge_states(states) (add other processes' accumulators in order) of "
            "automtl_compiler.tasks.Metric; implement both so that sharded validation is reduced exactly, "
            "or train on one process")


class ExactSum:
    """An exact sum of float64 values that does not depend on their order or grouping.

    Why: a float accumulator (``total += float(batch.sum())``) rounds after every batch, so its result
    changes with the batch boundaries, the number of processes and the order in which their partial sums
    are merged. A fixed-point integer would be exact only for values within a chosen range (depth errors
    are metres, relative errors can reach 1e7); this keeps *every* finite float64 exactly instead.

    How: a finite float64 is ``m * 2**(e - 1075)`` with an integer ``|m| < 2**53`` and its exponent field
    ``e`` (subnormals: ``e = 0`` weighs like ``e = 1``). :attr:`bins` (int64 ``[4, 2048]``) holds, per
    exponent field, the sums of ``m``'s three 18-bit limbs (rows 0-2, signed); row 3 counts NaN, +inf and
    -inf in its first three columns. Adding values and merging accumulators are integer additions, exact
    and associative; a bin overflows only after 2**45 values with one exponent. :meth:`total` recombines
    the bins with Python integers, and :meth:`mean` divides that integer once, correctly rounded (Python's
    int / int is).
    """

    FIELDS = 2048
    LIMB_BITS = 18

    def __init__(self) -> None:
        self.bins = torch.zeros(4, self.FIELDS, dtype=torch.int64)

    @torch.no_grad()
    def add(self, values: torch.Tensor) -> None:
        """Add every element of ``values`` (any float dtype, any device; converted to float64 exactly)."""
        x = values.detach().reshape(-1).to(torch.float64)
        bits = x.view(torch.int64)
        field = (bits >> 52) & 0x7FF
        finite = field != 0x7FF
        frac = bits & ((1 << 52) - 1)
        mag = torch.where(field > 0, frac | (1 << 52), frac)
        negative = bits < 0
        local = torch.zeros(4, self.FIELDS, dtype=torch.int64, device=x.device)
        if not bool(finite.all()):
            odd = x[~finite]
            local[3, 0] = int(torch.isnan(odd).sum())
            local[3, 1] = int((odd == float("inf")).sum())
            local[3, 2] = int((odd == float("-inf")).sum())
            mag, negative, field = mag[finite], negative[finite], field[finite]
        for row in range(3):
            limb = (mag >> (row * self.LIMB_BITS)) & ((1 << self.LIMB_BITS) - 1)
            local[row].index_add_(0, field, torch.where(negative, -limb, limb))
        self.bins += local.cpu()

    def merge(self, bins: torch.Tensor) -> None:
        """Add another accumulator's :attr:`bins`."""
        if tuple(bins.shape) != tuple(self.bins.shape):
            raise AutomtlError(f"an exact sum's bins must have shape {tuple(self.bins.shape)}, got "
                               f"{tuple(bins.shape)}")
        self.bins += bins.to("cpu", torch.int64)

    def reset(self) -> None:
        """Back to zero."""
        self.bins.zero_()

    def _special(self) -> float | None:
        nan, pos, neg = (int(v) for v in self.bins[3, :3])
        if nan or (pos and neg):
            return float("nan")
        if pos or neg:
            return float("inf") if pos else float("-inf")
        return None

    def total(self) -> int:
        """The exact finite sum times ``2**1074`` (an integer), ignoring non-finite values."""
        total = 0
        for field in torch.nonzero(self.bins[:3].any(dim=0)).flatten().tolist():
            l0, l1, l2 = (int(v) for v in self.bins[:3, field])
            m = l0 + (l1 << self.LIMB_BITS) + (l2 << (2 * self.LIMB_BITS))
            total += m << (max(field, 1) - 1)
        return total

    def mean(self, count: int) -> float:
        """The sum divided by ``count`` (positive), rounded once to the nearest float; NaN or ±inf if a
        value was."""
        special = self._special()
        if special is not None:
            return special
        return self.total() / (count << 1074)


class TaskType(ABC):
    """One kind of task: its loss, its metrics and which way each metric improves.

    Attributes:
        kind: the registry name, also the key of this task's target in a dataset's targets dict.
        metric_directions: metric name -> True when higher is better, False when lower is better.
        out_channels: the channels a head must predict (``None`` when it depends on an unset option).
    """

    kind: ClassVar[str]
    metric_directions: ClassVar[dict[str, bool]]

    @property
    @abstractmethod
    def out_channels(self) -> int | None:
        """Channels of the prediction a head must produce."""

    @abstractmethod
    def loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The scalar training loss of one batch (differentiable in ``pred``)."""

    @abstractmethod
    def new_metric(self) -> Metric:
        """A fresh metric accumulator for this task."""

    def options(self) -> dict:
        """The constructor options, for configs and ``repr``."""
        return {}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


class DenseTask(TaskType):
    """A pixel-wise regression task whose one option is how prediction and target meet in size."""

    def __init__(self, resize: str = "target") -> None:
        self.resize = check_resize(resize)

    def options(self) -> dict:
        return {"resize": self.resize}


def zero_loss(pred: torch.Tensor) -> torch.Tensor:
    """A zero that still depends on ``pred`` (for a batch without a single valid pixel): no NaN, no crash."""
    return pred.sum() * 0.0
