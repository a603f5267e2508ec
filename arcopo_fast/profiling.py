"""nvtx ranges and the torch profiler, for `--profile` runs and Nsight timelines.

`nvtx_range(name)` marks a region on the CUDA timeline (torch.cuda.nvtx when CUDA is present, else the
`nvtx` package when installed, else nothing). Ranges cost a few microseconds of host time and no device sync.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch


@functools.cache
def _backend():
    if torch.cuda.is_available():
        return "torch"
    try:
        import nvtx  # noqa: F401
    except ImportError:
        return None
    return "nvtx"


@contextlib.contextmanager
def nvtx_range(name: str):
    be = _backend()
    if be == "torch":
        torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            torch.cuda.nvtx.range_pop()
    elif be == "nvtx":
        import nvtx

        with nvtx.annotate(name, domain="arcopo_fast"):
            yield
    else:
        yield


@contextlib.contextmanager
def maybe_profile(out_dir: str | Path | None, *, name: str = "trace"):
    """With out_dir, record a torch profiler trace (CPU + CUDA activities, shapes, memory) and write
    <out_dir>/<name>.json (open in chrome://tracing or Perfetto) plus a key-averages table."""
    if out_dir is None:
        yield None
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts, record_shapes=True, profile_memory=True) as prof:
        yield prof
    prof.export_chrome_trace(str(out / f"{name}.json"))
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    (out / f"{name}_top.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=40))
