"""Block attention kernels: KV-cached chunk attention and full-sequence block-causal attention.

Forward and backward in Triton, with the flash-attention recurrence (online softmax, fp32 accumulation,
log-sum-exp saved for the backward). Written from the papers and the public design of Triton's
fused-attention tutorial; none of its code is copied:
  - FlashAttention (Dao et al., 2022), FlashAttention-2 (Dao, 2023): tiling, online softmax, the
    dq / dk-dv split of the backward with the row statistic delta = rowsum(dO * O).
  - Triton tutorial 06 (fused attention): exp2 with log2(e) folded into the scale; autotuned forward,
    fixed-constant backward.
  - Flash-decoding (Dao et al., 2023): split-KV with a log-sum-exp combine when the grid is short.

Two ops (arcopo_fast.ops dispatches to them; kernels/reference.py has the torch references):

1. chunk_attention: a chunk's queries attend, without a mask, to three key segments per batch row b

       |<- k_prefix[prefix_rows[b], :prefix_len_b] ->|<- k_cache[cache_rows[b], :cache_len_b] ->|<- k[b] ->|
           zero-copy fork: a parent's prefix               the row's own KV cache                  the chunk

   One loop walks the segments as one flattened sequence of key tiles: segment s owns tiles [t_s, t_s+1),
   each segment starting on a fresh tile (so a tile never spans two memory rows), and the tile's segment
   (base pointer, token stride, valid length) is picked with scalar selects, so the loop body has no branch
   and one K and one V load for the software pipeliner. Keys past a segment's length (only its last tile
   can have any) get a -inf column bias folded into the scaling FMA: no per-element select. Rows are read
   through an int32 row table (no gather copy), and lengths come as ints or device tensors (no host sync).
   The segments share q's element type (a cache in another dtype is converted first: a copy).
   Gradients go to q, k, v only: the prefix and cache are constants, so the backward does no dk/dv work
   on them (SDPA on the concatenation does that work and throws it away). The dq kernel walks the same
   flattened tiles (dO V^T issued before the exp2, so it overlaps the softmax recomputation); the dk/dv
   kernel covers only the chunk's own keys.

2. block_causal_attention: teacher forcing over a whole sequence. A query of chunk c sees the keys of
   chunks <= c. The last chunk may be partial. Tiles above the block diagonal are never visited:

       keys ->     c0        c1        c2 (partial)
       c0       [#### ...][         ][      ]       #  = attend; tiles over blank areas are skipped
       c1       [#### ...][#### ... ][      ]       tiles that straddle a chunk edge are the only masked
       c2       [#### ...][#### ... ][######]       ones (one loop; a scalar test picks the masked step)

   At inference the same structure comes from chunk_attention with the KV cache: chunk c's queries see
   [cache = chunks < c ; own chunk c]. So row c of the drawing is one chunk_attention call with
   cache_len = c * chunk_tokens.

TMA (kernels/block_attn_tma.py, sm_90+). The same forward, dq and dk/dv with their tiles moved by TMA
through device-side tensor descriptors: one descriptor per segment of row b (the row's length as its shape,
so the keys past it are zero-filled by the TMA unit, never read), one loop per segment; the block-causal
forward and dq cut their one K / V descriptor at the q tile's last visible key. Opt-in (tma=True;
the "triton_tma" backend of arcopo_fast.ops, timed by the measured backend choice); layouts TMA cannot
address fall back to the pointer kernels here.

Scheduling. The forward grid is (q tiles, B * H, splits). Program 0 runs fastest, so neighbouring
programs are q tiles of the same (b, h) and share its K/V in L2. At the production shape (Lq 4680, H 12,
D 128) B = 1 gives 37 q tiles x 12 heads = 444 programs at BLOCK_M = 128: 3.4 waves on 132 SMs, the last
one a third full. When the grid is below SPLIT_KV["waves"] waves, the chunk forward splits each q tile's
key walk into contiguous shares (split-KV): each split writes a normalised fp32 partial output and its
log-sum-exp, and _split_combine_kernel merges them (a second, small launch). The autotune key holds the
buckets of Lq and of the longest key walk (Lk), the head count x batch, and the split count, so a config
tuned at the first chunk (Lk = Lq) does not serve Lk = 32760. The backward's dq and dk/dv kernels are
autotuned the same way, over the few tiles per head dim of BWD_DQ_CONFIGS / BWD_DKDV_CONFIGS. Every
autotuner prunes the tiles that spill in its own kernel (SPILLING_D128) and compiles a new key's candidates
on a thread pool before timing them (kernels/_autotune.py). The block-causal kernels launch the heaviest q
tiles first (reverse order) to shorten the tail of the last wave.

fp32 on CUDA: the dots run as TF32 on the tensor cores (torch's allow_tf32 accuracy), never as the "ieee"
FMA loop (kilobytes of spills per thread on sm_90); arcopo_fast.ops sends fp32 attention on CUDA to the
torch path unless the triton backend is requested. The interpreter computes fp32 dots exactly.

No host syncs: lengths and row tables are read in-kernel (int lengths are kernel scalars), and shapes
decide the grid. The launches can be captured in a CUDA graph. Warm the autotuner up first: its first
call per key benchmarks the configs.

torch.compile. chunk_attention and block_causal_attention run through torch.library custom ops
(arcopo_fast::chunk_attention, ::block_causal_attention and their _bwd ops, with fake impls and
register_autograd; see the section "torch.library custom ops"), so torch.compile(fullgraph=True) traces a
model that calls them without a graph break, and keeps them opaque. The *_fwd entries launch directly.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import _autotune
from ._launch import interpreting, on_device

LOG2E = 1.4426950408889634
_HEAD_DIMS = (16, 32, 64, 128)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# "Minus infinity" for the running max: finite, so a tile whose entries are all masked yields
# exp2(-inf - m) = 0 and never -inf - (-inf) = NaN.
_M_INIT = tl.constexpr(-1.0e30)


def _gpu_tiles() -> bool:
    """GPU tile sizes (the autotuners of the forward and backward) rather than INTERPRET_BLOCKS. A function
    so that a test can run the GPU launch path, configs included, under the interpreter."""
    return not interpreting()


# Tile sizes under the CPU interpreter: small, so tests cover many tile boundaries on tiny shapes. They
# are module-level so that tests can change them (BLOCK_M != BLOCK_N exercises more of the tile logic).
INTERPRET_BLOCKS = {"fwd": (16, 16), "dq": (16, 16), "dkdv": (16, 16)}

# Backward tile candidates on the GPU, per head dim: (BLOCK_M, BLOCK_N, warps, stages). dq: a long-lived q
# tile walks key tiles; dk/dv: a long-lived key tile walks q tiles. The autotuner times the candidates of a
# head dim that the kernel's row of SPILLING_D128 keeps (one candidate: nothing to time; the first of each
# D = 128 list was the fixed config before). dq at D = 128 keeps key tiles of 64 or more, so that its
# N = 64 GEMMs (q k^T, dO v^T) keep wgmma fed from shared memory (N = 32 needs more operand bandwidth than
# shared memory gives). Register / spill figures: docs/performance.md (compile table).
BWD_DQ_CONFIGS = {
    16: [(64, 32, 4, 3)], 32: [(64, 32, 4, 3)], 64: [(128, 64, 8, 3)],
    128: [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 8, 2), (64, 64, 8, 3), (64, 64, 4, 2), (128, 128, 8, 2)],
}
BWD_DKDV_CONFIGS = {
    16: [(32, 64, 4, 3)], 32: [(32, 64, 4, 3)], 64: [(64, 128, 8, 3)],
    128: [(32, 128, 8, 3), (32, 128, 8, 2), (64, 64, 8, 3), (32, 64, 4, 3)],
}

# Split-KV of the chunk forward (flash-decoding's idea, applied when the grid is short): with fewer than
# `waves` x SMs programs, each q tile's key walk is cut into up to `max_splits` contiguous shares of at
# least `min_tiles` key tiles, computed by separate programs, and _split_combine_kernel merges the partial
# outputs through their log-sum-exps. The program count is estimated with block_m (the kept configs at
# D = 128 are 128-row tiles) and one CTA per SM. B = 1 at the production shape: 37 x 12 = 444 programs,
# 3.4 waves on 132 SMs (the last one a third full) -> 3 splits, 1332 programs, 10.1 waves.
SPLIT_KV = {"waves": 8, "max_splits": 16, "min_tiles": 4, "block_m": 128, "block_n": 64}
COMBINE_CONFIG = (32, 4)  # (BLOCK_M, warps) of _split_combine_kernel


def _empty(shape, *, dtype, device) -> torch.Tensor:
    """Every output buffer of this module comes from here (tests patch it to poison outputs with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------------------
# Forward autotune configs (GPU only; the interpreter uses INTERPRET_BLOCKS)
# ---------------------------------------------------------------------------------------------------------

# Tiles (BLOCK_M, BLOCK_N, warps, stages) that spill registers at D = 128 in the sm_90 compile report, per
# kernel (the same tile spills in one kernel and not in another) and element size (2: bf16/fp16; 4: fp32
# through TF32 dots), under triton 3.9 (this machine, CI) or 3.6 (the GPU machines): pruned at D = 128.
# "chunk_fwd" covers both of its split variants, "dkdv" both of its CAUSAL variants.
# tests/test_compile_report.py fails when a kept config spills under the installed triton, which is when
# to add to this table.
_W4_128_ROWS = {(128, bn, 4, s) for bn in (64, 128) for s in (2, 3, 4)}  # spill in every forward
_FWD_FP32 = {(64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 3), (128, 64, 8, 2)}  # chunk_fwd's, applied to all
_DKDV = {(32, 128, 4, 3), (64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 8, 2), (64, 128, 8, 3)}
SPILLING_D128 = {
    "chunk_fwd": {2: _W4_128_ROWS | {(64, 128, 4, s) for s in (2, 3, 4)} | {(64, 128, 8, 3), (64, 128, 8, 4)}
                  | {(128, 128, 8, s) for s in (2, 3, 4)}, 4: _FWD_FP32},
    "chunk_fwd_tma": {2: _W4_128_ROWS, 4: _FWD_FP32},
    "block_causal_fwd": {2: _W4_128_ROWS, 4: _FWD_FP32},
    "block_causal_fwd_tma": {2: _W4_128_ROWS, 4: _FWD_FP32},
    "chunk_dq": {2: {(64, 128, 8, 2)}},
    "chunk_dq_tma": {2: set()},
    "block_causal_dq": {2: {(128, 128, 8, 2)}},
    "block_causal_dq_tma": {2: set()},
    "dkdv": {2: _DKDV},
    "dkdv_tma": {2: _DKDV},
}
# The 8-warp 128x64 forwards get a register budget: left alone, ptxas spends 210-225 registers on them,
# while 168 compile without a spill (arcopo_fast.compile_report), leaving the scheduler less room to
# serialise the softmax behind the MMAs.
FWD_MAXNREG = {(128, 64, 8): 168}
_FWD_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s, maxnreg=FWD_MAXNREG.get((bm, bn, w)))
    for bm in (64, 128)
    for bn in (64, 128)
    for w in (4, 8)
    for s in (2, 3, 4)
]
_SMEM_BUDGET = 227 * 1024  # bytes: sm_90's per-block maximum


def _keep_fwd_config(conf: triton.Config, head_dim: int, lq_bucket: int, elem_bytes: int, kernel: str) -> bool:
    """Drop the forward configs that cannot fit, that spill in `kernel` (SPILLING_D128), or whose q tile
    exceeds the chunk. Calibrated with arcopo_fast.compile_report (sm_90, D = 128): docs/performance.md."""
    bm, bn, w, s = _autotune.tile(conf)
    # q tile + num_stages buffers of the K and V tiles (what triton allocates, checked as above)
    smem = (bm * head_dim + s * 2 * bn * head_dim) * elem_bytes
    regs = (bm * head_dim + bm * bn) // (32 * w)  # fp32 accumulator + score tile, per thread
    if smem > _SMEM_BUDGET or regs > 128 or (w == 4 and regs >= 128):
        return False
    if not _autotune.spill_free([conf], SPILLING_D128[kernel], head_dim, elem_bytes):
        return False
    return bm <= max(64, lq_bucket)


def _fwd_pruner(kernel: str):
    """early_config_prune of `kernel`'s forward autotuner (a name of SPILLING_D128)."""
    def prune(configs, named_args, **kwargs):
        head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
        lq_bucket = named_args.get("LQ_BUCKET", 1 << 30)
        elem = named_args["Q"].element_size()
        kept = [c for c in configs if _keep_fwd_config(c, head_dim, lq_bucket, elem, kernel)]
        return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages))]

    prune.kernel = kernel
    return prune


def _bwd_pruner(kernel: str, candidates: dict):
    """early_config_prune of a backward autotuner: the head dim's candidates that do not spill in `kernel`.
    fp32 inputs (TF32 dots; arcopo_fast.ops sends fp32 CUDA attention to SDPA unless asked) keep the head
    dim's first candidate only: the compile report does not cover the fp32 backward."""
    def prune(configs, named_args, **kwargs):
        head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
        mine = sorted((c for c in configs if _autotune.tile(c) in candidates[head_dim]),
                      key=lambda c: candidates[head_dim].index(_autotune.tile(c)))
        elem = named_args["Q"].element_size()
        kept = _autotune.spill_free(mine, SPILLING_D128[kernel], head_dim, elem) if elem < 4 else []
        return kept or mine[:1]

    prune.kernel = kernel
    return prune


def _bwd_configs(candidates: dict) -> list:
    tiles = dict.fromkeys(t for per_dim in candidates.values() for t in per_dim)  # ordered, unique
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in tiles]


def _autotuned(kernel, name: str, extra_keys=()):
    """The forward autotuner of `kernel` (its spill table: SPILLING_D128[name]). Keys are shape parameters
    only (the autotuner adds every tensor argument's dtype)."""
    keys = ["HEAD_DIM", "LQ_BUCKET", "LK_BUCKET", "BH", *extra_keys]
    return _autotune.autotune(kernel, _FWD_CONFIGS, keys, _fwd_pruner(name))


def _autotuned_bwd(kernel, name: str, kind: str, extra_keys=()):
    """The dq (kind "dq") or dk/dv ("dkdv") autotuner of `kernel`, keyed like the forward."""
    candidates = BWD_DQ_CONFIGS if kind == "dq" else BWD_DKDV_CONFIGS
    keys = ["HEAD_DIM", "LQ_BUCKET", "LK_BUCKET", "BH", *extra_keys]
    return _autotune.autotune(kernel, _bwd_configs(candidates), keys, _bwd_pruner(name, candidates))


# ---------------------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _head_base(P, b, h, stride_b, stride_h):
    """Pointer to row b, head h of a [B, L, H, D] tensor (int64 batch offset: B * L * H * D may pass 2^31)."""
    return P + b.to(tl.int64) * stride_b + h * stride_h


@triton.jit
def _tile_ptrs(P, b, h, stride_b, stride_h, rows, stride_n, offs_d):
    """[len(rows), D] pointers of tokens `rows` of row b, head h."""
    return _head_base(P, b, h, stride_b, stride_h) + rows[:, None] * stride_n + offs_d[None, :]


@triton.jit
def _mma(a, b, acc, DOT_PREC: tl.constexpr):
    """a @ b + acc with fp32 accumulation. DOT_PREC "upcast" feeds fp32 copies: the CPU interpreter of
    triton 3.9 multiplies bf16 operands as their raw uint16 bits, and bf16 x bf16 products are exact in fp32,
    so the result equals the tensor-core one (up to summation order)."""
    if DOT_PREC == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def _cast(x, dtype, DOT_PREC: tl.constexpr):
    """x.to(dtype) rounding to nearest even. Under "upcast" (interpreter + bf16) the rounding is done here
    on the fp32 bits: triton 3.9's interpreter truncates fp32 -> bf16, the GPU rounds to nearest."""
    if DOT_PREC == "upcast":
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(dtype)
    else:
        return x.to(dtype)


@triton.jit
def _segment(
    KX, VX, ROWS, LENS, len_scalar, len_stride, len_max, b, h,
    stride_kb, stride_kh, stride_vb, stride_vh,
    HAS_ROWS: tl.constexpr, LEN_PTR: tl.constexpr,
):
    """(K base, V base, valid length) of batch row b's segment: row ROWS[b] (or b), length clamped."""
    if HAS_ROWS:
        r = tl.load(ROWS + b).to(tl.int64)
    else:
        r = b.to(tl.int64)
    if LEN_PTR:
        n = tl.load(LENS + b * len_stride).to(tl.int32)
    else:
        n = len_scalar
    n = tl.minimum(tl.maximum(n, 0), len_max)
    return KX + r * stride_kb + h * stride_kh, VX + r * stride_vb + h * stride_vh, n


@triton.jit
def _chunk_keys(
    K, V, KC, VC, CLEN, CROWS, KP, VP, PLEN, PROWS, b, h,
    stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_kcb, stride_kcn, stride_kch, stride_vcb, stride_vcn, stride_vch,
    stride_kpb, stride_kpn, stride_kph, stride_vpb, stride_vpn, stride_vph,
    cache_len, clen_stride, cache_max, prefix_len, plen_stride, prefix_max, Lq,
    HAS_CACHE: tl.constexpr, CLEN_PTR: tl.constexpr, CACHE_ROWS: tl.constexpr,
    HAS_PREFIX: tl.constexpr, PLEN_PTR: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The flattened key walk of batch row b, head h: segment 0 = prefix, 1 = cache, 2 = the chunk's own
    keys. Segment s is (K base, V base, length, K token stride, V token stride) and owns the tiles
    [t_s, t_{s+1}) of the walk (t_0 = 0, t_3 = total); each segment starts on a fresh tile, so a tile never
    spans two memory rows, and only a segment's last tile can be partial. An absent segment has no tiles."""
    k2 = _head_base(K, b, h, stride_kb, stride_kh)
    v2 = _head_base(V, b, h, stride_vb, stride_vh)
    if HAS_CACHE:
        k1, v1, n1 = _segment(KC, VC, CROWS, CLEN, cache_len, clen_stride, cache_max, b, h,
                              stride_kcb, stride_kch, stride_vcb, stride_vch, CACHE_ROWS, CLEN_PTR)
        skn1, svn1 = stride_kcn, stride_vcn
    else:
        k1, v1, n1, skn1, svn1 = k2, v2, Lq * 0, stride_kn, stride_vn
    if HAS_PREFIX:
        k0, v0, n0 = _segment(KP, VP, PROWS, PLEN, prefix_len, plen_stride, prefix_max, b, h,
                              stride_kpb, stride_kph, stride_vpb, stride_vph, True, PLEN_PTR)
        skn0, svn0 = stride_kpn, stride_vpn
    else:
        k0, v0, n0, skn0, svn0 = k1, v1, Lq * 0, skn1, svn1
    t1 = tl.cdiv(n0, BLOCK_N)
    t2 = t1 + tl.cdiv(n1, BLOCK_N)
    total = t2 + tl.cdiv(Lq, BLOCK_N)
    return (k0, v0, n0, skn0, svn0, k1, v1, n1, skn1, svn1, k2, v2, Lq, stride_kn, stride_vn, t1, t2, total)


@triton.jit
def _key_tile(
    t, k0, v0, n0, skn0, svn0, k1, v1, n1, skn1, svn1, k2, v2, n2, skn2, svn2, t1, t2,
    offs_n, offs_d, BLOCK_N: tl.constexpr,
):
    """Tile t of the flattened key walk (see _chunk_keys): its K and V pointers [BLOCK_N, D] and the mask of
    its valid keys [BLOCK_N]. The segment is chosen with scalar selects, so the loop body has no branch
    and the software pipeliner sees one load of K and one of V per iteration."""
    in1 = t >= t1
    in2 = t >= t2
    kb = tl.where(in2, k2, tl.where(in1, k1, k0))
    vb = tl.where(in2, v2, tl.where(in1, v1, v0))
    skn = tl.where(in2, skn2, tl.where(in1, skn1, skn0))
    svn = tl.where(in2, svn2, tl.where(in1, svn1, svn0))
    n = tl.where(in2, n2, tl.where(in1, n1, n0))
    cols = (t - tl.where(in2, t2, tl.where(in1, t1, 0))) * BLOCK_N + offs_n
    return kb + cols[:, None] * skn + offs_d[None, :], vb + cols[:, None] * svn + offs_d[None, :], cols < n


@triton.jit
def _softmax_step(acc, l_i, m_i, s, v, DOT_PREC: tl.constexpr):
    """One online-softmax update with the scaled scores s [BLOCK_M, BLOCK_N] (log2 units, -inf = masked)."""
    m_ij = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_ij[:, None])
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = _mma(_cast(p, v.dtype, DOT_PREC), v, acc, DOT_PREC)
    return acc, l_i, m_ij


# ---------------------------------------------------------------------------------------------------------
# Chunk attention: forward (+ split-KV combine), dq, dk/dv
# ---------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["cache_len", "prefix_len"])
def _chunk_attn_fwd_kernel(
    Q, K, V, Out, Lse,  # Q, K, V, Out: [B, Lq, H, D]; Lse: [B, H, Lq] fp32 (natural log)
    OPart, LsePart,  # SPLIT: fp32 [S, B * H, Lq, D] normalised partial outputs, [S, B * H, Lq] log2-sum-exp
    KC, VC, CLEN, CROWS,  # cache [Rc, Lc, H, D] x2; CLEN int [B] or [1] (if CLEN_PTR); CROWS int [B]
    KP, VP, PLEN, PROWS,  # prefix [Rp, Lp, H, D] x2; PLEN, PROWS as above
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
    LQ_BUCKET, LK_BUCKET, BH, NSPLIT,  # autotune keys only (the split count is tl.num_programs(2))
    HAS_CACHE: tl.constexpr, CLEN_PTR: tl.constexpr, CACHE_ROWS: tl.constexpr,
    HAS_PREFIX: tl.constexpr, PLEN_PTR: tl.constexpr, SPLIT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # grid: (cdiv(Lq, BLOCK_M), B * H, S); split s of S walks the s-th contiguous share of the key tiles
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Lq
    q = tl.load(_tile_ptrs(Q, b, h, stride_qb, stride_qh, offs_m, stride_qn, offs_d), mask=row_ok[:, None], other=0.0)

    k0, v0, n0, skn0, svn0, k1, v1, n1, skn1, svn1, k2, v2, n2, skn2, svn2, t1, t2, total = _chunk_keys(
        K, V, KC, VC, CLEN, CROWS, KP, VP, PLEN, PROWS, b, h,
        stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
        stride_kcb, stride_kcn, stride_kch, stride_vcb, stride_vcn, stride_vch,
        stride_kpb, stride_kpn, stride_kph, stride_vpb, stride_vpn, stride_vph,
        cache_len, clen_stride, cache_max, prefix_len, plen_stride, prefix_max, Lq,
        HAS_CACHE, CLEN_PTR, CACHE_ROWS, HAS_PREFIX, PLEN_PTR, BLOCK_N)
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
    for t in range(lo, hi):
        k_ptrs, v_ptrs, ok = _key_tile(t, k0, v0, n0, skn0, svn0, k1, v1, n1, skn1, svn1, k2, v2, n2, skn2, svn2,
                                       t1, t2, offs_n, offs_d, BLOCK_N)
        k = tl.load(k_ptrs, mask=ok[:, None], other=0.0)
        qk = _mma(q, tl.trans(k), None, DOT_PREC)
        # Keys past a segment's length: a -inf column bias, folded into the scaling FMA (no per-element select)
        s = qk * qk_scale + tl.where(ok, 0.0, float("-inf"))[None, :]
        v = tl.load(v_ptrs, mask=ok[:, None], other=0.0)
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, s, v, DOT_PREC)

    if SPLIT:
        # A split without tiles (l = 0) stores 0 and log2-sum-exp -inf: the combine gives it no weight.
        part = (tl.program_id(2) * BH + bh).to(tl.int64) * Lq + offs_m
        tl.store(OPart + part[:, None] * HEAD_DIM + offs_d[None, :], acc / tl.maximum(l_i, 1e-30)[:, None],
                 mask=row_ok[:, None])
        tl.store(LsePart + part, tl.where(l_i > 0, m_i + tl.math.log2(tl.maximum(l_i, 1e-30)), float("-inf")),
                 mask=row_ok)
    else:
        acc = acc / l_i[:, None]
        tl.store(_tile_ptrs(Out, b, h, stride_ob, stride_oh, offs_m, stride_on, offs_d),
                 _cast(acc, Out.dtype.element_ty, DOT_PREC), mask=row_ok[:, None])
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # back to natural log
        tl.store(Lse + bh.to(tl.int64) * Lq + offs_m, lse, mask=row_ok)


@triton.jit
def _split_combine_kernel(
    OPart, LsePart, Out, Lse,  # OPart fp32 [S, B * H, Lq, D], LsePart [S, B * H, Lq] (log2); Out [B, Lq, H, D]
    stride_ob, stride_on, stride_oh,
    H, Lq, BH, S,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # grid: (cdiv(Lq, BLOCK_M), B * H); out = sum_s 2^(lse_s - lse) O_s, lse = log2 sum_s 2^lse_s
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Lq
    mx = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for s in range(0, S):
        part = (s * BH + bh).to(tl.int64) * Lq + offs_m
        mx = tl.maximum(mx, tl.load(LsePart + part, mask=row_ok, other=0.0))
    den = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for s in range(0, S):
        part = (s * BH + bh).to(tl.int64) * Lq + offs_m
        w = tl.math.exp2(tl.load(LsePart + part, mask=row_ok, other=0.0) - mx)
        o = tl.load(OPart + part[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        den += w
        acc += o * w[:, None]
    tl.store(_tile_ptrs(Out, b, h, stride_ob, stride_oh, offs_m, stride_on, offs_d),
             _cast(acc / den[:, None], Out.dtype.element_ty, DOT_PREC), mask=row_ok[:, None])
    tl.store(Lse + bh.to(tl.int64) * Lq + offs_m, (mx + tl.math.log2(den)) * 0.6931471805599453, mask=row_ok)


@triton.jit
def _bwd_delta_kernel(
    Out, DO, Delta,  # Out, DO: [B, L, H, D]; Delta: [B, H, L] fp32
    stride_ob, stride_on, stride_oh, stride_dob, stride_don, stride_doh,
    H, L, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # grid: (cdiv(L, BLOCK_M), B * H); delta = rowsum(dO * O), the softmax-backward row term
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = offs_m < L
    o = tl.load(_tile_ptrs(Out, b, h, stride_ob, stride_oh, offs_m, stride_on, offs_d),
                mask=ok[:, None], other=0.0)
    do = tl.load(_tile_ptrs(DO, b, h, stride_dob, stride_doh, offs_m, stride_don, offs_d),
                 mask=ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + bh.to(tl.int64) * L + offs_m, delta, mask=ok)


@triton.jit
def _dq_step(dq, q, do, lse2, delta, k, v, bias, qk_scale, DOT_PREC: tl.constexpr):
    """dq += dS K for one key tile, dS = P * (dO V^T - delta), P = exp2(q k^T * scale + bias - lse2)
    (bias: 0 or -inf per key, or per element). dO V^T is issued before the exp2: it does not depend on P,
    so the second MMA runs while the softmax recomputation does."""
    qk = _mma(q, tl.trans(k), None, DOT_PREC)
    dp = _mma(do, tl.trans(v), None, DOT_PREC)
    p = tl.math.exp2(qk * qk_scale - lse2[:, None] + bias)
    ds = p * (dp - delta[:, None])
    return _mma(_cast(ds, k.dtype, DOT_PREC), k, dq, DOT_PREC)


@triton.jit(do_not_specialize=["cache_len", "prefix_len", "LQ_BUCKET", "LK_BUCKET", "BH"])
def _chunk_attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, Lse, Delta,  # Q, K, V, DQ: [B, Lq, H, D]; DO strided like Out; Lse, Delta [B, H, Lq]
    KC, VC, CLEN, CROWS, KP, VP, PLEN, PROWS,
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
    # grid: (cdiv(Lq, BLOCK_M), B * H); the same flattened key walk as the forward
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Lq
    q = tl.load(_tile_ptrs(Q, b, h, stride_qb, stride_qh, offs_m, stride_qn, offs_d),
                mask=row_ok[:, None], other=0.0)
    do = tl.load(_tile_ptrs(DO, b, h, stride_dob, stride_doh, offs_m, stride_don, offs_d),
                 mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(Lse + bh.to(tl.int64) * Lq + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + bh.to(tl.int64) * Lq + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    k0, v0, n0, skn0, svn0, k1, v1, n1, skn1, svn1, k2, v2, n2, skn2, svn2, t1, t2, total = _chunk_keys(
        K, V, KC, VC, CLEN, CROWS, KP, VP, PLEN, PROWS, b, h,
        stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
        stride_kcb, stride_kcn, stride_kch, stride_vcb, stride_vcn, stride_vch,
        stride_kpb, stride_kpn, stride_kph, stride_vpb, stride_vpn, stride_vph,
        cache_len, clen_stride, cache_max, prefix_len, plen_stride, prefix_max, Lq,
        HAS_CACHE, CLEN_PTR, CACHE_ROWS, HAS_PREFIX, PLEN_PTR, BLOCK_N)
    for t in range(0, total):
        k_ptrs, v_ptrs, ok = _key_tile(t, k0, v0, n0, skn0, svn0, k1, v1, n1, skn1, svn1, k2, v2, n2, skn2, svn2,
                                       t1, t2, offs_n, offs_d, BLOCK_N)
        k = tl.load(k_ptrs, mask=ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=ok[:, None], other=0.0)
        dq = _dq_step(dq, q, do, lse2, delta, k, v, tl.where(ok, 0.0, float("-inf"))[None, :], qk_scale, DOT_PREC)
    dq = dq * sm_scale
    tl.store(_tile_ptrs(DQ, b, h, stride_dqb, stride_dqh, offs_m, stride_dqn, offs_d),
             _cast(dq, DQ.dtype.element_ty, DOT_PREC), mask=row_ok[:, None])


@triton.jit(do_not_specialize=["LQ_BUCKET", "LK_BUCKET", "BH"])
def _dkdv_kernel(
    Q, K, V, DO, DK, DV, Lse, Delta,  # [B, L, H, D] (DK, DV like K, V); Lse, Delta [B, H, L] fp32
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_don, stride_doh,
    stride_dkb, stride_dkn, stride_dkh,
    stride_dvb, stride_dvn, stride_dvh,
    H, L, chunk_tokens, qk_scale, sm_scale,
    LQ_BUCKET, LK_BUCKET, BH,  # autotune keys only
    CAUSAL: tl.constexpr,  # False: chunk attention (every query sees every own key); True: block-causal
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # grid: (cdiv(L, BLOCK_N), B * H); only the chunk's own keys (chunk attention) get dk/dv
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    start_n = pid_n * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = cols < L
    k = tl.load(_tile_ptrs(K, b, h, stride_kb, stride_kh, cols, stride_kn, offs_d),
                mask=col_ok[:, None], other=0.0)
    v = tl.load(_tile_ptrs(V, b, h, stride_vb, stride_vh, cols, stride_vn, offs_d),
                mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    q_base = _head_base(Q, b, h, stride_qb, stride_qh)
    do_base = _head_base(DO, b, h, stride_dob, stride_doh)
    lse_base = Lse + bh.to(tl.int64) * L
    delta_base = Delta + bh.to(tl.int64) * L
    if CAUSAL:
        # Queries of chunks before this tile's first key's chunk see none of it (never visited); queries
        # from the chunk of its last key on see all of it; tiles in between need the per-element mask.
        j_last = tl.minimum(start_n + BLOCK_N, L) - 1
        q_lo = ((start_n // chunk_tokens) * chunk_tokens // BLOCK_M) * BLOCK_M
        q_mid = (j_last // chunk_tokens) * chunk_tokens
    else:
        q_lo = 0
        q_mid = 0
    # One loop over the query tiles. Rows past L load q = dO = lse = delta = 0, which makes their
    # contributions exactly 0 (no score mask needed for them).
    for start_m in range(q_lo, L, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + offs_m
        rmask = rows < L
        q = tl.load(q_base + rows[:, None] * stride_qn + offs_d[None, :], mask=rmask[:, None], other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_don + offs_d[None, :], mask=rmask[:, None], other=0.0)
        lse2 = tl.load(lse_base + rows, mask=rmask, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_base + rows, mask=rmask, other=0.0)
        qkT = _mma(k, tl.trans(q), None, DOT_PREC)  # [BLOCK_N, BLOCK_M]
        dpT = _mma(v, tl.trans(do), None, DOT_PREC)  # before the exp2: independent of P
        pT = tl.math.exp2(qkT * qk_scale - lse2[None, :])
        if CAUSAL:
            if start_m < q_mid:
                kend = tl.minimum((rows // chunk_tokens + 1) * chunk_tokens, L)
                pT = tl.where(cols[:, None] < kend[None, :], pT, 0.0)
        dv = _mma(_cast(pT, k.dtype, DOT_PREC), do, dv, DOT_PREC)
        dsT = pT * (dpT - delta[None, :])
        dk = _mma(_cast(dsT, k.dtype, DOT_PREC), q, dk, DOT_PREC)
    dk = dk * sm_scale
    tl.store(_tile_ptrs(DK, b, h, stride_dkb, stride_dkh, cols, stride_dkn, offs_d),
             _cast(dk, DK.dtype.element_ty, DOT_PREC), mask=col_ok[:, None])
    tl.store(_tile_ptrs(DV, b, h, stride_dvb, stride_dvh, cols, stride_dvn, offs_d),
             _cast(dv, DV.dtype.element_ty, DOT_PREC), mask=col_ok[:, None])


# ---------------------------------------------------------------------------------------------------------
# Block-causal attention: forward, dq (dk/dv: _dkdv_kernel with CAUSAL=True)
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _causal_q_tile(H, L, chunk_tokens, BLOCK_M: tl.constexpr):
    """This program's q tile of the block-causal grid (cdiv(L, BLOCK_M), B * H), heaviest (last) tiles first
    to shorten the last wave: (bh, b, h, offs_m, row_ok, kend, lo_end, hi_end). Row i sees keys [0, kend_i);
    keys [0, lo_end) are visible to every row of the tile (no mask); keys >= hi_end are never visited."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    kend = tl.minimum((offs_m // chunk_tokens + 1) * chunk_tokens, L)
    lo_end = tl.minimum((start_m // chunk_tokens + 1) * chunk_tokens, L)
    i_last = tl.minimum(start_m + BLOCK_M, L) - 1
    hi_end = tl.minimum((i_last // chunk_tokens + 1) * chunk_tokens, L)
    return bh, bh // H, bh % H, offs_m, offs_m < L, kend, lo_end, hi_end


@triton.jit
def _block_causal_fwd_kernel(
    Q, K, V, Out, Lse,  # [B, L, H, D]; Lse [B, H, L] fp32
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_on, stride_oh,
    H, L, chunk_tokens, qk_scale,
    LQ_BUCKET, LK_BUCKET, BH,  # autotune keys only
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # grid: (cdiv(L, BLOCK_M), B * H), heaviest (last) q tiles first
    bh, b, h, offs_m, row_ok, kend, lo_end, hi_end = _causal_q_tile(H, L, chunk_tokens, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(_tile_ptrs(Q, b, h, stride_qb, stride_qh, offs_m, stride_qn, offs_d),
                mask=row_ok[:, None], other=0.0)
    k_base = _head_base(K, b, h, stride_kb, stride_kh)
    v_base = _head_base(V, b, h, stride_vb, stride_vh)
    m_i = tl.full([BLOCK_M], _M_INIT, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, hi_end, BLOCK_N):  # one loop; only tiles past lo_end take the per-row mask
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        kmask = (cols < hi_end)[:, None]
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=kmask, other=0.0)
        s = _mma(q, tl.trans(k), None, DOT_PREC) * qk_scale
        if start_n + BLOCK_N > lo_end:
            s = tl.where(cols[None, :] < kend[:, None], s, float("-inf"))
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=kmask, other=0.0)
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, s, v, DOT_PREC)
    acc = acc / l_i[:, None]
    tl.store(_tile_ptrs(Out, b, h, stride_ob, stride_oh, offs_m, stride_on, offs_d),
             _cast(acc, Out.dtype.element_ty, DOT_PREC), mask=row_ok[:, None])
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    tl.store(Lse + bh.to(tl.int64) * L + offs_m, lse, mask=row_ok)


@triton.jit(do_not_specialize=["LQ_BUCKET", "LK_BUCKET", "BH"])
def _block_causal_bwd_dq_kernel(
    Q, K, V, DO, DQ, Lse, Delta,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_don, stride_doh,
    stride_dqb, stride_dqn, stride_dqh,
    H, L, chunk_tokens, qk_scale, sm_scale,
    LQ_BUCKET, LK_BUCKET, BH,  # autotune keys only
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # grid: (cdiv(L, BLOCK_M), B * H), heaviest q tiles first; same key ranges as the forward
    bh, b, h, offs_m, row_ok, kend, lo_end, hi_end = _causal_q_tile(H, L, chunk_tokens, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(_tile_ptrs(Q, b, h, stride_qb, stride_qh, offs_m, stride_qn, offs_d),
                mask=row_ok[:, None], other=0.0)
    do = tl.load(_tile_ptrs(DO, b, h, stride_dob, stride_doh, offs_m, stride_don, offs_d),
                 mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(Lse + bh.to(tl.int64) * L + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + bh.to(tl.int64) * L + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    k_base = _head_base(K, b, h, stride_kb, stride_kh)
    v_base = _head_base(V, b, h, stride_vb, stride_vh)
    for start_n in range(0, hi_end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        kmask = (cols < hi_end)[:, None]
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=kmask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=kmask, other=0.0)
        # per-element bias: 0 on every tile below lo_end (one select; a branch would need a second step)
        bias = tl.where(cols[None, :] < kend[:, None], 0.0, float("-inf"))
        dq = _dq_step(dq, q, do, lse2, delta, k, v, bias, qk_scale, DOT_PREC)
    dq = dq * sm_scale
    tl.store(_tile_ptrs(DQ, b, h, stride_dqb, stride_dqh, offs_m, stride_dqn, offs_d),
             _cast(dq, DQ.dtype.element_ty, DOT_PREC), mask=row_ok[:, None])


# HAS_CACHE / HAS_PREFIX separate a video's first chunk (Lk = Lq) from the later ones.
_chunk_attn_fwd_tuned = _autotuned(_chunk_attn_fwd_kernel, "chunk_fwd", ("HAS_CACHE", "HAS_PREFIX", "NSPLIT"))
_block_causal_fwd_tuned = _autotuned(_block_causal_fwd_kernel, "block_causal_fwd")
_chunk_attn_bwd_dq_tuned = _autotuned_bwd(_chunk_attn_bwd_dq_kernel, "chunk_dq", "dq",
                                          ("HAS_CACHE", "HAS_PREFIX"))
_block_causal_bwd_dq_tuned = _autotuned_bwd(_block_causal_bwd_dq_kernel, "block_causal_dq", "dq")
_dkdv_tuned = _autotuned_bwd(_dkdv_kernel, "dkdv", "dkdv", ("CAUSAL",))


# ---------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------


def _s3(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch/row, token, head) strides of a [*, L, H, D] tensor whose last dim is contiguous."""
    return t.stride(0), t.stride(1), t.stride(2)


def _dot_prec_gpu(dtype: str) -> str:
    """DOT_PREC of a compiled (GPU) launch for a dtype name ("bf16", "fp16", "fp32"). fp32 inputs use TF32
    tensor-core dots (10-bit mantissa products, fp32 accumulation: torch's allow_tf32 accuracy), never the
    "ieee" FMA loop, which on sm_90 compiles to kilobytes of spills per thread and minutes of ptxas. 3xTF32
    (about fp32 accuracy) was measured with arcopo_fast.compile_report and spills 0.4-1.1 KB per thread in
    every config: not used. arcopo_fast.ops therefore sends fp32 attention on CUDA to the torch path (SDPA)
    unless backend="triton" is asked for."""
    return "tf32"  # half types ignore the setting


def _dot_prec(dtype: torch.dtype) -> str:
    if interpreting():  # "upcast": see _mma (interpreter bf16 bug); the interpreter's fp32 dot is exact
        return "upcast" if dtype == torch.bfloat16 else "ieee"
    return _dot_prec_gpu("fp32" if dtype == torch.float32 else "half")


def _lq_bucket(n: int) -> int:
    return min(triton.next_power_of_2(max(n, 1)), 8192)


def _lk_bucket(n: int) -> int:
    """Autotune bucket of the longest key walk (host-known bound: the segments' capacities + Lq)."""
    return min(triton.next_power_of_2(max(n, 1)), 65536)


def _segment_flags(*, cache_len_ptr: bool, cache_rows: bool, prefix_len_ptr: bool) -> dict:
    """constexpr flags of the chunk kernels with a cache and a prefix segment (the compile report's variant)."""
    return dict(HAS_CACHE=True, CLEN_PTR=cache_len_ptr, CACHE_ROWS=cache_rows, HAS_PREFIX=True,
                PLEN_PTR=prefix_len_ptr)


def _prep_qkv(q, k, v, name_q="q"):
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must share a [B, L, H, D] shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype in {_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] not in _HEAD_DIMS:
        raise ValueError(f"head dim (last dim of {name_q}) must be one of {_HEAD_DIMS}, got {q.shape[-1]}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.is_cuda or interpreting()):
        raise RuntimeError("block_attn kernels need CUDA tensors, or CPU tensors with TRITON_INTERPRET=1")
    # Only the head dim must be contiguous: token/head/batch strides are kernel arguments.
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))


def _scale(scale: float | None, head_dim: int) -> float:
    s = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if not s > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    return s


@dataclass
class _Segment:
    """One constant key segment: k, v [R, Lmax, H, D], length (int or int tensor [B]/[1]), rows int [B]."""

    k: torch.Tensor
    v: torch.Tensor
    length: int | torch.Tensor
    rows: torch.Tensor | None

    def kernel_args(self, dtype: torch.dtype):
        """(K, V, LEN, ROWS), strides, (len_scalar, len_stride, len_max), (LEN_PTR, HAS_ROWS). The flattened
        key walk selects among the segments' pointers, so they share q's element type: a segment of another
        dtype is converted here (a copy; pass the cache in q's dtype to avoid it)."""
        k, v = (x if x.dtype == dtype else x.to(dtype) for x in (self.k, self.v))
        len_ptr = isinstance(self.length, torch.Tensor)
        lens = self.length if len_ptr else k  # any pointer when unused
        rows = self.rows if self.rows is not None else k
        len_stride = self.length.stride(0) if len_ptr and self.length.numel() > 1 else 0
        scalar = 0 if len_ptr else int(self.length)
        return (
            (k, v, lens, rows),
            (*_s3(k), *_s3(v)),
            (scalar, len_stride, k.shape[1]),
            (len_ptr, self.rows is not None),
        )


def _make_segment(name, kx, vx, length, rows, q, *, rows_required):
    """Validate one segment (k_<name>, v_<name>, <name>_len, <name>_rows); None when absent or empty."""
    if (kx is None) != (vx is None):
        raise ValueError(f"k_{name} and v_{name} must be given together")
    if kx is None:
        return None
    B, _, H, D = q.shape
    if kx.ndim != 4 or kx.shape[2:] != q.shape[2:] or vx.shape != kx.shape:
        raise ValueError(
            f"k_{name}/v_{name} must be [rows, Lmax, H={H}, D={D}], got {tuple(kx.shape)} and {tuple(vx.shape)}"
        )
    if kx.device != q.device or vx.device != q.device:
        raise ValueError(f"k_{name}/v_{name} must be on q's device {q.device}, got {kx.device}, {vx.device}")
    if kx.dtype not in _DTYPES or vx.dtype not in _DTYPES:
        raise ValueError(f"k_{name}/v_{name} dtype must be one of {_DTYPES}, got {kx.dtype}, {vx.dtype}")
    if kx.stride(-1) != 1 or vx.stride(-1) != 1:
        raise ValueError(f"k_{name}/v_{name} must be contiguous in the head dim (stride(-1) == 1)")
    if torch.is_grad_enabled() and (kx.requires_grad or vx.requires_grad):
        raise ValueError(f"k_{name}/v_{name} are constants here (no gradient); pass them detached")
    if isinstance(length, torch.Tensor):
        if length.ndim > 1 or length.numel() not in (1, B) or length.dtype.is_floating_point or length.dtype == torch.bool:
            raise ValueError(f"{name}_len must be an int or an integer tensor of shape [{B}] or [1], got "
                             f"{length.dtype} {tuple(length.shape)}")
        if length.device != q.device:
            raise ValueError(f"{name}_len must be on q's device {q.device}, got {length.device}")
    else:
        length = int(length)
        if not 0 <= length <= kx.shape[1]:
            raise ValueError(f"{name}_len must be in [0, {kx.shape[1]}] (k_{name}.shape[1]), got {length}")
        if length == 0:
            return None
    if rows is None:
        if rows_required:
            raise ValueError(f"{name}_rows is required with k_{name} (int32 [B]: the row each query row reads)")
        if kx.shape[0] < B:
            raise ValueError(f"k_{name} has {kx.shape[0]} rows for a batch of {B}; pass {name}_rows")
    else:
        if rows.shape != (B,) or rows.dtype.is_floating_point or rows.dtype == torch.bool:
            raise ValueError(f"{name}_rows must be an integer tensor of shape [{B}], got {rows.dtype} {tuple(rows.shape)}")
        if rows.device != q.device:
            raise ValueError(f"{name}_rows must be on q's device {q.device}, got {rows.device}")
        rows = rows.contiguous()  # read as ROWS + b
    return _Segment(kx, vx, length, rows)


def _segment_args(seg: _Segment | None, q: torch.Tensor):
    if seg is None:  # dummies, never read (HAS_* = False)
        return (q, q, q, q), (0,) * 6, (0, 0, 0), (False, False)
    return seg.kernel_args(q.dtype)


def _seg_capacity(seg: _Segment | None) -> int:
    """Host-known upper bound of a segment's length (no sync: tensor lengths are bounded by Lmax)."""
    if seg is None:
        return 0
    return seg.k.shape[1] if isinstance(seg.length, torch.Tensor) else int(seg.length)


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the device; 0 under the interpreter (no split unless a test sets one)."""
    if device.type != "cuda":
        return 0
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _num_splits(q_tiles: int, bh: int, key_tiles: int, sms: int) -> int:
    """Split-KV factor of the chunk forward: 1 when the grid already has SPLIT_KV["waves"] waves of CTAs (one
    CTA per SM assumed: the kept 128-row configs use most of the registers), else enough splits to reach
    them, each split keeping at least SPLIT_KV["min_tiles"] key tiles."""
    programs = q_tiles * bh
    target = SPLIT_KV["waves"] * sms
    if sms <= 0 or programs >= target:
        return 1
    s = min(triton.cdiv(target, programs), SPLIT_KV["max_splits"], key_tiles // SPLIT_KV["min_tiles"])
    return max(1, s)


def _tma_kernel(name: str, *tensors: torch.Tensor):
    """block_attn_tma's `name` when TMA can address every tensor (the allocator then installed on CUDA),
    else None: the caller launches its pointer kernel."""
    from . import block_attn_tma as tma_mod

    if not tma_mod.tma_layout_ok(*(t for t in tensors if t is not None)):
        return None
    if tensors[0].is_cuda:
        tma_mod.ensure_allocator()
    return getattr(tma_mod, name)


def _chunk_fwd(q, k, v, cache: _Segment | None, prefix: _Segment | None, scale: float, tma: bool = False):
    """tma: launch kernels/block_attn_tma.py's forward when the layouts allow it (else the pointer kernel)."""
    B, Lq, H, D = q.shape
    out = _empty((B, Lq, H, D), dtype=q.dtype, device=q.device)
    lse = _empty((B, H, Lq), dtype=torch.float32, device=q.device)
    if B * H * Lq == 0:
        return out, lse
    (kc, vc, clen, crows), c_strides, c_lens, (clen_ptr, c_rows) = _segment_args(cache, q)
    (kp, vp, plen, prows), p_strides, p_lens, (plen_ptr, _) = _segment_args(prefix, q)
    lk = _seg_capacity(cache) + _seg_capacity(prefix) + Lq
    gpu = _gpu_tiles()
    bm, bn = (SPLIT_KV["block_m"], SPLIT_KV["block_n"]) if gpu else INTERPRET_BLOCKS["fwd"]
    key_tiles = sum(triton.cdiv(n, bn) for n in (_seg_capacity(cache), _seg_capacity(prefix), Lq))
    n_split = _num_splits(triton.cdiv(Lq, bm), B * H, key_tiles, _sm_count(q.device))
    o_part = lse_part = lse  # dummies when not split
    if n_split > 1:
        o_part = _empty((n_split, B * H, Lq, D), dtype=torch.float32, device=q.device)
        lse_part = _empty((n_split, B * H, Lq), dtype=torch.float32, device=q.device)
    args = (
        q, k, v, out, lse, o_part, lse_part, kc, vc, clen, crows, kp, vp, plen, prows,
        *_s3(q), *_s3(k), *_s3(v), *_s3(out), *c_strides, *p_strides, *c_lens, *p_lens,
        H, Lq, scale * LOG2E, _lq_bucket(Lq), _lk_bucket(lk), B * H, n_split,
    )
    prec = _dot_prec(q.dtype)
    flags = dict(
        HAS_CACHE=cache is not None, CLEN_PTR=clen_ptr, CACHE_ROWS=c_rows,
        HAS_PREFIX=prefix is not None, PLEN_PTR=plen_ptr, SPLIT=n_split > 1, HEAD_DIM=D, DOT_PREC=prec,
    )
    kernel, tuned = _chunk_attn_fwd_kernel, _chunk_attn_fwd_tuned
    tma_kernel = _tma_kernel("_chunk_attn_fwd_tma_kernel", q, k, v, out, kc, vc, kp, vp) if tma else None
    if tma_kernel is not None:
        from . import block_attn_tma as tma_mod

        kernel, tuned = tma_kernel, tma_mod._chunk_attn_fwd_tma_tuned
    with on_device(q):
        if not gpu:
            kernel[(triton.cdiv(Lq, bm), B * H, n_split)](*args, **flags, BLOCK_M=bm, BLOCK_N=bn)
        else:
            grid = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * H, n_split)
            tuned[grid](*args, **flags)
        if n_split > 1:
            cbm, cw = COMBINE_CONFIG if gpu else (INTERPRET_BLOCKS["fwd"][0], 4)
            _split_combine_kernel[(triton.cdiv(Lq, cbm), B * H)](
                o_part, lse_part, out, lse, *_s3(out), H, Lq, B * H, n_split,
                HEAD_DIM=D, BLOCK_M=cbm, DOT_PREC=prec, num_warps=cw)
    return out, lse


def _bwd_delta(out, do, lse_shape):
    B, L, H, D = out.shape
    delta = _empty(lse_shape, dtype=torch.float32, device=out.device)
    bm = 64 if _gpu_tiles() else 16
    _bwd_delta_kernel[(triton.cdiv(L, bm), B * H)](out, do, delta, *_s3(out), *_s3(do), H, L,
                                                   HEAD_DIM=D, BLOCK_M=bm)
    return delta


def _bwd_launch(kind: str, kernel, tuned, n_rows: int, bh: int):
    """kernel[grid] under the interpreter (INTERPRET_BLOCKS), else the autotuner over the head dim's
    candidates; n_rows: the length the grid's first axis tiles (q rows for dq, key rows for dk/dv)."""
    if not _gpu_tiles():
        bm, bn = INTERPRET_BLOCKS[kind]
        tile = bm if kind == "dq" else bn
        return functools.partial(kernel[(triton.cdiv(n_rows, tile), bh)], BLOCK_M=bm, BLOCK_N=bn)
    axis = "BLOCK_M" if kind == "dq" else "BLOCK_N"
    return tuned[lambda meta: (triton.cdiv(n_rows, meta[axis]), bh)]


def _prep_do(do: torch.Tensor) -> torch.Tensor:
    return do if do.stride(-1) == 1 else do.contiguous()


def _zero_grads(q, k, v, need_dq, need_dkdv):
    """Gradients of an empty problem: contiguous zeros (zeros_like would copy a strided layout)."""
    z = lambda t: torch.zeros(t.shape, dtype=t.dtype, device=t.device)
    return z(q) if need_dq else None, z(k) if need_dkdv else None, z(v) if need_dkdv else None


def _chunk_bwd(do, q, k, v, out, lse, cache, prefix, scale, need_dq, need_dkdv, tma=False):
    """tma: dq and dk/dv with kernels/block_attn_tma.py's kernels when the layouts allow it."""
    B, Lq, H, D = q.shape
    dq = dk = dv = None
    if B * H * Lq == 0:
        return _zero_grads(q, k, v, need_dq, need_dkdv)
    do = _prep_do(do)
    prec = _dot_prec(q.dtype)
    with on_device(q):
        delta = _bwd_delta(out, do, lse.shape)
        if need_dq:
            dq = _empty(q.shape, dtype=q.dtype, device=q.device)
            (kc, vc, clen, crows), c_strides, c_lens, (clen_ptr, c_rows) = _segment_args(cache, q)
            (kp, vp, plen, prows), p_strides, p_lens, (plen_ptr, _) = _segment_args(prefix, q)
            lk = _seg_capacity(cache) + _seg_capacity(prefix) + Lq
            tensors = (q, k, v, do, dq, kc, vc, kp, vp)
            kernel, tuned = _chunk_attn_bwd_dq_kernel, _chunk_attn_bwd_dq_tuned
            tma_kernel = _tma_kernel("_chunk_attn_bwd_dq_tma_kernel", *tensors) if tma else None
            if tma_kernel is not None:
                from . import block_attn_tma as tma_mod

                kernel, tuned = tma_kernel, tma_mod._chunk_attn_bwd_dq_tma_tuned
            _bwd_launch("dq", kernel, tuned, Lq, B * H)(
                q, k, v, do, dq, lse, delta, kc, vc, clen, crows, kp, vp, plen, prows,
                *_s3(q), *_s3(k), *_s3(v), *_s3(do), *_s3(dq), *c_strides, *p_strides, *c_lens, *p_lens,
                H, Lq, scale * LOG2E, scale, _lq_bucket(Lq), _lk_bucket(lk), B * H,
                HAS_CACHE=cache is not None, CLEN_PTR=clen_ptr, CACHE_ROWS=c_rows,
                HAS_PREFIX=prefix is not None, PLEN_PTR=plen_ptr, HEAD_DIM=D, DOT_PREC=prec,
            )
        if need_dkdv:
            dk, dv = _dkdv(do, q, k, v, lse, delta, Lq, scale, causal=False, tma=tma)
    return dq, dk, dv


def _dkdv(do, q, k, v, lse, delta, chunk_tokens, scale, *, causal, tma=False):
    B, L, H, D = q.shape
    dk = _empty(k.shape, dtype=k.dtype, device=k.device)
    dv = _empty(v.shape, dtype=v.dtype, device=v.device)
    kernel, tuned = _dkdv_kernel, _dkdv_tuned
    tma_kernel = _tma_kernel("_dkdv_tma_kernel", q, k, v, do, dk, dv) if tma else None
    if tma_kernel is not None:
        from . import block_attn_tma as tma_mod

        kernel, tuned = tma_kernel, tma_mod._dkdv_tma_tuned
    _bwd_launch("dkdv", kernel, tuned, L, B * H)(
        q, k, v, do, dk, dv, lse, delta,
        *_s3(q), *_s3(k), *_s3(v), *_s3(do), *_s3(dk), *_s3(dv),
        H, L, chunk_tokens, scale * LOG2E, scale, _lq_bucket(L), _lk_bucket(L), B * H,
        CAUSAL=causal, HEAD_DIM=D, DOT_PREC=_dot_prec(q.dtype),
    )
    return dk, dv


def _block_causal_fwd(q, k, v, chunk_tokens, scale, tma=False):
    """tma: kernels/block_attn_tma.py's forward when the layouts allow it (else the pointer kernel)."""
    B, L, H, D = q.shape
    out = _empty((B, L, H, D), dtype=q.dtype, device=q.device)
    lse = _empty((B, H, L), dtype=torch.float32, device=q.device)
    if B * H * L == 0:
        return out, lse
    args = (q, k, v, out, lse, *_s3(q), *_s3(k), *_s3(v), *_s3(out), H, L, chunk_tokens, scale * LOG2E,
            _lq_bucket(L), _lk_bucket(L), B * H)
    kernel, tuned = _block_causal_fwd_kernel, _block_causal_fwd_tuned
    tma_kernel = _tma_kernel("_block_causal_fwd_tma_kernel", q, k, v, out) if tma else None
    if tma_kernel is not None:
        from . import block_attn_tma as tma_mod

        kernel, tuned = tma_kernel, tma_mod._block_causal_fwd_tma_tuned
    with on_device(q):
        if not _gpu_tiles():
            bm, bn = INTERPRET_BLOCKS["fwd"]
            kernel[(triton.cdiv(L, bm), B * H)](
                *args, HEAD_DIM=D, DOT_PREC=_dot_prec(q.dtype), BLOCK_M=bm, BLOCK_N=bn)
        else:
            grid = lambda meta: (triton.cdiv(L, meta["BLOCK_M"]), B * H)
            tuned[grid](*args, HEAD_DIM=D, DOT_PREC=_dot_prec(q.dtype))
    return out, lse


def _block_causal_bwd(do, q, k, v, out, lse, chunk_tokens, scale, need_dq, need_dkdv, tma=False):
    """tma: dq and dk/dv with kernels/block_attn_tma.py's kernels when the layouts allow it."""
    B, L, H, D = q.shape
    dq = dk = dv = None
    if B * H * L == 0:
        return _zero_grads(q, k, v, need_dq, need_dkdv)
    do = _prep_do(do)
    with on_device(q):
        delta = _bwd_delta(out, do, lse.shape)
        if need_dq:
            dq = _empty(q.shape, dtype=q.dtype, device=q.device)
            kernel, tuned = _block_causal_bwd_dq_kernel, _block_causal_bwd_dq_tuned
            tma_kernel = _tma_kernel("_block_causal_bwd_dq_tma_kernel", q, k, v, do, dq) if tma else None
            if tma_kernel is not None:
                from . import block_attn_tma as tma_mod

                kernel, tuned = tma_kernel, tma_mod._block_causal_bwd_dq_tma_tuned
            _bwd_launch("dq", kernel, tuned, L, B * H)(
                q, k, v, do, dq, lse, delta, *_s3(q), *_s3(k), *_s3(v), *_s3(do), *_s3(dq),
                H, L, chunk_tokens, scale * LOG2E, scale, _lq_bucket(L), _lk_bucket(L), B * H,
                HEAD_DIM=D, DOT_PREC=_dot_prec(q.dtype),
            )
        if need_dkdv:
            dk, dv = _dkdv(do, q, k, v, lse, delta, chunk_tokens, scale, causal=True, tma=tma)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------------
# torch.library custom ops: what autograd and torch.compile see
# ---------------------------------------------------------------------------------------------------------
#
# The four ops below are opaque to torch.compile (dynamo, AOTAutograd, inductor call the Python impl; the
# fake impls give the output metadata), so a compiled model keeps our kernels instead of tracing into
# Triton launches. Their schemas are flat: a segment is (k, v, len: int, lens: Tensor?, rows: Tensor?),
# with lens (int [B] or [1]) overriding len when given and k = None for no segment. The public functions
# validate the arguments on the host first (same ValueErrors as before) and then call the ops; the ops
# trust their inputs, apart from re-establishing a unit head-dim stride (a no-op for validated inputs).
# Every tensor an op returns is fresh and contiguous, as its fake impl says.
#
#   arcopo_fast::chunk_attention(q, k, v, k_cache?, v_cache?, cache_len, cache_lens?, cache_rows?,
#                                k_prefix?, v_prefix?, prefix_len, prefix_lens?, prefix_rows?, scale, tma)
#                                -> (out [B, Lq, H, D] like q, lse fp32 [B, H, Lq])
#   arcopo_fast::chunk_attention_bwd(do, q, k, v, out, lse, <the 10 segment args>, scale, need_dq, need_dkdv,
#                                    tma)
#                                -> (dq, dk, dv); a gradient that is not needed comes back as an empty [0]
#   arcopo_fast::block_causal_attention(q, k, v, chunk_tokens, scale, tma) -> (out, lse)
#   arcopo_fast::block_causal_attention_bwd(do, q, k, v, out, lse, chunk_tokens, scale, need_dq, need_dkdv,
#                                           tma)
#                                -> (dq, dk, dv)
#
# Autograd (register_autograd): gradients to q, k, v only; lse is non-differentiable. The cache and prefix
# tensors (and their lens / rows) are re-read by the backward but are stashed as plain ctx attributes,
# not with save_for_backward: eagerly, autograd then does not version-check them, so appending tokens
# past the read range between forward and backward (how a KV cache grows) stays legal. Overwriting the
# tokens that were read, or changing lens / rows in place, before the backward is not legal and is not
# detected. Under torch.compile, AOTAutograd saves the tensors the backward graph needs itself, with
# save_for_backward unless the traced node is marked "saved_tensor_with_no_vc_check" (torch's support for
# ctx-stashed tensors of a traced autograd.Function, torch 2.11 or so); _no_version_check_when_compiled
# sets that mark on the stashed tensors, so the compiled path keeps the eager contract
# (tests/test_attention_op.py). On a torch without that support the compiled path version-checks the
# cache: there, write the next chunk into the cache after the backward.

_Opt = torch.Tensor | None  # custom_op infers the schema from the annotations: Tensor?

try:  # private; see _no_version_check_when_compiled
    from torch.fx.experimental.proxy_tensor import _get_proxies
except ImportError:
    _get_proxies = None


def _unit_stride(t: torch.Tensor | None) -> torch.Tensor | None:
    # The kernels take batch/token/head strides as arguments but need a contiguous head dim.
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _op_segment(kx, vx, length, lens, rows) -> _Segment | None:
    """The ops' flat segment arguments -> _Segment (None when absent or of int length 0)."""
    if kx is None or (lens is None and length == 0):
        return None
    return _Segment(_unit_stride(kx), _unit_stride(vx), length if lens is None else lens,
                    None if rows is None else rows.contiguous())


def _segment_op_args(seg: _Segment | None) -> tuple:
    """_Segment -> the ops' flat (k, v, len, lens, rows)."""
    if seg is None:
        return None, None, 0, None, None
    if isinstance(seg.length, torch.Tensor):
        return seg.k, seg.v, 0, seg.length, seg.rows
    return seg.k, seg.v, seg.length, None, seg.rows


def _grad_or_empty(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    # An op cannot return None: a gradient that was not asked for is an empty [0] tensor.
    return g if g is not None else torch.empty(0, dtype=like.dtype, device=like.device)


def _qkv_grads_fake(q, k, v, need_dq, need_dkdv):
    def like(t, need):
        return torch.empty(t.shape if need else (0,), dtype=t.dtype, device=t.device)

    return like(q, need_dq), like(k, need_dkdv), like(v, need_dkdv)


def _no_version_check_when_compiled(tensors) -> None:
    """Under AOTAutograd tracing, mark tensors stashed on ctx like torch's own autograd.Function support does
    (node meta "saved_tensor_with_no_vc_check"), so that the compiled forward saves them without a version
    check too. Private API: where it is missing or differs this does nothing (the check then applies)."""
    if _get_proxies is None:
        return
    try:
        for t in tensors:
            for proxy in _get_proxies(t):
                proxy.node.meta["saved_tensor_with_no_vc_check"] = True
    except Exception:  # noqa: BLE001 - a hint to the compiler only; never fail the forward over it
        pass


def _qkv_grads(ctx, dq, dk, dv):
    need = ctx.needs_input_grad
    return dq if need[0] else None, dk if need[1] else None, dv if need[2] else None


@torch.library.custom_op("arcopo_fast::chunk_attention", mutates_args=())
def _chunk_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    k_cache: _Opt, v_cache: _Opt, cache_len: int, cache_lens: _Opt, cache_rows: _Opt,
    k_prefix: _Opt, v_prefix: _Opt, prefix_len: int, prefix_lens: _Opt, prefix_rows: _Opt,
    scale: float, tma: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = (_unit_stride(t) for t in (q, k, v))
    cache = _op_segment(k_cache, v_cache, cache_len, cache_lens, cache_rows)
    prefix = _op_segment(k_prefix, v_prefix, prefix_len, prefix_lens, prefix_rows)
    return _chunk_fwd(q, k, v, cache, prefix, scale, tma)


def _out_lse_fake(q):
    """(out like q, contiguous; lse float32 [B, H, L]): what both forward ops return."""
    B, L, H, D = q.shape
    return torch.empty((B, L, H, D), dtype=q.dtype, device=q.device), torch.empty((B, H, L), dtype=torch.float32, device=q.device)


@_chunk_attention_op.register_fake
def _chunk_attention_fake(q, k, v, *segments_and_scale):
    return _out_lse_fake(q)


@torch.library.custom_op("arcopo_fast::chunk_attention_bwd", mutates_args=())
def _chunk_attention_bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    k_cache: _Opt, v_cache: _Opt, cache_len: int, cache_lens: _Opt, cache_rows: _Opt,
    k_prefix: _Opt, v_prefix: _Opt, prefix_len: int, prefix_lens: _Opt, prefix_rows: _Opt,
    scale: float, need_dq: bool, need_dkdv: bool, tma: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, out = (_unit_stride(t) for t in (q, k, v, out))
    cache = _op_segment(k_cache, v_cache, cache_len, cache_lens, cache_rows)
    prefix = _op_segment(k_prefix, v_prefix, prefix_len, prefix_lens, prefix_rows)
    dq, dk, dv = _chunk_bwd(do, q, k, v, out, lse.contiguous(), cache, prefix, scale, need_dq, need_dkdv, tma)
    return _grad_or_empty(dq, q), _grad_or_empty(dk, k), _grad_or_empty(dv, v)


@_chunk_attention_bwd_op.register_fake
def _chunk_attention_bwd_fake(do, q, k, v, *rest):
    need_dq, need_dkdv = rest[-3:-1]
    return _qkv_grads_fake(q, k, v, need_dq, need_dkdv)


def _chunk_attention_setup(ctx, inputs, output):
    q, k, v, *segments, scale, tma = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.segments = tuple(segments)  # NOT save_for_backward: no version check (see the section comment)
    _no_version_check_when_compiled(t for t in segments if isinstance(t, torch.Tensor))
    ctx.scale, ctx.tma = scale, tma
    ctx.mark_non_differentiable(lse)


def _chunk_attention_backward(ctx, do, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    need = ctx.needs_input_grad
    dq, dk, dv = _chunk_attention_bwd_op(do, q, k, v, out, lse, *ctx.segments, ctx.scale, need[0],
                                         need[1] or need[2], ctx.tma)
    return (*_qkv_grads(ctx, dq, dk, dv), *(None,) * (len(need) - 3))


_chunk_attention_op.register_autograd(_chunk_attention_backward, setup_context=_chunk_attention_setup)


@torch.library.custom_op("arcopo_fast::block_causal_attention", mutates_args=())
def _block_causal_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_tokens: int, scale: float, tma: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = (_unit_stride(t) for t in (q, k, v))
    return _block_causal_fwd(q, k, v, chunk_tokens, scale, tma)


@_block_causal_op.register_fake
def _block_causal_fake(q, k, v, chunk_tokens, scale, tma):
    return _out_lse_fake(q)


@torch.library.custom_op("arcopo_fast::block_causal_attention_bwd", mutates_args=())
def _block_causal_bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    chunk_tokens: int, scale: float, need_dq: bool, need_dkdv: bool, tma: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, out = (_unit_stride(t) for t in (q, k, v, out))
    dq, dk, dv = _block_causal_bwd(do, q, k, v, out, lse.contiguous(), chunk_tokens, scale, need_dq, need_dkdv,
                                   tma)
    return _grad_or_empty(dq, q), _grad_or_empty(dk, k), _grad_or_empty(dv, v)


@_block_causal_bwd_op.register_fake
def _block_causal_bwd_fake(do, q, k, v, out, lse, chunk_tokens, scale, need_dq, need_dkdv, tma):
    return _qkv_grads_fake(q, k, v, need_dq, need_dkdv)


def _block_causal_setup(ctx, inputs, output):
    q, k, v, chunk_tokens, scale, tma = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.chunk_tokens, ctx.scale, ctx.tma = chunk_tokens, scale, tma
    ctx.mark_non_differentiable(lse)


def _block_causal_backward(ctx, do, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    need = ctx.needs_input_grad
    dq, dk, dv = _block_causal_bwd_op(do, q, k, v, out, lse, ctx.chunk_tokens, ctx.scale, need[0],
                                      need[1] or need[2], ctx.tma)
    return (*_qkv_grads(ctx, dq, dk, dv), None, None, None)


_block_causal_op.register_autograd(_block_causal_backward, setup_context=_block_causal_setup)


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def _chunk_inputs(q, k, v, k_cache, v_cache, cache_len, cache_rows, k_prefix, v_prefix, prefix_len, prefix_rows):
    q, k, v = _prep_qkv(q, k, v)
    cache = _make_segment("cache", k_cache, v_cache, cache_len, cache_rows, q, rows_required=False)
    prefix = _make_segment("prefix", k_prefix, v_prefix, prefix_len, prefix_rows, q, rows_required=True)
    return q, k, v, cache, prefix


def chunk_attention_fwd(
    q, k, v, k_cache=None, v_cache=None, cache_len=0, cache_rows=None,
    k_prefix=None, v_prefix=None, prefix_len=0, prefix_rows=None, *, scale=None, return_lse=False, tma=False,
):
    """Forward only, no autograd: out [B, Lq, H, D] (and lse [B, H, Lq] fp32, natural log, with return_lse).
    Arguments as chunk_attention."""
    q, k, v, cache, prefix = _chunk_inputs(q, k, v, k_cache, v_cache, cache_len, cache_rows,
                                           k_prefix, v_prefix, prefix_len, prefix_rows)
    out, lse = _chunk_fwd(q, k, v, cache, prefix, _scale(scale, q.shape[-1]), tma)
    return (out, lse) if return_lse else out


def chunk_attention(
    q: torch.Tensor,
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
    *,
    scale: float | None = None,
    tma: bool = False,
) -> torch.Tensor:
    """softmax(q [prefix ; cache ; k]^T * scale) [prefix ; cache ; v], unmasked, per batch row (autograd).

    q, k, v:            [B, Lq, H, D]   fp16 / bf16 / fp32 (one dtype), D in {16, 32, 64, 128}; any strides
                                        with a contiguous head dim. Gradients flow to q, k and v.
    k_cache, v_cache:   [Rc, Lc, H, D]  or None. Constants: no gradient, no dk/dv work. Any of the three
                                        float dtypes (cast to q's dtype on load).
    cache_len:          int in [0, Lc], or an integer tensor [B] (or [1]) on q's device: valid tokens of
                                        each row (read in-kernel, clamped to [0, Lc]; no host sync).
    cache_rows:         integer tensor [B] or None: the cache row read by query row b (None: row b).
    k_prefix, v_prefix: [Rp, Lp, H, D]  or None: a zero-copy fork's shared prefix, read before the cache.
    prefix_len:         as cache_len, for the prefix.
    prefix_rows:        integer tensor [B], required with k_prefix.
    scale:              softmax scale, default 1/sqrt(D).
    tma:                run the forward and the backward with TMA loads (kernels/block_attn_tma.py) where every tensor
                        meets TMA's layout rules (16-byte aligned data and strides), else the pointer
                        kernels. The caller checks the device (arcopo_fast.ops.tma_unsupported).

    Key sequence of query row b (every query of the chunk sees all of it; no causal mask inside a chunk):

        |<- k_prefix[prefix_rows[b], :prefix_len_b] ->|<- k_cache[cache_rows[b], :cache_len_b] ->|<- k[b] ->|

    One call computes one row of the block-causal mask below (a query row of chunk c, keys by chunk).
    Zero-copy fork at pivot chunk 2: the branches share the parent's chunks 0-1 as the prefix segment and
    keep their own chunks 2.. in their cache rows; '.' = not attended (never loaded):

        keys ->     c0     c1     c2     c3     c4
        c0       [ own ][  .  ][  .  ][  .  ][  .  ]     (parent, before the fork: no prefix)
        c1       [cache][ own ][  .  ][  .  ][  .  ]
        c2       [ pre ][ pre ][ own ][  .  ][  .  ]     pre   = k_prefix[prefix_rows[b], :prefix_len_b]
        c3       [ pre ][ pre ][cache][ own ][  .  ]     cache = k_cache[cache_rows[b], :cache_len_b]
        c4       [ pre ][ pre ][cache][cache][ own ]     own   = k[b] (the chunk's queries see all of it)

    Returns out [B, Lq, H, D] in q's dtype. Row indices and tensor lengths are not range-checked on the
    host (that would sync); lengths are clamped in-kernel, out-of-range rows are undefined behaviour.
    The backward re-reads the cache and prefix (and their lengths and rows): do not overwrite the tokens
    read, nor change the length or row tensors in place, before it runs. Appending past them is fine.
    """
    q, k, v, cache, prefix = _chunk_inputs(q, k, v, k_cache, v_cache, cache_len, cache_rows,
                                           k_prefix, v_prefix, prefix_len, prefix_rows)
    out, _ = _chunk_attention_op(q, k, v, *_segment_op_args(cache), *_segment_op_args(prefix),
                                 _scale(scale, q.shape[-1]), bool(tma))
    return out


def _check_chunk_tokens(chunk_tokens) -> int:
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, numbers.Integral) or chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    return int(chunk_tokens)


def block_causal_attention_fwd(q, k, v, chunk_tokens: int, *, scale=None, return_lse=False, tma=False):
    """Forward only, no autograd: out [B, L, H, D] (and lse [B, H, L] fp32, natural log, with return_lse)."""
    q, k, v = _prep_qkv(q, k, v)
    chunk_tokens = _check_chunk_tokens(chunk_tokens)
    out, lse = _block_causal_fwd(q, k, v, chunk_tokens, _scale(scale, q.shape[-1]), bool(tma))
    return (out, lse) if return_lse else out


def block_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_tokens: int, *, scale: float | None = None,
    tma: bool = False,
) -> torch.Tensor:
    """Full-sequence block-causal attention (teacher forcing), with autograd for q, k and v.

    q, k, v:       [B, L, H, D]  fp16 / bf16 / fp32, D in {16, 32, 64, 128}; L need not be a multiple of
                                 chunk_tokens (the last chunk is then partial).
    chunk_tokens:  tokens per chunk: query i sees key j iff j < min((i // chunk_tokens + 1) * chunk_tokens, L).
    scale:         softmax scale, default 1/sqrt(D).
    tma:           run the forward and the backward with TMA loads (kernels/block_attn_tma.py) where every
                   tensor's layout allows it (sm_90+); otherwise, or with False, the pointer kernels. The
                   caller checks the device (arcopo_fast.ops.tma_unsupported).

    The mask, with a KV-cache view: chunk c's row is what chunk_attention computes with the cache
    holding chunks < c ("cache") and the chunk's own keys ("own"); '.' tiles are skipped, never loaded:

        keys ->      c0      c1      c2
        c0        [ own  ][  .   ][  .  ]
        c1        [cache ][ own  ][  .  ]
        c2        [cache ][cache ][ own ]   <- c2 may be partial

    Returns out [B, L, H, D] in q's dtype.
    """
    q, k, v = _prep_qkv(q, k, v)
    chunk_tokens = _check_chunk_tokens(chunk_tokens)
    out, _ = _block_causal_op(q, k, v, chunk_tokens, _scale(scale, q.shape[-1]), bool(tma))
    return out


__all__ = ["chunk_attention", "chunk_attention_fwd", "block_causal_attention", "block_causal_attention_fwd"]
