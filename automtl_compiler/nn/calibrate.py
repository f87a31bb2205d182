"""Batch-norm recalibration: score a sampled sub-network with statistics of its own, not the supernet's.

After policy training, every batch-norm layer's running statistics describe the Gumbel-weighted mixture of
branches, not the one path a discrete policy takes; evaluating a candidate policy with them misjudges it
(on the synthetic scenes, candidates' Δm before post-training spread over 30 points). Re-estimating the
statistics on a few training batches under the candidate, then putting the originals back, is the usual
remedy in weight-sharing architecture search.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def recalibrated_batchnorm(model: nn.Module, feed: Callable[[], None]) -> Iterator[None]:
    """Inside the block every batch-norm layer of ``model`` holds statistics re-estimated by ``feed`` (which
    runs forward passes; here in train mode, without gradients, averaged over all of them); on leaving,
    the layers' own statistics, momentum and the model's mode are restored, even after an error."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in layers]
    training = model.training
    try:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the calibration batches
        model.train()
        with torch.no_grad():
            feed()
        yield
    finally:
        for m, (momentum, mean, var, count) in zip(layers, saved):
            m.momentum = momentum
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)
        model.train(training)
