"""Fixtures over the case tables in ``tests/zoo.py``; each test gets a case, not code."""

from __future__ import annotations

import pytest

from tests.zoo import MODELS, ModelCase


@pytest.fixture(params=MODELS, ids=lambda m: m.name)
def model_case(request) -> ModelCase:
    return request.param


@pytest.fixture(params=["auto", "reverse_over_reverse"])
def method(request) -> str:
    return request.param
