"""One AR-CoPO iteration (the product's main loop): forked against a naive loop, and how it scales.

    pytest benchmarks/bench_iteration.py -s --benchmark-json out.json

forked  = ours: prefix once, fork (zero-copy on GPU), branches micro-batched, rewards decoded and scored on
          a worker thread while the next group rolls out, our kernels.
naive   = the straightforward loop: every branch regenerated from scratch (prefix included), one video at a
          time, the plain torch path (SDPA, eager step), decode and reward after all rollouts.
Both then run the same update (anchors' x0 with gradients, clipped contrastive loss, LoRA AdamW step).
Metric: branch-videos per second = G * groups / iteration seconds; per-phase seconds; peak memory.
GPU: the 1.3B shape, G = 12, L = 7, pivot fixed at the middle chunk (3, 0-based) so both loops do the same
work; CPU: the tiny preset. test_scaling measures how the forked iteration grows with G and with L.
"""

from __future__ import annotations

import concurrent.futures
import time

import pytest
import torch
from e2e_common import Clock, backend, cross_for, make_setup, peak_gib, sync

from arcopo_fast import adapters
from arcopo_fast.rewards import CompositeReward
from arcopo_fast.rl.loss import group_advantages
from arcopo_fast.rl.rollout import GroupSample, RolloutEngine, neighbour_table
from arcopo_fast.rl.update import group_loss, sample_anchors

GPU = torch.cuda.is_available()
gpu_only = pytest.mark.skipif(not GPU, reason="GPU benchmark: needs CUDA")
TARGETS = r".*\.(self_attn\.(q|k|v|o)|cross_attn\.(q|o)|ffn\.(0|2))$"


def _build(shape, G, L=None):
    s = make_setup(shape, num_chunks=L)
    adapters.add_lora(s.model, "on", rank=64 if shape == "1.3b" else 8, alpha=128 if shape == "1.3b" else 16, target_modules=TARGETS)
    s.model.gradient_checkpointing = shape == "1.3b"
    opt = torch.optim.AdamW([p for p in s.model.parameters() if p.requires_grad], lr=1e-5)
    reward = CompositeReward(["brightness"])
    return s, opt, reward


def _update(s, opt, sample, cross, G, groups=1):
    adv = group_advantages(sample.rewards.to(s.device))
    anchors = sample_anchors(G, min(4, G), torch.Generator().manual_seed(0))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if s.device.type == "cuda" else torch.autocast("cpu", enabled=False)
    for _epoch in range(2):
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss, _ = group_loss(s.model, s.sampler, sample, cross, sample.prefix_cache, anchors, [0, 1, 2, 3], adv, 1e-4)
        loss.backward()
        opt.step()


def _score(s, reward, latents):
    videos = s.vae.decode(latents)
    return reward(videos.float(), [""] * latents.shape[0])


def forked_iteration(s, opt, reward, G, pivot, micro_batch, groups=2):
    """`groups` groups: rollout of group j+1 overlaps the decode + reward of group j (worker thread)."""
    clk = Clock(s.device)
    fork = "zero_copy" if s.device.type == "cuda" else "copy"
    eng = RolloutEngine(s.sampler, num_chunks=s.num_chunks, latent_hw=s.latent_hw, group_size=G, perturb_scale=0.5,
                        micro_batch=micro_batch, fork=fork)
    cross = cross_for(s)
    samples, futs = [], []
    side = torch.cuda.Stream() if s.device.type == "cuda" else None
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        with clk.phase("rollout+reward"):
            for g in range(groups):
                with torch.no_grad():
                    smp = eng.rollout(cross, group=g, pivot=pivot)
                lat = smp.latents
                if side is not None:
                    ev = torch.cuda.Event()
                    ev.record()
                    lat.record_stream(side)

                    def work(lat=lat, ev=ev):
                        with torch.cuda.stream(side):
                            side.wait_event(ev)
                            out = _score(s, reward, lat)
                        side.synchronize()
                        return out

                    futs.append(pool.submit(work))
                else:
                    futs.append(pool.submit(_score, s, reward, lat))
                samples.append(smp)
            for smp, f in zip(samples, futs):
                smp.rewards, _ = f.result()
                smp.latents = None
    with clk.phase("update"):
        for smp in samples:
            _update(s, opt, smp, cross, G)
    return clk.t


def naive_iteration(s, opt, reward, G, pivot, groups=2):
    """Every branch from scratch, one video at a time; rewards after the rollouts; the same update."""
    clk = Clock(s.device)
    eng = RolloutEngine(s.sampler, num_chunks=s.num_chunks, latent_hw=s.latent_hw, group_size=G, perturb_scale=0.5, micro_batch=1)
    cross = cross_for(s)
    samples = []
    for g in range(groups):
        with clk.phase("rollout"), torch.no_grad():
            videos, inputs, x0s = [], [], []
            for i in range(G):
                e_i = eng.perturbed_noise(g, pivot, torch.tensor([i]))
                seen = list(s.sampler.stream(cross, num_chunks=s.num_chunks, latent_hw=s.latent_hw, samples=[g],
                                             initial_noise={pivot: e_i}, record=True))
                videos.append(torch.cat([x0 for _, x0, _ in seen], 1))
                traj = seen[pivot][2]
                inputs.append(torch.stack(traj.inputs, 1))
                x0s.append(torch.stack(traj.x0, 1))
            x0_old = torch.cat(x0s)
            tau, logp = neighbour_table(x0_old, "auto")
            F = s.model.cfg.chunk_frames
            prefix = videos[0][:, : pivot * F]
            smp = GroupSample(group=g, prompt="", pivot=pivot, inputs=torch.cat(inputs), x0_old=x0_old, logp_old=logp,
                              tau=tau, prefix_latents=prefix, latents=torch.cat(videos))
            smp.prefix_cache = eng.rebuild_prefix_cache(cross, prefix)
        samples.append(smp)
    with clk.phase("reward"):
        for smp in samples:
            smp.rewards, _ = _score(s, reward, smp.latents)
    with clk.phase("update"):
        for smp in samples:
            _update(s, opt, smp, cross, G)
    return clk.t


CASES = [pytest.param("1.3b", 12, 4, marks=gpu_only), pytest.param("tiny", 8, 8)]


@pytest.mark.parametrize("shape,G,micro_batch", CASES)
def test_forked_vs_naive(benchmark, shape, G, micro_batch):
    s, opt, reward = _build(shape, G)
    pivot = s.num_chunks // 2
    groups = 2
    ours = "triton" if GPU else "torch"
    with backend(ours):
        forked_iteration(s, opt, reward, G, pivot, micro_batch, groups=1)  # warm-up (compile, autotune)
        if GPU:
            torch.cuda.reset_peak_memory_stats()
        t_f = forked_iteration(s, opt, reward, G, pivot, micro_batch, groups=groups)
        mem_f = peak_gib(s.device)
    with backend("torch"):
        if GPU:
            torch.cuda.reset_peak_memory_stats()
        t_n = naive_iteration(s, opt, reward, G, pivot, groups=groups)
        mem_n = peak_gib(s.device)
    tf, tn = sum(t_f.values()), sum(t_n.values())
    info = {
        "shape": shape, "G": G, "L": s.num_chunks, "pivot": pivot, "groups": groups, "micro_batch": micro_batch,
        "forked_s": round(tf, 3), "naive_s": round(tn, 3),
        "forked_videos_per_s": round(G * groups / tf, 3), "naive_videos_per_s": round(G * groups / tn, 3),
        "speedup": round(tn / tf, 3), "forked_phases": {k: round(v, 3) for k, v in t_f.items()},
        "naive_phases": {k: round(v, 3) for k, v in t_n.items()}, "forked_peak_gib": round(mem_f, 2),
        "naive_peak_gib": round(mem_n, 2), "device": torch.cuda.get_device_name() if GPU else "cpu",
    }
    benchmark.extra_info.update(info)
    print(f"\n[iteration] {info}")
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


SCALE_G = [4, 8, 12]
SCALE_L = [3, 5, 7]


@pytest.mark.parametrize("shape", [pytest.param("1.3b", marks=gpu_only), "tiny"])
def test_scaling(benchmark, shape):
    """Forked iteration seconds (one group) as G grows (L = 7 or 3) and as L grows (G = 12 or 8)."""
    rows = []
    for G, L in [(g, None) for g in SCALE_G] + [(12 if shape == "1.3b" else 8, ell) for ell in SCALE_L]:
        s, opt, reward = _build(shape, G, L)
        with backend("triton" if GPU else "torch"):
            pivot = s.num_chunks // 2
            forked_iteration(s, opt, reward, G, pivot, 4 if shape == "1.3b" else G, groups=1)
            t = forked_iteration(s, opt, reward, G, pivot, 4 if shape == "1.3b" else G, groups=1)
        rows.append({"G": G, "L": s.num_chunks, "seconds": round(sum(t.values()), 3), **{k: round(v, 3) for k, v in t.items()}})
        del s, opt
        if GPU:
            torch.cuda.empty_cache()
    benchmark.extra_info.update(shape=shape, rows=rows, device=torch.cuda.get_device_name() if GPU else "cpu")
    for r in rows:
        print(f"\n[scaling] {shape} {r}")
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    sync(torch.device("cuda") if GPU else torch.device("cpu"))
    time.sleep(0)
