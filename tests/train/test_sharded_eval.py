"""Sharded validation: merged metric states equal the unsharded metrics exactly, shard bounds, and a real
2-process gloo reduction on localhost."""

from __future__ import annotations

import math
import socket
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from automtl_compiler.errors import AutomtlError
from automtl_compiler.tasks import Metric, get_task
from automtl_compiler.tasks.base import ExactSum
from automtl_compiler.train.sharded_eval import (
    check_mergeable,
    reduce_metrics,
    shard_bounds,
)
from tests.custom_parts import MeanAbsMetric

Sample = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
KINDS = ("segment_semantic", "depth_zbuffer", "normal", "classification")


def make_samples(kind: str, seed: int, n: int, resize: str = "target") -> list[Sample]:
    """``n`` random (prediction, target, mask) samples, each with a batch dimension of 1. Dense predictions
    are at half the target's size; values span several orders of magnitude so float sums would depend on
    their grouping; targets include ignored labels, invalid depths/normals and false mask values."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g)

    out: list[Sample] = []
    for _ in range(n):
        mask = rand(1, 4, 6) > 0.2
        if kind == "segment_semantic":
            pred = torch.randn(1, 5, 2, 3, generator=g)
            target = torch.randint(-1, 7, (1, 4, 6), generator=g)
            target[rand(1, 4, 6) < 0.15] = 255
        elif kind == "depth_zbuffer":
            pred = torch.exp(torch.randn(1, 1, 2, 3, generator=g) * 4)
            target = torch.exp(torch.randn(1, 1, 4, 6, generator=g) * 4)
            target[rand(1, 1, 4, 6) < 0.2] = 0.0
        elif kind == "normal":
            pred = torch.randn(1, 3, 2, 3, generator=g)
            target = torch.randn(1, 3, 4, 6, generator=g)
            target[:, :, rand(4, 6) < 0.2] = 0.0
        else:
            pred = torch.randn(1, 4, generator=g)
            target = torch.randint(0, 4, (1,), generator=g)
            target[rand(1) < 0.2] = -100
            mask = rand(1) > 0.2
        out.append((pred, target, mask))
    return out


def new_metric(kind: str, resize: str = "target", infer_classes: bool = False) -> Metric:
    if kind == "segment_semantic":
        return get_task(kind, num_classes=None if infer_classes else 5, ignore_index=255, resize=resize).new_metric()
    if kind == "classification":
        return get_task(kind, num_classes=4).new_metric()
    return get_task(kind, resize=resize).new_metric()


def evaluate(metric: Metric, samples: list[Sample], batch_size: int) -> Metric:
    """``metric`` updated with ``samples`` in consecutive batches of ``batch_size``."""
    for i in range(0, len(samples), batch_size):
        batch = samples[i:i + batch_size]
        pred, target, mask = (torch.cat([s[j] for s in batch]) for j in range(3))
        metric.update(pred, target, mask)
    return metric


def same(a: dict[str, float], b: dict[str, float]) -> bool:
    """Equal keys and exactly equal values (NaN equal to NaN)."""
    return a.keys() == b.keys() and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


# ------------------------------------------------------------------------------ merged shards == unsharded

@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(0, 12), data=st.data())
def test_merged_shards_equal_the_unsharded_metrics_exactly(kind, seed, n, data):
    resize = data.draw(st.sampled_from(("target", "prediction")))
    infer = data.draw(st.booleans())
    samples = make_samples(kind, seed, n)
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=3)))
    bounds = list(zip([0, *cuts], [*cuts, n], strict=True))
    whole = evaluate(new_metric(kind, resize, infer), samples, data.draw(st.integers(1, 5)))
    shards = [evaluate(new_metric(kind, resize, infer), samples[a:b], data.draw(st.integers(1, 5)))
              for a, b in bounds]
    merged = new_metric(kind, resize, infer)
    merged.merge_states([s.state() for s in shards])
    assert same(merged.compute(), whole.compute()), (merged.compute(), whole.compute())
    onto_first = shards[0]
    onto_first.merge_states([s.state() for s in shards[1:]])
    assert same(onto_first.compute(), whole.compute())


def test_states_are_tensors_that_merging_leaves_alone():
    for kind in KINDS:
        samples = make_samples(kind, 3, 4)
        metric = evaluate(new_metric(kind), samples, 2)
        state = metric.state()
        assert state and all(isinstance(t, torch.Tensor) for t in state.values())
        before = {k: t.clone() for k, t in state.items()}
        twice = new_metric(kind)
        twice.merge_states([state, state])
        assert all(torch.equal(before[k], state[k]) for k in state), kind
        assert same(twice.compute(), evaluate(new_metric(kind), samples + samples, 3).compute()), kind
        metric.reset()
        assert all(math.isnan(v) for v in metric.compute().values()), kind


def test_a_float_accumulator_would_depend_on_the_grouping_but_the_exact_sum_does_not():
    values = torch.tensor([1e16, 1.0, -1e16, 1.0], dtype=torch.float64)
    naive_one = float(values.sum())
    naive_split = float(values[:2].sum()) + float(values[2:].sum())
    assert naive_one != 2.0 or naive_split != 2.0, "the values must make float sums grouping-dependent"
    one, left, right = ExactSum(), ExactSum(), ExactSum()
    one.add(values)
    left.add(values[:1])
    right.add(values[1:])
    left.merge(right.bins)
    assert one.mean(4) == left.mean(4) == 0.5
    subnormal = ExactSum()
    subnormal.add(torch.tensor([5e-324, 5e-324, -1.5, 3.0], dtype=torch.float64))
    assert subnormal.total() == 2 + (3 << 1073)
    special = ExactSum()
    special.add(torch.tensor([1.0, float("inf")]))
    assert special.mean(2) == float("inf")
    special.add(torch.tensor([float("-inf")]))
    assert math.isnan(special.mean(3))


def test_depth_metric_still_matches_a_float64_reference():
    samples = make_samples("depth_zbuffer", 7, 5)
    metric = evaluate(new_metric("depth_zbuffer", "prediction"), samples, 2)
    errors = []
    for pred, target, mask in samples:
        up = torch.nn.functional.interpolate(pred, size=(4, 6), mode="bilinear", align_corners=False)
        valid = (target > 0) & mask[:, None]
        errors.append((up[valid].double() - target[valid].double()).abs())
    err = torch.cat(errors)
    assert metric.compute()["abs_err"] == pytest.approx(math.fsum(err.tolist()) / err.numel(), rel=1e-15)


# ------------------------------------------------------------------------------------------- shard bounds

@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 200), batch_size=st.integers(1, 16), world=st.integers(1, 9))
def test_shard_bounds_cover_the_split_in_whole_batches(n, batch_size, world):
    blocks = [shard_bounds(n, batch_size, r, world) for r in range(world)]
    assert blocks[0][0] == 0 and blocks[-1][1] == n
    assert all(blocks[r][1] == blocks[r + 1][0] for r in range(world - 1))
    assert all(a <= b and a % batch_size == 0 for a, b in blocks)
    batches = [math.ceil((b - a) / batch_size) for a, b in blocks]
    assert max(batches) == math.ceil(math.ceil(n / batch_size) / world)
    assert max(batches) - min(batches) <= 1
    sizes = [b - a for a, b in blocks]
    assert max(sizes) - min(sizes) <= batch_size
    assert all(size % batch_size == 0 for (a, b), size in zip(blocks, sizes, strict=True) if b != n)


def test_shard_bounds_examples_and_bad_input():
    assert [shard_bounds(9, 4, r, 2) for r in range(2)] == [(0, 4), (4, 9)]
    assert [shard_bounds(16, 4, r, 2) for r in range(2)] == [(0, 8), (8, 16)]
    assert [shard_bounds(3, 4, r, 2) for r in range(2)] == [(0, 0), (0, 3)]
    for args in ((5, 0, 0, 1), (-1, 2, 0, 1), (5, 2, 2, 2), (5, 2, -1, 2), (5, 2, 0, 0)):
        with pytest.raises(AutomtlError, match="shard_bounds"):
            shard_bounds(*args)


# ----------------------------------------------------------------------------------- user metrics refused

def test_a_metric_without_state_works_alone_and_is_refused_across_processes():
    metric = MeanAbsMetric()
    metric.update(torch.ones(2, 3), torch.zeros(2, 3))
    assert metric.compute() == {"mae": 1.0}
    reduce_metrics({"mine": metric}, SimpleNamespace(rank=0, world=1, device=torch.device("cpu")))
    assert metric.compute() == {"mae": 1.0}
    for call in (lambda: check_mergeable({"seg": new_metric("segment_semantic"), "mine": metric}),
                 lambda: reduce_metrics({"mine": metric}, SimpleNamespace(rank=0, world=2, device=torch.device("cpu"))),
                 metric.state, lambda: metric.merge_states([])):
        with pytest.raises(AutomtlError) as err:
            call()
        assert "tests.custom_parts.MeanAbsMetric" in str(err.value)
        assert "state()" in str(err.value) and "merge_states" in str(err.value)
    check_mergeable({k: new_metric(k) for k in KINDS})


# --------------------------------------------------------------------------------- two processes, gloo

#: (samples, batch size) of the rounds each rank evaluates: uneven blocks, then rank 0 empty (and a
#: context without a device: the backend's is used).
ROUNDS = ((11, 3), (3, 4))


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        with_device = SimpleNamespace(rank=rank, world=world, device=torch.device("cpu"))
        results = []
        for (n, batch_size), ctx in zip(ROUNDS, (with_device, SimpleNamespace(rank=rank, world=world)), strict=True):
            start, stop = shard_bounds(n, batch_size, rank, world)
            metrics = {kind: evaluate(new_metric(kind, infer_classes=True), make_samples(kind, n, n)[start:stop],
                                      batch_size) for kind in KINDS}
            reduce_metrics(metrics, ctx)
            results.append({kind: m.compute() for kind, m in metrics.items()})
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_reduce_to_the_unsharded_metrics(tmp_path):
    world = 2
    procs = mp.start_processes(_rank_main, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=False,
                               start_method="spawn")
    deadline = time.monotonic() + 120
    try:
        while not procs.join(timeout=1):
            assert time.monotonic() < deadline, "the 2-process evaluation did not finish in 120 s"
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.kill()
    for rank in range(world):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for (n, batch_size), got in zip(ROUNDS, results, strict=True):
            for kind in KINDS:
                whole = evaluate(new_metric(kind, infer_classes=True), make_samples(kind, n, n), batch_size)
                assert same(got[kind], whole.compute()), (rank, n, kind, got[kind], whole.compute())
