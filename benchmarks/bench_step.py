"""Few-step consistency step: the fused Triton kernel (in-kernel Philox noise) against Self-Forcing's eager
update and its torch.compile'd version, at the chunk shape [B, 3, 16, 60, 104] (299,520 elements a sample).

    python -m pytest benchmarks/bench_step.py -s            (GPU cases skip on CPU; one tiny CPU case runs)

Per case, printed and stored in pytest-benchmark's extra_info:
  us    device time, median of triton.testing.do_bench (CUDA events, L2 flushed before every call)
  GB/s  bytes / us with bytes = numel * (x.itemsize + flow.itemsize + 4 + 4): read x and flow, write x0 and
        x_next in float32 (our kernel's contract). The same byte count is used for every implementation, so
        GB/s is an effective bandwidth (the eager baseline writes bf16 but moves more through float64).
  floor bytes / 3.0 TB/s (the card's copy bandwidth, docs/performance.md), and a same-bytes copy_ measured
        in the same run.
pytest-benchmark's own table is host wall time of one call followed by torch.cuda.synchronize() (launch
overhead + device time + sync): the latency a Python caller sees.
"""

from __future__ import annotations

import functools
import time

import pytest
import torch
from bench_helpers import record, requires_cuda

from arcopo_fast import ops
from arcopo_fast.noise import NoiseKind, NoisePlan

CHUNK = (3, 16, 60, 104)  # [F, C, H, W] of one Self-Forcing chunk latent
COPY_BW = 3.0e12  # bytes/s, read + write, H100 (docs/performance.md): for the printed floor only


def _report(benchmark, name: str, fn, nbytes: int, **extra) -> float:
    """bench_helpers.record (do_bench median, GB/s of nbytes read + written) plus the step's microseconds and
    the copy-bandwidth floor; returns microseconds."""
    floor_us = nbytes / COPY_BW * 1e6
    us = record(benchmark, fn, cuda=True, nbytes=nbytes, rounds=50, rep_ms=200, bytes=nbytes,
                floor_us=round(floor_us, 2), device=torch.cuda.get_device_name(), **extra) * 1e3
    benchmark.extra_info["device_us"] = round(us, 2)
    print(f"\n[step] {name:<28} {us:9.2f} us  {benchmark.extra_info['gbps']:8.1f} GB/s  (floor {floor_us:.2f} us) "
          f"{extra or ''}")
    return us


# ---------------------------------------------------------------------------------------------------------
# Inputs and the baselines
# ---------------------------------------------------------------------------------------------------------


def _sf_tables(device):
    """Self-Forcing's scheduler tables: 1000 training timesteps with shift 5, and its 4 denoising steps."""
    s = torch.linspace(1.0, 0.0, 1001, dtype=torch.float64)[:-1]
    sig = 5.0 * s / (1.0 + 4.0 * s)
    t_table = (sig * 1000).float().to(device)
    sig_table = sig.float().to(device)
    steps = torch.tensor([1000, 750, 500, 250], device=device, dtype=torch.float32)
    idx = torch.argmin((t_table[None] - steps[:, None]).abs(), dim=1)
    return sig_table, t_table, steps, sig_table[idx].contiguous()  # the last: our 4-entry device table


def sf_step(x, flow, sig_table, t_table, t_now, t_next):
    """Self-Forcing's update as its pipeline runs it (for timing): flow -> x0 in float64 with an argmin sigma
    lookup per frame, then add_noise with torch.randn. x, flow: [B, F, C, H, W]; t_now, t_next: [B*F]."""
    B, F = x.shape[:2]
    dtype = x.dtype
    xf, ff = x.flatten(0, 1).double(), flow.flatten(0, 1).double()
    sig64, t64 = sig_table.double(), t_table.double()
    idx = torch.argmin((t64[None, :] - t_now.double()[:, None]).abs(), dim=1)
    x0 = (xf - sig64[idx].view(-1, 1, 1, 1) * ff).to(dtype)
    noise = torch.randn_like(x0)
    idx = torch.argmin((t_table[None, :] - t_next[:, None]).abs(), dim=1)
    s = sig_table[idx].view(-1, 1, 1, 1)
    x_next = ((1 - s) * x0 + s * noise).type_as(noise)
    return x0.unflatten(0, (B, F)), x_next.unflatten(0, (B, F))


@functools.cache
def _compiled_sf_step():
    return torch.compile(sf_step)


def _setup(B: int, device="cuda", dtype=torch.bfloat16, shape=CHUNK):
    gen = torch.Generator(device="cpu").manual_seed(B)
    x = torch.randn(B, *shape, generator=gen).to(device=device, dtype=dtype)
    flow = torch.randn(B, *shape, generator=gen).to(device=device, dtype=dtype)
    sig_table, t_table, steps, sigmas = _sf_tables(device)
    plan = NoisePlan(1234)
    words = plan.words(plan.key(list(range(B)), chunk=2, step=2, kind=NoiseKind.SOLVER), device=device)
    nbytes = x.numel() * (x.element_size() + flow.element_size() + 4 + 4)
    return x, flow, sig_table, t_table, steps, sigmas, words, nbytes


# ---------------------------------------------------------------------------------------------------------
# GPU cases
# ---------------------------------------------------------------------------------------------------------

IMPLS = ["triton", "triton_graph", "eager_sf", "compiled_sf", "torch_fallback", "copy_same_bytes"]


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B", [1, 12])
def test_step_gpu(benchmark, B, impl):
    x, flow, sig_table, t_table, steps, sigmas, words, nbytes = _setup(B)
    step = 1  # t = 750 -> 500
    extra = {}
    if impl == "triton":
        fn = lambda: ops.consistency_step(x, flow, sigmas, step, words, backend="triton")
    elif impl == "triton_graph":
        fn, extra = _captured_step(x, flow, sigmas, step, words)
    elif impl in ("eager_sf", "compiled_sf"):
        F = x.shape[1]
        t_now = steps[step].expand(B * F).contiguous()
        t_next = steps[step + 1].expand(B * F).contiguous()
        f = sf_step if impl == "eager_sf" else _compiled_sf_step()
        t0 = time.perf_counter()
        f(x, flow, sig_table, t_table, t_now, t_next)
        torch.cuda.synchronize()
        if impl == "compiled_sf":
            extra["first_call_s"] = round(time.perf_counter() - t0, 2)  # compile time, kept off the clock
        fn = lambda: f(x, flow, sig_table, t_table, t_now, t_next)
    elif impl == "torch_fallback":
        fn = lambda: ops.consistency_step(x, flow, sigmas, step, words, backend="torch")
    else:
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        fn = lambda: dst.copy_(src)
    fn()
    torch.cuda.synchronize()
    _report(benchmark, f"B={B} {impl}", fn, nbytes, **extra)


def _captured_step(x, flow, sigmas, step, words):
    """Capture the fused step in a CUDA graph; check a replay on new data equals a fresh launch."""
    ops.consistency_step(x, flow, sigmas, step, words, backend="triton")  # compile outside the capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.consistency_step(x, flow, sigmas, step, words, backend="triton")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.consistency_step(x, flow, sigmas, step, words, backend="triton")
    x.add_(1.0)  # replay must see the new contents of the static input
    graph.replay()
    want = ops.consistency_step(x, flow, sigmas, step, words, backend="triton")
    torch.cuda.synchronize()
    assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1]), (
        "graph replay differs from eager launch"
    )
    return graph.replay, {"captured": True}


# ---------------------------------------------------------------------------------------------------------
# CPU case (keeps `pytest benchmarks/` meaningful without a GPU): the torch path on a tiny chunk
# ---------------------------------------------------------------------------------------------------------


def test_step_cpu_tiny(benchmark):
    x, flow, *_, sigmas, words, nbytes = _setup(1, device="cpu", dtype=torch.float32, shape=(3, 4, 6, 8))
    out = benchmark(lambda: ops.consistency_step(x, flow, sigmas, 1, words, backend="torch"))
    assert out[1].shape == x.shape and torch.isfinite(out[1]).all()
    benchmark.extra_info.update(bytes=nbytes, impl="torch (cpu)")
