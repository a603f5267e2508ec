"""Streaming few-step consistency sampler (Self-Forcing's inference), usable on its own.

Per chunk c (cfg.chunk_frames latent frames), with a KV cache holding chunks < c:

    x = initial noise e*_c
    for k in 0..T-1:  x0 = x - sigma_k * model(x, t_k, cache)           (flow prediction -> x0)
                      if k < T-1: x = (1 - sigma_{k+1}) x0 + sigma_{k+1} xi_{c,k+1}
    chunk output = x0
    model(x0, context_noise, cache, commit=True)   # writes the chunk's clean K/V (skipped for the last chunk)

Every noise tensor comes from a NoisePlan keyed by (seed, sample, chunk, step, kind): the same seeds give the
same video, and a caller may override one chunk's initial noise (what AR-CoPO's forking does). The update
x0 / x_next runs through ops.consistency_step (a fused Triton kernel on CUDA that draws the solver noise
in-kernel). Nothing here reads device values back to the host: timesteps and sigmas live in device tables.

    sampler = StreamingSampler(model, FewStepSchedule(), seed=0)
    cross = model.encode_text(text_embeddings)                 # [B, L, text_dim]
    for chunk_index, x0 in sampler.stream(cross, num_chunks=7, latent_hw=(60, 104), samples=[0, 1]):
        ...  # decode / display as each chunk arrives
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from . import ops
from .model.kv_cache import CrossKV, KVCache
from .model.wan import CausalWanModel
from .noise import NoiseKind, NoisePlan
from .profiling import nvtx_range

logger = logging.getLogger(__name__)

COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""StreamingSampler(compile=...): torch.compile modes for the per-step forward (None: eager)."""
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
"""torch.compile backends: Inductor generates code (modes apply to it only); aot_eager / eager trace the same
graphs without code generation (a quick check that a model change still compiles)."""
RECOMPILE_LIMIT = 64
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
"""Inductor modes that replay CUDA graphs (stream() then reuses its KV cache between videos)."""


@dataclass(frozen=True, kw_only=True)
class FewStepSchedule:
    denoising_steps: tuple[int, ...] = (1000, 750, 500, 250)
    """Self-Forcing's denoising_step_list (indices into the 1000-step flow-matching table)."""
    shift: float = 5.0
    """Flow-matching shift: sigma' = shift*sigma / (1 + (shift-1)*sigma). Self-Forcing's demo uses 8."""
    warp: bool = True
    """warp_denoising_step: map each step through the shifted table (Self-Forcing: true)."""
    context_noise: float = 0.0
    """Timestep of the clean-context forward that writes a finished chunk's K/V (input: the clean x0)."""
    num_train_timesteps: int = 1000

    def __post_init__(self):
        if not self.denoising_steps:
            raise ValueError("denoising_steps must not be empty")
        if any(not 0 < s <= self.num_train_timesteps for s in self.denoising_steps):
            raise ValueError(f"denoising_steps must lie in (0, {self.num_train_timesteps}], got {self.denoising_steps}")
        if any(a <= b for a, b in zip(self.denoising_steps, self.denoising_steps[1:])):
            raise ValueError(f"denoising_steps must strictly decrease, got {self.denoising_steps}")
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"shift must be a finite number > 0, got {self.shift}")
        if not 0 <= self.context_noise < self.num_train_timesteps:
            raise ValueError(f"context_noise must be in [0, {self.num_train_timesteps}), got {self.context_noise}")

    @property
    def num_steps(self) -> int:
        return len(self.denoising_steps)

    def sigmas(self) -> list[float]:
        """sigma_k of each step (float64 math). Self-Forcing indexes a table built from
        linspace(1, 0, 1001)[:-1], whose entry for step s is exactly s / 1000 before the shift warp."""
        out = []
        for s in self.denoising_steps:
            sig = s / self.num_train_timesteps
            if self.warp:
                sig = self.shift * sig / (1 + (self.shift - 1) * sig)
            out.append(sig)
        return out

    def timesteps(self) -> list[float]:
        """t_k = 1000 * sigma_k: [1000, 937.5, 833.33, 625] at shift 5."""
        return [self.num_train_timesteps * s for s in self.sigmas()]


@dataclass
class ChunkTrajectory:
    """What one chunk's denoising saw: the input latent of every step (x_{c,k}) and the model's x0
    prediction at each step (x0hat_{c,k}); each list has T tensors [B, F, C, H, W] float32 when recorded,
    else only the last step's (denoise_chunk(record=False))."""

    inputs: list[torch.Tensor] = field(default_factory=list)
    x0: list[torch.Tensor] = field(default_factory=list)

    @property
    def output(self) -> torch.Tensor:
        return self.x0[-1]


class StreamingSampler:
    """The few-step streaming sampler. Batch rows are independent samples; row b draws its noise with
    noise id samples[b] (so sample 5 gives the same video in any batch).

    compile:         None (eager) or a torch.compile mode for the per-step DiT forward (COMPILE_MODES). The
                     graph is fullgraph (a graph break would be a silent slowdown, so it fails loudly) and
                     dynamic (cache length, batch and chunk position are symbols): a few graphs (empty or
                     filled cache, denoise or commit, copy or zero-copy cache) serve every chunk and branch.
                     "reduce-overhead" also replays them as CUDA graphs: the model has no host syncs.
    compile_backend: COMPILE_BACKENDS; modes apply to Inductor only.
    reuse_cache:     stream() keeps one KV cache per video shape and reuses it (default: on with a CUDA-graph
                     mode, see _video_cache)."""

    def __init__(
        self,
        model: CausalWanModel,
        schedule: FewStepSchedule | None = None,
        *,
        seed: int = 0,
        local_attn_frames: int | None = None,
        sink_frames: int = 0,
        cache_dtype: torch.dtype | None = None,
        compile: str | None = None,
        compile_backend: str = "inductor",
        reuse_cache: bool | None = None,
    ):
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {compile!r}")
        if compile_backend not in COMPILE_BACKENDS:
            raise ValueError(f"compile_backend must be one of {COMPILE_BACKENDS}, got {compile_backend!r}")
        self.model = model
        self.compile, self.compile_backend = compile, compile_backend
        self._forward = model
        if compile is not None:
            kw = {"mode": compile} if compile_backend == "inductor" else {}
            self._forward = torch.compile(model.forward, fullgraph=True, dynamic=True, backend=compile_backend, **kw)
        graphs = compile in CUDAGRAPH_MODES and compile_backend == "inductor"
        self.reuse_cache = graphs if reuse_cache is None else bool(reuse_cache)
        self._pool: dict[tuple, KVCache] = {}
        self._busy: set[tuple | None] = set()
        self.schedule = schedule or FewStepSchedule()
        self.noise = NoisePlan(seed)
        self.local_attn_frames = local_attn_frames
        self.sink_frames = sink_frames
        self.cache_dtype = cache_dtype
        if local_attn_frames is not None and local_attn_frames <= model.cfg.chunk_frames + sink_frames:
            raise ValueError(
                f"local_attn_frames ({local_attn_frames}) must exceed chunk_frames ({model.cfg.chunk_frames}) "
                f"+ sink_frames ({sink_frames})"
            )
        self._tables: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    # -- device tables (built once per device: no host lookups in the loop) ---------------------------

    def tables(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sigmas [T] float32, timesteps [T] float32, context timestep [] float32) on `device`."""
        key = str(device)
        if key not in self._tables:
            sch = self.schedule
            self._tables[key] = (
                torch.tensor(sch.sigmas(), dtype=torch.float32, device=device),
                torch.tensor(sch.timesteps(), dtype=torch.float32, device=device),
                torch.tensor(float(sch.context_noise), dtype=torch.float32, device=device),
            )
        return self._tables[key]

    # -- building blocks (the trainer's rollout engine composes these) -----------------------------------

    def forward(self, x, t, cross: CrossKV, cache: KVCache | None, *, commit: bool = False) -> torch.Tensor:
        """One DiT forward (compiled when the sampler was built with `compile`). Use it under no_grad: the
        compiled graphs are inference graphs (training keeps the eager model)."""
        if self.compile is not None:
            self.model.rope.axis_tables(x.device)  # built eagerly once: the graph only slices them
            # detach() drops the view relation without a copy: dynamo guards on a view's base, and x / t /
            # the text K/V are views (of the noise buffer, the timestep table, a projection) only sometimes.
            x, t = x.detach(), t.detach() if isinstance(t, torch.Tensor) else t
            cross = CrossKV([k.detach() for k in cross.k], [v.detach() for v in cross.v], cross.rows)
            # A few graphs per latent size and cache kind (see __init__); the default limit of 8 would turn
            # a second resolution into a hard error under fullgraph.
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                return self._forward(x, t, cross, cache, commit=commit)
        return self._forward(x, t, cross, cache, commit=commit)

    def chunk_shape(self, latent_hw: tuple[int, int]) -> tuple[int, int, int, int]:
        cfg = self.model.cfg
        return (cfg.chunk_frames, cfg.in_channels, *latent_hw)

    def new_cache(self, rows: int, num_chunks: int, latent_hw: tuple[int, int]) -> KVCache:
        m = self.model
        return KVCache.for_model(
            m.cfg,
            rows=rows,
            num_chunks=num_chunks,
            frame_tokens=m.frame_tokens(*latent_hw),
            device=m.device,
            dtype=self.cache_dtype or m.dtype,
            local_attn_frames=self.local_attn_frames,
            sink_frames=self.sink_frames,
        )

    def initial_noise(self, samples: Sequence[int] | torch.Tensor, chunk: int, latent_hw) -> torch.Tensor:
        """e*_c for each sample: [B, F, C, H, W] float32."""
        key = self.noise.key(samples, chunk, 0, NoiseKind.INITIAL)
        return self.noise.normal(self.chunk_shape(latent_hw), key, device=self.model.device)

    def denoise_chunk(
        self,
        x: torch.Tensor,
        chunk: int,
        samples: Sequence[int] | torch.Tensor,
        cross: CrossKV,
        cache: KVCache | None,
        *,
        record: bool = False,
        solver_branches: torch.Tensor | None = None,
    ) -> ChunkTrajectory:
        """Run the T few-step steps of chunk `chunk` from its initial noise x [B, F, C, H, W]. The solver
        noise xi_{chunk,k} of row b is keyed by samples[b] (and by solver_branches[b] when given: branch 0
        is the shared solver noise of inference and AR-CoPO, other ids give each row its own stream, which
        is how SDE-GRPO explores). Returns the trajectory (inputs and x0 of every step when record=True,
        else only the final x0)."""
        sigmas, timesteps, _ = self.tables(x.device)
        T = self.schedule.num_steps
        traj = ChunkTrajectory()
        for k in range(T):
            with nvtx_range(f"step{k}"):
                flow = self.forward(x, timesteps[k], cross, cache)
                words = None
                if k < T - 1:
                    branch = 0 if solver_branches is None else solver_branches
                    key = self.noise.key(samples, chunk, k + 1, NoiseKind.SOLVER, branch)
                    words = self.noise.words(key, device=x.device)
                x0, x_next = ops.consistency_step(x, flow, sigmas, k, words)
            if record or k == T - 1:
                traj.inputs.append(x)
                traj.x0.append(x0)
            x = x_next
        return traj

    def commit_chunk(self, x0: torch.Tensor, cross: CrossKV, cache: KVCache) -> None:
        """The clean-context forward: write the finished chunk's K/V into the cache (output discarded)."""
        _, _, t_ctx = self.tables(x0.device)
        with nvtx_range("commit"):
            self.forward(x0, t_ctx, cross, cache, commit=True)

    # -- whole-video API -------------------------------------------------------------------------------

    @torch.no_grad()
    def stream(
        self,
        cross: CrossKV,
        *,
        num_chunks: int,
        latent_hw: tuple[int, int],
        samples: Sequence[int] | torch.Tensor | None = None,
        initial_noise: dict[int, torch.Tensor] | None = None,
        cache: KVCache | None = None,
        start_chunk: int = 0,
        record: bool = False,
    ) -> Iterator[tuple[int, torch.Tensor] | tuple[int, torch.Tensor, ChunkTrajectory]]:
        """Yield (chunk_index, x0 [B, F, C, H, W]) as soon as each chunk is denoised (and the trajectory too
        when record=True). initial_noise overrides chunk c's e*_c with the given tensor. A given cache must
        already hold chunks < start_chunk (e.g. a forked prefix)."""
        B = cross.num_rows if cross.rows is None else cross.rows.shape[0]
        samples = torch.arange(B) if samples is None else torch.as_tensor(samples, dtype=torch.int64)
        if samples.shape != (B,):
            raise ValueError(f"samples must hold one noise id per batch row ({B}), got shape {tuple(samples.shape)}")
        self.noise.key(samples.cpu(), 0)  # range checks on the host, once
        samples = samples.to(self.model.device)  # noise keys then stay on the device: no per-step copies
        if num_chunks < 1 or not 0 <= start_chunk < num_chunks:
            raise ValueError(f"need num_chunks >= 1 and 0 <= start_chunk < num_chunks, got {num_chunks}, {start_chunk}")
        shape = (B, *self.chunk_shape(latent_hw))
        for c, z in (initial_noise or {}).items():
            if not start_chunk <= c < num_chunks:
                raise ValueError(f"initial_noise given for chunk {c}, outside [{start_chunk}, {num_chunks})")
            if tuple(z.shape) != shape:
                raise ValueError(f"initial_noise[{c}] must have shape {shape}, got {tuple(z.shape)}")
            # NOTE(sync): one host check per override, at the API boundary, never inside the step loop.
            if not bool(torch.isfinite(z).all()):
                raise ValueError(f"initial_noise[{c}] contains NaN or infinite values")
        pooled = None
        if cache is None:
            if start_chunk:
                raise ValueError("start_chunk > 0 needs a cache holding the earlier chunks")
            cache, pooled = self._video_cache(B, num_chunks, latent_hw)
        else:
            chunk_tokens = self.model.cfg.chunk_frames * self.model.frame_tokens(*latent_hw)
            if cache.total_tokens != start_chunk * chunk_tokens:
                raise ValueError(
                    f"the cache holds {cache.total_tokens} tokens, chunk {start_chunk} starts at {start_chunk * chunk_tokens}"
                )
        # Fail before any work if the cache cannot hold the past of the last chunk.
        chunk_tokens = self.model.cfg.chunk_frames * self.model.frame_tokens(*latent_hw)
        cache.check_fits((num_chunks - 1 - start_chunk) * chunk_tokens) if num_chunks - 1 > start_chunk else None
        try:
            for c in range(start_chunk, num_chunks):
                with nvtx_range(f"chunk{c}"):
                    x = (initial_noise or {}).get(c)
                    x = self.initial_noise(samples, c, latent_hw) if x is None else x.float()
                    traj = self.denoise_chunk(x, c, samples, cross, cache, record=record)
                # host ints only (no sync); on CUDA this marks the chunk's kernels as queued, not finished
                logger.debug("chunk %d/%d denoised", c + 1, num_chunks)
                yield (c, traj.output, traj) if record else (c, traj.output)
                if c < num_chunks - 1:  # the last chunk's K/V are never read: skip its commit forward
                    self.commit_chunk(traj.output, cross, cache)
        finally:
            self._busy.discard(pooled)

    def _video_cache(self, B: int, num_chunks: int, latent_hw) -> tuple[KVCache, tuple | None]:
        """The cache of one stream() call. With a CUDA-graph compile mode it is reused from call to call (one
        per shape): a recorded graph reads fixed addresses, and a cache at a new address would be copied
        into the graph's own input buffer at every replay (gigabytes at the 1.3B shape). A stream running
        while another of the same shape is still open gets a private cache instead."""
        if not self.reuse_cache:
            return self.new_cache(B, num_chunks, latent_hw), None
        key = (B, num_chunks, tuple(latent_hw), str(self.model.device))
        if key in self._busy:
            return self.new_cache(B, num_chunks, latent_hw), None
        cache = self._pool.get(key)
        if cache is None:
            cache = self._pool[key] = self.new_cache(B, num_chunks, latent_hw)
            if cache.device.type == "cuda":
                for t in cache.storage_tensors():
                    torch._dynamo.mark_static_address(t)
        cache.reset()
        self._busy.add(key)
        return cache, key

    def release_caches(self) -> None:
        """Free the reused stream() caches (CUDA-graph compile modes keep one per video shape)."""
        self._pool = {k: v for k, v in self._pool.items() if k in self._busy}

    @torch.no_grad()
    def generate(self, cross: CrossKV, *, num_chunks: int, latent_hw: tuple[int, int], **kw) -> torch.Tensor:
        """The whole latent video [B, num_chunks * chunk_frames, C, H, W] (float32)."""
        return torch.cat([out[1] for out in self.stream(cross, num_chunks=num_chunks, latent_hw=latent_hw, **kw)], dim=1)


def forwards_per_video(num_chunks: int, num_steps: int) -> int:
    """DiT forwards per video: T per chunk plus a commit for every chunk but the last (Self-Forcing: 5 per
    chunk, 35 for 7 chunks; here 34)."""
    return num_chunks * num_steps + max(num_chunks - 1, 0)


def latent_frames_to_video_frames(latent_frames: int) -> int:
    """Wan VAE: 4x temporal compression with the first frame alone (21 latent frames -> 81 frames)."""
    return 4 * (latent_frames - 1) + 1 if latent_frames else 0

