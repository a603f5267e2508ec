"""AR-CoPO's forked group rollout (algorithm.md, "One on-policy iteration").

For one prompt (a group) and a pivot chunk p:
  1. the prefix chunks 0..p-1 are generated ONCE (batch 1), filling a KV cache;
  2. the cache is forked into the branches: in place (one launch of the C++ op copies the parent row into
     the other rows of a micro-batch cache) or zero-copy (branch rows read the parent's prefix through the
     attention kernel's prefix segment and store only their own chunks);
  3. chunk p of branch i starts from e_i = sqrt(1 - s^2) e*_p + s d_i; every other noise (the solver noise
     of every step, the initial noise of chunks > p) is shared by all branches (controlled noise sharing);
     the inputs x_{p,k}^i and predictions x0hat_{p,k}^i of chunk p are recorded (no extra forward).
     `pivot_chunk` is the one place that says where a branch's exploration noise enters (rl/sde_grpo.py
     overrides it to use per-branch solver noise instead);
  4. the branches finish chunks p+1..L-1, micro-batched, and their clean latents are returned for decoding.
Chunks are 0-based in code (the paper's p = 1..L is p = 0..L-1 here).

The sampler is the inference sampler itself: this module only adds forking, recording and micro-batching.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .. import ops
from ..model.kv_cache import CrossKV, KVCache
from ..noise import NoiseKind
from ..profiling import nvtx_range
from ..sampler import ChunkTrajectory, StreamingSampler

FORK_MODES = ("copy", "zero_copy")


@dataclass
class GroupSample:
    """Everything the update needs from one group (a rollout, or a replay-buffer entry).

    inputs / x0_old: [G, T, F, C, H, W] float32, the branches' chunk-p inputs x_{p,k} and the behaviour
    policy's predictions x0hat_{p,k}; logp_old: [T, G, G] log pi_old(candidate | anchor) for every anchor;
    tau: [T] the temperature of each step; prefix_latents: [1, p*F, C, H, W] the clean prefix (to rebuild
    the prefix cache); rewards: [G] once scored."""

    group: int
    prompt: str
    pivot: int
    inputs: torch.Tensor
    x0_old: torch.Tensor
    logp_old: torch.Tensor
    tau: torch.Tensor
    prefix_latents: torch.Tensor
    rewards: torch.Tensor | None = None
    components: dict[str, torch.Tensor] = field(default_factory=dict)
    # rollout-only (not stored in the buffer)
    latents: torch.Tensor | None = None
    prefix_cache: KVCache | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def group_size(self) -> int:
        return self.inputs.shape[0]


def neighbour_table(x0: torch.Tensor, tau: str | float, anchors: torch.Tensor | None = None, *,
                    auto_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """For x0 [G, T, ...] (the rollout's predictions, the candidates): the temperature tau [T] and
    log pi_old [T, G, G] (row = anchor, column = candidate). The anchors' predictions default to x0 itself;
    the replay buffer passes the unrounded ones beside rounded candidates. tau "auto" = auto_scale x the
    median off-diagonal distance of the step (project choice; the paper gives no value), fixed at rollout
    time. Distances are element means, so tau does not depend on the video size."""
    G, T = x0.shape[:2]
    anchors = x0 if anchors is None else anchors
    if anchors.shape != x0.shape:
        raise ValueError(f"anchors must match x0's shape {tuple(x0.shape)}, got {tuple(anchors.shape)}")
    dists = torch.stack([ops.neighbour_logprobs(anchors[:, k], x0[:, k], 1.0)[0] for k in range(T)])  # [T, G, G]
    if tau == "auto":
        off = ~torch.eye(G, dtype=torch.bool, device=dists.device)
        taus = (auto_scale * dists[:, off].median(dim=1).values).clamp_min(1e-12)
    else:
        taus = torch.full((T,), float(tau), device=dists.device)
    return taus, torch.log_softmax(-dists / taus[:, None, None], dim=-1)


class RolloutEngine:
    def __init__(
        self,
        sampler: StreamingSampler,
        *,
        num_chunks: int,
        latent_hw: tuple[int, int],
        group_size: int,
        perturb_scale: float,
        micro_batch: int,
        fork: str = "copy",
        tau: str | float = "auto",
        tau_auto_scale: float = 1.0,
    ):
        if fork not in FORK_MODES:
            raise ValueError(f"fork must be one of {FORK_MODES}, got {fork!r}")
        if not 0 < perturb_scale < 1:
            raise ValueError(f"perturb_scale must be in (0, 1), got {perturb_scale}")
        if group_size < 2 or micro_batch < 1:
            raise ValueError(f"need group_size >= 2 and micro_batch >= 1, got {group_size}, {micro_batch}")
        if sampler.local_attn_frames is not None:
            raise ValueError("AR-CoPO rollouts use the full KV cache: build the sampler without local_attn_frames")
        self.sampler = sampler
        self.model = sampler.model
        self.num_chunks = num_chunks
        self.latent_hw = latent_hw
        self.group_size = group_size
        self.perturb_scale = perturb_scale
        self.micro_batch = min(micro_batch, group_size)
        self.fork = fork
        if not (isinstance(tau_auto_scale, (int, float)) and 0 < tau_auto_scale < float("inf")):
            raise ValueError(f"tau_auto_scale must be a finite number > 0, got {tau_auto_scale!r}")
        self.tau, self.tau_auto_scale = tau, tau_auto_scale
        self.chunk_tokens = self.model.cfg.chunk_frames * self.model.frame_tokens(*latent_hw)

    # -- pieces ---------------------------------------------------------------------------------------

    def perturbed_noise(self, group: int, pivot: int, branches: torch.Tensor) -> torch.Tensor:
        """e_i = sqrt(1 - s^2) e*_p + s d_i for the given branch ids: [n, F, C, H, W]."""
        s = self.perturb_scale
        noise = self.sampler.noise
        dev = self.model.device
        n = branches.shape[0]
        base = self.sampler.initial_noise(torch.full((1,), group, device=dev), pivot, self.latent_hw)
        key = noise.key(torch.full((n,), group, device=dev), pivot, 0, NoiseKind.PERTURB, branches.to(dev))
        d = noise.normal(self.sampler.chunk_shape(self.latent_hw), key, device=dev)
        return math.sqrt(1 - s * s) * base + s * d

    def pivot_chunk(
        self, group: int, pivot: int, branches: torch.Tensor, samples: torch.Tensor, cross: CrossKV, cache: KVCache
    ) -> ChunkTrajectory:
        """Chunk p of the given branches (ids [n], CPU), recorded: where AR-CoPO explores. Each branch starts
        from its perturbed initial noise; the solver noise is shared. (SDE-GRPO overrides this.)"""
        x = self.perturbed_noise(group, pivot, branches)
        return self.sampler.denoise_chunk(x, pivot, samples, cross, cache, record=True)

    def _generate_prefix(self, cross1: CrossKV, cache: KVCache, group: int, pivot: int) -> torch.Tensor:
        """Chunks 0..pivot-1 for one row (cache row 0), committed; returns their clean latents."""
        dev = self.model.device
        samples = torch.full((1,), group, device=dev)
        outs = []
        for c in range(pivot):
            x = self.sampler.initial_noise(samples, c, self.latent_hw)
            x0 = self.sampler.denoise_chunk(x, c, samples, cross1, cache).output
            self.sampler.commit_chunk(x0, cross1, cache)
            outs.append(x0)
        if not outs:
            return torch.zeros(1, 0, self.model.cfg.in_channels, *self.latent_hw, device=dev)
        return torch.cat(outs, dim=1)

    @torch.no_grad()
    def rebuild_prefix_cache(self, cross1: CrossKV, prefix_latents: torch.Tensor) -> KVCache:
        """The prefix KV cache from clean prefix latents [1, p*F, C, H, W]: one commit forward per chunk
        with the CURRENT weights (semi-on-policy rebuilds it under the reference weights). Cheap compared to
        regenerating: p forwards instead of 5p, and no gigabytes of stored KV."""
        F = self.model.cfg.chunk_frames
        p = prefix_latents.shape[1] // F
        cache = self.sampler.new_cache(1, p + 1, self.latent_hw)
        for c in range(p):
            self.sampler.commit_chunk(prefix_latents[:, c * F : (c + 1) * F].to(self.model.device), cross1, cache)
        return cache

    # -- the group rollout ----------------------------------------------------------------------------

    @torch.no_grad()
    def rollout(self, cross1: CrossKV, *, group: int, pivot: int, prompt: str = "", keep_prefix_cache: bool = True) -> GroupSample:
        """Generate one group. cross1: the prompt's cross-attention K/V with a single text row."""
        L, G, m = self.num_chunks, self.group_size, self.micro_batch
        if not 0 <= pivot < L:
            raise ValueError(f"pivot must be in [0, {L}), got {pivot}")
        if cross1.num_rows != 1 or cross1.rows is not None:
            raise ValueError("rollout expects the cross-attention K/V of one prompt (one text row)")
        dev = self.model.device
        secs: dict[str, float] = {}
        t0 = time.perf_counter()

        # 1. shared prefix, generated once, in row 0
        with nvtx_range("prefix"):
            if self.fork == "copy":
                cache = self.sampler.new_cache(m, L, self.latent_hw)
                prefix_cache = cache.view(torch.zeros(1, dtype=torch.int64, device=dev))
            else:
                prefix_cache = self.sampler.new_cache(1, pivot + 1, self.latent_hw)
            prefix = self._generate_prefix(cross1, prefix_cache, group, pivot)
        P = prefix_cache.total_tokens
        t1 = time.perf_counter()

        # 2. fork
        with nvtx_range("fork"):
            if self.fork == "copy":
                cache.fork_(0, list(range(1, m)))
            else:
                cache = prefix_cache.branch(0, m, capacity_tokens=(L - 1 - pivot) * self.chunk_tokens)
        t2 = time.perf_counter()

        # 3-4. branches, micro-batched: chunk p recorded, chunks > p finished with shared noise
        inputs, x0s, videos = [], [], []
        for i0 in range(0, G, m):
            n = min(m, G - i0)
            view = cache if n == m else cache.view(torch.arange(n, device=dev))
            crossn = cross1.select(torch.zeros(n, dtype=torch.int64, device=dev))
            samples = torch.full((n,), group, device=dev)
            with nvtx_range(f"branches{i0}"):
                traj = self.pivot_chunk(group, pivot, torch.arange(i0, i0 + n), samples, crossn, view)
                inputs.append(torch.stack(traj.inputs, dim=1))
                x0s.append(torch.stack(traj.x0, dim=1))
                chunks = [traj.output]
                for c in range(pivot + 1, L):
                    self.sampler.commit_chunk(chunks[-1], crossn, view)
                    x = self.sampler.initial_noise(samples, c, self.latent_hw)
                    chunks.append(self.sampler.denoise_chunk(x, c, samples, crossn, view).output)
                videos.append(torch.cat([prefix.expand(n, *prefix.shape[1:]), *chunks], dim=1))
            cache.rewind(P)
        t3 = time.perf_counter()

        x0_old = torch.cat(x0s)
        tau, logp_old = neighbour_table(x0_old, self.tau, auto_scale=self.tau_auto_scale)
        keep = None
        if keep_prefix_cache:
            # copy mode: copy row 0's prefix out, so the big micro-batch cache is freed before the update
            keep = prefix_cache if self.fork == "zero_copy" else cache.clone_row(0)
        secs.update(prefix=t1 - t0, fork=t2 - t1, branches=t3 - t2)
        return GroupSample(
            group=group,
            prompt=prompt,
            pivot=pivot,
            inputs=torch.cat(inputs),
            x0_old=x0_old,
            logp_old=logp_old,
            tau=tau,
            prefix_latents=prefix,
            latents=torch.cat(videos),
            prefix_cache=keep,
            seconds=secs,
        )
