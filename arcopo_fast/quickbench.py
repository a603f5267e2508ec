"""The headline comparisons of `python -m arcopo_fast.doctor --bench`, in priority order, within a budget.

Each item times our implementation beside its baselines in the same process, with the project's one timer
(arcopo_fast.timing.median_ms, also behind benchmarks/' bench_helpers) and the benchmarks' own set-ups
where they exist (benchmarks/e2e_common.py and bench_iteration.py, loaded from the source checkout). The
full, parametrised versions are the pytest-benchmark files of benchmarks/; this is the short list that a
verification run on a card must get through first.

  GPU (shape "1.3b", bf16)                              CPU (shape "tiny", fp32, seconds in all)
  1 chunk attention fwd, B 4, Lq 4680, Lk 32760         B 1, Lq 64, Lk 256: torch paths only
    ours vs SDPA-cuDNN / -flash / Flex / flash-attn (contiguous [past ; own] view, as Self-Forcing)
  2 pivot chunk fwd+bwd, B 4, Lk 32760
  3 KV fork 1 -> 12 children, 30 layers, prefix 9360    kv_fork vs indexing vs a copy_ loop
  4 few-step step, B 1 and 12
  5 neighbour distances A 4, G 12, N 299,520 (fwd+bwd)
  6 one 81-frame streaming video: DiT and end to end, eager and compiled (CUDA graphs)
  7 one AR-CoPO iteration, G 12: forked vs naive
Our Triton kernels are timed only on CUDA (the CPU interpreter's speed means nothing). Every row says
what it compared; `ratio` is baseline ms / our ms (> 1: ours is faster) against the named baseline.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from . import ops
from .timing import median_ms


@dataclass
class Ctx:
    device: torch.device
    shape: str  # "1.3b" on CUDA, "tiny" on CPU
    dtype: torch.dtype
    rep_ms: float

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def time(self, fn: Callable[[], object]) -> float:
        return median_ms(fn, self.device, warmup_ms=self.rep_ms / 4, rep_ms=self.rep_ms)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


@dataclass
class Item:
    name: str
    run: Callable[[Ctx], list[dict]]
    estimate_s: dict[str, float]  # rough cost, per device type, to stop before the budget
    needs_tiny_assets: bool = False  # on CPU: the tiny VAE, built once (~1 min) into ~/.cache/arcopo_fast

    def estimate(self, device_type: str) -> float:
        s = self.estimate_s[device_type]
        if self.needs_tiny_assets and device_type == "cpu":
            from .model import tiny_assets as ta

            if not ta._is_current(ta.default_assets_dir() / f"wan-vae-tiny-v{ta.VERSION}"):
                s += 60.0
        return s


def _rand(ctx: Ctx, *shape, requires_grad=False):
    return torch.randn(*shape, device=ctx.device, dtype=ctx.dtype).requires_grad_(requires_grad)


def _compare(ctx: Ctx, item: str, impls: dict[str, Callable[[], object]], ours: str, baseline_order: list[str],
             **info) -> list[dict]:
    """Time each impl (a failing baseline is recorded, not fatal); ratio = best named baseline / ours."""
    rows, ms = [], {}
    for name, fn in impls.items():
        try:
            fn()
            ctx.sync()
            ms[name] = ctx.time(fn)
            rows.append({"item": item, "impl": name, "ms": round(ms[name], 4), **info})
        except Exception as e:  # noqa: BLE001 - e.g. "No available kernel" for a forced SDPA backend
            if name == ours:
                raise
            rows.append({"item": item, "impl": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"})
    base = [b for b in baseline_order if b in ms]
    for r in rows:  # ours + "_tma": our TMA forward (triton_tma, sm_90+), rated against the same baseline
        if r.get("impl") in (ours, ours + "_tma") and r["impl"] in ms and base:
            r["vs"] = base[0]
            r["ratio"] = round(ms[base[0]] / ms[r["impl"]], 3)
    return rows


# ---------------------------------------------------------------------------------------------------------
# 1-2 attention
# ---------------------------------------------------------------------------------------------------------


def _attention_shape(ctx: Ctx):
    return (4, 4680, 32760, 12, 128) if ctx.shape == "1.3b" else (1, 64, 256, 2, 32)


def _attention_impls(ctx: Ctx, grad: bool) -> list[str]:
    names = ops.attention_candidates(ctx.device)
    if not ctx.cuda:
        names = [n for n in names if n != "triton"]
    return names


def chunk_attention_fwd(ctx: Ctx) -> list[dict]:
    B, Lq, Lk, H, D = _attention_shape(ctx)
    past = Lk - Lq
    q, k, v = (_rand(ctx, B, Lq, H, D) for _ in range(3))
    kc, vc = _rand(ctx, B, Lk, H, D), _rand(ctx, B, Lk, H, D)  # room for the chunk after the past
    impls = {}
    for name in _attention_impls(ctx, grad=False):
        impls[name] = lambda n=name: ops.chunk_attention(q, k, v, kc, vc, past, backend=n, cache_scratch=True)
    with torch.no_grad():
        return _compare(ctx, "chunk_attention_fwd", impls, "triton", ["sdpa_cudnn", "sdpa_flash", "flex", "torch"],
                        B=B, Lq=Lq, Lk=Lk, H=H, D=D, dtype=str(ctx.dtype))


def pivot_fwd_bwd(ctx: Ctx) -> list[dict]:
    B, Lq, Lk, H, D = _attention_shape(ctx)
    past = Lk - Lq
    q, k, v = (_rand(ctx, B, Lq, H, D, requires_grad=True) for _ in range(3))
    do = _rand(ctx, B, Lq, H, D)
    kc, vc = _rand(ctx, B, past, H, D), _rand(ctx, B, past, H, D)

    def run(n):
        out = ops.chunk_attention(q, k, v, kc, vc, past, backend=n)
        return torch.autograd.grad(out, (q, k, v), do)

    impls = {n: (lambda n=n: run(n)) for n in _attention_impls(ctx, grad=True) if n != "flash_attn"}
    return _compare(ctx, "pivot_fwd_bwd", impls, "triton", ["sdpa_cudnn", "sdpa_flash", "flex", "torch"],
                    B=B, Lq=Lq, Lk=Lk, H=H, D=D, dtype=str(ctx.dtype))


# ---------------------------------------------------------------------------------------------------------
# 3-5 fork, step, neighbour
# ---------------------------------------------------------------------------------------------------------


def kv_fork(ctx: Ctx) -> list[dict]:
    from . import ext

    layers, children, prefix, H, D = (30, 12, 9360, 12, 128) if ctx.shape == "1.3b" else (2, 12, 64, 2, 16)
    caches = [torch.empty(1 + children, prefix, H, D, device=ctx.device, dtype=ctx.dtype) for _ in range(2 * layers)]
    for c in caches:
        c[0].normal_()
    dst = torch.arange(1, 1 + children, device=ctx.device)
    src = torch.zeros_like(dst)
    dst_list = dst.tolist()

    def index():
        for c in caches:
            c[dst, :prefix] = c[src[:1], :prefix]

    def copy_loop():
        for c in caches:
            for d in dst_list:
                c[d, :prefix].copy_(c[0, :prefix])

    impls = {"kv_fork": lambda: ext.kv_fork_(caches, src, dst, prefix), "index": index, "copy_loop": copy_loop}
    rows = _compare(ctx, "kv_fork", impls, "kv_fork", ["index", "copy_loop"], layers=layers, children=children,
                    prefix=prefix)
    gb = 2 * children * prefix * caches[0][0, 0].numel() * caches[0].element_size() * len(caches) / 1e9
    for r in rows:
        if "ms" in r:
            r["TB/s"] = round(gb / r["ms"], 3)  # GB per ms = TB/s (bytes read + written)
    ok = all(torch.equal(caches[-1][d], caches[-1][0]) for d in dst_list)
    rows.append({"item": "kv_fork", "impl": "check", "children_equal_parent": ok, "kv_fork_backend": ops.describe(ctx.device)["kv_fork"]})
    return rows


def step(ctx: Ctx) -> list[dict]:
    from .noise import NoiseKind, NoisePlan

    rows = []
    shape = (3, 16, 60, 104) if ctx.shape == "1.3b" else (3, 4, 6, 8)
    for B in (1, 12):
        x = _rand(ctx, B, *shape)
        flow = _rand(ctx, B, *shape)
        sigmas = torch.tensor([1.0, 0.9375, 0.8333, 0.625], device=ctx.device)
        plan = NoisePlan(7)
        words = plan.words(plan.key(list(range(B)), chunk=2, step=2, kind=NoiseKind.SOLVER), device=ctx.device)
        impls = {n: (lambda n=n, x=x, flow=flow, sigmas=sigmas, words=words:
                     ops.consistency_step(x, flow, sigmas, 1, words, backend=n))
                 for n in (["triton", "torch"] if ctx.cuda else ["torch"])}
        for r in _compare(ctx, "step", impls, "triton", ["torch"], B=B):
            if "ms" in r:
                r["us"] = round(r["ms"] * 1e3, 2)
            rows.append(r)
    return rows


def neighbour(ctx: Ctx) -> list[dict]:
    A, G, N = (4, 12, 299_520) if ctx.shape == "1.3b" else (4, 12, 4096)
    t = torch.randn(A, N, device=ctx.device, requires_grad=True)
    c = torch.randn(G, N, device=ctx.device)

    def run(n):
        d, logp = ops.neighbour_logprobs(t, c, 0.02, backend=n)
        return torch.autograd.grad(logp.sum() + d.sum(), (t,))

    impls = {n: (lambda n=n: run(n)) for n in (["triton", "torch"] if ctx.cuda else ["torch"])}
    return _compare(ctx, "neighbour_fwd_bwd", impls, "triton", ["torch"], A=A, G=G, N=N)


# ---------------------------------------------------------------------------------------------------------
# 6-7 end to end (benchmarks/' set-ups)
# ---------------------------------------------------------------------------------------------------------


def benchmarks_dir() -> Path | None:
    d = Path(__file__).resolve().parents[1] / "benchmarks"
    return d if (d / "e2e_common.py").is_file() else None


@contextlib.contextmanager
def _bench_modules() -> Iterator[None]:
    d = benchmarks_dir()
    if d is None:
        raise RuntimeError("needs the source checkout's benchmarks/ (e2e_common.py): run from a clone")
    sys.path.insert(0, str(d))
    try:
        yield
    finally:
        sys.path.remove(str(d))


def _video_once(s, cross) -> tuple[float, float]:
    sync = lambda: torch.cuda.synchronize(s.device) if s.device.type == "cuda" else None
    sync()
    t0, first = time.perf_counter(), None
    for _ in s.sampler.stream(cross, num_chunks=s.num_chunks, latent_hw=s.latent_hw):
        if first is None:
            sync()
            first = time.perf_counter() - t0
    sync()
    return time.perf_counter() - t0, first


def video(ctx: Ctx) -> list[dict]:
    with _bench_modules():
        e2e = importlib.import_module("e2e_common")
        from .sampler import latent_frames_to_video_frames

        rows = []
        modes = [("torch", None), ("triton", None), ("triton", "reduce-overhead")] if ctx.cuda else [("torch", None)]
        for be, compile_mode in modes:
            s = e2e.make_setup(ctx.shape, compile=compile_mode)
            cross = e2e.cross_for(s)
            frames = latent_frames_to_video_frames(s.num_chunks * s.model.cfg.chunk_frames)
            with e2e.backend(be), torch.no_grad():
                t0 = time.perf_counter()
                _video_once(s, cross)  # warm-up: compilation, autotuning, CUDA graph capture
                warm = time.perf_counter() - t0
                dit_s, first = _video_once(s, cross)
                gen = e2e.streaming_pipeline(s, cross)
                t1 = time.perf_counter()
                n = sum(c.shape[1] for c in gen.stream_video(["x"], num_chunks=s.num_chunks, latent_hw=s.latent_hw))
                ctx.sync()
                e2e_s = time.perf_counter() - t1
            rows.append({"item": "video", "impl": f"{be}{'+' + compile_mode if compile_mode else ''}", "frames": frames,
                         "warmup_s": round(warm, 3), "dit_s": round(dit_s, 4), "fps_dit": round(frames / dit_s, 2),
                         "first_chunk_s": round(first, 4), "e2e_s": round(e2e_s, 4), "fps_e2e": round(n / e2e_s, 2)})
            del s
            if ctx.cuda:
                torch.cuda.empty_cache()
        return rows


def iteration(ctx: Ctx) -> list[dict]:
    with _bench_modules():
        it = importlib.import_module("bench_iteration")
        e2e = importlib.import_module("e2e_common")
        G, micro = (12, 4) if ctx.cuda else (4, 4)
        s, opt, reward = it._build(ctx.shape, G)
        pivot = s.num_chunks // 2
        ours = "triton" if ctx.cuda else "torch"
        with e2e.backend(ours):
            it.forked_iteration(s, opt, reward, G, pivot, micro, groups=1)  # warm-up
            t_f = it.forked_iteration(s, opt, reward, G, pivot, micro, groups=1)
        with e2e.backend("torch"):
            t_n = it.naive_iteration(s, opt, reward, G, pivot, groups=1)
        tf, tn = sum(t_f.values()), sum(t_n.values())
        return [{"item": "iteration", "impl": "forked", "G": G, "s": round(tf, 3), "vs": "naive", "ratio": round(tn / tf, 3),
                 "phases": {k: round(v, 3) for k, v in t_f.items()}},
                {"item": "iteration", "impl": "naive", "G": G, "s": round(tn, 3),
                 "phases": {k: round(v, 3) for k, v in t_n.items()}}]


ITEMS = [
    Item("chunk_attention_fwd", chunk_attention_fwd, {"cuda": 40, "cpu": 1}),
    Item("pivot_fwd_bwd", pivot_fwd_bwd, {"cuda": 30, "cpu": 1}),
    Item("kv_fork", kv_fork, {"cuda": 15, "cpu": 1}),
    Item("step", step, {"cuda": 10, "cpu": 1}),
    Item("neighbour", neighbour, {"cuda": 10, "cpu": 1}),
    Item("video", video, {"cuda": 150, "cpu": 8}, needs_tiny_assets=True),
    Item("iteration", iteration, {"cuda": 150, "cpu": 15}, needs_tiny_assets=True),
]


def run(device: torch.device, budget_s: float, *, only: list[str] | None = None,
        progress: Callable[[dict], None] | None = None) -> list[dict]:
    """Run ITEMS in order while their estimated cost fits the time left; every item gives rows (a failure
    is a row with its error, never an abort). `progress` gets each row as it is made (the doctor writes
    its JSON then, so an interrupted run keeps what finished)."""
    ctx = Ctx(device, "1.3b" if device.type == "cuda" else "tiny",
              torch.bfloat16 if device.type == "cuda" else torch.float32, 100.0 if device.type == "cuda" else 20.0)
    t0 = time.perf_counter()
    rows: list[dict] = []

    def emit(r):
        rows.append(r)
        if progress is not None:
            progress(r)

    for item in ITEMS:
        if only and item.name not in only:
            continue
        left = budget_s - (time.perf_counter() - t0)
        need = item.estimate(device.type)
        if need > left:
            emit({"item": item.name, "skipped": f"budget: ~{need:.0f} s needed, {left:.0f} s left"})
            continue
        t1 = time.perf_counter()
        try:
            for r in item.run(ctx):
                emit(r)
        except Exception as e:  # noqa: BLE001
            emit({"item": item.name, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}",
                  "traceback": traceback.format_exc(limit=3)[-600:]})
        emit({"item": item.name, "seconds": round(time.perf_counter() - t1, 2)})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows
