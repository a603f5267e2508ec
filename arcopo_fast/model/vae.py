"""The Wan2.1 VAE (diffusers AutoencoderKLWan) with Wan's latent normalisation and a streaming decoder.

Layouts: latents [B, F, 16, h, w] (the DiT's layout, normalised); videos [B, T, 3, H, W] in [0, 1] with
T = 4(F - 1) + 1, H = 8h, W = 8w.

Normalisation (Wan): the DiT's latents are z_norm = (mu - mean) / std with the per-channel latents_mean /
latents_std of the VAE config; decoding undoes it (z = z_norm * std + mean).

Streaming: the VAE is causal in time. diffusers' _decode runs the decoder one latent frame at a time,
carrying per-conv feature caches (the last 2 frames of each causal conv's input, "Rep" for the first
temporal upsample). StreamDecoder runs exactly that loop with its own cache list, so decoding chunk by
chunk yields the frames of the whole-video decode: the first latent frame gives 1 video frame, every later
one gives 4. The caches hold 2 frames of every causal conv's input at its level (about 1.9 GB in bf16 for
one 480x832 video, in both paths).

Fast decoding (WanVAE(memory_format=..., compile=...)): the plain path calls diffusers' decoder modules,
whose caches change shape and type over the first frames (None, "Rep", 1 frame, 2 frames) and whose causal
convs pad with an extra copy (cat + F.pad). The fast path (_DecoderStep) runs the same layers, with the
same weights, as one pure function per latent frame: step(frame, caches) -> (video frames, caches), where
every cache is always 2 frames (zeros before the video starts; diffusers' zero temporal padding gives the
same sums), spatial zero padding is the convolution's own, the per-frame Conv2d/upsample of the resample
layers run on the 5-D tensor, and the clamp/[0, 1]/transpose of the output is fused in. Fixed shapes make
the step a single static graph for torch.compile (fullgraph, dynamic=False: no recompiles for a fixed video
size; the first frame, which skips the temporal upsample convs, runs eagerly) and let channels_last_3d
(NDHWC, cuDNN's fast 3-D conv layout) hold for every conv input, output and cache.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["COMPILE_MODES", "MEMORY_FORMATS", "StreamDecoder", "WanVAE", "check_vae_options", "resolve_memory_format",
           "valid_compile"]

MEMORY_FORMATS = ("auto", "contiguous", "channels_last_3d")
"""WanVAE(memory_format=...): the layout of the decoder's conv weights, activations and caches. "auto" is
resolve_memory_format's choice for the device."""
COMPILE_MODES = (False, True, "default", "max-autotune-no-cudagraphs")
"""WanVAE(compile=...): False, True (= "default") or a torch.compile mode. The CUDA-graph modes
("reduce-overhead", "max-autotune") are refused: one step runs for tens of ms at 480p, so launch overhead is
negligible, and each step's caches are the next step's inputs (CUDA-graph trees would chain a node per
frame)."""


def valid_compile(value) -> bool:
    """True for a value of COMPILE_MODES (False/True themselves: 0 and 1 are not accepted)."""
    return value is False or value is True or (isinstance(value, str) and value in COMPILE_MODES)


def check_vae_options(memory_format: str, compile: bool | str, compile_backend=None) -> None:
    """ValueError naming the argument and the allowed values when an option is not supported."""
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"memory_format must be one of {MEMORY_FORMATS}, got {memory_format!r}")
    if not valid_compile(compile):
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {compile!r}")
    if compile_backend is not None and not (isinstance(compile_backend, str) or callable(compile_backend)):
        raise ValueError(
            f"compile_backend must be a torch.compile backend name or callable, got {compile_backend!r}"
        )


def resolve_memory_format(memory_format: str, device: torch.device | str) -> str:
    """"auto" -> "channels_last_3d" on CPU, "contiguous" elsewhere; any other value is returned as it is.

    Why on CPU: diffusers' decoder normalises over the channel dim, which in NCDHW is the strided one, and
    the CPU reduction over it cost 59% of a toy-VAE decode. Measured on 2 cores (fp32, frames equal within
    3.3e-6): toy VAE (base_dim 8, 8 videos x 33 frames at 64x64) 0.87 -> 0.28 s; base_dim 32, 2 x 17 at 128x128
    2.20 -> 1.04 s; base_dim 96, 1 x 17 at 64x64 1.96 -> 1.92 s. On a GPU the variants are not measured yet
    (benchmarks/bench_decode.py), so "auto" keeps diffusers' own path there."""
    if memory_format != "auto":
        return memory_format
    return "channels_last_3d" if torch.device(device).type == "cpu" else "contiguous"


def _check_latents(z: torch.Tensor, z_dim: int) -> None:
    if z.ndim != 5 or z.shape[2] != z_dim:
        raise ValueError(f"latents must be [B, F, {z_dim}, h, w], got {tuple(z.shape)}")


class WanVAE:
    """Wrapper of a diffusers AutoencoderKLWan (a local folder, a pipeline root with vae/, or a module).

    decode(latents) -> video in [0, 1]; encode(video) -> normalised latents (posterior mean, as Wan);
    stream(batch) -> a StreamDecoder for chunk-by-chunk decoding. Computation runs in `dtype` (bf16 is
    fine on GPU); outputs are float32.

    Decoder speed options ("contiguous" without compile is diffusers' own path; any other value switches
    decoding, whole and streamed, to the fixed-shape per-frame step described in the module docstring;
    frames equal the plain path's up to float rounding; encoding is unchanged):
      memory_format: "auto" (default: channels_last_3d on CPU, contiguous on a GPU; resolve_memory_format),
        "contiguous" or "channels_last_3d" (NDHWC: the decoder's Conv3d weights are converted in place, and
        activations and caches are kept in that layout).
      compile: False, True / "default", or "max-autotune-no-cudagraphs": torch.compile the per-frame step
        (fullgraph, dynamic=False). The first decode of a new video size compiles (a minute or more at 480p
        on a GPU); a new batch size or frame size compiles again.
      compile_backend: the torch.compile backend (default "inductor"; tests use "aot_eager" or a counting
        callable, where the mode is not passed).
    Only Wan2.1-style VAEs (no patch_size, is_residual=False) support the fast path."""

    def __init__(
        self,
        source,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        memory_format: str = "auto",
        compile: bool | str = False,
        compile_backend: str | Callable = "inductor",
    ):
        check_vae_options(memory_format, compile, compile_backend)
        auto, memory_format = memory_format == "auto", resolve_memory_format(memory_format, device)
        from diffusers import AutoencoderKLWan

        if isinstance(source, (str, Path)):
            path = Path(source).expanduser()
            if not path.exists():
                raise FileNotFoundError(f"VAE folder not found: {path}")
            if not (path / "config.json").exists() and (path / "vae" / "config.json").exists():
                path = path / "vae"
            if not (path / "config.json").exists():
                raise FileNotFoundError(f"no config.json in the VAE folder {path}")
            vae = AutoencoderKLWan.from_pretrained(str(path), local_files_only=True, torch_dtype=dtype)
        elif isinstance(source, AutoencoderKLWan):
            vae = source
        else:
            raise TypeError(f"source must be a folder or an AutoencoderKLWan, got {type(source).__name__}")
        if vae.dtype != dtype:  # diffusers warns on any .to(dtype=...) call, even a no-op one
            vae = vae.to(dtype=dtype)
        self.vae = vae.to(device=device).eval().requires_grad_(False)
        self.device, self.dtype = torch.device(device), dtype
        cfg = self.vae.config
        self.z_dim = int(cfg.z_dim)
        if len(cfg.latents_mean) != self.z_dim or len(cfg.latents_std) != self.z_dim:
            raise ValueError(f"VAE config latents_mean/std must have z_dim={self.z_dim} entries")
        self.mean = torch.tensor(cfg.latents_mean, dtype=torch.float32, device=self.device).view(
            1, 1, -1, 1, 1
        )
        self.std = torch.tensor(cfg.latents_std, dtype=torch.float32, device=self.device).view(1, 1, -1, 1, 1)
        self.temporal_factor = 2 ** sum(cfg.temperal_downsample)
        self.spatial_factor = 2 ** (len(cfg.dim_mult) - 1) * (cfg.patch_size or 1)
        self.memory_format, self.compile = memory_format, compile
        self._step = self._step_compiled = None
        if memory_format != "contiguous" or compile is not False:
            try:
                self._use_step(memory_format, compile, compile_backend)
            except ValueError:
                if not auto or compile is not False:
                    raise
                # "auto" on a VAE the fixed-shape step does not support (Wan2.2's): diffusers' own path
                self.vae.decoder.to(memory_format=torch.contiguous_format)
                self.memory_format, self._step, self._step_compiled = "contiguous", None, None

    def _use_step(self, memory_format: str, compile: bool | str, compile_backend: str | Callable = "inductor"):
        """Decode with the per-frame step (the benchmark also calls it for the eager contiguous step)."""
        check_vae_options(memory_format, compile, compile_backend)
        memory_format = resolve_memory_format(memory_format, self.device)
        self.memory_format, self.compile = memory_format, compile
        self._step = _DecoderStep(self.vae, memory_format)
        self._step_compiled = self._step
        if compile is not False:
            kw = dict(fullgraph=True, dynamic=False, backend=compile_backend)
            if compile_backend == "inductor" and isinstance(compile, str):
                kw["mode"] = compile
            self._step_compiled = torch.compile(self._step, **kw)

    def to(self, device: torch.device | str) -> WanVAE:
        """Move the VAE (weights, normalisation constants, fast-path buffers) to `device`, in place."""
        self.device = torch.device(device)
        self.vae.to(self.device)
        if self._step is not None:
            self._step.to(self.device)
        self.mean, self.std = self.mean.to(self.device), self.std.to(self.device)
        return self

    # -- normalisation -----------------------------------------------------------------------------------

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents [B, F, C, h, w] -> the DiT's latents."""
        return (z.float() - self.mean) / self.std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """The DiT's latents -> raw VAE latents."""
        return z.float() * self.std + self.mean

    def num_frames(self, latent_frames: int) -> int:
        return self.temporal_factor * (latent_frames - 1) + 1

    # -- whole videos -------------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, *, batch_size: int | None = None) -> torch.Tensor:
        """[B, F, 16, h, w] normalised latents -> [B, 4(F-1)+1, 3, 8h, 8w] video in [0, 1] (float32).
        batch_size: decode at most this many videos at once (bounds activation memory at 480p)."""
        _check_latents(latents, self.z_dim)
        if batch_size is not None and latents.shape[0] > batch_size:
            return torch.cat([self.decode(part) for part in latents.split(batch_size)])
        if self._step is not None:
            return self.stream().decode_chunk(latents)
        z = self.denormalize(latents.to(self.device)).transpose(1, 2).to(self.dtype)  # [B, C, F, h, w]
        video = self.vae.decode(z).sample  # clamped to [-1, 1]
        return _to_unit(video)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B, T, 3, H, W] video in [0, 1] (T = 4k+1, H, W multiples of 8) -> [B, F, 16, h, w] normalised
        latents (the posterior mean, as Wan encodes)."""
        if video.ndim != 5 or video.shape[2] != 3:
            raise ValueError(f"video must be [B, T, 3, H, W], got {tuple(video.shape)}")
        T, H, W = video.shape[1], video.shape[3], video.shape[4]
        if (T - 1) % self.temporal_factor or H % self.spatial_factor or W % self.spatial_factor:
            raise ValueError(
                f"video [T={T}, H={H}, W={W}] needs T = {self.temporal_factor}k+1 and H, W multiples of "
                f"{self.spatial_factor}"
            )
        x = (video.to(self.device, self.dtype) * 2 - 1).transpose(1, 2)
        mu = self.vae.encode(x).latent_dist.mode()  # [B, C, F, h, w]
        return self.normalize(mu.transpose(1, 2))

    # -- streaming ----------------------------------------------------------------------------------------

    def stream(self) -> StreamDecoder:
        """A fresh chunk-by-chunk decoder (one per video batch)."""
        return StreamDecoder(self)


class StreamDecoder:
    """Decodes a video's latents chunk by chunk, giving the same frames as WanVAE.decode on the whole.

        dec = vae.stream()
        for chunk in chunks:                    # [B, f, 16, h, w] each, in order
            frames = dec.decode_chunk(chunk)    # [B, n, 3, H, W]; n = 1 + 4(f-1) first, 4f later

    Holds per-conv feature caches of the last frames. reset() starts a new video."""

    def __init__(self, vae: WanVAE):
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

        self.wrapper = vae
        self._num_convs = sum(isinstance(m, WanCausalConv3d) for m in vae.vae.decoder.modules())
        self.reset()

    def reset(self) -> None:
        self._feat_cache: list = [None] * self._num_convs
        self._caches: list[torch.Tensor] | None = None  # the fast step's (fixed-shape) caches
        self.frames_done = 0  # latent frames decoded so far
        self._batch: int | None = None

    @torch.no_grad()
    def decode_chunk(self, latents: torch.Tensor) -> torch.Tensor:
        w = self.wrapper
        _check_latents(latents, w.z_dim)
        if self._batch is not None and latents.shape[0] != self._batch:
            raise ValueError(f"batch changed mid-video ({self._batch} -> {latents.shape[0]}); call reset()")
        self._batch = latents.shape[0]
        z = w.denormalize(latents.to(w.device)).transpose(1, 2).to(w.dtype)
        x = w.vae.post_quant_conv(z)  # 1x1x1 conv: no temporal context needed
        outs = []
        if w._step is not None:
            for i in range(x.shape[2]):
                xi = x[:, :, i : i + 1].clone(memory_format=w._step.fmt)  # fixed strides: no recompiles
                step = w._step if self._caches is None else w._step_compiled  # first frame: eager
                frames, self._caches = step(xi, self._caches)
                outs.append(frames)
                self.frames_done += 1
            return torch.cat(outs, dim=1)
        for i in range(x.shape[2]):  # diffusers' _decode loop, frame by frame, with our cache list
            first = self.frames_done == 0
            outs.append(
                w.vae.decoder(
                    x[:, :, i : i + 1], feat_cache=self._feat_cache, feat_idx=[0], first_chunk=first
                )
            )
            self.frames_done += 1
        out = torch.cat(outs, dim=2)
        if w.vae.config.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = unpatchify(out, patch_size=w.vae.config.patch_size)
        return _to_unit(out.clamp(-1.0, 1.0))


def _to_unit(video: torch.Tensor) -> torch.Tensor:
    """[B, 3, T, H, W] in [-1, 1] -> [B, T, 3, H, W] in [0, 1], float32."""
    return ((video.float() + 1.0) * 0.5).clamp(0.0, 1.0).transpose(1, 2).contiguous()


# -- the fixed-shape per-frame decoder step -----------------------------------------------------------------


class _DecoderStep(torch.nn.Module):
    """forward(x, caches) -> (frames [B, T, 3, H, W] float32 in [0, 1], new caches): one latent frame x
    [B, z_dim, 1, h, w] (after post_quant_conv, in the chosen layout) through the decoder of `vae`, whose
    weights it shares. caches=None starts a video (the first frame: temporal upsamples are skipped, as
    diffusers' "Rep"); the returned caches (one [B, C, 2, h, w] tensor per causal conv, in the chosen
    layout) feed the next frame."""

    def __init__(self, vae, memory_format: str):
        super().__init__()
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanUpBlock

        dec = vae.decoder
        cfg = vae.config
        if cfg.patch_size is not None or getattr(cfg, "is_residual", False):
            raise ValueError(
                "memory_format/compile: the fast decoder supports Wan2.1 VAEs only (no patch_size, is_residual=False)"
            )
        if not isinstance(dec.nonlinearity, torch.nn.SiLU) or not all(isinstance(b, WanUpBlock) for b in dec.up_blocks):
            raise ValueError("memory_format/compile: unsupported decoder (needs SiLU and WanUpBlock)")
        self.decoder = dec
        self.fmt = torch.channels_last_3d if memory_format == "channels_last_3d" else torch.contiguous_format
        for m in dec.modules():
            if isinstance(m, WanCausalConv3d):
                if m._padding[4] not in (0, 2) or m.stride != (1, 1, 1):
                    raise ValueError(f"memory_format/compile: unsupported causal conv {m}")
                m.weight.data = m.weight.data.contiguous(memory_format=self.fmt)
        # The resample layers' per-frame Conv2d as a (1, k, k) Conv3d over the 5-D tensor.
        for i, blk in enumerate(dec.up_blocks):
            if blk.upsamplers is not None:
                conv = blk.upsamplers[0].resample[1]
                w = conv.weight.detach().unsqueeze(2).contiguous(memory_format=self.fmt)
                self.register_buffer(f"resample_w{i}", w, persistent=False)

    def _f(self, t: torch.Tensor) -> torch.Tensor:
        return t.contiguous(memory_format=self.fmt)

    def _own(self, t: torch.Tensor) -> torch.Tensor:
        """A cache: its own storage with canonical strides (a view, or a size-1 batch's odd batch stride,
        would keep its base alive and change the strides that the compiled step guards on)."""
        return t.clone(memory_format=self.fmt)

    def _zeros(self, h: torch.Tensor, frames: int = 2) -> torch.Tensor:
        shape = (h.shape[0], h.shape[1], frames, h.shape[3], h.shape[4])
        return torch.empty(shape, dtype=h.dtype, device=h.device, memory_format=self.fmt).zero_()

    def forward(self, x: torch.Tensor, caches: list[torch.Tensor] | None):
        dec = self.decoder
        first = caches is None
        old = iter(() if first else caches)
        new: list[torch.Tensor] = []

        def causal(conv, h):
            """Causal conv of h with the 2 cached input frames before it (zeros before the video)."""
            if conv._padding[4] == 0:
                return F.conv3d(self._f(h), conv.weight, conv.bias)
            prev = self._zeros(h) if first else next(old)
            inp = self._f(torch.cat([prev, h], dim=2))
            new.append(self._own(inp[:, :, -2:]))
            return F.conv3d(inp, conv.weight, conv.bias, padding=(0, conv._padding[2], conv._padding[0]))

        def norm_act(norm, h):
            return F.silu(_rms(norm, h, dim=1))

        def resnet(blk, h):
            short = h if isinstance(blk.conv_shortcut, torch.nn.Identity) else causal(blk.conv_shortcut, h)
            h = causal(blk.conv1, norm_act(blk.norm1, h))
            h = causal(blk.conv2, norm_act(blk.norm2, h))  # dropout: identity in eval
            return h + short

        h = causal(dec.conv_in, x)
        h = resnet(dec.mid_block.resnets[0], h)
        for attn, blk in zip(dec.mid_block.attentions, dec.mid_block.resnets[1:]):
            if attn is not None:
                h = self._f(_attention(attn, h))
            h = resnet(blk, h)
        for i, up in enumerate(dec.up_blocks):
            for blk in up.resnets:
                h = resnet(blk, h)
            if up.upsamplers is None:
                continue
            rs = up.upsamplers[0]
            temporal = rs.mode == "upsample3d" and not first
            if rs.mode == "upsample3d" and first:  # diffusers' "Rep": no temporal upsample on frame 0,
                new.append(self._zeros(h))  # a zero history after it
            if temporal:  # time_conv doubles the channels; the two halves are the even and odd frames
                h = causal(rs.time_conv, h)
            h = _upsample(h, temporal, self.fmt == torch.channels_last_3d)
            conv = rs.resample[1]
            h = F.conv3d(self._f(h), getattr(self, f"resample_w{i}"), conv.bias, padding=(0, 1, 1))
        h = causal(dec.conv_out, norm_act(dec.norm_out, h))
        return _to_unit(h.clamp(-1.0, 1.0)), new


def _upsample(h: torch.Tensor, temporal: bool, channels_last: bool) -> torch.Tensor:
    """Nearest 2x upsample of H and W of h [B, C, T, H, W] (diffusers' nearest-exact at scale 2 picks pixel
    i // 2), in one copy that lands in the chosen layout. temporal: h is the time conv's [B, 2C, T, H, W]
    output, whose channel halves j = 0, 1 become frames 2t + j (diffusers' reshape + stack)."""
    B, JC, T, H, W = h.shape
    J = 2 if temporal else 1
    C = JC // J
    if channels_last:  # on the [B, T, H, W, C] view of an NDHWC tensor: [B, T, J, H, W, C]
        t = h.permute(0, 2, 3, 4, 1).unflatten(-1, (J, C)).permute(0, 1, 4, 2, 3, 5)
        t = t[:, :, :, :, None, :, None, :].expand(B, T, J, H, 2, W, 2, C)
        return t.reshape(B, T * J, 2 * H, 2 * W, C).permute(0, 4, 1, 2, 3)
    t = h.unflatten(1, (J, C)).permute(0, 2, 3, 1, 4, 5)  # [B, C, T, J, H, W]
    t = t[..., None, :, None].expand(B, C, T, J, H, 2, W, 2)
    return t.reshape(B, C, T * J, 2 * H, 2 * W)


def _rms(norm, x: torch.Tensor, dim: int) -> torch.Tensor:
    """diffusers' WanRMS_norm: L2-normalise over channels (in float32 for low precision) times
    sqrt(C) * gamma (+ bias). The scale is applied in float32 before the one rounding to x's dtype
    (diffusers rounds three times: after normalising, after * sqrt(C), after * gamma)."""
    low = x.dtype in (torch.float16, torch.bfloat16)
    gamma, bias = norm.gamma.float() * norm.scale, norm.bias
    if dim == -1:  # channels last: gamma [C, 1, ...] -> [C]
        gamma = gamma.flatten()
        bias = bias.flatten() if isinstance(bias, torch.Tensor) else bias
    n = (F.normalize(x.float() if low else x, dim=dim) * gamma).to(x.dtype)
    return n + bias if isinstance(bias, torch.Tensor) else n  # diffusers' default bias=False is 0.0


def _attention(attn, x: torch.Tensor) -> torch.Tensor:
    """diffusers' WanAttentionBlock (single-head self-attention within each frame, 1x1 convs as linears),
    computed on [B*T, H*W, C] tokens: a view of a channels_last_3d x."""
    B, C, T, H, W = x.shape
    t = x.permute(0, 2, 3, 4, 1).reshape(B * T, H * W, C)
    qkv = F.linear(_rms(attn.norm, t, dim=-1), attn.to_qkv.weight.flatten(1), attn.to_qkv.bias)
    q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)
    o = F.scaled_dot_product_attention(q, k, v).squeeze(1)
    o = F.linear(o, attn.proj.weight.flatten(1), attn.proj.bias)
    return o.view(B, T, H, W, C).permute(0, 4, 1, 2, 3) + x
