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
    """cos/sin tables per chunk position. Eager: a memo per (start_frame, frames, height, width, device), so a
    streaming run builds one per chunk position instead of one per layer and step. Under torch.compile: the
    chunk's rows are gathered from per-axis tables (time [rope_max_positions], height, width) by slicing at
    start_frame, so the compiled graph does not specialise on the chunk position (one graph serves every
    chunk). Both give identical values: each entry is cos/sin of the same float64 angle rounded to float32."""

    def __init__(self, cfg: ModelConfig, max_entries: int = 64):
        self.cfg = cfg
        self.max_entries = max_entries
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._axes: dict[str, tuple[torch.Tensor, ...]] = {}

    def get(self, start_frame: int, frames: int, height: int, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling():
            return self._sliced(start_frame, frames, height, width, device)
        key = (start_frame, frames, height, width, str(device))
        hit = self._tables.get(key)
        if hit is None:
            if len(self._tables) >= self.max_entries:
                self._tables.pop(next(iter(self._tables)))
            hit = self._tables[key] = rope_cos_sin(self.cfg, start_frame, frames, height, width, device)
        return hit

    def axis_tables(self, device) -> tuple[torch.Tensor, ...]:
        """(cos_t, sin_t, cos_h, sin_h, cos_w, sin_w): float32 [rope_max_positions, pairs of the axis]."""
        key = str(device)
        if key not in self._axes:
            n = self.cfg.rope_max_positions
            pos = torch.arange(n, dtype=torch.float64)
            tabs = []
            for pairs in self.cfg.rope_split:
                ang = torch.outer(pos, _inv_freq(pairs, self.cfg.rope_theta))
                tabs += [torch.cos(ang).float().to(device), torch.sin(ang).float().to(device)]
            self._axes[key] = tuple(tabs)
        return self._axes[key]

    def _sliced(self, start_frame, frames, height, width, device) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.cfg.rope_max_positions
        if start_frame < 0 or start_frame + frames > n or max(height, width) > n:
            raise ValueError(f"frames [{start_frame}, {start_frame + frames}) or grid {height}x{width} exceed the "
                             f"RoPE table of {n} positions (ModelConfig.rope_max_positions)")
        ct, st, ch, sh, cw, sw = self.axis_tables(device)
        pt, ph, pw = self.cfg.rope_split

        def grid(t, h, w):
            return torch.cat(
                [
                    t[start_frame : start_frame + frames, None, None, :].expand(frames, height, width, pt),
                    h[:height][None, :, None, :].expand(frames, height, width, ph),
                    w[:width][None, None, :, :].expand(frames, height, width, pw),
                ],
                dim=-1,
            ).reshape(frames * height * width, pt + ph + pw)

        return grid(ct, ch, cw), grid(st, sh, sw)
