"""The one timer of the project: benchmarks/ (bench_helpers.cuda_time_ms), the measured backend choice and
`python -m arcopo_fast.doctor --bench` all time through `median_ms`.

CUDA: triton.testing.do_bench's median (L2 flushed before every call, warm-up first: compilation and
autotuning happen there); CUDA events when triton is missing. CPU: wall-clock median of synchronous calls.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_ms(fn: Callable[[], object], device: torch.device | str = "cuda", *, warmup_ms: float = 25,
              rep_ms: float = 100) -> float:
    """Median milliseconds of one fn() on `device`, after warm-up."""
    device = torch.device(device)
    if device.type != "cuda":
        return _cpu_median_ms(fn, warmup_ms, rep_ms)
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    with torch.cuda.device(device):
        if do_bench is not None:
            return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
        return _events_median_ms(fn)


def _events_median_ms(fn) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _cpu_median_ms(fn, warmup_ms: float, rep_ms: float) -> float:
    t0 = time.perf_counter()
    fn()
    first = (time.perf_counter() - t0) * 1e3
    n_warm = max(0, min(10, int(warmup_ms / max(first, 1e-3)) - 1))
    for _ in range(n_warm):
        fn()
    times = []
    deadline = time.perf_counter() + rep_ms * 1e-3
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 100):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)
