"""3D rotary position embedding of Wan2.1 with absolute frame offsets (causal streaming).

head_dim channels form head_dim/2 INTERLEAVED complex pairs (x[2i], x[2i+1]), split between time, height
and width (22/21/21 pairs at head_dim 128). The time position is the absolute latent-frame index, so a
chunk generated at frame 9 rotates its keys exactly as teacher forcing over the whole video would.

Numerics: Wan and Self-Forcing rotate in complex128. Here the angles and their cos/sin are computed in
float64 and rounded once to float32; the rotation runs in float32. The difference from complex128 is one
float32 rounding of cos/sin plus the fp32 products (relative error ~1e-7), below bf16 resolution by four
orders of magnitude, and it keeps the hot path free of float64 (which costs ~11% of the DiT in the
reference code).
"""

from __future__ import annotations

import torch

from .config import ModelConfig


def _inv_freq(pairs: int, theta: float) -> torch.Tensor:
    # Wan's rope_params(max_len, dim=2*pairs): 1 / theta^(arange(0, dim, 2) / dim), in float64.
    dim = 2 * pairs
    return 1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def rope_cos_sin(
    cfg: ModelConfig, start_frame: int, frames: int, height: int, width: int, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [frames*height*width, head_dim/2] (float32) for tokens in (frame, row, col) order,
    frames counted from the absolute index start_frame."""
    if start_frame < 0 or start_frame + frames > cfg.rope_max_positions:
        raise ValueError(
            f"frames [{start_frame}, {start_frame + frames}) exceed the RoPE table of "
            f"{cfg.rope_max_positions} positions (ModelConfig.rope_max_positions)"
        )
    if max(height, width) > cfg.rope_max_positions:
        raise ValueError(f"latent grid {height}x{width} exceeds {cfg.rope_max_positions} RoPE positions")
    pt, ph, pw = cfg.rope_split
    ang_t = torch.outer(torch.arange(start_frame, start_frame + frames, dtype=torch.float64), _inv_freq(pt, cfg.rope_theta))
    ang_h = torch.outer(torch.arange(height, dtype=torch.float64), _inv_freq(ph, cfg.rope_theta))
    ang_w = torch.outer(torch.arange(width, dtype=torch.float64), _inv_freq(pw, cfg.rope_theta))
    ang = torch.cat(
        [
            ang_t[:, None, None, :].expand(frames, height, width, pt),
            ang_h[None, :, None, :].expand(frames, height, width, ph),
            ang_w[None, None, :, :].expand(frames, height, width, pw),
        ],
        dim=-1,
    ).reshape(frames * height * width, pt + ph + pw)
    return torch.cos(ang).float().to(device), torch.sin(ang).float().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, L, H, D] by the tables [L, D/2]; float32 math, x's dtype out."""
    xf = x.float().unflatten(-1, (-1, 2))
    xe, xo = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack((xe * c - xo * s, xe * s + xo * c), dim=-1).flatten(-2)
    return out.to(x.dtype)


class RopeTables:
    """Memo of cos/sin tables per (start_frame, frames, height, width, device): a streaming run needs
    one per chunk position, so they are built once instead of every layer and step."""

    def __init__(self, cfg: ModelConfig, max_entries: int = 64):
        self.cfg = cfg
        self.max_entries = max_entries
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, start_frame: int, frames: int, height: int, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (start_frame, frames, height, width, str(device))
        hit = self._tables.get(key)
        if hit is None:
            if len(self._tables) >= self.max_entries:
                self._tables.pop(next(iter(self._tables)))
            hit = self._tables[key] = rope_cos_sin(self.cfg, start_frame, frames, height, width, device)
        return hit
