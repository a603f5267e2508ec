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

from . import assets, base, reward_models, world


@dataclass
class Recipe:
    seed: int = 0
    shift: float = 1.0
    """The few-step sampler's shift (timesteps 1000, 750, 500, 250 warped by it): the student's sigmas."""
    train_clips: int = 1024
    reward_clips: int = 384
    two_objects: float = 0.25
    teacher_steps: int = 800
    teacher_batch: int = 32
    teacher_lr: float = 1e-3
    ode_samples: int = 512
    ode_steps: int = 24
    guidance: float = 3.0
    student_steps: int = 500
    student_batch: int = 32
    student_lr: float = 3e-4
    ta_steps: int = 400
    vq_steps: int = 300
    mq_steps: int = 300
    reward_batch: int = 32
    reward_lr: float = 2e-3
    prompts_seed: int = 1
    num_prompts: int = 32

    @classmethod
    def smoke(cls) -> Recipe:
        """A few steps of everything (tests: the pipeline runs end to end; the result is useless)."""
        return cls(train_clips=8, reward_clips=8, teacher_steps=2, teacher_batch=2, ode_samples=2, ode_steps=4,
                   student_steps=2, student_batch=2, ta_steps=2, vq_steps=2, mq_steps=2, reward_batch=2, num_prompts=4)


def sampler_sigmas(shift: float) -> list[float]:
    return [float(base.warp(s / 1000, shift)) for s in (1000, 750, 500, 250)]


def renormalise_vae(vae_dir: Path, scenes: list) -> None:
    """Re-measure the VAE config's latent normalisation on world clips: per-channel means, and ONE scale for
    all channels (the latents' overall std becomes 1). The tiny VAE's own statistics come from its smooth
    synthetic clips, under which world latents have std ~0.36; a per-channel std would blow up the 13
    channels that carry only small detail the decoder mostly ignores."""
    from ..model.vae import WanVAE

    vae = WanVAE(vae_dir)
    with torch.no_grad():
        z = vae.encode(world.render_batch(scenes))  # normalised with the old statistics
    old_mean = torch.tensor(vae.vae.config.latents_mean)
    old_std = torch.tensor(vae.vae.config.latents_std)
    raw = z * old_std.view(1, 1, -1, 1, 1) + old_mean.view(1, 1, -1, 1, 1)
    mean = raw.mean(dim=(0, 1, 3, 4))
    scale = (raw - mean.view(1, 1, -1, 1, 1)).pow(2).mean().sqrt()
    conf_path = vae_dir / "config.json"
    conf = json.loads(conf_path.read_text())
    conf["latents_mean"] = [round(float(m), 6) for m in mean]
    conf["latents_std"] = [round(float(scale), 6)] * len(mean)
    conf_path.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")


class _Clock:
    def __init__(self, log):
        self.log, self.stages = log, {}

    def __call__(self, name):
        clock = self

        class _Stage:
            def __enter__(self):
                self.c, self.w = time.process_time(), time.perf_counter()
                clock.log(f"[{name}] ...")

            def __exit__(self, *exc):
                cpu, wall = time.process_time() - self.c, time.perf_counter() - self.w
                clock.stages[name] = {"cpu_s": round(cpu, 1), "wall_s": round(wall, 1)}
                clock.log(f"[{name}] done: {cpu:.0f} s CPU, {wall:.0f} s wall")

        return _Stage()


def build(out: str | Path, recipe: Recipe | None = None, *, threads: int = 1, log=print, command: str | None = None) -> dict:
    """Build every toy weight into `out` (a fresh folder) and write its manifest. Returns the manifest."""
    from ..model.checkpoint import save_model
    from ..model.config import get_preset
    from ..model.text_encoder import TextEncoder
    from ..model.tiny_assets import build_tiny_text_encoder, ensure_tiny_assets
    from ..model.vae import WanVAE
    from ..model.wan import CausalWanModel
    from safetensors.torch import save_file

    r = recipe or Recipe()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    torch.manual_seed(r.seed)
    clock = _Clock(log)
    cpu0, wall0 = time.process_time(), time.perf_counter()

    with clock("assets"):
        te_dir, vae_dir = out / "text_encoder", out / "vae"
        shutil.rmtree(te_dir, ignore_errors=True)
        shutil.rmtree(vae_dir, ignore_errors=True)
        build_tiny_text_encoder(te_dir, extra_words=world.TOY_WORDS, seed=r.seed)
        shutil.copytree(ensure_tiny_assets()["vae"], vae_dir, ignore=shutil.ignore_patterns("arcopo_tiny_asset.json"))
        renormalise_vae(vae_dir, world.scenes(r.seed + 7, 64))
        cfg = get_preset("toy")
        text = TextEncoder(te_dir, text_len=cfg.text_len)
        vae = WanVAE(vae_dir)
        prompts = [s.prompt for s in world.scenes(r.prompts_seed, r.num_prompts, two_objects=0.0)]
        (out / "prompts.txt").write_text("\n".join(prompts) + "\n")

    with clock("data"):
        scenes = world.scenes(r.seed, r.train_clips, two_objects=r.two_objects)
        lat, clips = [], []
        with torch.no_grad():
            for i in range(0, len(scenes), 16):
                v = world.render_batch(scenes[i : i + 16])
                z = vae.encode(v)
                lat.append(z)
                if i < r.reward_clips:
                    clips.append(reward_models.to_clip(vae.decode(z)))
        latents = torch.cat(lat)
        clips = torch.cat(clips)[: r.reward_clips]
        emb = text.encode([s.prompt for s in scenes])
        data = base.LatentSet(latents, emb)
        log(f"latents {tuple(latents.shape)} std {latents.std():.3f}; reward clips {tuple(clips.shape)}")

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

    sig = sampler_sigmas(r.shift)
    with clock("teacher"):
        torch.manual_seed(r.seed)
        model = CausalWanModel(cfg)
        base.train_teacher(model, data, steps=r.teacher_steps, batch=r.teacher_batch, lr=r.teacher_lr, seed=r.seed, log=log)

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
        base.train_student(student, ends, points, ode_text, student_sigmas=sig, steps=r.student_steps, batch=r.student_batch, lr=r.student_lr, seed=r.seed, log=log)
        save_model(student, out / "base_model.safetensors")

    manifest = {
        "command": command or "python -m arcopo_fast.toy build",
        "seed": r.seed,
        "recipe": dataclasses.asdict(r),
        "sampler": {"denoising_steps": [1000, 750, 500, 250], "shift": r.shift, "sigmas": sig},
        "threads": threads,
        "stages": clock.stages,
        "total": {"cpu_s": round(time.process_time() - cpu0, 1), "wall_s": round(time.perf_counter() - wall0, 1)},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()},
    }
    manifest["sha256"] = assets.file_hashes(out)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m arcopo_fast.toy build", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(assets.WEIGHTS_DIR), help="output folder (default: the package's weights folder)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: reproducible; 2 threads on a busy 2-core box can be far slower)")
    ap.add_argument("--smoke", action="store_true", help="a few steps of every stage (checks the pipeline, useless weights)")
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
    build(a.out, r, threads=a.threads, log=lambda m: print(m, flush=True), command=cmd.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
