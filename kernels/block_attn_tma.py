"""TMA variants of the attention kernels (sm_90+): forward, dq and dk/dv move their q / dO / key /
value tiles and store their outputs through device-side tensor descriptors (Hopper's Tensor Memory
Accelerator) instead of per-thread pointer loads.

Same maths, arguments, split-KV and outputs as block_attn._chunk_attn_fwd_kernel,
_chunk_attn_bwd_dq_kernel and _dkdv_kernel (the pointer path, which stays the fallback and the default);
block_attn's launchers use these when asked (tma=True, the "triton_tma" backend of arcopo_fast.ops) and
`tma_unsupported` / `tma_layout_ok` allow it. Block-causal attention has TMA variants too (forward and dq
here, dk/dv is _dkdv_tma_kernel with CAUSAL=True): its keys come from one tensor, so each program needs one
K and one V descriptor, cut at the last key its q tile may see (see _key_descs).

How the segments map onto descriptors. The pointer kernel walks prefix / cache / own key tiles in ONE loop
and picks each tile's segment with scalar selects; a descriptor cannot be selected that way without a
branch around the load. Here each program builds one descriptor per segment and per tensor, for its batch
row b and head h, with the row's own length as the descriptor's first dimension:

    K_cache desc: base k_cache[cache_rows[b], 0, h, :], shape [cache_len_b, D], strides [token stride, 1]

and walks the segments in three loops (each pipelined by Triton on its own: TMA copies into shared memory
tracked by mbarriers). Rows past a segment's length lie outside its descriptor: the TMA unit fills them with
zeros without reading memory, so whatever a cache holds beyond a row's length (NaN included) never reaches
P V. Their scores (0 after the zero fill) still need the -inf column bias, as in the pointer path. The q
tile is read, and the output written, through descriptors of [Lq, D] per (b, h): the q rows past Lq are
zeros, the output rows past Lq are clipped by the store.

Descriptors built on the device live in a global scratch of 128 bytes each, which Triton allocates at
launch through `triton.set_allocator`; `ensure_allocator` installs a torch allocator when none is set
(a CUDA-graph capture then takes the scratch from the graph's pool, like any other allocation).

Requirements (TMA's): 16-byte aligned base pointers, token / head / batch strides that are multiples of
16 bytes, unit head-dim stride. `tma_layout_ok` checks them on the host (data_ptr and strides: no sync);
block_attn falls back to the pointer kernel when they do not hold. Triton 3.6 and 3.9 both provide
tl.make_tensor_descriptor and triton.set_allocator; an older or different Triton without them, or a GPU
below sm_90, never gets this kernel (`tma_unsupported` says why). Under TRITON_INTERPRET=1 the interpreter
emulates the descriptors (bounds, zero fill, alignment asserts): that is how the tests run it on CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import interpreting
from .block_attn import (
    _M_INIT,
    _autotuned,
    _autotuned_bwd,
    _cast,
    _causal_q_tile,
    _dq_step,
    _mma,
    _segment,
    _softmax_step,
)

TMA_MIN_CAPABILITY = (9, 0)


def _api_missing() -> str | None:
    if not hasattr(tl, "make_tensor_descriptor") or not hasattr(triton, "set_allocator"):
        return f"triton {triton.__version__} has no device-side tensor descriptors (tl.make_tensor_descriptor)"
    return None


def tma_unsupported(device: torch.device | str) -> str | None:
    """Why the TMA forward cannot run on `device`, or None. CPU tensors run it only under the interpreter."""
    why = _api_missing()
    if why:
        return why
    device = torch.device(device)
    if device.type != "cuda":
        return None if interpreting() else "TMA needs a CUDA device (or TRITON_INTERPRET=1 on CPU)"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    cap = torch.cuda.get_device_capability(device)
    if cap < TMA_MIN_CAPABILITY:
        return f"TMA needs sm_90 or newer, this device is sm_{cap[0]}{cap[1]}"
    return None


def tma_layout_ok(*tensors: torch.Tensor) -> bool:
    """Every tensor [*, L, H, D] meets TMA's layout rules: 16-byte aligned data, unit head-dim stride, the
    other strides multiples of 16 bytes (then every (row, head) base the kernel forms is aligned too)."""
    for t in tensors:
        e = t.element_size()
        if t.data_ptr() % 16 or t.stride(-1) != 1 or any((s * e) % 16 for s in t.stride()[:-1]):
            return False
    return True


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    # The descriptors' global scratch for one launch (Triton passes the size; 128-byte alignment is what a
    # tensormap needs and what the caching allocator gives).
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_allocator() -> None:
    """Install `_scratch` as Triton's launch-time allocator unless the caller already set one (a per-thread
    context variable in Triton, so this is checked at every launch: a dict-free attribute read)."""
    try:
        from triton.runtime._allocation import NullAllocator, _allocator

        if not isinstance(_allocator.get(), NullAllocator):
            return
    except ImportError:  # layout of a future Triton: install ours unconditionally
        pass
    triton.set_allocator(_scratch)


@triton.jit
def _desc(base, rows, stride_n, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """Descriptor of a [rows, HEAD_DIM] slab of a [.., L, H, D] tensor (token stride stride_n), moved in
    [BLOCK, HEAD_DIM] boxes. An empty slab gets one row: the walk never loads from it."""
    return tl.make_tensor_descriptor(base, shape=[tl.maximum(rows, 1), HEAD_DIM], strides=[stride_n, 1],
                                     block_shape=[BLOCK, HEAD_DIM])


@triton.jit
def _key_descs(K, V, b64, h, n, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    """K and V descriptors of row b, head h of [B, L, H, D] keys, cut at n: the keys this program may see
    (block-causal: the q tile's last visible key; chunk attention: the chunk's own Lq keys). A tile that
    reaches past n gets TMA zeros there, memory not read, as the pointer kernel's masked loads."""
    kd = _desc(K + b64 * stride_kb + h * stride_kh, n, stride_kn, HEAD_DIM, BLOCK_N)
    vd = _desc(V + b64 * stride_vb + h * stride_vh, n, stride_vn, HEAD_DIM, BLOCK_N)
    return kd, vd


@triton.jit
def _segment_descs(KX, VX, ROWS, LENS, seg_len, len_stride, seg_max, b, h,
                   stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
                   HAS_ROWS: tl.constexpr, LEN_PTR: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    """(K descriptor, V descriptor, n) of a prefix or cache segment for row b, head h: block_attn._segment's
    row base and length, the length as the descriptors' first dimension."""
    kx, vx, n = _segment(KX, VX, ROWS, LENS, seg_len, len_stride, seg_max, b, h,
                         stride_kb, stride_kh, stride_vb, stride_vh, HAS_ROWS, LEN_PTR)
    return _desc(kx, n, stride_kn, HEAD_DIM, BLOCK_N), _desc(vx, n, stride_vn, HEAD_DIM, BLOCK_N), n


@triton.jit
def _walk_segment(acc, l_i, m_i, q, kd, vd, n, first, lo, hi, qk_scale, offs_n,
                  BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online softmax over one segment of n keys, which owns tiles [first, first + cdiv(n, BLOCK_N)) of the
    flattened walk; this program does the ones in [lo, hi) (all of them unless split-KV)."""
    start = tl.maximum(lo, first)
    end = tl.minimum(hi, first + tl.cdiv(n, BLOCK_N))
    for t in range(start, end):
        j = (t - first) * BLOCK_N
        k = kd.load([j, 0])  # rows >= n: zeros from the TMA unit, memory not read
        qk = _mma(q, tl.trans(k), None, DOT_PREC)
        s = qk * qk_scale + tl.where(j + offs_n < n, 0.0, float("-inf"))[None, :]
        v = vd.load([j, 0])
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, s, v, DOT_PREC)
    return acc, l_i, m_i


@triton.jit
def _store_out_lse(acc, l_i, m_i, out_base, stride_on, lse_row0, L, start_m, offs_m, row_ok,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PREC: tl.constexpr):
    """The forward epilogue: O = acc / l through a descriptor over the (b, h) slab's L rows (rows past L are
    clipped by TMA) and the natural-log LSE of each valid row."""
    od = _desc(out_base, L, stride_on, HEAD_DIM, BLOCK_M)
    od.store([start_m, 0], _cast(acc / l_i[:, None], out_base.dtype.element_ty, DOT_PREC))
    tl.store(lse_row0 + offs_m, (m_i + tl.math.log2(l_i)) * 0.6931471805599453, mask=row_ok)


@triton.jit(do_not_specialize=["cache_len", "prefix_len"])
def _chunk_attn_fwd_tma_kernel(
    Q, K, V, Out, Lse, OPart, LsePart, KC, VC, CLEN, CROWS, KP, VP, PLEN, PROWS,  # as _chunk_attn_fwd_kernel
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_on, stride_oh,
    stride_kcb, stride_kcn, stride_kch,
    stride_vcb, stride_vcn, stride_vch,
    stride_kpb, stride_kpn, stride_kph,
    stride_vpb, stride_vpn, stride_vph,
    cache_len, clen_stride, cache_max,
    prefix_len, plen_stride, prefix_max,
    H, Lq, qk_scale,
    LQ_BUCKET, LK_BUCKET, BH, NSPLIT,  # autotune keys only
    HAS_CACHE: tl.constexpr, CLEN_PTR: tl.constexpr, CACHE_ROWS: tl.constexpr,
    HAS_PREFIX: tl.constexpr, PLEN_PTR: tl.constexpr, SPLIT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # grid: (cdiv(Lq, BLOCK_M), B * H, S), as the pointer kernel
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = offs_m < Lq
    b64 = b.to(tl.int64)
    q = _desc(Q + b64 * stride_qb + h * stride_qh, Lq, stride_qn, HEAD_DIM, BLOCK_M).load([start_m, 0])

    n0 = Lq * 0
    n1 = Lq * 0
    if HAS_PREFIX:
        kpd, vpd, n0 = _segment_descs(KP, VP, PROWS, PLEN, prefix_len, plen_stride, prefix_max, b, h,
                                      stride_kpb, stride_kpn, stride_kph, stride_vpb, stride_vpn, stride_vph,
                                      True, PLEN_PTR, HEAD_DIM, BLOCK_N)
    if HAS_CACHE:
        kcd, vcd, n1 = _segment_descs(KC, VC, CROWS, CLEN, cache_len, clen_stride, cache_max, b, h,
                                      stride_kcb, stride_kcn, stride_kch, stride_vcb, stride_vcn, stride_vch,
                                      CACHE_ROWS, CLEN_PTR, HEAD_DIM, BLOCK_N)
    t1 = tl.cdiv(n0, BLOCK_N)
    t2 = t1 + tl.cdiv(n1, BLOCK_N)
    total = t2 + tl.cdiv(Lq, BLOCK_N)
    if SPLIT:
        split = tl.program_id(2)
        n_split = tl.num_programs(2)
        lo = (total * split) // n_split
        hi = (total * (split + 1)) // n_split
    else:
        lo = 0
        hi = total

    m_i = tl.full([BLOCK_M], _M_INIT, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if HAS_PREFIX:
        acc, l_i, m_i = _walk_segment(acc, l_i, m_i, q, kpd, vpd, n0, 0, lo, hi, qk_scale, offs_n, BLOCK_N, DOT_PREC)
    if HAS_CACHE:
        acc, l_i, m_i = _walk_segment(acc, l_i, m_i, q, kcd, vcd, n1, t1, lo, hi, qk_scale, offs_n, BLOCK_N, DOT_PREC)
    kd, vd = _key_descs(K, V, b64, h, Lq, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
                        HEAD_DIM, BLOCK_N)
    acc, l_i, m_i = _walk_segment(acc, l_i, m_i, q, kd, vd, Lq, t2, lo, hi, qk_scale, offs_n, BLOCK_N, DOT_PREC)

    if SPLIT:
        # fp32 partials [S, B * H, Lq, D]: plain stores (the combine kernel reads them), as the pointer kernel
        offs_d = tl.arange(0, HEAD_DIM)
        part = (tl.program_id(2) * BH + bh).to(tl.int64) * Lq + offs_m
        tl.store(OPart + part[:, None] * HEAD_DIM + offs_d[None, :], acc / tl.maximum(l_i, 1e-30)[:, None],
                 mask=row_ok[:, None])
        tl.store(LsePart + part, tl.where(l_i > 0, m_i + tl.math.log2(tl.maximum(l_i, 1e-30)), float("-inf")),
                 mask=row_ok)
    else:
        _store_out_lse(acc, l_i, m_i, Out + b64 * stride_ob + h * stride_oh, stride_on, Lse + bh.to(tl.int64) * Lq, Lq,
                       start_m, offs_m, row_ok, HEAD_DIM, BLOCK_M, DOT_PREC)


_chunk_attn_fwd_tma_tuned = _autotuned(_chunk_attn_fwd_tma_kernel, "chunk_fwd_tma",
                                       ("HAS_CACHE", "HAS_PREFIX", "NSPLIT"))


@triton.jit
def _dq_walk_segment(dq, q, do, lse2, delta, kd, vd, n, qk_scale, offs_n,
                     BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    """dq over one segment of n keys. Keys past n: K and V rows are TMA zeros and the score bias is -inf, so
    P = 0 and dS = P (dO V^T - delta) = 0 there."""
    for t in range(0, tl.cdiv(n, BLOCK_N)):
        j = t * BLOCK_N
        k = kd.load([j, 0])
        v = vd.load([j, 0])
        dq = _dq_step(dq, q, do, lse2, delta, k, v, tl.where(j + offs_n < n, 0.0, float("-inf"))[None, :],
                      qk_scale, DOT_PREC)
    return dq


@triton.jit(do_not_specialize=["cache_len", "prefix_len", "LQ_BUCKET", "LK_BUCKET", "BH"])
def _chunk_attn_bwd_dq_tma_kernel(
    Q, K, V, DO, DQ, Lse, Delta, KC, VC, CLEN, CROWS, KP, VP, PLEN, PROWS,  # as _chunk_attn_bwd_dq_kernel
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_don, stride_doh,
    stride_dqb, stride_dqn, stride_dqh,
    stride_kcb, stride_kcn, stride_kch,
    stride_vcb, stride_vcn, stride_vch,
    stride_kpb, stride_kpn, stride_kph,
    stride_vpb, stride_vpn, stride_vph,
    cache_len, clen_stride, cache_max,
    prefix_len, plen_stride, prefix_max,
    H, Lq, qk_scale, sm_scale,
    LQ_BUCKET, LK_BUCKET, BH,  # autotune keys only
    HAS_CACHE: tl.constexpr, CLEN_PTR: tl.constexpr, CACHE_ROWS: tl.constexpr,
    HAS_PREFIX: tl.constexpr, PLEN_PTR: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # grid: (cdiv(Lq, BLOCK_M), B * H); the same segments as the forward, one loop each
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = offs_m < Lq
    b64 = b.to(tl.int64)
    q = _desc(Q + b64 * stride_qb + h * stride_qh, Lq, stride_qn, HEAD_DIM, BLOCK_M).load([start_m, 0])
    do = _desc(DO + b64 * stride_dob + h * stride_doh, Lq, stride_don, HEAD_DIM, BLOCK_M).load([start_m, 0])
    lse2 = tl.load(Lse + bh.to(tl.int64) * Lq + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + bh.to(tl.int64) * Lq + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if HAS_PREFIX:
        kpd, vpd, n0 = _segment_descs(KP, VP, PROWS, PLEN, prefix_len, plen_stride, prefix_max, b, h,
                                      stride_kpb, stride_kpn, stride_kph, stride_vpb, stride_vpn, stride_vph,
                                      True, PLEN_PTR, HEAD_DIM, BLOCK_N)
        dq = _dq_walk_segment(dq, q, do, lse2, delta, kpd, vpd, n0, qk_scale, offs_n, BLOCK_N, DOT_PREC)
    if HAS_CACHE:
        kcd, vcd, n1 = _segment_descs(KC, VC, CROWS, CLEN, cache_len, clen_stride, cache_max, b, h,
                                      stride_kcb, stride_kcn, stride_kch, stride_vcb, stride_vcn, stride_vch,
                                      CACHE_ROWS, CLEN_PTR, HEAD_DIM, BLOCK_N)
        dq = _dq_walk_segment(dq, q, do, lse2, delta, kcd, vcd, n1, qk_scale, offs_n, BLOCK_N, DOT_PREC)
    kd, vd = _key_descs(K, V, b64, h, Lq, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
                        HEAD_DIM, BLOCK_N)
    dq = _dq_walk_segment(dq, q, do, lse2, delta, kd, vd, Lq, qk_scale, offs_n, BLOCK_N, DOT_PREC)
    dq = dq * sm_scale
    dqd = _desc(DQ + b64 * stride_dqb + h * stride_dqh, Lq, stride_dqn, HEAD_DIM, BLOCK_M)
    dqd.store([start_m, 0], _cast(dq, DQ.dtype.element_ty, DOT_PREC))  # rows past Lq: clipped


@triton.jit(do_not_specialize=["LQ_BUCKET", "LK_BUCKET", "BH"])
def _dkdv_tma_kernel(
    Q, K, V, DO, DK, DV, Lse, Delta,  # as block_attn._dkdv_kernel
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_don, stride_doh,
    stride_dkb, stride_dkn, stride_dkh,
    stride_dvb, stride_dvn, stride_dvh,
    H, L, chunk_tokens, qk_scale, sm_scale,
    LQ_BUCKET, LK_BUCKET, BH,  # autotune keys only
    CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # grid: (cdiv(L, BLOCK_N), B * H); the chunk's own keys. q / dO rows past L are TMA zeros, which makes
    # their contributions 0 exactly as the pointer kernel's masked loads do.
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    b64 = b.to(tl.int64)
    start_n = pid_n * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    k = _desc(K + b64 * stride_kb + h * stride_kh, L, stride_kn, HEAD_DIM, BLOCK_N).load([start_n, 0])
    v = _desc(V + b64 * stride_vb + h * stride_vh, L, stride_vn, HEAD_DIM, BLOCK_N).load([start_n, 0])
    qd = _desc(Q + b64 * stride_qb + h * stride_qh, L, stride_qn, HEAD_DIM, BLOCK_M)
    dod = _desc(DO + b64 * stride_dob + h * stride_doh, L, stride_don, HEAD_DIM, BLOCK_M)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    lse_base = Lse + bh.to(tl.int64) * L
    delta_base = Delta + bh.to(tl.int64) * L
    if CAUSAL:  # the pointer kernel's query range: see block_attn._dkdv_kernel
        j_last = tl.minimum(start_n + BLOCK_N, L) - 1
        q_lo = ((start_n // chunk_tokens) * chunk_tokens // BLOCK_M) * BLOCK_M
        q_mid = (j_last // chunk_tokens) * chunk_tokens
    else:
        q_lo = 0
        q_mid = 0
    for start_m in range(q_lo, L, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + offs_m
        rmask = rows < L
        q = qd.load([start_m, 0])
        do = dod.load([start_m, 0])
        lse2 = tl.load(lse_base + rows, mask=rmask, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_base + rows, mask=rmask, other=0.0)
        qkT = _mma(k, tl.trans(q), None, DOT_PREC)
        dpT = _mma(v, tl.trans(do), None, DOT_PREC)
        pT = tl.math.exp2(qkT * qk_scale - lse2[None, :])
        if CAUSAL:
            if start_m < q_mid:
                kend = tl.minimum((rows // chunk_tokens + 1) * chunk_tokens, L)
                pT = tl.where(cols[:, None] < kend[None, :], pT, 0.0)
        dv = _mma(_cast(pT, k.dtype, DOT_PREC), do, dv, DOT_PREC)
        dsT = pT * (dpT - delta[None, :])
        dk = _mma(_cast(dsT, k.dtype, DOT_PREC), q, dk, DOT_PREC)
    dk = dk * sm_scale
    _desc(DK + b64 * stride_dkb + h * stride_dkh, L, stride_dkn, HEAD_DIM, BLOCK_N).store(
        [start_n, 0], _cast(dk, DK.dtype.element_ty, DOT_PREC))
    _desc(DV + b64 * stride_dvb + h * stride_dvh, L, stride_dvn, HEAD_DIM, BLOCK_N).store(
        [start_n, 0], _cast(dv, DV.dtype.element_ty, DOT_PREC))


# ---------------------------------------------------------------------------------------------------------
# Block-causal attention: forward and dq (dk/dv: _dkdv_tma_kernel with CAUSAL=True)
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _block_causal_fwd_tma_kernel(
    Q, K, V, Out, Lse,  # as block_attn._block_causal_fwd_kernel
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_on, stride_oh,
    H, L, chunk_tokens, qk_scale,
    LQ_BUCKET, LK_BUCKET, BH,  # autotune keys only
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # grid: (cdiv(L, BLOCK_M), B * H), heaviest (last) q tiles first, as the pointer kernel
    bh, b, h, offs_m, row_ok, kend, lo_end, hi_end = _causal_q_tile(H, L, chunk_tokens, BLOCK_M)
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # _causal_q_tile's tile
    offs_n = tl.arange(0, BLOCK_N)
    b64 = b.to(tl.int64)
    q = _desc(Q + b64 * stride_qb + h * stride_qh, L, stride_qn, HEAD_DIM, BLOCK_M).load([start_m, 0])
    kd, vd = _key_descs(K, V, b64, h, hi_end, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn,
                               stride_vh, HEAD_DIM, BLOCK_N)
    m_i = tl.full([BLOCK_M], _M_INIT, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, hi_end, BLOCK_N):  # only tiles past lo_end take the per-row mask
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k = kd.load([start_n, 0])
        s = _mma(q, tl.trans(k), None, DOT_PREC) * qk_scale
        if start_n + BLOCK_N > lo_end:
            s = tl.where((start_n + offs_n)[None, :] < kend[:, None], s, float("-inf"))
        v = vd.load([start_n, 0])
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, s, v, DOT_PREC)
    _store_out_lse(acc, l_i, m_i, Out + b64 * stride_ob + h * stride_oh, stride_on, Lse + bh.to(tl.int64) * L, L,
                   start_m, offs_m, row_ok, HEAD_DIM, BLOCK_M, DOT_PREC)


_block_causal_fwd_tma_tuned = _autotuned(_block_causal_fwd_tma_kernel, "block_causal_fwd_tma")


@triton.jit(do_not_specialize=["LQ_BUCKET", "LK_BUCKET", "BH"])
def _block_causal_bwd_dq_tma_kernel(
    Q, K, V, DO, DQ, Lse, Delta,  # as block_attn._block_causal_bwd_dq_kernel
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_don, stride_doh,
    stride_dqb, stride_dqn, stride_dqh,
    H, L, chunk_tokens, qk_scale, sm_scale,
    LQ_BUCKET, LK_BUCKET, BH,  # autotune keys only
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # grid: (cdiv(L, BLOCK_M), B * H), heaviest q tiles first; the forward's key range and descriptors
    bh, b, h, offs_m, row_ok, kend, lo_end, hi_end = _causal_q_tile(H, L, chunk_tokens, BLOCK_M)
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    offs_n = tl.arange(0, BLOCK_N)
    b64 = b.to(tl.int64)
    q = _desc(Q + b64 * stride_qb + h * stride_qh, L, stride_qn, HEAD_DIM, BLOCK_M).load([start_m, 0])
    do = _desc(DO + b64 * stride_dob + h * stride_doh, L, stride_don, HEAD_DIM, BLOCK_M).load([start_m, 0])
    lse2 = tl.load(Lse + bh.to(tl.int64) * L + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + bh.to(tl.int64) * L + offs_m, mask=row_ok, other=0.0)
    kd, vd = _key_descs(K, V, b64, h, hi_end, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn,
                               stride_vh, HEAD_DIM, BLOCK_N)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, hi_end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k = kd.load([start_n, 0])
        v = vd.load([start_n, 0])
        # per-element bias: 0 on every tile below lo_end (one select, as the pointer kernel)
        bias = tl.where((start_n + offs_n)[None, :] < kend[:, None], 0.0, float("-inf"))
        dq = _dq_step(dq, q, do, lse2, delta, k, v, bias, qk_scale, DOT_PREC)
    dq = dq * sm_scale
    dqd = _desc(DQ + b64 * stride_dqb + h * stride_dqh, L, stride_dqn, HEAD_DIM, BLOCK_M)
    dqd.store([start_m, 0], _cast(dq, DQ.dtype.element_ty, DOT_PREC))  # rows past L: clipped


_chunk_attn_bwd_dq_tma_tuned = _autotuned_bwd(_chunk_attn_bwd_dq_tma_kernel, "chunk_dq_tma", "dq",
                                              ("HAS_CACHE", "HAS_PREFIX"))
_block_causal_bwd_dq_tma_tuned = _autotuned_bwd(_block_causal_bwd_dq_tma_kernel, "block_causal_dq_tma", "dq")
_dkdv_tma_tuned = _autotuned_bwd(_dkdv_tma_kernel, "dkdv_tma", "dkdv", ("CAUSAL",))
