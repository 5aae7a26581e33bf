"""Shared test set-up."""

import os

import torch

# `pytest -n 2` runs two workers on a 2-core machine: one torch thread each, or their thread pools
# oversubscribe the cores and spin (a training step measured ~6x slower that way).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
