"""StreamingPipeline: the streaming few-step sampler behind a diffusers-style pipeline, for other projects.

    from arcopo_fast import StreamingPipeline
    pipe = StreamingPipeline.from_diffusers(wan_pipe)                      # a diffusers WanPipeline
    pipe = StreamingPipeline.from_self_forcing("self_forcing_dmd.pt", "wan_models/Wan2.1-T2V-1.3B")
    pipe = StreamingPipeline.from_pretrained("tiny")                       # the embedded tiny model
    pipe = StreamingPipeline.from_pretrained("toy")                        # the toy world's generator
    frames = pipe("a red balloon over a lake", height=480, width=832, num_frames=81).frames
    for chunk in pipe.stream("a red balloon over a lake"):                 # [B, n, 3, H, W] per chunk
        show(chunk)

Sizes are in PIXELS, as in diffusers: height and width multiples of 16 (the VAE's 8x downsampling times
the DiT's 2x2 patch), num_frames = 4 * (3c - 1) + 1 for c chunks of 3 latent frames (9, 21, ..., 81).
Noise: row b of a call draws its noise with id seeds[b] (default seed + b), so a prompt with a given seed
gives the same video alone or in any batch.

Parts: the causal DiT (model/wan.py) in a StreamingSampler (sampler.py), a TextEncoder (umT5,
model/text_encoder.py) and a WanVAE (model/vae.py), whose streaming decoder turns each chunk into frames as
it arrives; on CUDA the decode of chunk c runs on a side stream while chunk c + 1 is generated.
load_generator (the sample/evaluate CLIs' loader of arcopo_fast's own files) returns the same class.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from . import adapters
from .model.config import ModelConfig, get_preset
from .model.kv_cache import CrossKV
from .model.wan import CausalWanModel
from .sampler import FewStepSchedule, StreamingSampler

__all__ = ["OUTPUT_TYPES", "TOY_VIDEO_SIZE", "StreamingPipeline", "StreamingPipelineOutput", "default_video_size", "load_generator"]

OUTPUT_TYPES = ("pt", "np", "pil", "latent")
"""pt: float32 tensor [B, T, 3, H, W] in [0, 1]; np: float32 array [B, T, H, W, 3] in [0, 1] (diffusers'
"np"); pil: a list of B lists of T PIL images; latent: the DiT's latents [B, F, 16, h, w] (normalised, not
decoded; WanVAE.decode turns them into frames)."""


@dataclasses.dataclass
class StreamingPipelineOutput:
    frames: object
    """The videos in the requested output_type (see OUTPUT_TYPES)."""


def default_video_size(cfg: ModelConfig) -> tuple[int, int, int]:
    """(height, width, num_frames) in pixels that suit a model: Wan's 480 x 832 x 81 for the 1.3B-class
    models, 64 x 64 x 81 for the tiny ones (seconds on a CPU). A pipeline's own `default_size` may differ
    (the toy world's: its 64 x 64 x 33 clips)."""
    return (480, 832, 81) if cfg.dim >= 1024 else (64, 64, 81)


TOY_VIDEO_SIZE = (64, 64, 33)
"""The toy world's clips (arcopo_fast.toy.world): 3 chunks of 64 x 64 pixels, what its generator learned."""


def _device(device) -> torch.device:
    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


def _dtype(dtype, device: torch.device) -> torch.dtype:
    return dtype if dtype is not None else (torch.bfloat16 if device.type == "cuda" else torch.float32)


class StreamingPipeline:
    """A streaming text-to-video pipeline. Build it with from_pretrained / from_diffusers /
    from_self_forcing (or load_generator); call it, or stream() it.

    Attributes: model (CausalWanModel), sampler (StreamingSampler), text_encoder (TextEncoder), vae
    (WanVAE), default_size ((height, width, num_frames) that suit the model, what the CLIs generate without
    size options). noise_seed: the sampler's noise-plan seed (every call's per-row seeds are noise ids under it).
    """

    def __init__(
        self,
        model: CausalWanModel,
        text_encoder,
        vae,
        *,
        schedule: FewStepSchedule | None = None,
        noise_seed: int = 0,
        compile: str | None = None,
    ):
        self.model = model.requires_grad_(False).eval()
        self.sampler = StreamingSampler(model, schedule, seed=noise_seed, compile=compile)
        self.text_encoder, self.vae = text_encoder, vae
        self.default_size = default_video_size(model.cfg)
        self._progress_bar_config: dict = {}
        self._lora_scales: dict[str, float] = {}

    # -- constructors ------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path_or_preset: str | Path,
        *,
        checkpoint: str | Path | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        compile: str | None = None,
        text_encoder: str | Path | None = None,
        vae=None,
        ema: bool | None = None,
        schedule: FewStepSchedule | None = None,
    ) -> StreamingPipeline:
        """From "tiny" (the embedded tiny model: a random tiny DiT, seed 0, with the tiny text encoder and
        VAE built on first use under ~/.cache/arcopo_fast), "toy" (the toy world's shipped generator, text
        encoder and VAE, sampled with the few-step schedule it was trained with: `--preset toy`'s), a folder in diffusers' WanPipeline layout
        (transformer/, text_encoder/, tokenizer/, vae/), or Wan's own release folder
        (Wan2.1-T2V-1.3B/: see from_self_forcing).

        checkpoint: DiT weights that replace the folder's (any format: a Self-Forcing .pt, Wan names,
        diffusers, a save_model file); ema picks a Self-Forcing .pt's generator_ema (default) or generator.
        text_encoder / vae: components that replace the folder's (folders, or for vae an AutoencoderKLWan),
        as diffusers' from_pretrained takes them by keyword. device default: CUDA when available; dtype
        default: bfloat16 on CUDA, float32 on CPU (the text encoder and VAE run in float32 on CPU).
        compile: a torch.compile mode for the DiT (StreamingSampler). schedule: the few-step schedule
        (default: Self-Forcing's 4 steps, shift 5)."""
        dev = _device(device)
        dt = _dtype(dtype, dev)
        if str(path_or_preset) == "tiny":
            from .model.tiny_assets import ensure_tiny_assets

            assets = ensure_tiny_assets()
            if checkpoint is not None:
                model = _load_dit(checkpoint, dev, dt, ema)
            else:
                model = _random_model("tiny", seed=0, device=dev, dtype=dt)
            return cls._assemble(model, text_encoder or assets["text_encoder"], vae or assets["vae"], dev, dt,
                                 compile=compile, schedule=schedule)
        if str(path_or_preset) == "toy":
            from .toy.assets import WEIGHTS_DIR, read_manifest

            model = _load_dit(checkpoint or WEIGHTS_DIR / "base_model.safetensors", dev, dt, ema)
            pipe = cls._assemble(model, text_encoder or WEIGHTS_DIR / "text_encoder",
                                 vae if vae is not None else WEIGHTS_DIR / "vae", dev, dt, compile=compile,
                                 schedule=schedule or FewStepSchedule(shift=read_manifest()["sampler"]["shift"]))
            pipe.default_size = TOY_VIDEO_SIZE
            return pipe
        path = Path(path_or_preset).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"path_or_preset: {path} is not a folder (give a diffusers WanPipeline folder, Wan's release "
                f"folder, or the name 'tiny' or 'toy')")
        from .model.wan_original import VAE_FILE

        if (path / VAE_FILE).is_file() and not (path / "vae").is_dir():
            return cls.from_self_forcing(checkpoint, path, ema=ema, device=dev, dtype=dt, compile=compile,
                                         schedule=schedule)
        needed = {"transformer": checkpoint is None, "text_encoder": text_encoder is None,
                  "tokenizer": text_encoder is None, "vae": vae is None}  # the parts not given by keyword
        missing = [d for d, need in needed.items() if need and not (path / d).is_dir()]
        if missing:
            raise FileNotFoundError(f"{path} is not in diffusers' WanPipeline layout: it lacks {missing}")
        model = _load_dit(checkpoint or path, dev, dt, ema)
        return cls._assemble(model, text_encoder or path, vae if vae is not None else path, dev, dt, compile=compile,
                             schedule=schedule)

    @classmethod
    def from_diffusers(
        cls,
        pipe,
        *,
        checkpoint: str | Path | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        compile: str | None = None,
        ema: bool | None = None,
        schedule: FewStepSchedule | None = None,
    ) -> StreamingPipeline:
        """From an in-memory diffusers WanPipeline: its transformer is converted once into the causal DiT
        (or replaced by `checkpoint`); its text encoder, tokenizer and VAE are used as they are, not copied
        (moved to `device` when one is given). device / dtype default: the transformer's."""
        parts = {n: getattr(pipe, n, None) for n in ("transformer", "text_encoder", "tokenizer", "vae")}
        if any(v is None for v in parts.values()):
            raise TypeError(f"pipe must be a diffusers WanPipeline with transformer, text_encoder, tokenizer and vae; "
                            f"{[n for n, v in parts.items() if v is None]} missing")
        if getattr(pipe, "transformer_2", None) is not None:
            raise ValueError("pipe has a second transformer (Wan2.2's two experts): not supported")
        tr = parts["transformer"]
        dev = torch.device(device) if device is not None else tr.device
        dt = dtype if dtype is not None else tr.dtype
        if checkpoint is not None:
            model = _load_dit(checkpoint, dev, dt, ema)
        else:
            from .model.checkpoint import config_from_diffusers, model_from_state_dict

            model = model_from_state_dict(tr.state_dict(), config_from_diffusers(tr.config), device=dev, dtype=dt,
                                          source="pipe.transformer")
        te = parts["text_encoder"]
        if device is not None:
            te.to(dev)
        from .model.text_encoder import TextEncoder

        text = TextEncoder.from_modules(te, parts["tokenizer"], text_len=model.cfg.text_len, out_dtype=dt)
        return cls._assemble(model, text, parts["vae"], dev, dt, compile=compile, schedule=schedule,
                             vae_dtype=parts["vae"].dtype)

    @classmethod
    def from_self_forcing(
        cls,
        checkpoint: str | Path | None,
        wan_dir: str | Path,
        *,
        ema: bool | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        compile: str | None = None,
        schedule: FewStepSchedule | None = None,
    ) -> StreamingPipeline:
        """From Self-Forcing's layout: `checkpoint` (e.g. checkpoints/self_forcing_dmd.pt; generator_ema by
        default, ema=False for generator; None: the Wan DiT of wan_dir itself) and `wan_dir`
        (wan_models/Wan2.1-T2V-1.3B/) holding Wan's original files: models_t5_umt5-xxl-enc-bf16.pth (umT5),
        google/umt5-xxl/ (its tokenizer) and Wan2.1_VAE.pth, read into transformers' UMT5EncoderModel and
        diffusers' AutoencoderKLWan by model/wan_original.py (strict: missing / unexpected keys are listed)."""
        from transformers import AutoTokenizer

        from .model.text_encoder import TextEncoder
        from .model.wan_original import (
            UMT5_FILE,
            UMT5_TOKENIZER_DIR,
            VAE_FILE,
            load_umt5_encoder,
            load_wan_vae,
        )

        wan_dir = Path(wan_dir).expanduser()
        need = {"umT5 encoder": wan_dir / UMT5_FILE, "umT5 tokenizer": wan_dir / UMT5_TOKENIZER_DIR, "VAE": wan_dir / VAE_FILE}
        absent = [f"{what} ({p})" for what, p in need.items() if not p.exists()]
        if absent:
            raise FileNotFoundError(f"wan_dir {wan_dir} lacks Wan's original files: {', '.join(absent)}")
        dev = _device(device)
        dt = _dtype(dtype, dev)
        cdt = dt if dev.type == "cuda" else torch.float32
        model = _load_dit(checkpoint if checkpoint is not None else wan_dir, dev, dt, ema)
        encoder = load_umt5_encoder(need["umT5 encoder"], dtype=cdt, device=dev)
        tokenizer = AutoTokenizer.from_pretrained(str(need["umT5 tokenizer"]), local_files_only=True)
        text = TextEncoder.from_modules(encoder, tokenizer, text_len=model.cfg.text_len, out_dtype=dt)
        vae = load_wan_vae(need["VAE"], dtype=cdt, device=dev)
        return cls._assemble(model, text, vae, dev, dt, compile=compile, schedule=schedule)

    @classmethod
    def _assemble(cls, model, text_encoder, vae, device, dtype, *, compile=None, schedule=None, noise_seed=0,
                  vae_dtype=None, embed_cache_dir=None, vae_memory_format="auto", vae_compile=False):
        from .model.text_encoder import TextEncoder
        from .model.vae import WanVAE

        cdt = dtype if device.type == "cuda" else torch.float32  # text encoder / VAE compute dtype
        if not isinstance(text_encoder, TextEncoder):
            text_encoder = TextEncoder(text_encoder, text_len=model.cfg.text_len, device=device, dtype=cdt,
                                       out_dtype=dtype, cache_dir=embed_cache_dir)
        if text_encoder.dim != model.cfg.text_dim:
            raise ValueError(f"the text encoder's width ({text_encoder.dim}) differs from the DiT's text_dim "
                             f"({model.cfg.text_dim})")
        vae = WanVAE(vae, device=device, dtype=vae_dtype or cdt, memory_format=vae_memory_format, compile=vae_compile)
        if vae.z_dim != model.cfg.in_channels:
            raise ValueError(f"the VAE's z_dim ({vae.z_dim}) differs from the DiT's in_channels ({model.cfg.in_channels})")
        return cls(model, text_encoder, vae, schedule=schedule, noise_seed=noise_seed, compile=compile)

    # -- diffusers-style settings ------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def to(self, device: torch.device | str) -> StreamingPipeline:
        """Move every part to `device` (in place; returns self)."""
        device = torch.device(device)
        self.model.to(device)
        self.text_encoder.to(device)
        self.vae.to(device)
        self.sampler.release_caches()
        return self

    def set_progress_bar_config(self, **kwargs) -> None:
        """tqdm options of the per-chunk progress bar (disable=True silences it), as in diffusers."""
        self._progress_bar_config = dict(kwargs)

    def load_lora_weights(self, path: str | Path, scale: float = 1.0, adapter_name: str | None = None) -> str:
        """Add a LoRA adapter (a peft adapter folder as arcopo_fast saves it, a training checkpoint or a run
        directory) at `scale`: W = W0 + sum over loaded adapters of scale * dW. Returns its name."""
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite number, got {scale!r}")
        name = adapter_name or f"lora{len(self._lora_scales)}"
        if name in self._lora_scales:
            raise ValueError(f"adapter_name {name!r} is already loaded; unload_lora_weights() first")
        adapters.load_adapter(self.model, name, adapters.resolve_adapter_dir(path))
        self._lora_scales[name] = float(scale)
        adapters.activate(self.model, self._lora_scales)
        return name

    def unload_lora_weights(self) -> None:
        """Remove every LoRA adapter: the DiT is the base model again, exactly."""
        adapters.remove_lora(self.model)
        self._lora_scales = {}

    # -- generation --------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        *,
        height: int = 480,
        width: int = 832,
        num_frames: int = 81,
        seed: int = 0,
        seeds: Sequence[int] | None = None,
        output_type: str = "pt",
        return_dict: bool = True,
    ):
        """Generate one video per prompt. Returns StreamingPipelineOutput(frames) (or (frames,) when
        return_dict=False), frames in `output_type` (OUTPUT_TYPES)."""
        _check_output_type(output_type)
        kind = "latent" if output_type == "latent" else "pt"  # chunks are joined as tensors, converted once
        chunks = self.stream(prompt, height=height, width=width, num_frames=num_frames, seed=seed, seeds=seeds,
                             output_type=kind)
        frames = torch.cat(list(chunks), dim=1)
        if kind == "pt":
            frames = _convert(frames, output_type)
        return StreamingPipelineOutput(frames) if return_dict else (frames,)

    @torch.no_grad()
    def stream(
        self,
        prompt: str | Sequence[str],
        *,
        height: int = 480,
        width: int = 832,
        num_frames: int = 81,
        seed: int = 0,
        seeds: Sequence[int] | None = None,
        output_type: str = "pt",
    ) -> Iterator:
        """Yield each chunk's frames as soon as they are decoded (the first chunk: 9 frames, later ones:
        12), in `output_type`; concatenated along time they are __call__'s frames. The arguments are
        checked before any work starts."""
        _check_output_type(output_type)
        prompts, latent_hw, num_chunks, samples = self.check_inputs(prompt, height, width, num_frames, seed, seeds)
        return self._stream(prompts, latent_hw, num_chunks, samples, output_type)

    @torch.no_grad()
    def _stream(self, prompts, latent_hw, num_chunks, samples, output_type):
        from tqdm.auto import tqdm

        options = {"desc": "chunks", "unit": "chunk", **self._progress_bar_config}
        with tqdm(total=num_chunks, **options) as bar:
            if output_type == "latent":
                cross = self.cross(prompts)
                for _, x0 in self.sampler.stream(cross, num_chunks=num_chunks, latent_hw=latent_hw, samples=samples):
                    bar.update(1)
                    yield x0
                return
            for frames in self.stream_video(prompts, num_chunks=num_chunks, latent_hw=latent_hw, samples=samples):
                bar.update(1)
                yield _convert(frames, output_type)

    def check_inputs(self, prompt, height, width, num_frames, seed=0, seeds=None):
        """Validate a call's arguments: (prompts, latent (h, w), number of chunks, noise ids). Errors name
        the argument, the rule and the nearest valid values."""
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
        else:
            raise TypeError(f"prompt must be a string or a non-empty list of strings, got {type(prompt).__name__}"
                            + (f" {prompt!r}"[:80] if isinstance(prompt, (list, tuple)) else ""))
        cfg = self.model.cfg
        multiple = self.vae.spatial_factor * cfg.patch_size[1]
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int (pixels), got {type(value).__name__}")
            if value <= 0 or value % multiple:
                lo = value // multiple * multiple
                near = " or ".join(str(n) for n in (lo, lo + multiple) if n > 0)
                raise ValueError(f"{name} must be a positive multiple of {multiple} pixels (the VAE's "
                                 f"{self.vae.spatial_factor}x times the {cfg.patch_size[1]}x patch), got {value}; "
                                 f"nearest valid: {near}")
        if not isinstance(num_frames, int) or isinstance(num_frames, bool):
            raise TypeError(f"num_frames must be an int, got {type(num_frames).__name__}")
        tf, cf = self.vae.temporal_factor, cfg.chunk_frames
        per_chunk = tf * cf  # video frames per chunk after the first one's leading frame
        if num_frames < 1 or (num_frames - 1 + tf) % per_chunk:
            c = (num_frames - 1 + tf) // per_chunk  # whole chunks below num_frames
            near = [tf * (cf * n - 1) + 1 for n in (c, c + 1) if n >= 1]
            raise ValueError(f"num_frames must be {tf} * ({cf} * chunks - 1) + 1 (whole chunks of {cf} latent frames: "
                             f"{', '.join(str(tf * (cf * n - 1) + 1) for n in range(1, 5))}, ...), got {num_frames}; "
                             f"nearest valid: {' or '.join(map(str, near))}")
        num_chunks = (num_frames - 1 + tf) // per_chunk
        if seeds is None:
            if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
                raise ValueError(f"seed must be a non-negative int, got {seed!r}")
            seeds = [seed + b for b in range(len(prompts))]
        seeds = list(seeds)
        if len(seeds) != len(prompts) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
            raise ValueError(f"seeds must hold one non-negative int per prompt ({len(prompts)}), got {seeds!r}")
        sf = self.vae.spatial_factor
        return prompts, (height // sf, width // sf), num_chunks, torch.tensor(seeds, dtype=torch.int64)

    # -- lower-level pieces (latent units; the trainer's and the CLIs' building blocks) ----------------

    @torch.no_grad()
    def cross(self, prompts: list[str]) -> CrossKV:
        """The prompts' cross-attention K/V (text encoder, then the DiT's text projection)."""
        emb = self.text_encoder.encode(prompts).to(self.model.device, self.model.dtype)
        return self.model.encode_text(emb)

    @torch.no_grad()
    def stream_video(self, prompts: list[str], *, num_chunks: int, latent_hw: tuple[int, int], samples=None) -> Iterator[torch.Tensor]:
        """Yield decoded frames [B, n, 3, H, W] in [0, 1] chunk by chunk (latent_hw in latent units). On
        CUDA the decode of chunk c runs on a side stream while chunk c+1 is generated (the VAE is causal in
        time: its streaming decoder keeps the temporal feature cache)."""
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


def _check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")


def _convert(frames: torch.Tensor, output_type: str):
    """[B, T, 3, H, W] float in [0, 1] -> output_type."""
    if output_type == "pt":
        return frames
    arr = frames.permute(0, 1, 3, 4, 2).float().cpu().numpy()  # [B, T, H, W, 3]
    if output_type == "np":
        return arr
    from PIL import Image

    u8 = (arr.clip(0, 1) * 255).round().astype("uint8")
    return [[Image.fromarray(f) for f in video] for video in u8]


def _random_model(preset: str, *, seed: int, device, dtype) -> CausalWanModel:
    torch.manual_seed(seed)
    return CausalWanModel(get_preset(preset)).to(device=device, dtype=dtype)


def _load_dit(path, device, dtype, ema) -> CausalWanModel:
    from .model.checkpoint import load_model

    return load_model(Path(path).expanduser(), device=device, dtype=dtype, ema=ema)


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
    assets_dir: str | None = None,
    embed_cache_dir: str | None = None,
    vae_memory_format: str = "auto",
    vae_compile: bool | str = False,
    compile: str | None = None,
    allow_random_init: bool = False,
) -> StreamingPipeline:
    """A StreamingPipeline from arcopo_fast's own files (what the trainer writes and the CLIs read).

    checkpoint: any supported weights format, or a run directory's base_model.safetensors; None = the
    random `preset` model seeded with `seed` (what `train` uses for a random base); `seed` is also the noise
    plan's seed. adapters_spec: (peft adapter folder, scale) pairs, added as W0 + sum scale * dW.
    text_encoder / vae: local folders (default: the tiny assets, for a tiny-width model only).
    vae_memory_format / vae_compile: the VAE decoder's speed options (arcopo_fast.model.vae.WanVAE);
    compile: the DiT forward's torch.compile mode (StreamingSampler). allow_random_init: a real-size preset
    (config.REAL_SIZE_PRESETS) without a checkpoint is refused unless True (its videos would be noise)."""
    from .config import REAL_SIZE_PRESETS

    device = torch.device(device)
    if checkpoint:
        model = _load_dit(checkpoint, device, dtype, ema)
    else:
        if preset in REAL_SIZE_PRESETS and not allow_random_init:
            raise ValueError(f"preset {preset!r} without a checkpoint would sample from random weights: give "
                             "--checkpoint (or --model), or --allow-random-init to do it on purpose")
        model = _random_model(preset, seed=seed, device=device, dtype=dtype)
    if text_encoder is None or vae is None:
        tiny, cfg = get_preset("tiny"), model.cfg
        if (cfg.text_dim, cfg.text_len) != (tiny.text_dim, tiny.text_len):  # the toy model's fit, but it is not theirs
            raise ValueError(
                f"the tiny text encoder and VAE (the default) belong to the tiny model only; this one (dim {cfg.dim}, "
                f"text_dim {cfg.text_dim}, text_len {cfg.text_len}) needs its own: give --text-encoder and --vae "
                "(for the toy world's model or a merge of it: --model toy [--checkpoint ...]); nothing is downloaded")
        from .model.tiny_assets import ensure_tiny_assets

        assets = ensure_tiny_assets(Path(assets_dir).expanduser() if assets_dir else None)
        text_encoder = text_encoder or assets["text_encoder"]
        vae = vae or assets["vae"]
    pipe = StreamingPipeline._assemble(
        model, text_encoder, vae, device, dtype, compile=compile, schedule=schedule, noise_seed=seed,
        embed_cache_dir=None if embed_cache_dir is None else Path(embed_cache_dir).expanduser(),
        vae_memory_format=vae_memory_format, vae_compile=vae_compile,
    )
    for i, (path, scale) in enumerate(adapters_spec):
        pipe.load_lora_weights(path, scale=scale, adapter_name=f"a{i}")
    return pipe

