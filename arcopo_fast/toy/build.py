"""`python -m arcopo_fast.toy build`: every shipped toy-world weight, from nothing, by the project's code.

Stages (CPU time on one thread of a 2-core box is recorded per stage in the manifest):
  assets   the toy text encoder (random UMT5, world vocabulary) and the VAE (the tiny trained Wan VAE)
  data     world scenes -> rendered videos -> VAE latents (the generator's data) and VAE reconstructions
           (the reward models' data), prompts -> text embeddings
  rewards  TA / VQ / MQ reward models (reward_models.py)
  teacher  causal flow matching by teacher forcing (base.py)
  ode      the teacher's guided Euler ODE samples: noise -> video, trajectories at the student's sigmas
  student  ODE regression of the 4-step student, initialised from the teacher -> base_model.safetensors
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..sampler import FewStepSchedule
from . import assets, base, reward_models, world


@dataclass
class Recipe:
    seed: int = 0
    shift: float = 1.0
    """The few-step sampler's shift (timesteps 1000, 750, 500, 250 warped by it): the student's sigmas."""
    train_clips: int = 1024
    reward_clips: int = 768
    two_objects: float = 0.25
    teacher_steps: int = 1000
    teacher_batch: int = 32
    teacher_lr: float = 3e-3
    teacher_ema: float = 0.999
    dead_channel_weight: float = 0.02
    """Loss weight of the latent channels the VAE's decoder ignores (base.dead_channel_weights)."""
    motion_weight: float = 2.0
    """Weight of the frame-difference term in the teacher and student losses (base.train_teacher)."""
    ode_samples: int = 512
    ode_steps: int = 24
    guidance: float = 2.0
    student_steps: int = 500
    student_batch: int = 32
    student_lr: float = 3e-4
    ta_steps: int = 800
    vq_steps: int = 1500
    mq_steps: int = 1500
    reward_batch: int = 16
    reward_lr: float = 1e-3
    prompts_seed: int = 1
    num_prompts: int = 32

    @classmethod
    def smoke(cls) -> Recipe:
        """A few steps of everything (tests: the pipeline runs end to end; the result is useless)."""
        return cls(train_clips=8, reward_clips=8, teacher_steps=2, teacher_batch=2, ode_samples=2, ode_steps=4,
                   student_steps=2, student_batch=2, ta_steps=2, vq_steps=2, mq_steps=2, reward_batch=2, num_prompts=4)


def sampler_sigmas(shift: float) -> list[float]:
    """The few-step sampler's sigmas at this shift (the student's training sigmas)."""
    return FewStepSchedule(shift=shift).sigmas()


def renormalise_vae(vae_dir: Path, scenes: list, ignored: float = 0.01, squash: float = 1e3) -> None:
    """Re-measure the VAE config's per-channel latent normalisation (latents_mean / latents_std) on world
    clips: every channel the decoder reads gets mean 0 and std 1. A channel whose one-std change moves the
    decoded video by less than `ignored` of the most influential channel's change is scaled down `squash`x
    instead (it carries detail the decoder ignores: the tiny VAE reads only its colour channels), so the
    generator need not model it: it sits at ~0. The tiny VAE's own statistics come from its smooth synthetic
    clips, under which world latents have std ~0.36."""
    from ..model.vae import WanVAE

    vae = WanVAE(vae_dir)
    with torch.no_grad():
        z = vae.encode(world.render_batch(scenes))  # normalised with the old statistics
        old_mean = torch.tensor(vae.vae.config.latents_mean)
        old_std = torch.tensor(vae.vae.config.latents_std)
        raw = z * old_std.view(1, 1, -1, 1, 1) + old_mean.view(1, 1, -1, 1, 1)
        mean, std = raw.mean(dim=(0, 1, 3, 4)), raw.std(dim=(0, 1, 3, 4))
        base = vae.decode(z[:4])
        effect = []
        for c in range(z.shape[2]):
            zc = z[:4].clone()
            zc[:, :, c] += std[c] / old_std[c]
            effect.append(float((vae.decode(zc) - base).abs().mean()))
    effect = torch.tensor(effect)
    std = torch.where(effect < ignored * effect.max(), std * squash, std)
    conf_path = vae_dir / "config.json"
    conf = json.loads(conf_path.read_text())
    conf["latents_mean"] = [round(float(m), 6) for m in mean]
    conf["latents_std"] = [float(f"{float(s):.6g}") for s in std]
    conf_path.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")


class _Clock:
    """`with clock(name):` times a stage (CPU and wall) into clock.stages and logs its start and end."""

    def __init__(self, log):
        self.log, self.stages = log, {}

    @contextlib.contextmanager
    def __call__(self, name):
        c, w = time.process_time(), time.perf_counter()
        self.log(f"[{name}] ...")
        yield
        cpu, wall = time.process_time() - c, time.perf_counter() - w
        self.stages[name] = {"cpu_s": round(cpu, 1), "wall_s": round(wall, 1)}
        self.log(f"[{name}] done: {cpu:.0f} s CPU, {wall:.0f} s wall")


STAGES = ("assets", "data", "rewards", "teacher", "ode", "student")
GENERATOR_STAGES = ("teacher", "ode", "student")


def build(
    out: str | Path, recipe: Recipe | None = None, *, threads: int = 1, log=print, command: str | None = None,
    stages: tuple[str, ...] = STAGES, teacher_out: str | Path | None = None,
) -> dict:
    """Build the toy weights into `out` and write its manifest; returns the manifest. `stages` may leave out
    the assets (reusing those in `out`), the rewards, or the three generator stages together (they hand
    the teacher over in memory). Every stage draws from its own seeded generators, so a partial rebuild
    gives the files a full build would. Runs on `threads` CPU threads (bit-reproducible at 1) and gives the
    process its thread count back afterwards."""
    before = torch.get_num_threads()
    try:
        return _build(out, recipe, threads=threads, log=log, command=command, stages=stages, teacher_out=teacher_out)
    finally:
        torch.set_num_threads(before)


def _build(out, recipe, *, threads, log, command, stages, teacher_out) -> dict:
    unknown = sorted(set(stages) - set(STAGES))
    if unknown or "data" not in stages and len(set(stages) - {"assets"}) > 0:
        raise ValueError(f"stages must be among {STAGES} and include 'data' when training anything, got {stages}")
    gen = [st in stages for st in GENERATOR_STAGES]
    if any(gen) and not all(gen):
        raise ValueError(f"stages: the generator stages {GENERATOR_STAGES} run together, got {stages}")
    from safetensors.torch import save_file

    from ..model.checkpoint import save_model
    from ..model.config import get_preset
    from ..model.text_encoder import TextEncoder
    from ..model.tiny_assets import build_tiny_text_encoder, ensure_tiny_assets
    from ..model.vae import WanVAE
    from ..model.wan import CausalWanModel

    r = recipe or Recipe()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    torch.manual_seed(r.seed)
    clock = _Clock(log)
    cpu0, wall0 = time.process_time(), time.perf_counter()

    te_dir, vae_dir = out / "text_encoder", out / "vae"
    if "assets" in stages:
        with clock("assets"):
            shutil.rmtree(te_dir, ignore_errors=True)
            shutil.rmtree(vae_dir, ignore_errors=True)
            build_tiny_text_encoder(te_dir, extra_words=world.TOY_WORDS, seed=r.seed)
            shutil.copytree(ensure_tiny_assets()["vae"], vae_dir, ignore=shutil.ignore_patterns("arcopo_tiny_asset.json"))
            renormalise_vae(vae_dir, world.scenes(r.seed + 7, 64))
            prompts = [s.prompt for s in world.scenes(r.prompts_seed, r.num_prompts, two_objects=0.0)]
            (out / "prompts.txt").write_text("\n".join(prompts) + "\n")
    cfg = get_preset("toy")
    text = TextEncoder(te_dir, text_len=cfg.text_len)
    vae = WanVAE(vae_dir)
    if "data" not in stages:
        return _finish(out, r, clock, threads, command, cpu0, wall0, log)

    with clock("data"):
        scenes = world.scenes(r.seed, r.train_clips if all(gen) else r.reward_clips, two_objects=r.two_objects)
        lat, clips = [], []
        with torch.no_grad():
            for i in range(0, len(scenes), 16):
                v = world.render_batch(scenes[i : i + 16])
                z = vae.encode(v)
                lat.append(z)
                if i < r.reward_clips and "rewards" in stages:
                    clips.append(reward_models.to_clip(vae.decode(z)))
        latents = torch.cat(lat)
        clips = torch.cat(clips)[: r.reward_clips] if clips else None
        emb = text.encode([s.prompt for s in scenes])
        data = base.LatentSet(latents, emb)
        log(f"latents {tuple(latents.shape)} std {latents.std():.3f}")

    if "rewards" in stages:
        with clock("rewards"):
            labels = [s.labels for s in scenes[: r.reward_clips]]
            bgs = torch.tensor([lab["background"][0] for lab in labels])
            kw = dict(batch=r.reward_batch, lr=r.reward_lr, seed=r.seed, log=log)
            nets = {
                "ta": reward_models.train_ta(clips, labels, steps=r.ta_steps, **kw),
                "vq": reward_models.train_vq(clips, steps=r.vq_steps, **kw),
                "mq": reward_models.train_mq(clips, bgs, steps=r.mq_steps, **kw),
            }
            for k, net in nets.items():
                save_file({n: p.detach().contiguous() for n, p in net.state_dict().items()}, str(out / f"reward_{k}.safetensors"))


    if not all(gen):
        return _finish(out, r, clock, threads, command, cpu0, wall0, log)
    sig = sampler_sigmas(r.shift)
    with clock("teacher"):
        torch.manual_seed(r.seed)
        model = CausalWanModel(cfg)
        weights = base.dead_channel_weights(latents, weight=r.dead_channel_weight)
        base.train_teacher(model, data, steps=r.teacher_steps, batch=r.teacher_batch, lr=r.teacher_lr, seed=r.seed,
                           ema=r.teacher_ema, channel_weights=weights, motion_weight=r.motion_weight, log=log)
        if teacher_out:  # not shipped: for inspecting the ODE targets' source
            save_model(model, teacher_out)

    with clock("ode"):
        g = torch.Generator().manual_seed(r.seed + 1)
        idx = torch.randperm(len(scenes), generator=g)[: r.ode_samples]
        ode_text = emb[idx]
        noise = torch.randn(len(idx), *latents.shape[1:], generator=g)
        ends, points = [], []
        for i in range(0, len(idx), 64):
            e, p = base.ode_trajectories(model, ode_text[i : i + 64], noise[i : i + 64], student_sigmas=sig, steps=r.ode_steps, guidance=r.guidance)
            ends.append(e)
            points.append(p)
        ends, points = torch.cat(ends), torch.cat(points)

    with clock("student"):
        student = copy.deepcopy(model)
        base.train_student(student, ends, points, ode_text, student_sigmas=sig, steps=r.student_steps, batch=r.student_batch, lr=r.student_lr, seed=r.seed,
                            channel_weights=weights, motion_weight=r.motion_weight, log=log)
        save_model(student, out / "base_model.safetensors")

    return _finish(out, r, clock, threads, command, cpu0, wall0, log)


def _finish(out: Path, r: Recipe, clock: _Clock, threads: int, command: str | None, cpu0: float, wall0: float, log) -> dict:
    """Write (or update, after a partial rebuild) the manifest: stage times, the recipe, file hashes."""
    path = out / "manifest.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    if old and old.get("recipe", {}).get("seed") != r.seed:
        old = {}
    run = {"command": command or "python -m arcopo_fast.toy build", "stages": sorted(clock.stages),
           "cpu_s": round(time.process_time() - cpu0, 1), "wall_s": round(time.perf_counter() - wall0, 1)}
    manifest = {
        "command": "python -m arcopo_fast.toy build" + (f" --seed {r.seed}" if r.seed else ""),
        "seed": r.seed,
        "recipe": dataclasses.asdict(r),
        "sampler": {"denoising_steps": list(FewStepSchedule().denoising_steps), "shift": r.shift, "sigmas": sampler_sigmas(r.shift)},
        "threads": threads,
        "stages": {**old.get("stages", {}), **clock.stages},
        "runs": [*old.get("runs", []), run],
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()},
    }
    manifest["total"] = {k: round(sum(st[k] for st in manifest["stages"].values()), 1) for k in ("cpu_s", "wall_s")}
    manifest["sha256"] = assets.file_hashes(out)
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    log(f"manifest: {path} (stages {sorted(manifest['stages'])}; {manifest['total']['cpu_s']:.0f} s CPU in all)")
    return manifest


def main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m arcopo_fast.toy build", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(assets.WEIGHTS_DIR), help="output folder (default: the package's weights folder)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: reproducible; 2 threads on a busy 2-core box can be far slower)")
    ap.add_argument("--smoke", action="store_true", help="a few steps of every stage (checks the pipeline, useless weights)")
    ap.add_argument("--teacher-out", default=None, help="also save the teacher here (a .safetensors path; not shipped)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)} (the generator stages run together)")
    for f in dataclasses.fields(Recipe):
        if f.name != "seed":
            ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None)
    a = ap.parse_args(argv)
    r = Recipe.smoke() if a.smoke else Recipe()
    r.seed = a.seed
    for f in dataclasses.fields(Recipe):
        v = getattr(a, f.name, None)
        if f.name != "seed" and v is not None:
            setattr(r, f.name, v)
    cmd = "python -m arcopo_fast.toy build " + " ".join(argv)
    build(a.out, r, threads=a.threads, log=lambda m: print(m, flush=True), command=cmd.strip(), stages=tuple(a.stages.split(",")), teacher_out=a.teacher_out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
