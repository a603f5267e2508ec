"""Toy reward models in VideoAlign's three dimensions, for the toy world (arcopo_fast.toy.world).

Tiny CNNs trained by the project's own code on the world's ground truth (arcopo_fast.toy.reward_models;
`python -m arcopo_fast.toy build`), weights shipped in the package:

  toy_ta            text alignment: the prompt's colours, shapes, sizes, directions and background,
                    recognised in the video. TA = mean over the prompt's facts of the recogniser's
                    probability that the fact holds (in [0, 1]).
  toy_vq            visual quality, per frame: the probability that a frame is a clean world frame rather
                    than a degraded one (blur, noise, ghosts, blotches, colour smear), averaged over frames.
  toy_mq            motion quality, per clip: the probability that the motion is the world's (one object
                    identity per clip moving at constant velocity, bouncing off the walls) rather than a
                    corrupted one (cuts, freezes, shuffled or dropped frames, identity switches at chunk
                    boundaries).
  toy_videoalign    all three: {"VQ", "MQ", "TA"} (weights 1 each) and "Overall" (their sum, logged).

Each reward follows the protocol of rewards/base.py: __call__(videos [B, F, 3, H, W] in [0, 1], prompts)
-> dict of float32 [B]. The networks see 17 frames spread over the video, resized to 64 x 64. Knows nothing of the generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import check_videos, load_tensor_file, require_path

__all__ = ["CLIP_FRAMES", "TA_HEADS", "MotionNet", "QualityNet", "RecogniserNet", "ToyMQ", "ToyTA", "ToyVQ", "ToyVideoAlign", "prepare"]

SIZE, FRAMES = 64, 33  # the world's videos
CLIP_FRAMES = 17  # what the networks see: every 2nd frame (MQ all 17; TA and VQ every 2nd of those: 9)


def _world():
    from ..toy import world

    return world


def _heads() -> dict[str, int]:
    w = _world()
    return {"colour": len(w.COLOURS), "shape": len(w.SHAPES), "size": len(w.SIZES), "direction": len(w.DIRECTIONS), "background": len(w.BACKGROUNDS)}


TA_HEADS = ("colour", "shape", "size", "direction", "background")


def prepare(videos: torch.Tensor) -> torch.Tensor:
    """videos [B, F, 3, H, W] in [0, 1] -> clips [B, 17, 3, 64, 64] float32 in [-1, 1]: 17 frames spread
    evenly (every 2nd frame of a 33-frame video), area-resized to 64 x 64."""
    v = videos.float()
    B, Fr = v.shape[:2]
    idx = torch.linspace(0, Fr - 1, CLIP_FRAMES).round().long().to(v.device)
    v = v[:, idx]
    if v.shape[-2:] != (SIZE, SIZE):
        v = F.interpolate(v.flatten(0, 1), size=(SIZE, SIZE), mode="area").view(B, CLIP_FRAMES, 3, SIZE, SIZE)
    return v * 2 - 1


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(4, cout), nn.SiLU())


class _FrameEncoder(nn.Module):
    """[N, cin, 64, 64] -> [N, width]: four stride-2 convs and global mean + max pooling."""

    def __init__(self, cin: int, width: int):
        super().__init__()
        w = width // 2
        self.net = nn.Sequential(*(_conv(a, b, s) for a, b, s in ((cin, w // 2, 2), (w // 2, w, 2), (w, w, 2), (w, w, 2), (w, w, 1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.net(x)
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)


def _space_time_trunk(c: int) -> nn.Sequential:
    """[B, 3, 17, 64, 64] -> [B, c, 5, 4, 4]: space-time convolutions (motion is seen directly)."""

    def block(a, b, s):
        return [nn.Conv3d(a, b, 3, s, 1), nn.SiLU()]

    return nn.Sequential(
        *block(3, c // 2, (1, 2, 2)), *block(c // 2, c, (1, 2, 2)), *block(c, c, (2, 2, 2)), *block(c, c, (2, 2, 2))
    )


class RecogniserNet(nn.Module):
    """TA: a clip -> per-attribute logits: multi-label presence of each colour, shape, size and direction;
    the background class."""

    def __init__(self, width: int = 48):
        super().__init__()
        self.trunk = _space_time_trunk(width)
        self.mix = nn.Sequential(nn.Linear(2 * width, 2 * width), nn.SiLU())
        self.heads = nn.ModuleDict({k: nn.Linear(2 * width, n) for k, n in _heads().items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: prepare()d clips [B, 17, 3, 64, 64]."""
        h = self.trunk(x.transpose(1, 2))
        h = self.mix(torch.cat([h.mean(dim=(2, 3, 4)), h.amax(dim=(2, 3, 4))], dim=1))
        return {k: head(h) for k, head in self.heads.items()}


class QualityNet(nn.Module):
    """VQ: one frame -> the logit of 'a clean world frame'."""

    def __init__(self, width: int = 48):
        super().__init__()
        self.enc = _FrameEncoder(3, width)
        self.out = nn.Linear(width, 1)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [N, 3, 64, 64] in [-1, 1] -> [N]."""
        return self.out(self.enc(frames)).squeeze(1)


class MotionNet(nn.Module):
    """MQ: a clip (17 frames, at 32 x 32) -> the logit of 'the world's motion'. Space-time convolutions see
    motion directly; max pooling over space and time finds a local anomaly (a cut, a freeze, a jump)
    anywhere in the clip."""

    def __init__(self, width: int = 32):
        super().__init__()
        c = width

        def block(a, b, k, s):
            return [nn.Conv3d(a, b, k, s, tuple(x // 2 for x in k)), nn.SiLU()]

        self.net = nn.Sequential(
            *block(3, c // 2, (3, 3, 3), (1, 2, 2)), *block(c // 2, c, (3, 3, 3), (1, 2, 2)),
            *block(c, c, (3, 3, 3), (1, 1, 1)), *block(c, c, (3, 3, 3), (1, 2, 2)),
        )
        self.out = nn.Linear(2 * c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: prepare()d clips [B, 17, 3, 64, 64] -> [B]."""
        h = F.avg_pool3d(x.transpose(1, 2), (1, 2, 2))  # [B, 3, 17, 32, 32]
        h = self.net(h)
        return self.out(torch.cat([h.mean(dim=(2, 3, 4)), h.amax(dim=(2, 3, 4))], dim=1)).squeeze(1)


# -- scoring -------------------------------------------------------------------------------------------


def prompt_targets(prompts: Sequence[str]) -> list[dict[str, list[int]]]:
    """The attribute indices each prompt names (ValueError for a prompt outside the toy world)."""
    return [_world().parse_prompt(p).labels for p in prompts]


def ta_scores(logits: dict[str, torch.Tensor], targets: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """TA (mean probability of the prompt's facts) and, per attribute, the mean probability of its facts."""
    probs = {k: (v.softmax(-1) if k == "background" else v.sigmoid()) for k, v in logits.items()}
    per = {k: [] for k in TA_HEADS}
    for b, tgt in enumerate(targets):
        for k in TA_HEADS:
            per[k].append(probs[k][b, tgt[k]].mean())
    out = {k: torch.stack(v) for k, v in per.items()}
    ta = torch.stack([out[k] for k in TA_HEADS]).mean(0)
    return {"TA": ta, **{f"TA_{k}": v for k, v in out.items()}}


def recognised(logits: dict[str, torch.Tensor], targets: list[dict[str, list[int]]], heads: Sequence[str] = TA_HEADS) -> torch.Tensor:
    """[B] bool: for every attribute of `heads`, the n values the prompt names (n distinct colours, shapes,
    ...) are the recogniser's n most likely ones."""
    out = []
    for b, tgt in enumerate(targets):
        ok = True
        for k in heads:
            want = set(tgt[k])
            ok = ok and set(logits[k][b].topk(len(want)).indices.tolist()) == want
        out.append(ok)
    return torch.tensor(out)


# -- the rewards -----------------------------------------------------------------------------------------


def weights_file(kind: str) -> Path:
    from ..toy.assets import weights_path

    return weights_path(f"reward_{kind}.safetensors")


class _ToyReward:
    kind = ""
    net_class: type[nn.Module] = nn.Module

    def __init__(self, weights: str | None = None, device: str | None = None):
        path = require_path(
            weights or weights_file(self.kind),
            what=f"toy {self.kind.upper()} reward weights",
            download="nothing: they ship with arcopo_fast (rebuild them with `python -m arcopo_fast.toy build`)",
        )
        self.net = self.net_class()
        self.net.load_state_dict(load_tensor_file(path))
        self.net.eval().requires_grad_(False)
        self.device = device

    def _prep(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_videos(videos, prompts, check_range=False)
        dev = torch.device(self.device) if self.device else videos.device
        self.net.to(dev)
        return prepare(videos.to(dev))

    def scores(self, x: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The components from prepared clips x (`prepare`), on the net's device."""
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, videos: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.scores(self._prep(videos, prompts), prompts)


class ToyTA(_ToyReward):
    """Text alignment: {"TA": mean probability of the prompt's facts, "TA_<attribute>": per attribute}."""

    name = "toy_ta"
    kind = "ta"
    net_class = RecogniserNet
    weights = {"TA": 1.0}

    def scores(self, x: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        return {k: v.float() for k, v in ta_scores(self.net(x), prompt_targets(prompts)).items()}


class ToyVQ(_ToyReward):
    """Visual quality: {"VQ": mean over 9 frames of P(clean world frame)}."""

    name = "toy_vq"
    kind = "vq"
    net_class = QualityNet
    weights = {"VQ": 1.0}

    def scores(self, x: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        x = x[:, ::2]
        B, T = x.shape[:2]
        return {"VQ": self.net(x.flatten(0, 1)).sigmoid().view(B, T).mean(1).float()}


class ToyMQ(_ToyReward):
    """Motion quality: {"MQ": P(the world's motion)}."""

    name = "toy_mq"
    kind = "mq"
    net_class = MotionNet
    weights = {"MQ": 1.0}

    def scores(self, x: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        return {"MQ": self.net(x).sigmoid().float()}


class ToyVideoAlign:
    """VQ + MQ + TA of the toy reward models, as VideoAlign reports them: {"VQ", "MQ", "TA", "Overall"}
    (Overall = their sum, logged only), plus TA's per-attribute components (logged only)."""

    name = "toy_videoalign"
    weights = {"VQ": 1.0, "MQ": 1.0, "TA": 1.0}

    def __init__(self, ta: str | None = None, vq: str | None = None, mq: str | None = None, device: str | None = None):
        self.ta, self.vq, self.mq = ToyTA(ta, device), ToyVQ(vq, device), ToyMQ(mq, device)

    @torch.no_grad()
    def __call__(self, videos: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        x = self.ta._prep(videos, prompts)  # checked and prepared once for the three nets
        for part in (self.vq, self.mq):
            part.net.to(x.device)
        out = {**self.vq.scores(x, prompts), **self.mq.scores(x, prompts), **self.ta.scores(x, prompts)}
        out["Overall"] = out["VQ"] + out["MQ"] + out["TA"]
        return out
