"""Loading a complete generator (DiT + optional adapters, text encoder, VAE) for sampling and evaluation,
and decoding a streamed video chunk by chunk as it is generated."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import torch

from . import adapters
from .model.config import get_preset
from .model.kv_cache import CrossKV
from .model.wan import CausalWanModel
from .sampler import FewStepSchedule, StreamingSampler


@dataclasses.dataclass
class Generator:
    model: CausalWanModel
    sampler: StreamingSampler
    text_encoder: object
    vae: object

    @torch.no_grad()
    def cross(self, prompts: list[str]) -> CrossKV:
        emb = self.text_encoder.encode(prompts).to(self.model.device, self.model.dtype)
        return self.model.encode_text(emb)

    @torch.no_grad()
    def stream_video(self, prompts: list[str], *, num_chunks: int, latent_hw: tuple[int, int], samples=None) -> Iterator[torch.Tensor]:
        """Yield decoded frames [B, n, 3, H, W] in [0, 1] chunk by chunk. On CUDA the decode of chunk c
        runs on a side stream while chunk c+1 is generated (the VAE is causal in time: its streaming decoder
        keeps the temporal feature cache)."""
        cross = self.cross(prompts)
        dec = self.vae.stream()
        dev = self.model.device
        side = torch.cuda.Stream(dev) if dev.type == "cuda" else None
        pending = None
        for _, x0 in self.sampler.stream(cross, num_chunks=num_chunks, latent_hw=latent_hw, samples=samples):
            if side is None:
                yield dec.decode_chunk(x0)
                continue
            ready = torch.cuda.Event()
            ready.record()
            x0.record_stream(side)
            if pending is not None:
                yield pending()
            with torch.cuda.stream(side):
                side.wait_event(ready)
                frames = dec.decode_chunk(x0)
            done = torch.cuda.Event()
            done.record(side)

            def pending(frames=frames, done=done):
                torch.cuda.current_stream().wait_event(done)
                return frames

        if pending is not None:
            yield pending()


def load_generator(
    *,
    checkpoint: str | None = None,
    preset: str = "tiny",
    text_encoder: str | None = None,
    vae: str | None = None,
    adapters_spec: list[tuple[str, float]] = (),
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    schedule: FewStepSchedule | None = None,
    ema: bool | None = None,
    assets_dir: str = "~/.cache/arcopo_fast/tiny_assets",
    embed_cache_dir: str | None = None,
    vae_memory_format: str = "contiguous",
    vae_compile: bool | str = False,
    compile: str | None = None,
) -> Generator:
    """checkpoint: any supported weights format, or a run directory's base_model.safetensors; None = the
    random `preset` model seeded with `seed` (what `train` uses for a random base). adapters_spec: (peft
    adapter folder, scale) pairs, added as W0 + sum scale * dW. vae_memory_format / vae_compile: the VAE
    decoder's speed options (arcopo_fast.model.vae.WanVAE); compile: the DiT forward's
    torch.compile mode (StreamingSampler)."""
    from .model.text_encoder import TextEncoder
    from .model.vae import WanVAE

    device = torch.device(device)
    if checkpoint:
        model = load_base_model(checkpoint, device=device, dtype=dtype, ema=ema)
    else:
        torch.manual_seed(seed)
        model = CausalWanModel(get_preset(preset)).to(device=device, dtype=dtype)
    model.requires_grad_(False).eval()
    for i, (path, scale) in enumerate(adapters_spec):
        name = f"a{i}"
        adapters.load_adapter(model, name, path)
        for layer in adapters.lora_layers(model):
            if name in layer.lora_A:
                layer.set_scale(name, scale)
    if adapters_spec:
        for layer in adapters.lora_layers(model):
            layer.set_adapter([f"a{i}" for i in range(len(adapters_spec)) if f"a{i}" in layer.lora_A])
    if text_encoder is None or vae is None:
        if model.cfg.text_dim != get_preset("tiny").text_dim:
            raise ValueError("give --text-encoder and --vae for a non-tiny model (no weights can be downloaded)")
        from .model.tiny_assets import ensure_tiny_assets

        assets = ensure_tiny_assets(Path(assets_dir).expanduser())
        text_encoder = text_encoder or assets["text_encoder"]
        vae = vae or assets["vae"]
    cdt = dtype if device.type == "cuda" else torch.float32
    te = TextEncoder(text_encoder, text_len=model.cfg.text_len, device=device, dtype=cdt, out_dtype=dtype,
                     cache_dir=None if embed_cache_dir is None else Path(embed_cache_dir).expanduser())
    return Generator(model, StreamingSampler(model, schedule, seed=seed, compile=compile), te, WanVAE(vae, device=device, dtype=cdt, memory_format=vae_memory_format, compile=vae_compile))


def load_base_model(path: str, *, device, dtype, ema=None) -> CausalWanModel:
    """Any supported checkpoint format, including a run's base_model.safetensors (+ its JSON config)."""
    from .model.checkpoint import load_model

    return load_model(Path(path).expanduser(), device=device, dtype=dtype, ema=ema)
