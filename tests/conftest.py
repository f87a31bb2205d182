"""Test-session settings: under pytest-xdist each worker computes with one thread (the workers share the
machine's cores; more threads than cores makes OpenMP spin), and so do the processes the tests start."""

from __future__ import annotations

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
