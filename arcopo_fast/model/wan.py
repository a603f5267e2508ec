"""The causal Wan2.1 DiT of Self-Forcing (T2V-1.3B shape), lean, with its attention routed through ops.

Parameter names are the ORIGINAL Wan2.1 ones (patch_embedding, text_embedding.{0,2}, time_embedding.{0,2},
time_projection.1, blocks.N.{self_attn,cross_attn}.{q,k,v,o,norm_q,norm_k}, blocks.N.norm3,
blocks.N.ffn.{0,2}, blocks.N.modulation, head.head, head.modulation), so Self-Forcing and Wan checkpoints
load by name (checkpoint.py maps diffusers names).

Numerics (deliberate, for parity with Wan/Self-Forcing/diffusers):
- The residual stream, every LayerNorm, the modulation (shift/scale/gate) and the time embedding are
  float32; the sinusoidal timestep embedding is computed in float64 as in Wan.
- q/k RMSNorm: RMS in float32, cast back, then times the weight (WanRMSNorm).
- Linear layers and attention run in the parameters' dtype (bf16 for the 1.3B model).
- RoPE: float64 angles, float32 rotation (see rope.py).
Timesteps are per frame: t has shape [B, F] and every latent frame gets its own modulation.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from .. import ops
from .config import ModelConfig
from .kv_cache import CrossKV, KVCache
from .rope import RopeTables, apply_rope

AttnFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """Wan's timestep embedding [N, dim]: [cos, sin] of t * 10000^(-i/half), computed in float64."""
    half = dim // 2
    pos = t.to(torch.float64).reshape(-1)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    ang = torch.outer(pos, freqs)
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input/parameter dtype (returns float32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


def _linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a Linear (or a peft LoRA wrapper of one) in its base weight's dtype. The output is cast back
    to that dtype because float32 LoRA factors would otherwise promote activations (and the KV cache)."""
    dt = layer.weight.dtype
    return layer(x.to(dt)).to(dt)


class _Attention(nn.Module):
    """q, k, v, o projections with q/k RMSNorm over all channels (Wan's self- and cross-attention)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.dim
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(d, cfg.eps), RMSNorm(d, cfg.eps)


class SelfAttention(_Attention):
    def forward(self, x, layer: int, rope: tuple[torch.Tensor, torch.Tensor], attn: AttnFn) -> torch.Tensor:
        B, N, _ = x.shape
        shape = (B, N, self.num_heads, self.head_dim)
        q, k = _linear(self.q, x), _linear(self.k, x)
        wq, wk = self.norm_q.weight, self.norm_k.weight
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, wq, wk))):
            # Training: the modules' autograd path (numerics identical to ops' torch backend). Compiled:
            # the same ops, which Inductor fuses into one kernel (the Triton launch would be opaque to it).
            q = apply_rope(self.norm_q(q).view(shape), *rope)
            k = apply_rope(self.norm_k(k).view(shape), *rope)
        else:  # inference (rollouts, sampling): one fused RMSNorm + RoPE launch on the triton backend
            q, k = ops.qk_norm_rope(q, k, wq, wk, *rope, self.num_heads, self.norm_q.eps)
        v = _linear(self.v, x).view(shape)
        out = attn(layer, q, k, v)
        return _linear(self.o, out.flatten(2))


class CrossAttention(_Attention):
    def kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, L, _ = context.shape
        k = self.norm_k(_linear(self.k, context)).view(B, L, self.num_heads, self.head_dim)
        v = _linear(self.v, context).view(B, L, self.num_heads, self.head_dim)
        return k, v

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q = self.norm_q(_linear(self.q, x)).view(B, N, self.num_heads, self.head_dim)
        # Every query sees all text_len context tokens (padding is zeroed, not masked: Wan/Self-Forcing).
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype))
        return _linear(self.o, out.transpose(1, 2).flatten(2))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.dim
        self.norm1 = LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(cfg)
        self.norm3 = LayerNorm(d, eps=cfg.eps, elementwise_affine=True)  # affine, before cross-attention
        self.cross_attn = CrossAttention(cfg)
        self.norm2 = LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, d))
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d**0.5)

    def cross_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This block's cross-attention K/V of the embedded text (a method so FSDP2 can unshard for it)."""
        return self.cross_attn.kv(context)

    def forward(self, x, e, cross_k, cross_v, layer: int, rope, attn: AttnFn, frame_tokens: int):
        """x: [B, N, dim] float32 residual stream; e: [B, F, 6, dim] float32 projected time embedding."""
        B, N, D = x.shape
        Fr = N // frame_tokens
        mod = self.modulation.float()[None] + e  # [B, F, 6, dim]
        shift1, scale1, gate1, shift2, scale2, gate2 = (m[:, :, None, :] for m in mod.unbind(2))

        def modulate(h, shift, scale):
            return (h.view(B, Fr, frame_tokens, D) * (1 + scale) + shift).view(B, N, D)

        def gated(y, gate):
            return (y.float().view(B, Fr, frame_tokens, D) * gate).view(B, N, D)

        cdt = self.ffn[0].weight.dtype
        y = self.self_attn(modulate(self.norm1(x), shift1, scale1).to(cdt), layer, rope, attn)
        x = x + gated(y, gate1)
        x = x + self.cross_attn(self.norm3(x).to(cdt), cross_k, cross_v).float()
        y = _linear(self.ffn[2], self.ffn[1](_linear(self.ffn[0], modulate(self.norm2(x), shift2, scale2))))
        return x + gated(y, gate2)


class Head(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.dim
        self.out_dim = math.prod(cfg.patch_size) * cfg.out_channels
        self.norm = LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(d, self.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, d) / d**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor, frame_tokens: int) -> torch.Tensor:
        """x: [B, N, dim] float32; e: [B, F, dim] float32 time embedding (before the projection)."""
        B, N, D = x.shape
        mod = self.modulation.float()[:, None] + e[:, :, None, :]  # [B, F, 2, dim]
        shift, scale = mod[:, :, 0:1], mod[:, :, 1:2]
        h = self.norm(x).view(B, -1, frame_tokens, D) * (1 + scale) + shift
        return _linear(self.head, h.view(B, N, D)).float()


class CausalWanModel(nn.Module):
    """Causal Wan2.1 DiT: predicts the flow v = noise - x0 for a chunk of latent frames.

    Three attention modes, one network:
      forward(x, t, cross, cache)            streaming: the chunk attends to [cached past ; itself]
      forward(x, t, cross, cache, commit=True)  the same, then writes the chunk's K/V to the cache
      forward(x, t, cross)                   one chunk alone (an empty cache: plain bidirectional)
      forward_full(x, t, cross)              teacher forcing: the whole video, chunk c sees chunks <= c
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_channels, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.rope = RopeTables(cfg)
        self.gradient_checkpointing = False
        self.init_weights()

    # -- init / properties ------------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self) -> None:
        """Wan2.1's initialisation (xavier linears, zero biases, N(0, .02) embeddings), except that the
        head follows cfg.init_std_head (Wan: zeros)."""
        if any(p.is_meta for p in self.parameters()):
            return
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        nn.init.zeros_(self.patch_embedding.bias)
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        nn.init.normal_(self.head.head.weight, std=self.cfg.init_std_head) if self.cfg.init_std_head else nn.init.zeros_(self.head.head.weight)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    def frame_tokens(self, height: int, width: int) -> int:
        ph, pw = self.cfg.patch_size[1:]
        if height % ph or width % pw:
            raise ValueError(f"latent height/width ({height}, {width}) must be multiples of the patch {ph}x{pw}")
        return (height // ph) * (width // pw)

    # -- text ------------------------------------------------------------------------------------------

    def encode_text(self, context: torch.Tensor) -> CrossKV:
        """Per-layer cross-attention K/V for text embeddings [Bt, Lt <= text_len, text_dim] (zero-padded to
        text_len, as Wan does). Compute once per prompt and reuse for every chunk, step and branch."""
        if context.ndim != 3 or context.shape[-1] != self.cfg.text_dim:
            raise ValueError(f"context must be [B, L, text_dim={self.cfg.text_dim}], got {tuple(context.shape)}")
        Lt = context.shape[1]
        if Lt > self.cfg.text_len:
            raise ValueError(f"context has {Lt} tokens, more than text_len={self.cfg.text_len}")
        context = F.pad(context, (0, 0, 0, self.cfg.text_len - Lt))
        ctx = _linear(self.text_embedding[2], self.text_embedding[1](_linear(self.text_embedding[0], context)))
        ks, vs = zip(*(b.cross_kv(ctx) for b in self.blocks))
        return CrossKV(list(ks), list(vs))

    # -- forward -----------------------------------------------------------------------------------------

    def _time(self, t: torch.Tensor, B: int, Fr: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.as_tensor(t, device=self.device)
        if t.ndim == 0:
            t = t.expand(B)
        if t.ndim == 1:
            t = t[:, None].expand(B, Fr)
        if t.shape != (B, Fr):
            raise ValueError(f"t must be a scalar, [B] or [B, F] = [{B}, {Fr}], got {tuple(t.shape)}")
        sin = sinusoidal_embedding(self.cfg.freq_dim, t).float()
        te = self.time_embedding

        def lin32(m, z):  # the time MLP runs in float32 whatever the parameter dtype (Wan: autocast fp32)
            return F.linear(z, m.weight.float(), m.bias.float())

        e = lin32(te[2], F.silu(lin32(te[0], sin)))  # [B*F, dim]
        e0 = lin32(self.time_projection[1], F.silu(e))
        return e.view(B, Fr, -1), e0.view(B, Fr, 6, -1)

    def _run(self, x: torch.Tensor, t, cross: CrossKV, start_frame: int, attn: AttnFn, checkpoint: bool) -> torch.Tensor:
        if x.ndim != 5 or x.shape[2] != self.cfg.in_channels:
            raise ValueError(f"x must be [B, F, C={self.cfg.in_channels}, H, W], got {tuple(x.shape)}")
        B, Fr, C, H, W = x.shape
        ftok = self.frame_tokens(H, W)
        h, w = H // self.cfg.patch_size[1], W // self.cfg.patch_size[2]
        tokens = self.patch_embedding(x.transpose(1, 2).to(self.dtype))  # [B, dim, F, h, w]
        xs = tokens.flatten(2).transpose(1, 2).float()  # residual stream, float32
        e, e0 = self._time(t, B, Fr)
        rope = self.rope.get(start_frame, Fr, h, w, x.device)
        for i, block in enumerate(self.blocks):
            ck, cv = cross.layer(i, B)
            if checkpoint:
                xs = torch.utils.checkpoint.checkpoint(block, xs, e0, ck, cv, i, rope, attn, ftok, use_reentrant=False)
            else:
                xs = block(xs, e0, ck, cv, i, rope, attn, ftok)
        out = self.head(xs, e, ftok)  # [B, N, prod(patch) * C]
        return self._unpatchify(out, Fr, h, w)

    def _unpatchify(self, out: torch.Tensor, Fr: int, h: int, w: int) -> torch.Tensor:
        B = out.shape[0]
        pf, ph, pw = self.cfg.patch_size
        C = self.cfg.out_channels
        u = out.view(B, Fr, h, w, pf, ph, pw, C)
        u = torch.einsum("bfhwpqrc->bfpchqwr", u)
        return u.reshape(B, Fr * pf, C, h * ph, w * pw)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        cross: CrossKV,
        cache: KVCache | None = None,
        *,
        commit: bool = False,
        start_frame: int | None = None,
    ) -> torch.Tensor:
        """Flow prediction [B, F, C, H, W] (float32) for a chunk x [B, F, C, H, W] at timesteps t ([B, F],
        [B] or scalar). With a cache, the chunk's RoPE time offset is cache.start_frame; commit=True writes
        the chunk's K/V into the cache and advances it (the clean-context pass)."""
        if cache is None:
            if commit:
                raise ValueError("commit=True needs a cache")

            def attn(layer, q, k, v):
                return ops.chunk_attention(q, k, v)

            sf = 0 if start_frame is None else start_frame
        else:
            if start_frame is not None and start_frame != cache.start_frame:
                raise ValueError(f"start_frame={start_frame} disagrees with the cache's position {cache.start_frame}")
            n_tokens = x.shape[1] * self.frame_tokens(x.shape[3], x.shape[4])
            if commit:
                cache.check_fits(n_tokens)

            def attn(layer, q, k, v):
                out = cache.attend(layer, q, k, v)
                if commit:
                    cache.write(layer, k, v)
                return out

            sf = cache.start_frame
        ckpt = self.gradient_checkpointing and torch.is_grad_enabled() and not commit
        out = self._run(x, t, cross, sf, attn, ckpt)
        if commit:
            cache.advance(n_tokens)
        return out

    def forward_full(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        cross: CrossKV,
        *,
        local_attn_frames: int | None = None,
        sink_frames: int = 0,
    ) -> torch.Tensor:
        """Teacher forcing over a whole video x [B, F, C, H, W] (F a multiple of chunk_frames): block-causal
        attention, chunk c sees chunks <= c (and, with local_attn_frames, only that many frames up to its
        own end, plus sink_frames pinned first frames)."""
        if x.shape[1] % self.cfg.chunk_frames:
            raise ValueError(f"frames ({x.shape[1]}) must be a multiple of chunk_frames ({self.cfg.chunk_frames})")
        ftok = self.frame_tokens(x.shape[3], x.shape[4])
        window = None if local_attn_frames is None else local_attn_frames * ftok

        def attn(layer, q, k, v):
            return ops.block_causal_attention(
                q, k, v, self.cfg.chunk_frames * ftok, window_tokens=window, sink_tokens=sink_frames * ftok
            )

        ckpt = self.gradient_checkpointing and torch.is_grad_enabled()
        return self._run(x, t, cross, 0, attn, ckpt)
