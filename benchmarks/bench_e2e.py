"""Streaming generation end to end: DiT FPS, first-chunk latency, decode, peak memory, with our kernels
against our plain torch path (SDPA + eager step) in the same run.

    pytest benchmarks/bench_e2e.py -s --benchmark-json out.json

GPU: Self-Forcing's shape (1.3B, bf16, 81 frames 480x832, 34 DiT forwards). CPU: the tiny preset.
extra_info: dit_s (all chunks, DiT only), fps_dit = frames / dit_s, first_chunk_s, e2e_s (generation with
chunk-by-chunk VAE decode overlapped on a side stream), fps_e2e, decode_s (whole-video decode alone),
peak_gib. Timed after one warm-up video (compilation and autotuning happen there, reported as warmup_s).
"""

from __future__ import annotations

import time

import pytest
import torch
from e2e_common import backend, cross_for, make_setup, peak_gib, streaming_pipeline, sync

from arcopo_fast.sampler import latent_frames_to_video_frames

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: needs CUDA")
CASES = [
    # (shape, ops backend, StreamingSampler compile mode): our kernels eager, our kernels inside a compiled
    # per-step forward replayed as CUDA graphs, and the plain torch path, in one run
    pytest.param("1.3b", "triton", None, marks=GPU),
    pytest.param("1.3b", "triton", "reduce-overhead", marks=GPU),
    pytest.param("1.3b", "torch", None, marks=GPU),
    pytest.param("tiny", "torch", None),
]


def _video(s, cross):
    out = []
    sync(s.device)
    t0 = time.perf_counter()
    first = None
    for _, x0 in s.sampler.stream(cross, num_chunks=s.num_chunks, latent_hw=s.latent_hw):
        out.append(x0)
        if first is None:
            sync(s.device)
            first = time.perf_counter() - t0
    sync(s.device)
    return torch.cat(out, 1), time.perf_counter() - t0, first


@pytest.mark.parametrize("shape,be,compile", CASES)
def test_streaming_generation(benchmark, shape, be, compile):
    s = make_setup(shape, compile=compile)
    cross = cross_for(s)
    frames = latent_frames_to_video_frames(s.num_chunks * s.model.cfg.chunk_frames)
    with backend(be), torch.no_grad():
        t0 = time.perf_counter()
        _video(s, cross)  # warm-up: Triton compilation / autotuning, allocator
        warm = time.perf_counter() - t0
        if s.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        lat, dit_s, first = _video(s, cross)
        # whole-video decode alone
        sync(s.device)
        t1 = time.perf_counter()
        s.vae.decode(lat)
        sync(s.device)
        decode_s = time.perf_counter() - t1
        # generation with streaming decode overlapped (what `python -m arcopo_fast.sample` does)
        gen = streaming_pipeline(s, cross)
        sync(s.device)
        t2 = time.perf_counter()
        chunks = list(gen.stream_video(["x"], num_chunks=s.num_chunks, latent_hw=s.latent_hw))
        sync(s.device)
        e2e_s = time.perf_counter() - t2
        assert sum(c.shape[1] for c in chunks) == frames
        benchmark.extra_info.update(
            shape=shape, backend=be, compile=compile or "eager", frames=frames, warmup_s=round(warm, 3), dit_s=round(dit_s, 4),
            fps_dit=round(frames / dit_s, 2), first_chunk_s=round(first, 4), decode_s=round(decode_s, 4),
            e2e_s=round(e2e_s, 4), fps_e2e=round(frames / e2e_s, 2), peak_gib=round(peak_gib(s.device), 2),
            device=torch.cuda.get_device_name() if s.device.type == "cuda" else "cpu",
        )
        print(f"\n[e2e] {shape} {be} {compile or 'eager'}: DiT {dit_s:.3f} s ({frames / dit_s:.1f} FPS), first chunk {first:.3f} s, "
              f"decode {decode_s:.3f} s, end to end {e2e_s:.3f} s ({frames / e2e_s:.1f} FPS), peak {peak_gib(s.device):.1f} GiB")
        benchmark.pedantic(lambda: _video(s, cross), rounds=1, iterations=1)
