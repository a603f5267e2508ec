"""The model, sampler, forked rollouts and a training iteration on CUDA with our kernels (backend triton,
bf16): what CPU tests check with the torch path, checked on the path a GPU run takes. Skipped without CUDA."""

from __future__ import annotations

import os

import pytest
import torch
from model_helpers import make_tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="needs CUDA (compiled Triton kernels)")

HW = (6, 10)


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    monkeypatch.setenv("ARCOPO_BACKEND", "triton")


def _model(dtype=torch.bfloat16):
    return make_tiny_model(dtype=dtype).cuda()


def test_streaming_equals_full_sequence_on_cuda():
    from arcopo_fast.model.kv_cache import KVCache

    m = _model(torch.float32)
    x = torch.randn(2, 9, 16, *HW, device="cuda")
    t = torch.rand(2, 9, device="cuda") * 1000
    cross = m.encode_text(torch.randn(2, 5, m.cfg.text_dim, device="cuda"))
    with torch.no_grad():
        full = m.forward_full(x, t, cross)  # Triton block-causal kernel
        cache = KVCache.for_model(m.cfg, rows=2, num_chunks=3, frame_tokens=m.frame_tokens(*HW), device="cuda", dtype=torch.float32)
        outs = [m(x[:, c * 3 : c * 3 + 3], t[:, c * 3 : c * 3 + 3], cross, cache, commit=c < 2) for c in range(3)]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("fork", ["copy", "zero_copy"])
def test_forked_rollout_equals_independent_rollouts_on_cuda(fork):
    from arcopo_fast.rl.rollout import RolloutEngine
    from arcopo_fast.sampler import StreamingSampler

    m = _model()
    sampler = StreamingSampler(m, seed=3)
    eng = RolloutEngine(sampler, num_chunks=4, latent_hw=HW, group_size=5, perturb_scale=0.5, micro_batch=2, fork=fork)
    cross1 = m.encode_text(torch.randn(1, 5, m.cfg.text_dim, device="cuda", dtype=torch.bfloat16))
    s = eng.rollout(cross1, group=7, pivot=2)
    for i in (0, 4):
        e_i = eng.perturbed_noise(7, 2, torch.tensor([i]))
        video = sampler.generate(cross1, num_chunks=4, latent_hw=HW, samples=[7], initial_noise={2: e_i})
        # bf16 kernels at different batch sizes: equal up to bf16 rounding
        torch.testing.assert_close(s.latents[i : i + 1], video, rtol=3e-2, atol=3e-2)


def test_training_iterations_on_cuda(tmp_path):
    from arcopo_fast.config import load_config
    from arcopo_fast.trainer import Trainer

    cfg = load_config("tiny", None, [f"run.out_dir={tmp_path}", "run.iterations=2", "run.progress=false", "run.sample_videos=false",
                                     "model.dtype=bfloat16", "optim.autocast_bf16=true", "run.device=cuda", "run.fork=zero_copy"])
    summary = Trainer(cfg).run()
    assert summary["iterations"] == 2


def test_on_policy_ratio_is_one_on_cuda():
    """The rollout (no grad: fused norm+RoPE, micro-batched) and the update (grad: module path, one batch of
    anchor-steps) must predict the same x0 closely enough that the first update's ratios sit well inside
    the 1e-4 clip range; otherwise bf16 numerics alone would clip (and zero) the on-policy gradient."""
    from arcopo_fast.rl.rollout import RolloutEngine
    from arcopo_fast.rl.update import group_loss, sample_anchors
    from arcopo_fast.sampler import StreamingSampler

    m = _model()
    sampler = StreamingSampler(m, seed=5)
    eng = RolloutEngine(sampler, num_chunks=3, latent_hw=HW, group_size=6, perturb_scale=0.5, micro_batch=3, fork="zero_copy")
    cross1 = m.encode_text(torch.randn(1, 5, m.cfg.text_dim, device="cuda", dtype=torch.bfloat16))
    s = eng.rollout(cross1, group=1, pivot=1)
    for p in m.parameters():
        p.requires_grad_(True)  # the update's path (module norms, autograd)
    anchors = sample_anchors(6, 4, torch.Generator().manual_seed(0))
    _, stats = group_loss(m, sampler, s, cross1, s.prefix_cache, anchors, [0, 1, 2, 3], torch.randn(6, device="cuda"), 1e-4)
    assert float(stats["ratio_max_dev"]) < 2e-5, float(stats["ratio_max_dev"])


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_sampler_equals_eager_on_cuda(mode):
    """Inductor (and CUDA-graph replay) of the per-step forward with the Triton attention op inside it."""
    from arcopo_fast.sampler import StreamingSampler

    torch._dynamo.reset()
    m = _model()
    cross = m.encode_text(torch.randn(2, 5, m.cfg.text_dim, device="cuda", dtype=torch.bfloat16))
    with torch.no_grad():
        ref = StreamingSampler(m, seed=4).generate(cross, num_chunks=4, latent_hw=HW)
        s = StreamingSampler(m, seed=4, compile=mode)
        for _ in range(2):  # the second video replays the recorded graphs on the reused cache
            got = s.generate(cross, num_chunks=4, latent_hw=HW)
            torch.testing.assert_close(got, ref, rtol=3e-2, atol=3e-2)


def test_on_policy_ratio_is_one_with_compiled_rollouts_on_cuda():
    """As above, with the rollout's forward compiled (Inductor fuses the norms its own way) and the update
    eager: the ratio must still sit well inside the clip range."""
    from arcopo_fast.rl.rollout import RolloutEngine
    from arcopo_fast.rl.update import group_loss, sample_anchors
    from arcopo_fast.sampler import StreamingSampler

    torch._dynamo.reset()
    m = _model()
    sampler = StreamingSampler(m, seed=5, compile="default")
    eng = RolloutEngine(sampler, num_chunks=3, latent_hw=HW, group_size=6, perturb_scale=0.5, micro_batch=3, fork="zero_copy")
    cross1 = m.encode_text(torch.randn(1, 5, m.cfg.text_dim, device="cuda", dtype=torch.bfloat16))
    with torch.no_grad():
        s = eng.rollout(cross1, group=1, pivot=1)
    for p in m.parameters():
        p.requires_grad_(True)
    anchors = sample_anchors(6, 4, torch.Generator().manual_seed(0))
    _, stats = group_loss(m, sampler, s, cross1, s.prefix_cache, anchors, [0, 1, 2, 3], torch.randn(6, device="cuda"), 1e-4)
    assert float(stats["ratio_max_dev"]) < 2e-5, float(stats["ratio_max_dev"])
