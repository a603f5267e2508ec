"""Offline rewards: no weights, cheap, meaningful enough for the default training run and for tests.

All take videos [B, F, 3, H, W] in [0, 1] and return {"score": [B], <measurement>: [B]}; only "score"
enters the total (higher = better), the measurement is logged beside it in natural units.

    JpegCompressibility  score = -(bits per pixel of the JPEG-encoded frames)   (flat > detailed > noise)
    TemporalSmoothness   score = -flicker, flicker = mean |frame difference|    (static video: 0, the best)
    BrightnessTarget     score = -|mean luma - target|                          (0 at the target)
    ColorTarget          score = -||mean RGB - target|| / sqrt(3)               (0 at the target, >= -1)
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .base import sample_frame_indices

# Rec.601 luma weights (what JPEG and most "brightness" measures use).
_LUMA = (0.299, 0.587, 0.114)


def _check_unit(value: float, name: str) -> float:
    if not isinstance(value, (int, float)) or not (0.0 <= float(value) <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


class JpegCompressibility:
    """How well the frames compress as JPEG: score = -bits per pixel (higher = more compressible).

    quality: JPEG quality (1..95); num_frames: frames sampled evenly from each video and averaged.
    A flat video costs a fraction of a bit per pixel, uniform noise about 8 at quality 75. This is the
    classic "compressibility" reward of DDPO; on its own it prefers flat, blurry videos.
    """

    weights = {"score": 1.0}

    def __init__(self, quality: int = 75, num_frames: int = 4):
        if not isinstance(quality, int) or not 1 <= quality <= 95:
            raise ValueError(f"quality must be an integer in [1, 95], got {quality!r}")
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
        self.quality = quality
        self.num_frames = num_frames

    def __call__(self, videos: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        from PIL import Image

        idx = sample_frame_indices(videos.shape[1], self.num_frames)
        frames = videos[:, idx].clamp(0, 1).mul(255).round().to(torch.uint8)  # [B, n, 3, H, W]
        frames = frames.permute(0, 1, 3, 4, 2).cpu().numpy()  # [B, n, H, W, 3]
        b, n, h, w, _ = frames.shape
        bpp = np.zeros(b, dtype=np.float64)
        for i in range(b):
            for j in range(n):
                buf = io.BytesIO()
                Image.fromarray(frames[i, j]).save(buf, format="JPEG", quality=self.quality)
                bpp[i] += 8.0 * buf.tell() / (h * w)
        bits = torch.from_numpy(bpp / n).float().to(videos.device)
        return {"score": -bits, "bits_per_pixel": bits}


class TemporalSmoothness:
    """Penalises flicker: score = -mean |temporal difference| of the frames, in [0, 1] pixel units.

    order: 1 = frame differences (any change costs, a static video scores 0, the best);
           2 = second differences (x[t+1] - 2 x[t] + x[t-1]: steady fades cost nothing, jitter does).
    downsample: average-pool frames by this factor first, so the measure follows low-frequency flicker
        (brightness or colour pumping) rather than fine texture motion.
    frame_stride: compare every frame_stride-th frame.
    """

    weights = {"score": 1.0}

    def __init__(self, order: int = 1, downsample: int = 1, frame_stride: int = 1):
        if order not in (1, 2):
            raise ValueError(f"order must be 1 or 2, got {order!r}")
        for name, v in (("downsample", downsample), ("frame_stride", frame_stride)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.order = order
        self.downsample = downsample
        self.frame_stride = frame_stride

    def __call__(self, videos: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        x = videos[:, :: self.frame_stride].float()
        b, f = x.shape[:2]
        if f < self.order + 1:
            raise ValueError(
                f"TemporalSmoothness(order={self.order}, frame_stride={self.frame_stride}) needs at least "
                f"{self.order + 1} frames after striding, got {f} (videos have {videos.shape[1]} frames)"
            )
        if self.downsample > 1:
            k = self.downsample
            x = F.avg_pool2d(x.flatten(0, 1), kernel_size=k, stride=k, ceil_mode=True).unflatten(0, (b, f))
        d = x[:, 1:] - x[:, :-1]
        if self.order == 2:
            d = d[:, 1:] - d[:, :-1]
        flicker = d.abs().mean(dim=(1, 2, 3, 4))
        return {"score": -flicker, "flicker": flicker}


class BrightnessTarget:
    """Prefers videos whose mean luma (Rec.601, in [0, 1]) is `target`: score = -|brightness - target|."""

    weights = {"score": 1.0}

    def __init__(self, target: float = 0.5):
        self.target = _check_unit(target, "target")

    def __call__(self, videos: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        w = torch.tensor(_LUMA, device=videos.device, dtype=torch.float32)
        mean_rgb = videos.float().mean(dim=(1, 3, 4))  # [B, 3]
        brightness = mean_rgb @ w
        return {"score": -(brightness - self.target).abs(), "brightness": brightness}


class ColorTarget:
    """Prefers videos whose mean colour is `target` (RGB in [0, 1]): score = -||mean RGB - target|| / sqrt(3).

    The score is 0 at the target and at least -1 anywhere.
    """

    weights = {"score": 1.0}

    def __init__(self, target: Sequence[float] = (0.5, 0.5, 0.5)):
        if isinstance(target, str) or not isinstance(target, Sequence) or len(target) != 3:
            raise ValueError(f"target must be 3 numbers (R, G, B) in [0, 1], got {target!r}")
        self.target = tuple(_check_unit(v, f"target[{i}]") for i, v in enumerate(target))

    def __call__(self, videos: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        t = torch.tensor(self.target, device=videos.device, dtype=torch.float32)
        mean_rgb = videos.float().mean(dim=(1, 3, 4))  # [B, 3]
        dist = (mean_rgb - t).norm(dim=1) / math.sqrt(3.0)
        return {"score": -dist, "distance": dist}
