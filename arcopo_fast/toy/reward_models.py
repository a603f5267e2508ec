"""Training the toy reward models (arcopo_fast.rewards.toy) on the world's ground truth.

All three see the world through the VAE: their clips are VAE reconstructions of rendered scenes (the
generator's videos are VAE decodes too), 17 frames each, stored as uint8.

- TA (RecogniserNet): multi-label presence of each colour / shape / size / direction, and the background
  class, from the scene's labels; horizontal flips (left <-> right) augment.
- VQ (QualityNet): clean reconstructed frames (label 1) against degraded ones (label 0): blur, noise,
  ghosting, colour blotches, block smear, desaturation, at random strengths.
- MQ (MotionNet): reconstructed clips (1) against temporally corrupted ones (0): cuts to another clip of the
  same background (an identity switch or a teleport), frozen spans, shuffled spans, a vanished object, a
  time warp (the object accelerates), frame jitter.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F

from ..rewards.toy import TA_HEADS, MotionNet, QualityNet, RecogniserNet, _heads

Log = Callable[[str], None] | None
NetT = TypeVar("NetT", bound=torch.nn.Module)


def _log(log: Log, msg: str) -> None:
    if log is not None:
        log(msg)


def to_clip(videos01: torch.Tensor) -> torch.Tensor:
    """[B, 33, 3, 64, 64] in [0, 1] -> uint8 [B, 17, 3, 64, 64] (every 2nd frame)."""
    return (videos01[:, ::2].clamp(0, 1) * 255).round().to(torch.uint8)


def _float(clips: torch.Tensor) -> torch.Tensor:
    return clips.float() / 127.5 - 1.0


def label_targets(labels: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Multi-hot targets [N, n] per attribute (background: class indices [N])."""
    n = _heads()
    out = {k: torch.zeros(len(labels), n[k]) for k in TA_HEADS if k != "background"}
    for i, lab in enumerate(labels):
        for k in out:
            out[k][i, lab[k]] = 1.0
    out["background"] = torch.tensor([lab["background"][0] for lab in labels])
    return out


def _schedule(opt, step: int, steps: int, lr: float) -> None:
    for pg in opt.param_groups:
        pg["lr"] = lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))


def _fit(net: NetT, name: str, batch_loss: Callable[[], torch.Tensor], *, steps: int, lr: float, log: Log) -> NetT:
    """AdamW (weight decay 1e-4) on `batch_loss()` (which draws its own batch) with the warm-up + cosine
    schedule; logs every 100 steps. Returns the net in eval mode."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    t0 = time.process_time()
    for step in range(steps):
        _schedule(opt, step, steps, lr)
        loss = batch_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            _log(log, f"{name} step {step}: loss {loss.item():.4f} ({time.process_time() - t0:.0f} s CPU)")
    return net.eval()


# -- TA --------------------------------------------------------------------------------------------------


def train_ta(clips: torch.Tensor, labels: list[dict[str, list[int]]], *, steps: int, batch: int, lr: float, seed: int, log: Log = None) -> RecogniserNet:
    from .world import DIRECTIONS

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = RecogniserNet()
    tg = label_targets(labels)
    dirs = list(DIRECTIONS)
    swap = torch.arange(len(dirs))
    swap[dirs.index("left")], swap[dirs.index("right")] = dirs.index("right"), dirs.index("left")

    def batch_loss() -> torch.Tensor:
        idx = torch.randint(len(clips), (batch,), generator=g)
        x = _float(clips[idx])
        y = {k: v[idx] for k, v in tg.items()}
        flip = torch.rand(batch, generator=g) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1, 1), x.flip(-1), x)
        y["direction"] = torch.where(flip.view(-1, 1), y["direction"][:, swap], y["direction"])
        out = net(x)
        loss = sum(F.binary_cross_entropy_with_logits(out[k], y[k]) for k in TA_HEADS if k != "background")
        return loss + F.cross_entropy(out["background"], y["background"])

    return _fit(net, "TA", batch_loss, steps=steps, lr=lr, log=log)


# -- VQ --------------------------------------------------------------------------------------------------


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur of [N, 3, H, W] with std sigma [N] (pixels)."""
    r = 6
    ax = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-(ax[None] ** 2) / (2 * sigma[:, None].clamp_min(0.3) ** 2))
    k = k / k.sum(1, keepdim=True)  # [N, 2r+1]
    N, C, H, W = x.shape
    y = x.reshape(1, N * C, H, W)
    kk = k.repeat_interleave(C, 0)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="replicate"), kk.view(N * C, 1, 1, -1), groups=N * C)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), kk.view(N * C, 1, -1, 1), groups=N * C)
    return y.view(N, C, H, W)


def degrade(frames: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random degradation of each frame [N, 3, 64, 64] in [-1, 1] (one kind per frame, random strength)."""
    N = frames.shape[0]
    kind = torch.randint(6, (N,), generator=g)
    s = torch.rand(N, generator=g)
    out = frames.clone()

    def sel(i):
        return (kind == i).view(-1, 1, 1, 1)

    out = torch.where(sel(0), _blur(frames, 0.8 + 2.5 * s), out)
    out = torch.where(sel(1), frames + (0.08 + 0.35 * s).view(-1, 1, 1, 1) * torch.randn(frames.shape, generator=g), out)
    shifted = torch.roll(frames, shifts=(int(torch.randint(3, 9, (1,), generator=g)), int(torch.randint(-8, 9, (1,), generator=g))), dims=(2, 3))
    out = torch.where(sel(2), (1 - 0.5 * (0.4 + 0.6 * s)).view(-1, 1, 1, 1) * frames + (0.5 * (0.4 + 0.6 * s)).view(-1, 1, 1, 1) * shifted, out)
    blobs = _blur(torch.randn(N, 3, 64, 64, generator=g) * 3, torch.full((N,), 4.0)).clamp(-1, 1)
    out = torch.where(sel(3), frames + (0.3 + 0.7 * s).view(-1, 1, 1, 1) * blobs, out)
    f = 4 + 4 * (s > 0.5).long()
    smear = torch.stack([F.interpolate(F.avg_pool2d(frames[i : i + 1], int(f[i])), scale_factor=int(f[i]), mode="nearest")[0] for i in range(N)])
    out = torch.where(sel(4), smear, out)
    grey = frames.mean(1, keepdim=True)
    wash = (0.5 + 0.5 * s).view(-1, 1, 1, 1)
    out = torch.where(sel(5), (1 - wash) * frames + wash * (0.6 * grey + 0.4 * frames.mean(dim=(1, 2, 3), keepdim=True)), out)
    return out.clamp(-1, 1)


def train_vq(clips: torch.Tensor, *, steps: int, batch: int, lr: float, seed: int, log: Log = None) -> QualityNet:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = QualityNet()

    def batch_loss() -> torch.Tensor:
        ci = torch.randint(len(clips), (batch,), generator=g)
        fi = torch.randint(clips.shape[1], (batch,), generator=g)
        x = _float(clips[ci, fi])
        bad = torch.rand(batch, generator=g) < 0.5
        x = torch.where(bad.view(-1, 1, 1, 1), degrade(x, g), x)
        return F.binary_cross_entropy_with_logits(net(x), (~bad).float())

    return _fit(net, "VQ", batch_loss, steps=steps, lr=lr, log=log)


# -- MQ --------------------------------------------------------------------------------------------------


def corrupt_motion(x: torch.Tensor, partner: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A temporal corruption of clip x [T, 3, H, W] (partner: another clip of the same background)."""
    T = x.shape[0]
    kind = int(torch.randint(6, (1,), generator=g))
    a = int(torch.randint(3, T - 4, (1,), generator=g))
    b = min(T, a + int(torch.randint(3, 8, (1,), generator=g)))
    y = x.clone()
    if kind == 0:  # cut to another clip: identity switch / teleport (often at a chunk boundary)
        a = [5, 11][int(torch.randint(2, (1,), generator=g))] if torch.rand(1, generator=g) < 0.6 else a
        y[a:] = partner[a:]
    elif kind == 1:  # frozen span
        y[a:b] = x[a - 1]
    elif kind == 2:  # shuffled span
        y[a:b] = x[a:b][torch.randperm(b - a, generator=g)]
    elif kind == 3:  # the object vanishes (the clip's temporal median is about its background)
        y[a:b] = x.median(dim=0).values
    elif kind == 4:  # time warp: the object speeds up (frames skipped) or runs back
        idx = torch.arange(T)
        idx[a:] = (a + 2 * (idx[a:] - a)).clamp(max=T - 1) if torch.rand(1, generator=g) < 0.5 else (a - (idx[a:] - a)).clamp(min=0)
        y = x[idx]
    else:  # jitter: frames shifted by a few pixels
        for t in range(a, b):
            y[t] = torch.roll(x[t], shifts=(int(torch.randint(-4, 5, (1,), generator=g)), int(torch.randint(-4, 5, (1,), generator=g))), dims=(1, 2))
    return y


def train_mq(clips: torch.Tensor, backgrounds: torch.Tensor, *, steps: int, batch: int, lr: float, seed: int, log: Log = None) -> MotionNet:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = MotionNet()
    by_bg = {int(b): (backgrounds == b).nonzero().flatten() for b in backgrounds.unique()}

    def batch_loss() -> torch.Tensor:
        ci = torch.randint(len(clips), (batch,), generator=g)
        x = _float(clips[ci])
        bad = torch.rand(batch, generator=g) < 0.5
        for i in bad.nonzero().flatten().tolist():
            pool = by_bg[int(backgrounds[ci[i]])]
            partner = _float(clips[pool[int(torch.randint(len(pool), (1,), generator=g))]])
            x[i] = corrupt_motion(x[i], partner, g)
        flip = torch.rand(batch, generator=g) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1, 1), x.flip(-1), x)
        return F.binary_cross_entropy_with_logits(net(x), (~bad).float())

    return _fit(net, "MQ", batch_loss, steps=steps, lr=lr, log=log)
