"""Attention benchmarks (docs/performance.md sections 1-2): ours (kernels/block_attn.py) against SDPA's flash,
cuDNN and memory-efficient backends, FlexAttention and flash-attn (when importable), all in the same run.

  test_chunk_forward          KV-cached chunk attention, inference form: H 12, D 128, Lq 4680 (3 frames x 1560),
                              Lk in {4680, 18720, 32760}, B in {1, 4, 12}. Baselines get [cache ; chunk]
                              already concatenated (their best case); ours reads the cache in place.
  test_pivot_forward_backward AR-CoPO's training form at B 4: gradients for q and the chunk's own k, v.
                              Ours skips dk/dv of the cache; baselines concatenate (timed, as a real
                              implementation must) and run SDPA's backward over the whole [cache ; chunk].
  test_block_causal           teacher forcing over 21 frames x 1560 tokens, chunk 4680: ours (and ours_tma) vs FlexAttention's
                              block mask (and dense, unmasked cuDNN as a yardstick), forward and fwd+bwd.
  test_*_cpu_tiny             tiny CPU cases so that `pytest benchmarks/` does something without a GPU.

FLOPs: 4 * B * H * Lq * Lk * D forward, backward 2.5x (conftest.attention_flops); pivot fwd+bwd counts the
dense [cache ; chunk] work for every implementation (so TFLOP/s ratios are speed ratios), block-causal counts
only the visible (query, key) pairs. extra_info holds ms (do_bench median) and tflops; pytest-benchmark's
own columns time synchronised calls. Example:
    pytest benchmarks/bench_attention.py -k "chunk_forward and B1-" --benchmark-json=attn.json
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
import torch.nn.functional as F
from bench_helpers import attention_flops, record, requires_cuda

from arcopo_fast import ops

H, D, LQ = 12, 128, 4680
FRAME_TOKENS, FRAMES, CHUNK = 1560, 21, 4680
LKS = (4680, 18720, 32760)
BATCHES = (1, 4, 12)
IMPLS = ("ours", "ours_tma", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "flex", "flash_attn")
DT = torch.bfloat16
OURS = {"ours": "triton", "ours_tma": "triton_tma"}  # ours_tma: the TMA kernels (sm_90+)


# ---------------------------------------------------------------------------------------------------------
# implementations, all on [B, L, H, D] tensors
# ---------------------------------------------------------------------------------------------------------


def _sdpa(impl: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "sdpa_flash": SDPBackend.FLASH_ATTENTION,
        "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
        "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    }[impl]

    def run(q, k, v):
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)

    return run


@functools.cache
def _flex():
    from torch.nn.attention.flex_attention import flex_attention

    # one compiled graph per shape (the cases here use about 20): raise dynamo's recompile limit, whose
    # default of 8 would silently fall back to the unfused path
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    compiled = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v, block_mask=None):
        out = compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask)
        return out.transpose(1, 2)

    return run


def _dense(impl: str):
    """Attention over a materialised key sequence, for the baselines."""
    if impl.startswith("sdpa"):
        return _sdpa(impl)
    if impl == "flex":
        return _flex()
    if impl == "flash_attn":
        if not ops.flash_attn_available():
            pytest.skip("flash_attn is not installed")
        import flash_attn

        return flash_attn.flash_attn_func
    raise ValueError(impl)


def _rand(*shape, requires_grad=False):
    return torch.randn(*shape, device="cuda", dtype=DT).requires_grad_(requires_grad)


def _try_warmup(impl, fn):
    """Run once (compiles / autotunes). A BASELINE that cannot run these shapes here skips the case; our
    kernel never does: its failure must fail the benchmark."""
    if impl in OURS:
        out = fn()
        torch.cuda.synchronize()
        return out
    try:
        out = fn()
        torch.cuda.synchronize()
        return out
    except (RuntimeError, NotImplementedError) as e:  # e.g. "No available kernel" for a forced SDPA backend
        pytest.skip(f"{impl} cannot run this case here: {str(e).splitlines()[0][:200]}")


def _sdpa_default(q, k, v):
    """SDPA's default dispatch on [B, L, H, D] tensors: the correctness check before timing ours."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _check_close(benchmark, ours, baseline, tol=3e-2):
    err = (ours.float() - baseline.float()).abs().max().item()
    key = "max_abs_diff_vs_sdpa"
    benchmark.extra_info[key] = max(err, benchmark.extra_info.get(key, 0.0))
    assert err < tol, f"ours differs from SDPA by {err}: not timing a wrong kernel"


# ---------------------------------------------------------------------------------------------------------
# 1. chunk attention forward (inference)
# ---------------------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("lk", LKS, ids=[f"Lk{n}" for n in LKS])
@pytest.mark.parametrize("batch", BATCHES, ids=[f"B{n}" for n in BATCHES])
def test_chunk_forward(benchmark, batch, lk, impl):
    torch.manual_seed(0)
    q, k, v = (_rand(batch, LQ, H, D) for _ in range(3))
    past = lk - LQ
    kc, vc = (_rand(batch, past, H, D) for _ in range(2)) if past else (None, None)
    _skip_without_tma(impl)
    if impl in OURS:
        fn = lambda: ops.chunk_attention(q, k, v, kc, vc, past, backend=OURS[impl])
    else:
        kk = torch.cat([kc, k], 1) if past else k
        vv = torch.cat([vc, v], 1) if past else v
        run = _dense(impl)
        fn = lambda: run(q, kk, vv)
    out = _try_warmup(impl, fn)
    extra = {}
    if impl in OURS:
        kk = torch.cat([kc, k], 1) if past else k
        vv = torch.cat([vc, v], 1) if past else v
        _check_close(benchmark, out, _sdpa_default(q, kk, vv))
        del kk, vv
        extra["kv_splits"] = _our_kv_splits(batch, lk)
    record(benchmark, fn, cuda=True, flops=attention_flops(batch, H, LQ, lk, D), impl=impl, B=batch, Lq=LQ,
           Lk=lk, H=H, D=D, dtype=str(DT), **extra)


def _skip_without_tma(impl: str) -> None:
    if impl == "ours_tma" and (why := ops.tma_unsupported(torch.device("cuda"))):
        pytest.skip(f"no TMA here: {why}")


def _our_kv_splits(batch: int, lk: int) -> int:
    """The split-KV factor our forward uses at this shape (1: no split; kernels/block_attn.py SPLIT_KV)."""
    from arcopo_fast.kernels import block_attn as ba

    bm, bn = ba.SPLIT_KV["block_m"], ba.SPLIT_KV["block_n"]
    key_tiles = -(-(lk - LQ) // bn) + -(-LQ // bn)
    return ba._num_splits(-(-LQ // bm), batch * H, key_tiles, ba._sm_count(torch.device("cuda")))


# ---------------------------------------------------------------------------------------------------------
# 2. pivot chunk forward + backward (training: grads for q and the chunk's own k, v)
# ---------------------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("lk", LKS, ids=[f"Lk{n}" for n in LKS])
def test_pivot_forward_backward(benchmark, lk, impl):
    batch = 4
    torch.manual_seed(0)
    q, k, v = (_rand(batch, LQ, H, D, requires_grad=True) for _ in range(3))
    do = _rand(batch, LQ, H, D)
    past = lk - LQ
    kc, vc = (_rand(batch, past, H, D) for _ in range(2)) if past else (None, None)
    _skip_without_tma(impl)
    if impl in OURS:

        def fn():
            out = ops.chunk_attention(q, k, v, kc, vc, past, backend=OURS[impl])
            return torch.autograd.grad(out, (q, k, v), do)

    else:
        run = _dense(impl)

        def fn():
            kk = torch.cat([kc, k], 1) if past else k
            vv = torch.cat([vc, v], 1) if past else v
            out = run(q, kk, vv)
            return torch.autograd.grad(out, (q, k, v), do)

    grads = _try_warmup(impl, fn)
    if impl in OURS:
        kk = torch.cat([kc, k], 1) if past else k
        vv = torch.cat([vc, v], 1) if past else v
        out = _sdpa_default(q, kk, vv)
        ref_grads = torch.autograd.grad(out, (q, k, v), do)
        for g, r in zip(grads, ref_grads):
            _check_close(benchmark, g, r, tol=5e-2)
        del kk, vv, out, ref_grads
    del grads
    record(benchmark, fn, cuda=True, flops=attention_flops(batch, H, LQ, lk, D, mode="fwd_bwd"), impl=impl, B=batch,
           Lq=LQ, Lk=lk, H=H, D=D, dtype=str(DT), flops_note="dense [cache ; chunk] fwd + 2.5x bwd for every impl")


# ---------------------------------------------------------------------------------------------------------
# 3. full-sequence block-causal (teacher forcing)
# ---------------------------------------------------------------------------------------------------------


def block_causal_pairs(length: int, chunk: int) -> int:
    """Visible (query, key) pairs: query i sees min((i // chunk + 1) * chunk, length) keys."""
    return sum(min(c + chunk, length) * (min(c + chunk, length) - c) for c in range(0, length, chunk))


@requires_cuda
@pytest.mark.parametrize("impl", ("ours", "ours_tma", "flex", "sdpa_cudnn_dense"))
@pytest.mark.parametrize("mode", ("fwd", "fwd_bwd"))
def test_block_causal(benchmark, mode, impl):
    _skip_without_tma(impl)
    batch, length = 1, FRAMES * FRAME_TOKENS
    torch.manual_seed(0)
    grad = mode == "fwd_bwd"
    q, k, v = (_rand(batch, length, H, D, requires_grad=grad) for _ in range(3))
    do = _rand(batch, length, H, D)
    if impl in OURS:
        attn = lambda: ops.block_causal_attention(q, k, v, CHUNK, backend=OURS[impl])
        pairs = block_causal_pairs(length, CHUNK)
    elif impl == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, qi, ki):
            return ki < (qi // CHUNK + 1) * CHUNK

        block_mask = create_block_mask(mask_mod, None, None, length, length, device="cuda")
        run = _flex()
        attn = lambda: run(q, k, v, block_mask)
        pairs = block_causal_pairs(length, CHUNK)
    else:  # yardstick: the dense, unmasked attention a plain implementation would pay for
        run = _sdpa("sdpa_cudnn")
        attn = lambda: run(q, k, v)
        pairs = length * length

    def fn():
        out = attn()
        return torch.autograd.grad(out, (q, k, v), do) if grad else out

    _try_warmup(impl, fn)
    if impl == "ours" and not grad:
        # the first chunk sees only itself and the last chunk sees everything: unmasked SDPA checks both
        out = fn()
        last = (length - 1) // CHUNK * CHUNK
        _check_close(benchmark, out[:, :CHUNK], _sdpa_default(q[:, :CHUNK], k[:, :CHUNK], v[:, :CHUNK]))
        _check_close(benchmark, out[:, last:], _sdpa_default(q[:, last:], k, v))
        del out
    record(benchmark, fn, cuda=True, flops=attention_flops(batch, H, length, length, D, mode=mode, pairs=pairs),
           impl=impl, B=batch, L=length, chunk_tokens=CHUNK, H=H, D=D, dtype=str(DT), mode=mode)


# ---------------------------------------------------------------------------------------------------------
# tiny CPU cases
# ---------------------------------------------------------------------------------------------------------

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@pytest.mark.parametrize(
    "backend",
    ["torch", pytest.param("triton", marks=pytest.mark.skipif(not _INTERPRET, reason="set TRITON_INTERPRET=1 to "
                                                             "run the Triton kernel on CPU"))],
)
def test_chunk_forward_cpu_tiny(benchmark, backend):
    b, lq, past, h, d = 1, 64, 128, 2, 32
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, lq, h, d, generator=gen) for _ in range(3))
    kc, vc = (torch.randn(b, past, h, d, generator=gen) for _ in range(2))
    fn = lambda: ops.chunk_attention(q, k, v, kc, vc, past, backend=backend)
    record(benchmark, fn, cuda=False, rounds=3, flops=attention_flops(b, h, lq, lq + past, d), impl=backend)


def test_block_causal_cpu_tiny(benchmark):
    b, length, chunk, h, d = 1, 96, 32, 2, 32
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, length, h, d, generator=gen) for _ in range(3))
    fn = lambda: ops.block_causal_attention(q, k, v, chunk, backend="torch")
    record(benchmark, fn, cuda=False, rounds=3,
           flops=attention_flops(b, h, length, length, d, pairs=block_causal_pairs(length, chunk)), impl="torch")
