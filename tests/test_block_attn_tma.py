"""kernels/block_attn_tma.py: the chunk-attention and block-causal kernels with TMA loads (device-side tensor
descriptors), against the float64 references, and how arcopo_fast.ops exposes them ("triton_tma").

Under TRITON_INTERPRET=1 the interpreter emulates the descriptors: bounds per descriptor dimension (rows
past a segment's length come back as zeros, memory not read), clipped stores, and TMA's alignment rules
(asserts). Every case counts the TMA kernel's launches, so a silent fallback to the pointer kernel fails.
Accuracy: the 2x rule of tests/test_block_attn.py. On a GPU machine with sm_90,
`TRITON_INTERPRET=0 pytest tests/test_block_attn_tma.py` runs the same cases compiled.
"""

from __future__ import annotations

import contextvars

import triton_env  # noqa: E402
from triton_env import DEVICE, INTERPRET, require_kernel_device, tf32_reference_on_gpu  # noqa: F401 (autouse)

require_kernel_device()  # sets TRITON_INTERPRET=1 (CPU) unless chosen; before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

from arcopo_fast import ops, selftest  # noqa: E402
from arcopo_fast.kernels import block_attn as ba  # noqa: E402
from arcopo_fast.kernels import block_attn_tma as bt  # noqa: E402
from arcopo_fast.kernels import reference as ref  # noqa: E402

if not INTERPRET and (why := bt.tma_unsupported("cuda")):
    pytest.skip(why, allow_module_level=True)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every buffer the kernels write starts as NaN, so an unwritten element fails the comparison."""
    monkeypatch.setattr(ba, "_empty", lambda shape, *, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                    device=device))


class _Counting:
    """Stands in for a jitted kernel: records each launch grid, then launches the kernel."""

    def __init__(self, kernel, grids):
        self.kernel, self.grids = kernel, grids

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.fixture
def tma_launches(monkeypatch):
    """{"fwd" | "dq" | "dkdv" | "causal_fwd" | "causal_dq": grids} of the TMA kernels' launches (interpreter
    launches go through __getitem__; compiled runs on a GPU are not counted). dk/dv of both ops is "dkdv"."""
    grids = {"fwd": [], "dq": [], "dkdv": [], "causal_fwd": [], "causal_dq": []}
    if INTERPRET:
        for key, name in (("fwd", "_chunk_attn_fwd_tma_kernel"), ("dq", "_chunk_attn_bwd_dq_tma_kernel"),
                          ("dkdv", "_dkdv_tma_kernel"), ("causal_fwd", "_block_causal_fwd_tma_kernel"),
                          ("causal_dq", "_block_causal_bwd_dq_tma_kernel")):
            monkeypatch.setattr(bt, name, _Counting(getattr(bt, name), grids[key]))
    return grids


def rand(*shape, dtype=torch.float32, gen=None):
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=DEVICE, dtype=dtype)


def ints(values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def check(name, ours, exact, lowp, slack=1e-5):
    assert ours.shape == exact.shape and torch.isfinite(ours).all(), f"{name}: shape or non-finite values"
    err = (ours.double() - exact).abs().max().item()
    bound = 2 * (lowp.double() - exact).abs().max().item() + slack * max(1.0, exact.abs().max().item())
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e}"


def _plant_nan(kx, vx, lens, rows):
    """NaN in every cache slot past each row's length (what a cache may hold there); returns a finite copy for
    the reference (which computes 0 x slot for masked keys)."""
    clean = kx.clone(), vx.clone()
    lens = lens.tolist() if isinstance(lens, torch.Tensor) else [lens] * len(rows)
    longest = {}  # a row read by several batch rows: NaN past the longest read
    for r, n in zip(rows, lens):
        longest[r] = max(n, longest.get(r, 0))
    for r, n in longest.items():
        kx[r, n:] = float("nan")
        vx[r, n:] = float("nan")
    return clean


# (id, B, Lq, H, D, dtype, cache (R, Lmax, lens, rows) or None, prefix (R, Lmax, len, rows) or None)
CASES = [
    # odd Lq (not a multiple of the 16-row tile), per-row cache lengths and rows, int prefix length
    ("prefix+ragged-bf16-d64", 2, 37, 2, 64, torch.bfloat16, (3, 50, [45, 7], [2, 0]), (2, 20, 13, [1, 1])),
    ("cache-int-fp16-d128", 1, 19, 1, 128, torch.float16, (1, 40, 33, None), None),
    ("own-only-fp32-d16", 2, 21, 3, 16, torch.float32, None, None),
    # a zero-length row, a full row, and a prefix with per-row lengths
    ("ragged-empty-row-fp16-d32", 3, 17, 2, 32, torch.float16, (3, 32, [0, 32, 18], [1, 2, 0]),
     (1, 24, [24, 3, 0], [0, 0, 0])),
]


def _case(case, seed):
    cid, B, Lq, H, D, dtype, cache, prefix = case
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (rand(B, Lq, H, D, dtype=dtype, gen=gen) for _ in range(3))
    args, clean = [], []
    for spec in (cache, prefix):
        if spec is None:
            args.append((None, None, 0, None))
            clean.append((None, None))
            continue
        R, Lmax, n, rows = spec
        kx, vx = (rand(R, Lmax, H, D, dtype=dtype, gen=gen) for _ in range(2))
        n = ints(n) if isinstance(n, list) else n
        rows_t = None if rows is None else ints(rows)
        clean.append(_plant_nan(kx, vx, n, rows if rows is not None else list(range(B))))
        args.append((kx, vx, n, rows_t))
    (kc, vc, clen, crows), (kp, vp, plen, prows) = args
    ref_args = (clean[0][0], clean[0][1], clen, crows, clean[1][0], clean[1][1], plen, prows)
    return q, k, v, (kc, vc, clen, crows, kp, vp, plen, prows), ref_args, rand(B, Lq, H, D, gen=gen)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_tma_forward_matches_float64_reference_and_ignores_nan_past_lengths(case, tma_launches):
    q, k, v, args, ref_args, _ = _case(case, seed=3)
    out, lse = ba.chunk_attention_fwd(q, k, v, *args, return_lse=True, tma=True)
    if INTERPRET:
        assert len(tma_launches["fwd"]) == 1
    exact, r_lse = ref.chunk_attention_ref(q, k, v, *ref_args, upcast=True)
    lowp = ref.chunk_attention_ref(q, k, v, *ref_args, upcast=False)[0]
    check(case[0], out, exact, lowp)
    torch.testing.assert_close(lse.double(), r_lse.double(), rtol=0, atol=1e-4)


def _outputs_and_grads(q, k, v, do, fns):
    """[(out, dq, dk, dv)] of each (fn, dtype) in fns: fn on fresh leaves (q, k, v in dtype; None: as given),
    back-propagated with do."""
    res = []
    for fn, dt in fns:
        leaves = [(t if dt is None else t.to(dt)).detach().requires_grad_(True) for t in (q, k, v)]
        out = fn(*leaves)
        res.append((out, *torch.autograd.grad(out, leaves, do.to(out.dtype))))
    return res


@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=[CASES[0][0], CASES[3][0]])
def test_tma_gradients_through_the_op(case, tma_launches):
    """chunk_attention(tma=True): the TMA forward, dq (NaN past the lengths must not reach dq either) and
    dk/dv (odd Lq: q / dO rows past it are TMA zeros), against float64."""
    q, k, v, args, ref_args, do = _case(case, seed=5)
    grads = _outputs_and_grads(q, k, v, do, (
        (lambda a, b, c: ba.chunk_attention(a, b, c, *args, tma=True), None),
        (lambda a, b, c: ref.chunk_attention_ref(a, b, c, *ref_args, upcast=True)[0], torch.float64),
        (lambda a, b, c: ref.chunk_attention_ref(a, b, c, *ref_args, upcast=False)[0], None)))
    if INTERPRET:
        assert {k: len(g) for k, g in tma_launches.items()} == dict(fwd=1, dq=1, dkdv=1, causal_fwd=0, causal_dq=0)
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), *grads):
        check(name, a, b, c)


def test_tma_split_kv(monkeypatch, tma_launches):
    """Split-KV with the TMA kernel: 3 splits over walks whose segments end inside tiles (7, 17, 9 keys) and a
    row with an empty cache (one of its splits has no tile)."""
    if not INTERPRET:
        pytest.skip("forces the split with interpreter tile sizes")
    monkeypatch.setattr(ba, "_sm_count", lambda device: 1)
    monkeypatch.setitem(ba.SPLIT_KV, "waves", 6)
    monkeypatch.setitem(ba.SPLIT_KV, "min_tiles", 1)
    gen = torch.Generator().manual_seed(12)
    B, Lq, H, D = 2, 9, 1, 32
    q, k, v = (rand(B, Lq, H, D, dtype=torch.bfloat16, gen=gen) for _ in range(3))
    kc, vc = (rand(2, 40, H, D, dtype=torch.bfloat16, gen=gen) for _ in range(2))
    kp, vp = (rand(1, 20, H, D, dtype=torch.bfloat16, gen=gen) for _ in range(2))
    clen = ints([0, 17])
    clean_c = _plant_nan(kc, vc, clen, [0, 1])
    clean_p = _plant_nan(kp, vp, 7, [0])
    args = (kc, vc, clen, None, kp, vp, 7, ints([0, 0]))
    out, lse = ba.chunk_attention_fwd(q, k, v, *args, return_lse=True, tma=True)
    assert len(tma_launches["fwd"]) == 1 and tma_launches["fwd"][0][2] == 3  # grid (q tiles, B * H, splits)
    r_args = (*clean_c, clen, None, *clean_p, 7, ints([0, 0]))
    exact, r_lse = ref.chunk_attention_ref(q, k, v, *r_args, upcast=True)
    check("split tma", out, exact, ref.chunk_attention_ref(q, k, v, *r_args, upcast=False)[0])
    torch.testing.assert_close(lse.double(), r_lse.double(), rtol=0, atol=1e-4)


# Block-causal: (id, B, L, H, D, dtype, chunk_tokens). No L is a multiple of the 16-row interpreter tile or of
# its chunk (the last chunk is partial) except where the case says so.
CAUSAL_CASES = [
    ("chunk7-bf16-d32", 2, 37, 2, 32, torch.bfloat16, 7),  # chunk edges inside every tile
    ("chunk12-fp16-d64", 1, 45, 1, 64, torch.float16, 12),
    ("chunk24-fp32-d16", 1, 53, 2, 16, torch.float32, 24),  # chunks span tiles: unmasked tiles below lo_end
    ("chunk16-bf16-d16", 1, 48, 1, 16, torch.bfloat16, 16),  # chunk = tile, L a multiple of both
    ("one-partial-chunk-fp16-d16", 2, 21, 1, 16, torch.float16, 40),  # plain attention
]


def _causal(case, seed):
    _, B, L, H, D, dtype, chunk = case
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (rand(B, L, H, D, dtype=dtype, gen=gen) for _ in range(3))
    return q, k, v, chunk, rand(B, L, H, D, gen=gen)


@pytest.mark.parametrize("case", CAUSAL_CASES, ids=[c[0] for c in CAUSAL_CASES])
def test_tma_block_causal_forward_matches_float64_reference(case, tma_launches):
    q, k, v, chunk, _ = _causal(case, seed=21)
    out, lse = ba.block_causal_attention_fwd(q, k, v, chunk, return_lse=True, tma=True)
    if INTERPRET:
        assert len(tma_launches["causal_fwd"]) == 1 and tma_launches["fwd"] == []
    exact, r_lse = ref.block_causal_attention_ref(q.double(), k.double(), v.double(), chunk)
    check(case[0], out, exact, ref.block_causal_attention_ref(q, k, v, chunk, upcast=False)[0])
    torch.testing.assert_close(lse.double(), r_lse.double(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("case", [CAUSAL_CASES[i] for i in (0, 1, 2)], ids=[CAUSAL_CASES[i][0] for i in (0, 1, 2)])
def test_tma_block_causal_gradients(case, tma_launches):
    """block_causal_attention(tma=True): the TMA forward, dq and dk/dv (the chunk kernel's, CAUSAL=True: q /
    dO rows past L are TMA zeros, the key tiles that straddle a chunk edge take the mask) against float64."""
    q, k, v, chunk, do = _causal(case, seed=23)
    grads = _outputs_and_grads(q, k, v, do, (
        (lambda a, b, c: ba.block_causal_attention(a, b, c, chunk, tma=True), None),
        (lambda a, b, c: ref.block_causal_attention_ref(a, b, c, chunk)[0], torch.float64),
        (lambda a, b, c: ref.block_causal_attention_ref(a, b, c, chunk, upcast=False)[0], None)))
    if INTERPRET:
        assert {k: len(g) for k, g in tma_launches.items()} == dict(fwd=0, dq=0, dkdv=1, causal_fwd=1, causal_dq=1)
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), *grads):
        check(f"{case[0]} {name}", a, b, c)


def test_tma_block_causal_never_reads_keys_past_a_tiles_last_chunk(tma_launches):
    """Each program's K / V descriptors end at the last key its q tile may see (hi_end). The first q tile (rows
    0-15, chunks of 10: hi_end 20) walks the key tiles [0, 16) and [16, 32); keys 20-31 must come back as TMA
    zeros, never read (a read NaN value times P = 0 is NaN). With NaN in every key and value from 20 on, that
    tile's rows still match the clean float64 reference."""
    if not INTERPRET:
        pytest.skip("the interpreter's 16-row q tiles")
    gen = torch.Generator().manual_seed(25)
    B, L, H, D, chunk = 1, 45, 2, 16, 10
    q, k, v = (rand(B, L, H, D, dtype=torch.float16, gen=gen) for _ in range(3))
    kn, vn = k.clone(), v.clone()
    kn[:, 20:], vn[:, 20:] = float("nan"), float("nan")
    out = ba.block_causal_attention_fwd(q, kn, vn, chunk, tma=True)
    assert len(tma_launches["causal_fwd"]) == 1 and ba.INTERPRET_BLOCKS["fwd"][0] == 16
    exact = ref.block_causal_attention_ref(q.double(), k.double(), v.double(), chunk)[0][:, :16]
    lowp = ref.block_causal_attention_ref(q, k, v, chunk, upcast=False)[0][:, :16]
    check("rows of the first q tile", out[:, :16], exact, lowp)


def test_layouts_tma_cannot_address_fall_back_to_the_pointer_kernel(tma_launches):
    """A q whose data is 2 bytes off 16-byte alignment (a view into a larger buffer): TMA cannot address it,
    the pointer kernel serves, same result. tma_layout_ok is the host-side rule."""
    gen = torch.Generator().manual_seed(7)
    B, Lq, H, D = 1, 20, 2, 16
    buf = rand(B * Lq * H * D + 1, dtype=torch.float16, gen=gen)
    q = buf[1:].view(B, Lq, H, D)
    k, v = (rand(B, Lq, H, D, dtype=torch.float16, gen=gen) for _ in range(2))
    assert not bt.tma_layout_ok(q) and bt.tma_layout_ok(k, v)
    assert not bt.tma_layout_ok(rand(1, 5, 1, 20, dtype=torch.float16)[..., :16])  # 40-byte token stride
    out = ba.chunk_attention_fwd(q, k, v, tma=True)
    if INTERPRET:
        assert tma_launches["fwd"] == []
    torch.testing.assert_close(out, ba.chunk_attention_fwd(q, k, v), rtol=0, atol=0)


def test_ops_backend_triton_tma_and_its_gates(monkeypatch, tma_launches):
    """backend="triton_tma" runs the TMA forwards of chunk and block-causal attention when forced (CPU:
    interpreter only); "auto" never lists it on CPU, and on CUDA only where TMA exists (sm_90+, a Triton with
    tensor descriptors); other ops forced to triton_tma run their Triton kernels."""
    gen = torch.Generator().manual_seed(9)
    q, k, v = (rand(1, 18, 2, 16, dtype=torch.bfloat16, gen=gen) for _ in range(3))
    got = ops.chunk_attention(q, k, v, backend="triton_tma")
    torch.testing.assert_close(got, ops.chunk_attention(q, k, v, backend="triton"), rtol=0, atol=0)
    got = ops.block_causal_attention(q, k, v, 7, backend="triton_tma")
    torch.testing.assert_close(got, ops.block_causal_attention(q, k, v, 7, backend="triton"), rtol=0, atol=0)
    if INTERPRET:
        assert len(tma_launches["fwd"]) == 1 and len(tma_launches["causal_fwd"]) == 1
    assert "triton_tma" not in ops.attention_candidates(torch.device("cpu"), "chunk_attention", torch.bfloat16)

    monkeypatch.setattr(ops, "triton_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for cap, listed in (((9, 0), True), ((8, 6), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, cap=cap: cap)
        cands = ops.attention_candidates(torch.device("cuda"), "chunk_attention", torch.bfloat16)
        assert ("triton_tma" in cands) is listed, (cap, cands)
        causal = ops.attention_candidates(torch.device("cuda"), "block_causal_attention", torch.bfloat16)
        assert ("triton_tma" in causal) is listed, (cap, causal)
    assert "sm_86" in ops.tma_unsupported("cuda")
    monkeypatch.delattr(bt.tl, "make_tensor_descriptor")
    assert "tensor descriptors" in ops.tma_unsupported("cuda")
    with pytest.raises(RuntimeError, match="triton_tma.*tensor descriptors"):
        ops.chunk_attention(q, k, v, backend="triton_tma")
    monkeypatch.setenv("ARCOPO_BACKEND", "triton_tma")
    assert ops._resolve(q, None, "qk_norm_rope")[0] == "triton"


def test_selftest_covers_triton_tma(monkeypatch):
    """The on-device self-test lists triton_tma variants wherever TMA runs (faked sm_90 here) and its check
    passes against float64 (run here on CPU through the interpreter)."""
    v = selftest.run_check("chunk_attention", "ragged/fwd/d16", "triton_tma", DEVICE, "bfloat16")
    assert v.ok, v.error
    v = selftest.run_check("block_causal_attention", "fwd/d16", "triton_tma", DEVICE, "bfloat16")
    assert v.ok, v.error
    monkeypatch.setattr(ops, "tma_unsupported", lambda device: None)
    listed = [c for c in selftest.all_checks("cuda:0", "bfloat16", 16) if c[2] == "triton_tma"]
    chunk = {f"{k}/{p}/d16" for k in ("own", "cache", "ragged", "prefix") for p in ("fwd", "fwd+bwd")}
    assert {c[1] for c in listed if c[0] == "chunk_attention"} == chunk
    assert {c[1] for c in listed if c[0] == "block_causal_attention"} == {"fwd/d16", "fwd+bwd/d16"}
    assert {c[0] for c in listed} == {"chunk_attention", "block_causal_attention"}
    monkeypatch.setattr(ops, "tma_unsupported", lambda device: "no TMA")
    assert not [c for c in selftest.all_checks("cuda:0", "bfloat16", 16) if c[2] == "triton_tma"]


def test_allocator_installed_only_when_none_is_set():
    """Device-side descriptors need Triton's launch-time allocator: ensure_allocator installs a torch one
    when none is set and leaves a caller's own allocator alone (run in a copied context: it is a ContextVar)."""
    import triton
    from triton.runtime._allocation import _allocator

    def body():
        bt.ensure_allocator()
        assert _allocator.get() is bt._scratch
        mine = lambda size, alignment, stream: None  # noqa: E731
        triton.set_allocator(mine)
        bt.ensure_allocator()
        assert _allocator.get() is mine

    contextvars.copy_context().run(body)


@pytest.mark.parametrize("op,kind,tile", triton_env.backward_candidates(ba), ids=triton_env.candidate_id)
def test_tma_backward_candidate_tiles_under_interpreter(monkeypatch, op, kind, tile):
    """Each D = 128 backward candidate of the TMA dq / dk-dv autotuners, pinned and run by the interpreter
    through the GPU launch path: chunk attention with NaN past the cache lengths (tiles larger than the
    chunk, key tiles across segment boundaries) and block-causal attention with chunk edges inside tiles.
    Gradients against float64."""
    if not INTERPRET:
        pytest.skip("pins one tile through the GPU launch path under the interpreter")
    monkeypatch.setattr(ba, "_gpu_tiles", lambda: True)
    dq_tuned = bt._chunk_attn_bwd_dq_tma_tuned if op == "chunk" else bt._block_causal_bwd_dq_tma_tuned
    triton_env.pin_tiles(monkeypatch, (bt._chunk_attn_fwd_tma_tuned, bt._block_causal_fwd_tma_tuned,
                                       bt._chunk_attn_bwd_dq_tma_tuned, bt._block_causal_bwd_dq_tma_tuned,
                                       bt._dkdv_tma_tuned),
                         dq_tuned if kind == "dq" else bt._dkdv_tma_tuned, tile)
    if op == "chunk":
        case = ("tile", 2, 70, 1, 128, torch.bfloat16, (2, 90, [90, 33], [1, 0]), (1, 40, 17, [0, 0]))
        q, k, v, args, ref_args, do = _case(case, seed=29)
        fns = ((lambda a, b, c: ba.chunk_attention(a, b, c, *args, tma=True), None),
               (lambda a, b, c: ref.chunk_attention_ref(a, b, c, *ref_args, upcast=True)[0], torch.float64),
               (lambda a, b, c: ref.chunk_attention_ref(a, b, c, *ref_args, upcast=False)[0], None))
    else:
        q, k, v, chunk, do = _causal(("tile", 1, 150, 1, 128, torch.bfloat16, 48), seed=31)
        fns = ((lambda a, b, c: ba.block_causal_attention(a, b, c, chunk, tma=True), None),
               (lambda a, b, c: ref.block_causal_attention_ref(a, b, c, chunk)[0], torch.float64),
               (lambda a, b, c: ref.block_causal_attention_ref(a, b, c, chunk, upcast=False)[0], None))
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), *_outputs_and_grads(q, k, v, do, fns)):
        check(f"{op} {kind} {tile} {name}", a, b, c)
