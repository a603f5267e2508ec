"""AR-CoPO's objective: group advantages and the clipped contrastive (neighbour) GRPO loss.

pi_theta(i | a) = softmax_i(-d(x0_old_i, x0_theta_a) / tau), pi_old(i | a) likewise with x0_old_a as the
anchor (AR-CoPO Eq. 4). With rho = pi_theta / pi_old and group-normalised advantages A_i:

    J = mean over anchors a, steps k, candidates i of min(rho A_i, clip(rho, 1 - eps, 1 + eps) A_i)

and the loss is -J (no KL term). At rho = 1 the gradient pulls each anchor's prediction toward the
candidates with positive advantage and away from the negative ones; where rho has left the clip range in
the direction of A_i the term is constant and contributes no gradient.
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, *, eps: float = 1e-6, quasi_norm_q: float | None = None) -> torch.Tensor:
    """A_i = (r_i - mean r) / (std r + eps) within the group (population std). With quasi_norm_q (Neighbor
    GRPO, q = 0.8): A'_i = A_i / (sum_k |A_k|^q)^(1/q). rewards: [G] -> [G] float32."""
    r = rewards.float()
    if r.ndim != 1 or r.shape[0] < 2:
        raise ValueError(f"rewards must be [G] with G >= 2, got shape {tuple(r.shape)}")
    adv = (r - r.mean()) / (r.std(unbiased=False) + eps)
    if quasi_norm_q is not None:
        if not 0 < quasi_norm_q:
            raise ValueError(f"quasi_norm_q must be positive, got {quasi_norm_q}")
        norm = adv.abs().pow(quasi_norm_q).sum().pow(1.0 / quasi_norm_q)
        adv = adv / norm.clamp_min(eps)
    return adv


def clipped_contrastive_loss(
    logp_theta: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, clip_eps: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """logp_theta, logp_old: [A, K, G] (anchor, step, candidate) log-probabilities; advantages: [G].
    Returns (loss = -J, stats) where stats are detached device scalars (no host sync here)."""
    if logp_theta.shape != logp_old.shape or logp_theta.ndim != 3:
        raise ValueError(f"logp_theta and logp_old must both be [A, K, G], got {tuple(logp_theta.shape)}, {tuple(logp_old.shape)}")
    if advantages.shape != logp_theta.shape[-1:]:
        raise ValueError(f"advantages must be [G={logp_theta.shape[-1]}], got {tuple(advantages.shape)}")
    log_ratio = logp_theta - logp_old.detach()
    loss, stats = clipped_surrogate(log_ratio, advantages[None, None, :], clip_eps)
    with torch.no_grad():
        # exact KL(pi_old || pi_theta) over the G candidates, averaged over anchors and steps
        stats["kl"] = (logp_old.detach().exp() * -log_ratio.detach()).sum(-1).mean()
    return loss, stats


def clipped_surrogate(
    log_ratio: torch.Tensor, advantages: torch.Tensor, clip_eps: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The PPO/GRPO clipped surrogate shared by AR-CoPO and SDE-GRPO (rl/sde_grpo.py): loss = -mean of
    min(rho A, clip(rho, 1 - eps, 1 + eps) A) with rho = exp(log_ratio); `advantages` broadcasts against
    log_ratio. clip_eps = inf disables clipping (the objective is rho A: only the reproduction's ablation
    uses it, see config.AlgoSection.allow_unclipped). Stats are detached device scalars."""
    ratio = log_ratio.exp()
    adv = advantages.detach()
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv
    objective = torch.minimum(unclipped, clipped)
    loss = -objective.mean()
    with torch.no_grad():
        stats = {
            "ratio_mean": ratio.detach().mean(),
            "ratio_max_dev": (ratio.detach() - 1).abs().max(),
            # the clipped branch is the active one (the term carries no gradient)
            "clip_frac": (clipped < unclipped).float().mean(),
            "objective": objective.detach().mean(),
        }
    return loss, stats
