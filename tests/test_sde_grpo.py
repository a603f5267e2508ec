"""SDE-GRPO, the Flow-GRPO / DanceGRPO-style baseline: the Gaussian transition log-likelihood by hand, where
its exploration noise enters, ratio 1 on-policy, the gradient's sign, and the trainer's algorithm switch."""

from __future__ import annotations

import json
import math

import pytest
import torch
from model_helpers import make_tiny_model

from arcopo_fast.config import load_config
from arcopo_fast.noise import NoiseKind
from arcopo_fast.rl.loss import clipped_surrogate
from arcopo_fast.rl.rollout import RolloutEngine
from arcopo_fast.rl.sde_grpo import SdeRolloutEngine, group_loss, transition_loss, transition_steps
from arcopo_fast.rl.update import sample_anchors
from arcopo_fast.sampler import StreamingSampler

HW = (4, 4)
L, G, T = 3, 4, 4


def _engines(seed=7):
    model = make_tiny_model()
    sampler = StreamingSampler(model, seed=seed)
    kw = dict(num_chunks=L, latent_hw=HW, group_size=G, perturb_scale=0.5, micro_batch=G)
    cross1 = model.encode_text(torch.randn(1, 5, model.cfg.text_dim, generator=torch.Generator().manual_seed(3)))
    return SdeRolloutEngine(sampler, **kw), RolloutEngine(sampler, **kw), cross1


def gaussian_logprob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The transition log-likelihood of the module docstring, as a reference: log N(x; mean, std^2 I)
    averaged over elements; x, mean [N, K, ...], std [K] -> [N, K]."""
    s = std.view(1, -1, *([1] * (x.ndim - 2)))
    per_element = -(x - mean).square() / (2 * s * s) - torch.log(s) - 0.5 * math.log(2 * math.pi)
    return per_element.flatten(2).mean(-1)


def test_gaussian_logprob_by_hand():
    x = torch.tensor([[[0.5, -1.0]], [[2.0, 0.0]]])  # [N=2, K=1, D=2]
    mean = torch.tensor([[[0.0, 0.0]], [[1.0, 1.0]]])
    std = torch.tensor([0.5])
    c = -math.log(0.5) - 0.5 * math.log(2 * math.pi)
    # row 0: residuals 0.5, -1.0 -> squares / (2 * 0.25) = 0.5, 2.0; row 1: residuals 1, -1 -> 2, 2
    expect = torch.tensor([[c - (0.5 + 2.0) / 2], [c - (2.0 + 2.0) / 2]])
    torch.testing.assert_close(gaussian_logprob(x, mean, std), expect)
    ref = torch.distributions.Normal(mean, 0.5).log_prob(x).mean(-1)
    torch.testing.assert_close(gaussian_logprob(x, mean, std), ref)


def test_the_log_ratio_is_the_difference_of_the_two_transition_log_likelihoods():
    g = torch.Generator().manual_seed(0)
    A, K, D = 3, 2, 50
    x0_old, x_next = torch.randn(A, K, D, generator=g), torch.randn(A, K, D, generator=g)
    x0_theta = x0_old + 0.01 * torch.randn(A, K, D, generator=g)
    sig = torch.tensor([0.9, 0.6])
    s = sig.view(1, K, 1)
    lp_theta = gaussian_logprob(x_next, (1 - s) * x0_theta, sig)
    lp_old = gaussian_logprob(x_next, (1 - s) * x0_old, sig)
    adv = torch.tensor([1.0, -0.5, 0.25])
    _, stats = transition_loss(x0_theta, x0_old, x_next, sig, adv, clip_eps=math.inf)
    torch.testing.assert_close(stats["ratio_mean"], (lp_theta - lp_old).exp().mean(), rtol=1e-5, atol=1e-6)
    # KL of two equal-variance Gaussians, per element
    kl = ((1 - s) * (x0_old - x0_theta)).square() / (2 * s * s)
    torch.testing.assert_close(stats["kl"], kl.mean(), rtol=1e-5, atol=1e-8)


def test_sde_rollout_shares_the_initial_noise_and_draws_its_own_solver_noise_per_branch():
    sde, arcopo, cross1 = _engines()
    pivot = 1
    s = sde.rollout(cross1, group=2, pivot=pivot)
    a = arcopo.rollout(cross1, group=2, pivot=pivot)
    F = sde.model.cfg.chunk_frames
    # the same prefix, the same (unperturbed) initial noise of chunk p in every branch
    torch.testing.assert_close(s.prefix_latents, a.prefix_latents)
    e_star = sde.sampler.initial_noise(torch.tensor([2]), pivot, HW)
    assert torch.equal(s.inputs[:, 0], e_star.expand(G, -1, -1, -1, -1))
    assert not torch.allclose(a.inputs[:, 0], e_star.expand(G, -1, -1, -1, -1))  # AR-CoPO perturbs it
    # every recorded transition is x_{k+1} = (1 - s_{k+1}) x0_old_k + s_{k+1} xi, xi = the branch's own noise
    sig = sde.sampler.schedule.sigmas()
    for k in range(T - 1):
        xi = (s.inputs[:, k + 1] - (1 - sig[k + 1]) * s.x0_old[:, k]) / sig[k + 1]
        key = sde.sampler.noise.key(torch.full((G,), 2), pivot, k + 1, NoiseKind.SOLVER, torch.arange(G) + 1)
        torch.testing.assert_close(xi, sde.sampler.noise.normal(sde.sampler.chunk_shape(HW), key), rtol=1e-4, atol=1e-4)
        assert (xi[1:] - xi[:1]).abs().amax() > 0.5  # independent per branch
    # the branches' videos differ only from chunk p on
    lat = s.latents
    assert torch.equal(lat[:, : pivot * F], lat[:1, : pivot * F].expand(G, -1, -1, -1, -1))
    assert (lat[1:, pivot * F :] - lat[:1, pivot * F :]).abs().amax() > 0


def test_sde_rollout_does_not_depend_on_micro_batching_or_fork_mode():
    sde, _, cross1 = _engines()
    ref = sde.rollout(cross1, group=4, pivot=1)
    other = SdeRolloutEngine(sde.sampler, num_chunks=L, latent_hw=HW, group_size=G, perturb_scale=0.5, micro_batch=3, fork="zero_copy")
    got = other.rollout(cross1, group=4, pivot=1)
    for name in ("latents", "inputs", "x0_old"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=1e-5, atol=1e-5, msg=name)


def test_on_policy_ratio_is_one_and_the_last_step_is_not_a_transition():
    sde, _, cross1 = _engines()
    s = sde.rollout(cross1, group=5, pivot=2)
    anchors = sample_anchors(G, 3, torch.Generator().manual_seed(0))
    loss, stats = group_loss(sde.model, sde.sampler, s, cross1, s.prefix_cache, anchors, list(range(T)), torch.randn(G), 1e-4)
    assert float(stats["ratio_max_dev"]) < 1e-5 and float(stats["clip_frac"]) == 0.0 and float(stats["kl"]) < 1e-10
    assert torch.isfinite(loss)
    assert transition_steps([0, 1, 2, 3], 4) == [0, 1, 2]
    with pytest.raises(ValueError, match="transitions"):
        transition_steps([3], 4)


def test_gradient_moves_the_mean_toward_positive_and_away_from_negative_samples():
    g = torch.Generator().manual_seed(1)
    A, K, D = 2, 1, 64
    x0_old = torch.randn(A, K, D, generator=g)
    sig = torch.tensor([0.8])
    x_next = 0.2 * x0_old + 0.8 * torch.randn(A, K, D, generator=g)
    adv = torch.tensor([1.0, -1.0])
    x0_theta = x0_old.clone().requires_grad_(True)
    loss, stats = transition_loss(x0_theta, x0_old, x_next, sig, adv, clip_eps=1e-4)
    assert float(stats["ratio_max_dev"]) == 0.0
    (grad,) = torch.autograd.grad(loss, x0_theta)
    # by hand at rho = 1: dloss/dx0 = -A_a (1 - s) (x_next - mu_old) / (s^2 D) / (A K)
    mu_old = 0.2 * x0_old
    torch.testing.assert_close(grad, -adv.view(A, 1, 1) * 0.2 * (x_next - mu_old) / (0.64 * D) / (A * K))
    stepped = x0_old - 10.0 * grad
    dist = lambda x0: (x_next - 0.2 * x0).norm(dim=-1).squeeze(-1)
    before, after = dist(x0_old), dist(stepped)
    assert after[0] < before[0]  # toward the sample with positive advantage
    assert after[1] > before[1]  # away from the negative one


def test_clip_eps_inf_removes_clipping_and_needs_the_explicit_flag():
    log_ratio = torch.tensor([0.01, -0.01]).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0])
    _, clipped = clipped_surrogate(log_ratio, adv, 1e-4)
    loss, free = clipped_surrogate(log_ratio, adv, math.inf)
    assert float(clipped["clip_frac"]) == 1.0 and float(free["clip_frac"]) == 0.0
    (g,) = torch.autograd.grad(loss, log_ratio)
    assert (g != 0).all()  # the unclipped objective keeps pushing the ratio
    with pytest.raises(ValueError, match="allow_unclipped"):
        load_config("tiny", None, ["algo.clip_eps=.inf"])
    assert math.isinf(load_config("tiny", None, ["algo.clip_eps=.inf", "algo.allow_unclipped=true"]).algo.clip_eps)
    with pytest.raises(ValueError, match="run.algorithm"):
        load_config("tiny", None, ["run.algorithm=ppo"])
    with pytest.raises(ValueError, match="transitions"):
        load_config("tiny", None, ["run.algorithm=sde-grpo", "algo.steps=[3]"])


@pytest.mark.slow
def test_trainer_runs_sde_grpo_through_the_shared_loop(tmp_path):
    from test_train import metrics, tiny

    from arcopo_fast.trainer import Trainer

    cfg = load_config("tiny", None, tiny(tmp_path / "sde", "run.algorithm=sde-grpo", "run.iterations=1", "optim.lr=0.05"))
    t = Trainer(cfg)
    assert isinstance(t.engine, SdeRolloutEngine) and t.group_loss is group_loss
    assert t._buffer_settings()["algorithm"] == "sde-grpo"  # an AR-CoPO buffer is refused, and vice versa
    before = {n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}
    t.run()
    rows = metrics(tmp_path / "sde")
    assert len(rows) == 1
    assert all(r["update/ratio_max_dev/epoch0"] < 1e-4 and r["update/clip_frac/epoch0"] == 0 for r in rows)
    assert rows[-1]["update/ratio_max_dev/epoch1"] > 0  # the first step moved the policy
    assert any(not torch.equal(before[n], p) for n, p in t.model.named_parameters() if p.requires_grad)
    assert json.loads(json.dumps(rows[-1]["reward/group_std"])) >= 0
