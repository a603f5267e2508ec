"""Shared helpers of benchmarks/ (pytest-benchmark). Run: `pytest benchmarks/ [--benchmark-json=out.json]`.

Benchmark files are named bench_<op>.py; the hook below collects them (pytest's default pattern is test_*.py).
Helpers: import them with `from bench_helpers import ...`. This module registers itself under that name
too, because the name `conftest` is ambiguous when tests/ and benchmarks/ are collected in one session
(pytest imports both rootless conftest.py files as the module `conftest`; the last one wins).
  requires_cuda                          skipif marker for GPU cases, with the reason
  attention_flops(...)                   explicit FLOP formula (forward, backward = 2.5x forward)
  tflops(flops, ms), gbps(nbytes, ms)    rates
  cuda_time_ms(fn)                       median ms of fn on the GPU (triton's do_bench, CUDA events otherwise)
  record(benchmark, fn, ...)             time fn, store ms / TFLOP/s / GB/s in extra_info, and let
                                         pytest-benchmark time it too (synchronised calls)
"""

from __future__ import annotations

import fnmatch
import sys

import pytest
import torch

from arcopo_fast.timing import median_ms

sys.modules["bench_helpers"] = sys.modules[__name__]

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: needs CUDA")


def pytest_collect_file(file_path, parent):
    """Collect bench_*.py here unless python_files already matches them."""
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    if any(fnmatch.fnmatch(file_path.name, pat) for pat in parent.config.getini("python_files")):
        return None
    return pytest.Module.from_parent(parent, path=file_path)


def attention_flops(batch: int, heads: int, q_len: int, k_len: int, head_dim: int, *, mode: str = "fwd",
                    pairs: int | None = None) -> float:
    """4 * B * H * (query, key) pairs * D for the forward (QK^T and PV, 2 FLOP per multiply-add).
    `pairs` overrides Lq * Lk for masked attention (count only visible pairs). The backward counts 2.5x the
    forward (5 matmuls instead of 2), "fwd_bwd" 3.5x: flash-attention's and Triton's convention."""
    fwd = 4.0 * batch * heads * (q_len * k_len if pairs is None else pairs) * head_dim
    return fwd * {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}[mode]


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def cuda_time_ms(fn, *, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median milliseconds of fn() on the current GPU, after warm-up (compile and autotune happen there).
    The project's one timer (arcopo_fast.timing.median_ms: triton's do_bench as docs/performance.md's
    baselines, CUDA events without triton), shared with the backend choice and the doctor."""
    return median_ms(fn, torch.device("cuda", torch.cuda.current_device()), warmup_ms=warmup_ms, rep_ms=rep_ms)


def record(benchmark, fn, *, cuda: bool, flops: float | None = None, nbytes: float | None = None,
           rounds: int = 10, rep_ms: float = 100, **info) -> float | None:
    """Benchmark fn. cuda=True: extra_info gets the do_bench median (ms) and rates from the explicit
    formulas; pytest-benchmark's own table times synchronised calls (includes launch overhead); returns the
    median ms. cuda=False: plain calls, rates from pytest-benchmark's median; returns None."""
    benchmark.extra_info.update(info)
    if cuda:
        ms = cuda_time_ms(fn, rep_ms=rep_ms)
        benchmark.extra_info["ms"] = round(ms, 4)
        if flops is not None:
            benchmark.extra_info["tflops"] = round(tflops(flops, ms), 1)
        if nbytes is not None:
            benchmark.extra_info["gbps"] = round(gbps(nbytes, ms), 1)

        def synced():
            fn()
            torch.cuda.synchronize()

        benchmark.pedantic(synced, rounds=rounds, iterations=1, warmup_rounds=1)
        return ms
    else:
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
        if flops is not None and getattr(benchmark, "stats", None) is not None:
            benchmark.extra_info["tflops"] = round(tflops(flops, benchmark.stats.stats.median * 1e3), 6)
