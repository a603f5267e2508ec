"""flash-attn's KV-cache attention call, `flash_attn_with_kvcache`, on arcopo_fast's attention.

Code written against flash-attn's KV-cache API switches with one import:

    # from flash_attn import flash_attn_with_kvcache
    from arcopo_fast import flash_attn_with_kvcache

Same names, layouts ([batch, seqlen, heads, head_dim]) and semantics, for this subset:
  - k / v (optional) are written into k_cache / v_cache IN PLACE at positions cache_seqlens[b] ..
    cache_seqlens[b] + seqlen_new - 1 of cache row cache_batch_idx[b] (default b); then q attends to that row
    up to cache_seqlens[b] + seqlen_new (without k / v: up to cache_seqlens[b]; without cache_seqlens: the
    whole cache). Per-row lengths are int32 [batch] tensors, or one int for every row.
  - causal=True aligns the causal mask to the bottom right: query i of seqlen_q sees key j when
    j <= i + seqlen_k - seqlen_q (seqlen_k: that row's attended length). With seqlen_q = 2, seqlen_k = 5:

        keys ->  0 1 2 3 4
        q0       1 1 1 1 0
        q1       1 1 1 1 1          a query row with no visible key outputs zeros (lse +inf)

  - window_size=(left, right): query i sees keys in [i + seqlen_k - seqlen_q - left,
    i + seqlen_k - seqlen_q + right] (-1: unbounded on that side; causal implies right = 0).
  - fewer K/V heads than q heads (MQA / GQA): q head h reads K/V head h // (heads / heads_k).
  - softmax_scale (default 1/sqrt(head_dim)); return_softmax_lse adds the logsumexp [batch, heads, seqlen_q]
    (float32) of each query's scaled scores.
  - num_splits is a flash-attn performance hint and does not change results: accepted and ignored.
Not supported (NotImplementedError names the argument): rotary_cos / rotary_sin, cache_leftpad,
block_table (paged caches), alibi_slopes, softcap.

The common streaming case (k / v given, seqlen_q == seqlen_new, equal head counts, not causal, no window,
no lse: a chunk attending to its cache and to itself, as in Self-Forcing) runs through ops.chunk_attention
(the Triton kernel on CUDA, reading each row's length from the device: no host sync). Everything else runs
a masked float32 attention in torch over the cache's full length (device masks, no host sync either).
Bounds: an int cache_seqlens, or a CPU tensor, is checked against the cache length; a CUDA tensor is not
read back (an out-of-range write trips the device-side index assertion, as flash-attn leaves it to the
caller).
"""

from __future__ import annotations

import math

import torch

from . import ops

__all__ = ["flash_attn_with_kvcache"]


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    cache_seqlens: int | torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: torch.Tensor | None = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """q: [B, Lq, H, D]; k_cache, v_cache: [Bc, Lc, Hk, D] (H % Hk == 0), updated in place when k / v are
    given; k, v: [B, Lnew, Hk, D]; cache_seqlens: int or int [B]; cache_batch_idx: int [B] (cache row of
    batch row b). Returns out [B, Lq, H, D] in q's dtype, and lse [B, H, Lq] float32 when
    return_softmax_lse. See the module docstring for the semantics."""
    for name, value in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin), ("cache_leftpad", cache_leftpad),
                        ("block_table", block_table), ("alibi_slopes", alibi_slopes)):
        if value is not None:
            raise NotImplementedError(f"flash_attn_with_kvcache: {name} is not supported by arcopo_fast (pass None)")
    if softcap:
        raise NotImplementedError(f"flash_attn_with_kvcache: softcap is not supported by arcopo_fast (got {softcap})")
    B, Lq, H, D = _check(q, k_cache, v_cache, k, v, window_size)
    Lc, Hk = k_cache.shape[1], k_cache.shape[2]
    Lnew = 0 if k is None else k.shape[1]
    rows = _rows(cache_batch_idx, B, k_cache.shape[0], q.device)
    if cache_seqlens is None:
        if k is not None:
            raise ValueError("cache_seqlens is required when k and v are given (where to append them)")
        cache_seqlens = Lc
    seqlens = _seqlens(cache_seqlens, B, Lc - Lnew, q.device)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)

    if k is not None:  # append in place: row rows[b], positions seqlens[b] + [0, Lnew)
        pos = (seqlens if isinstance(seqlens, torch.Tensor) else torch.full((B,), seqlens, device=q.device))
        pos = pos.long()[:, None] + torch.arange(Lnew, device=q.device)
        k_cache.index_put_((rows.long()[:, None], pos), k)
        v_cache.index_put_((rows.long()[:, None], pos), v)

    left, right = window_size
    # causal with a single query is no mask at all: bottom-right alignment lets it see every key.
    plain = (not causal or Lq == 1) and left < 0 and right < 0 and not return_softmax_lse
    if k is not None and plain and Lnew == Lq and Hk == H:
        # The cache segment [0, seqlens[b]) of the row plus the new tokens themselves: chunk attention.
        return ops.chunk_attention(q, k, v, k_cache, v_cache, cache_len=seqlens, cache_rows=rows, scale=scale)
    total = seqlens + Lnew
    out, lse = _masked_attention(q, k_cache, v_cache, rows, total, scale, causal, left, right, cache_batch_idx is None)
    return (out, lse) if return_softmax_lse else out


def _check(q, k_cache, v_cache, k, v, window_size) -> tuple[int, int, int, int]:
    if q.ndim != 4:
        raise ValueError(f"q must be [batch, seqlen_q, heads, head_dim], got shape {tuple(q.shape)}")
    B, Lq, H, D = q.shape
    if k_cache.ndim != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache and v_cache must be equal [batch_cache, seqlen_cache, heads_k, head_dim] shapes, "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    Hk = k_cache.shape[2]
    if k_cache.shape[3] != D or H % Hk:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} must have head_dim {D} and a number of heads dividing "
                         f"q's {H}")
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together")
    dtypes = {"q": q.dtype, "k_cache": k_cache.dtype, "v_cache": v_cache.dtype}
    if k is not None:
        dtypes.update(k=k.dtype, v=v.dtype)
    if len(set(dtypes.values())) > 1:
        raise ValueError(f"q, the caches and k / v must share one dtype, got {dtypes}")
    if k is not None:
        if k.ndim != 4 or k.shape[0] != B or k.shape[2:] != k_cache.shape[2:] or v.shape != k.shape:
            raise ValueError(f"k and v must be [batch={B}, seqlen_new, heads_k={Hk}, head_dim={D}], got "
                             f"{tuple(k.shape)} and {tuple(v.shape)}")
    if len(window_size) != 2:
        raise ValueError(f"window_size must be (left, right), got {window_size!r}")
    return B, Lq, H, D


def _rows(cache_batch_idx, B: int, Bc: int, device) -> torch.Tensor:
    if cache_batch_idx is None:
        if B > Bc:
            raise ValueError(f"q has {B} rows but the cache only {Bc}: pass cache_batch_idx")
        return torch.arange(B, dtype=torch.int32, device=device)
    if not isinstance(cache_batch_idx, torch.Tensor) or cache_batch_idx.shape != (B,) or cache_batch_idx.is_floating_point():
        raise ValueError(f"cache_batch_idx must be an integer tensor of shape ({B},), got {cache_batch_idx!r}")
    if cache_batch_idx.device.type == "cpu" and B and not (0 <= int(cache_batch_idx.min()) and int(cache_batch_idx.max()) < Bc):
        raise ValueError(f"cache_batch_idx must lie in [0, {Bc}) (the cache's rows)")
    return cache_batch_idx.to(device=device, dtype=torch.int32)


def _seqlens(cache_seqlens, B: int, max_len: int, device) -> int | torch.Tensor:
    """An int (the same for every row) or int32 [B] on device; checked on the host when that is free."""
    if isinstance(cache_seqlens, int):
        if not 0 <= cache_seqlens <= max_len:
            raise ValueError(f"cache_seqlens must lie in [0, {max_len}] (the cache length minus the new tokens), "
                             f"got {cache_seqlens}")
        return cache_seqlens
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.shape != (B,) or cache_seqlens.is_floating_point():
        raise ValueError(f"cache_seqlens must be an int or an integer tensor of shape ({B},), got {cache_seqlens!r}")
    if cache_seqlens.device.type == "cpu" and B and not (0 <= int(cache_seqlens.min()) and int(cache_seqlens.max()) <= max_len):
        raise ValueError(f"cache_seqlens must lie in [0, {max_len}] (the cache length minus the new tokens)")
    return cache_seqlens.to(device=device, dtype=torch.int32)


def _masked_attention(q, k_cache, v_cache, rows, total, scale, causal, left, right, identity_rows):
    """Attention over each row's cache up to total[b] with flash-attn's bottom-right causal / window masks,
    in float32 over the cache's full length (shapes do not depend on the lengths). Rows without a visible
    key give zeros and lse = +inf, as flash-attn."""
    B, Lq, H, D = q.shape
    Lc, Hk = k_cache.shape[1], k_cache.shape[2]
    kc = k_cache[:B] if identity_rows else k_cache.index_select(0, rows.long())  # [B, Lc, Hk, D]
    vc = v_cache[:B] if identity_rows else v_cache.index_select(0, rows.long())
    if Hk != H:  # q head h reads K/V head h // (H // Hk)
        kc, vc = kc.repeat_interleave(H // Hk, dim=2), vc.repeat_interleave(H // Hk, dim=2)
    dev = q.device
    total = (total if isinstance(total, torch.Tensor) else torch.full((B,), total, device=dev)).long()
    j = torch.arange(Lc, device=dev)[None, None, :]  # key position
    diag = torch.arange(Lq, device=dev)[None, :, None] + (total[:, None, None] - Lq)  # i + seqlen_k - seqlen_q
    keep = j < total[:, None, None]  # [B, Lq, Lc]
    if causal:
        right = 0
    if right >= 0:
        keep = keep & (j <= diag + right)
    if left >= 0:
        keep = keep & (j >= diag - left)
    keep = keep[:, None]  # [B, 1, Lq, Lc]
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), kc.float()) * scale
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # -inf where no key is visible
    empty = torch.isneginf(lse)
    p = torch.exp(s - lse.masked_fill(empty, 0.0)[..., None])  # exp(-inf) = 0 on masked keys and empty rows
    out = torch.einsum("bhqk,bkhd->bqhd", p, vc.float()).to(q.dtype)
    return out, lse.masked_fill(empty, float("inf"))
