"""Plain-torch references for every kernel of arcopo_fast.kernels.

Two kinds per op:
- `*_torch`: the production CPU path (and the CUDA fallback): vectorised torch, SDPA where it applies.
- `*_ref`: the naive, explicit formula used by tests (`upcast=True` computes in float64) and benchmarks.

Shapes follow flash-attention's convention: [batch, tokens, heads, head_dim].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------------
# Philox4x32-10 counter-based normals (the noise plan; kernels/sampler_step.py evaluates the same in-kernel)
# ---------------------------------------------------------------------------------------------------------

MASK32 = 0xFFFFFFFF
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
TWO_PI = 6.283185307179586


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of a * m for 32-bit a (int64 tensor) and a 32-bit constant m, exactly."""
    a0, a1 = a & 0xFFFF, a >> 16
    m0, m1 = m & 0xFFFF, m >> 16
    t0 = a0 * m0  # < 2^32
    mid = a1 * m0 + a0 * m1 + (t0 >> 16)  # < 2^34: no int64 overflow
    lo = ((mid & 0xFFFF) << 16) | (t0 & 0xFFFF)
    hi = a1 * m1 + (mid >> 16)
    return hi, lo


def philox4x32(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0: int, k1: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 on int64 tensors holding 32-bit words (broadcastable). Returns 4 words."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & MASK32 for c in (c0, c1, c2, c3))
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def uniforms_from_words(w0: torch.Tensor, w1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """u1 in (0, 1], u2 in [0, 1) from the top 24 bits of two words: exact in float32."""
    scale = 2.0**-24
    u1 = ((w0 >> 8) + 1).to(torch.float32) * scale
    u2 = (w1 >> 8).to(torch.float32) * scale
    return u1, u2


def normal_from_uniform(u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """Box-Muller in float32: sqrt(-2 ln u1) * cos(2 pi u2). log/cos last bits are library-dependent."""
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(TWO_PI * u2)


def normal_from_words(w0: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    return normal_from_uniform(*uniforms_from_words(w0, w1))


def philox_normal_ref(numel: int, k0: int, k1: int, c1: torch.Tensor, c2: int, c3: torch.Tensor) -> torch.Tensor:
    """Normals [B, numel]: element n of row b uses counter (n, c1[b], c2, c3[b]) under key (k0, k1)."""
    dev = c1.device
    c0 = torch.arange(numel, dtype=torch.int64, device=dev)[None, :]
    w0, w1, _, _ = philox4x32(c0, c1.to(torch.int64)[:, None], torch.tensor(c2, device=dev), c3.to(torch.int64)[:, None], k0, k1)
    return normal_from_words(w0, w1)

# ---------------------------------------------------------------------------------------------------------
# KV-cached chunk attention (inference and training form)
# ---------------------------------------------------------------------------------------------------------
#
# Query row b of a chunk attends, without a mask, to the concatenation of three key segments:
#
#   [ prefix segment           | cache segment              | the chunk itself ]
#     k_prefix[prefix_rows[b],   k_cache[cache_rows[b],       k[b, :Lq]
#              :prefix_len[b]]           :cache_len[b]]
#
# The prefix segment is the zero-copy fork: G branch rows share one parent row's prefix. Without it, the
# cache segment alone is the plain KV cache of Self-Forcing. Only q, k, v receive gradients.


def _lengths(n: int | torch.Tensor, batch: int, device) -> torch.Tensor:
    if isinstance(n, torch.Tensor):
        return n.to(device=device, dtype=torch.int64).expand(batch)
    return torch.full((batch,), int(n), dtype=torch.int64, device=device)


def _rows(rows: torch.Tensor | None, batch: int, device) -> torch.Tensor:
    if rows is None:
        return torch.arange(batch, device=device)
    return rows.to(device=device, dtype=torch.int64)


def gather_chunk_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor | None = None,
    v_cache: torch.Tensor | None = None,
    cache_len: int | torch.Tensor = 0,
    cache_rows: torch.Tensor | None = None,
    k_prefix: torch.Tensor | None = None,
    v_prefix: torch.Tensor | None = None,
    prefix_len: int | torch.Tensor = 0,
    prefix_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Materialise [prefix ; cache ; chunk] keys/values per row: ([B, Lk, H, D] x2, key mask [B, Lk] or
    None when every row has the same lengths). Lk = max prefix + max cache + Lq."""
    B = k.shape[0]
    dev = k.device
    parts_k, parts_v, masks = [], [], []
    for kc, vc, n, rows in ((k_prefix, v_prefix, prefix_len, prefix_rows), (k_cache, v_cache, cache_len, cache_rows)):
        if kc is None:
            continue
        lens = _lengths(n, B, dev)
        if isinstance(n, int):
            width = n
        else:
            # NOTE(sync): per-row lengths need a host read to size the gather; the reference path only.
            width = int(lens.max()) if B else 0
        if width == 0:
            continue
        r = _rows(rows, B, dev)
        parts_k.append(kc[r, :width].to(k.dtype))
        parts_v.append(vc[r, :width].to(v.dtype))
        masks.append(torch.arange(width, device=dev)[None, :] < lens[:, None])
    parts_k.append(k)
    parts_v.append(v)
    masks.append(torch.ones(B, k.shape[1], dtype=torch.bool, device=dev))
    mask = torch.cat(masks, dim=1)
    ragged = any(not isinstance(n, int) for n in (cache_len, prefix_len))
    return torch.cat(parts_k, dim=1), torch.cat(parts_v, dim=1), (mask if ragged else None)


def chunk_attention_ref(q, k, v, *cache_args, scale: float | None = None, upcast: bool = True, **cache_kw):
    """Explicit softmax(q k^T * scale) v over [prefix ; cache ; chunk]; float64 when upcast.
    Returns (out [B, Lq, H, D] in q's dtype, lse [B, H, Lq] float32)."""
    kk, vv, mask = gather_chunk_kv(k, v, *cache_args, **cache_kw)
    dtype = torch.float64 if upcast else q.dtype
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(dtype), kk.to(dtype)) * scale
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s.float() if not upcast else s, dim=-1)
    p = torch.softmax(s, dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", p, vv.to(dtype))
    return out.to(q.dtype), lse.float()


def chunk_attention_torch(q, k, v, *cache_args, scale: float | None = None, **cache_kw) -> torch.Tensor:
    """Production torch path: gather the segments, then one SDPA call (fused kernels where available)."""
    kk, vv, mask = gather_chunk_kv(k, v, *cache_args, **cache_kw)
    attn_mask = None if mask is None else mask[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), attn_mask=attn_mask, scale=scale
    )
    return out.transpose(1, 2)


# ---------------------------------------------------------------------------------------------------------
# Full-sequence block-causal attention (teacher forcing: chunk c sees chunks <= c)
# ---------------------------------------------------------------------------------------------------------


def block_causal_mask(
    num_tokens: int,
    chunk_tokens: int,
    device=None,
    window_tokens: int | None = None,
    sink_tokens: int = 0,
    frame_tokens: int | None = None,
) -> torch.Tensor:
    """Boolean [L, L] mask, True = attend. Query in chunk c sees keys of chunks <= c. With a rolling
    window (Self-Forcing's local_attn_size, in tokens) it sees at most `window_tokens` keys: the first
    `sink_tokens` (pinned sink frames) and the most recent window_tokens - sink_tokens up to the end of its
    own chunk, exactly what a ring KV cache of that size holds when the chunk is generated."""
    idx = torch.arange(num_tokens, device=device)
    q_end = (idx // chunk_tokens + 1) * chunk_tokens  # exclusive end of the query's chunk
    kpos = idx[None, :]
    mask = kpos < q_end[:, None]
    if window_tokens is not None:
        recent = kpos >= (q_end[:, None] - (window_tokens - sink_tokens))
        mask = mask & (recent | (kpos < sink_tokens))
    return mask


def block_causal_attention_ref(q, k, v, chunk_tokens: int, *, scale=None, upcast=True, **window):
    dtype = torch.float64 if upcast else q.dtype
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    mask = block_causal_mask(q.shape[1], chunk_tokens, q.device, **window)
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(dtype), k.to(dtype)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), v.to(dtype))
    return out.to(q.dtype), lse.float()


def block_causal_attention_torch(q, k, v, chunk_tokens: int, *, scale=None, **window) -> torch.Tensor:
    mask = block_causal_mask(q.shape[1], chunk_tokens, q.device, **window)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
    )
    return out.transpose(1, 2)


# ---------------------------------------------------------------------------------------------------------
# Few-step consistency step
# ---------------------------------------------------------------------------------------------------------


def consistency_step_ref(
    x: torch.Tensor, flow: torch.Tensor, sigma_t, sigma_next=None, noise: torch.Tensor | None = None, upcast=False
):
    """x0 = x - sigma_t * flow;  x_next = (1 - sigma_next) * x0 + sigma_next * noise (non-final steps).
    sigma_* may be Python floats or per-row tensors [B]. Computed in float32 (float64 when upcast); x0 and
    x_next are returned in float32."""
    dtype = torch.float64 if upcast else torch.float32

    def per_row(s):
        s = torch.as_tensor(s, dtype=dtype, device=x.device)
        return s.reshape(-1, *([1] * (x.ndim - 1))) if s.ndim else s

    x0 = x.to(dtype) - per_row(sigma_t) * flow.to(dtype)
    if sigma_next is None:
        return x0.float(), None
    if noise is None:
        raise ValueError("consistency_step_ref: noise is required when sigma_next is given")
    sn = per_row(sigma_next)
    x_next = (1 - sn) * x0 + sn * noise.to(dtype)
    return x0.float(), x_next.float()


# ---------------------------------------------------------------------------------------------------------
# Neighbour-policy distances (AR-CoPO Eq. 4)
# ---------------------------------------------------------------------------------------------------------


def neighbour_logprobs_ref(x0_theta: torch.Tensor, x0_old: torch.Tensor, tau, upcast=False):
    """d[a, i] = mean_n (x0_old[i, n] - x0_theta[a, n])^2 for anchors a (x0_theta [A, N]) and candidates i
    (x0_old [G, N]); logp[a, i] = log_softmax_i(-d[a, i] / tau). tau: float or tensor broadcastable to
    [A, 1]. Differences are formed explicitly (no |a|^2 + |b|^2 - 2ab cancellation). Returns (d, logp)."""
    dtype = torch.float64 if upcast else torch.float32
    a = x0_theta.reshape(x0_theta.shape[0], -1).to(dtype)
    c = x0_old.reshape(x0_old.shape[0], -1).to(dtype)
    d = ((c[None, :, :] - a[:, None, :]) ** 2).mean(-1)
    tau = torch.as_tensor(tau, dtype=dtype, device=d.device)
    logp = torch.log_softmax(-d / tau, dim=-1)
    return d, logp


def neighbour_logprobs_torch(x0_theta: torch.Tensor, x0_old: torch.Tensor, tau):
    """Same as the reference, chunked over anchors so memory stays at O(G * N) (float32)."""
    a = x0_theta.reshape(x0_theta.shape[0], -1).float()
    c = x0_old.reshape(x0_old.shape[0], -1).float()
    d = torch.stack([((c - a[j][None]) ** 2).mean(-1) for j in range(a.shape[0])]) if a.shape[0] else a.new_zeros(0, c.shape[0])
    tau = torch.as_tensor(tau, dtype=torch.float32, device=d.device)
    return d, torch.log_softmax(-d / tau, dim=-1)


# ---------------------------------------------------------------------------------------------------------
# q/k RMSNorm + interleaved 3D RoPE of the self-attention (kernels/qk_norm_rope.py fuses both)
# ---------------------------------------------------------------------------------------------------------


def rms_norm_rope_torch(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, eps: float
) -> torch.Tensor:
    """The model's torch path, op for op (model/wan.py RMSNorm.forward, then model/rope.py apply_rope):
    x [B, L, dim] -> [B, L, H, D]; RMS in float32, cast to x's dtype, times the weight; rotation of the
    interleaved pairs in float32 with tables [L, D/2], cast back."""
    B, L, C = x.shape
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype) * weight
    y = y.view(B, L, num_heads, C // num_heads)
    yf = y.float().unflatten(-1, (-1, 2))
    ye, yo = yf[..., 0], yf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((ye * c - yo * s, ye * s + yo * c), dim=-1).flatten(-2).to(y.dtype)


def qk_norm_rope_torch(q, k, weight_q, weight_k, cos, sin, num_heads: int, eps: float):
    """(rms_norm_rope_torch(q, weight_q, ...), rms_norm_rope_torch(k, weight_k, ...)): differentiable."""
    return (
        rms_norm_rope_torch(q, weight_q, cos, sin, num_heads, eps),
        rms_norm_rope_torch(k, weight_k, cos, sin, num_heads, eps),
    )


def rms_norm_rope_ref(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, eps: float,
    upcast: bool = True,
) -> torch.Tensor:
    """Naive RMSNorm + RoPE without intermediate roundings, in float64 (upcast) or float32, returned in
    that dtype: the accuracy reference (the tables are taken as given)."""
    dt = torch.float64 if upcast else torch.float32
    B, L, C = x.shape
    xf = x.to(dt)
    y = xf / torch.sqrt((xf * xf).mean(dim=-1, keepdim=True) + eps) * weight.to(dt)
    y = y.view(B, L, num_heads, C // num_heads // 2, 2)
    ye, yo = y[..., 0], y[..., 1]
    c, s = cos.to(dt)[None, :, None, :], sin.to(dt)[None, :, None, :]
    return torch.stack((ye * c - yo * s, ye * s + yo * c), dim=-1).flatten(-2)
