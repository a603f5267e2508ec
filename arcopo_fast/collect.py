"""Collect the semi-on-policy replay buffer: groups rolled out and scored with the REFERENCE weights.

    python -m arcopo_fast.collect replay.buffer=buffers/tiny replay.buffer_groups=100
    torchrun --nproc_per_node 8 -m arcopo_fast.collect --preset self-forcing-1.3b replay.buffer=buffers/sf ...

Takes the same configuration as `train` (the buffer records the sampler/group settings and refuses to be
used by a run whose settings differ). `train run.mode=semi-on-policy` collects automatically when its
replay.buffer does not exist yet.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .config import load_config
from .train import parse_args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.preset, args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from . import distributed
    from .trainer import Trainer

    root = Path(cfg.replay.buffer or Path(cfg.run.out_dir) / "replay_buffer").expanduser()
    # An on-policy trainer object (so nothing is collected implicitly) with its own run folder inside the
    # buffer: collecting never touches a training run's files.
    cfg.run.mode = "on-policy"
    cfg.run.out_dir = str(root / "collect_run")
    try:
        trainer = Trainer(cfg, overwrite=args.overwrite, allow_pickle=args.allow_pickle)
        trainer.collect_buffer(root, cfg.replay.buffer_groups)
    finally:
        distributed.shutdown()
    if trainer.dist.is_main:
        print(f"[arcopo_fast] replay buffer: {root} ({cfg.replay.buffer_groups} groups)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
