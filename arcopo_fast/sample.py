"""Generate videos with the streaming pipeline and write them as mp4, GIF, PNG contact sheets or PNG frames.

    python -m arcopo_fast.sample --prompt "a red balloon over a lake" --out video.mp4       # tiny, CPU
    python -m arcopo_fast.sample --model toy --adapter runs/toy \\
        --prompt "a small red circle moving left over a dark blue background" --out toy.gif  # the default run's
    python -m arcopo_fast.sample --model wan_models/Wan2.1-T2V-1.3B --checkpoint self_forcing_dmd.pt \\
        --device cuda --out sf.mp4                            # Self-Forcing's layout (or a diffusers folder)
    python -m arcopo_fast.sample --checkpoint runs/tiny/base_model.safetensors \\
        --adapter runs/tiny/checkpoints/iter_000060/adapter --prompts-file prompts.txt --num-samples 2 --out tuned.gif

Sizes are pixels: --height / --width multiples of 16, --num-frames = 12 * chunks - 3 (9, 21, ..., 81);
defaults: 480 x 832 x 81 for 1.3B-class models, 64 x 64 x 81 for the tiny one, 64 x 64 x 33 (the toy world's
clips) for --model toy.
--out: .mp4, .gif, .png (a contact sheet) or a name without an extension (a folder of PNG frames). Several
videos (prompts x --num-samples) get one file each: out_<prompt>.mp4, or out_<prompt>_<sample>.mp4 with
--num-samples > 1. Sample s of every prompt uses noise seed --seed + s.
Chunks are decoded as they arrive (on CUDA, overlapped with the next chunk's generation).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from . import log as log_setup
from .model.vae import COMPILE_MODES as VAE_COMPILE_MODES
from .model.vae import MEMORY_FORMATS
from .profiling import maybe_profile
from .sampler import COMPILE_MODES

logger = logging.getLogger("arcopo_fast.sample")  # not __name__: under `python -m` that is "__main__"


def parse_adapter(text: str) -> tuple[str, float]:
    """'path' or 'path:scale' (scale default 1.0); a path that itself holds a ':' is taken whole when it
    exists. A scale that is not a number is a ValueError naming it (not a search for 'runs/x:O.8')."""
    path, sep, scale = text.rpartition(":")
    if not sep:
        return text, 1.0
    try:
        return path, float(scale)
    except ValueError:
        if Path(text).expanduser().exists():
            return text, 1.0
        raise ValueError(f"--adapter {text}: expected FOLDER or FOLDER:SCALE, and {scale!r} is not a number") from None


def device_arg(text: str) -> str:
    """--device: a torch device this machine has (an argparse type: a bad one is a usage error, not a
    traceback from deep inside the first CUDA call)."""
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available here (torch {torch.__version__})")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def add_model_arguments(ap: argparse.ArgumentParser) -> None:
    """The options that choose the generator (shared by sample and evaluate)."""
    ap.add_argument("--model", help="a diffusers WanPipeline folder, Wan's release folder (Self-Forcing's "
                    "wan_models/Wan2.1-T2V-1.3B), 'tiny', or 'toy' (the toy world's generator, text encoder, VAE "
                    "and shift: what the default `train` run tunes); default: --checkpoint / --preset with "
                    "--text-encoder / --vae")
    ap.add_argument("--checkpoint", help="DiT weights (Self-Forcing .pt, Wan2.1 .safetensors/.pth, diffusers folder, "
                    "a run's base_model.safetensors); with --model it replaces the folder's DiT")
    ap.add_argument("--preset", default="tiny", help="architecture of a random DiT when neither --model nor "
                    "--checkpoint is given (tiny, wan-1.3b)")
    ap.add_argument("--allow-random-init", action="store_true", help="let a real-size --preset (wan-1.3b) run "
                    "from random weights without --checkpoint (benchmarks, smoke tests)")
    ap.add_argument("--no-ema", action="store_true", help="Self-Forcing .pt: use 'generator' instead of 'generator_ema'")
    ap.add_argument("--adapter", action="append", default=[], help="LoRA adapter folder[:scale] (repeatable: W0 + sum s dW)")
    ap.add_argument("--text-encoder", help="local umT5 encoder + tokenizer folder (default: the model's, or the tiny one)")
    ap.add_argument("--vae", help="local AutoencoderKLWan folder (default: the model's, or the tiny one)")
    ap.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu, cuda or cuda:N (default: cuda when available)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: bfloat16 on CUDA")
    ap.add_argument("--shift", type=float, default=None, help="timestep shift (default: the model's, 5, or "
                    "the toy world's 1; Self-Forcing's demo uses 8)")
    ap.add_argument("--height", type=int, default=None, help="pixels, a multiple of 16 (default: per model, see above)")
    ap.add_argument("--width", type=int, default=None, help="pixels, a multiple of 16 (default: per model)")
    ap.add_argument("--num-frames", type=int, default=None, help="video frames, 12 * chunks - 3 (default: per model, see above)")


def build_pipeline(args, *, model_seed: int = 0):
    """The StreamingPipeline the options describe (adapters loaded, progress bar per chunk)."""
    from .model.vae import WanVAE
    from .pipeline import StreamingPipeline, load_generator
    from .sampler import FewStepSchedule

    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    schedule = FewStepSchedule(shift=args.shift) if args.shift is not None else None  # None: the model's
    ema = not args.no_ema
    vae_opts = dict(memory_format=getattr(args, "vae_memory_format", "auto"), compile=getattr(args, "vae_compile", None) or False)
    compile = getattr(args, "compile", None)
    if args.model:
        pipe = StreamingPipeline.from_pretrained(args.model, checkpoint=args.checkpoint, device=dev, dtype=dtype,
                                                 compile=compile, text_encoder=args.text_encoder, vae=args.vae,
                                                 ema=ema, schedule=schedule)
        if vae_opts != dict(memory_format="auto", compile=False):
            pipe.vae = WanVAE(pipe.vae.vae, device=pipe.vae.device, dtype=pipe.vae.dtype, **vae_opts)
        for i, spec in enumerate(args.adapter):
            path, scale = parse_adapter(spec)
            pipe.load_lora_weights(path, scale=scale, adapter_name=f"a{i}")
        return pipe
    return load_generator(
        checkpoint=args.checkpoint, preset=args.preset, text_encoder=args.text_encoder, vae=args.vae,
        adapters_spec=[parse_adapter(a) for a in args.adapter], device=dev, dtype=dtype, seed=model_seed,
        schedule=schedule, ema=ema, compile=compile, vae_memory_format=vae_opts["memory_format"],
        vae_compile=vae_opts["compile"], allow_random_init=getattr(args, "allow_random_init", False),
    )


def video_size(args, pipe) -> tuple[int, int, int]:
    """(height, width, num_frames): the options, else the pipeline's default_size (else the model's)."""
    from .pipeline import default_video_size

    h, w, n = getattr(pipe, "default_size", None) or default_video_size(pipe.model.cfg)
    return args.height or h, args.width or w, args.num_frames or n


def read_prompts(prompts: list[str] | None, prompts_file: str | None) -> list[str]:
    """--prompt values, then --prompts-file's prompts (data.read_prompt_file; ValueError when there are none)."""
    from .data import read_prompt_file

    out = list(prompts or [])
    if prompts_file:
        out += read_prompt_file(prompts_file, "--prompts-file")
    if not out:
        raise ValueError("give --prompt (repeatable) or --prompts-file")
    return out


def output_paths(out: str, num_prompts: int, num_samples: int) -> list[Path]:
    """One destination per (prompt, sample), prompt-major: `out` itself for a single video, else the
    prompt's index (and the sample's, with several samples) before the extension."""
    path = Path(out)
    if num_prompts * num_samples == 1:
        return [path]
    tags = [f"_{p}" if num_samples == 1 else f"_{p}_{s}" for p in range(num_prompts) for s in range(num_samples)]
    return [path.with_name(f"{path.stem}{t}{path.suffix}") for t in tags]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m arcopo_fast.sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", action="append", help="text prompt (repeatable)")
    ap.add_argument("--prompts-file", help="a file with one prompt per line (added after the --prompt ones)")
    ap.add_argument("--num-samples", type=int, default=1, help="videos per prompt (noise seeds --seed, --seed + 1, ...)")
    ap.add_argument("--out", default="video.mp4", help=".mp4, .gif, .png (contact sheet) or a folder name (PNG frames)")
    add_model_arguments(ap)
    ap.add_argument("--seed", type=int, default=0, help="noise seed of the first sample (sample s uses --seed + s)")
    ap.add_argument("--batch-size", type=int, default=4, help="videos generated together")
    ap.add_argument("--fps", type=float, default=16.0)
    ap.add_argument("--compile", choices=[m for m in COMPILE_MODES if m], help="torch.compile mode of the DiT "
                    "forward ('reduce-overhead' adds CUDA graphs); the first video pays the compilation")
    ap.add_argument("--vae-memory-format", default="auto", choices=list(MEMORY_FORMATS),
                    help="VAE decoder layout (channels_last_3d: cuDNN's NDHWC convolutions; auto: "
                    "channels_last_3d on CPU, contiguous on a GPU)")
    ap.add_argument("--vae-compile", default=None, choices=[m for m in VAE_COMPILE_MODES if isinstance(m, str)],
                    help="torch.compile the VAE decoder's per-frame step with this mode")
    ap.add_argument("--profile", metavar="DIR", help="write a torch profiler trace of the generation into DIR")
    log_setup.add_arguments(ap)
    args = ap.parse_args(argv)
    log_setup.configure_from_args(args)
    for name in ("num_samples", "batch_size"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.seed < 0:
        ap.error("--seed must be >= 0")
    if not args.fps > 0:  # checked before the generation: save_video would refuse it only afterwards
        ap.error(f"--fps must be > 0, got {args.fps}")

    from .video_io import check_video_path, save_video

    try:
        check_video_path(args.out)  # before any work: a bad name must not cost a generation
        prompts = read_prompts(args.prompt, args.prompts_file)
        pipe = build_pipeline(args)  # a random tiny DiT is the embedded one (seed 0), as from_pretrained("tiny")
        pipe.set_progress_bar_config(disable=not log_setup.progress_enabled())
        height, width, num_frames = video_size(args, pipe)
        jobs = [(p, args.seed + s) for p in prompts for s in range(args.num_samples)]
        outs = output_paths(args.out, len(prompts), args.num_samples)
        pipe.check_inputs([p for p, _ in jobs], height, width, num_frames, seeds=[s for _, s in jobs])
    except (FileNotFoundError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    first, dt = None, 0.0
    written = []
    with maybe_profile(args.profile, name="sample"):
        for i in range(0, len(jobs), args.batch_size):
            batch = jobs[i : i + args.batch_size]
            chunks = []
            t0 = time.perf_counter()
            for frames in pipe.stream([p for p, _ in batch], height=height, width=width, num_frames=num_frames,
                                      seeds=[s for _, s in batch]):
                chunks.append(frames.cpu())
                first = first or time.perf_counter() - t0
            dt += time.perf_counter() - t0  # generation time; writing the files is not counted
            video = torch.cat(chunks, dim=1)
            for b in range(video.shape[0]):
                written.append(save_video(outs[i + b], video[b], fps=args.fps))
    logger.info("%d x %d frames %dx%d in %.2f s (first chunk %.2f s, %.1f FPS end to end)",
                len(jobs), num_frames, height, width, dt, first, len(jobs) * num_frames / dt)
    for o in written:
        logger.info("wrote %s", o)
    return 0


if __name__ == "__main__":
    sys.exit(main())
