"""Streaming few-step sampler: schedule numbers, determinism, noise overrides, streaming, errors."""

from __future__ import annotations

import pytest
import torch
from model_helpers import make_tiny_model

from arcopo_fast.sampler import FewStepSchedule, StreamingSampler, forwards_per_video

HW = (4, 6)


def test_schedule_matches_self_forcing_numbers():
    sch = FewStepSchedule()
    assert sch.timesteps() == pytest.approx([1000.0, 937.5, 833.3333333, 625.0])
    assert sch.sigmas() == pytest.approx([1.0, 0.9375, 0.8333333, 0.625])
    assert FewStepSchedule(shift=8.0).timesteps()[1] == pytest.approx(1000 * 6.0 / 6.25)
    assert FewStepSchedule(warp=False).timesteps() == [1000.0, 750.0, 500.0, 250.0]
    assert forwards_per_video(7, 4) == 34
    for bad in (dict(denoising_steps=()), dict(denoising_steps=(500, 750)), dict(shift=0.0), dict(context_noise=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):  # the message names the field
            FewStepSchedule(**bad)


def _setup(seed=0, batch=2):
    model = make_tiny_model()
    sampler = StreamingSampler(model, seed=seed)
    cross = model.encode_text(torch.randn(batch, 6, model.cfg.text_dim, generator=torch.Generator().manual_seed(1)))
    return model, sampler, cross


def test_same_seeds_same_video_and_samples_independent_of_batch():
    _, sampler, cross = _setup()
    a = sampler.generate(cross, num_chunks=3, latent_hw=HW, samples=[5, 9])
    b = sampler.generate(cross, num_chunks=3, latent_hw=HW, samples=[5, 9])
    assert torch.equal(a, b)
    # sample 9 alone (same prompt row) gives the same video as in the batch
    solo = sampler.generate(cross.select(torch.tensor([1])), num_chunks=3, latent_hw=HW, samples=[9])
    torch.testing.assert_close(solo, a[1:2], rtol=1e-5, atol=1e-5)
    other = StreamingSampler(sampler.model, seed=1).generate(cross, num_chunks=3, latent_hw=HW, samples=[5, 9])
    assert not torch.allclose(other, a)


def test_overriding_one_chunk_noise_keeps_earlier_chunks_bit_identical():
    _, sampler, cross = _setup()
    base = sampler.generate(cross, num_chunks=4, latent_hw=HW)
    p = 2
    z = torch.randn(2, *sampler.chunk_shape(HW))
    forked = sampler.generate(cross, num_chunks=4, latent_hw=HW, initial_noise={p: z})
    F = sampler.model.cfg.chunk_frames
    assert torch.equal(forked[:, : p * F], base[:, : p * F])
    assert not torch.allclose(forked[:, p * F : (p + 1) * F], base[:, p * F : (p + 1) * F])
    # passing the plan's own noise explicitly changes nothing
    own = sampler.initial_noise(torch.arange(2), p, HW)
    assert torch.equal(sampler.generate(cross, num_chunks=4, latent_hw=HW, initial_noise={p: own}), base)


def test_stream_yields_chunks_in_order_and_records_trajectories():
    model, sampler, cross = _setup()
    seen = list(sampler.stream(cross, num_chunks=3, latent_hw=HW, record=True))
    assert [c for c, *_ in seen] == [0, 1, 2]
    for _, x0, traj in seen:
        assert len(traj.inputs) == len(traj.x0) == 4
        assert torch.equal(traj.output, x0)
        assert x0.shape == (2, 3, 16, *HW)
    # step 0's input is the plan's initial noise; step k+1's input is the re-noised x0 of step k
    traj = seen[1][2]
    assert torch.equal(traj.inputs[0], sampler.initial_noise(torch.arange(2), 1, HW))
    sig = FewStepSchedule().sigmas()
    xi = traj.inputs[1] - (1 - sig[1]) * traj.x0[0]
    assert abs(float(xi.std()) / sig[1] - 1.0) < 0.15  # what remains is sigma_1 * N(0, 1) noise


def test_resuming_from_a_cache_continues_the_same_video():
    model, sampler, cross = _setup()
    full = sampler.generate(cross, num_chunks=3, latent_hw=HW)
    cache = sampler.new_cache(2, 3, HW)
    first = list(sampler.stream(cross, num_chunks=1, latent_hw=HW, cache=None))
    # build the cache of chunk 0 by hand, then continue from chunk 1
    sampler.commit_chunk(first[0][1], cross, cache)
    rest = sampler.generate(cross, num_chunks=3, latent_hw=HW, cache=cache, start_chunk=1)
    torch.testing.assert_close(rest, full[:, 3:], rtol=0, atol=0)


def test_bad_inputs(tiny_model):
    sampler = StreamingSampler(tiny_model)
    cross = tiny_model.encode_text(torch.randn(1, 3, tiny_model.cfg.text_dim))
    with pytest.raises(ValueError, match="must have shape"):
        sampler.generate(cross, num_chunks=2, latent_hw=HW, initial_noise={1: torch.randn(1, 3, 16, 2, 2)})
    bad = torch.randn(1, 3, 16, *HW)
    bad[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite|NaN"):
        sampler.generate(cross, num_chunks=2, latent_hw=HW, initial_noise={1: bad})
    with pytest.raises(ValueError, match="outside"):
        sampler.generate(cross, num_chunks=2, latent_hw=HW, initial_noise={5: bad})
    small = sampler.new_cache(1, 2, HW)
    with pytest.raises(ValueError, match="KV cache full"):
        sampler.generate(cross, num_chunks=4, latent_hw=HW, cache=small)
    with pytest.raises(ValueError, match="samples"):
        sampler.generate(cross, num_chunks=2, latent_hw=HW, samples=[0, 1])
    with pytest.raises(ValueError, match="local_attn_frames"):
        StreamingSampler(tiny_model, local_attn_frames=3)
