"""Shared test set-up."""

import os

import pytest
import torch

import mmlm

# `pytest -n 2` runs two workers on a 2-core machine: one torch thread each, or their thread pools
# oversubscribe the cores and spin (a training step measured ~6x slower that way).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(params=["fast", "reference"])
def kernel_mode(request):
    """Runs a test twice: on the fast kernels and on the plain reference formulas (mmlm.reference_mode). Parity
    test modules use it for every test (`pytestmark = pytest.mark.usefixtures("kernel_mode")`), so both paths are
    held to the reference implementation."""
    with mmlm.reference_mode(request.param == "reference"):
        yield request.param
