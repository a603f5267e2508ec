"""arcopo_fast.flash_attn_with_kvcache against a plain float64 reference written from flash-attn's documented
semantics (in-place append at cache_seqlens, attention up to the new length, per-row lengths, row
indirection, bottom-right causal / window masks, GQA, zeros and lse = +inf for rows with no visible key)."""

from __future__ import annotations

import math

import pytest
import torch

from arcopo_fast import flash_attn_with_kvcache, ops


def flash_ref(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, cache_batch_idx=None, softmax_scale=None,
              causal=False, window_size=(-1, -1)):
    """Loop-by-loop float64 model of flash-attn's flash_attn_with_kvcache: returns (out, lse, new k_cache,
    new v_cache); the given caches are not modified."""
    kc, vc = k_cache.double().clone(), v_cache.double().clone()
    B, Lq, H, D = q.shape
    Hk = kc.shape[2]
    scale = softmax_scale or 1 / math.sqrt(D)
    lens = [kc.shape[1]] * B if cache_seqlens is None else (
        [cache_seqlens] * B if isinstance(cache_seqlens, int) else [int(x) for x in cache_seqlens])
    rows = list(range(B)) if cache_batch_idx is None else [int(x) for x in cache_batch_idx]
    new = 0 if k is None else k.shape[1]
    for b in range(B):
        for t in range(new):
            kc[rows[b], lens[b] + t] = k[b, t].double()
            vc[rows[b], lens[b] + t] = v[b, t].double()
    out = torch.zeros(B, Lq, H, D, dtype=torch.float64)
    lse = torch.full((B, H, Lq), float("inf"), dtype=torch.float64)
    left, right = window_size
    if causal:
        right = 0
    for b in range(B):
        Lk = lens[b] + new
        for h in range(H):
            hk = h // (H // Hk)
            for i in range(Lq):
                diag = i + Lk - Lq
                keys = [j for j in range(Lk) if (right < 0 or j <= diag + right) and (left < 0 or j >= diag - left)]
                if not keys:
                    continue
                s = torch.stack([q[b, i, h].double() @ kc[rows[b], j, hk] for j in keys]) * scale
                lse[b, h, i] = torch.logsumexp(s, 0)
                p = torch.softmax(s, 0)
                out[b, i, h] = sum(p[n] * vc[rows[b], j, hk] for n, j in enumerate(keys))
    return out, lse, kc, vc


def _inputs(B=3, Lq=4, H=2, Hk=2, D=8, Bc=4, Lc=13, new=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    q, kc, vc = r(B, Lq, H, D), r(Bc, Lc, Hk, D), r(Bc, Lc, Hk, D)
    k, v = (r(B, new, Hk, D), r(B, new, Hk, D)) if new else (None, None)
    return q, kc, vc, k, v


CASES = {
    # name: (shape kwargs, call kwargs)
    "append, per-row lengths (chunk path)": (dict(), dict(cache_seqlens=[0, 5, 9])),
    "append, one int length": (dict(), dict(cache_seqlens=6)),
    "append, row indirection": (dict(), dict(cache_seqlens=[2, 0, 7], cache_batch_idx=[3, 0, 1])),
    "append, causal (bottom right)": (dict(), dict(cache_seqlens=[0, 5, 9], causal=True)),
    "no append, per-row lengths": (dict(new=0), dict(cache_seqlens=[3, 13, 8])),
    "no append, whole cache": (dict(new=0), dict()),
    "no append, causal with more queries than keys": (dict(new=0, Lq=6), dict(cache_seqlens=[2, 9, 4], causal=True)),
    "decode one token, causal": (dict(Lq=1, new=1), dict(cache_seqlens=[4, 0, 11], causal=True)),
    "window": (dict(), dict(cache_seqlens=[0, 5, 9], window_size=(3, 1))),
    "window + causal": (dict(), dict(cache_seqlens=[1, 5, 9], window_size=(2, -1), causal=True)),
    "GQA 4 heads on 2": (dict(H=4, Hk=2), dict(cache_seqlens=[2, 5, 9], cache_batch_idx=[2, 1, 0])),
    "new tokens != queries": (dict(Lq=2, new=3), dict(cache_seqlens=[1, 5, 9])),
    "softmax scale": (dict(), dict(cache_seqlens=[0, 5, 9], softmax_scale=0.2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_flash_attn_semantics(case, poison):
    shape, kw = CASES[case]
    q, kc, vc, k, v = _inputs(**shape)
    kw = {n: torch.tensor(x, dtype=torch.int32) if isinstance(x, list) else x for n, x in kw.items()}
    want, want_lse, want_kc, want_vc = flash_ref(q, kc, vc, k, v, **kw)
    kc2, vc2 = kc.clone(), vc.clone()
    out, lse = flash_attn_with_kvcache(q, kc2, vc2, k, v, return_softmax_lse=True, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kc2.double(), want_kc, rtol=0, atol=0)  # appended in place, nothing else touched
    torch.testing.assert_close(vc2.double(), want_vc, rtol=0, atol=0)
    # without the lse the streaming cases take the chunk-attention path: same result
    kc3, vc3 = kc.clone(), vc.clone()
    torch.testing.assert_close(flash_attn_with_kvcache(q, kc3, vc3, k, v, **kw).double(), want, rtol=1e-5, atol=1e-5)


def test_streaming_append_runs_through_chunk_attention(monkeypatch):
    calls = []
    real = ops.chunk_attention
    monkeypatch.setattr(ops, "chunk_attention", lambda *a, **k: calls.append(k) or real(*a, **k))
    q, kc, vc, k, v = _inputs()
    flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=torch.tensor([0, 5, 9], dtype=torch.int32))
    flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=torch.tensor([4, 0, 1], dtype=torch.int32), causal=True)
    assert len(calls) == 1 and calls[0]["cache_len"].tolist() == [0, 5, 9]


def test_bfloat16_within_twice_torchs_own_error():
    """flash-attn's rule: the error against the float64 reference is at most twice that of torch's own
    attention in the same dtype."""
    q, kc, vc, k, v = _inputs(dtype=torch.bfloat16, seed=1)
    lens = [3, 8, 0]
    want = flash_ref(q, kc, vc, k, v, cache_seqlens=lens)[0]
    got = flash_attn_with_kvcache(q, kc.clone(), vc.clone(), k, v, cache_seqlens=torch.tensor(lens, dtype=torch.int32))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch_err = max(
        (sdpa(q[b : b + 1].transpose(1, 2), torch.cat([kc[b, :n], k[b]])[None].transpose(1, 2),
              torch.cat([vc[b, :n], v[b]])[None].transpose(1, 2)).transpose(1, 2).double() - want[b : b + 1]).abs().max()
        for b, n in enumerate(lens))
    assert (got.double() - want).abs().max() <= 2 * torch_err + 1e-6


@pytest.mark.parametrize("name,value", [("rotary_cos", torch.zeros(4, 4)), ("rotary_sin", torch.zeros(4, 4)),
                                        ("cache_leftpad", torch.zeros(3, dtype=torch.int32)),
                                        ("block_table", torch.zeros(3, 1, dtype=torch.int32)),
                                        ("alibi_slopes", torch.zeros(2)), ("softcap", 30.0)])
def test_unsupported_arguments_are_named(name, value):
    q, kc, vc, k, v = _inputs()
    with pytest.raises(NotImplementedError, match=name):
        flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=1, **{name: value})


@pytest.mark.parametrize("kw,match", [
    (dict(cache_seqlens=None), "cache_seqlens is required"),
    (dict(cache_seqlens=10), r"cache_seqlens must lie in \[0, 9\]"),
    (dict(cache_seqlens=torch.tensor([0, 1], dtype=torch.int32)), r"shape \(3,\)"),
    (dict(cache_seqlens=1, cache_batch_idx=torch.tensor([0, 1, 4])), r"cache_batch_idx must lie in \[0, 4\)"),
    (dict(cache_seqlens=1, v=None), "k and v must be given together"),
    (dict(cache_seqlens=1, q=torch.zeros(3, 4, 3, 8)), "heads dividing"),
    (dict(cache_seqlens=1, k=torch.zeros(3, 4, 2, 8, dtype=torch.float64), v=torch.zeros(3, 4, 2, 8, dtype=torch.float64)),
     "share one dtype"),
])
def test_bad_arguments_are_named(kw, match):
    q, kc, vc, k, v = _inputs()
    args = dict(q=q, k_cache=kc, v_cache=vc, k=k, v=v) | kw
    with pytest.raises(ValueError, match=match):
        flash_attn_with_kvcache(**args)
