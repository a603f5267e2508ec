"""KV-cache fork (performance.md section 3): arcopo_fast::kv_fork_ (one launch for all layers and children)
against torch advanced indexing (one statement per tensor, broadcast source) and a copy_ loop (one copy_
per child per tensor), measured in the same run on the same caches.

    python -m pytest benchmarks/bench_kv_fork.py            # CUDA shapes skip on CPU; a tiny CPU case runs

Shape: 30 layers x (K, V) = 60 tensors [1 + children, prefix, 12, 128] bf16; row 0 is the parent.
Bytes per fork (reads + writes, the ceiling's unit: about 3.0 TB/s on an H100):
    2 * children * tensors * prefix * heads * head_dim * element_size
e.g. 18720 tokens, 8 children: 27.6 GB written + 27.6 GB read. Time: bench_helpers.cuda_time_ms (median after
warm-up) (extra_info: ms, TB/s, and for kv_fork the baselines' TB/s and the ratios); the pytest-benchmark
table times each call followed by torch.cuda.synchronize().
"""

from __future__ import annotations

import pytest
import torch
from bench_helpers import cuda_time_ms

from arcopo_fast import ext

CUDA = torch.cuda.is_available()
LAYERS, HEADS, HEAD_DIM = 30, 12, 128


def fork_bytes(caches: list[torch.Tensor], children: int, n: int) -> int:
    """Bytes read + written by one fork of n tokens into `children` rows, over all tensors."""
    return sum(2 * children * n * c[0, 0].numel() * c.element_size() for c in caches)


def fork_kv(caches, src, dst, dst_list, n):
    ext.kv_fork_(caches, src, dst, n)


def fork_index(caches, src, dst, dst_list, n):
    for c in caches:  # one statement per tensor: [children, n, H, D] <- broadcast of a gathered [1, n, H, D]
        c[dst, :n] = c[src[:1], :n]  # (torch refuses a view of c as the source: it aliases the target)


def fork_copy_loop(caches, src, dst, dst_list, n):
    for c in caches:
        for d in dst_list:
            c[d, :n].copy_(c[0, :n])


IMPLS = {"index": fork_index, "copy_loop": fork_copy_loop, "kv_fork": fork_kv}


def make_caches(layers, rows, tokens, heads, head_dim, dtype, device):
    caches = [
        torch.empty(rows, tokens, heads, head_dim, dtype=dtype, device=device) for _ in range(2 * layers)
    ]
    for c in caches:
        c[0].normal_()  # the parent; children's contents do not matter for speed
    children = torch.arange(1, rows, device=device)
    return caches, torch.zeros_like(children), children


def _check(caches, dst_list, n):
    for c in (caches[0], caches[-1]):
        assert torch.equal(c[dst_list[-1], :n], c[0, :n])


# ---------------------------------------------------------------------------------------------------------
# CUDA: the real shapes
# ---------------------------------------------------------------------------------------------------------

SHAPES = [(p, g) for p in (4680, 18720, 28080) for g in (8, 12)]


@pytest.fixture(scope="module", params=SHAPES, ids=[f"prefix{p}-children{g}" for p, g in SHAPES])
def cuda_caches(request):
    prefix, children = request.param
    need = 2 * LAYERS * (1 + children) * prefix * HEADS * HEAD_DIM * 2
    free, _ = torch.cuda.mem_get_info()
    if need + (2 << 30) > free:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of GPU memory, {free / 2**30:.1f} GiB free")
    caches, src, dst = make_caches(LAYERS, 1 + children, prefix, HEADS, HEAD_DIM, torch.bfloat16, "cuda")
    yield prefix, children, caches, src, dst
    del caches
    torch.cuda.empty_cache()


@pytest.mark.skipif(not CUDA, reason="CUDA shapes (30 layers x 12 x 128 bf16, up to 67 GB) need a GPU")
@pytest.mark.parametrize("impl", list(IMPLS))
def test_fork_cuda(benchmark, cuda_caches, impl):
    prefix, children, caches, src, dst = cuda_caches
    dst_list = dst.tolist()
    fn = IMPLS[impl]
    run = lambda f=fn: f(caches, src, dst, dst_list, prefix)
    gb = fork_bytes(caches, children, prefix) / 1e9
    ms = cuda_time_ms(run)
    info = {"ms": ms, "GB_moved": gb, "TB/s": gb / ms}  # GB / ms = TB/s
    if impl == "kv_fork":
        # Baselines re-measured here, on the same caches in the same process, for the ratios.
        for name in ("index", "copy_loop"):
            base_ms = cuda_time_ms(lambda f=IMPLS[name]: f(caches, src, dst, dst_list, prefix))
            info[f"{name}_TB/s"] = gb / base_ms
            info[f"speedup_vs_{name}"] = base_ms / ms
    benchmark.extra_info.update(info)
    benchmark.pedantic(lambda: (run(), torch.cuda.synchronize()), rounds=5, warmup_rounds=1)
    _check(caches, dst_list, prefix)


# ---------------------------------------------------------------------------------------------------------
# CPU: one tiny case, so that `pytest benchmarks/` exercises the code everywhere
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", list(IMPLS))
def test_fork_cpu_tiny(benchmark, impl):
    layers, children, tokens = 2, 3, 64
    caches, src, dst = make_caches(layers, 1 + children, tokens, 2, 16, torch.float32, "cpu")
    dst_list = dst.tolist()
    run = lambda: IMPLS[impl](caches, src, dst, dst_list, tokens)
    benchmark.extra_info["GB_moved"] = fork_bytes(caches, children, tokens) / 1e9
    benchmark.pedantic(run, rounds=20, warmup_rounds=2)
    benchmark.extra_info["GB/s"] = benchmark.extra_info["GB_moved"] / benchmark.stats.stats.median
    _check(caches, dst_list, tokens)
