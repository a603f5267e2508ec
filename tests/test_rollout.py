"""Forked group rollouts: noise sharing, fork == independent rollouts, fork modes, micro-batching, and the
update's recomputed predictions matching the rollout's (ratio 1 on-policy)."""

from __future__ import annotations

import math

import pytest
import torch
from model_helpers import make_tiny_model

from arcopo_fast.rl.rollout import RolloutEngine
from arcopo_fast.rl.update import anchor_predictions, group_loss, sample_anchors
from arcopo_fast.sampler import StreamingSampler

HW = (4, 6)
L, G = 4, 5


def _engine(fork="copy", micro_batch=G, seed=7, model=None):
    model = model or make_tiny_model()
    sampler = StreamingSampler(model, seed=seed)
    eng = RolloutEngine(sampler, num_chunks=L, latent_hw=HW, group_size=G, perturb_scale=0.5, micro_batch=micro_batch, fork=fork)
    cross1 = model.encode_text(torch.randn(1, 5, model.cfg.text_dim, generator=torch.Generator().manual_seed(3)))
    return eng, cross1


@pytest.mark.parametrize("pivot", [0, 2, L - 1])
def test_noise_sharing_branches_agree_before_the_pivot_and_differ_from_it(pivot):
    eng, cross1 = _engine()
    s = eng.rollout(cross1, group=11, pivot=pivot)
    F = eng.model.cfg.chunk_frames
    lat = s.latents
    assert lat.shape == (G, L * F, 16, *HW)
    assert torch.equal(lat[:, : pivot * F], lat[:1, : pivot * F].expand(G, -1, -1, -1, -1))
    pivot_chunk = lat[:, pivot * F : (pivot + 1) * F]
    assert (pivot_chunk[1:] - pivot_chunk[:1]).abs().amax() > 1e-2
    for c in range(pivot + 1, L):  # later chunks share their noise but see a different past: not identical
        chunk = lat[:, c * F : (c + 1) * F]
        assert (chunk[1:] - chunk[:1]).abs().amax() > 0
    assert s.inputs.shape == s.x0_old.shape == (G, 4, F, 16, *HW)
    assert s.prefix_latents.shape[1] == pivot * F
    assert s.logp_old.shape == (4, G, G) and s.tau.shape == (4,)
    torch.testing.assert_close(s.logp_old.exp().sum(-1), torch.ones(4, G))


def test_forked_rollout_equals_independent_rollouts_with_the_same_noises():
    eng, cross1 = _engine()
    pivot = 1
    s = eng.rollout(cross1, group=3, pivot=pivot)
    for i in (0, 3):
        e_i = eng.perturbed_noise(3, pivot, torch.tensor([i]))
        seen = list(eng.sampler.stream(cross1, num_chunks=L, latent_hw=HW, samples=[3], initial_noise={pivot: e_i}, record=True))
        video = torch.cat([x0 for _, x0, _ in seen], dim=1)
        torch.testing.assert_close(s.latents[i : i + 1], video, rtol=1e-5, atol=1e-5)
        traj = seen[pivot][2]
        torch.testing.assert_close(s.inputs[i], torch.stack(traj.inputs, 1)[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s.x0_old[i], torch.stack(traj.x0, 1)[0], rtol=1e-5, atol=1e-5)
    # the perturbation has the stated form: e_i = sqrt(1 - s^2) e* + s d_i, with d_i ~ N(0, I)
    base = eng.sampler.initial_noise(torch.tensor([3]), pivot, HW)
    d = (eng.perturbed_noise(3, pivot, torch.arange(G)) - math.sqrt(0.75) * base) / 0.5
    assert abs(float(d.std()) - 1) < 0.1 and abs(float((d[0] * d[1]).mean())) < 0.1


@pytest.mark.parametrize("fork,micro_batch", [("zero_copy", G), ("copy", 2), ("zero_copy", 3), ("copy", 1)])
def test_fork_modes_and_micro_batches_give_identical_rollouts(fork, micro_batch):
    ref_eng, cross1 = _engine("copy", G)
    ref = ref_eng.rollout(cross1, group=5, pivot=2)
    eng, _ = _engine(fork, micro_batch, model=ref_eng.model)
    got = eng.rollout(cross1, group=5, pivot=2)
    for name in ("latents", "inputs", "x0_old", "logp_old", "tau", "prefix_latents"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("fork", ["copy", "zero_copy"])
def test_update_recomputes_the_rollout_predictions_ratio_one(fork):
    eng, cross1 = _engine(fork, micro_batch=2)
    s = eng.rollout(cross1, group=2, pivot=2)
    anchors = sample_anchors(G, 3, torch.Generator().manual_seed(0))
    x0 = anchor_predictions(eng.model, eng.sampler, s, cross1, s.prefix_cache, anchors, [0, 1, 2, 3])
    torch.testing.assert_close(x0, s.x0_old[anchors], rtol=1e-5, atol=1e-5)
    # the same from a prefix cache rebuilt from the clean prefix latents (the replay path)
    rebuilt = eng.rebuild_prefix_cache(cross1, s.prefix_latents)
    x0r = anchor_predictions(eng.model, eng.sampler, s, cross1, rebuilt, anchors, [1, 3])
    torch.testing.assert_close(x0r, s.x0_old[anchors][:, [1, 3]], rtol=1e-5, atol=1e-5)
    loss, stats = group_loss(eng.model, eng.sampler, s, cross1, s.prefix_cache, anchors, [0, 1, 2, 3], torch.randn(G), 1e-4)
    assert float(stats["ratio_max_dev"]) < 1e-4 and float(stats["clip_frac"]) == 0.0


def test_rollout_errors():
    eng, cross1 = _engine()
    with pytest.raises(ValueError, match="pivot"):
        eng.rollout(cross1, group=0, pivot=L)
    with pytest.raises(ValueError, match="one text row"):
        eng.rollout(eng.model.encode_text(torch.randn(2, 3, eng.model.cfg.text_dim)), group=0, pivot=0)
    with pytest.raises(ValueError, match="perturb_scale"):
        RolloutEngine(eng.sampler, num_chunks=L, latent_hw=HW, group_size=G, perturb_scale=1.0, micro_batch=2)
    with pytest.raises(ValueError, match="fork"):
        RolloutEngine(eng.sampler, num_chunks=L, latent_hw=HW, group_size=G, perturb_scale=0.5, micro_batch=2, fork="x")
    for bad in (0.0, -1.0, float("inf"), "0.5"):
        with pytest.raises(ValueError, match="tau_auto_scale"):
            RolloutEngine(eng.sampler, num_chunks=L, latent_hw=HW, group_size=G, perturb_scale=0.5, micro_batch=2, tau_auto_scale=bad)
    with pytest.raises(ValueError, match="num_anchors"):
        sample_anchors(4, 5, torch.Generator())
