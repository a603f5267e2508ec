"""VAE decode speed: diffusers' plain decode against the fixed-shape per-frame step with its options
(arcopo_fast.model.vae.WanVAE memory_format / compile), all in the same run.

    pytest benchmarks/bench_decode.py -s --benchmark-json out.json

GPU: an 81-frame 480x832 video's latents (1 x 21 x 16 x 60 x 104), Wan2.1's AutoencoderKLWan architecture
with random weights, bf16. Variants: plain (diffusers' loop), step (the per-frame step, eager, contiguous:
the restructuring alone), channels_last_3d, compile (inductor, default mode), both (channels_last_3d +
compile). Modes: whole (WanVAE.decode) and stream (7 chunks of 3 latent frames through one StreamDecoder,
as the pipeline decodes while generating). CPU: the tiny VAE architecture at 1 x 3 x 16 x 4 x 4 (plain and
channels_last_3d only), so that `pytest benchmarks/` passes quickly.

extra_info: ms (median of synchronised calls; each takes seconds, so launch overhead is noise), fps (video
frames per second), tflops (FLOPs counted once by torch.utils.flop_counter on the plain decode: convs,
attention, linears), first_call_s (includes torch.compile's compile for the compiled variants), peak_gib,
max_diff / mean_diff (|frames - plain frames| in [0, 1] units), cudnn_benchmark (torch.backends.cudnn.benchmark).
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
from bench_helpers import requires_cuda, tflops

from arcopo_fast.model.vae import WanVAE

VARIANTS = {  # name -> (memory_format, compile); "step" is the eager contiguous step
    "plain": ("contiguous", False),
    "step": ("contiguous", False),
    "channels_last_3d": ("channels_last_3d", False),
    "compile": ("contiguous", True),
    "both": ("channels_last_3d", True),
}
SHAPES = {  # name -> (latent frames, latent h, latent w, chunk frames, device, dtype)
    "480p": (21, 60, 104, 3, "cuda", torch.bfloat16),
    "tiny": (3, 4, 4, 1, "cpu", torch.float32),
}


def _module(shape: str):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    if shape == "tiny":
        from arcopo_fast.model.tiny_assets import _VAE_ARCH

        return AutoencoderKLWan(**_VAE_ARCH)
    return AutoencoderKLWan()  # Wan2.1's VAE architecture


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class _Case:
    """Latents, the plain decode's frames and FLOPs, and one WanVAE per variant (built once, so a compiled
    variant compiles once for both modes)."""

    def __init__(self, shape: str):
        F, h, w, self.chunk, dev, self.dtype = SHAPES[shape]
        self.shape, self.device = shape, torch.device(dev)
        self.latents = torch.randn(1, F, 16, h, w, generator=torch.Generator().manual_seed(1)).to(self.device)
        self.frames = 4 * (F - 1) + 1
        self.vaes: dict[str, WanVAE] = {}
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            self.want = self.vae("plain").decode(self.latents)
        self.flops = fc.get_total_flops()

    def vae(self, variant: str) -> WanVAE:
        if variant not in self.vaes:
            fmt, comp = VARIANTS[variant]
            v = WanVAE(_module(self.shape), device=self.device, dtype=self.dtype, memory_format=fmt, compile=comp)
            if variant == "step":
                v._use_step(fmt, comp)
            self.vaes[variant] = v
        return self.vaes[variant]


_CASES: dict[str, _Case] = {}


def _case(shape: str) -> _Case:
    if shape not in _CASES:
        _CASES.clear()  # one shape's models at a time
        _CASES[shape] = _Case(shape)
    return _CASES[shape]


def _run(benchmark, shape: str, variant: str, mode: str, rounds: int):
    c = _case(shape)
    vae, z = c.vae(variant), c.latents

    def whole():
        return vae.decode(z)

    def stream():
        dec = vae.stream()
        return [dec.decode_chunk(z[:, i : i + c.chunk]) for i in range(0, z.shape[1], c.chunk)]

    fn = whole if mode == "whole" else stream
    with torch.no_grad():
        _sync(c.device)
        t0 = time.perf_counter()
        out = fn()  # compiles (compiled variants) and warms the allocator / cuDNN
        _sync(c.device)
        first = time.perf_counter() - t0
        out = out if mode == "whole" else torch.cat(out, dim=1)
        diff = (out - c.want).abs()
        max_diff, mean_diff = float(diff.max()), float(diff.mean())
        del out, diff
        if c.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(c.device)

        times = []

        def synced():  # own timing too: benchmark.stats is None under --benchmark-disable
            t = time.perf_counter()
            fn()
            _sync(c.device)
            times.append(time.perf_counter() - t)

        benchmark.pedantic(synced, rounds=rounds, iterations=1, warmup_rounds=0)
    ms = statistics.median(times) * 1e3
    benchmark.extra_info.update(
        shape=shape, variant=variant, mode=mode, frames=c.frames, ms=round(ms, 2),
        fps=round(c.frames / (ms * 1e-3), 2), tflops=round(tflops(c.flops, ms), 3),
        first_call_s=round(first, 2), max_diff=max_diff, mean_diff=mean_diff,
        peak_gib=round(torch.cuda.max_memory_allocated(c.device) / 2**30, 2) if c.device.type == "cuda" else None,
        cudnn_benchmark=torch.backends.cudnn.benchmark,
        device=torch.cuda.get_device_name(c.device) if c.device.type == "cuda" else "cpu",
    )
    # bf16: the step rounds differently from diffusers (fused casts, conv algorithms): on the tiny VAE on CPU
    # the two bf16 paths differ by 0.002 on average (0.02 at most), each 0.003 from the fp32 frames
    assert mean_diff < (0.02 if c.dtype == torch.bfloat16 else 1e-6), (variant, mode, max_diff, mean_diff)


@requires_cuda
@pytest.mark.parametrize("mode", ["whole", "stream"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decode_480p(benchmark, variant, mode):
    _run(benchmark, "480p", variant, mode, rounds=3)


@pytest.mark.parametrize("mode", ["whole", "stream"])
@pytest.mark.parametrize("variant", ["plain", "channels_last_3d"])
def test_decode_tiny_cpu(benchmark, variant, mode):
    _run(benchmark, "tiny", variant, mode, rounds=3)
