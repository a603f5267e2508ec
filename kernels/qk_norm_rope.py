"""Fused q/k RMSNorm + interleaved 3D RoPE of Wan's self-attention, for inference (no autograd).

The torch path (RMSNorm module, view, apply_rope) makes about ten passes over each [B, L, dim] projection
(square, mean, rsqrt-scale, cast, weight, float upcast, four products, stack, cast back). Here one launch
reads the pre-norm q and k projections once and writes the rotated [B, L, H, D] q and k once:

    y   = (x * rsqrt(mean_c(x^2) + eps)).to(x.dtype)            RMS over all dim = H * D channels, float32
    z   = (y * w).to(out dtype)                                   WanRMSNorm's order: cast, then weight
    out[2i]   = z[2i] * cos[t, i] - z[2i+1] * sin[t, i]           pair i of each head, t = token index in
    out[2i+1] = z[2i] * sin[t, i] + z[2i+1] * cos[t, i]           the chunk (tables [L, D/2], float32)

out dtype = promote(x.dtype, w.dtype), as `y.to(x.dtype) * weight` then apply_rope give (x.dtype for the
model, whose norm weights share the Linear dtype).

Numerics against the torch path (same dtype): every rounding of the torch path happens here too, in the
same order: y rounded to x's dtype, z = one float32 product rounded to the output dtype, each rotated
element = two float32 products rounded separately, then one add/sub (the same expression as apply_rope),
rounded to the output dtype. FMA contraction is disabled (enable_fp_fusion=False) so the products are not
fused into the add. The only difference is the float32 reduction order of sum(x^2) (a tree here, torch's
reduction there; the 1/dim factor is multiplied, as torch's CUDA mean does), which moves rsqrt by an ulp or
two of float32 on some rows. In bf16/fp16 that changes y only where it sits on a rounding boundary (dim
1536 on CPU under the interpreter: bf16 0 of 460K elements differ, fp16 ~5e-5 of them, by < 1 ulp of the
tensor's max), so outputs equal the torch path bit for bit except on those elements; in float32 about a
quarter of the elements differ, by at most ~2 float32 ulps of the tensor's max. Tests bound the error vs
float64 at 2x the torch path's. (On the GPU the torch reduction order differs from the CPU's; same bounds.)

Grid: (cdiv(B * L, BLOCK_M), 2): a program normalises and rotates BLOCK_M token rows of q (axis 1 = 0) or
k (axis 1 = 1). Whole rows stay in registers: loaded as contiguous [BLOCK_M, 2 * BLOCK_P] tiles (BLOCK_P =
next_pow2(dim / 2) pairs; 16-byte vector loads), viewed as [BLOCK_M, BLOCK_P, 2] so that tl.split hands
out the even/odd channel of each pair, rotated, joined back and stored with 16-byte vector stores. Compiled
for sm_90 (triton 3.9, bf16, dim 1536: BLOCK_M 2, 8 warps): 38 registers, no spills, 64 B shared memory
(the cross-warp sum), no layout conversions, no FMAs. DRAM traffic per token: read 2 * dim inputs, write
2 * dim outputs, plus the D/2 cos and sin entries shared by q, k and all heads.
No host syncs, no autotuning, allocation only of the output: CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import check_launchable, interpreting, on_device

__all__ = ["qk_norm_rope"]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
TILE_ELEMS = 4096  # BLOCK_M * 2 * BLOCK_P: 16 elements per thread and live tensor at 8 warps
MAX_BLOCK_M = 64
MAX_DIM = 8192  # one row in registers (1536 for Wan 1.3B); beyond this a looped kernel would be needed


def _empty(shape, *, dtype, device) -> torch.Tensor:
    """Output allocation (tests replace it to poison outputs with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _round_to(x, dtype: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """float32 x rounded (to nearest even) to `dtype`, returned as float32. The interpreter's float32 ->
    bfloat16 cast truncates, so under it the rounding is done on the bits (finite values; the GPU uses the
    hardware cvt.rn)."""
    y = x.to(dtype).to(tl.float32)
    if EMULATE_BF16:  # compile-time branches only (no runtime control flow)
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            y = bits.to(tl.float32, bitcast=True)
    return y


@triton.jit
def _qk_norm_rope_kernel(
    xq_ptr,  # [R, C] pre-norm q projection (R = B * L rows, unit channel stride)
    xk_ptr,  # [R, C] pre-norm k projection, same dtype
    wq_ptr,  # [C] norm_q weight
    wk_ptr,  # [C] norm_k weight, same dtype
    cos_ptr,  # float32 [L, D / 2]
    sin_ptr,  # float32 [L, D / 2], same strides as cos (both contiguous)
    out_ptr,  # [2, R, C] contiguous: rotated q, then rotated k
    R,
    L,
    stride_q,  # row strides of xq, xk (elements)
    stride_k,
    stride_t,  # row stride of the tables
    eps,
    inv_c,  # 1 / C, float32
    C: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,  # next_pow2(C / 2) interleaved pairs per row
    EMULATE_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    which = tl.program_id(1)  # 0: q, 1: k
    if which == 0:
        x_ptr = xq_ptr
        w_ptr = wq_ptr
        stride_x = stride_q
    else:
        x_ptr = xk_ptr
        w_ptr = wk_ptr
        stride_x = stride_k
    x_ty: tl.constexpr = x_ptr.dtype.element_ty
    o_ty: tl.constexpr = out_ptr.dtype.element_ty
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    p = tl.arange(0, BLOCK_P)  # pair p = channels (2p, 2p + 1) of the row
    cols = tl.arange(0, 2 * BLOCK_P)
    rmask = rows < R
    cmask = cols < C
    mask = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)

    # Whole rows (contiguous, vectorised loads), viewed as [BLOCK_M, BLOCK_P, 2] pairs for tl.split.
    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    xe, xo = tl.split(tl.reshape(x.to(tl.float32), (BLOCK_M, BLOCK_P, 2)))
    # RMS over all C channels in float32 (padded lanes are 0).
    r = tl.rsqrt(tl.sum(xe * xe + xo * xo, axis=1) * inv_c + eps)[:, None]
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    we, wo = tl.split(tl.reshape(w, (BLOCK_P, 2)))
    # WanRMSNorm: normalised value rounded to x's dtype, times the weight, rounded to the output dtype.
    ze = _round_to(_round_to(xe * r, x_ty, EMULATE_BF16) * we[None, :], o_ty, EMULATE_BF16)
    zo = _round_to(_round_to(xo * r, x_ty, EMULATE_BF16) * wo[None, :], o_ty, EMULATE_BF16)

    # RoPE: pair p % (D / 2) of the token's table row (t = token index within the chunk), shared by heads.
    t = (rows % L).to(tl.int64)
    toffs = t[:, None] * stride_t + (p % (D // 2))[None, :]
    tmask = rmask[:, None] & (p < C // 2)[None, :]
    c = tl.load(cos_ptr + toffs, mask=tmask, other=0.0)
    s = tl.load(sin_ptr + toffs, mask=tmask, other=0.0)
    oe = _round_to(ze * c - zo * s, o_ty, EMULATE_BF16)  # exact in o_ty: the store's cast is lossless
    oo = _round_to(ze * s + zo * c, o_ty, EMULATE_BF16)
    out = tl.reshape(tl.join(oe, oo), (BLOCK_M, 2 * BLOCK_P)).to(o_ty)
    base = which.to(tl.int64) * R * C
    tl.store(out_ptr + base + rows64[:, None] * C + cols[None, :], out, mask=mask)


def _block_sizes(dim: int) -> tuple[int, int, int]:
    block_p = triton.next_power_of_2(dim // 2)
    block_m = max(1, min(MAX_BLOCK_M, TILE_ELEMS // (2 * block_p)))
    num_warps = 8 if 2 * block_m * block_p >= TILE_ELEMS else 4
    return block_m, block_p, num_warps


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[B, L, C] as [B * L, C] rows with unit channel stride (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    weight_q: torch.Tensor,
    weight_k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm (over all dim channels, WanRMSNorm rounding) then interleaved RoPE, q and k in one launch.

    q, k:               [B, L, dim] pre-norm projections, one float dtype (fp32/bf16/fp16)
    weight_q, weight_k: [dim] norm weights, one float dtype
    cos, sin:           float32 [L, dim / num_heads / 2] (row t rotates token t of every batch row)
    Returns (q, k) [B, L, num_heads, dim / num_heads] in promote(q.dtype, weight dtype), contiguous (two
    halves of one buffer). No autograd: inference only (arcopo_fast.ops routes training to the torch path).
    """
    for name, t in (
        ("q", q),
        ("k", k),
        ("weight_q", weight_q),
        ("weight_k", weight_k),
        ("cos", cos),
        ("sin", sin),
    ):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if q.ndim != 3:
        raise ValueError(f"q must be [B, L, dim], got shape {tuple(q.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"k must match q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if q.dtype not in _FLOATS or k.dtype != q.dtype:
        raise ValueError(f"q and k must share a dtype in {_FLOATS}, got {q.dtype}, {k.dtype}")
    B, L, C = q.shape
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0 or C % num_heads:
        raise ValueError(f"num_heads must be a positive int dividing dim={C}, got {num_heads!r}")
    D = C // num_heads
    if D % 2:
        raise ValueError(f"head_dim = dim / num_heads must be even for RoPE pairs, got {D}")
    if C > MAX_DIM:
        raise ValueError(f"dim must be at most {MAX_DIM} (one row per program in registers), got {C}")
    if weight_q.shape != (C,) or weight_k.shape != (C,):
        raise ValueError(
            f"weight_q and weight_k must be [dim={C}], got {tuple(weight_q.shape)}, {tuple(weight_k.shape)}"
        )
    if weight_q.dtype not in _FLOATS or weight_k.dtype != weight_q.dtype:
        raise ValueError(
            f"weight_q and weight_k must share a dtype in {_FLOATS}, got {weight_q.dtype}, {weight_k.dtype}"
        )
    if cos.shape != (L, D // 2) or sin.shape != cos.shape:
        raise ValueError(
            f"cos and sin must be [L={L}, head_dim/2={D // 2}], got {tuple(cos.shape)}, {tuple(sin.shape)}"
        )
    if cos.dtype != torch.float32 or sin.dtype != torch.float32:
        raise ValueError(f"cos and sin must be float32 tables, got {cos.dtype}, {sin.dtype}")
    for name, t in (("k", k), ("weight_q", weight_q), ("weight_k", weight_k), ("cos", cos), ("sin", sin)):
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    eps = float(eps)
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    check_launchable(q, "q")

    out_dtype = torch.promote_types(q.dtype, weight_q.dtype)
    out = _empty((2, B, L, num_heads, D), dtype=out_dtype, device=q.device)
    R = B * L
    if R == 0:
        return out[0], out[1]
    xq, xk = _rows(q), _rows(k)
    cos, sin = cos.contiguous(), sin.contiguous()  # no-ops for RopeTables' tables
    block_m, block_p, num_warps = _block_sizes(C)
    with on_device(q):
        _qk_norm_rope_kernel[(triton.cdiv(R, block_m), 2)](
            xq,
            xk,
            weight_q.contiguous(),
            weight_k.contiguous(),
            cos,
            sin,
            out,
            R,
            L,
            xq.stride(0),
            xk.stride(0),
            cos.stride(0),
            eps,
            1.0 / C,
            C=C,
            D=D,
            BLOCK_M=block_m,
            BLOCK_P=block_p,
            EMULATE_BF16=interpreting(),
            num_warps=num_warps,
            enable_fp_fusion=False,
        )
    return out[0], out[1]
