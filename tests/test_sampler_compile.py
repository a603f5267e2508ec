"""The compiled per-step forward (StreamingSampler(compile=...)): one fullgraph, dynamic-shape graph family
serves every chunk position, batch and fork mode, and gives the eager numbers.

CI traces with the aot_eager backend: the same dynamo graphs and guards as Inductor without its C++ code
generation (minutes on this CPU). The Inductor + CUDA-graph path runs in tests/test_gpu_paths.py."""

from __future__ import annotations

from triton_env import INTERPRET  # sets TRITON_INTERPRET=1 unless chosen: the triton case runs on CPU

import pytest  # noqa: E402
import torch  # noqa: E402
from model_helpers import make_tiny_model  # noqa: E402
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402

from arcopo_fast.model.rope import RopeTables, rope_cos_sin  # noqa: E402
from arcopo_fast.rl.rollout import RolloutEngine  # noqa: E402
from arcopo_fast.sampler import StreamingSampler  # noqa: E402

HW = (4, 6)  # not square: duck sizing would otherwise tie height to width in the guards


def _reset_dynamo():
    # reset() resets every registered backend while iterating over them; the first reset of a CUDA-graph
    # Inductor backend imports cudagraph_trees, which registers one more backend (torch 2.13: "dictionary
    # changed size during iteration"). Importing it first keeps the registry still.
    import torch._inductor.cudagraph_trees  # noqa: F401

    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    _reset_dynamo()
    yield
    _reset_dynamo()


def _counted(sampler: StreamingSampler) -> CompileCounterWithBackend:
    """Swap the sampler's compiled forward for one whose backend counts the graphs it is given."""
    cnt = CompileCounterWithBackend("eager")
    sampler._forward = torch.compile(sampler.model.forward, fullgraph=True, dynamic=True, backend=cnt)
    return cnt


@torch.no_grad()
def _cross(model, rows=2):
    g = torch.Generator().manual_seed(5)
    return model.encode_text(torch.randn(rows, 6, model.cfg.text_dim, generator=g))


def test_rope_tables_sliced_equal_memoised_bit_for_bit():
    cfg = make_tiny_model().cfg
    tabs = RopeTables(cfg)
    for start, frames, h, w in [(0, 3, 2, 3), (9, 3, 5, 4), (17, 1, 1, 7)]:
        got = tabs._sliced(start, frames, h, w, "cpu")
        want = rope_cos_sin(cfg, start, frames, h, w)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(ValueError, match="rope_max_positions"):
        tabs._sliced(cfg.rope_max_positions - 1, 3, 2, 2, "cpu")


def test_compiled_generation_equals_eager_with_few_graphs():
    model = make_tiny_model()
    cross = _cross(model)
    with torch.no_grad():
        ref = StreamingSampler(model, seed=3).generate(cross, num_chunks=5, latent_hw=HW)
        sc = StreamingSampler(model, seed=3, compile="default", compile_backend="aot_eager")
        cnt = _counted(sc)
        got = sc.generate(cross, num_chunks=5, latent_hw=HW)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        # empty cache / non-empty cache x denoise / commit: the chunk position is a symbol, not a constant
        assert cnt.frame_count <= 4, cnt.frame_count
        graphs = cnt.frame_count
        # a longer video and other prompts reuse the same graphs
        cross = _cross(model, rows=2)
        cross = type(cross)([k.flip(1) for k in cross.k], [v.flip(1) for v in cross.v])
        got = sc.generate(cross, num_chunks=7, latent_hw=HW)
        ref = StreamingSampler(model, seed=3).generate(cross, num_chunks=7, latent_hw=HW)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        assert cnt.frame_count == graphs


@pytest.mark.parametrize("fork", ["copy", "zero_copy"])
def test_compiled_forked_rollout_equals_eager(fork):
    model = make_tiny_model()
    cross1 = _cross(model, rows=1)

    def rollout(compile):
        sampler = StreamingSampler(model, seed=4, compile=compile, compile_backend="aot_eager")
        cnt = _counted(sampler) if compile else None
        eng = RolloutEngine(sampler, num_chunks=4, latent_hw=HW, group_size=4, perturb_scale=0.5, micro_batch=2, fork=fork)
        return eng.rollout(cross1, group=2, pivot=2), cnt

    ref, _ = rollout(None)
    got, cnt = rollout("default")
    for name in ("latents", "inputs", "x0_old", "logp_old", "tau", "prefix_latents"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=1e-5, atol=1e-6, msg=name)
    assert 0 < cnt.frame_count <= 8


@pytest.mark.skipif(not INTERPRET, reason="the CUDA run of this path is in test_gpu_paths.py")
def test_compiled_generation_through_the_triton_attention_op(monkeypatch):
    """The GPU configuration (the Triton chunk attention as an opaque custom op inside the graph), traced on
    CPU by the interpreter: no graph break, eager numbers."""
    pytest.importorskip("triton")
    model = make_tiny_model()
    cross = _cross(model)
    with torch.no_grad():
        ref = StreamingSampler(model, seed=2).generate(cross, num_chunks=3, latent_hw=HW)
        monkeypatch.setenv("ARCOPO_BACKEND", "triton")
        sc = StreamingSampler(model, seed=2, compile="default", compile_backend="aot_eager")
        cnt = _counted(sc)
        got = sc.generate(cross, num_chunks=3, latent_hw=HW)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert cnt.frame_count <= 4
    ops_seen = {str(n.target) for g in cnt.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert any("arcopo_fast.chunk_attention" in o for o in ops_seen), sorted(ops_seen)[:20]


def test_reused_stream_cache_gives_the_same_videos_and_interleaved_streams_stay_apart():
    model = make_tiny_model()
    cross = _cross(model)
    with torch.no_grad():
        ref = StreamingSampler(model, seed=6).generate(cross, num_chunks=4, latent_hw=HW)
        s = StreamingSampler(model, seed=6, reuse_cache=True)
        for _ in range(2):  # the second video reuses (and resets) the first one's cache
            torch.testing.assert_close(s.generate(cross, num_chunks=4, latent_hw=HW), ref, rtol=0, atol=0)
        assert len(s._pool) == 1
        pooled = next(iter(s._pool.values())).storage_tensors()[0].data_ptr()
        # two open streams of the same shape: the second gets a private cache, both stay correct
        a = s.stream(cross, num_chunks=4, latent_hw=HW)
        b = s.stream(cross, num_chunks=4, latent_hw=HW)
        outs_a, outs_b = [], []
        for (_, xa), (_, xb) in zip(a, b):
            outs_a.append(xa)
            outs_b.append(xb)
        torch.testing.assert_close(torch.cat(outs_a, 1), ref, rtol=0, atol=0)
        torch.testing.assert_close(torch.cat(outs_b, 1), ref, rtol=0, atol=0)
        assert len(s._pool) == 1 and next(iter(s._pool.values())).storage_tensors()[0].data_ptr() == pooled
        assert not s._busy  # both finished streams released the pooled cache
        s.release_caches()
        assert not s._pool
    assert StreamingSampler(model, compile="reduce-overhead").reuse_cache
    assert not StreamingSampler(model, compile="default").reuse_cache


def test_compile_arguments_are_checked():
    model = make_tiny_model()
    with pytest.raises(ValueError, match="compile must be one of"):
        StreamingSampler(model, compile="fast")
    with pytest.raises(ValueError, match="compile_backend must be one of"):
        StreamingSampler(model, compile="default", compile_backend="tvm")
