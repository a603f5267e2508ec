"""Attention implementations that can serve ops.chunk_attention besides our Triton kernel and the plain
torch path (kernels/reference.py: gather the segments, one SDPA call with SDPA's own dispatch):

  sdpa_cudnn, sdpa_flash, sdpa_efficient, sdpa_math   SDPA with one backend forced (sdpa_kernel)
  flex                                                FlexAttention (compiled), unmasked
  flash_attn                                          flash_attn.flash_attn_func, when importable

Each reads the key sequence in one of two ways:
  contiguous view (as Self-Forcing does)  the chunk's own K/V are written into the cache slots right after
        the past, k_cache[b, cache_len : cache_len + Lq], and SDPA reads the one contiguous view
        k_cache[:B, :cache_len + Lq]: no concatenation, no copy of the past. Valid only when the caller says
        those slots are free (cache_scratch=True: KVCache's slots past its length are), with an int
        cache_len, no row indirection, no prefix segment, room for the chunk (Lc >= cache_len + Lq), the
        cache in q's dtype, and no gradient wanted for k, v (the write is detached).
  gather    kernels/reference.gather_chunk_kv concatenates [prefix ; cache ; chunk]: equal lengths only
        (int cache_len / prefix_len), since these kernels take no per-row key mask.
`unsupported(name, call)` says why a candidate cannot serve a call (None: it can).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kernels import reference as ref

SDPA_KINDS = ("sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math")
CANDIDATES = (*SDPA_KINDS, "flex", "flash_attn")
_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Call:
    """What decides whether a candidate can serve a chunk_attention call (Python values only: no sync)."""

    device_type: str
    dtype: torch.dtype
    head_dim: int
    lengths_equal: bool  # int cache_len and prefix_len (no per-row key mask)
    contiguous_view: bool  # the Self-Forcing contiguous [past ; own] view is valid
    grad: bool


def contiguous_view_ok(q, k, k_cache, cache_len, cache_rows, k_prefix, cache_scratch: bool, grad: bool) -> bool:
    if not cache_scratch or grad or k_cache is None or k_prefix is not None or cache_rows is not None:
        return False
    if not isinstance(cache_len, int) or k_cache.dtype != q.dtype:
        return False
    B, Lq = q.shape[:2]
    return k_cache.shape[0] >= B and k_cache.shape[1] >= cache_len + Lq


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {
        "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
        "sdpa_flash": SDPBackend.FLASH_ATTENTION,
        "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
        "sdpa_math": SDPBackend.MATH,
    }[name]


def unsupported(name: str, call: Call) -> str | None:
    """Why `name` cannot serve `call`, or None."""
    if name not in CANDIDATES:
        return f"unknown attention candidate {name!r}"
    if not call.lengths_equal:
        return "per-row lengths need a key mask"
    if name in ("sdpa_cudnn", "flash_attn", "flex") and call.device_type != "cuda":
        return "CUDA only"
    if name in ("sdpa_cudnn", "sdpa_flash", "flash_attn") and call.device_type == "cuda" and call.dtype not in _HALF:
        return f"no {call.dtype} kernel"
    if name == "flash_attn":
        from . import ops

        if not ops.flash_attn_available():
            return "flash_attn is not installed"
    return None


def _keys(q, k, v, k_cache, v_cache, cache_len, cache_rows, k_prefix, v_prefix, prefix_len, prefix_rows,
          cache_scratch):
    """(keys, values) [B, Lk, H, D] for the dense kernels: the contiguous view when valid, else gathered."""
    grad = torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)
    if contiguous_view_ok(q, k, k_cache, cache_len, cache_rows, k_prefix, cache_scratch, grad):
        B, Lq = q.shape[:2]
        end = cache_len + Lq
        k_cache[:B, cache_len:end].copy_(k)
        v_cache[:B, cache_len:end].copy_(v)
        return k_cache[:B, :end], v_cache[:B, :end]
    kk, vv, mask = ref.gather_chunk_kv(k, v, k_cache, v_cache, cache_len, cache_rows, k_prefix, v_prefix,
                                       prefix_len, prefix_rows)
    if mask is not None:
        raise ValueError("this attention backend supports equal lengths per row only (int cache_len/prefix_len)")
    return kk, vv


def chunk_attention(name: str, q, k, v, k_cache=None, v_cache=None, cache_len=0, cache_rows=None, k_prefix=None,
                    v_prefix=None, prefix_len=0, prefix_rows=None, *, scale=None, cache_scratch=False):
    """ops.chunk_attention's semantics with candidate `name` (see the module docstring)."""
    kk, vv = _keys(q, k, v, k_cache, v_cache, cache_len, cache_rows, k_prefix, v_prefix, prefix_len, prefix_rows,
                   cache_scratch)
    if name == "flash_attn":
        import flash_attn

        return flash_attn.flash_attn_func(q, kk, vv, softmax_scale=scale)
    if name == "flex":
        out = _flex()(q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), scale=scale)
        return out.transpose(1, 2)
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(_sdpa_backend(name)):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


@functools.cache
def _flex():
    from torch.nn.attention.flex_attention import flex_attention

    # Unfused flex_attention is a slow reference: it must run compiled. Lk grows chunk by chunk: dynamic.
    return torch.compile(flex_attention, dynamic=True)
