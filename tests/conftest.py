"""Fixtures shared by the tests."""

from __future__ import annotations

import pytest
from model_helpers import make_tiny_model

from arcopo_fast.model.wan import CausalWanModel


@pytest.fixture
def tiny_model() -> CausalWanModel:
    return make_tiny_model()
