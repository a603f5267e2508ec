"""Tiny random models built with the real classes (no weights can be downloaded), shared by the tests.
(Not in conftest.py: tests/ and benchmarks/ both have one, and `from conftest import` would be ambiguous.)"""

from __future__ import annotations

import torch

from arcopo_fast.model.config import get_preset
from arcopo_fast.model.wan import CausalWanModel


def make_tiny_model(seed: int = 0, dtype=torch.float32, **overrides) -> CausalWanModel:
    torch.manual_seed(seed)
    cfg = get_preset("tiny").replace(**overrides) if overrides else get_preset("tiny")
    model = CausalWanModel(cfg).to(dtype)
    # Randomise the parameters Wan initialises to constants, so that no code path is trivially exact.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm_q.weight", "norm_k.weight", "norm3.weight")):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.02)
    return model.eval()
