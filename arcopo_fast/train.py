r"""Train a streaming video generator with AR-CoPO.

    python -m arcopo_fast.train                                    # toy default: CPU, minutes, the toy model aligns
    python -m arcopo_fast.train --preset self-forcing-1.3b model.checkpoint=ckpts/self_forcing_dmd.pt \
        model.text_encoder=wan_models/umt5-xxl model.vae=wan_models/vae data.prompts=prompts.txt
    torchrun --nproc_per_node 8 -m arcopo_fast.train --config run.yaml          # DDP (LoRA) / FSDP2 (full)
    python -m arcopo_fast.train --resume runs/toy run.iterations=300           # continue the default run (in runs/toy)
    python -m arcopo_fast.train run.mode=semi-on-policy replay.buffer=buffers/sf  # semi-on-policy adapter

Overrides are `section.field=value`; every field, its type, value and meaning is listed below.

Run folders and trust: a run writes only into its own folder, which it locks; a fresh run refuses a folder
that holds another run (--overwrite deletes it), and `--resume PATH` continues in PATH's folder, whatever
folder the stored config names. Nothing read from a run folder runs code: checkpoints load tensors only
(--allow-pickle for a trusted legacy checkpoint), and the stored config's 'module:Class' imports (reward
names) run only when given again on the command line (or with --trust-run-config).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
from pathlib import Path

from . import checkpointing, cli
from . import log as log_setup
from .config import (
    TrainConfig,
    apply_overrides,
    config_dict,
    import_strings,
    load_config,
    parse_override,
)

logger = logging.getLogger("arcopo_fast.train")  # not __name__: under `python -m` that is "__main__"


def parse_args(argv=None) -> argparse.Namespace:
    ap = cli.config_parser("python -m arcopo_fast.train", __doc__, argv)
    ap.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                    help="continue from the latest checkpoint of run.out_dir, or of PATH (a run dir or checkpoint)")
    ap.add_argument("--overwrite", action="store_true",
                    help="a fresh run may delete the run already in run.out_dir; with --resume, an older checkpoint "
                         "of a run may be resumed (its newer checkpoints are deleted)")
    ap.add_argument("--allow-pickle", action="store_true",
                    help="load a TRUSTED legacy checkpoint (optimizer.pt, model.checkpoint) holding pickled Python "
                         "objects; unpickling runs code, so never use it on files from elsewhere")
    ap.add_argument("--trust-run-config", action="store_true",
                    help="with --resume, accept the import strings ('module:Class' reward names) of the stored "
                         "config without repeating them on the command line")
    ap.add_argument("--profile", action="store_true", help="same as run.profile=true: a torch profiler trace of iteration 2")
    return ap.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """The preset + file + overrides; when resuming, the checkpoint's own config + overrides (so a resumed
    run is the same run, and the command line may only extend it, e.g. run.iterations=...). A resume writes
    into the resumed run's folder; the stored config's import strings must be given again (or trusted)."""
    if args.resume is None:
        return load_config(args.preset, args.config, args.overrides)
    given = config_dict(args.preset, args.config, args.overrides)
    where = TrainConfig.from_dict(copy.deepcopy(given)).run.out_dir if args.resume is True else args.resume
    ckpt = checkpointing.resolve(where)
    stored = checkpointing.read_state(ckpt).get("config")
    if not isinstance(stored, dict):
        raise ValueError(f"checkpoint {ckpt} has no stored config (state.json lacks 'config')")
    merged = apply_overrides(copy.deepcopy(stored), args.overrides)
    untrusted = sorted(import_strings(merged) - import_strings(given))
    if untrusted and not args.trust_run_config:
        raise ValueError(
            f"the config stored in {ckpt} imports {untrusted}, which runs code from that module: give the reward "
            "again on the command line (reward.rewards=[...]) to confirm it, or pass --trust-run-config if you "
            "trust this run folder")
    owner, explicit = checkpointing.run_dir_of(ckpt), _explicit_out_dir(args)
    if owner is None and explicit is None:
        raise ValueError(f"checkpoint {ckpt} is not inside a run folder (<run>/checkpoints/iter_N): give "
                         "run.out_dir=... for the run to continue in")
    if owner is not None and explicit is not None and Path(explicit).expanduser().resolve() != owner.resolve():
        raise ValueError(
            f"--resume {args.resume} continues the run in {owner}, but run.out_dir={explicit} names another folder: "
            f"drop run.out_dir, or copy {owner} to {explicit} and resume the copy")
    merged.setdefault("run", {})["out_dir"] = str(owner if owner is not None else explicit)
    return TrainConfig.from_dict(merged)


def _explicit_out_dir(args: argparse.Namespace) -> str | None:
    """run.out_dir as given on this command line (an override or the --config file), else None."""
    out = None
    if args.config and _file_sets(args.config, "run", "out_dir"):
        out = config_dict(args.preset, args.config, [])["run"]["out_dir"]
    for ov in args.overrides:
        path, value = parse_override(ov)
        if path == ["run", "out_dir"]:
            out = value
    return out


def _file_sets(config_file: str, *keys: str) -> bool:
    import yaml

    node = yaml.safe_load(Path(config_file).read_text()) or {}
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            return False
        node = node[k]
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    log_setup.configure_from_args(args)
    if args.profile:
        args.overrides.append("run.profile=true")
    try:
        cfg = resolve_config(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cli.config_yaml(cfg), end="")
        return 0
    from . import distributed
    from .checkpointing import RunLockedError
    from .rewards import RewardError
    from .trainer import Trainer

    try:
        try:
            trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite, allow_pickle=args.allow_pickle)
        except (ValueError, OSError, RunLockedError, RewardError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        try:
            summary = trainer.run()
        except KeyboardInterrupt as e:
            print(f"[arcopo_fast] {e or 'interrupted'}; the last checkpoint is kept: resume with --resume {trainer.run_dir}",
                  file=sys.stderr)
            return 130
        except RewardError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    finally:
        distributed.shutdown()
    if trainer.dist.is_main:
        logger.info("run directory: %s", summary["run_dir"])
        if summary["interrupted"]:
            logger.info("stopped after iteration %d of %d, checkpoint written: continue with --resume %s",
                        summary["iterations"], cfg.run.iterations, summary["run_dir"])
        if "samples_reward_before" in summary:
            logger.info("reward of the sample videos (same prompts and noises, samples/scores.json): before %.4f -> "
                        "after %.4f", summary["samples_reward_before"], summary["samples_reward_after"])
        if "reward_first10" in summary:
            logger.info("mean training reward, first 10 iterations %.4f -> last 10 %.4f (these also differ by the "
                        "prompts drawn)", summary["reward_first10"], summary["reward_last10"])
        print(json.dumps(summary))  # the result, on stdout (machine-readable)
    return 0


if __name__ == "__main__":
    sys.exit(main())
