"""kernels/block_attn.py: chunk attention (prefix + cache segments) and block-causal attention, forward and
every gradient, against the float64 references of kernels/reference.py.

Runs the Triton kernels on CPU under TRITON_INTERPRET=1 (set before triton is imported). On a GPU machine,
`TRITON_INTERPRET=0 pytest tests/test_block_attn.py` runs the same cases on CUDA with the real tile sizes.
Accuracy rule (flash-attention's): the kernel's max error vs float64 is at most 2x torch's error in the
same dtype (the naive reference computed in that dtype), plus a tiny absolute slack for fp32-level noise.
"""

from __future__ import annotations

import triton_env  # noqa: E402
from triton_env import DEVICE, INTERPRET, require_kernel_device, tf32_reference_on_gpu  # noqa: F401 (autouse)

require_kernel_device()  # sets TRITON_INTERPRET=1 (CPU) unless chosen; before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

from arcopo_fast import ops  # noqa: E402
from arcopo_fast.kernels import block_attn as ba  # noqa: E402
from arcopo_fast.kernels import reference as ref  # noqa: E402

LOW = (torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every buffer the kernels write starts as NaN, so an unwritten element fails the comparison."""

    def nan_empty(shape, *, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(ba, "_empty", nan_empty)


def rand(*shape, dtype=torch.float32, gen=None):
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=DEVICE, dtype=dtype)


def check(name: str, ours: torch.Tensor, exact: torch.Tensor, torch_lowp: torch.Tensor, slack: float = 1e-5):
    """max|ours - exact| <= 2 * max|torch_lowp - exact| + slack * max(1, max|exact|); prints both on failure."""
    assert ours.shape == exact.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(exact.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values (unwritten output?)"
    e_ours = (ours.double() - exact).abs()
    e_torch = (torch_lowp.double() - exact).abs()
    bound = 2 * e_torch.max().item() + slack * max(1.0, exact.abs().max().item())
    msg = (
        f"{name} ({ours.dtype}): ours max {e_ours.max().item():.3e} mean {e_ours.mean().item():.3e} | "
        f"torch max {e_torch.max().item():.3e} mean {e_torch.mean().item():.3e} | bound {bound:.3e}"
    )
    assert e_ours.max().item() <= bound, msg


def _leaf(x, dtype=None):
    return (x if dtype is None else x.to(dtype)).detach().clone().requires_grad_(True)


def run_three(fn_ours, fn_ref, q, k, v, do):
    """(out, dq, dk, dv) of ours, of the float64 reference, and of the reference in q's dtype."""
    results = []
    for fn, dt in ((fn_ours, None), (lambda *a: fn_ref(*a, True), torch.float64), (lambda *a: fn_ref(*a, False), None)):
        qq, kk, vv = (_leaf(x, dt) for x in (q, k, v))
        out = fn(qq, kk, vv)
        grads = torch.autograd.grad(out, (qq, kk, vv), do.to(out.dtype))
        results.append((out, *grads))
    return results


def check_all(tag, ours, exact, lowp, slack=1e-5):
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), ours, exact, lowp):
        check(f"{tag} {name}", a, b, c, slack)


# ---------------------------------------------------------------------------------------------------------
# chunk attention
# ---------------------------------------------------------------------------------------------------------

# (id, B, Lq, H, D, dtype, cache spec, prefix spec). Segment spec: (rows_in_table, Lmax, len, rows) with len an
# int or a list (-> int32 tensor [B]) and rows None or a list (-> int32 tensor [B]); None = no segment.
CHUNK_CASES = [
    ("own-only-B1", 1, 37, 2, 16, torch.float32, None, None),
    ("cache-int-B2", 2, 21, 2, 32, torch.bfloat16, (2, 50, 35, None), None),
    ("cache-ragged-rows", 3, 19, 1, 16, torch.float16, (3, 40, [0, 40, 17], [2, 0, 0]), None),
    ("prefix+cache", 3, 23, 2, 16, torch.bfloat16, (3, 30, [5, 30, 16], None), (2, 45, [33, 1, 45], [1, 1, 0])),
    ("prefix-only-int", 2, 17, 3, 16, torch.float32, None, (1, 40, 32, [0, 0])),
    ("prefix+cache-fp32", 2, 33, 1, 32, torch.float32, (4, 24, 19, [3, 1]), (2, 20, [7, 20], [1, 0])),
    ("empty-cache-int0", 2, 18, 2, 16, torch.float16, (2, 16, 0, None), None),
    ("empty-segments-tensor0", 2, 18, 2, 16, torch.bfloat16, (2, 16, [0, 0], None), (1, 16, [0, 0], [0, 0])),
    ("fp32-cache-bf16-q", 2, 20, 2, 16, torch.bfloat16, (2, 26, [26, 9], [1, 0]), None),
    ("chunk-shorter-than-tile-len1", 2, 9, 1, 16, torch.float16, (2, 30, [21], [1, 0]), None),
]


def _seg(spec, H, D, dtype, B, gen):
    if spec is None:
        return None, None, 0, None
    R, Lmax, n, rows = spec
    kx, vx = rand(R, Lmax, H, D, dtype=dtype, gen=gen), rand(R, Lmax, H, D, dtype=dtype, gen=gen)
    n = torch.tensor(n, dtype=torch.int32, device=DEVICE) if isinstance(n, list) else n
    rows = None if rows is None else torch.tensor(rows, dtype=torch.int32, device=DEVICE)
    return kx, vx, n, rows


def _chunk_case(case, seed=0):
    cid, B, Lq, H, D, dtype, cache_spec, prefix_spec = case
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (rand(B, Lq, H, D, dtype=dtype, gen=gen) for _ in range(3))
    seg_dtype = torch.float32 if cid == "fp32-cache-bf16-q" else dtype
    kc, vc, clen, crows = _seg(cache_spec, H, D, seg_dtype, B, gen)
    kp, vp, plen, prows = _seg(prefix_spec, H, D, seg_dtype, B, gen)
    args = (kc, vc, clen, crows, kp, vp, plen, prows)
    do = rand(B, Lq, H, D, gen=gen)
    return q, k, v, args, do


@pytest.mark.parametrize("case", CHUNK_CASES, ids=[c[0] for c in CHUNK_CASES])
def test_chunk_attention_matches_float64_reference(case):
    q, k, v, args, do = _chunk_case(case)
    ours, exact, lowp = run_three(
        lambda q_, k_, v_: ba.chunk_attention(q_, k_, v_, *args),
        lambda q_, k_, v_, up: ref.chunk_attention_ref(q_, k_, v_, *args, upcast=up)[0],
        q, k, v, do,
    )
    check_all(case[0], ours, exact, lowp)


@pytest.mark.parametrize("blocks", [(32, 16), (16, 32)], ids=["M32N16", "M16N32"])
def test_chunk_attention_other_tile_shapes(monkeypatch, blocks):
    if not INTERPRET:
        pytest.skip("interpreter tile sizes only")
    monkeypatch.setattr(ba, "INTERPRET_BLOCKS", {"fwd": blocks, "dq": blocks, "dkdv": blocks[::-1]})
    case = CHUNK_CASES[3]  # prefix + ragged cache + rows
    q, k, v, args, do = _chunk_case(case, seed=1)
    ours, exact, lowp = run_three(
        lambda q_, k_, v_: ba.chunk_attention(q_, k_, v_, *args),
        lambda q_, k_, v_, up: ref.chunk_attention_ref(q_, k_, v_, *args, upcast=up)[0],
        q, k, v, do,
    )
    check_all(f"{case[0]} {blocks}", ours, exact, lowp)


def test_chunk_attention_lse_and_strided_inputs():
    """Forward-only entry with the log-sum-exp; q/k/v are views into a packed [B, L, 3, H, D] tensor."""
    B, Lq, H, D = 2, 29, 2, 32
    gen = torch.Generator().manual_seed(3)
    qkv = rand(B, Lq, 3, H, D, gen=gen)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    kc, vc = rand(2, 31, H, D, gen=gen), rand(2, 31, H, D, gen=gen)
    clen = torch.tensor([31, 12], dtype=torch.int32, device=DEVICE)
    rows = torch.tensor([1, 0], dtype=torch.int32, device=DEVICE)
    out, lse = ba.chunk_attention_fwd(q, k, v, kc, vc, clen, rows, return_lse=True, scale=0.3)
    r_out, r_lse = ref.chunk_attention_ref(q.double(), k.double(), v.double(), kc, vc, clen, rows, scale=0.3)
    torch.testing.assert_close(out.double(), r_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse, r_lse.float(), rtol=0, atol=1e-5)
    assert lse.shape == (B, H, Lq) and lse.dtype == torch.float32


def test_chunk_attention_only_q_grad():
    """With only q requiring grad the dk/dv kernel is skipped; dq is still exact."""
    q, k, v, args, do = _chunk_case(CHUNK_CASES[5], seed=2)
    qq = _leaf(q)
    (dq,) = torch.autograd.grad(ba.chunk_attention(qq, k, v, *args), qq, do)
    q64 = _leaf(q, torch.float64)
    (dq64,) = torch.autograd.grad(ref.chunk_attention_ref(q64, k.double(), v.double(), *args)[0], q64, do.double())
    torch.testing.assert_close(dq.double(), dq64, rtol=0, atol=1e-5)


def test_chunk_attention_matches_ops_torch_backend():
    q, k, v, args, _ = _chunk_case(CHUNK_CASES[5], seed=4)  # fp32: the two must agree to rounding
    names = ("k_cache", "v_cache", "cache_len", "cache_rows", "k_prefix", "v_prefix", "prefix_len", "prefix_rows")
    kw = dict(zip(names, args))
    a = ops.chunk_attention(q, k, v, **kw, backend="triton")
    b = ops.chunk_attention(q, k, v, **kw, backend="torch")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    B, Lq, H, D = q.shape
    a = ops.block_causal_attention(q, k, v, 10, backend="triton")
    b = ops.block_causal_attention(q, k, v, 10, backend="torch")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_chunk_attention_errors():
    B, Lq, H, D = 2, 8, 2, 16
    q = k = v = rand(B, Lq, H, D)
    kc = rand(2, 10, H, D)
    rows = torch.zeros(B, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="head dim"):
        ba.chunk_attention(rand(B, Lq, H, 24), rand(B, Lq, H, 24), rand(B, Lq, H, 24))
    with pytest.raises(ValueError, match="shape"):
        ba.chunk_attention(q, k[:, :5], v)
    with pytest.raises(ValueError, match="dtype"):
        ba.chunk_attention(q, k.half(), v)
    with pytest.raises(ValueError, match="prefix_rows is required"):
        ba.chunk_attention(q, k, v, k_prefix=kc, v_prefix=kc, prefix_len=3)
    with pytest.raises(ValueError, match=r"cache_len must be in \[0, 10\]"):
        ba.chunk_attention(q, k, v, kc, kc, 11)
    with pytest.raises(ValueError, match="cache_rows must be an integer tensor"):
        ba.chunk_attention(q, k, v, kc, kc, 3, rows[:1])
    with pytest.raises(ValueError, match="cache_len must be an int or an integer tensor"):
        ba.chunk_attention(q, k, v, kc, kc, torch.ones(3, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="k_cache/v_cache must be"):
        ba.chunk_attention(q, k, v, kc[..., :1, :], kc[..., :1, :], 3)
    with pytest.raises(ValueError, match="constants"):
        ba.chunk_attention(q, k, v, kc.clone().requires_grad_(), kc, 3)
    with pytest.raises(ValueError, match="scale"):
        ba.chunk_attention(q, k, v, scale=-1.0)
    with pytest.raises(ValueError, match="chunk_tokens"):
        ba.block_causal_attention(q, k, v, 0)


# ---------------------------------------------------------------------------------------------------------
# block-causal attention
# ---------------------------------------------------------------------------------------------------------

# (id, B, L, H, D, chunk_tokens, dtype)
CAUSAL_CASES = [
    ("partial-last-chunk", 2, 45, 2, 16, 12, torch.bfloat16),
    ("exact-chunks-B1", 1, 40, 3, 32, 8, torch.float32),
    ("chunk-smaller-than-tile", 1, 38, 2, 16, 5, torch.float16),
    ("one-partial-chunk", 2, 21, 1, 16, 40, torch.float32),
    ("chunk-equals-tile", 1, 48, 2, 16, 16, torch.bfloat16),
]


def _causal_case(case, seed=0):
    _, B, L, H, D, C, dtype = case
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (rand(B, L, H, D, dtype=dtype, gen=gen) for _ in range(3))
    return q, k, v, C, rand(B, L, H, D, gen=gen)


def _run_causal(case, seed=0):
    q, k, v, C, do = _causal_case(case, seed)
    ours, exact, lowp = run_three(
        lambda q_, k_, v_: ba.block_causal_attention(q_, k_, v_, C),
        lambda q_, k_, v_, up: ref.block_causal_attention_ref(q_, k_, v_, C, upcast=up)[0],
        q, k, v, do,
    )
    check_all(case[0], ours, exact, lowp)


@pytest.mark.parametrize("case", CAUSAL_CASES, ids=[c[0] for c in CAUSAL_CASES])
def test_block_causal_matches_float64_reference(case):
    _run_causal(case)


@pytest.mark.parametrize("blocks", [(32, 16), (16, 32)], ids=["M32N16", "M16N32"])
def test_block_causal_other_tile_shapes(monkeypatch, blocks):
    if not INTERPRET:
        pytest.skip("interpreter tile sizes only")
    monkeypatch.setattr(ba, "INTERPRET_BLOCKS", {"fwd": blocks, "dq": blocks, "dkdv": blocks})
    _run_causal(("tiles-" + "x".join(map(str, blocks)), 1, 70, 1, 16, 12, torch.float32), seed=5)


def test_block_causal_lse():
    q, k, v, C, _ = _causal_case(CAUSAL_CASES[0], seed=6)
    out, lse = ba.block_causal_attention_fwd(q, k, v, C, return_lse=True)
    r_out, r_lse = ref.block_causal_attention_ref(q.float(), k.float(), v.float(), C)
    torch.testing.assert_close(lse, r_lse, rtol=0, atol=1e-4)


def test_block_causal_rows_equal_chunk_attention_with_cache():
    """Row c of the block-causal mask is chunk_attention with the cache holding chunks < c."""
    B, H, D, C, n = 1, 2, 16, 12, 3
    gen = torch.Generator().manual_seed(7)
    q, k, v = (rand(B, C * n, H, D, gen=gen) for _ in range(3))
    full = ba.block_causal_attention_fwd(q, k, v, C)
    for c in range(n):
        s = slice(c * C, (c + 1) * C)
        part = ba.chunk_attention_fwd(q[:, s], k[:, s], v[:, s], k, v, c * C)
        torch.testing.assert_close(part, full[:, s], rtol=1e-5, atol=1e-5)


def test_forward_autotune_prune_filter():
    """The GPU config list (not runnable here) prunes to a non-empty set that fits shared memory."""
    q = torch.empty(1, 1, 1, 128, dtype=torch.bfloat16)
    prune = ba._fwd_pruner("chunk_fwd")
    for D, lq in ((128, 8192), (64, 8192), (128, 16)):
        kept = prune(ba._FWD_CONFIGS, {"Q": q, "LQ_BUCKET": lq}, HEAD_DIM=D)
        assert kept, (D, lq)
        for c in kept:
            bm, bn, s = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages
            assert (bm * D + s * 2 * bn * D) * 2 <= ba._SMEM_BUDGET
        if lq == 16:
            assert all(c.kwargs["BLOCK_M"] == 64 for c in kept)
    kept128 = prune(ba._FWD_CONFIGS, {"Q": q, "LQ_BUCKET": 8192}, HEAD_DIM=128)
    assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in kept128} >= {(128, 64), (64, 64)}
    assert all(c.maxnreg == 168 for c in kept128 if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) == (128, 64, 8))


def test_each_autotuner_prunes_its_own_spilling_tiles():
    """Every autotuned kernel prunes, at D = 128, exactly the tiles its own row of SPILLING_D128 lists (the
    same tile spills in one kernel and not in another); the backward autotuners keep only their head dim's
    candidates, and at D = 128 more than one, so the card times them."""
    from arcopo_fast.kernels import _autotune as at
    from arcopo_fast.kernels import block_attn_tma as tma

    tuners = {"chunk_fwd": ba._chunk_attn_fwd_tuned, "block_causal_fwd": ba._block_causal_fwd_tuned,
              "chunk_fwd_tma": tma._chunk_attn_fwd_tma_tuned, "block_causal_fwd_tma": tma._block_causal_fwd_tma_tuned,
              "chunk_dq": ba._chunk_attn_bwd_dq_tuned, "block_causal_dq": ba._block_causal_bwd_dq_tuned,
              "dkdv": ba._dkdv_tuned, "chunk_dq_tma": tma._chunk_attn_bwd_dq_tma_tuned,
              "block_causal_dq_tma": tma._block_causal_bwd_dq_tma_tuned, "dkdv_tma": tma._dkdv_tma_tuned}
    assert set(tuners) == set(ba.SPILLING_D128)
    for name, tuner in tuners.items():
        assert isinstance(tuner, at.ParallelCompileAutotuner), name
        prune = tuner.early_config_prune
        assert prune.kernel == name
        for dtype in (torch.bfloat16, torch.float32):
            q = torch.empty(1, dtype=dtype)
            kept = {at.tile(c) for c in prune(tuner.configs, {"Q": q, "LQ_BUCKET": 8192}, HEAD_DIM=128)}
            assert kept and not kept & ba.SPILLING_D128[name].get(q.element_size(), set()), (name, dtype)
            if "_fwd" not in name and dtype == torch.float32:  # the fp32 backward keeps the first candidate
                table = ba.BWD_DQ_CONFIGS if "dq" in name else ba.BWD_DKDV_CONFIGS
                assert kept == {table[128][0]}, name
            elif "_fwd" not in name:
                table = ba.BWD_DQ_CONFIGS if "dq" in name else ba.BWD_DKDV_CONFIGS
                assert kept == set(table[128]) - ba.SPILLING_D128[name][2] and len(kept) > 1, name
                assert "dq" not in name or all(bn >= 64 for _, bn, _, _ in kept), name  # wgmma-fed dq tiles
        if "_fwd" not in name:
            table = ba.BWD_DQ_CONFIGS if "dq" in name else ba.BWD_DKDV_CONFIGS
            for D in (16, 32, 64):  # one candidate: nothing to time
                kept = prune(tuner.configs, {"Q": torch.empty(1, dtype=torch.bfloat16)}, HEAD_DIM=D)
                assert [at.tile(c) for c in kept] == table[D], (name, D)


def test_gpu_launch_path_under_interpreter(monkeypatch):
    """The GPU launch code (autotuner calls with grid lambdas, forward and backward) run by the interpreter,
    with each autotuner's config list replaced by one non-square config (so nothing is benchmarked)."""
    if not INTERPRET:
        pytest.skip("the GPU path runs for real on CUDA")
    import triton

    monkeypatch.setattr(ba, "_gpu_tiles", lambda: True)
    one = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=2)]
    for tuned in (ba._chunk_attn_fwd_tuned, ba._block_causal_fwd_tuned, ba._chunk_attn_bwd_dq_tuned,
                  ba._block_causal_bwd_dq_tuned, ba._dkdv_tuned):
        monkeypatch.setattr(tuned, "configs", one)
    q, k, v, args, do = _chunk_case(CHUNK_CASES[5], seed=8)  # fp32, D=32, prefix + cache
    ours, exact, lowp = run_three(
        lambda q_, k_, v_: ba.chunk_attention(q_, k_, v_, *args),
        lambda q_, k_, v_, up: ref.chunk_attention_ref(q_, k_, v_, *args, upcast=up)[0],
        q, k, v, do,
    )
    check_all("gpu-path chunk", ours, exact, lowp)
    q, k, v, C, do = _causal_case(("gpu-path", 1, 75, 1, 32, 20, torch.float32), seed=9)
    ours, exact, lowp = run_three(
        lambda q_, k_, v_: ba.block_causal_attention(q_, k_, v_, C),
        lambda q_, k_, v_, up: ref.block_causal_attention_ref(q_, k_, v_, C, upcast=up)[0],
        q, k, v, do,
    )
    check_all("gpu-path block-causal", ours, exact, lowp)


def test_split_kv_uneven_splits_and_segment_edges_inside_tiles(monkeypatch):
    """Split-KV forward: 3 splits of flattened key walks of 2 and 4 tiles of 16 keys (row 0: an empty cache,
    so one of its splits has no tile at all; row 1: shares of 1, 1 and 2 tiles), segment lengths (7, 17, 9)
    that end inside tiles. Output and lse against float64."""
    if not INTERPRET:
        pytest.skip("forces the split with interpreter tile sizes")
    monkeypatch.setattr(ba, "_sm_count", lambda device: 1)
    monkeypatch.setitem(ba.SPLIT_KV, "waves", 6)  # 2 programs (B 2 x H 1 x 1 q tile) -> cdiv(6, 2) = 3 splits
    monkeypatch.setitem(ba.SPLIT_KV, "min_tiles", 1)
    splits = []
    real = ba._num_splits
    monkeypatch.setattr(ba, "_num_splits", lambda *a: splits.append(real(*a)) or splits[-1])
    gen = torch.Generator().manual_seed(12)
    B, Lq, H, D = 2, 9, 1, 32
    q, k, v = (rand(B, Lq, H, D, dtype=torch.bfloat16, gen=gen) for _ in range(3))
    kc, vc = (rand(2, 40, H, D, dtype=torch.bfloat16, gen=gen) for _ in range(2))
    kp, vp = (rand(1, 20, H, D, dtype=torch.bfloat16, gen=gen) for _ in range(2))
    clen = torch.tensor([0, 17], dtype=torch.int32, device=DEVICE)
    prows = torch.zeros(B, dtype=torch.int32, device=DEVICE)
    args = (kc, vc, clen, None, kp, vp, 7, prows)
    out, lse = ba.chunk_attention_fwd(q, k, v, *args, return_lse=True)
    assert splits == [3]
    exact, r_lse = ref.chunk_attention_ref(q, k, v, *args, upcast=True)
    lowp = ref.chunk_attention_ref(q, k, v, *args, upcast=False)[0]
    check("split-kv out", out, exact, lowp)
    torch.testing.assert_close(lse.double(), r_lse.double(), rtol=0, atol=1e-4)


def test_autotune_key_has_the_lk_bucket(monkeypatch):
    """The forward's autotune key holds the bucket of the longest key walk (cache + prefix capacity + Lq) and
    the split count: a config tuned at the first chunk does not serve a 32k-key cache."""
    if not INTERPRET:
        pytest.skip("inspects the GPU launch path under the interpreter")
    import triton

    tuned = ba._chunk_attn_fwd_tuned
    assert {"LQ_BUCKET", "LK_BUCKET", "BH", "NSPLIT"} <= set(tuned.keys)
    assert {"LQ_BUCKET", "LK_BUCKET", "BH"} <= set(ba._block_causal_fwd_tuned.keys)
    monkeypatch.setattr(ba, "_gpu_tiles", lambda: True)
    monkeypatch.setattr(tuned, "configs", [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=2)])
    seen = []
    real_run = tuned.run
    monkeypatch.setattr(tuned, "run", lambda *a, **kw: seen.append(dict(zip(tuned.arg_names, a))) or real_run(*a, **kw))
    gen = torch.Generator().manual_seed(13)
    q, k, v = (rand(1, 5, 1, 16, gen=gen) for _ in range(3))
    for cap in (11, 200):
        kc, vc = (rand(1, cap, 1, 16, gen=gen) for _ in range(2))
        out = ba.chunk_attention_fwd(q, k, v, kc, vc, torch.tensor([3], dtype=torch.int32, device=DEVICE))
        exact = ref.chunk_attention_ref(q.double(), k.double(), v.double(), kc, vc,
                                        torch.tensor([3], dtype=torch.int32, device=DEVICE))[0]
        torch.testing.assert_close(out.double(), exact, rtol=0, atol=1e-5)
    assert [s["LK_BUCKET"] for s in seen] == [16, 256]  # next power of two of capacity + Lq
    assert [s["NSPLIT"] for s in seen] == [1, 1]


def test_fp32_dots_use_tensor_cores_on_gpu(monkeypatch):
    """fp32 attention compiled for a GPU uses TF32 tensor-core dots, never the "ieee" FMA loop."""
    monkeypatch.setattr(ba, "interpreting", lambda: False)
    assert ba._dot_prec(torch.float32) == "tf32"
    assert ba._dot_prec(torch.bfloat16) == "tf32"  # ignored by half types


def test_auto_sends_fp32_attention_on_cuda_to_torch(monkeypatch):
    """ops: "auto" never measures (or traces) our kernels for fp32 CUDA attention (they would use TF32) nor
    for a dtype they lack (float64: it would only fail its self-test, with a warning); half types keep them
    as a candidate; an explicit backend="triton" is not filtered."""
    from types import SimpleNamespace

    monkeypatch.setattr(ops, "triton_available", lambda: True)
    for op in ("chunk_attention", "block_causal_attention"):
        assert "triton" not in ops.attention_candidates("cuda", op, torch.float32)
        assert "triton" in ops.attention_candidates("cuda", op, torch.bfloat16)
        assert "triton" in ops.attention_candidates("cuda", op, torch.float16)
        assert "triton" not in ops.attention_candidates("cuda", op, torch.float64)  # no kernel: no warning
    # the other ops: auto on a CUDA tensor of a dtype the kernels lack is the torch path, not a failed check
    fake_cuda = SimpleNamespace(is_cuda=True, dtype=torch.float64, device=torch.device("cuda"))
    monkeypatch.setattr(ops, "_check_runnable", lambda *a: None)
    monkeypatch.setenv("ARCOPO_BACKEND", "auto")
    assert ops._resolve(fake_cuda, None, "consistency_step") == ("torch", False)
    assert ops._resolve(SimpleNamespace(is_cuda=True, dtype=torch.bfloat16), None, "consistency_step")[0] == "triton"
    from arcopo_fast import backend_choice

    monkeypatch.setattr(ops.selftest, "passed", lambda *a: True)
    monkeypatch.setattr(backend_choice, "chooser", lambda: SimpleNamespace(choices=lambda dev: {}))
    assert ops._traced_attention_backend("chunk_attention", "cache/fwd/d64", "cuda", "torch.float32") == "torch"
    assert ops._traced_attention_backend("chunk_attention", "cache/fwd/d64", "cuda", "torch.bfloat16") == "triton"


@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
def test_cuda_graph_capture_with_device_lengths():
    """No host sync in the launch: capture once, change the lengths in place, replay."""
    B, Lq, H, D = 2, 40, 2, 64
    gen = torch.Generator().manual_seed(10)
    q, k, v = (rand(B, Lq, H, D, dtype=torch.bfloat16, gen=gen) for _ in range(3))
    kc, vc = rand(2, 100, H, D, dtype=torch.bfloat16, gen=gen), rand(2, 100, H, D, dtype=torch.bfloat16, gen=gen)
    clen = torch.tensor([30, 100], dtype=torch.int32, device=DEVICE)
    rows = torch.tensor([1, 0], dtype=torch.int32, device=DEVICE)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compile and autotune outside the capture
        ba.chunk_attention_fwd(q, k, v, kc, vc, clen, rows)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ba.chunk_attention_fwd(q, k, v, kc, vc, clen, rows)
    clen.copy_(torch.tensor([77, 5], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    exact = ref.chunk_attention_ref(q.double(), k.double(), v.double(), kc, vc, clen, rows)[0]
    lowp = ref.chunk_attention_ref(q, k, v, kc, vc, clen, rows, upcast=False)[0]
    check("graph replay", out, exact, lowp)


@pytest.mark.parametrize("op,kind,tile", triton_env.backward_candidates(ba), ids=triton_env.candidate_id)
def test_backward_candidate_tiles_under_interpreter(monkeypatch, op, kind, tile):
    """Each D = 128 backward candidate the card's autotuner may pick, pinned and run by the interpreter
    through the GPU launch path: chunk attention (tiles larger than the chunk, key tiles across the prefix /
    cache / own boundaries, per-row cache lengths and rows) and block-causal attention (chunk edges inside
    tiles). Gradients against float64 (the 2x rule)."""
    if not INTERPRET:
        pytest.skip("pins one tile through the GPU launch path under the interpreter")
    monkeypatch.setattr(ba, "_gpu_tiles", lambda: True)
    dq_tuned = ba._chunk_attn_bwd_dq_tuned if op == "chunk" else ba._block_causal_bwd_dq_tuned
    triton_env.pin_tiles(monkeypatch, (ba._chunk_attn_fwd_tuned, ba._block_causal_fwd_tuned,
                                       ba._chunk_attn_bwd_dq_tuned, ba._block_causal_bwd_dq_tuned, ba._dkdv_tuned),
                         dq_tuned if kind == "dq" else ba._dkdv_tuned, tile)
    if op == "chunk":
        case = ("tile", 2, 70, 1, 128, torch.bfloat16, (2, 90, [90, 33], [1, 0]), (1, 40, 17, [0, 0]))
        q, k, v, args, do = _chunk_case(case, seed=21)
        ours, exact, lowp = run_three(
            lambda q_, k_, v_: ba.chunk_attention(q_, k_, v_, *args),
            lambda q_, k_, v_, up: ref.chunk_attention_ref(q_, k_, v_, *args, upcast=up)[0],
            q, k, v, do,
        )
    else:
        q, k, v, C, do = _causal_case(("tile", 1, 150, 1, 128, 48, torch.bfloat16), seed=22)
        ours, exact, lowp = run_three(
            lambda q_, k_, v_: ba.block_causal_attention(q_, k_, v_, C),
            lambda q_, k_, v_, up: ref.block_causal_attention_ref(q_, k_, v_, C, upcast=up)[0],
            q, k, v, do,
        )
    check_all(f"{op} {kind} {tile}", ours, exact, lowp)
