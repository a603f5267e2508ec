"""arcopo_fast::kv_fork_ (csrc/kv_fork.cpp, csrc/cuda/kv_fork.cu) and its torch fallback (arcopo_fast/ext.py).

Reference: a Python loop of per-pair row copies on a clone. Every case runs on both implementations
(the compiled op through ext.kv_fork_, and ext.kv_fork_torch_), on fresh random data, with destination
rows poisoned (NaN) first, and compares BITWISE (the op is a copy). CUDA cases skip without CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

from arcopo_fast import ext, ops
from arcopo_fast.model.kv_cache import KVCache

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs CUDA"))]
IMPLS = {"ext": ext.kv_fork_, "fallback": ext.kv_fork_torch_}
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _reference(caches, src, dst, n):
    out = [c.clone() for c in caches]
    for c in out:
        for s, d in zip(src.tolist(), dst.tolist()):
            c[d, :n] = c[s, :n]
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view, so that NaN poison compares equal and the check is bit-exact."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _assert_bitwise_equal(got, want):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        if not torch.equal(_bits(g), _bits(w)):
            bad = (_bits(g) != _bits(w)).nonzero()
            raise AssertionError(f"caches[{i}] differs at {bad.shape[0]} elements, first {bad[:4].tolist()}")


def _random_pairs(g: torch.Generator, rows: int, pairs: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct destinations; sources drawn (with repeats) from the other rows."""
    perm = torch.randperm(rows, generator=g)
    dst, others = perm[:pairs], perm[pairs:]
    src = others[torch.randint(0, others.numel(), (pairs,), generator=g)]
    return src.to(device), dst.to(device)


def _random_caches(g, shapes, dtype, device, dst=None):
    caches = [torch.randn(s, generator=g).to(dtype=dtype, device=device) for s in shapes]
    if dst is not None:  # poison the destination rows
        for c in caches:
            c[dst] = float("nan")
    return caches


def _run(impl, caches, src, dst, n):
    want = _reference(caches, src, dst, n)
    IMPLS[impl](caches, src, dst, n)
    _assert_bitwise_equal(caches, want)


# ---------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------


def test_extension_is_built_and_loaded():
    # CI builds the extension (./setup.sh); a silent fallback would hide a broken build.
    assert ext.extension_loaded(), "arcopo_fast._C did not import: run ./setup.sh"
    assert ops.describe()["kv_fork"] == "cpp"
    assert hasattr(torch.ops.arcopo_fast, "kv_fork_")
    if CUDA and torch.version.cuda:
        assert ext.extension_has_cuda(), "torch has CUDA but arcopo_fast._C was built without csrc/cuda"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 13, 24])  # 24 = the whole cache
def test_matches_reference(impl, device, dtype, n):
    g = torch.Generator().manual_seed(1000 + n)
    rows, L, H, D = 7, 24, 3, 5  # odd token size (15 elements): unaligned spans on CUDA
    src, dst = _random_pairs(g, rows, 3, device)
    caches = _random_caches(g, [(rows, L, H, D)] * 4, dtype, device, dst)
    _run(impl, caches, src, dst, n)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(4))
def test_random_pairs_and_mixed_trailing_shapes(impl, device, seed):
    # Self-attention caches [rows, Lmax, H, D] beside a cross-attention cache [rows, Ltext, H, D'] and a
    # 2-D one, in ONE call; random pair counts and lengths (up to the shortest cache).
    g = torch.Generator().manual_seed(seed)
    rows = int(torch.randint(2, 12, (1,), generator=g))
    pairs = int(torch.randint(1, rows // 2 + 1, (1,), generator=g))
    shapes = [(rows, 40, 2, 8), (rows, 40, 2, 8), (rows, 11, 4, 3), (rows, 17)]
    n = int(torch.randint(0, 12, (1,), generator=g))
    src, dst = _random_pairs(g, rows, pairs, device)
    caches = _random_caches(g, shapes, torch.bfloat16, device, dst)
    _run(impl, caches, src, dst, n)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
def test_strided_rows(impl, device):
    g = torch.Generator().manual_seed(7)
    rows, L, H, D = 6, 10, 2, 8
    # K and V interleaved per row in one buffer, and every other row of a bigger buffer.
    buf = torch.randn(rows, 2, L, H, D, generator=g).to(device)
    big = torch.randn(2 * rows, L, H, D, generator=g).to(device)
    caches = [buf[:, 0], buf[:, 1], big[::2]]
    assert caches[0].stride(0) == 2 * L * H * D and caches[2].stride(0) == 2 * L * H * D
    src = torch.tensor([0, 0, 3], device=device)
    dst = torch.tensor([5, 1, 2], device=device)
    want_buf, want_big = buf.clone(), big.clone()
    for c in _reference_views(want_buf, want_big):
        for s, d in zip(src.tolist(), dst.tolist()):
            c[d, :7] = c[s, :7]
    IMPLS[impl](caches, src, dst, 7)
    # Whole buffers: nothing outside the views' copied spans may change.
    _assert_bitwise_equal([buf, big], [want_buf, want_big])


def _reference_views(buf, big):
    return [buf[:, 0], buf[:, 1], big[::2]]


@pytest.mark.parametrize("impl", IMPLS)
def test_storage_offset_and_empty(impl):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(1 + 5 * 9 * 3, generator=g).to(torch.bfloat16)
    c = base[1:].view(5, 9, 3)  # data pointer off by 2 bytes
    src, dst = torch.tensor([4]), torch.tensor([0])
    _run(impl, [c], src, dst, 9)
    # No pairs, no caches, zero tokens: no-ops that still validate their arguments.
    _run(impl, [c], torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), 5)
    IMPLS[impl]([], src, dst, 3)
    _run(impl, [torch.randn(3, 0, 2, generator=g)], src.clamp(max=2), dst, 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_long_spans(impl):
    # Copies of several MiB: the CPU op splits them into 1 MiB pieces over threads (partial last piece).
    g = torch.Generator().manual_seed(4)
    src, dst = torch.tensor([2, 2]), torch.tensor([0, 1])
    caches = _random_caches(g, [(3, 700, 1601), (3, 650, 3)], torch.float32, "cpu", dst)
    _run(impl, caches, src, dst, 649)


def test_extension_and_fallback_agree():
    g = torch.Generator().manual_seed(11)
    shapes = [(9, 33, 3, 7)] * 3 + [(9, 12, 5)]
    src, dst = _random_pairs(g, 9, 4, "cpu")
    a = _random_caches(g, shapes, torch.float16, "cpu", dst)
    b = [c.clone() for c in a]
    ext.kv_fork_(a, src, dst, 12)
    ext.kv_fork_torch_(b, src, dst, 12)
    _assert_bitwise_equal(a, b)


def test_fallback_when_extension_missing_warns_once(monkeypatch):
    monkeypatch.setattr(ext, "_C", None)
    monkeypatch.setattr(ext, "_warned", False)
    assert not ext.extension_loaded()
    caches, src, dst, n = _good()
    want = _reference(caches, src, dst, n)
    with pytest.warns(RuntimeWarning, match="pure-torch fallback") as record:
        ext.kv_fork_(caches, src, dst, n)
        ext.kv_fork_(caches, src, dst, n)
    assert sum(issubclass(w.category, RuntimeWarning) for w in record) == 1
    _assert_bitwise_equal(caches, want)


def test_kv_cache_fork_end_to_end():
    # KVCache.fork_ -> ops.kv_fork_ -> the C++ op: child rows get the parent's valid tokens, everything
    # beyond them (and every other row) is untouched.
    g = torch.Generator().manual_seed(5)
    cache = KVCache.allocate(
        num_layers=3, rows=5, capacity_tokens=12, num_heads=2, head_dim=4, frame_tokens=2, dtype=torch.float32
    )
    for t in (*cache._s.k, *cache._s.v):
        t.copy_(torch.randn(t.shape, generator=g))
    for layer in range(cache.num_layers):
        cache.write(layer, torch.randn(5, 6, 2, 4, generator=g), torch.randn(5, 6, 2, 4, generator=g))
    cache.advance(6)
    before = [t.clone() for t in (*cache._s.k, *cache._s.v)]
    cache.fork_(1, [0, 3, 4])
    n = cache.length
    assert n == 6
    for t, old in zip((*cache._s.k, *cache._s.v), before):
        for d in (0, 3, 4):
            assert torch.equal(t[d, :n], old[1, :n])
            assert torch.equal(t[d, n:], old[d, n:])
        assert torch.equal(t[1:3], old[1:3])


# ---------------------------------------------------------------------------------------------------------
# Bad arguments: ValueError naming the argument, the same text from both implementations, nothing written
# ---------------------------------------------------------------------------------------------------------


def _good(rows=6, device="cpu"):
    g = torch.Generator().manual_seed(0)
    caches = [torch.randn(rows, 8, 2, 4, generator=g).to(device) for _ in range(2)]
    return caches, torch.tensor([0, 0], device=device), torch.tensor([2, 3], device=device), 5


def _bad_cases():
    L = torch.long
    return {
        "src_dtype": ("src_rows must be an int64 tensor", lambda c, s, d, n: (c, s.int(), d, n)),
        "dst_dim": ("dst_rows must be 1-D", lambda c, s, d, n: (c, s, d[None], n)),
        "length": ("src_rows and dst_rows must have the same length", lambda c, s, d, n: (c, s[:1], d, n)),
        "n_negative": ("n_tokens must be >= 0", lambda c, s, d, n: (c, s, d, -1)),
        "n_too_big": (
            "n_tokens (8) must be <= the tokens of caches[1]",
            lambda c, s, d, n: ([c[0], c[1][:, :7]], s, d, 8),
        ),
        "cache_1d": (
            "caches[1] must be [rows, tokens, ...]",
            lambda c, s, d, n: ([c[0], c[1].flatten()], s, d, n),
        ),
        "cache_dtype": (
            "caches[1] must have caches[0]'s dtype",
            lambda c, s, d, n: ([c[0], c[1].double()], s, d, n),
        ),
        "trailing_strides": (
            "caches[0] must be contiguous after the row dim",
            lambda c, s, d, n: ([c[0].transpose(2, 3), c[1]], s, d, n),
        ),
        "overlapping_rows": (
            "caches[1] has overlapping rows",
            lambda c, s, d, n: ([c[0], c[1][:1].expand(6, -1, -1, -1)], s, d, n),
        ),
        "src_range": (
            "src_rows[1] = 6 is out of range for caches[0] with 6 rows",
            lambda c, s, d, n: (c, torch.tensor([0, 6]), d, n),
        ),
        "dst_negative": (
            "dst_rows[0] = -1 is out of range",
            lambda c, s, d, n: (c, s, torch.tensor([-1, 3]), n),
        ),
        "range_of_smaller": (
            "dst_rows[1] = 4 is out of range for caches[1] with 4 rows",
            lambda c, s, d, n: ([c[0], c[1][:4]], s, torch.tensor([2, 4]), n),
        ),
        "dst_repeated": (
            "dst_rows must be distinct, got dst_rows[0] = dst_rows[1] = 2",
            lambda c, s, d, n: (c, s, torch.tensor([2, 2], dtype=L), n),
        ),
        "dst_is_source": (
            "dst_rows[1] = 1 is also a source row (src_rows[1])",
            lambda c, s, d, n: (c, torch.tensor([0, 1]), torch.tensor([2, 1]), n),
        ),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_arguments(case):
    expected, make = _bad_cases()[case]
    messages = []
    for impl in IMPLS:
        caches, src, dst, n = make(*_good())
        before = [c.clone() for c in caches]
        with pytest.raises(ValueError, match="kv_fork_: ") as info:
            IMPLS[impl](caches, src, dst, n)
        assert expected in str(info.value), f"{impl}: {info.value}"
        for c, b in zip(caches, before):
            assert torch.equal(_bits(c), _bits(b)), f"{impl} wrote before failing"
        messages.append(str(info.value))
    assert messages[0] == messages[1], messages


def test_device_mismatch_message():
    # Indices on another device than the caches (meta stands in for a GPU here; the compiled op would
    # dispatch meta arguments to its fake kernel, so this checks the fallback; CUDA: see below).
    caches, src, dst, n = _good()
    with pytest.raises(ValueError, match="kv_fork_: src_rows must be on the caches' device cpu, got meta"):
        ext.kv_fork_torch_(caches, src.to("meta"), dst, n)


# ---------------------------------------------------------------------------------------------------------
# torch.library / torch.compile
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not ext.extension_loaded(), reason="arcopo_fast._C not built")
def test_opcheck():
    caches, src, dst, n = _good()
    torch.library.opcheck(torch.ops.arcopo_fast.kv_fork_.default, (caches, src, dst, n))


@pytest.mark.skipif(not ext.extension_loaded(), reason="arcopo_fast._C not built")
def test_compile_fullgraph():
    caches, src, dst, n = _good()
    want = _reference(caches, src, dst, n)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def fork(ks, s, d):
        ext.kv_fork_(ks, s, d, n)
        return ks[0].sum()

    fork(caches, src, dst)
    _assert_bitwise_equal(caches, want)


# ---------------------------------------------------------------------------------------------------------
# CUDA only
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_no_host_sync_and_graph_capture():
    torch.manual_seed(0)
    rows = 9
    caches = [torch.randn(rows, 64, 3, 16, device="cuda", dtype=torch.bfloat16) for _ in range(5)]
    src = torch.tensor([0, 0, 0], device="cuda")
    dst = torch.tensor([1, 2, 3], device="cuda")
    want = _reference(caches, src, dst, 40)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ext.kv_fork_(caches, src, dst, 40)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    _assert_bitwise_equal(caches, want)

    # Captured once, replayed with new index VALUES (tensors and n_tokens are fixed by the capture).
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ext.kv_fork_(caches, src, dst, 40)  # warm-up outside the capture
        with torch.cuda.graph(graph, stream=stream):
            ext.kv_fork_(caches, src, dst, 40)
    torch.cuda.current_stream().wait_stream(stream)
    src.copy_(torch.tensor([8, 8, 7]))
    dst.copy_(torch.tensor([4, 5, 6]))
    want = _reference(caches, src, dst, 40)
    graph.replay()
    torch.cuda.synchronize()
    _assert_bitwise_equal(caches, want)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_many_tensors_and_alignments():
    # > 128 tensors (two launches), byte offsets 0..15 of the data pointer, odd token sizes.
    g = torch.Generator().manual_seed(2)
    caches = []
    for i in range(140):
        tok = (1, 3, 8, 17)[i % 4]
        off = i % 16
        flat = torch.randint(-(2**7), 2**7, (off + 6 * 20 * tok,), generator=g, dtype=torch.int8).cuda()
        caches.append(flat[off:].view(6, 20, tok))
    src, dst = torch.tensor([5, 5, 0], device="cuda"), torch.tensor([1, 2, 3], device="cuda")
    want = _reference(caches, src, dst, 19)
    ext.kv_fork_(caches, src, dst, 19)
    _assert_bitwise_equal(caches, want)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_messages_and_debug_checks(monkeypatch):
    caches, src, dst, n = _good(device="cuda")
    for impl in IMPLS.values():
        with pytest.raises(ValueError, match="src_rows must be on the caches' device cuda:0, got cpu"):
            impl(caches, src.cpu(), dst, n)
    # Value errors on CUDA indices become readable ValueErrors in debug mode (a host sync).
    monkeypatch.setenv("ARCOPO_KV_FORK_CHECK", "1")
    for impl in IMPLS.values():
        with pytest.raises(ValueError, match="dst_rows must be distinct"):
            impl(caches, src, torch.tensor([2, 2], device="cuda"), n)
    assert os.environ["ARCOPO_KV_FORK_CHECK"] == "1"
