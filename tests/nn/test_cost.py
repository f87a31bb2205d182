"""The report's policy data, the policy picture and the compute cost of a policy, against references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from automtl_compiler.nn.compact import prune
from automtl_compiler.nn.cost import compact_cost, head_macs, policy_cost
from automtl_compiler.nn.policy import Policy
from automtl_compiler.passes.multitask import BRANCHES
from automtl_compiler.train.policy_plot import COLOURS, draw_policy, policy_data
from tests.helpers import Small
from tests.passes.test_prune import make_supermodel


@pytest.fixture(scope="module")
def small():
    return make_supermodel(Small(), (2, 3, 12, 12), 16)


def conv_macs(module: nn.Module, *args: torch.Tensor, **kwargs) -> int:
    """Multiply-accumulates of every Conv2d / Linear in ``module`` for one call, from hooks on the outputs."""
    total = 0

    def hook(m: nn.Module, _inputs, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        else:
            total += out.numel() * m.in_features

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            module(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return total


def test_head_macs_count_every_convolution(small):
    feature = small.mt.trunk.node(small.mt.feature_node).shape
    for task, head in small.heads.items():
        x = torch.zeros(1, *feature[1:])
        assert head_macs(head, feature, (1, 3, 12, 12)) == conv_macs(head, x) > 0, task


def uniform(small, choice: str) -> Policy:
    return Policy({t: {u: choice for u in small.unit_names} for t in small.tasks})


def test_cost_of_sharing_everything_and_nothing(small):
    trunk = small.mt.trunk.flops() // 2  # the graph is recorded at batch 2; costs are per sample
    feature = small.mt.trunk.node(small.mt.feature_node).shape
    heads = sum(head_macs(h, feature, (1, 3, 12, 12)) for h in small.heads.values())
    shared = policy_cost(small, uniform(small, "share"))
    assert shared["all_tasks"] == trunk + heads
    assert shared["one_by_one"] == 3 * trunk + heads
    assert shared["ratio"] == pytest.approx((trunk + heads) / (3 * trunk + heads))
    alone = policy_cost(small, uniform(small, "specific"))
    assert alone["ratio"] == 1.0 and alone["one_by_one"] == shared["one_by_one"]


def test_cost_counts_a_shared_prefix_once(small):
    """Sharing only the stem (conv, batch norm and the ReLU after it, which is not a unit): one-by-one runs it
    three times, one call runs it once."""
    choices = {t: {u: ("share" if i == 0 else "specific") for i, u in enumerate(small.unit_names)} for t in small.tasks}
    cost = policy_cost(small, Policy(choices))
    stem = small.mt.trunk.node(small.unit_names[0])
    bn = small.mt.trunk.node(small.units[0].bn)
    g = small.mt.trunk
    relu = next(n for n in g.nodes() if n.inputs == [bn.name])
    assert relu.op == "relu"
    stem_ops = (g.node_flops(stem) + g.node_flops(bn) + g.node_flops(relu)) // 2
    assert cost["one_by_one"] - cost["all_tasks"] == 2 * stem_ops
    assert compact_cost(prune(small, Policy(choices))) == cost


def test_policy_data_is_the_softmax_of_the_logits_and_the_choice(small):
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in small.policy_parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    policy = small.sample_policy("sample", seed=3)
    depths = {u.conv: u.depth for u in small.units}
    data = policy_data(small.policy_distribution(), policy.choices, depths)
    assert data["units"] == small.unit_names and data["branches"] == list(BRANCHES)
    assert data["depths"] == [depths[u] for u in small.unit_names]
    for task in small.tasks:
        expected = torch.softmax(small.logits(task).detach(), -1)
        got = torch.tensor([data["tasks"][task][b] for b in BRANCHES]).T
        assert torch.allclose(got, expected, atol=1e-6)
        assert data["tasks"][task]["choice"] == [policy.choices[task][u] for u in small.unit_names]


def colour_mask(pixels: np.ndarray, hex_colour: str) -> np.ndarray:
    rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    return (np.abs(pixels[..., :3].astype(int) - rgb).sum(-1) < 12)


def test_policy_picture_draws_each_task_in_its_own_panel(tmp_path):
    units = [f"layer{i}_conv" for i in range(20)]
    shares = {"a": [1.0, 0.0, 0.0], "b": [0.0, 0.0, 1.0]}
    distribution = {t: {u: p for u in units} for t, p in shares.items()}
    choices = {"a": dict.fromkeys(units, "share"), "b": dict.fromkeys(units, "skip")}
    path = draw_policy(policy_data(distribution, choices, dict(zip(units, range(20)))), tmp_path / "policy.png")
    image = np.asarray(Image.open(path).convert("RGB"))
    height, width = image.shape[:2]
    assert width >= 900 and height >= 500
    body = image[: int(height * 0.8)]  # the panels; the legend's swatches are below them
    share, skip = colour_mask(body, COLOURS["share"]), colour_mask(body, COLOURS["skip"])
    assert share.sum() > 5000 and skip.sum() > 5000
    share_rows, skip_rows = np.nonzero(share.any(1))[0], np.nonzero(skip.any(1))[0]
    assert share_rows.max() < skip_rows.min()  # task a's panel (all share) is above task b's (all skip)
    assert not colour_mask(body, COLOURS["specific"]).any()
    assert colour_mask(image, COLOURS["specific"]).any()  # the legend names every branch


@pytest.mark.parametrize(("weight", "budget"), [(0.0, None), (1000.0, None), (0.0, 0.01)])
def test_sample_stage_ranks_candidates_by_accuracy_cost_and_budget(tmp_path, weight, budget):
    """cost_weight 0 keeps the most accurate candidate, a large one the cheapest, and a budget nothing meets
    the cheapest too; the report lists every candidate with its figures."""
    from automtl_compiler.train.run import train
    from tests.train.test_trainer import ROOT, TINY

    report = train(ROOT / "configs" / "synthetic-quick.yaml",
                   [*TINY, "stages.sample.candidates=5", "stages.sample.calibration_batches=1",
                    f"stages.sample.cost_weight={weight}", "stages.policy.reg_weight=0",
                    f"stages.sample.max_macs_ratio={'null' if budget is None else budget}"],
                   tmp_path / "run", progress=False)
    candidates = report["candidates"]
    assert len({c["macs_ratio"] for c in candidates}) >= 2 and sum(c["chosen"] for c in candidates) == 1
    chosen = next(c for c in candidates if c["chosen"])
    for c in candidates:
        assert c["within_budget"] == (budget is None or c["macs_ratio"] == min(x["macs_ratio"] for x in candidates))
        if c["within_budget"]:
            assert c["score"] == pytest.approx(c["accuracy"] - weight * 100 * c["macs_ratio"])
        else:
            assert c["accuracy"] is None and c["score"] is None  # dropped before scoring
    if weight == 0 and budget is None:
        assert chosen["accuracy"] == max(c["accuracy"] for c in candidates)
    else:
        assert chosen["macs_ratio"] == min(c["macs_ratio"] for c in candidates)
    assert chosen["policy"] == report["policy"]
    assert chosen["macs_ratio"] == pytest.approx(report["macs"]["ratio"])
