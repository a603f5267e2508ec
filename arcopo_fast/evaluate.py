"""Evaluate a generator (base weights + adapters at a merge scale) on held-out prompts, and compare runs.

    python -m arcopo_fast.evaluate --out eval/base                                   # tiny random base
    python -m arcopo_fast.evaluate --checkpoint runs/tiny/base_model.safetensors \\
        --adapter runs/tiny:0.8 --rewards brightness,flicker --out eval/tuned
    python -m arcopo_fast.evaluate --model toy --adapter runs/toy --prompts arcopo_fast/toy/weights/prompts.txt \\
        --rewards toy_videoalign,temporal_smoothness --seeds 0,1 --out eval/toy       # the default run's adapter
    python -m arcopo_fast.evaluate --compare eval/base/results.json eval/tuned/results.json --out eval/cmp

Sizes are pixels (--height / --width / --num-frames), default per model: 480 x 832 x 81 for 1.3B-class
models, 64 x 64 x 81 for the tiny one, 64 x 64 x 33 for --model toy. --model / --checkpoint / --adapter
choose the generator as in `python -m arcopo_fast.sample`.

Writes <out>/results.json (per-prompt scores, means, settings) and <out>/results.md (a table). Use one
in-domain reward (what training optimised) and one out-of-domain reward (what it did not): the paper's dual
criterion separates genuine alignment from reward hacking. --compare puts two or more results side by side.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from . import log as log_setup

logger = logging.getLogger("arcopo_fast.evaluate")  # not __name__: under `python -m` that is "__main__"

DEFAULT_EVAL_PROMPTS = (
    "a lighthouse beam sweeping across a foggy sea",
    "a cat stretching on a sunny windowsill",
    "rain drops sliding down a window at night",
    "a field of sunflowers swaying in the wind",
)


def evaluate(
    *,
    pipeline,
    prompts: list[str],
    reward_specs: list,
    height: int,
    width: int,
    num_frames: int,
    seeds: list[int] | list[list[int]],
    video_dir: Path | None = None,
) -> dict:
    """Score one video per (prompt, seed) with the rewards; sizes in pixels (StreamingPipeline's rules).
    seeds: the noise ids of every prompt, or one list per prompt (each prompt its own noises). The seeds
    of a prompt are generated as one batch."""
    from .rewards import CompositeReward
    from .video_io import write_mp4

    per_prompt = [list(x) for x in seeds] if seeds and isinstance(seeds[0], (list, tuple)) else [list(seeds)] * len(prompts)
    if len(per_prompt) != len(prompts) or not all(per_prompt):
        raise ValueError(f"seeds: need noise ids for every prompt ({len(prompts)} prompts), got {seeds!r:.200}")
    reward = CompositeReward(reward_specs)
    for prompt, ids in zip(prompts, per_prompt):  # every argument, before the first video is generated
        pipeline.check_inputs([prompt] * len(ids), height, width, num_frames, seeds=ids)
    rows = []
    t0 = time.perf_counter()
    for pi, (prompt, seeds) in enumerate(zip(prompts, per_prompt)):
        video = pipeline([prompt] * len(seeds), height=height, width=width, num_frames=num_frames, seeds=seeds).frames
        total, comps = reward(video.float(), [prompt] * len(seeds))
        for i, seed in enumerate(seeds):
            rows.append({"prompt": prompt, "seed": seed, "total": float(total[i]), **{k: float(v[i]) for k, v in comps.items()}})
            if video_dir is not None:
                video_dir.mkdir(parents=True, exist_ok=True)
                write_mp4(video_dir / f"p{pi:03d}_s{seed}.mp4", video[i].cpu())
    keys = [k for k in rows[0] if k not in ("prompt", "seed")]
    means = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
    return {"rows": rows, "means": means, "num_videos": len(rows), "seconds": time.perf_counter() - t0}


def markdown_table(results: dict[str, dict]) -> str:
    """results: {name: results.json content} -> a Markdown table of mean scores, one column per run."""
    names = list(results)
    keys = sorted({k for r in results.values() for k in r["means"]}, key=lambda k: (k != "total", k))
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for k in keys:
        vals = [results[n]["means"].get(k) for n in names]
        lines.append(f"| {k} | " + " | ".join("-" if v is None else f"{v:.4f}" for v in vals) + " |")
    if len(names) == 2:
        a, b = (results[n]["means"] for n in names)
        lines.append("")
        lines.append(f"Change {names[0]} -> {names[1]}: " + ", ".join(f"{k} {b[k] - a[k]:+.4f}" for k in keys if k in a and k in b))
    return "\n".join(lines) + "\n"


def _seed_list(text: str) -> list[int]:
    """--seeds: a comma list of non-negative integers (an argparse type)."""
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None
    if any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"noise seeds must be >= 0, got {text!r}")
    return seeds


def read_results(path: Path) -> dict:
    """A results.json written by this command (ValueError naming the file otherwise)."""
    if not path.is_file():
        raise ValueError(f"--compare: {path} does not exist")
    try:
        res = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"--compare: {path} is not JSON ({e})") from None
    if not isinstance(res, dict) or not isinstance(res.get("means"), dict):
        raise ValueError(f"--compare: {path} is not a results.json of `python -m arcopo_fast.evaluate` (no 'means')")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m arcopo_fast.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--compare", nargs="+", metavar="RESULTS_JSON", help="compare existing results instead of generating")
    from .sample import add_model_arguments

    add_model_arguments(ap)
    ap.add_argument("--prompts", help="file with one held-out prompt per line (default: a small built-in set)")
    ap.add_argument("--rewards", default="brightness,temporal_smoothness",
                    help="comma list name[=weight] (names or module:Class); first = in-domain, others out-of-domain")
    ap.add_argument("--seeds", type=_seed_list, default="0", help="comma list of noise seeds per prompt (default 0)")
    ap.add_argument("--model-seed", type=int, default=0, help="seed of a random base model (no --checkpoint)")
    ap.add_argument("--save-videos", action="store_true")
    log_setup.add_arguments(ap)
    args = ap.parse_args(argv)
    log_setup.configure_from_args(args)
    out = Path(args.out)

    if args.compare:
        results = {}
        for p in args.compare:
            path = Path(p)
            try:
                res = read_results(path)
            except ValueError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            name = path.parent.name or path.stem
            results[name if name not in results else f"{name}#{len(results) + 1}"] = res
        table = markdown_table(results)
        out.mkdir(parents=True, exist_ok=True)
        (out / "comparison.md").write_text(table)
        print(table)
        logger.info("wrote %s", out / "comparison.md")
        return 0

    from .data import read_prompt_file
    from .rewards import parse_reward_list
    from .sample import build_pipeline, video_size

    try:
        specs = parse_reward_list(args.rewards)
        prompts = DEFAULT_EVAL_PROMPTS if not args.prompts else read_prompt_file(args.prompts, "--prompts")
        pipe = build_pipeline(args, model_seed=args.model_seed)
        pipe.set_progress_bar_config(disable=True)
        height, width, num_frames = video_size(args, pipe)
        res = evaluate(
            pipeline=pipe, prompts=list(prompts), reward_specs=specs, height=height, width=width,
            num_frames=num_frames, seeds=args.seeds,
            video_dir=out / "videos" if args.save_videos else None,
        )
    except (FileNotFoundError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res["settings"] = {**{k: v for k, v in vars(args).items() if k != "compare"},
                       "height": height, "width": width, "num_frames": num_frames}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=2))
    table = markdown_table({out.name: res})
    (out / "results.md").write_text(table)
    print(table)
    logger.info("wrote %s and %s", out / "results.json", out / "results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
