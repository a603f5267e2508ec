"""The policy update on the pivot chunk: recompute the anchors' x0 with gradients against the detached
prefix cache, then the clipped contrastive loss. Used by on-policy and semi-on-policy training alike."""

from __future__ import annotations

import torch

from .. import ops
from ..model.kv_cache import CrossKV, KVCache
from ..sampler import StreamingSampler
from .loss import clipped_contrastive_loss
from .rollout import GroupSample


def sample_anchors(group_size: int, num_anchors: int, generator: torch.Generator) -> torch.Tensor:
    """Symmetric anchor sampling: B distinct branches drawn uniformly (each branch can be an anchor because
    neighbours are nearly equidistant). Returns a sorted CPU LongTensor [B]."""
    if not 1 <= num_anchors <= group_size:
        raise ValueError(f"num_anchors must be in [1, group_size={group_size}], got {num_anchors}")
    return torch.randperm(group_size, generator=generator)[:num_anchors].sort().values


def anchor_predictions(
    model: torch.nn.Module,
    sampler: StreamingSampler,
    sample: GroupSample,
    cross1: CrossKV,
    prefix_cache: KVCache,
    anchors: torch.Tensor,
    steps: list[int],
) -> torch.Tensor:
    """x0_theta [A, K, F, C, H, W] = x - sigma_k * F_theta(x_{p,k}^a, t_k, prefix cache) for anchors a and
    steps k, as ONE batch of A*K rows that all read the group's single prefix row (cache indirection: no
    copies of the prefix). `model` may be a DDP/FSDP wrapper of sampler.model."""
    dev = sampler.model.device
    A, K = anchors.shape[0], len(steps)
    steps_t = torch.tensor(steps, device=dev)
    x = sample.inputs[anchors.to(sample.inputs.device)][:, steps_t.to(sample.inputs.device)].to(dev)
    x = x.flatten(0, 1)  # [A*K, F, C, H, W]
    sigmas, timesteps, _ = sampler.tables(dev)
    t = timesteps[steps_t].repeat(A)
    sig = sigmas[steps_t].repeat(A).view(-1, 1, 1, 1, 1)
    rows = torch.zeros(A * K, dtype=torch.int64, device=dev)
    flow = model(x, t, cross1.select(rows), prefix_cache.view(rows))
    return (x - sig * flow).view(A, K, *x.shape[1:])


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
    """The clipped contrastive loss of one group (mean over anchors, steps and candidates)."""
    dev = sampler.model.device
    x0_theta = anchor_predictions(model, sampler, sample, cross1, prefix_cache, anchors, steps)
    x0_old = sample.x0_old.to(dev)
    tau = sample.tau.to(dev)
    logp_theta = torch.stack(
        [ops.neighbour_logprobs(x0_theta[:, j], x0_old[:, k], tau[k])[1] for j, k in enumerate(steps)], dim=1
    )  # [A, K, G]
    a = anchors.to(dev)
    logp_old = sample.logp_old.to(dev)[steps][:, a].transpose(0, 1)  # [A, K, G]
    return clipped_contrastive_loss(logp_theta, logp_old, advantages.to(dev), clip_eps)
