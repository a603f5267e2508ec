"""Merge the semi-on-policy and on-policy adapters into the base weights: W = W0 + dW_semi + s * dW_on.

    python -m arcopo_fast.merge --base runs/tiny/base_model.safetensors \\
        --semi runs/semi/checkpoints/latest --on runs/on/checkpoints/latest --scale 0.8 --out merged.safetensors

--semi / --on take a peft adapter folder, a checkpoint folder or a run directory (its latest checkpoint).
The output is a safetensors file with original Wan2.1 names (+ JSON config) that every loader here accepts
(`sample --checkpoint`, `train model.checkpoint=`). The paper uses s = 0.8 for Self-Forcing (0.5 for
Causal-Forcing).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from . import adapters, checkpointing
from . import log as log_setup


def adapter_dir(path: str) -> Path:
    p = checkpointing.expand_latest(path)
    if (p / adapters.ADAPTER_FILE).is_file():
        return p
    return checkpointing.resolve(p) / "adapter"


def merge(base: str, *, semi: str | None, on: str | None, scale: float, out: str, dtype: torch.dtype | None = None) -> Path:
    from .model.checkpoint import load_model, save_model
    from .model.wan import CausalWanModel

    if semi is None and on is None:
        raise ValueError("give at least one of --semi and --on")
    model = load_model(Path(base).expanduser(), device="cpu", dtype=torch.float32)
    scales = {}
    for name, path, s in (("semi", semi, 1.0), ("on", on, scale)):
        if path is not None:
            adapters.load_adapter(model, name, adapter_dir(path))
            scales[name] = s
    merged = adapters.merged_state_dict(model, scales)
    with torch.device("meta"):
        clean = CausalWanModel(model.cfg)
    clean.load_state_dict(merged, strict=True, assign=True)
    return save_model(clean, out, dtype=dtype)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m arcopo_fast.merge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="base weights (any supported format)")
    ap.add_argument("--semi", help="semi-on-policy adapter (added with scale 1)")
    ap.add_argument("--on", help="on-policy adapter (added with --scale)")
    ap.add_argument("--scale", type=float, default=0.8, help="s, the on-policy adapter's scale (default 0.8)")
    ap.add_argument("--out", required=True, help="output .safetensors")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="output dtype (default: the base's)")
    log_setup.add_arguments(ap)
    args = ap.parse_args(argv)
    log_setup.configure_from_args(args)
    try:
        path = merge(args.base, semi=args.semi, on=args.on, scale=args.scale, out=args.out,
                     dtype=getattr(torch, args.dtype) if args.dtype else None)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.getLogger(__name__).info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
