"""Batch-norm recalibration against the statistics computed by hand, and the restore on leaving."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from automtl_compiler.nn.calibrate import recalibrated_batchnorm


def model() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(7)
    return net.eval()


def test_statistics_are_the_average_over_the_calibration_batches():
    net = model()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(5, 3, 8, 8, generator=gen) * (1 + i) + i for i in range(3)]
    with torch.no_grad():
        conv = [net[0](x) for x in batches]
    mean = torch.stack([c.mean((0, 2, 3)) for c in conv]).mean(0)
    var = torch.stack([c.var((0, 2, 3), unbiased=True) for c in conv]).mean(0)
    before = {k: v.clone() for k, v in net.state_dict().items()}

    def feed() -> None:
        for x in batches:
            net(x)

    with recalibrated_batchnorm(net, feed):
        assert torch.allclose(net[1].running_mean, mean, atol=1e-5)
        assert torch.allclose(net[1].running_var, var, atol=1e-4)
        assert not net[1].running_mean.requires_grad and net[1].momentum is None
        assert int(net[1].num_batches_tracked) == 3
    assert not net.training
    assert net[1].momentum == 0.1
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_statistics_come_back_after_an_error():
    net = model().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"), recalibrated_batchnorm(net, lambda: net(torch.randn(2, 3, 8, 8))):
        raise RuntimeError("boom")
    assert net.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
