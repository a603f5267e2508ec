"""Generate a video with the streaming sampler and write an mp4.

    python -m arcopo_fast.sample --prompt "a red balloon over a lake" --out video.mp4       # tiny, CPU
    python -m arcopo_fast.sample --preset wan-1.3b --checkpoint self_forcing_dmd.pt \\
        --text-encoder wan_models/umt5-xxl --vae wan_models/vae --num-chunks 7 --device cuda --out sf.mp4
    python -m arcopo_fast.sample --checkpoint runs/tiny/base_model.safetensors \\
        --adapter runs/tiny/checkpoints/iter_000060/adapter --out tuned.mp4

Chunks are decoded as they arrive (on CUDA, overlapped with the next chunk's generation).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch
from tqdm import tqdm

from . import log as log_setup
from .model.vae import COMPILE_MODES as VAE_COMPILE_MODES
from .model.vae import MEMORY_FORMATS
from .profiling import maybe_profile
from .sampler import COMPILE_MODES

logger = logging.getLogger(__name__)


def parse_adapter(text: str) -> tuple[str, float]:
    """'path' or 'path:scale' (scale default 1.0)."""
    path, sep, scale = text.rpartition(":")
    try:
        return (path, float(scale)) if sep else (text, 1.0)
    except ValueError:
        return text, 1.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m arcopo_fast.sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", required=True, action="append", help="text prompt (repeat for a batch)")
    ap.add_argument("--out", default="video.mp4", help="output mp4 (a batch writes out_0.mp4, out_1.mp4, ...)")
    ap.add_argument("--preset", default="tiny", help="architecture when no checkpoint is given (tiny, wan-1.3b)")
    ap.add_argument("--checkpoint", help="DiT weights (Self-Forcing .pt, Wan2.1 .safetensors/.pth, diffusers folder)")
    ap.add_argument("--no-ema", action="store_true", help="Self-Forcing .pt: use 'generator' instead of 'generator_ema'")
    ap.add_argument("--adapter", action="append", default=[], help="LoRA adapter folder[:scale] (repeatable: merged sum)")
    ap.add_argument("--text-encoder", help="local umT5 encoder + tokenizer folder (default: tiny random)")
    ap.add_argument("--vae", help="local AutoencoderKLWan folder (default: tiny random)")
    ap.add_argument("--seed", type=int, default=0, help="noise seed (and the random tiny model's seed)")
    ap.add_argument("--num-chunks", type=int, default=7, help="chunks of 3 latent frames (7 -> 81 frames)")
    ap.add_argument("--height", type=int, default=None, help="latent height (default 60 for wan-1.3b, 8 for tiny)")
    ap.add_argument("--width", type=int, default=None, help="latent width (default 104 for wan-1.3b, 8 for tiny)")
    ap.add_argument("--shift", type=float, default=5.0, help="timestep shift (Self-Forcing's demo uses 8)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: bfloat16 on CUDA")
    ap.add_argument("--fps", type=float, default=16.0)
    ap.add_argument("--compile", choices=[m for m in COMPILE_MODES if m], help="torch.compile mode of the DiT "
                    "forward ('reduce-overhead' adds CUDA graphs); the first video pays the compilation")
    ap.add_argument("--vae-memory-format", default="contiguous", choices=list(MEMORY_FORMATS),
                    help="VAE decoder layout (channels_last_3d: cuDNN's NDHWC convolutions)")
    ap.add_argument("--vae-compile", default=None, choices=[m for m in VAE_COMPILE_MODES if isinstance(m, str)],
                    help="torch.compile the VAE decoder's per-frame step with this mode")
    ap.add_argument("--profile", metavar="DIR", help="write a torch profiler trace of the generation into DIR")
    log_setup.add_arguments(ap)
    args = ap.parse_args(argv)
    log_setup.configure_from_args(args)
    if args.num_chunks < 1:
        ap.error("--num-chunks must be >= 1")

    from .pipeline import load_generator
    from .sampler import FewStepSchedule, latent_frames_to_video_frames
    from .video_io import write_mp4

    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    try:
        gen = load_generator(
            checkpoint=args.checkpoint, preset=args.preset, text_encoder=args.text_encoder, vae=args.vae,
            adapters_spec=[parse_adapter(a) for a in args.adapter], device=dev, dtype=dtype, seed=args.seed,
            schedule=FewStepSchedule(shift=args.shift), ema=not args.no_ema, compile=args.compile,
            vae_memory_format=args.vae_memory_format, vae_compile=args.vae_compile or False,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    big = gen.model.cfg.dim >= 1024
    hw = (args.height or (60 if big else 8), args.width or (104 if big else 8))
    t0 = time.perf_counter()
    first = None
    chunks = []
    with maybe_profile(args.profile, name="sample"):
        chunks_in = gen.stream_video(args.prompt, num_chunks=args.num_chunks, latent_hw=hw)
        for frames in tqdm(chunks_in, total=args.num_chunks, desc="chunks", unit="chunk", disable=not log_setup.progress_enabled()):
            chunks.append(frames.cpu())
            first = first or time.perf_counter() - t0
    video = torch.cat(chunks, dim=1)
    dt = time.perf_counter() - t0
    n = latent_frames_to_video_frames(args.num_chunks * gen.model.cfg.chunk_frames)
    assert video.shape[1] == n, (video.shape, n)
    outs = []
    for b in range(video.shape[0]):
        out = args.out if video.shape[0] == 1 else args.out.replace(".mp4", f"_{b}.mp4")
        outs.append(write_mp4(out, video[b], fps=args.fps))
    logger.info(f"{video.shape[0]} x {n} frames {video.shape[-2]}x{video.shape[-1]} in {dt:.2f} s "
                f"(first chunk {first:.2f} s, {video.shape[0] * n / dt:.1f} FPS end to end)")
    for o in outs:
        logger.info(f"wrote {o}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
