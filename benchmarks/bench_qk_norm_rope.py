"""Fused q/k RMSNorm + 3D RoPE (kernels/qk_norm_rope.py) against the model's torch path (RMSNorm modules +
apply_rope, = ops' torch backend) and its torch.compile'd version, at the self-attention shape of one
Self-Forcing chunk: L = 4680 tokens (3 latent frames x 30 x 52 patches), dim 1536 = 12 heads x 128, bf16.

    python -m pytest benchmarks/bench_qk_norm_rope.py -s     (GPU cases skip on CPU; one tiny CPU case runs)

Per case, printed and stored in pytest-benchmark's extra_info:
  ms    device time, median of triton.testing.do_bench
  GB/s  bytes / time with bytes = 2 * B * L * dim * itemsize (read the q and k projections)
        + 2 * B * L * dim * itemsize (write rotated q and k) + 2 * dim * itemsize (weights)
        + 2 * L * head_dim / 2 * 4 (cos, sin tables): the fused kernel's minimum traffic, used for every
        implementation (an effective bandwidth: the torch path moves several times more).
  copy_same_bytes: a device copy of the same byte count, measured in the same run (the roofline).
"""

from __future__ import annotations

import functools
import time

import pytest
import torch
from bench_helpers import record, requires_cuda

from arcopo_fast import ops
from arcopo_fast.kernels import reference as ref

L_CHUNK, DIM, HEADS, EPS = 4680, 1536, 12, 1e-6


def _setup(B: int, L: int = L_CHUNK, dim: int = DIM, heads: int = HEADS, device="cuda", dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(B)
    D = dim // heads
    q = torch.randn(B, L, dim, generator=g).to(device, dtype)
    k = torch.randn(B, L, dim, generator=g).to(device, dtype)
    wq = (torch.rand(dim, generator=g) + 0.5).to(device, dtype)
    wk = (torch.rand(dim, generator=g) + 0.5).to(device, dtype)
    ang = torch.rand(L, D // 2, generator=g, dtype=torch.float64) * 100
    cos, sin = ang.cos().float().to(device), ang.sin().float().to(device)
    item = q.element_size()
    nbytes = 4 * B * L * dim * item + 2 * dim * item + 2 * cos.numel() * 4
    return (q, k, wq, wk, cos, sin, heads, EPS), nbytes


@functools.cache
def _compiled_torch_path():
    return torch.compile(ref.qk_norm_rope_torch)


IMPLS = ["triton", "torch", "torch_compile", "copy_same_bytes"]


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B", [1, 12])
def test_qk_norm_rope_gpu(benchmark, B, impl):
    args, nbytes = _setup(B)
    extra = {
        "B": B,
        "L": L_CHUNK,
        "dim": DIM,
        "impl": impl,
        "dtype": "bf16",
        "bytes": nbytes,
        "device": torch.cuda.get_device_name(),
    }
    if impl == "triton":
        fn = functools.partial(ops.qk_norm_rope, *args, backend="triton")
    elif impl == "torch":
        fn = functools.partial(ops.qk_norm_rope, *args, backend="torch")
    elif impl == "torch_compile":
        f = _compiled_torch_path()
        t0 = time.perf_counter()
        f(*args)
        torch.cuda.synchronize()
        extra["first_call_s"] = round(time.perf_counter() - t0, 2)  # compile time, kept off the clock
        fn = functools.partial(f, *args)
    else:
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        fn = functools.partial(dst.copy_, src)
    with torch.no_grad():
        fn()
        torch.cuda.synchronize()
        record(benchmark, fn, cuda=True, nbytes=nbytes, **extra)
    info = benchmark.extra_info
    print(f"\n[qk_norm_rope] B={B:<3} {impl:<16} {info['ms']:8.4f} ms  {info['gbps']:8.1f} GB/s")


def test_qk_norm_rope_cpu_tiny(benchmark):
    """The torch path on a tiny shape (keeps `pytest benchmarks/` meaningful without a GPU)."""
    args, nbytes = _setup(1, L=45, dim=64, heads=2, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        out = benchmark(functools.partial(ops.qk_norm_rope, *args, backend="torch"))
    assert out[0].shape == (1, 45, 2, 32) and torch.isfinite(out[0]).all()
    benchmark.extra_info.update(bytes=nbytes, impl="torch (cpu)")
