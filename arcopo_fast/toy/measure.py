"""`python -m arcopo_fast.toy measure`: what makes the toy base model a faithful stand-in, measured.

- recognition: the fraction of base samples (one per prompt and seed) whose every prompted attribute is the
  TA model's top choice (arcopo_fast.rewards.toy.recognised), and the mean TA / VQ / MQ;
- spreads: AR-CoPO groups exactly as the trainer rolls them out (rl/rollout.py: one pivot chunk's initial
  noise perturbed at s = 0.5, every other noise shared), scored by toy_videoalign: the mean within-group
  std of each reward against the std over prompts of the group means (AR-CoPO's premise: the first must be
  a sizeable fraction of the second).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import torch

from . import assets
from .assets import read_prompts  # noqa: F401 - the prompts measured on (tests import it from here)


def load_toy_generator(root: str | Path | None = None, *, seed: int = 0, checkpoint: str | Path | None = None):
    """The shipped toy generator (arcopo_fast.pipeline.Generator) with its sampler schedule."""
    from ..pipeline import load_generator
    from ..sampler import FewStepSchedule

    root = Path(root or assets.WEIGHTS_DIR)
    shift = assets.read_manifest(root)["sampler"]["shift"]
    return load_generator(
        checkpoint=str(checkpoint or root / "base_model.safetensors"),
        text_encoder=str(root / "text_encoder"),
        vae=str(root / "vae"),
        seed=seed,
        schedule=FewStepSchedule(shift=shift),
    )


def toy_rewards(root: str | Path | None = None):
    from ..rewards.toy import ToyVideoAlign

    root = Path(root or assets.WEIGHTS_DIR)
    return ToyVideoAlign(ta=str(root / "reward_ta.safetensors"), vq=str(root / "reward_vq.safetensors"), mq=str(root / "reward_mq.safetensors"))


@torch.no_grad()
def recognition(gen, reward, prompts: list[str], samples_per_prompt: int = 2, num_chunks: int = 3) -> dict:
    from ..rewards.toy import TA_HEADS, prepare, prompt_targets, recognised

    hits, per, scores = [], {k: [] for k in TA_HEADS}, {}
    for p in prompts:
        lat = gen.sampler.generate(gen.cross([p] * samples_per_prompt), num_chunks=num_chunks, latent_hw=(8, 8), samples=list(range(samples_per_prompt)))
        videos = gen.vae.decode(lat).float()
        logits = reward.ta.net(prepare(videos))
        targets = prompt_targets([p] * samples_per_prompt)
        hits.append(recognised(logits, targets))
        for k in TA_HEADS:
            per[k].append(recognised(logits, targets, heads=(k,)))
        for k, v in reward(videos, [p] * samples_per_prompt).items():
            scores.setdefault(k, []).append(v)
    out = {"recognition_rate": float(torch.cat(hits).float().mean()), "videos": len(prompts) * samples_per_prompt}
    out.update({f"recognition_rate/{k}": float(torch.cat(v).float().mean()) for k, v in per.items()})
    out.update({f"mean/{k}": float(torch.cat(v).mean()) for k, v in scores.items()})
    return out


@torch.no_grad()
def spreads(gen, reward, prompts: list[str], *, group_size: int = 8, perturb_scale: float = 0.5, num_chunks: int = 3, seed: int = 0) -> dict:
    import random

    from ..rl.rollout import RolloutEngine

    engine = RolloutEngine(gen.sampler, num_chunks=num_chunks, latent_hw=(8, 8), group_size=group_size, perturb_scale=perturb_scale, micro_batch=group_size)
    rng = random.Random(seed)
    rows = []
    for g, p in enumerate(prompts):
        pivot = rng.randrange(num_chunks)
        s = engine.rollout(gen.cross([p]), group=g, pivot=pivot, prompt=p, keep_prefix_cache=False)
        r = reward(gen.vae.decode(s.latents).float(), [p] * group_size)
        rows.append({"pivot": pivot, **{k: v for k, v in r.items() if not k.startswith("TA_")}})
    out = {}
    for k in ("Overall", "TA", "VQ", "MQ"):
        within = torch.stack([row[k].std(unbiased=False) for row in rows])
        means = torch.stack([row[k].mean() for row in rows])
        out[k] = {"within_group_std": float(within.mean()), "between_prompt_std": float(means.std(unbiased=False)),
                  "ratio": float(within.mean() / means.std(unbiased=False).clamp_min(1e-12))}
        for piv in range(num_chunks):
            sel = [w for w, row in zip(within.tolist(), rows) if row["pivot"] == piv]
            if sel:
                out[k][f"within_group_std_pivot{piv}"] = sum(sel) / len(sel)
    out["groups"] = len(rows)
    return out


@torch.no_grad()
def adapter_effect(trainer, prompts: list[str], samples_per_prompt: int = 2, sample_offset: int = 10_000) -> dict:
    """Mean toy_videoalign components of a trainer's model on fixed prompts and noises, with its adapters
    disabled ('before': the base model) and enabled ('after'). Noise ids start at sample_offset (never a
    training group's)."""
    from .. import adapters
    from ..rewards.toy import ToyVideoAlign

    reward = ToyVideoAlign()
    out = {}
    for tag in ("before", "after"):
        ctx = adapters.adapters_disabled(trainer.model) if tag == "before" else contextlib.nullcontext()
        scores: dict[str, list[torch.Tensor]] = {}
        with ctx:
            for p in prompts:
                cross = trainer.cross_for(p)
                ids = list(range(sample_offset, sample_offset + samples_per_prompt))
                lat = trainer.sampler.generate(cross.select(torch.zeros(len(ids), dtype=torch.int64)), num_chunks=trainer.cfg.sampler.num_chunks,
                                               latent_hw=trainer.latent_hw, samples=ids)
                for k, v in reward(trainer.vae.decode(lat).float(), [p] * len(ids)).items():
                    scores.setdefault(k, []).append(v)
        out[tag] = {k: float(torch.cat(v).mean()) for k, v in scores.items()}
    out["rise"] = {k: out["after"][k] - out["before"][k] for k in out["after"]}
    return out


def main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m arcopo_fast.toy measure", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None, help="weights folder (default: the shipped one)")
    ap.add_argument("--checkpoint", default=None, help="another generator (e.g. a merged run) instead of the base model")
    ap.add_argument("--prompts", type=int, default=16, help="prompts (from the weights' prompts.txt)")
    ap.add_argument("--samples", type=int, default=2, help="samples per prompt for the recognition rate")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args(argv)
    t0, c0 = time.perf_counter(), time.process_time()
    gen = load_toy_generator(a.weights, checkpoint=a.checkpoint)
    reward = toy_rewards(a.weights)
    prompts = read_prompts(a.weights)[: a.prompts]
    res = {"recognition": recognition(gen, reward, prompts, a.samples), "spreads": spreads(gen, reward, prompts, group_size=a.group_size)}
    res["seconds"] = {"wall": round(time.perf_counter() - t0, 1), "cpu": round(time.process_time() - c0, 1)}
    text = json.dumps(res, indent=1)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
