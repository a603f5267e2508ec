"""Train a streaming video generator with AR-CoPO.

    python -m arcopo_fast.train                                    # toy default: CPU, minutes, the toy model aligns
    python -m arcopo_fast.train --preset self-forcing-1.3b model.checkpoint=ckpts/self_forcing_dmd.pt \
        model.text_encoder=wan_models/umt5-xxl model.vae=wan_models/vae data.prompts=prompts.txt
    torchrun --nproc_per_node 8 -m arcopo_fast.train --config run.yaml          # DDP (LoRA) / FSDP2 (full)
    python -m arcopo_fast.train --resume runs/tiny run.iterations=120          # continue a run
    python -m arcopo_fast.train run.mode=semi-on-policy replay.buffer=buffers/sf  # semi-on-policy adapter

Overrides are `section.field=value` (see arcopo_fast/config.py for every field and its meaning).
"""

from __future__ import annotations

import argparse
import json
import sys

from . import checkpointing
from .config import DEFAULT_PRESET, PRESETS, TrainConfig, apply_overrides, load_config


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m arcopo_fast.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS), help=f"named configuration (default: {DEFAULT_PRESET})")
    ap.add_argument("--config", help="a YAML/JSON file with config sections, applied over the preset")
    ap.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                    help="continue from the latest checkpoint of run.out_dir, or of PATH (a run dir or checkpoint)")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    ap.add_argument("--profile", action="store_true", help="same as run.profile=true: a torch profiler trace of iteration 2")
    ap.add_argument("overrides", nargs="*", help="section.field=value")
    return ap.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """The preset + file + overrides; when resuming, the checkpoint's own config + overrides (so a resumed
    run is the same run, and the command line may only extend it, e.g. run.iterations=...)."""
    if args.resume is None:
        return load_config(args.preset, args.config, args.overrides)
    where = load_config(args.preset, args.config, args.overrides).run.out_dir if args.resume is True else args.resume
    return TrainConfig.from_dict(apply_overrides(checkpointing.read_state(where)["config"], args.overrides))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.profile:
        args.overrides.append("run.profile=true")
    try:
        cfg = resolve_config(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    from . import distributed
    from .trainer import Trainer

    try:
        trainer = Trainer(cfg, resume=args.resume)
        summary = trainer.run()
    finally:
        distributed.shutdown()
    if trainer.dist.is_main:
        print(f"[arcopo_fast] run directory: {summary['run_dir']}")
        if "reward_first10" in summary:
            print(f"[arcopo_fast] mean reward, first 10 iterations {summary['reward_first10']:.4f} -> last 10 {summary['reward_last10']:.4f}")
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
