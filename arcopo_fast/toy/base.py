"""The toy base generator, made the way Self-Forcing's few-step students are made (docs: toy-world.md):

1. teacher: a causal flow-matching model trained by TEACHER FORCING on the world's VAE latents. One forward
   sees [clean video ; noisy video] (2F frames, the noisy copy at the same RoPE positions), with a
   block-causal mask: clean chunk c sees clean chunks <= c, noisy chunk c sees clean chunks < c and itself.
   Every chunk gets its own noise level; 10% of the prompts are dropped (empty text) for guidance.
2. ODE targets: the teacher samples streaming videos chunk by chunk (its KV cache holds its own clean
   chunks, as at inference) with many Euler steps and classifier-free guidance. Each initial noise maps
   deterministically to a video; the trajectory's points at the few-step sampler's sigmas are recorded.
3. student (same architecture, initialised from the teacher): ODE regression, also by teacher forcing:
   x0 = student(trajectory point at sigma_k of chunk c | the trajectory's clean chunks < c) -> endpoint.
   The 4-step sampler then inherits the noise -> video map: different noises give different, sharp videos.

Everything is deterministic for a seed on a given machine (one thread).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.kv_cache import CrossKV, KVCache
from ..model.wan import CausalWanModel

# -- teacher forcing ------------------------------------------------------------------------------------


def teacher_forcing_mask(frames: int, chunk_frames: int, frame_tokens: int, device=None) -> torch.Tensor:
    """Boolean attention mask [2N, 2N] (True = attend) over the tokens of [clean video ; noisy video], N =
    frames * frame_tokens: clean chunk c sees clean chunks <= c; noisy chunk c sees clean chunks < c and
    noisy chunk c."""
    chunk = torch.arange(frames, device=device).repeat_interleave(frame_tokens) // chunk_frames
    qc, kc = chunk[:, None], chunk[None, :]
    clean_clean = kc <= qc
    noisy_clean = kc < qc
    noisy_noisy = kc == qc
    top = torch.cat([clean_clean, torch.zeros_like(clean_clean)], dim=1)
    bottom = torch.cat([noisy_clean, noisy_noisy], dim=1)
    return torch.cat([top, bottom], dim=0)


def teacher_forcing_forward(
    model: CausalWanModel, clean: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor, cross: CrossKV
) -> torch.Tensor:
    """Flow predictions [B, F, C, H, W] for `noisy` (timesteps t [B, F]) given the clean video `clean`
    [B, F, C, H, W] as block-causal context (the clean copy runs at timestep 0)."""
    B, Fr, C, H, W = noisy.shape
    if clean.shape != noisy.shape:
        raise ValueError(f"clean {tuple(clean.shape)} and noisy {tuple(noisy.shape)} must have the same shape")
    cfg = model.cfg
    ftok = model.frame_tokens(H, W)
    h, w = H // cfg.patch_size[1], W // cfg.patch_size[2]
    x = torch.cat([clean, noisy], dim=1)
    tt = torch.cat([torch.zeros_like(t), t], dim=1)
    tokens = model.patch_embedding(x.transpose(1, 2).to(model.dtype))
    xs = tokens.flatten(2).transpose(1, 2).float()
    e, e0 = model._time(tt, B, 2 * Fr)
    cos, sin = model.rope.get(0, Fr, h, w, x.device)
    rope = (torch.cat([cos, cos]), torch.cat([sin, sin]))  # the noisy copy sits at the clean copy's positions
    mask = teacher_forcing_mask(Fr, cfg.chunk_frames, ftok, x.device)

    def attn(layer, q, k, v):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return out.transpose(1, 2)

    for i, block in enumerate(model.blocks):
        ck, cv = cross.layer(i, B)
        xs = block(xs, e0, ck, cv, i, rope, attn, ftok)
    out = model._unpatchify(model.head(xs, e, ftok), 2 * Fr, h, w)
    return out[:, Fr:]


# -- schedules -----------------------------------------------------------------------------------------


def warp(u: torch.Tensor | float, shift: float):
    """The flow-matching shift: sigma = shift u / (1 + (shift - 1) u)."""
    return shift * u / (1 + (shift - 1) * u)


def ode_grid(student_sigmas: list[float], steps: int) -> tuple[list[float], list[int]]:
    """An Euler grid from sigma 1 to 0 that contains every student sigma, with about `steps` steps spread
    in proportion to each segment's length (at least 2 per segment). Returns (grid, index of each student
    sigma in the grid)."""
    knots = [*student_sigmas, 0.0]
    if abs(knots[0] - 1.0) > 1e-9:
        raise ValueError(f"the first sigma must be 1, got {knots[0]}")
    grid, where = [], []
    for a, b in zip(knots[:-1], knots[1:]):
        n = max(2, round(steps * (a - b)))
        where.append(len(grid))
        grid += [a + (b - a) * j / n for j in range(n)]
    return grid + [0.0], where


# -- data ----------------------------------------------------------------------------------------------


@dataclass
class LatentSet:
    """Training latents [N, F, C, H, W] (normalised) and their text embeddings [N, L, D]."""

    latents: torch.Tensor
    text: torch.Tensor

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.latents[idx], self.text[idx]


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    return lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))


def _weighted_mse(pred: torch.Tensor, target: torch.Tensor, channel_weights: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over [B, F, C, H, W], each latent channel weighted (None: all 1)."""
    err = (pred - target).pow(2)
    if channel_weights is None:
        return err.mean()
    return (err * channel_weights.view(1, 1, -1, 1, 1)).mean() / channel_weights.mean()


def _motion_mse(pred: torch.Tensor, target: torch.Tensor, chunk_frames: int, channel_weights: torch.Tensor | None) -> torch.Tensor:
    """Weighted mean squared error of the frame-to-frame differences of (pred - target) [B, F, C, H, W],
    between neighbouring frames of the same chunk."""
    d = pred - target
    same = (torch.arange(1, d.shape[1], device=d.device) % chunk_frames) != 0  # pair (f-1, f) inside a chunk
    dt = (d[:, 1:] - d[:, :-1])[:, same]
    return _weighted_mse(dt, torch.zeros_like(dt), channel_weights)


def dead_channel_weights(latents: torch.Tensor, *, dead_std: float = 0.05, weight: float = 0.02) -> torch.Tensor:
    """Loss weights [C] for training latents [N, F, C, H, W]: `weight` for a channel whose std is under
    dead_std, 1 otherwise.

    Why: the toy VAE's decoder reads 3 of its 16 channels; the build squashes the other 13 to ~0
    (build.renormalise_vae). Unweighted, their target (v = eps there: the model must copy the noise out,
    scaled by 1/sigma) is 13/16 of the loss and filled the (then 64-wide) model: it learned to clean those channels
    and left the 3 the decoder reads noisy (measured: x0 error at sigma 0.25 about sigma^2, no denoising;
    samples twice the data's neighbour-cell variation). Weighted down, the same model and steps got TA colour
    0.41 -> 0.91 and VQ 0.08 -> 0.20 on its ODE samples. A small weight, not 0: the sampler still runs
    those channels, and their output stays near the data's ~0."""
    std = latents.std(dim=(0, 1, 3, 4))
    return torch.where(std < dead_std, torch.full_like(std, weight), torch.ones_like(std))


def _log(log: Callable[[str], None] | None, msg: str) -> None:
    if log is not None:
        log(msg)


class _Ema:
    """An exponential moving average of a model's parameters (decay 0: none), warmed up as
    min(decay, (1 + n) / (10 + n)) so early weights fade fast."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        self.decay, self.n = decay, 0
        self.params = [p.detach().clone() for p in model.parameters()] if decay else []

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        if not self.decay:
            return
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        for e, p in zip(self.params, model.parameters()):
            e.lerp_(p.detach(), 1 - d)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for e, p in zip(self.params, model.parameters()):
            p.copy_(e)


# -- stage 1: the teacher --------------------------------------------------------------------------------


def train_teacher(
    model: CausalWanModel,
    data: LatentSet,
    *,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    shift: float = 3.0,
    drop_text: float = 0.1,
    ema: float = 0.0,
    channel_weights: torch.Tensor | None = None,
    motion_weight: float = 0.0,
    warmup: int = 50,
    log: Callable[[str], None] | None = None,
) -> list[float]:
    """Flow matching by teacher forcing: x_s = (1 - s) x0 + s eps per chunk (s = warp(u, shift), u uniform),
    target v = eps - x0, on the noisy copy only. ema: decay of an exponential moving average of the weights,
    which the model gets at the end (0: the last weights). channel_weights [C]: the loss weight of each latent
    channel (see dead_channel_weights). motion_weight: the weight of a second term, the same error's
    frame-to-frame differences inside each chunk (_motion_mse). Returns the loss curve.

    Why the motion term: a mean squared error over whole frames is dominated by appearance (colour, size,
    background); an object drifting the wrong way costs little of it. Measured on this world (1000 steps, the
    teacher's guided ODE samples of 32 held-out prompts): weight 2 raised MQ 0.008 -> 0.095 and VQ 0.15 ->
    0.27 at equal TA (5 was unstable). The price at width 64: a temporally steady guess is the background,
    so objects came out faint (the student's object mass ~40% of the data's); the 96-wide model keeps ~94%."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    avg = _Ema(model, ema)
    model.train()
    L = model.cfg.chunk_frames
    losses = []
    t0 = time.process_time()
    for step in range(steps):
        for pg in opt.param_groups:
            pg["lr"] = _lr_at(step, steps, lr, warmup)
        idx = torch.randint(len(data.latents), (batch,), generator=g)
        x0, text = data.batch(idx)
        keep = (torch.rand(batch, generator=g) >= drop_text).float().view(-1, 1, 1)
        B, Fr = x0.shape[:2]
        u = torch.rand(B, Fr // L, generator=g).repeat_interleave(L, dim=1)
        sig = warp(u, shift)
        eps = torch.randn(x0.shape, generator=g)
        s5 = sig.view(B, Fr, 1, 1, 1)
        xt = (1 - s5) * x0 + s5 * eps
        cross = model.encode_text(text * keep)
        v = teacher_forcing_forward(model, x0, xt, sig * 1000, cross)
        target = eps - x0
        loss = _weighted_mse(v, target, channel_weights)
        if motion_weight:
            loss = loss + motion_weight * _motion_mse(v, target, L, channel_weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        avg.update(model)
        losses.append(loss.item())
        if log and (step % 100 == 0 or step == steps - 1):
            _log(log, f"teacher step {step}: loss {sum(losses[-100:]) / len(losses[-100:]):.4f} ({time.process_time() - t0:.0f} s CPU)")
    avg.copy_to(model)
    model.eval()
    return losses


# -- stage 2: ODE trajectories -----------------------------------------------------------------------------


@torch.no_grad()
def ode_trajectories(
    model: CausalWanModel,
    text: torch.Tensor,
    noise: torch.Tensor,
    *,
    student_sigmas: list[float],
    steps: int,
    guidance: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Streaming Euler ODE samples of the teacher with classifier-free guidance.

    text [B, L, D]; noise [B, F, C, H, W] (the initial noise of every chunk). Returns (endpoints [B, F, C, H,
    W], points [B, K, F, C, H, W]: the trajectory at each student sigma, chunk by chunk)."""
    B, Fr, C, H, W = noise.shape
    cf = model.cfg.chunk_frames
    num_chunks = Fr // cf
    grid, where = ode_grid(student_sigmas, steps)
    cond = torch.cat([text, torch.zeros_like(text)])
    cross = model.encode_text(cond)
    cache = KVCache.for_model(
        model.cfg, rows=2 * B, num_chunks=num_chunks, frame_tokens=model.frame_tokens(H, W), device=model.device, dtype=model.dtype
    )
    ends = torch.empty_like(noise)
    points = torch.empty(B, len(student_sigmas), Fr, C, H, W)
    for c in range(num_chunks):
        sl = slice(c * cf, (c + 1) * cf)
        x = noise[:, sl].clone()
        for j, (a, b) in enumerate(zip(grid[:-1], grid[1:])):
            if j in where:
                points[:, where.index(j), sl] = x
            v = model(torch.cat([x, x]), torch.full((2 * B,), a * 1000.0), cross, cache)
            vc, vu = v[:B], v[B:]
            x = x + (b - a) * (vu + guidance * (vc - vu))
        ends[:, sl] = x
        if c < num_chunks - 1:
            model(torch.cat([x, x]), torch.zeros(2 * B), cross, cache, commit=True)
    return ends, points


# -- stage 3: the student ----------------------------------------------------------------------------------


def train_student(
    model: CausalWanModel,
    ends: torch.Tensor,
    points: torch.Tensor,
    text: torch.Tensor,
    *,
    student_sigmas: list[float],
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    channel_weights: torch.Tensor | None = None,
    motion_weight: float = 0.0,
    warmup: int = 20,
    log: Callable[[str], None] | None = None,
) -> list[float]:
    """ODE regression by teacher forcing: for every chunk a random step k, input = the trajectory's point
    at sigma_k, context = the trajectory's clean chunks, target x0 = the trajectory's endpoint.
    channel_weights, motion_weight: as in train_teacher."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    cf = model.cfg.chunk_frames
    K = len(student_sigmas)
    sig_table = torch.tensor(student_sigmas)
    losses = []
    t0 = time.process_time()
    for step in range(steps):
        for pg in opt.param_groups:
            pg["lr"] = _lr_at(step, steps, lr, warmup)
        idx = torch.randint(len(ends), (batch,), generator=g)
        x0, pts, emb = ends[idx], points[idx], text[idx]
        B, Fr = x0.shape[:2]
        k = torch.randint(K, (B, Fr // cf), generator=g).repeat_interleave(cf, dim=1)  # [B, F]
        xt = torch.gather(pts, 1, k.view(B, 1, Fr, 1, 1, 1).expand(B, 1, *pts.shape[2:])).squeeze(1)
        sig = sig_table[k]
        v = teacher_forcing_forward(model, x0, xt, sig * 1000, model.encode_text(emb))
        pred = xt - sig.view(B, Fr, 1, 1, 1) * v
        loss = _weighted_mse(pred, x0, channel_weights)
        if motion_weight:
            loss = loss + motion_weight * _motion_mse(pred, x0, cf, channel_weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if log and (step % 100 == 0 or step == steps - 1):
            _log(log, f"student step {step}: loss {sum(losses[-100:]) / len(losses[-100:]):.4f} ({time.process_time() - t0:.0f} s CPU)")
    model.eval()
    return losses
