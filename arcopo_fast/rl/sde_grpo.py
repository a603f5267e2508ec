"""SDE-GRPO: the comparison baseline in the style of Flow-GRPO / DanceGRPO, on the same few-step sampler.

The paper's argument for forking the initial noise is that SDE-style exploration (noise injected into the
solver, Gaussian transition likelihoods, a clipped PPO ratio on them) sees almost no reward spread in a
few-step AR model. This module is that baseline, as a second algorithm of the same trainer
(`run.algorithm: sde-grpo`): prompts, pivot, shared prefix, fork, chunks > p, rewards, advantages, anchor
draws, the replay buffer and the optimizer step are AR-CoPO's (trainer.py); only two things differ.

Exploration (SdeRolloutEngine.pivot_chunk). Every branch starts chunk p from the SAME initial noise e*_p;
at each re-noising of chunk p, branch i draws its OWN solver noise (NoiseKind.SOLVER keyed by branch id
i + 1; id 0 is the solver noise shared by inference and AR-CoPO). Everything else is shared, as in AR-CoPO,
so any reward difference inside a group comes from chunk p's solver noise alone.

Transition kernel (the project's choice: the consistency step itself, as RAVEN's CM-GRPO does, rather than
a Flow-GRPO SDE with a separate noise-level hyper-parameter). With sigmas s_k of the few-step schedule:

    x_{k+1} ~ N(mu_theta, s_{k+1}^2 I),   mu_theta = (1 - s_{k+1}) x0_theta(x_k, t_k),   k = 0 .. T-2

The sampler's re-noising x_{k+1} = (1 - s_{k+1}) x0 + s_{k+1} xi IS a draw from this kernel, so the rollout is
the inference sampler and the recorded (x_k, x0_old) give the old log-likelihood exactly. The last step
(output = x0_theta(x_{T-1})) is deterministic and carries no likelihood: algo.steps = T-1 is ignored here.

Log-likelihood, averaged over the D elements of the chunk (Flow-GRPO also averages over dimensions; it keeps
the log-ratio and clip_eps independent of the video size):

    log p(x_{k+1} | x_k) = -(1/D) sum_e (x_{k+1,e} - mu_e)^2 / (2 s^2) - log s - log(2 pi) / 2
    log rho = log p_theta - log p_old = (1/D) sum_e (mu_theta - mu_old)_e (2 x_{k+1} - mu_theta - mu_old)_e / (2 s^2)

(the second form is the same number without the cancellation of two nearly equal log-likelihoods).
Loss, per group: -mean over trained branches a and transitions k of min(rho A_a, clip(rho, 1-eps, 1+eps) A_a)
(rl/loss.clipped_surrogate, AR-CoPO's clipping). The logged KL is exact for two Gaussians of equal variance:
KL(old || theta) = (1/D) sum_e (mu_old - mu_theta)_e^2 / (2 s^2).

Budget: the trained branches of an update are the group's `num_anchors` anchor draws (sample_anchors), so an
update costs the same DiT forwards as AR-CoPO's at the same steps (fewer: the last step has no transition);
the rollout costs exactly the same.
"""

from __future__ import annotations

import torch

from ..model.kv_cache import CrossKV, KVCache
from ..sampler import ChunkTrajectory, StreamingSampler
from .loss import clipped_surrogate
from .rollout import GroupSample, RolloutEngine
from .update import anchor_predictions


class SdeRolloutEngine(RolloutEngine):
    """The forked group rollout with SDE exploration: shared initial noise, per-branch solver noise in
    chunk p. `perturb_scale` is unused (the initial noise is not perturbed)."""

    def pivot_chunk(
        self, group: int, pivot: int, branches: torch.Tensor, samples: torch.Tensor, cross: CrossKV, cache: KVCache
    ) -> ChunkTrajectory:
        x = self.sampler.initial_noise(samples, pivot, self.latent_hw)
        own = (branches + 1).to(samples.device)  # id 0 is the shared solver noise
        return self.sampler.denoise_chunk(x, pivot, samples, cross, cache, record=True, solver_branches=own)


def transition_steps(steps: list[int], num_steps: int) -> list[int]:
    """The steps of `steps` that end in a stochastic transition (all but the last of the T steps)."""
    ks = [k for k in steps if 0 <= k < num_steps - 1]
    if not ks:
        raise ValueError(f"SDE-GRPO trains the transitions k -> k+1 (k < {num_steps - 1}); steps {steps} hold none")
    return ks


def transition_loss(
    x0_theta: torch.Tensor,
    x0_old: torch.Tensor,
    x_next: torch.Tensor,
    sigma_next: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped SDE-GRPO loss from predictions. x0_theta (with gradients), x0_old, x_next: [A, K, ...] for
    A trained branches and K transitions (x_next = the recorded x_{k+1}); sigma_next [K] = s_{k+1};
    advantages [A]. Returns (loss, detached stats)."""
    if not (x0_theta.shape == x0_old.shape == x_next.shape) or x0_theta.ndim < 3:
        raise ValueError(f"x0_theta, x0_old, x_next must share one shape [A, K, ...], got {tuple(x0_theta.shape)}, "
                         f"{tuple(x0_old.shape)}, {tuple(x_next.shape)}")
    A, K = x0_theta.shape[:2]
    if sigma_next.shape != (K,) or advantages.shape != (A,):
        raise ValueError(f"need sigma_next [K={K}] and advantages [A={A}], got {tuple(sigma_next.shape)}, {tuple(advantages.shape)}")
    s = sigma_next.view(1, K, *([1] * (x0_theta.ndim - 2)))
    mu_theta = (1 - s) * x0_theta
    mu_old = ((1 - s) * x0_old).detach()
    log_ratio = ((mu_theta - mu_old) * (2 * x_next - mu_theta - mu_old) / (2 * s * s)).flatten(2).mean(-1)  # [A, K]
    loss, stats = clipped_surrogate(log_ratio, advantages[:, None], clip_eps)
    with torch.no_grad():
        stats["kl"] = ((mu_old - mu_theta.detach()).square() / (2 * s * s)).flatten(2).mean(-1).mean()
    return loss, stats


def group_loss(
    model: torch.nn.Module,
    sampler: StreamingSampler,
    sample: GroupSample,
    cross1: CrossKV,
    prefix_cache: KVCache,
    anchors: torch.Tensor,
    steps: list[int],
    advantages: torch.Tensor,
    clip_eps: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SDE-GRPO's loss of one group: same signature as rl.update.group_loss (the trainer dispatches on
    run.algorithm). The anchors are the trained branches; their transitions at `steps` (minus the last
    step) are recomputed with gradients against the detached prefix cache."""
    dev = sampler.model.device
    ks = transition_steps(steps, sampler.schedule.num_steps)
    x0_theta = anchor_predictions(model, sampler, sample, cross1, prefix_cache, anchors, ks)
    a = anchors.to(sample.inputs.device)
    k_now, k_next = torch.tensor(ks), torch.tensor(ks) + 1
    x0_old = sample.x0_old[a][:, k_now].to(dev)
    x_next = sample.inputs[a][:, k_next].to(dev)
    sigmas, _, _ = sampler.tables(dev)
    return transition_loss(x0_theta, x0_old, x_next, sigmas[k_next.to(dev)], advantages.to(dev)[anchors.to(dev)], clip_eps)
