"""AR-CoPO neighbour distances + log-softmax: the Triton kernels (kernels/neighbour.py) against the torch
path (reference.neighbour_logprobs_torch) and its torch.compile'd version, at the paper's group shape:
A = 4 anchors, G = 12 candidates, N = 299,520 elements a sample (one chunk latent), bfloat16.

    python -m pytest benchmarks/bench_neighbour.py -s      (GPU cases skip on CPU; one tiny CPU case runs)

Per case, printed and stored in pytest-benchmark's extra_info:
  us    device time, median of triton.testing.do_bench (CUDA events, L2 flushed before every call)
  GB/s  bytes READ / us:  forward  (A + G) * N * itemsize
                          backward (A + G) * N * itemsize  (+ A * N * itemsize written, reported apart)
                          fwd+bwd  the sum of both
  copy  a same-bytes copy_ measured in the same run: its GB/s counts read + written bytes (the card's copy
        bandwidth, ~3.0 TB/s on an H100 for large buffers); the target is >= 80% of it.
pytest-benchmark's own table is host wall time of one call followed by torch.cuda.synchronize().
"""

from __future__ import annotations

import functools

import pytest
import torch
from arcopo_fast.kernels import reference as ref
from bench_helpers import record, requires_cuda

from arcopo_fast import ops

A, G, SAMPLE = 4, 12, (3, 16, 60, 104)
TAU = 0.01


def _report(benchmark, name: str, fn, bytes_read: int, **extra) -> float:
    """bench_helpers.record with GB/s counting the bytes READ (see the module docstring); returns us."""
    us = record(benchmark, fn, cuda=True, nbytes=bytes_read, rounds=50, rep_ms=200, bytes_read=bytes_read,
                device=torch.cuda.get_device_name(), **extra) * 1e3
    benchmark.extra_info["device_us"] = round(us, 2)
    print(f"\n[neighbour] {name:<22} {us:9.2f} us  {benchmark.extra_info['gbps']:8.1f} GB/s read  {extra or ''}")
    return us


def _inputs(device="cuda", dtype=torch.bfloat16, sample=SAMPLE):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(1, *sample, generator=gen)
    t = (base + 0.1 * torch.randn(A, *sample, generator=gen)).to(device=device, dtype=dtype)
    c = (base + 0.1 * torch.randn(G, *sample, generator=gen)).to(device=device, dtype=dtype)
    w_d = torch.randn(A, G, generator=gen).to(device)
    w_l = torch.randn(A, G, generator=gen).to(device)
    return t, c, w_d, w_l


@functools.cache
def _compiled_torch_path():
    return torch.compile(ref.neighbour_logprobs_torch)


def _fwd_bwd(fn, t, c, w_d, w_l):
    def run():
        d, logp = fn(t, c, TAU)
        (g,) = torch.autograd.grad((d * w_d).sum() + (logp * w_l).sum(), t)
        return g

    return run


IMPLS = [
    "triton_fwd",
    "torch_fwd",
    "compiled_fwd",
    "triton_bwd_kernel",
    "triton_fwd_bwd",
    "torch_fwd_bwd",
    "copy_same_bytes",
]


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
def test_neighbour_gpu(benchmark, impl):
    t, c, w_d, w_l = _inputs()
    es = t.element_size()
    N = t[0].numel()
    read = (A + G) * N * es
    extra = {}
    triton_op = lambda x, y, tau: ops.neighbour_logprobs(x, y, tau, backend="triton")
    torch_op = lambda x, y, tau: ops.neighbour_logprobs(x, y, tau, backend="torch")
    if impl == "triton_fwd":
        fn = lambda: triton_op(t, c, TAU)
        d, logp = fn()
        d_ref, logp_ref = torch_op(t, c, TAU)
        torch.testing.assert_close(logp, logp_ref, rtol=1e-4, atol=1e-4)  # sanity: same numbers
    elif impl == "torch_fwd":
        fn = lambda: torch_op(t, c, TAU)
    elif impl == "compiled_fwd":
        f = _compiled_torch_path()
        fn = lambda: f(t, c, TAU)
    elif impl == "triton_bwd_kernel":
        from arcopo_fast.kernels import neighbour as nb

        t2, c2 = t.reshape(A, N), c.reshape(G, N)
        _, logp = triton_op(t, c, TAU)
        gd, gl = w_d.contiguous(), w_l.contiguous()
        fn = lambda: nb._backward(t2, c2, logp, gd, gl, None, 0, TAU)
        extra["bytes_written"] = A * N * es
    else:
        t.requires_grad_()
        if impl == "triton_fwd_bwd":
            fn = _fwd_bwd(triton_op, t, c, w_d, w_l)
            read *= 2
            extra["bytes_written"] = A * N * es
        elif impl == "torch_fwd_bwd":
            fn = _fwd_bwd(torch_op, t, c, w_d, w_l)
            read *= 2
            extra["bytes_written"] = A * N * es
        else:  # copy_ of the forward's bytes: GB/s below counts its read + written bytes
            src = torch.empty(read // 2, dtype=torch.uint8, device="cuda")
            dst = torch.empty_like(src)
            fn = lambda: dst.copy_(src)
            extra["note"] = "GB/s = (read + written) bytes of a copy_ / time"
    fn()
    torch.cuda.synchronize()
    _report(benchmark, impl, fn, read, **extra)


def test_neighbour_cpu_tiny(benchmark):
    t, c, w_d, w_l = _inputs(device="cpu", dtype=torch.float32, sample=(3, 4, 6, 8))
    t.requires_grad_()
    g = benchmark(
        _fwd_bwd(lambda x, y, tau: ops.neighbour_logprobs(x, y, tau, backend="torch"), t, c, w_d, w_l)
    )
    assert g.shape == t.shape and torch.isfinite(g).all()
    benchmark.extra_info.update(impl="torch fwd+bwd (cpu)", bytes_read=2 * (A + G) * t[0].numel() * 4)
