"""Shared set-up of the end-to-end benchmarks: random-weight models at the real shapes, backends, timers.

Shapes: "1.3b" = Self-Forcing (causal Wan2.1-T2V-1.3B, bf16, 7 chunks of 3 latent frames at 60x104 =
81 frames of 480x832, diffusers AutoencoderKLWan with Wan2.1's default architecture); "tiny" = the tiny
preset on CPU (every code path, seconds).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

import torch

from arcopo_fast.model.config import get_preset
from arcopo_fast.model.wan import CausalWanModel
from arcopo_fast.sampler import FewStepSchedule, StreamingSampler


@dataclass
class Setup:
    model: CausalWanModel
    sampler: StreamingSampler
    vae: object
    text_dim: int
    num_chunks: int
    latent_hw: tuple[int, int]
    device: torch.device
    dtype: torch.dtype


def make_setup(
    shape: str, *, num_chunks: int | None = None, with_vae: bool = True, seed: int = 0, compile: str | None = None
) -> Setup:
    """compile: StreamingSampler(compile=...) mode of the per-step forward (None: eager)."""
    from arcopo_fast.model.vae import WanVAE

    if shape == "1.3b":
        dev, dt, preset, hw, L = torch.device("cuda"), torch.bfloat16, "wan-1.3b", (60, 104), 7
    else:
        dev, dt, preset, hw, L = torch.device("cpu"), torch.float32, "tiny", (8, 8), 3
    torch.manual_seed(seed)
    with dev:
        model = CausalWanModel(get_preset(preset)).to(dt).eval().requires_grad_(False)
        # a random model with Wan's zero head predicts zero flow; make every layer do real work
        torch.nn.init.normal_(model.head.head.weight, std=0.02)
    vae = None
    if with_vae:
        if shape == "1.3b":
            from diffusers import AutoencoderKLWan

            vae = WanVAE(AutoencoderKLWan(), device=dev, dtype=dt)  # Wan2.1's VAE architecture, random weights
        else:
            from arcopo_fast.model.tiny_assets import ensure_tiny_assets

            vae = WanVAE(ensure_tiny_assets()["vae"], device=dev, dtype=dt)
    sampler = StreamingSampler(model, FewStepSchedule(), seed=seed, compile=compile)
    return Setup(model, sampler, vae, model.cfg.text_dim, num_chunks or L, hw, dev, dt)


def cross_for(s: Setup, batch: int = 1):
    g = torch.Generator(device="cpu").manual_seed(1)
    ctx = torch.randn(batch, s.model.cfg.text_len, s.text_dim, generator=g).to(s.device, s.dtype)
    with torch.no_grad():
        return s.model.encode_text(ctx)


def streaming_pipeline(s: Setup, cross):
    """The StreamingPipeline of a setup (what `python -m arcopo_fast.sample` streams through): its sampler
    (compiled and warm when the setup's is) and VAE, with no text encoder (every prompt gets `cross`)."""
    from arcopo_fast.pipeline import StreamingPipeline

    pipe = StreamingPipeline(s.model, None, s.vae)
    pipe.sampler = s.sampler
    pipe.cross = lambda prompts: cross
    return pipe


@contextlib.contextmanager
def backend(name: str):
    """Run ops with one backend ('torch' = the plain SDPA/eager path, 'triton' = our kernels)."""
    old = os.environ.get("ARCOPO_BACKEND")
    os.environ["ARCOPO_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("ARCOPO_BACKEND", None)
        else:
            os.environ["ARCOPO_BACKEND"] = old


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Wall-clock phases with a device sync at each boundary (benchmarks only)."""

    def __init__(self, device):
        self.device = device
        self.t = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        sync(self.device)
        t0 = time.perf_counter()
        yield
        sync(self.device)
        self.t[name] = self.t.get(name, 0.0) + time.perf_counter() - t0


def peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
