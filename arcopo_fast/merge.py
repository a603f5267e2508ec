"""Merge the semi-on-policy and on-policy adapters into the base weights: W = W0 + dW_semi + s * dW_on,
and export them in the layouts other projects read.

    python -m arcopo_fast.merge --base runs/tiny/base_model.safetensors \\
        --semi runs/semi/checkpoints/latest --on runs/on/checkpoints/latest --scale 0.8 --out merged.safetensors
    python -m arcopo_fast.merge --base self_forcing_dmd.pt --on runs/on --format diffusers --out merged_transformer/
    python -m arcopo_fast.merge --base self_forcing_dmd.pt --on runs/on --format self-forcing --out merged.pt
    python -m arcopo_fast.merge --on runs/on --scale 0.8 --format diffusers-lora --out wan_lora/

--semi / --on take a peft adapter folder, a checkpoint folder or a run directory (its latest checkpoint).
--format:
  wan             (default) a .safetensors file with original Wan2.1 names (+ JSON config) that every loader
                  here accepts (`sample --checkpoint`, `train model.checkpoint=`).
  diffusers       a diffusers WanTransformer3DModel folder (WanTransformer3DModel.from_pretrained reads it).
  self-forcing    a Self-Forcing .pt ({"generator": ..., "generator_ema": ...}, keys prefixed "model.").
  diffusers-lora  no base weights: the adapters alone as ONE LoRA in diffusers' format
                  (pytorch_lora_weights.safetensors with its LoraConfig, alpha included, as metadata), for
                  `WanPipeline.load_lora_weights(out)`; the scales are folded in (see
                  adapters.diffusers_lora_state_dict).
The paper uses s = 0.8 for Self-Forcing (0.5 for Causal-Forcing).
"""

from __future__ import annotations

import argparse
import inspect
import logging
import math
import sys
from pathlib import Path

import torch

from . import adapters
from . import log as log_setup

FORMATS = ("wan", "diffusers", "self-forcing", "diffusers-lora")
adapter_dir = adapters.resolve_adapter_dir


def _adapter_scales(semi: str | None, on: str | None, scale: float) -> list[tuple[str, Path, float]]:
    if semi is None and on is None:
        raise ValueError("give at least one of --semi and --on")
    if not math.isfinite(scale):
        raise ValueError(f"--scale must be a finite number (the on-policy adapter's weight s), got {scale}")
    return [(name, adapter_dir(path), s) for name, path, s in (("semi", semi, 1.0), ("on", on, scale)) if path is not None]


def merge(base: str, *, semi: str | None, on: str | None, scale: float, out: str, dtype: torch.dtype | None = None,
          format: str = "wan") -> Path:
    """Write W0 + dW_semi + scale * dW_on in `format` (see the module docstring) to `out`."""
    from .model.checkpoint import load_model, save_diffusers, save_model, save_self_forcing
    from .model.wan import CausalWanModel

    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if format == "diffusers-lora":
        return export_diffusers_lora(semi=semi, on=on, scale=scale, out=out)
    if base is None:
        raise ValueError(f"--base is required for --format {format}")
    found = _adapter_scales(semi, on, scale)
    model = load_model(Path(base).expanduser(), device="cpu", dtype=torch.float32)
    for name, path, _ in found:
        adapters.load_adapter(model, name, path)
    merged = adapters.merged_state_dict(model, {name: s for name, _, s in found})
    with torch.device("meta"):
        clean = CausalWanModel(model.cfg)
    clean.load_state_dict(merged, strict=True, assign=True)
    save = {"wan": save_model, "diffusers": save_diffusers, "self-forcing": save_self_forcing}[format]
    return save(clean, out, dtype=dtype)


def export_diffusers_lora(*, semi: str | None, on: str | None, scale: float, out: str) -> Path:
    """dW_semi + scale * dW_on as one LoRA file in diffusers' format, written by diffusers' own
    WanPipeline.save_lora_weights (the LoraConfig, with lora_alpha, goes into the file's metadata).
    `out`: a folder (pytorch_lora_weights.safetensors in it) or a .safetensors path."""
    from diffusers import WanPipeline

    found = _adapter_scales(semi, on, scale)
    state, config = adapters.diffusers_lora_state_dict([(*adapters.read_adapter(path), s) for _, path, s in found])
    if "transformer_lora_adapter_metadata" not in inspect.signature(WanPipeline.save_lora_weights).parameters:
        raise RuntimeError("--format diffusers-lora needs a diffusers whose WanPipeline.save_lora_weights stores "
                           "the LoRA config (transformer_lora_adapter_metadata): upgrade diffusers")
    path = Path(out).expanduser()
    folder, weight_name = (path.parent, path.name) if path.suffix == ".safetensors" else (path, None)
    folder.mkdir(parents=True, exist_ok=True)
    WanPipeline.save_lora_weights(folder, transformer_lora_layers=state, weight_name=weight_name,
                                  transformer_lora_adapter_metadata=config)
    return folder / (weight_name or "pytorch_lora_weights.safetensors")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m arcopo_fast.merge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", help="base weights (any supported format); not needed for --format diffusers-lora")
    ap.add_argument("--semi", help="semi-on-policy adapter (added with scale 1)")
    ap.add_argument("--on", help="on-policy adapter (added with --scale)")
    ap.add_argument("--scale", type=float, default=0.8, help="s, the on-policy adapter's scale (default 0.8)")
    ap.add_argument("--format", default="wan", choices=FORMATS, help="output layout (see above; default wan)")
    ap.add_argument("--out", required=True, help="output path: .safetensors (wan), a folder (diffusers, "
                    "diffusers-lora) or .pt (self-forcing)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="output dtype (default: the base's)")
    log_setup.add_arguments(ap)
    args = ap.parse_args(argv)
    log_setup.configure_from_args(args)
    if args.format != "diffusers-lora" and not args.base:
        ap.error(f"--base is required for --format {args.format}")
    try:
        path = merge(args.base, semi=args.semi, on=args.on, scale=args.scale, out=args.out, format=args.format,
                     dtype=getattr(torch, args.dtype) if args.dtype else None)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.getLogger("arcopo_fast.merge").info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
