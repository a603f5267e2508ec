"""Collect the semi-on-policy replay buffer: groups rolled out and scored with the REFERENCE weights.

    python -m arcopo_fast.collect replay.buffer=buffers/toy replay.buffer_groups=32   # the toy world (default)
    torchrun --nproc_per_node 8 -m arcopo_fast.collect --preset self-forcing-1.3b replay.buffer=buffers/sf ...

Takes the same configuration as `train` (the buffer records the sampler/group settings and refuses to be
used by a run whose settings differ). `train run.mode=semi-on-policy` collects automatically when its
replay.buffer does not exist yet. A folder that already holds a buffer is refused unless --overwrite.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import cli
from . import log as log_setup
from .config import load_config

logger = logging.getLogger("arcopo_fast.collect")  # not __name__: under `python -m` that is "__main__"


def parse_args(argv=None) -> argparse.Namespace:
    ap = cli.config_parser("python -m arcopo_fast.collect", __doc__, argv)
    ap.add_argument("--overwrite", action="store_true",
                    help="collect again into a buffer folder that already holds a collection (it is replaced; "
                         "without this flag such a folder is refused)")
    ap.add_argument("--allow-pickle", action="store_true",
                    help="load a TRUSTED legacy model.checkpoint holding pickled Python objects (unpickling runs "
                         "code, so never use it on files from elsewhere)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    log_setup.configure_from_args(args)
    try:
        cfg = load_config(args.preset, args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cli.config_yaml(cfg), end="")
        return 0
    from . import distributed
    from .checkpointing import RunLockedError
    from .rewards import RewardError
    from .rl.replay import ReplayBuffer, clear
    from .trainer import Trainer

    root = Path(cfg.replay.buffer or Path(cfg.run.out_dir) / "replay_buffer").expanduser()
    if ReplayBuffer.exists(root):
        if not args.overwrite:  # a collection can be hours of rollouts, and a semi run may be training on it
            print(f"error: {root} already holds a replay buffer: train on it (run.mode=semi-on-policy "
                  f"replay.buffer={root}), choose another replay.buffer, or pass --overwrite to collect it again",
                  file=sys.stderr)
            return 2
        clear(root)  # every rank may: the files are gone before any rank writes (Trainer() synchronises)
    # An on-policy trainer object (so nothing is collected implicitly) with its own run folder inside the
    # buffer: collecting never touches a training run's files.
    cfg.run.mode = "on-policy"
    cfg.run.out_dir = str(root / "collect_run")
    try:
        try:  # the same refusals as train: a clear line, no traceback
            trainer = Trainer(cfg, overwrite=args.overwrite, allow_pickle=args.allow_pickle)
        except (ValueError, OSError, RunLockedError, RewardError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        try:
            trainer.collect_buffer(root, cfg.replay.buffer_groups)
        except RewardError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        finally:
            trainer.close()
    finally:
        distributed.shutdown()
    if trainer.dist.is_main:
        logger.info("replay buffer: %s (%d groups)", root, cfg.replay.buffer_groups)
    return 0


if __name__ == "__main__":
    sys.exit(main())
