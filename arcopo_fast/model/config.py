"""Model configuration: the causal Wan2.1 DiT of Self-Forcing, with named sizes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    dim: int = 1536
    """Hidden size of the transformer."""
    num_layers: int = 30
    """Number of DiT blocks."""
    num_heads: int = 12
    """Attention heads; head_dim = dim / num_heads (128 for the 1.3B model)."""
    ffn_dim: int = 8960
    """Hidden size of each block's GELU-tanh FFN."""
    freq_dim: int = 256
    """Width of the sinusoidal timestep embedding."""
    text_dim: int = 4096
    """Width of the text encoder's output (umT5-XXL: 4096)."""
    text_len: int = 512
    """Text tokens the cross-attention sees (context is zero-padded to this length)."""
    in_channels: int = 16
    """Latent channels (Wan VAE z_dim)."""
    out_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """Conv3d patch (frames, height, width) of the patch embedding."""
    eps: float = 1e-6
    """LayerNorm / RMSNorm epsilon."""
    rope_max_positions: int = 1024
    """Length of the RoPE tables: at most this many latent frames (and latent rows/cols / patch)."""
    rope_theta: float = 10000.0
    chunk_frames: int = 3
    """Latent frames generated per autoregressive chunk."""
    init_std_head: float = 0.0
    """Std of the output head's initial weights. Wan initialises it to zero; the tiny preset uses a small
    random head so that a random model produces non-trivial videos (and rewards) to train on."""

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"head_dim ({self.head_dim}) must be even and >= 6 for 3D RoPE")
        if self.patch_size[0] != 1:
            raise ValueError("patch_size[0] must be 1: the causal model patches frames one by one")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Complex pairs per axis (time, height, width): Wan's d - 4(d//6), 2(d//6), 2(d//6) channels.
        For head_dim 128: 22 / 21 / 21 pairs."""
        d = self.head_dim
        return ((d - 4 * (d // 6)) // 2, (2 * (d // 6)) // 2, (2 * (d // 6)) // 2)

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)


PRESETS: dict[str, ModelConfig] = {
    # Self-Forcing / Wan2.1-T2V-1.3B: about 1.42 B parameters.
    "wan-1.3b": ModelConfig(),
    # A few MB, seconds per video on 2 CPU cores; same architecture, every code path exercised.
    "tiny": ModelConfig(
        dim=64,
        num_layers=2,
        num_heads=2,
        ffn_dim=128,
        freq_dim=32,
        text_dim=32,
        text_len=16,
        init_std_head=0.02,
    ),
    # The toy world's generator (arcopo_fast.toy): trained weights ship in the package; about 2.5 MB.
    # Width 96 rather than 64: at 64 the same recipe gave faint objects and lower rewards (README: toy world).
    "toy": ModelConfig(
        dim=96,
        num_layers=4,
        num_heads=3,
        ffn_dim=288,
        freq_dim=64,
        text_dim=32,
        text_len=24,
    ),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None
