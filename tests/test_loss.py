"""AR-CoPO loss: hand-worked gradient directions, clipping, advantages."""

from __future__ import annotations

import pytest
import torch

from arcopo_fast import ops
from arcopo_fast.rl.loss import clipped_contrastive_loss, group_advantages


def test_group_advantages():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0])
    a = group_advantages(r)
    assert abs(float(a.mean())) < 1e-6 and abs(float(a.std(unbiased=False)) - 1) < 1e-5
    z = (r - 3.0) / r.std(unbiased=False)
    q = 0.8
    expect = z / z.abs().pow(q).sum().pow(1 / q)
    torch.testing.assert_close(group_advantages(r, quasi_norm_q=q), expect, rtol=1e-5, atol=1e-6)
    assert torch.equal(group_advantages(torch.ones(5)), torch.zeros(5))  # no signal when rewards tie
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.ones(1))


def test_at_ratio_one_the_anchor_moves_toward_positive_and_away_from_negative_candidates():
    torch.manual_seed(0)
    G, N = 4, 500
    cands = torch.randn(G, N)
    anchor = (cands[2] + 0.3 * torch.randn(N)).requires_grad_(True)  # a neutral-ish anchor
    adv = torch.tensor([1.0, -1.0, 0.0, 0.0])
    tau = 0.5
    d0, logp = ops.neighbour_logprobs(anchor[None], cands, tau)
    loss, stats = clipped_contrastive_loss(logp[:, None], logp.detach()[:, None], adv, clip_eps=1e-4)
    assert float(stats["ratio_mean"]) == pytest.approx(1.0) and float(stats["clip_frac"]) == 0.0
    loss.backward()
    with torch.no_grad():
        moved = anchor - 0.5 * anchor.grad / anchor.grad.norm() * 0.1
        d1, _ = ops.neighbour_logprobs(moved[None], cands, tau)
    assert d1[0, 0] < d0[0, 0]  # toward the positive-advantage candidate
    assert d1[0, 1] > d0[0, 1]  # away from the negative one
    # the gradient w.r.t. the distances is -A_i / (A K G tau) when sum A = 0 (hand-derived)
    d = d0.detach().clone().requires_grad_(True)
    logp = torch.log_softmax(-d / tau, dim=-1)
    loss, _ = clipped_contrastive_loss(logp[:, None], logp.detach()[:, None], adv, 1e-4)
    (g,) = torch.autograd.grad(loss, d)
    torch.testing.assert_close(g[0], adv / (G * tau), rtol=1e-5, atol=1e-7)


def test_gradient_vanishes_outside_the_clip_range_in_the_advantage_direction():
    eps = 1e-4
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    logp_old = torch.log_softmax(torch.randn(1, 1, 4), -1)
    # candidate 0: rho > 1+eps with A > 0 (clipped); 1: inside the range; 2: rho < 1-eps with A < 0 (clipped);
    # 3: rho > 1+eps with A < 0 (NOT clipped: min() keeps the unclipped, worse term)
    delta = torch.tensor([5 * eps, 0.2 * eps, -5 * eps, 5 * eps])
    logp_theta = (logp_old + delta).requires_grad_(True)
    loss, stats = clipped_contrastive_loss(logp_theta, logp_old, adv, eps)
    (g,) = torch.autograd.grad(loss, logp_theta)
    g = g[0, 0]
    assert g[0] == 0 and g[2] == 0
    assert g[1] != 0 and g[3] != 0
    assert float(stats["clip_frac"]) == pytest.approx(0.5)


def test_loss_shape_errors():
    with pytest.raises(ValueError, match="A, K, G"):
        clipped_contrastive_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), 1e-4)
    with pytest.raises(ValueError, match="advantages"):
        clipped_contrastive_loss(torch.zeros(1, 1, 3), torch.zeros(1, 1, 3), torch.zeros(4), 1e-4)
