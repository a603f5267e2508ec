"""Fixtures shared by the tests."""

from __future__ import annotations

import triton_env  # noqa: F401  (first: TRITON_INTERPRET must be set before anything imports triton)

import pytest  # noqa: E402
import torch
from model_helpers import make_tiny_model

from arcopo_fast.model.wan import CausalWanModel


@pytest.fixture
def tiny_model() -> CausalWanModel:
    return make_tiny_model()


@pytest.fixture
def poison(monkeypatch):
    """NaN-fill (float) / -7-fill (int) every tensor allocated with torch.empty/empty_like during the test,
    so an element a kernel forgets to write fails the comparison."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def _fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-7)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: _fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _fill(real_empty_like(*a, **k)))


@pytest.fixture(scope="session")
def tiny_assets():
    """The embedded tiny text encoder and VAE in the default cache (~/.cache/arcopo_fast): built once per
    machine (about 20-80 s on a fresh HOME), shared with every other user of the default assets."""
    from arcopo_fast.model.tiny_assets import ensure_tiny_assets

    return ensure_tiny_assets()


@pytest.fixture(scope="session")
def wan_pipe(tmp_path_factory):
    """A diffusers WanPipeline of tiny random components (pipeline_helpers.py), built once per session."""
    pytest.importorskip("diffusers")
    from pipeline_helpers import tiny_wan_pipeline

    return tiny_wan_pipeline(tmp_path_factory.mktemp("wan_pipe"))
