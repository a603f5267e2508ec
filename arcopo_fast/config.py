"""Training configuration: typed dataclasses with a docstring per field, named presets, a YAML/JSON file and
command-line overrides (`section.field=value`), validated with errors that name the field and the fix.

    python -m arcopo_fast.train                                   # preset "toy" (the embedded default)
    python -m arcopo_fast.train --preset tiny                     # a random tiny model (plumbing only)
    python -m arcopo_fast.train --preset self-forcing-1.3b model.checkpoint=/ckpt/self_forcing_dmd.pt ...
    python -m arcopo_fast.train --config run.yaml algo.group_size=8 run.iterations=50
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .sampler import COMPILE_BACKENDS as SAMPLER_COMPILE_BACKENDS
from .sampler import COMPILE_MODES as SAMPLER_COMPILE_MODES
from .sampler import FewStepSchedule

REAL_SIZE_PRESETS = ("wan-1.3b",)
"""Model presets that are refused random weights unless model.allow_random_init=true."""


@dataclass(kw_only=True)
class ModelSection:
    preset: str = "tiny"
    """Architecture preset of arcopo_fast.model.config ('tiny' or 'wan-1.3b'); ignored when a checkpoint
    carries its own config (diffusers folders, our safetensors)."""
    checkpoint: str | None = None
    """Base weights: Self-Forcing .pt, Wan2.1 .safetensors/.pth, a diffusers folder, or ours. None = random
    init (the tiny default)."""
    allow_random_init: bool = False
    """Let a real-size preset (wan-1.3b) start from random weights when no checkpoint is given (benchmarks,
    smoke tests). Off: such a run is refused, it would train noise for hours."""
    ema: bool = True
    """For Self-Forcing .pt files: load generator_ema (True) or generator (False)."""
    dtype: str = "float32"
    """Parameter/compute dtype of the DiT: float32 or bfloat16 (LoRA factors stay float32)."""
    text_encoder: str | None = None
    """Local folder of a transformers UMT5 encoder + tokenizer. None = a tiny random one (tiny preset only)."""
    vae: str | None = None
    """Local folder of a diffusers AutoencoderKLWan. None = a tiny random one (tiny preset only)."""
    vae_memory_format: str = "auto"
    """Layout of the VAE decoder's convs, activations and causal caches: 'contiguous' (diffusers' own decode)
    or 'channels_last_3d' (NDHWC, cuDNN's fast 3-D conv layout; decodes with arcopo_fast.model.vae's
    fixed-shape per-frame step); 'auto': channels_last_3d on CPU (measured 3.1x faster on the toy VAE),
    contiguous on a GPU (not measured there yet)."""
    vae_compile: bool | str = False
    """torch.compile the VAE decoder's per-frame step (fullgraph, static shapes): false, true, 'default' or
    'max-autotune-no-cudagraphs'. The first decode of each video shape compiles (a minute or more at 480p)."""
    assets_dir: str = "~/.cache/arcopo_fast/tiny_assets"
    """Where the tiny random text encoder and VAE are written when text_encoder/vae are None."""
    embed_cache_dir: str | None = "~/.cache/arcopo_fast/prompt_embeds"
    """On-disk cache of prompt embeddings (None disables it)."""


@dataclass(kw_only=True)
class SamplerSection:
    num_chunks: int = 3
    """L: chunks per video (Self-Forcing: 7 chunks x 3 latent frames = 81 frames)."""
    latent_height: int = 8
    """Latent height (480 px / 8 = 60 for the 1.3B model)."""
    latent_width: int = 8
    """Latent width (832 px / 8 = 104)."""
    denoising_steps: tuple[int, ...] = (1000, 750, 500, 250)
    """Few-step schedule (Self-Forcing's denoising_step_list)."""
    shift: float = 5.0
    """Flow-matching shift of the timestep warp."""
    context_noise: float = 0.0
    """Timestep of the clean-context KV refresh."""
    compile: str | None = None
    """torch.compile the rollouts' per-step DiT forward (fullgraph, dynamic shapes: a few graphs serve every
    chunk and branch): None (eager), 'default', 'reduce-overhead' (plus CUDA graphs), 'max-autotune',
    'max-autotune-no-cudagraphs'. The first iteration pays the compilation. Training forwards stay eager."""
    compile_backend: str = "inductor"
    """torch.compile backend of `compile`: 'inductor' (code generation), or 'aot_eager' (traces the same
    graphs without generating code: for checking that a model change still compiles, quickly)."""

    def schedule(self) -> FewStepSchedule:
        """The sampler's few-step schedule from these fields."""
        return FewStepSchedule(denoising_steps=self.denoising_steps, shift=self.shift, context_noise=self.context_noise)


@dataclass(kw_only=True)
class AlgoSection:
    group_size: int = 12
    """G: branches forked per group."""
    perturb_scale: float = 0.5
    """s: e_i = sqrt(1 - s^2) e* + s d_i for the pivot chunk's initial noise."""
    num_anchors: int = 4
    """B: anchors per group and update (symmetric anchor sampling)."""
    clip_eps: float = 1e-4
    """Ratio clipping epsilon (paper: 1e-4). Clipping must stay on (Table 2: training collapses without);
    .inf disables it, and only together with allow_unclipped."""
    allow_unclipped: bool = False
    """Accept clip_eps = .inf (no ratio clipping: the objective is rho * A). An escape hatch for the
    paper's clipping ablation (python -m arcopo_fast.toy reproduce, claim c), not for training."""
    tau: str | float = "auto"
    """Temperature tau0 of the neighbour softmax: a number, or 'auto' = median off-diagonal old distance of
    the group at each step, fixed at rollout time."""
    tau_auto_scale: float = 1.0
    """With tau 'auto': tau0 = this x the median distance. Below 1 the softmax is sharper, so an anchor's
    prediction is pulled toward its nearest well-scored candidates rather than toward their average."""
    steps: tuple[int, ...] | None = None
    """Denoising steps of chunk p used in the update (indices into denoising_steps); None = all T."""
    epochs: int = 2
    """Policy updates per iteration."""
    adv_eps: float = 1e-6
    """Added to the reward std in the advantage normalisation."""
    quasi_norm_q: float | None = None
    """Neighbor-GRPO quasi-norm reweighting of advantages (q = 0.8); None = off (paper is silent)."""
    pivot_min: int = 0
    """Smallest pivot chunk (0-based); pivots are uniform in [pivot_min, pivot_max]."""
    pivot_max: int | None = None
    """Largest pivot chunk (0-based); None = num_chunks - 1."""


@dataclass(kw_only=True)
class OptimSection:
    lr: float = 1e-5
    """AdamW learning rate (paper: 1e-5 with LoRA 64/128 at 1.3B)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (beta1, beta2)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (of the trainable parameters: the LoRA factors)."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 disables clipping)."""
    warmup_iterations: int = 0
    """Linear learning-rate warm-up."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in the backward (saves memory at the 1.3B shape)."""
    autocast_bf16: bool = False
    """Run the update forward under torch.autocast(bfloat16) (CUDA)."""


@dataclass(kw_only=True)
class AdapterSection:
    kind: str = "lora"
    """'lora' (peft) or 'full' (full fine-tuning; FSDP2 under torchrun). Either way the text projection and
    the cross-attention k/v receive no gradient: a prompt's cross-attention K/V are computed once, without
    gradients, and shared by the rollout and the update."""
    rank: int = 64
    """LoRA rank r (paper: 64 at 1.3B)."""
    alpha: float = 128.0
    """LoRA alpha: the update is scaled by alpha / rank (paper: 128)."""
    target_modules: str = r".*\.(self_attn\.(q|k|v|o)|cross_attn\.(q|o)|ffn\.(0|2))$"
    """Regex of the Linear layers that get LoRA factors. The cross-attention k/v are excluded so that a
    prompt's cross-attention K/V are computed once and shared by rollout and update."""


@dataclass(kw_only=True)
class DataSection:
    prompts: str | None = None
    """A text file with one prompt per line; None = the built-in prompt list."""
    eval_prompt: str = "a red balloon drifting over a calm lake at sunset"
    """Prompt of the before/after sample videos written into the run directory."""
    eval_prompts: list[str] = field(default_factory=list)
    """More prompts for the before/after videos: with any, samples/before.mp4 and after.mp4 are a grid of
    [eval_prompt, *eval_prompts], each from the same noise before and after."""


@dataclass(kw_only=True)
class RewardEntry:
    """One reward (arcopo_fast.rewards.RewardSpec)."""

    name: str
    """A built-in reward name (arcopo_fast.rewards.REGISTRY), or an import string 'module:Class' (built with
    `kwargs`) or 'module:function' (a function (videos, prompts) -> Tensor[B] or dict, called with `kwargs`)."""
    weight: float = 1.0
    """Multiplies the reward's weighted components in the total."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Constructor arguments of a class (e.g. a weights path), or extra keyword arguments of a function."""
    components: dict[str, float] | None = None
    """Component weights (e.g. {TA: 1.0} trains on VideoAlign's text alignment only); others are logged."""
    label: str | None = None
    """Prefix of the logged components (default: the reward's name)."""


@dataclass(kw_only=True)
class RewardSection:
    rewards: list[RewardEntry] = field(default_factory=lambda: [RewardEntry(name="brightness", kwargs={"target": 0.75})])
    """Reward components (weighted sum)."""
    decode_chunked: bool = False
    """Decode branch videos chunk by chunk (lower peak memory) instead of whole."""
    async_rewards: bool = True
    """Decode and score a group on a worker thread (a second CUDA stream) while the next group rolls out."""
    timeout: float | None = 600.0
    """Seconds the trainer waits for a group's decode + rewards (with async_rewards) before it fails the run
    with an error naming the reward (a hung reward server); the last checkpoint is kept. None = no limit."""


ALGORITHMS = ("ar-copo", "sde-grpo")


@dataclass(kw_only=True)
class RunSection:
    algorithm: str = "ar-copo"
    """'ar-copo' (exploration by forking the pivot chunk's initial noise, contrastive neighbour ratio) or
    'sde-grpo' (the Flow-GRPO / DanceGRPO-style baseline: per-branch solver noise in the pivot chunk,
    Gaussian transition ratio; rl/sde_grpo.py). Both share rollout, rewards, clipping and the update loop."""
    mode: str = "on-policy"
    """'on-policy' (adapter 'on') or 'semi-on-policy' (adapter 'semi', trained from the replay buffer)."""
    iterations: int = 100
    """Training iterations (one rollout + reward + `algo.epochs` updates each); a resume may raise it."""
    groups_per_rank: int = 1
    """Groups (prompts) rolled out by each rank per iteration."""
    micro_batch: int = 12
    """Branches generated together; lower it when a group does not fit in memory."""
    fork: str = "copy"
    """KV fork: 'copy' (in-place C++ op) or 'zero_copy' (branches read the shared prefix)."""
    seed: int = 0
    """Seed of the noise plan, pivots, anchors and a random base model."""
    out_dir: str = "runs/arcopo"
    """Run directory: checkpoints, metrics.jsonl, plots, sample videos, config."""
    checkpoint_every: int = 10
    """Iterations between checkpoints (a checkpoint is also written at the end and on Ctrl-C)."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept on disk (older ones are deleted once a new one is complete)."""
    device: str = "auto"
    """'auto' (cuda when available), 'cpu', 'cuda', 'cuda:N'."""
    attention_backend: str = "auto"
    """ops backend: auto / torch / triton."""
    tensorboard: bool = False
    """Also log metrics and sample videos to TensorBoard (<out_dir>/tensorboard; needs `tensorboard`)."""
    wandb: bool = False
    """Also log metrics and sample videos to Weights & Biases (needs `wandb`; WANDB_MODE=offline works). The
    W&B run id is kept in <out_dir>/wandb_run_id, so a --resume continues the same W&B run."""
    wandb_project: str = "arcopo_fast"
    """W&B project name."""
    profile: bool = False
    """Record a torch profiler trace of iteration 2 into <out_dir>/profile."""
    sample_videos: bool = True
    """Write before/after sample videos (mp4) of data.eval_prompt into the run directory (and to
    TensorBoard / W&B when they are on)."""
    sample_every: int = 0
    """Also write a sample video every N iterations (0 = before and after only)."""
    progress: bool = True
    """Draw a progress bar (also hidden by --quiet)."""


@dataclass(kw_only=True)
class ReplaySection:
    buffer: str | None = None
    """Replay-buffer directory (semi-on-policy). Collected from the reference weights if missing."""
    buffer_groups: int = 100
    """Groups collected into a new buffer (paper: 100)."""
    groups_per_iteration: int = 1
    """Buffer groups drawn (uniformly) per rank and iteration."""
    store_dtype: str = "float32"
    """dtype of stored latents/predictions (bfloat16 halves the size; log-probs stay float32)."""


@dataclass(kw_only=True)
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    sampler: SamplerSection = field(default_factory=SamplerSection)
    algo: AlgoSection = field(default_factory=AlgoSection)
    optim: OptimSection = field(default_factory=OptimSection)
    adapter: AdapterSection = field(default_factory=AdapterSection)
    data: DataSection = field(default_factory=DataSection)
    reward: RewardSection = field(default_factory=RewardSection)
    run: RunSection = field(default_factory=RunSection)
    replay: ReplaySection = field(default_factory=ReplaySection)

    def __post_init__(self):
        self.validate()

    # -- validation --------------------------------------------------------------------------------------

    def validate(self) -> None:
        def need(cond: bool, name: str, msg: str):
            if not cond:
                raise ValueError(f"config {name}: {msg}")

        a, s, r, o, ad, m = self.algo, self.sampler, self.run, self.optim, self.adapter, self.model
        need(a.group_size >= 2, "algo.group_size", f"must be >= 2 (got {a.group_size}): advantages need a group")
        need(0 < a.perturb_scale < 1, "algo.perturb_scale", f"must be in (0, 1), got {a.perturb_scale}")
        need(1 <= a.num_anchors <= a.group_size, "algo.num_anchors", f"must be in [1, group_size={a.group_size}], got {a.num_anchors}")
        unclipped = a.allow_unclipped and _number(a.clip_eps) and a.clip_eps == math.inf
        need(_positive(a.clip_eps) or unclipped, "algo.clip_eps",
             f"must be a finite number > 0 (ratio clipping must stay on: without it training collapses, paper "
             f"Table 2), got {a.clip_eps}; .inf (no clipping) only with algo.allow_unclipped=true, to reproduce "
             "that ablation")
        need(a.tau == "auto" or (_number(a.tau) and _positive(a.tau)), "algo.tau",
             f"must be 'auto' or a finite positive number, got {a.tau!r}")
        need(_number(a.tau_auto_scale) and _positive(a.tau_auto_scale), "algo.tau_auto_scale",
             f"must be a finite positive number, got {a.tau_auto_scale!r}")
        need(a.tau == "auto" or a.tau_auto_scale == 1.0, "algo.tau_auto_scale",
             f"scales tau 'auto' only; with a numeric algo.tau ({a.tau!r}) it must stay 1.0, got {a.tau_auto_scale!r}")
        need(a.epochs >= 1, "algo.epochs", f"must be >= 1, got {a.epochs}")
        need(_positive(a.adv_eps), "algo.adv_eps",
             f"must be a finite number > 0 (it keeps a group of equal rewards from dividing by zero; a negative one flips advantages), got {a.adv_eps}")
        need(a.quasi_norm_q is None or _positive(a.quasi_norm_q), "algo.quasi_norm_q", f"must be null or a finite number > 0, got {a.quasi_norm_q}")
        T = len(s.denoising_steps)
        need(a.steps is None or (len(a.steps) > 0 and all(0 <= k < T for k in a.steps) and len(set(a.steps)) == len(a.steps)),
             "algo.steps", f"must be distinct step indices in [0, {T}) or null, got {a.steps}")
        need(s.num_chunks >= 1, "sampler.num_chunks", f"must be >= 1, got {s.num_chunks}")
        pmax = s.num_chunks - 1 if a.pivot_max is None else a.pivot_max
        need(0 <= a.pivot_min <= pmax < s.num_chunks, "algo.pivot_min/pivot_max",
             f"need 0 <= pivot_min ({a.pivot_min}) <= pivot_max ({pmax}) < num_chunks ({s.num_chunks})")
        need(s.latent_height % 2 == 0 and s.latent_width % 2 == 0 and s.latent_height > 0 and s.latent_width > 0,
             "sampler.latent_height/latent_width", f"must be positive and even (2x2 patches), got {s.latent_height}x{s.latent_width}")
        need(T > 0 and all(0 < t <= 1000 for t in s.denoising_steps) and all(x > y for x, y in zip(s.denoising_steps, s.denoising_steps[1:])),
             "sampler.denoising_steps", f"must be a non-empty, strictly decreasing list of timesteps in (0, 1000], got {list(s.denoising_steps)}")
        need(_positive(s.shift), "sampler.shift", f"must be a finite number > 0, got {s.shift}")
        need(_finite(s.context_noise) and 0 <= s.context_noise < 1000, "sampler.context_noise", f"must be a timestep in [0, 1000), got {s.context_noise}")
        need(s.compile in SAMPLER_COMPILE_MODES, "sampler.compile", f"must be one of {SAMPLER_COMPILE_MODES}, got {s.compile!r}")
        need(s.compile_backend in SAMPLER_COMPILE_BACKENDS, "sampler.compile_backend", f"must be one of {SAMPLER_COMPILE_BACKENDS}, got {s.compile_backend!r}")
        need(r.algorithm in ALGORITHMS, "run.algorithm", f"must be one of {ALGORITHMS}, got {r.algorithm!r}")
        if r.algorithm == "sde-grpo":
            ks = range(T) if a.steps is None else a.steps
            need(any(k < T - 1 for k in ks), "algo.steps",
                 f"sde-grpo trains the stochastic transitions k -> k+1, k < {T - 1}: needs >= 2 denoising steps and a "
                 f"step index below {T - 1}, got denoising_steps={s.denoising_steps}, steps={a.steps}")
        need(r.mode in ("on-policy", "semi-on-policy"), "run.mode", f"must be 'on-policy' or 'semi-on-policy', got {r.mode!r}")
        need(r.fork in ("copy", "zero_copy"), "run.fork", f"must be 'copy' or 'zero_copy', got {r.fork!r}")
        need(r.iterations >= 0, "run.iterations", f"must be >= 0, got {r.iterations}")
        need(r.groups_per_rank >= 1, "run.groups_per_rank", f"must be >= 1, got {r.groups_per_rank}")
        need(r.micro_batch >= 1, "run.micro_batch", f"must be >= 1, got {r.micro_batch}")
        need(r.checkpoint_every >= 1, "run.checkpoint_every", f"must be >= 1, got {r.checkpoint_every}")
        need(r.keep_checkpoints >= 1, "run.keep_checkpoints", f"must be >= 1, got {r.keep_checkpoints}")
        need(r.attention_backend in ("auto", "torch", "triton"), "run.attention_backend", f"must be auto/torch/triton, got {r.attention_backend!r}")
        need(r.device == "auto" or r.device == "cpu" or r.device.startswith("cuda"), "run.device", f"must be auto, cpu or cuda[:N], got {r.device!r}")
        need(0 <= r.seed < 2**63, "run.seed", f"must be in [0, 2**63), got {r.seed}")
        out = Path(r.out_dir).expanduser()
        need(bool(r.out_dir) and (out.is_dir() or not out.exists()), "run.out_dir", f"{r.out_dir!r} exists and is not a folder")
        need(_positive(o.lr), "optim.lr", f"must be a finite number > 0, got {o.lr}")
        need(len(o.betas) == 2 and all(_finite(b) and 0 <= b < 1 for b in o.betas), "optim.betas", f"must be two numbers in [0, 1), got {list(o.betas)}")
        need(_finite(o.weight_decay) and o.weight_decay >= 0, "optim.weight_decay", f"must be a finite number >= 0, got {o.weight_decay}")
        need(_finite(o.grad_clip) and o.grad_clip >= 0, "optim.grad_clip", f"must be a finite number >= 0 (0 disables clipping), got {o.grad_clip}")
        need(o.warmup_iterations >= 0, "optim.warmup_iterations", f"must be >= 0 (a negative warm-up makes the learning rate negative), got {o.warmup_iterations}")
        need(ad.kind in ("lora", "full"), "adapter.kind", f"must be 'lora' or 'full', got {ad.kind!r}")
        need(ad.rank >= 1 and _positive(ad.alpha), "adapter.rank/alpha", f"must be positive and finite, got {ad.rank}/{ad.alpha}")
        try:
            re.compile(ad.target_modules)
        except re.error as e:
            need(False, "adapter.target_modules", f"is not a valid regular expression ({e}): {ad.target_modules!r}")
        need(m.dtype in ("float32", "bfloat16"), "model.dtype", f"must be float32 or bfloat16, got {m.dtype!r}")
        need(m.preset in ("tiny", "toy", "wan-1.3b"), "model.preset", f"must be 'tiny', 'toy' or 'wan-1.3b', got {m.preset!r}")
        for key in ("checkpoint", "text_encoder", "vae"):
            p = getattr(m, key)
            need(p is None or Path(p).expanduser().exists(), f"model.{key}", f"path {p!r} does not exist")
        need(m.preset == "tiny" or (m.text_encoder and m.vae), "model.text_encoder/vae",
             "the tiny random text encoder/VAE only fit the tiny preset: give local paths for real models")
        need(m.preset not in REAL_SIZE_PRESETS or m.checkpoint is not None or m.allow_random_init, "model.checkpoint",
             f"the {m.preset!r} model needs its trained weights (model.checkpoint=<Self-Forcing .pt, Wan2.1 file or "
             "diffusers folder>); set model.allow_random_init=true to run it from random weights on purpose")
        need(r.sample_every >= 0, "run.sample_every", f"must be >= 0 (0 = before/after only), got {r.sample_every}")
        need(self.data.prompts is None or Path(self.data.prompts).expanduser().is_file(), "data.prompts", f"file {self.data.prompts!r} does not exist")
        need(len(self.reward.rewards) > 0, "reward.rewards", "needs at least one reward")
        for i, e in enumerate(self.reward.rewards):
            need(_reward_name_ok(e.name), f"reward.rewards[{i}].name", f"{e.name!r} is neither a built-in reward ({', '.join(sorted(_reward_registry()))}) nor an import string 'package.module:Class'")
            need(_finite(e.weight), f"reward.rewards[{i}].weight", f"must be a finite number, got {e.weight}")
            need(e.components is None or all(_finite(w) for w in e.components.values()), f"reward.rewards[{i}].components", f"weights must be finite numbers, got {e.components}")
        t = self.reward.timeout
        need(t is None or _positive(t), "reward.timeout", f"must be null (no limit) or a finite number of seconds > 0, got {t}")
        need(self.replay.buffer_groups >= 1 and self.replay.groups_per_iteration >= 1, "replay.buffer_groups/groups_per_iteration", "must be >= 1")
        from .model.vae import COMPILE_MODES, MEMORY_FORMATS, valid_compile

        need(m.vae_memory_format in MEMORY_FORMATS, "model.vae_memory_format", f"must be one of {MEMORY_FORMATS}, got {m.vae_memory_format!r}")
        need(valid_compile(m.vae_compile), "model.vae_compile", f"must be one of {COMPILE_MODES}, got {m.vae_compile!r}")
        need(self.replay.store_dtype in ("float32", "bfloat16"), "replay.store_dtype", f"must be float32 or bfloat16, got {self.replay.store_dtype!r}")

    # -- (de)serialisation ----------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name in d:
                kw[f.name] = _build(f.type, d[f.name], f.name)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown config sections {sorted(unknown)}; known: {[f.name for f in dataclasses.fields(cls)]}")
        return cls(**kw)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(json.loads(json.dumps(self.to_dict())), sort_keys=False))


_SECTIONS = {f.name: f.type for f in dataclasses.fields(TrainConfig)}


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _finite(x) -> bool:
    return _number(x) and math.isfinite(x)


def _positive(x) -> bool:
    return _finite(x) and x > 0


def _reward_registry() -> dict:
    from .rewards import REGISTRY  # the package: built-in rewards register there when it is imported

    return REGISTRY


def _reward_name_ok(name: str) -> bool:
    if name in _reward_registry():
        return True
    module, sep, attr = name.partition(":")
    ident = r"[A-Za-z_][A-Za-z0-9_]*"
    return bool(sep) and re.fullmatch(rf"{ident}(\.{ident})*", module) is not None and re.fullmatch(rf"{ident}(\.{ident})*", attr) is not None


# -- what a resume may change, and what it must not ------------------------------------------------------------

# Fields that fix the shape or the meaning of a run's trained state: a resume must keep them (the checkpoint,
# the noise plan, the data cursor and the replay buffer were made with them).
RESUME_FIXED = (
    "model.preset", "model.checkpoint", "model.ema", "model.dtype",
    "sampler.num_chunks", "sampler.latent_height", "sampler.latent_width", "sampler.denoising_steps", "sampler.shift",
    "sampler.context_noise",
    "algo.group_size",
    "adapter.kind", "adapter.rank", "adapter.alpha", "adapter.target_modules",
    "run.mode", "run.seed", "run.groups_per_rank",
)


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def resume_conflicts(stored: dict, cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """{field: (checkpoint's value, new value)} for the RESUME_FIXED fields a resumed config changes."""
    now = json.loads(json.dumps(cfg.to_dict()))
    stored = json.loads(json.dumps(stored))
    return {f: (_get(stored, f), _get(now, f)) for f in RESUME_FIXED if _get(stored, f) != _get(now, f)}


def import_strings(d: dict) -> set[str]:
    """The 'module:Class' import strings of a plain config dict (reward names): the parts of a config that
    import and run code."""
    rewards = _get(d, "reward.rewards") or []
    return {e["name"] for e in rewards if isinstance(e, dict) and isinstance(e.get("name"), str) and ":" in e["name"]}


def _resolve(tp):
    if isinstance(tp, str):
        return eval(tp, globals())  # noqa: S307 - our own annotations only
    return tp


def _build(tp, value, where: str):
    """Turn plain YAML/JSON data into the annotated type (dataclasses, tuples, unions); errors name `where`."""
    tp = _resolve(tp)
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"config {where}: expected a mapping, got {value!r}")
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        unknown = set(value) - names
        if unknown:
            raise ValueError(f"config {where}: unknown field(s) {sorted(unknown)}; known: {sorted(names)}")
        return tp(**{k: _build(hints[k], v, f"{where}.{k}") for k, v in value.items()})
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _build(arg, value, where)
            except (ValueError, TypeError) as e:
                errors.append(str(e))
        raise ValueError(f"config {where}: {value!r} fits none of {tp} ({'; '.join(errors)})")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config {where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item = args[0]
        return tuple(_build(item if args[-1] is Ellipsis else args[i], v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config {where}: expected a list, got {value!r}")
        return [_build(typing.get_args(tp)[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"config {where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and not value.lstrip("-").isdigit()):
            raise ValueError(f"config {where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"config {where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"config {where}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"config {where}: expected a string, got {value!r}")
        return value
    return value


# -- presets ------------------------------------------------------------------------------------------------


def preset_tiny() -> dict:
    """A tiny random model on CPU, finishing in minutes on 2 cores, with a built-in offline reward: exercises
    every code path (tests use it), but aligns nothing (the random model's output barely depends on its
    noise)."""
    return {
        "model": {"preset": "tiny"},
        "sampler": {"num_chunks": 3, "latent_height": 8, "latent_width": 8},
        "algo": {"group_size": 8, "num_anchors": 4, "clip_eps": 1e-4},
        "optim": {"lr": 3e-3, "grad_clip": 1.0},
        "adapter": {"rank": 8, "alpha": 16.0},
        "run": {"iterations": 60, "groups_per_rank": 1, "micro_batch": 8, "checkpoint_every": 20, "out_dir": "runs/tiny"},
        "replay": {"buffer_groups": 16},
    }


def preset_self_forcing_13b() -> dict:
    """Self-Forcing (Wan2.1-T2V-1.3B) at 832x480, 81 frames, with the paper's AR-CoPO settings. Needs
    model.checkpoint, model.text_encoder and model.vae paths."""
    return {
        "model": {"preset": "wan-1.3b", "dtype": "bfloat16"},
        "sampler": {"num_chunks": 7, "latent_height": 60, "latent_width": 104},
        "algo": {"group_size": 12, "num_anchors": 4, "perturb_scale": 0.5, "clip_eps": 1e-4, "epochs": 2},
        "optim": {"lr": 1e-5, "gradient_checkpointing": True, "autocast_bf16": True},
        "adapter": {"rank": 64, "alpha": 128.0},
        "reward": {"rewards": [{"name": "videoalign", "weight": 1.0}], "decode_chunked": True},
        "run": {"iterations": 100, "groups_per_rank": 1, "micro_batch": 4, "fork": "zero_copy", "out_dir": "runs/self_forcing"},
        "replay": {"buffer_groups": 100, "store_dtype": "bfloat16"},
    }


def preset_toy() -> dict:
    """The embedded default: AR-CoPO aligns the toy world's trained few-step generator (arcopo_fast.toy,
    weights shipped in the package) with the toy VideoAlign reward (VQ + MQ + TA), on CPU in minutes.

    lr: the paper's 1e-5 is for LoRA on the 1.3B model (dim 1536). Adam moves every weight by about lr per
    step, and a layer's output then moves in proportion to its fan-in, so the same per-step change of the
    function at dim 96 needs lr * 1536 / 96 = 1.6e-4 (the muP rule for hidden layers): the upper end.
    iterations: 200 (3:09 wall on 2 cores since the VAE decodes in NDHWC on CPU; at 2 threads this run gave
    +0.029 +- 0.010, MQ +0.002 +- 0.006).
    tau_auto_scale 0.25 (tau0 = a quarter of the group's median distance; the paper gives no tau0). Our reading
    of what the median itself did (objects heavier, MQ falling): the neighbour softmax is flat enough that an
    anchor's prediction is pulled toward the AVERAGE of the well-scored candidates, a blur. Measured on the shipped
    base model (32 prompts x 6 videos, each with its own noise, +- SE over prompts; 200 iterations, 1 thread,
    seeds 0 / 1): scale 1: toy_videoalign +0.033 +- 0.019 / +0.028 +- 0.018, MQ -0.034 / -0.019; scale 0.25
    (the only other value tried): +0.031 +- 0.010 / +0.055 +- 0.010, MQ +0.003 / +0.011, TA +0.007 / +0.007,
    VQ +0.022 / +0.038. 60 iterations at scale 1 (the earlier default) gave +0.006 +- 0.019."""
    from .toy.assets import WEIGHTS_DIR, read_manifest, read_prompts

    w = WEIGHTS_DIR
    prompts = read_prompts(w)
    return {
        "model": {"preset": "toy", "checkpoint": str(w / "base_model.safetensors"), "text_encoder": str(w / "text_encoder"), "vae": str(w / "vae")},
        "sampler": {"num_chunks": 3, "latent_height": 8, "latent_width": 8, "shift": read_manifest(w)["sampler"]["shift"]},
        "algo": {"group_size": 8, "num_anchors": 4, "perturb_scale": 0.5, "clip_eps": 1e-4, "epochs": 2, "tau_auto_scale": 0.25},
        "optim": {"lr": 1e-4, "grad_clip": 1.0},
        "adapter": {"rank": 8, "alpha": 16.0},
        "data": {"prompts": str(w / "prompts.txt"), "eval_prompt": prompts[0], "eval_prompts": prompts[1:8]},
        "reward": {"rewards": [{"name": "toy_videoalign"}]},
        "run": {"iterations": 200, "groups_per_rank": 1, "micro_batch": 8, "checkpoint_every": 50, "out_dir": "runs/toy"},
        "replay": {"buffer_groups": 16},
    }


PRESETS = {"toy": preset_toy, "tiny": preset_tiny, "self-forcing-1.3b": preset_self_forcing_13b}
DEFAULT_PRESET = "toy"
"""The preset of a command line without --preset (the embedded default run)."""


def _deep_update(base: dict, new: dict) -> dict:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict) and k != "kwargs":
            _deep_update(base[k], v)
        else:
            base[k] = v
    return base


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def parse_override(text: str) -> tuple[list[str], Any]:
    """'algo.group_size=8' -> (['algo', 'group_size'], 8). The value is parsed as YAML (numbers, lists,
    true/false, null); a bare word stays a string."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.field=value")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if len(path) < 2 or path[0] not in _SECTIONS:
        raise ValueError(f"override {text!r}: the key must be <section>.<field> with a section in {sorted(_SECTIONS)}")
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, str) and _NUMBER.match(value):  # YAML 1.1 reads 1e-4 (no dot) as a string
        value = float(value)
    return path, value


def load_config(preset: str = DEFAULT_PRESET, config_file: str | None = None, overrides: list[str] = ()) -> TrainConfig:
    """preset, then the YAML/JSON file, then the overrides, in that order."""
    return TrainConfig.from_dict(config_dict(preset, config_file, overrides))


def config_dict(preset: str = "tiny", config_file: str | None = None, overrides: list[str] = ()) -> dict:
    """The plain (unvalidated) config dict of load_config."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    d = PRESETS[preset]()
    if config_file:
        p = Path(config_file)
        if not p.is_file():
            raise ValueError(f"config file {config_file!r} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config file {config_file}: not valid YAML ({e})") from None
        except OSError as e:
            raise ValueError(f"config file {config_file}: cannot be read ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"config file {config_file!r} must hold a mapping of sections")
        _deep_update(d, data)
    return apply_overrides(d, overrides)


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Set each `section.field=value` of `overrides` in the plain config dict `d` (in place)."""
    for ov in overrides:
        path, value = parse_override(ov)
        node = d
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return d
