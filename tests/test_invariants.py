"""The algorithm's invariants (algorithm.md), each checked directly so that breaking it fails a fast test:
the prefix is generated once per group and forked; the pivot chunk's initial noise is exactly
sqrt(1 - s^2) e* + s d from the noise plan; the update reads a constant prefix cache; tau0 "auto" is the
median distance; the trainer's update raises the expected advantage; pivots are uniform and B anchors are
used; a bfloat16 replay buffer gives ratio 1 at the reference weights."""

from __future__ import annotations

import copy
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from model_helpers import make_tiny_model

from arcopo_fast import ops
from arcopo_fast.config import load_config
from arcopo_fast.noise import NoiseKind
from arcopo_fast.rl.loss import group_advantages
from arcopo_fast.rl.rollout import RolloutEngine, neighbour_table
from arcopo_fast.rl.update import anchor_predictions, group_loss, sample_anchors
from arcopo_fast.sampler import StreamingSampler
from arcopo_fast.trainer import RewardWorker, Trainer, derive_seed

HW = (4, 4)


def _engine(L=4, G=6, m=3, s=0.5, fork="copy"):
    model = make_tiny_model()
    sampler = StreamingSampler(model, seed=11)
    eng = RolloutEngine(sampler, num_chunks=L, latent_hw=HW, group_size=G, perturb_scale=s, micro_batch=m, fork=fork)
    cross1 = model.encode_text(torch.randn(1, 5, model.cfg.text_dim, generator=torch.Generator().manual_seed(3)))
    return eng, cross1


@pytest.mark.parametrize("fork", ["copy", "zero_copy"])
def test_the_prefix_is_generated_once_per_group_with_batch_one(fork):
    L, G, m, pivot = 4, 6, 3, 2
    eng, cross1 = _engine(L, G, m, fork=fork)
    T = eng.sampler.schedule.num_steps
    batches = []
    hook = eng.model.register_forward_pre_hook(lambda mod, args: batches.append(args[0].shape[0]))
    try:
        eng.rollout(cross1, group=3, pivot=pivot)
    finally:
        hook.remove()
    # prefix: T denoising forwards + 1 commit per chunk, batch 1, once for the whole group
    assert batches[: pivot * (T + 1)] == [1] * (pivot * (T + 1))
    # then each micro-batch of branches: chunk p (T forwards), and commit + T for every later chunk
    per_micro_batch = T + (L - 1 - pivot) * (T + 1)
    assert batches[pivot * (T + 1):] == [m] * (math.ceil(G / m) * per_micro_batch)


def test_the_pivot_noise_is_exactly_the_noise_plan_formula():
    L, G, s, group, pivot = 3, 5, 0.6, 9, 1
    eng, cross1 = _engine(L, G, G, s=s)
    plan = eng.sampler.noise
    shape = eng.sampler.chunk_shape(HW)
    base = plan.normal(shape, plan.key([group], pivot, 0, NoiseKind.INITIAL))
    d = plan.normal(shape, plan.key([group] * G, pivot, 0, NoiseKind.PERTURB, list(range(G))))
    expected = math.sqrt(1 - s * s) * base + s * d
    assert torch.equal(eng.perturbed_noise(group, pivot, torch.arange(G)), expected)
    sample = eng.rollout(cross1, group=group, pivot=pivot)
    assert torch.equal(sample.inputs[:, 0], expected)  # the rollout starts chunk p from exactly that


def test_tau_auto_is_the_median_off_diagonal_distance():
    g = torch.Generator().manual_seed(0)
    G, T = 6, 3
    x0 = torch.randn(G, T, 3, 4, 2, 2, generator=g)
    x0[-1] *= 8  # one far branch: the mean distance moves, the median hardly
    taus, logp = neighbour_table(x0, "auto")
    x = x0.double().flatten(2)
    for k in range(T):
        d = ((x[None, :, k] - x[:, None, k]) ** 2).mean(-1)  # [anchor, candidate]
        off = d[~torch.eye(G, dtype=torch.bool)].sort().values
        median = off[(off.numel() - 1) // 2]
        assert taus[k].item() == pytest.approx(median.item(), rel=1e-5)
        assert abs(off.mean() - median) > 0.05 * median  # the data tell a mean from the median
        torch.testing.assert_close(logp[k].double(), torch.log_softmax(-d / median, dim=-1), rtol=1e-4, atol=1e-5)
    taus, _ = neighbour_table(x0, 0.25)
    assert torch.equal(taus, torch.full((T,), 0.25))
    # algo.tau_auto_scale: tau = scale x the median; the softmax is taken at that temperature
    auto, _ = neighbour_table(x0, "auto")
    scaled, logp = neighbour_table(x0, "auto", auto_scale=0.25)
    torch.testing.assert_close(scaled, 0.25 * auto)
    d = ((x[None] - x[:, None]) ** 2).mean(-1).permute(2, 0, 1)  # [T, anchor, candidate]
    torch.testing.assert_close(logp.double(), torch.log_softmax(-d / scaled.double()[:, None, None], dim=-1), rtol=1e-4, atol=1e-5)
    sharp, base = (lp.exp().diagonal(dim1=1, dim2=2) for lp in (logp, neighbour_table(x0, "auto")[1]))
    assert (sharp[:, :-1] > base[:, :-1]).all() and (sharp >= base).all()  # sharper (the far branch: 1 in both)
    taus, _ = neighbour_table(x0, 0.25, auto_scale=4.0)  # a numeric tau is taken as given
    assert torch.equal(taus, torch.full((T,), 0.25))


def test_anchors_are_b_distinct_branches_drawn_uniformly():
    G, B = 6, 2
    counts = Counter()
    for seed in range(600):
        a = sample_anchors(G, B, torch.Generator().manual_seed(seed))
        assert a.shape == (B,) and len(set(a.tolist())) == B
        counts.update(a.tolist())
    assert sorted(counts) == list(range(G))
    assert all(abs(c - 600 * B / G) < 0.15 * 600 * B / G for c in counts.values()), counts


# ---------------------------------------------------------------------------------------------------------
# Trainer level (one tiny trainer per fixture, iterations run by hand)
# ---------------------------------------------------------------------------------------------------------


def _overrides(out: Path, *extra: str) -> list[str]:
    return [
        "sampler.num_chunks=3", "sampler.latent_height=4", "sampler.latent_width=4", "algo.group_size=4",
        "algo.num_anchors=2", "run.micro_batch=4", "run.progress=false", "run.sample_videos=false",
        "adapter.rank=4", "adapter.alpha=8", "model.embed_cache_dir=null", "run.iterations=0",
        "reward.rewards=[{name: 'reward_helpers:MeanRed'}]", f"run.out_dir={out}", *extra,
    ]


@pytest.fixture(scope="module")
def trainer(tmp_path_factory) -> Trainer:
    t = Trainer(load_config("tiny", None, _overrides(tmp_path_factory.mktemp("inv") / "run", "algo.epochs=1", "optim.lr=1e-3",
                                                     "optim.grad_clip=0", "algo.pivot_min=1")))
    yield t
    t.close()


def _expected_advantage(t: Trainer, samples, crosses) -> float:
    """mean over anchors (all G) and steps of sum_i pi_theta(i | a) A_i: what the update must raise."""
    total = []
    with torch.no_grad():
        for s, cross in zip(samples, crosses):
            adv = group_advantages(s.rewards, eps=t.cfg.algo.adv_eps)
            x0 = anchor_predictions(t.train_model, t.sampler, s, cross, s.prefix_cache, torch.arange(s.group_size), t.steps)
            for j, k in enumerate(t.steps):
                logp = ops.neighbour_logprobs(x0[:, j], s.x0_old[:, k], s.tau[k])[1]
                total.append((logp.exp() * adv).sum(-1).mean())
    return float(torch.stack(total).mean())


def test_the_update_moves_the_policy_toward_high_advantage_branches(trainer):
    t = trainer
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a tiny random model: make the LoRA path live, so A's gradients are not zero
        for n, p in t.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1e-3, generator=gen)
    samples, crosses, _ = t.rollout_groups(0, RewardWorker())
    before = _expected_advantage(t, samples, crosses)
    batches = []
    hook = t.model.register_forward_pre_hook(lambda mod, args: batches.append(args[0].shape[0]))
    try:
        out = t.update(0, samples, crosses)
    finally:
        hook.remove()
    after = _expected_advantage(t, samples, crosses)
    assert out["update/ratio_max_dev/epoch0"] < 1e-4  # on-policy: the first update starts at ratio 1
    assert after > before + 1e-6, (before, after)
    # B anchors x K steps per group and forward, never all G branches
    assert batches == [t.cfg.algo.num_anchors * len(t.steps)] * (len(samples) * t.cfg.algo.epochs)


def test_the_trainer_draws_pivots_uniformly(trainer):
    t = trainer
    used = []

    class Stop(Exception):
        pass

    def rollout(cross, *, group, pivot, prompt="", **kw):
        used.append((group, pivot))
        raise Stop

    real, t.engine.rollout = t.engine.rollout, rollout
    try:
        for it in range(240):
            with pytest.raises(Stop):
                t.rollout_groups(it, None)
    finally:
        t.engine.rollout = real
    assert [g for g, _ in used] == list(range(240))
    counts = Counter(p for _, p in used)
    lo, hi = t.cfg.algo.pivot_min, t.cfg.sampler.num_chunks - 1
    assert sorted(counts) == list(range(lo, hi + 1)), counts
    n = hi - lo + 1
    assert all(abs(c - 240 / n) < 0.2 * 240 / n for c in counts.values()), counts


@pytest.fixture(scope="module")
def semi_bf16(tmp_path_factory) -> Trainer:
    root = tmp_path_factory.mktemp("semi")
    cfg = load_config("tiny", None, _overrides(root / "run", "run.mode=semi-on-policy", f"replay.buffer={root / 'buf'}",
                                               "replay.buffer_groups=2", "replay.store_dtype=bfloat16",
                                               "replay.groups_per_iteration=2", "algo.pivot_min=1"))
    t = Trainer(cfg)
    yield t
    t.close()


def test_a_bfloat16_buffer_gives_ratio_one_at_the_reference_weights(semi_bf16):
    t = semi_bf16
    samples, crosses, _ = t.replay_groups(0)
    assert all(s.x0_old.dtype == torch.float32 for s in samples)
    for s, cross in zip(samples, crosses):
        adv = group_advantages(s.rewards, eps=t.cfg.algo.adv_eps)
        anchors = torch.arange(s.group_size)
        with torch.no_grad():
            _, st = group_loss(t.train_model, t.sampler, s, cross, s.prefix_cache, anchors, t.steps, adv, t.cfg.algo.clip_eps)
        assert float(st["ratio_max_dev"]) < 1e-5 and float(st["clip_frac"]) == 0.0, st


def test_the_update_reads_a_constant_prefix_cache(trainer):
    """After the trainer's update, the prefix cache holds no gradient, and the update's gradients equal those
    computed against a cache rebuilt under no_grad (a cache built with gradients would carry them into the
    LoRA k/v of earlier chunks; the loss itself would not change)."""
    t = trainer
    it = 7
    samples, crosses, _ = t.rollout_groups(it, RewardWorker())
    s, cross = samples[0], crosses[0]
    assert s.pivot >= 1 and s.prefix_cache.length > 0
    weights = {n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}
    opt_state = copy.deepcopy(t.optimizer.state_dict())
    t.update(it, samples, crosses)  # epochs = 1, no clipping: its step's gradients stay in .grad
    got = {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}
    assert got and any(g.abs().max() > 0 for g in got.values())
    for x in s.prefix_cache.storage_tensors():
        assert not x.requires_grad and x.grad is None and x.grad_fn is None
    with torch.no_grad():
        for n, p in t.model.named_parameters():
            if n in weights:
                p.copy_(weights[n])
        detached = t.engine.rebuild_prefix_cache(cross, s.prefix_latents)
    t.optimizer.load_state_dict(opt_state)
    gen = torch.Generator().manual_seed(derive_seed(t.cfg.run.seed, "anchors", s.group, it, 0))
    anchors = sample_anchors(s.group_size, t.cfg.algo.num_anchors, gen)
    adv = group_advantages(s.rewards, eps=t.cfg.algo.adv_eps)
    t.optimizer.zero_grad(set_to_none=True)
    loss, _ = group_loss(t.train_model, t.sampler, s, cross, detached, anchors, t.steps, adv, t.cfg.algo.clip_eps)
    loss.backward()
    ref = {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}
    t.optimizer.zero_grad(set_to_none=True)
    assert got.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-8, msg=n)
