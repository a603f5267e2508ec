"""The Wan2.1 VAE (diffusers AutoencoderKLWan) with Wan's latent normalisation and a streaming decoder.

Layouts: latents [B, F, 16, h, w] (the DiT's layout, normalised); videos [B, T, 3, H, W] in [0, 1] with
T = 4(F - 1) + 1, H = 8h, W = 8w.

Normalisation (Wan): the DiT's latents are z_norm = (mu - mean) / std with the per-channel latents_mean /
latents_std of the VAE config; decoding undoes it (z = z_norm * std + mean).

Streaming: the VAE is causal in time. diffusers' _decode runs the decoder one latent frame at a time,
carrying per-conv feature caches (the last 2 frames of each causal conv's input, "Rep" for the first
temporal upsample). StreamDecoder runs exactly that loop with its own cache list, so decoding chunk by
chunk yields the frames of the whole-video decode: the first latent frame gives 1 video frame, every later
one gives 4.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["StreamDecoder", "WanVAE"]


def _check_latents(z: torch.Tensor, z_dim: int) -> None:
    if z.ndim != 5 or z.shape[2] != z_dim:
        raise ValueError(f"latents must be [B, F, {z_dim}, h, w], got {tuple(z.shape)}")


class WanVAE:
    """Wrapper of a diffusers AutoencoderKLWan (a local folder, a pipeline root with vae/, or a module).

    decode(latents) -> video in [0, 1]; encode(video) -> normalised latents (posterior mean, as Wan);
    stream(batch) -> a StreamDecoder for chunk-by-chunk decoding. Computation runs in `dtype` (bf16 is
    fine on GPU); outputs are float32."""

    def __init__(self, source, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
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
        self.vae = vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
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

    Holds per-conv feature caches of the last frames (a few MB at 480p). reset() starts a new video."""

    def __init__(self, vae: WanVAE):
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

        self.wrapper = vae
        self._num_convs = sum(isinstance(m, WanCausalConv3d) for m in vae.vae.decoder.modules())
        self.reset()

    def reset(self) -> None:
        self._feat_cache: list = [None] * self._num_convs
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
