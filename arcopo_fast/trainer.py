"""The AR-CoPO trainer: forked group rollouts, rewards overlapped with the next rollout, the clipped
contrastive update on the pivot chunk, checkpoints, resume, torchrun.

One iteration, per rank (algorithm.md):
    prompt -> text embedding (cached on disk) -> cross-attention K/V (once per prompt)
    -> pivot p -> prefix chunks < p once -> fork the KV cache into G branches
    -> chunk p from perturbed noise, recorded (x_{p,k}, x0_old) -> chunks > p (micro-batched)
    -> [worker thread / 2nd CUDA stream] VAE decode -> rewards        (overlaps the next group's rollout)
    -> advantages -> epochs x (anchors' x0_theta vs the detached prefix cache -> clipped loss -> step)
    -> metrics, checkpoint
Semi-on-policy runs draw the groups from a replay buffer of reference rollouts instead, and rebuild each
group's prefix cache from its clean latents with the adapters disabled (the reference weights).
run.algorithm = 'sde-grpo' swaps in the SDE-GRPO baseline's rollout engine and group loss (rl/sde_grpo.py);
everything else above is shared.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import queue
import random
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import adapters, checkpointing, ops
from . import distributed as dist_utils
from . import log as log_setup
from .config import TrainConfig, resume_conflicts
from .data import PromptSet
from .metrics import MetricsLogger, peak_memory_gb, provenance
from .model.config import get_preset
from .model.kv_cache import CrossKV
from .model.wan import CausalWanModel
from .profiling import maybe_profile, nvtx_range
from .rewards.base import RewardError
from .rl import sde_grpo
from .rl.loss import group_advantages
from .rl.replay import INDEX, ReplayBuffer, weights_digest, write_group, write_index
from .rl.rollout import GroupSample, RolloutEngine
from .rl.update import group_loss, sample_anchors
from .sampler import StreamingSampler

EVAL_SAMPLE_ID = 2**31 - 1  # first noise id of the before/after sample videos (never a training group)

logger = logging.getLogger(__name__)


ALGORITHMS = {
    # run.algorithm -> (the group rollout engine, the loss of one group); everything else is shared
    "ar-copo": (RolloutEngine, group_loss),
    "sde-grpo": (sde_grpo.SdeRolloutEngine, sde_grpo.group_loss),
}


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any tuple of ints/strings (stable across processes, unlike hash())."""
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:15], 16)


def _sync(device: torch.device) -> None:
    # NOTE(sync): phase boundaries only (timing of rollout / reward / update), never inside a phase.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trainer:
    """Trainer(cfg) runs the configured training; `rewards` replaces cfg.reward.rewards with reward objects
    or functions (each a callable (videos, prompts) -> Tensor[B] | dict of Tensor[B], a RewardSpec, or a
    config entry; see arcopo_fast.rewards.base). They are recorded in the saved config by import string, so
    that `python -m arcopo_fast.train --resume` can rebuild them (a class with its default arguments); to
    resume from Python with the same objects, pass the same `rewards`."""

    def __init__(self, cfg: TrainConfig, *, resume: str | bool | None = None, overwrite: bool = False,
                 allow_pickle: bool = False, rewards: Sequence[Any] | None = None):
        """resume: True (the latest checkpoint of run.out_dir) or a checkpoint / run folder, which must be
        run.out_dir's own. overwrite: a fresh run may replace the run in run.out_dir (it is deleted); a
        resume may continue from an older checkpoint of it (the newer ones are deleted). allow_pickle: load a
        trusted legacy checkpoint whose files hold pickled objects (unpickling can run code). rewards: see
        the class docstring.
        Claims run.out_dir first (a lock, held until run() ends or close()); when construction fails, what it
        wrote (the random base weights, a folder it created) is removed again."""
        if rewards is not None:
            cfg = _with_rewards(cfg, rewards)
        self._reward_items = rewards
        self._lock, self._created_dir = None, False
        try:
            self._init(cfg, resume=resume, overwrite=overwrite, allow_pickle=allow_pickle)
        except BaseException:
            if self._lock is not None and getattr(self, "_resume_from", None) is None:
                for name in ("base_model.safetensors", "base_model.json"):  # what a fresh construction wrote
                    (self.run_dir / name).unlink(missing_ok=True)
            self.close()
            if self._created_dir:  # nothing of ours may stay behind: only the lock file is left
                with contextlib.suppress(OSError):
                    (self.run_dir / checkpointing.LOCK).unlink(missing_ok=True)
                    self.run_dir.rmdir()
            raise

    def _init(self, cfg: TrainConfig, *, resume, overwrite: bool, allow_pickle: bool) -> None:
        cfg.validate()  # fields may have been changed since the config was built
        self.cfg = cfg
        os.environ["ARCOPO_BACKEND"] = cfg.run.attention_backend
        self.dist, self.device = dist_utils.init(cfg.run.device)
        self.run_dir = Path(cfg.run.out_dir).expanduser()
        self.allow_pickle = allow_pickle
        self._resume_from = self._resume_checkpoint(resume) if resume else None
        refused = None
        if self.dist.is_main:
            try:
                self._lock, self._created_dir = checkpointing.claim_run_dir(
                    self.run_dir, resume_from=self._resume_from, overwrite=overwrite)
            except Exception as e:  # noqa: BLE001 - re-raised below, after every rank knows
                refused = e
        if dist_utils.all_reduce_max(refused is not None, self.device) and refused is None:
            raise RuntimeError(f"rank 0 could not claim the run folder {self.run_dir} (its error says why)")
        if refused is not None:
            raise refused
        self.adapter_name = adapters.ADAPTER_FOR_MODE[cfg.run.mode]
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.dtype]
        self._stop = False
        self.start_iteration = 0

        with nvtx_range("setup"):
            self.model = self._build_model()
            self.text_encoder, self.vae = self._build_text_and_vae()
            self.reward = self._build_reward()
        self.prompts = PromptSet(cfg.data.prompts, cfg.run.seed)
        s = cfg.sampler
        self.latent_hw = (s.latent_height, s.latent_width)
        self.sampler = StreamingSampler(
            self.model,
            s.schedule(),
            seed=cfg.run.seed,
            compile=s.compile,
            compile_backend=s.compile_backend,
        )
        a = cfg.algo
        engine_cls, self.group_loss = ALGORITHMS[cfg.run.algorithm]
        self.engine = engine_cls(
            self.sampler,
            num_chunks=s.num_chunks,
            latent_hw=self.latent_hw,
            group_size=a.group_size,
            perturb_scale=a.perturb_scale,
            micro_batch=cfg.run.micro_batch,
            fork=cfg.run.fork,
            tau=a.tau,
            tau_auto_scale=a.tau_auto_scale,
        )
        self.steps = list(a.steps) if a.steps is not None else list(range(len(s.denoising_steps)))
        self.pivot_max = s.num_chunks - 1 if a.pivot_max is None else a.pivot_max

        self.train_model = dist_utils.wrap_model(self.model, cfg.adapter.kind, self.dist)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        self.buffer = self._prepare_buffer() if cfg.run.mode == "semi-on-policy" else None

        if self._resume_from is not None:
            state = checkpointing.load(self._resume_from, model=self.model, optimizer=self.optimizer, allow_pickle=allow_pickle)
            self.start_iteration = int(state["iteration"])
        self.log = None
        if self.dist.is_main:
            cfg.save(self.run_dir / "config.yaml")
            info = dict(provenance(), backends=ops.describe(self.device), world_size=self.dist.world_size)
            (self.run_dir / "run_info.json").write_text(json.dumps(info, indent=2))
            self.log = MetricsLogger(
                self.run_dir,
                tensorboard=cfg.run.tensorboard,
                wandb=cfg.run.wandb,
                wandb_project=cfg.run.wandb_project,
                config=cfg.to_dict(),
                resume_from=self.start_iteration if resume else None,
                resuming=bool(resume),
            )

    def _resume_checkpoint(self, resume: str | bool) -> Path:
        """The checkpoint to resume; refuses one of another run folder, or a config that changes the fields
        a run is made of (config.RESUME_FIXED)."""
        ckpt = checkpointing.resolve(self.run_dir if resume is True else resume)
        owner = checkpointing.run_dir_of(ckpt)
        if owner is not None and owner.resolve() != self.run_dir.resolve():
            raise ValueError(
                f"checkpoint {ckpt} belongs to the run folder {owner}, but run.out_dir is {self.run_dir}: a resume "
                f"continues in the checkpoint's own folder (set run.out_dir={owner}), or copy the folder first")
        state = checkpointing.read_state(ckpt)
        reached = int(state.get("iteration", 0))
        if self.cfg.run.iterations < reached:
            raise ValueError(
                f"run.iterations={self.cfg.run.iterations} is below the {reached} iterations checkpoint {ckpt} has "
                f"done: a resume can only continue a run (give run.iterations={reached} or more)")
        changed = resume_conflicts(state.get("config", {}), self.cfg)
        if changed:
            listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise ValueError(
                f"cannot resume {ckpt} with a config that changes what the run is made of ({listed}); "
                "these fields are fixed for a run: start a new run (another run.out_dir) instead")
        return ckpt

    def close(self) -> None:
        """Release the run folder (idempotent; run() does it when it returns)."""
        if self._lock is not None:
            self._lock.release()

    # -- construction ----------------------------------------------------------------------------------

    def _build_model(self) -> CausalWanModel:
        cfg = self.cfg
        # Seeded either way: the random base weights (no checkpoint) and the LoRA factors drawn by add_lora below
        # must not depend on what ran before in this process, and must agree across ranks.
        torch.manual_seed(cfg.run.seed)
        if cfg.model.checkpoint:
            from .model.checkpoint import load_model

            model = load_model(cfg.model.checkpoint, ema=cfg.model.ema, device=self.device, dtype=self.dtype,
                               allow_pickle=self.allow_pickle)
        else:
            model = CausalWanModel(get_preset(cfg.model.preset)).to(device=self.device, dtype=self.dtype)
        model.requires_grad_(False)
        model.eval()
        model.gradient_checkpointing = cfg.optim.gradient_checkpointing
        base = self.run_dir / "base_model.safetensors"
        if not cfg.model.checkpoint and self.dist.is_main and not (self._resume_from is not None and base.is_file()):
            # random base weights are part of the run: keep them so adapters can be merged and evaluated
            # (a resume keeps the file it has; a failed construction removes it again, see __init__)
            from .model.checkpoint import save_model

            save_model(model, base)
        ad = cfg.adapter
        if ad.kind == "lora":
            adapters.add_lora(model, self.adapter_name, rank=ad.rank, alpha=ad.alpha, target_modules=ad.target_modules)
        else:
            for p in model.parameters():
                p.requires_grad_(True)
        return model

    def _build_text_and_vae(self):
        from .model.text_encoder import TextEncoder
        from .model.vae import WanVAE

        m = self.cfg.model
        te_path, vae_path = m.text_encoder, m.vae
        if te_path is None or vae_path is None:
            from .model.tiny_assets import ensure_tiny_assets

            root = Path(m.assets_dir).expanduser()
            if self.dist.is_main:
                ensure_tiny_assets(root)
            dist_utils.barrier()
            assets = ensure_tiny_assets(root)
            te_path = te_path or assets["text_encoder"]
            vae_path = vae_path or assets["vae"]
        cache = None if m.embed_cache_dir is None else Path(m.embed_cache_dir).expanduser()
        te = TextEncoder(te_path, text_len=self.model.cfg.text_len, device=self.device, dtype=self.dtype if self.device.type == "cuda" else torch.float32, out_dtype=self.dtype, cache_dir=cache)
        if te.dim != self.model.cfg.text_dim:
            raise ValueError(f"text encoder {te_path} outputs {te.dim} channels, the model expects text_dim={self.model.cfg.text_dim}")
        vae = WanVAE(vae_path, device=self.device, dtype=self.dtype if self.device.type == "cuda" else torch.float32, memory_format=m.vae_memory_format, compile=m.vae_compile)
        return te, vae

    def _build_reward(self):
        from .rewards import CompositeReward

        if self._reward_items is not None:
            return CompositeReward(list(self._reward_items))
        return CompositeReward([dataclasses.asdict(e) for e in self.cfg.reward.rewards])

    def _buffer_settings(self) -> dict[str, Any]:
        s, a = self.cfg.sampler, self.cfg.algo
        settings = {
            "algorithm": self.cfg.run.algorithm,  # where the stored branches' exploration noise entered
            "num_chunks": s.num_chunks,
            "latent_hw": list(self.latent_hw),
            "denoising_steps": list(s.denoising_steps),
            "shift": s.shift,
            "context_noise": s.context_noise,
            "group_size": a.group_size,
            "perturb_scale": a.perturb_scale,
            "tau": a.tau if a.tau_auto_scale == 1.0 else f"{a.tau} x {a.tau_auto_scale:g}",  # old buffers: "auto"
            "model_config": dataclasses.asdict(self.model.cfg),
            # the reference policy, by content (not by path): its weights, compute dtype and noise seed
            "reference_weights": self._reference_weights(),
            "model_dtype": self.cfg.model.dtype,
            "seed": self.cfg.run.seed,
        }
        return json.loads(json.dumps(settings))  # as stored in index.json (tuples become lists)

    def _reference_weights(self) -> str:
        """sha256 of the base (reference) weights' bytes, computed once (a few seconds at 1.3B)."""
        if getattr(self, "_reference_digest", None) is None:
            from .model.checkpoint import model_state_dict

            self._reference_digest = weights_digest(model_state_dict(self.model, merge_lora=False))
        return self._reference_digest

    def _prepare_buffer(self) -> ReplayBuffer:
        r = self.cfg.replay
        root = Path(r.buffer).expanduser() if r.buffer else self.run_dir / "replay_buffer"
        if not ReplayBuffer.exists(root):
            self.collect_buffer(root, r.buffer_groups)
        buf = ReplayBuffer(root)
        buf.check_compatible(self._buffer_settings())
        return buf

    # -- pieces of an iteration ---------------------------------------------------------------------------

    def cross_for(self, prompts: str | Sequence[str]) -> CrossKV:
        """The cross-attention K/V of a prompt (one text row) or of several (a row each), from the on-disk
        embedding cache when present."""
        with torch.no_grad():
            emb = self.text_encoder.encode([prompts] if isinstance(prompts, str) else list(prompts)).to(self.device, self.dtype)
            return self.model.encode_text(emb)

    def pivot_for(self, group: int) -> int:
        return random.Random(derive_seed(self.cfg.run.seed, "pivot", group)).randint(self.cfg.algo.pivot_min, self.pivot_max)

    def score(self, latents: torch.Tensor, prompt: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Decode the branch videos and score them: (total [G], components)."""
        with nvtx_range("decode"):
            if self.cfg.reward.decode_chunked:  # lower peak memory: the VAE's causal feature cache
                dec, F = self.vae.stream(), self.model.cfg.chunk_frames
                videos = torch.cat([dec.decode_chunk(latents[:, i : i + F]) for i in range(0, latents.shape[1], F)], dim=1)
            else:
                videos = self.vae.decode(latents)
        with nvtx_range("reward"):
            return self.reward(videos.float(), [prompt] * latents.shape[0])

    def _submit_score(self, pool, sample: GroupSample):
        """Score a group on the worker thread (and a side CUDA stream), overlapping the next rollout."""
        latents = sample.latents
        if not self.cfg.reward.async_rewards:
            fut = concurrent.futures.Future()
            fut.set_result(self.score(latents, sample.prompt))
            return fut
        if self.device.type != "cuda":
            return pool.submit(self.score, latents, sample.prompt)
        stream = self._reward_stream
        ready = torch.cuda.Event()
        ready.record()
        latents.record_stream(stream)  # the allocator must not reuse it while the side stream reads it

        def work():
            with torch.cuda.stream(stream):
                stream.wait_event(ready)
                out = self.score(latents, sample.prompt)
            stream.synchronize()  # NOTE(sync): on the worker thread only
            return out

        return pool.submit(work)

    def _reward_result(self, fut):
        """A group's (rewards, components), waiting at most reward.timeout seconds (async rewards)."""
        timeout = self.cfg.reward.timeout if self.cfg.reward.async_rewards else None
        try:
            return fut.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            who = getattr(self.reward, "current", None)
            what = f"reward {who!r}" if who else f"decoding and scoring (rewards {getattr(self.reward, 'labels', '?')})"
            raise RewardError(f"{what} did not return within reward.timeout = {timeout:g} s (a hung reward server?); "
                              "the run stops and keeps its last checkpoint") from None

    def rollout_groups(self, iteration: int, pool) -> tuple[list[GroupSample], list[CrossKV], dict[str, float]]:
        """On-policy: this rank's groups of the iteration, rolled out and scored."""
        gpr, world, rank = self.cfg.run.groups_per_rank, self.dist.world_size, self.dist.rank
        samples, crosses, futures = [], [], []
        t0 = time.perf_counter()
        for j in range(gpr):
            group = (iteration * world + rank) * gpr + j
            prompt = self.prompts.for_group(group)
            cross = self.cross_for(prompt)
            with nvtx_range("rollout"):
                s = self.engine.rollout(cross, group=group, pivot=self.pivot_for(group), prompt=prompt)
            futures.append(self._submit_score(pool, s))
            samples.append(s)
            crosses.append(cross)
        _sync(self.device)
        t1 = time.perf_counter()
        for s, fut in zip(samples, futures):
            s.rewards, s.components = self._reward_result(fut)
            s.latents = None  # decoded and scored: free it before the update
        if self.device.type == "cuda" and self.cfg.reward.async_rewards:
            torch.cuda.current_stream().wait_stream(self._reward_stream)
        t2 = time.perf_counter()
        return samples, crosses, {"time/rollout": t1 - t0, "time/reward_wait": t2 - t1}

    def replay_groups(self, iteration: int) -> tuple[list[GroupSample], list[CrossKV], dict[str, float]]:
        """Semi-on-policy: groups drawn uniformly from the buffer, prefix caches rebuilt with the reference
        weights (adapters disabled), under no_grad."""
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(derive_seed(self.cfg.run.seed, "replay", iteration, self.dist.rank))
        idx = torch.randint(len(self.buffer), (self.cfg.replay.groups_per_iteration,), generator=g).tolist()
        samples, crosses = [], []
        for i in idx:
            s = self.buffer.load(i)
            cross = self.cross_for(s.prompt)
            with torch.no_grad(), adapters.adapters_disabled(self.model):
                # the reference context: its cross-attention K/V too (they differ if LoRA targets them)
                s.prefix_cache = self.engine.rebuild_prefix_cache(self.cross_for(s.prompt), s.prefix_latents)
            samples.append(s)
            crosses.append(cross)
        _sync(self.device)
        self._last_buffer_draws = idx
        return samples, crosses, {"time/replay": time.perf_counter() - t0}

    def update(self, iteration: int, samples: list[GroupSample], crosses: list[CrossKV]) -> dict[str, float]:
        """`epochs` optimizer steps on the pivot chunks of `samples`. A non-finite loss or gradient norm
        skips the step (logged), it is never applied."""
        a, o = self.cfg.algo, self.cfg.optim
        lr = o.lr * min(1.0, (iteration + 1) / o.warmup_iterations) if o.warmup_iterations else o.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        advs = [group_advantages(s.rewards.to(self.device), eps=a.adv_eps, quasi_norm_q=a.quasi_norm_q) for s in samples]
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (o.autocast_bf16 and self.device.type == "cuda") else contextlib.nullcontext()
        out: dict[str, float] = {"lr": lr, "skipped_steps": 0}
        logged: dict[str, torch.Tensor] = {}  # device scalars, read back once after the last step
        n = len(samples)
        for epoch in range(a.epochs):
            self.optimizer.zero_grad(set_to_none=True)
            stats = []
            for j, (s, cross, adv) in enumerate(zip(samples, crosses, advs)):
                gen = torch.Generator().manual_seed(derive_seed(self.cfg.run.seed, "anchors", s.group, iteration, epoch))
                anchors = sample_anchors(s.group_size, a.num_anchors, gen)
                no_sync = getattr(self.train_model, "no_sync", None)
                ctx = no_sync() if (no_sync is not None and j < n - 1) else contextlib.nullcontext()
                with ctx, autocast:
                    loss, st = self.group_loss(self.train_model, self.sampler, s, cross, s.prefix_cache, anchors, self.steps, adv, a.clip_eps)
                    (loss / n).backward()
                stats.append(dict(st, loss=loss.detach()))
            norm = torch.nn.utils.clip_grad_norm_(self.params, o.grad_clip if o.grad_clip > 0 else float("inf"))
            loss_sum = torch.stack([st["loss"] for st in stats]).sum()
            # NOTE(sync): one host read per optimizer step, to decide whether the step is applied.
            finite = bool(torch.isfinite(norm) & torch.isfinite(loss_sum))
            if finite:
                self._torn = True  # until run() counts the iteration as completed
                self.optimizer.step()
            else:
                out["skipped_steps"] += 1
                self.optimizer.zero_grad(set_to_none=True)
            for k in stats[0]:
                logged[f"update/{k}/epoch{epoch}"] = torch.stack([st[k] for st in stats]).float().mean()
            # FSDP2: the norm is a DTensor; its full value is a plain tensor (what stack and tolist take)
            logged[f"update/grad_norm/epoch{epoch}"] = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).float()
        logged["adv/abs_mean"] = torch.stack([x.abs().mean() for x in advs]).mean()
        # NOTE(sync): one host read for all the logged numbers of the update
        out.update(zip(logged, torch.stack(list(logged.values())).tolist()))
        for k in ("loss", "ratio_mean", "ratio_max_dev", "clip_frac", "kl"):
            out[f"update/{k}"] = out[f"update/{k}/epoch{a.epochs - 1}"]
        out["update/grad_norm"] = out[f"update/grad_norm/epoch{a.epochs - 1}"]
        return out

    # -- the loop ---------------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> dict:
        """SIGINT (Ctrl-C) and SIGTERM alike: the first finishes the iteration, writes a checkpoint and ends
        the run; a second one stops at once (KeyboardInterrupt)."""
        if not threading_main():
            return {}

        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self._stop:  # the second signal: stop now
                raise KeyboardInterrupt(f"second {name}: stopped at once")
            self._stop = True
            if self.dist.is_main:
                logger.warning("%s: finishing this iteration, writing a checkpoint, then exiting "
                               "(send it again to stop at once)", name)

        return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    def save(self, iteration: int) -> Path | None:
        name = self.adapter_name

        def export(folder: Path):
            if self.cfg.adapter.kind == "lora":
                adapters.save_adapter(self.model, name, folder / "adapter")

        state = {
            "config": self.cfg.to_dict(),
            "mode": self.cfg.run.mode,
            "adapter": name if self.cfg.adapter.kind == "lora" else None,
            "seed": self.cfg.run.seed,
            "data_cursor": iteration * self.dist.world_size * self.cfg.run.groups_per_rank,
            "buffer_draws": getattr(self, "_last_buffer_draws", None),
            "world_size": self.dist.world_size,
        }
        return checkpointing.save(
            self.run_dir / "checkpoints", iteration, model=self.model, optimizer=self.optimizer, state=state,
            is_main=self.dist.is_main, keep=self.cfg.run.keep_checkpoints, export=export,
        )

    def write_samples(self, tag: str, iteration: int) -> None:
        """Rank 0: a sample video of data.eval_prompt (a grid with data.eval_prompts) with the current weights
        (tag 'before' runs the base weights: adapters disabled; prompt i uses noise id EVAL_SAMPLE_ID + i at
        every tag), written to samples/<tag>.mp4 (+ a PNG contact sheet) and sent to the dashboards under
        'samples' at step `iteration`. The videos are scored with the training reward into
        samples/scores.json: the same prompts and noises at every tag, so 'before' vs 'after' is a paired
        measure of what training changed (the training reward's first/last iterations also differ by the
        prompts drawn). Each prompt has its own noise: one noise shared by all would make the grid's score a
        measure of that one noise's layout (toy/reproduce.eval_noise_ids)."""
        if not (self.cfg.run.sample_videos and self.dist.is_main):
            return
        from .video_io import tile_videos, write_contact_sheet, write_mp4

        prompts = [self.cfg.data.eval_prompt, *self.cfg.data.eval_prompts]
        cross = self.cross_for(prompts)
        ctx = adapters.adapters_disabled(self.model) if tag == "before" else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            lat = self.sampler.generate(cross, num_chunks=self.cfg.sampler.num_chunks, latent_hw=self.latent_hw, samples=[EVAL_SAMPLE_ID + i for i in range(len(prompts))])
            videos = self.vae.decode(lat).float()
            total, comps = self.reward(videos, prompts)
            videos = videos.cpu()
        video = videos[0] if len(prompts) == 1 else tile_videos(videos, scale=2 if videos.shape[-1] <= 128 else 1)
        out = self.run_dir / "samples"
        self.record_sample_scores(tag, iteration, total, comps)
        mp4 = write_mp4(out / f"{tag}.mp4", video, fps=16)
        write_contact_sheet(out / f"{tag}.png", video)
        self.log.log_video("samples", iteration, video, fps=16, mp4=mp4)

    def record_sample_scores(self, tag: str, iteration: int, total: torch.Tensor, comps: dict[str, torch.Tensor]) -> None:
        """Add the sample videos' mean rewards under `tag` to samples/scores.json (replaced atomically: every
        later write_samples and the end of the run read it back)."""
        out = self.run_dir / "samples"
        out.mkdir(exist_ok=True)
        scores = self.sample_scores()
        scores[tag] = {"iteration": iteration, "reward": float(total.mean()),
                       **{k: float(v.float().mean()) for k, v in comps.items()}}
        checkpointing.atomic_write_text(out / "scores.json", json.dumps(scores, indent=2))

    def sample_scores(self) -> dict[str, dict[str, float]]:
        """samples/scores.json: the training reward of the sample videos per tag (write_samples)."""
        path = self.run_dir / "samples" / "scores.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def run(self) -> dict[str, Any]:
        try:
            return self._run()
        finally:
            self.close()

    def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        total = cfg.run.iterations
        old_handlers = self._install_signal_handlers()
        self._reward_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        pool = RewardWorker()
        show = cfg.run.progress and self.dist.is_main and log_setup.progress_enabled()
        bar = tqdm(total=total, initial=self.start_iteration, disable=not show, desc="AR-CoPO", dynamic_ncols=True)
        last_saved = self.start_iteration
        completed = self.start_iteration  # iterations whose update is applied AND whose metrics row is written
        self._torn = False  # True from an iteration's first optimizer step until it counts as completed
        ended = False  # the loop finished without an exception: the reward worker is idle, wait for it
        try:
            if self.start_iteration == 0:
                self.write_samples("before", 0)
            elif self.start_iteration >= total:
                logger.info("the run has done all run.iterations=%d; raise run.iterations to train on", total)
            for it in range(self.start_iteration, total):
                prof_dir = self.run_dir / "profile" if (cfg.run.profile and it == self.start_iteration + 1 and self.dist.is_main) else None
                with maybe_profile(prof_dir, name=f"iteration{it}"):
                    metrics = self._iteration(it, pool)
                if self.dist.is_main:
                    self.log.log(it, metrics)
                completed, self._torn = it + 1, False
                if self.dist.is_main:
                    bar.set_postfix(reward=f"{metrics['reward/mean']:.4f}", clip=f"{metrics['update/clip_frac']:.2f}")
                    bar.update(1)
                stop = dist_utils.all_reduce_max(self._stop, self.device)
                if completed % cfg.run.checkpoint_every == 0 or completed == total or stop:
                    self.save(completed)
                    last_saved = completed
                if stop:
                    break
                every = cfg.run.sample_every
                if every and completed % every == 0 and completed < total:
                    self.write_samples(f"iter_{completed:06d}", completed)
            ended = True
        except BaseException:
            # The last checkpoint is never touched by a failure. On one process, also save the completed
            # iterations, but only from an iteration boundary: between the optimizer steps of an iteration
            # (or before its metrics row is written) the weights belong to no iteration, and resuming them
            # would not continue the run. A signal during this save aborts it (its temporary folder is
            # removed by the next save).
            if not self.dist.enabled and completed > last_saved and not self._torn:
                try:
                    self.save(completed)
                except Exception as e:  # noqa: BLE001 - the run's own error is the one to raise
                    kept = f"the last checkpoint is iteration {last_saved}" if last_saved else "no checkpoint was written"
                    logger.warning("the run failed after iteration %d and saving it failed too (%s: %s): %s",
                                   completed, type(e).__name__, e, kept)
            raise
        finally:
            bar.close()
            pool.shutdown(wait_s=5.0 if ended else 0.0)  # a reward that hangs must not hold the process
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
        summary = {"run_dir": str(self.run_dir), "iterations": completed, "interrupted": self._stop}
        if self.dist.is_main:
            self.log.plot()
            if completed == total:
                self.write_samples("after", completed)
            hist = self.log.history()
            rewards = [r["reward/mean"] for r in hist]
            if len(rewards) >= 20:
                summary["reward_first10"] = sum(rewards[:10]) / 10
                summary["reward_last10"] = sum(rewards[-10:]) / 10
            scores = self.sample_scores()
            if "before" in scores and "after" in scores:
                summary["samples_reward_before"] = scores["before"]["reward"]
                summary["samples_reward_after"] = scores["after"]["reward"]
            self.log.close()
        return summary

    def _iteration(self, it: int, pool) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.model.eval()
        if self.buffer is None:
            samples, crosses, times = self.rollout_groups(it, pool)
        else:
            samples, crosses, times = self.replay_groups(it)
        t1 = time.perf_counter()
        with nvtx_range("update"):
            upd = self.update(it, samples, crosses)
        _sync(self.device)
        t2 = time.perf_counter()
        for s in samples:
            s.prefix_cache = None
        # gather what every rank saw (small: rewards and a few numbers)
        mine = [
            {"rewards": s.rewards.cpu().tolist(), "pivot": s.pivot, "tau": s.tau.float().mean().item(),
             "components": {k: v.cpu().tolist() for k, v in s.components.items()}}
            for s in samples
        ]
        rows = [r for per_rank in dist_utils.all_gather_objects(mine) for r in per_rank]
        rewards = torch.tensor([x for r in rows for x in r["rewards"]])
        m: dict[str, Any] = {
            "reward/mean": float(rewards.mean()),
            "reward/std": float(rewards.std(unbiased=False)),
            "reward/group_std": sum(float(torch.tensor(r["rewards"]).std(unbiased=False)) for r in rows) / len(rows),
            "pivot/mean": sum(r["pivot"] for r in rows) / len(rows),
            "pivots": [r["pivot"] for r in rows],
            "tau/mean": sum(r["tau"] for r in rows) / len(rows),
            **upd,
            **times,
            "time/update": t2 - t1,
            "time/iteration": t2 - t0,
            "branch_videos_per_s": (len(rows) * self.cfg.algo.group_size / (t1 - t0)) if self.buffer is None else 0.0,
            "mem/peak_gb": peak_memory_gb(self.device),
        }
        for key in rows[0]["components"]:
            vals = torch.tensor([x for r in rows for x in r["components"][key]])
            m[f"reward/{key}/mean"] = float(vals.mean())
            m[f"reward/{key}/std"] = float(vals.std(unbiased=False))
        if not math.isfinite(m["reward/mean"]):
            raise RuntimeError("non-finite mean reward")
        return m

    # -- replay-buffer collection (semi-on-policy) ---------------------------------------------------------

    def collect_buffer(self, root: str | Path, num_groups: int) -> Path:
        """Roll out `num_groups` groups with the REFERENCE weights (adapters disabled), score them and store
        them compactly (rl/replay.py). Groups are sharded across ranks; rank 0 writes the index."""
        root = Path(root).expanduser()
        store = {"float32": torch.float32, "bfloat16": torch.bfloat16}[self.cfg.replay.store_dtype]
        if self.dist.is_main:
            # Collecting again rewrites group files: drop the old index first, so that an interrupted collection
            # leaves no buffer rather than an index whose records and settings describe other tensors.
            (root / INDEX).unlink(missing_ok=True)
        dist_utils.barrier()
        mine = list(range(self.dist.rank, num_groups, self.dist.world_size))
        records = []
        self._reward_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        pool = RewardWorker()
        try:
            with adapters.adapters_disabled(self.model):
                pending: list[tuple[GroupSample, Any]] = []
                for group in tqdm(mine, desc="collect buffer", disable=not (self.dist.is_main and log_setup.progress_enabled())):
                    prompt = self.prompts.for_group(group)
                    s = self.engine.rollout(self.cross_for(prompt), group=group, pivot=self.pivot_for(group), prompt=prompt, keep_prefix_cache=False)
                    pending.append((s, self._submit_score(pool, s)))
                    while len(pending) > 1:  # keep one group in flight, write the older one
                        s0, f0 = pending.pop(0)
                        s0.rewards, s0.components = self._reward_result(f0)
                        records.append(write_group(root, s0, store, self.cfg.algo.tau, self.cfg.algo.tau_auto_scale))
                for s0, f0 in pending:
                    s0.rewards, s0.components = self._reward_result(f0)
                    records.append(write_group(root, s0, store, self.cfg.algo.tau, self.cfg.algo.tau_auto_scale))
        finally:
            pool.shutdown(wait_s=0.0 if sys.exc_info()[0] is not None else 5.0)
        all_records = [r for per_rank in dist_utils.all_gather_objects(records) for r in per_rank]
        if self.dist.is_main:
            info = {"store_dtype": self.cfg.replay.store_dtype, "base_checkpoint": self.cfg.model.checkpoint}
            write_index(root, dict(self._buffer_settings(), **info), all_records)
        dist_utils.barrier()
        return root


def _with_rewards(cfg: TrainConfig, items: Sequence[Any]) -> TrainConfig:
    """A copy of cfg whose reward.rewards records `items` (built reward objects are recorded by import
    string, so config.yaml and the checkpoints say what was trained on)."""
    from .config import RewardEntry
    from .rewards import RewardSpec

    if isinstance(items, (str, dict)) or callable(items) or not items:
        raise ValueError("Trainer(rewards=...) takes a non-empty list of rewards (callables, RewardSpecs or config entries)")
    entries = []
    for item in items:
        spec = RewardSpec.from_config(item)
        entries.append(RewardEntry(**spec.to_config()))
    cfg = copy.deepcopy(cfg)
    cfg.reward.rewards = entries
    return cfg


class RewardWorker:
    """Runs the scoring of groups, in order, on one DAEMON thread: a reward that hangs can be abandoned (the
    timeout, a second Ctrl-C) without holding the process open, which a ThreadPoolExecutor would."""

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="arcopo-reward", daemon=True)
        self._thread.start()

    def submit(self, fn, *args) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((fut, fn, args))
        return fut

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            fut, fn, args = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - SystemExit too: handed to the waiting thread
                fut.set_exception(e)

    def shutdown(self, wait_s: float = 5.0) -> None:
        """Stop after the queued work, waiting at most `wait_s` for it. An idle worker ends at once; one stuck in
        a hung reward is abandoned. The wait matters: a daemon thread still inside torch's C++ code when the
        interpreter finalizes is unwound by pthread_exit, which aborts the process ("terminate called
        without an active exception")."""
        self._queue.put(None)
        self._thread.join(timeout=wait_s)


def threading_main() -> bool:
    return threading.current_thread() is threading.main_thread()
