"""Fixtures over the case tables in ``tests/zoo.py``; each test gets a case, not code."""

from __future__ import annotations

import pytest
import torch

from tests.zoo import MODELS, ModelCase

# The test problems are tiny (D <= 70): intra-op threads only add synchronisation, and on a busy
# 2-core machine OpenMP barriers made one 64 x 64 Hessian take 0.01 s or 12 s at random.
torch.set_num_threads(1)


@pytest.fixture(params=MODELS, ids=lambda m: m.name)
def model_case(request) -> ModelCase:
    return request.param


@pytest.fixture(params=["auto", "reverse_over_reverse"])
def method(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def cluster():
    """A real ``distributed.LocalCluster`` of two worker processes, shared by a module's tests."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cl:
        yield cl


@pytest.fixture
def float64_default():
    """Run a test with float64 as torch's default dtype; the old default is restored afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
