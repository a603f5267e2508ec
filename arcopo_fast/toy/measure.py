"""`python -m arcopo_fast.toy measure`: what makes the toy base model a faithful stand-in, measured.

- recognition: the fraction of base samples (one per prompt and seed) whose every prompted attribute is the
  TA model's top choice (arcopo_fast.rewards.toy.recognised), and the mean TA / VQ / MQ;
- ground_truth: the same numbers for the world's own videos of those prompts through the VAE (the ceiling);
- pixel/*: beside both, a reward-free reading of the videos (object mass, speed, moving the prompted way);
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
    """The shipped toy generator (a StreamingPipeline, see pipeline.load_generator) with its sampler schedule."""
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


FIRST_CHUNK_FRAMES = 9  # video frames of chunk 0: 3 latent frames through the 4x temporal VAE, the first alone


def object_track(video: torch.Tensor, threshold: float = 0.3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A reward-free look at one video [F, 3, S, S] in [0, 1]: per frame, the object's pixel mass (the summed
    L1 distance from the background colour of the pixels farther than `threshold` from it; background = the
    clip's per-channel median) and its centroid x, y in pixels. Returns (mass [F], cx [F], cy [F])."""
    bg = video.flatten(2).median(dim=2).values.median(dim=0).values.view(1, 3, 1, 1)
    w = (video - bg).abs().sum(1)
    w = torch.where(w > threshold, w, torch.zeros_like(w))
    ax = torch.arange(video.shape[-1], dtype=video.dtype, device=video.device) + 0.5
    m = w.sum((1, 2))
    return m, (w.sum(1) * ax).sum(1) / m.clamp_min(1e-6), (w.sum(2) * ax).sum(1) / m.clamp_min(1e-6)


def _pixel_rows(videos: torch.Tensor, scenes: list, first_chunk_frames: int) -> list[tuple[float, float, bool]]:
    """(mass, speed, moves the prompted way) of each one-object video (see pixel_motion)."""
    from . import world

    if len(videos) != len(scenes):
        raise ValueError(f"need one scene per video, got {len(videos)} videos and {len(scenes)} scenes")
    last = first_chunk_frames - 1
    rows = []
    for v, s in zip(videos, scenes):
        if len(s.objects) != 1:
            continue
        m, cx, cy = object_track(v.float())
        dx, dy = world.DIRECTIONS[s.objects[0].direction]
        speed = float(torch.stack([cx.diff(), cy.diff()]).norm(dim=0).mean())
        rows.append((float(m.mean()), speed, float((cx[last] - cx[0]) * dx + (cy[last] - cy[0]) * dy) > 1.0))
    return rows


def _pixel_summary(rows: list[tuple[float, float, bool]]) -> dict:
    if not rows:
        return {}
    n = len(rows)
    mass, speed, along = (sum(col) / n for col in zip(*rows))
    return {"pixel/mass": mass, "pixel/speed": speed, "pixel/moves_prompted_way": along, "pixel/videos": n}


def pixel_motion(videos: torch.Tensor, scenes: list, first_chunk_frames: int = FIRST_CHUNK_FRAMES) -> dict:
    """Pixel statistics of videos [B, F, 3, S, S] of one-object scenes, beside the TA model's reading:
    mean object mass, speed (centroid pixels per frame) and the fraction of videos whose object moves the
    prompted way by more than one pixel over the first chunk (frames 0 .. first_chunk_frames - 1; the world
    starts objects in the half they move away from, so no bounce happens that early)."""
    return _pixel_summary(_pixel_rows(videos, scenes, first_chunk_frames))


class _Tally:
    """Recognition hits (every attribute, and each alone), mean rewards and (given the scenes) pixel motion,
    accumulated over batches of videos."""

    def __init__(self, reward):
        from ..rewards.toy import TA_HEADS

        self.reward, self.heads = reward, TA_HEADS
        self.hits, self.per, self.scores = [], {k: [] for k in TA_HEADS}, {}
        self.pixels: list[tuple[float, float, bool]] = []

    def add(self, videos: torch.Tensor, prompts: list[str], scenes: list | None = None) -> None:
        from ..rewards.toy import prepare, prompt_targets, recognised

        logits = self.reward.ta.net(prepare(videos))
        targets = prompt_targets(prompts)
        self.hits.append(recognised(logits, targets))
        for k in self.heads:
            self.per[k].append(recognised(logits, targets, heads=(k,)))
        for k, v in self.reward(videos, prompts).items():
            self.scores.setdefault(k, []).append(v)
        if scenes is not None:
            self.pixels += _pixel_rows(videos.clamp(0, 1).cpu(), scenes, FIRST_CHUNK_FRAMES)

    def result(self) -> dict:
        hits = torch.cat(self.hits)
        out = {"recognition_rate": float(hits.float().mean()), "videos": len(hits)}
        out.update({f"recognition_rate/{k}": float(torch.cat(v).float().mean()) for k, v in self.per.items()})
        out.update({f"mean/{k}": float(torch.cat(v).mean()) for k, v in self.scores.items()})
        out.update(_pixel_summary(self.pixels))
        return out


@torch.no_grad()
def recognition(gen, reward, prompts: list[str], samples_per_prompt: int = 2, num_chunks: int = 3, scenes: list | None = None) -> dict:
    """scenes: the world scenes of the prompts (scenes_of_prompts), for the pixel statistics; None: none."""
    if scenes is not None and len(scenes) != len(prompts):
        raise ValueError(f"need one scene per prompt, got {len(prompts)} prompts and {len(scenes)} scenes")
    tally = _Tally(reward)
    for i, p in enumerate(prompts):
        lat = gen.sampler.generate(gen.cross([p] * samples_per_prompt), num_chunks=num_chunks, latent_hw=(8, 8), samples=list(range(samples_per_prompt)))
        tally.add(gen.vae.decode(lat).float(), [p] * samples_per_prompt, None if scenes is None else [scenes[i]] * samples_per_prompt)
    return tally.result()


@torch.no_grad()
def ground_truth_recognition(vae, reward, scenes: list) -> dict:
    """recognition()'s numbers for the world's own videos of `scenes`, passed through the VAE (encode, then
    decode) as every generated video is: the ceiling of the generator's rates, set by what the VAE keeps and
    the TA model reads (through the VAE's 8x8-pixel cells a shape is hard to tell; a direction is not)."""
    from . import world

    tally = _Tally(reward)
    for i in range(0, len(scenes), 16):
        batch = scenes[i : i + 16]
        tally.add(vae.decode(vae.encode(world.render_batch(batch))).float(), [s.prompt for s in batch], batch)
    return tally.result()


def scenes_of_prompts(prompts: list[str], root: str | Path | None = None) -> list | None:
    """The world scenes the weights' prompts.txt was written from (build: the recipe's prompts_seed and
    num_prompts, one object each), for the first len(prompts) prompts; None when they do not match."""
    from . import world

    recipe = assets.read_manifest(root).get("recipe", {})
    if "prompts_seed" not in recipe:
        return None
    scenes = world.scenes(recipe["prompts_seed"], len(prompts), two_objects=0.0)
    return scenes if [s.prompt for s in scenes] == list(prompts) else None


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
    disabled ('before': the base model) and enabled ('after'). Prompt i gets noise ids sample_offset +
    i * samples_per_prompt + j (never a training group's, never another prompt's: see
    reproduce.eval_noise_ids)."""
    from .. import adapters
    from ..rewards.toy import ToyVideoAlign

    reward = ToyVideoAlign()
    out = {}
    for tag in ("before", "after"):
        ctx = adapters.adapters_disabled(trainer.model) if tag == "before" else contextlib.nullcontext()
        scores: dict[str, list[torch.Tensor]] = {}
        with ctx:
            for i, p in enumerate(prompts):
                cross = trainer.cross_for(p)
                ids = [sample_offset + i * samples_per_prompt + j for j in range(samples_per_prompt)]
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
    scenes = scenes_of_prompts(prompts, a.weights)
    res = {"recognition": recognition(gen, reward, prompts, a.samples, scenes=scenes)}
    res["ground_truth"] = ground_truth_recognition(gen.vae, reward, scenes) if scenes else None
    res["spreads"] = spreads(gen, reward, prompts, group_size=a.group_size)
    res["seconds"] = {"wall": round(time.perf_counter() - t0, 1), "cpu": round(time.process_time() - c0, 1)}
    text = json.dumps(res, indent=1)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
