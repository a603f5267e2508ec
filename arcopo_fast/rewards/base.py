"""The reward protocol, reward configs (`RewardSpec`), loading by name or import string, and `CompositeReward`.

Protocol
--------
A reward is any object (usually a small class) with

    __call__(videos: Tensor[B, F, 3, H, W] float in [0, 1], prompts: list[str] of length B)
        -> dict[str, Tensor[B]]          # one float32 score per video and component; higher is better

and two optional class attributes:

    weights: dict[str, float]   how its components enter the total (default: every component, weight 1).
                                Components it returns but does not list are logged only (e.g. VideoAlign's
                                "Overall", or a raw measurement beside a normalised score).
    name: str                   the label its components are logged under (default: the spec's name).

Rewards are sequence level: one score per whole video (AR-CoPO scores each branch's complete video).
They run under torch.no_grad; the videos may live on any device (move them to yours). Example:

    class Redness:
        '''Mean red channel: a (silly) reward that prefers red videos.'''
        weights = {"score": 1.0}

        def __init__(self, gain: float = 1.0):
            self.gain = gain

        def __call__(self, videos, prompts):
            red = videos[:, :, 0].float().mean(dim=(1, 2, 3))
            return {"score": self.gain * red, "mean_red": red}

Configure it by import string, with keyword arguments for its constructor:

    CompositeReward([{"name": "my_package.my_rewards:Redness", "weight": 0.5, "kwargs": {"gain": 2.0}},
                     "temporal_smoothness"])

The composite calls every reward, checks each output (a dict of finite float tensors of shape [B]) and
returns total[B] = sum over rewards r of weight_r * sum over components c of w_rc * score_rc, plus every
component as "<label>/<component>" for logging. Anything wrong in a reward (an exception, NaN or inf, a
wrong shape or type) raises `RewardError` naming the reward and the problem, so a trainer can catch it,
save its checkpoint and stop.

Built-in names (REGISTRY): offline rewards that need no weights (jpeg_compressibility,
temporal_smoothness, brightness, color), CLIP-family rewards (clip_score, pickscore, hpsv2) and
VideoAlign (videoalign), and the toy world's reward models (toy_ta, toy_vq, toy_mq, toy_videoalign; weights
ship with the package). Weights for the model-based rewards are read from local folders, by default
under $ARCOPO_WEIGHTS (default ./weights); a missing folder raises `MissingWeightsError` saying what to
download and where to put it.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

# ----------------------------------------------------------------------------------------------- errors


class RewardError(RuntimeError):
    """A reward failed or returned something unusable. The message names the reward and the problem."""


class MissingWeightsError(RewardError, FileNotFoundError):
    """A reward's weights are not where the config says: the message says what to download and where."""


# --------------------------------------------------------------------------------------------- protocol


@runtime_checkable
class Reward(Protocol):
    def __call__(self, videos: torch.Tensor, prompts: list[str]) -> Mapping[str, torch.Tensor]: ...


# ------------------------------------------------------------------------------------- weights folders


def weights_dir() -> Path:
    """Root folder of reward weights: $ARCOPO_WEIGHTS, default ./weights."""
    return Path(os.environ.get("ARCOPO_WEIGHTS", "weights"))


def default_weights_path(folder: str) -> Path:
    return weights_dir() / folder


def require_path(path: str | os.PathLike, *, what: str, download: str, expect: str | None = None) -> Path:
    """Return `path` as a Path if it exists, else raise MissingWeightsError saying what to download.

    what: the thing that is missing (e.g. "PickScore weights"); download: the source to fetch (a Hugging
    Face repo id or URL, with the command); expect: the files that should be inside, if a folder.
    """
    p = Path(path).expanduser()
    if p.exists():
        return p
    msg = f"{what} not found at '{p}'. Download {download} and put it at '{p}'"
    if expect:
        msg += f" (so that it contains {expect})"
    msg += f", or pass its location in the reward's kwargs. Default folders live under $ARCOPO_WEIGHTS (now '{weights_dir()}')."
    raise MissingWeightsError(msg)


def load_tensor_file(path: str | os.PathLike) -> dict[str, Any]:
    """Load a .safetensors file or a torch.save'd dict of tensors (weights only, memory-mapped when the
    file is in torch's zip format)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        obj = torch.load(str(path), map_location="cpu", weights_only=True)  # legacy (non-zip) format
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} does not hold a dict of tensors (got {type(obj).__name__})")
    return dict(obj)


# -------------------------------------------------------------------------------------------- registry

#: Built-in rewards by name -> "module:Class". Imported lazily (the CLIP/VideoAlign modules import transformers).
REGISTRY: dict[str, str] = {
    "jpeg_compressibility": "arcopo_fast.rewards.offline:JpegCompressibility",
    "temporal_smoothness": "arcopo_fast.rewards.offline:TemporalSmoothness",
    "flicker": "arcopo_fast.rewards.offline:TemporalSmoothness",
    "brightness": "arcopo_fast.rewards.offline:BrightnessTarget",
    "color": "arcopo_fast.rewards.offline:ColorTarget",
    "clip_score": "arcopo_fast.rewards.clip:ClipScore",
    "pickscore": "arcopo_fast.rewards.clip:PickScore",
    "hpsv2": "arcopo_fast.rewards.clip:HPSv2",
    "videoalign": "arcopo_fast.rewards.videoalign:VideoAlign",
    "toy_ta": "arcopo_fast.rewards.toy:ToyTA",
    "toy_vq": "arcopo_fast.rewards.toy:ToyVQ",
    "toy_mq": "arcopo_fast.rewards.toy:ToyMQ",
    "toy_videoalign": "arcopo_fast.rewards.toy:ToyVideoAlign",
}


def register_reward(name: str, target: str | Callable[..., Any]) -> None:
    """Add a built-in name: `target` is a "module:Class" string or a class/factory."""
    if not name or ":" in name:
        raise ValueError(f"reward name must be non-empty and contain no ':', got {name!r}")
    REGISTRY[name] = target  # type: ignore[assignment]


def load_reward_class(name: str | Callable[..., Any]) -> Callable[..., Any]:
    """Resolve a registry name or a "module:Class" import string (attribute may be dotted) to a factory."""
    if callable(name):
        return name
    if not isinstance(name, str) or not name:
        raise ValueError(f"reward name must be a registry name or 'module:Class', got {name!r}")
    target = REGISTRY.get(name, name)
    if callable(target):
        return target
    if ":" not in target:
        known = ", ".join(sorted(REGISTRY))
        raise ValueError(
            f"unknown reward {name!r}: use one of [{known}] or an import string 'package.module:Class'"
        )
    module_name, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - report any import failure with the reward's name
        raise RewardError(
            f"reward {name!r}: cannot import module {module_name!r} ({type(e).__name__}: {e})"
        ) from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise RewardError(f"reward {name!r}: module {module_name!r} has no attribute {attr!r}") from e
    if not callable(obj):
        raise RewardError(f"reward {name!r}: {target!r} is not a class or callable factory")
    return obj


# ------------------------------------------------------------------------------------------------ spec


@dataclasses.dataclass
class RewardSpec:
    """One configured reward.

    name: a REGISTRY name or an import string "package.module:Class".
    weight: multiplies the reward's weighted components in the total.
    kwargs: keyword arguments for the reward's constructor.
    components: component weights overriding the reward's own `weights` (e.g. {"TA": 1.0} to train on
        VideoAlign text alignment only); components not listed are logged only.
    label: the prefix its components are logged under (default: the reward's `name` attribute, else
        the registry name, else the class name). Labels must be unique within a CompositeReward.
    """

    name: str
    weight: float = 1.0
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    components: dict[str, float] | None = None
    label: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"RewardSpec.name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight):
            raise ValueError(
                f"RewardSpec.weight of {self.name!r} must be a finite number, got {self.weight!r}"
            )
        self.weight = float(self.weight)
        if not isinstance(self.kwargs, Mapping):
            raise ValueError(
                f"RewardSpec.kwargs of {self.name!r} must be a mapping, got {type(self.kwargs).__name__}"
            )
        self.kwargs = dict(self.kwargs)
        if self.components is not None:
            self.components = _check_weights(self.components, f"RewardSpec.components of {self.name!r}")

    @classmethod
    def from_config(cls, cfg: RewardSpec | Mapping[str, Any] | str) -> RewardSpec:
        """A spec from a RewardSpec, a dict with the fields above, or a bare name."""
        if isinstance(cfg, RewardSpec):
            return cfg
        if isinstance(cfg, str):
            return cls(name=cfg)
        if isinstance(cfg, Mapping):
            fields = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(cfg) - fields)
            if unknown:
                raise ValueError(
                    f"reward config {dict(cfg)!r}: unknown keys {unknown}; allowed: {sorted(fields)}"
                )
            return cls(**cfg)
        raise ValueError(f"a reward config must be a RewardSpec, a dict or a name, got {type(cfg).__name__}")

    def to_config(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_reward_list(text: str) -> list[RewardSpec]:
    """Parse a command-line list "name[=weight],name[=weight]" (names may be "module:Class")."""
    specs = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        name, sep, w = item.partition("=")
        try:
            weight = float(w) if sep else 1.0
        except ValueError:
            raise ValueError(f"reward list {text!r}: weight of {name!r} is not a number: {w!r}") from None
        specs.append(RewardSpec(name=name.strip(), weight=weight))
    if not specs:
        raise ValueError(f"reward list {text!r} names no reward")
    return specs


def build_reward(spec: RewardSpec | Mapping[str, Any] | str) -> Any:
    """Instantiate one reward from its spec. Errors name the reward."""
    spec = RewardSpec.from_config(spec)
    factory = load_reward_class(spec.name)
    try:
        reward = factory(**spec.kwargs)
    except RewardError:
        raise
    except Exception as e:  # noqa: BLE001
        raise RewardError(f"reward {spec.name!r}: construction failed ({type(e).__name__}: {e})") from e
    if not callable(reward):
        raise RewardError(f"reward {spec.name!r}: {factory!r} built a non-callable {type(reward).__name__}")
    return reward


def _check_weights(w: Mapping[str, Any], what: str) -> dict[str, float]:
    if not isinstance(w, Mapping) or not w:
        raise ValueError(f"{what} must be a non-empty mapping component -> weight, got {w!r}")
    out = {}
    for k, v in w.items():
        if not isinstance(k, str) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{what}: entry {k!r}: {v!r} must map a string to a finite number")
        out[k] = float(v)
    return out


# ------------------------------------------------------------------------------------------- validation


def check_videos(videos: torch.Tensor, prompts: Sequence[str], *, check_range: bool = True) -> None:
    """Raise ValueError unless videos is a float [B, F, 3, H, W] tensor in [0, 1] and prompts has B strings."""
    if not isinstance(videos, torch.Tensor):
        raise ValueError(f"videos must be a torch.Tensor [B, F, 3, H, W], got {type(videos).__name__}")
    if videos.ndim != 5 or videos.shape[2] != 3:
        raise ValueError(f"videos must have shape [B, F, 3, H, W], got {tuple(videos.shape)}")
    if not videos.is_floating_point():
        raise ValueError(f"videos must be a float tensor in [0, 1], got dtype {videos.dtype}")
    if min(videos.shape) == 0:
        raise ValueError(f"videos must be non-empty, got shape {tuple(videos.shape)}")
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) != videos.shape[0]:
        n = len(prompts) if isinstance(prompts, Sequence) else type(prompts).__name__
        raise ValueError(f"prompts must be a list of {videos.shape[0]} strings (one per video), got {n}")
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must all be strings")
    if check_range:
        # One host sync per reward call (not in a hot path): catches NaN videos and wrong value ranges.
        lo, hi = torch.aminmax(videos.detach())
        lo, hi = float(lo), float(hi)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError("videos contain NaN or inf (did the generator or the VAE decode diverge?)")
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(
                f"videos must be in [0, 1] (clamp the decoded video), got values in [{lo:.4g}, {hi:.4g}]"
            )


def validate_scores(out: Any, label: str, batch: int) -> dict[str, torch.Tensor]:
    """Check a reward's output: a non-empty dict of finite floating tensors of shape [batch]."""
    if not isinstance(out, Mapping):
        raise RewardError(
            f"reward {label!r} returned {type(out).__name__}; expected a dict component -> Tensor[B]"
        )
    if not out:
        raise RewardError(f"reward {label!r} returned an empty dict; expected at least one component")
    scores = {}
    for key, value in out.items():
        where = f"reward {label!r}, component {key!r}"
        if not isinstance(key, str) or not key or "/" in key:
            raise RewardError(f"{where}: component names must be non-empty strings without '/'")
        if not isinstance(value, torch.Tensor):
            raise RewardError(
                f"{where}: expected a torch.Tensor of shape [{batch}], got {type(value).__name__}"
            )
        if not value.is_floating_point():
            raise RewardError(f"{where}: expected a floating tensor, got dtype {value.dtype}")
        if tuple(value.shape) != (batch,):
            raise RewardError(
                f"{where}: expected shape [{batch}] (one score per video), got {list(value.shape)}"
            )
        value = value.detach().float()
        finite = torch.isfinite(value)
        if not bool(finite.all()):
            bad = (~finite).nonzero().flatten().tolist()
            raise RewardError(f"{where}: non-finite scores (NaN or inf) for videos {bad}: {value.tolist()}")
        scores[key] = value
    return scores


def sample_frame_indices(num_frames: int, n: int) -> list[int]:
    """n frame indices spread evenly over [0, num_frames - 1] (all frames when n >= num_frames)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if n < 1:
        raise ValueError(f"number of sampled frames must be >= 1, got {n}")
    if n >= num_frames:
        return list(range(num_frames))
    if n == 1:
        return [(num_frames - 1) // 2]
    return [round(i * (num_frames - 1) / (n - 1)) for i in range(n)]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """ "auto" = bfloat16 on CUDA, float32 elsewhere; or a torch dtype / its name."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in table:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(table)}, got {dtype!r}")
    return table[dtype]


# ------------------------------------------------------------------------------------------- composite


@dataclasses.dataclass
class _Entry:
    label: str
    reward: Any
    weight: float
    components: dict[str, float] | None  # None: the reward's own `weights`, else all components at 1


class CompositeReward:
    """Several rewards summed with weights. Call: (videos, prompts) -> (total [B] float32, components).

    components maps "<label>/<component>" to float32 [B] tensors (all of them, weighted or not), on the
    device of `videos`. Any failure inside a reward raises RewardError naming it.
    """

    def __init__(self, specs: Sequence[RewardSpec | Mapping[str, Any] | str] | RewardSpec | str):
        if isinstance(specs, (str, RewardSpec, Mapping)):
            specs = [specs]
        specs = [RewardSpec.from_config(s) for s in specs]
        if not specs:
            raise ValueError("CompositeReward needs at least one reward")
        entries = []
        for spec in specs:
            reward = build_reward(spec)
            label = spec.label or getattr(reward, "name", None) or _default_label(spec.name)
            entries.append(_Entry(label, reward, spec.weight, spec.components))
        self._set_entries(entries)

    @classmethod
    def from_rewards(
        cls, rewards: Mapping[str, Any], weights: Mapping[str, float] | None = None
    ) -> CompositeReward:
        """A composite of already-built rewards: {label: reward}, optional {label: weight} (default 1)."""
        self = cls.__new__(cls)
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(rewards))
        if unknown:
            raise ValueError(f"weights given for unknown rewards {unknown}; rewards are {sorted(rewards)}")
        entries = []
        for label, reward in rewards.items():
            if not callable(reward):
                raise ValueError(f"reward {label!r} is not callable")
            entries.append(_Entry(label, reward, float(weights.get(label, 1.0)), None))
        self._set_entries(entries)
        return self

    def _set_entries(self, entries: list[_Entry]) -> None:
        labels = [e.label for e in entries]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"reward labels must be unique, got duplicates {dup}: set RewardSpec.label")
        for e in entries:
            if "/" in e.label or not e.label:
                raise ValueError(f"reward label {e.label!r} must be non-empty and contain no '/'")
            own = getattr(e.reward, "weights", None)
            if e.components is None and own is not None:
                e.components = _check_weights(own, f"weights of reward {e.label!r}")
        self.entries = entries

    @property
    def labels(self) -> list[str]:
        return [e.label for e in self.entries]

    def describe(self) -> str:
        parts = []
        for e in self.entries:
            comp = (
                "all components"
                if e.components is None
                else ", ".join(f"{k}x{v:g}" for k, v in e.components.items())
            )
            parts.append(f"{e.label} (weight {e.weight:g}: {comp})")
        return "; ".join(parts)

    @torch.no_grad()
    def __call__(
        self, videos: torch.Tensor, prompts: Sequence[str]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        check_videos(videos, prompts)
        prompts = list(prompts)
        batch, device = videos.shape[0], videos.device
        total = torch.zeros(batch, dtype=torch.float32, device=device)
        components: dict[str, torch.Tensor] = {}
        for e in self.entries:
            try:
                out = e.reward(videos, prompts)
            except RewardError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure inside a reward is reported by name
                raise RewardError(f"reward {e.label!r} raised {type(exc).__name__}: {exc}") from exc
            scores = validate_scores(out, e.label, batch)
            weights = e.components if e.components is not None else {k: 1.0 for k in scores}
            missing = sorted(set(weights) - set(scores))
            if missing:
                raise RewardError(
                    f"reward {e.label!r} did not return components {missing} that its weights name; "
                    f"it returned {sorted(scores)}"
                )
            for key, value in scores.items():
                value = value.to(device)
                components[f"{e.label}/{key}"] = value
                if key in weights and weights[key] != 0.0:
                    total = total + (e.weight * weights[key]) * value
        return total, components


def _default_label(name: str) -> str:
    if ":" in name:
        return name.rpartition(":")[2].rpartition(".")[2]
    return name
