"""LoRA adapters (peft) on the causal Wan DiT: one adapter per training mode, merge arithmetic.

On-policy training trains the adapter "on", semi-on-policy the adapter "semi"; they are never mixed in one
run. At inference they are merged: W = W0 + dW_semi + s * dW_on (s = 0.8 for Self-Forcing).
Adapters are saved in peft's own format, as PeftModel.save_pretrained writes it: adapter_config.json by
peft's LoraConfig.save_pretrained, adapter_model.safetensors with PeftModel's "base_model.model." key
prefix, so `peft.PeftModel.from_pretrained(CausalWanModel(cfg), folder)` loads it with no warning. (The
adapters are injected into the model itself, not wrapped in a PeftModel, so PeftModel.save_pretrained
cannot be called on it; save_adapter writes the same files.) Folders written before, with unprefixed keys
and a hand-written config, still load.

For diffusers, `diffusers_lora_state_dict` renames an adapter to diffusers' WanTransformer3DModel module
names and folds the merge scale into a single LoRA (merge.py writes it with diffusers' own
WanPipeline.save_lora_weights).
"""

from __future__ import annotations

import contextlib
import copy
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

ADAPTER_FOR_MODE = {"on-policy": "on", "semi-on-policy": "semi"}
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # PeftModel's key prefix in saved adapter weights


def add_lora(model: torch.nn.Module, name: str, *, rank: int, alpha: float, target_modules: str) -> None:
    """Inject a LoRA adapter `name` (B initialised to zero: the policy starts at the base weights), make it
    the only trainable parameters, and keep its factors in float32 whatever the base dtype."""
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules, lora_dropout=0.0, bias="none")
    with warnings.catch_warnings():  # a second adapter (semi + on, several loaded LoRAs) is intended here
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(cfg, model, adapter_name=name)
    if not lora_layers(model):
        raise ValueError(f"adapter.target_modules {target_modules!r} matched no Linear layer of the model")
    for n, p in model.named_parameters():
        is_lora = ".lora_" in n and f".{name}." in n
        p.requires_grad_(is_lora)
        if is_lora:
            p.data = p.data.float()
    configs = getattr(model, "_arcopo_lora_configs", {})
    configs[name] = cfg
    model._arcopo_lora_configs = configs


def lora_layers(model: torch.nn.Module) -> list[BaseTunerLayer]:
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Run the base (reference) weights: semi-on-policy rebuilds the reference prefix cache this way."""
    layers = lora_layers(model)
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


def adapter_state_dict(model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}


def lora_config(model: torch.nn.Module, name: str) -> LoraConfig:
    configs = getattr(model, "_arcopo_lora_configs", {})
    if name not in configs:
        raise ValueError(f"the model has no LoRA adapter {name!r} (it has {sorted(configs)})")
    return configs[name]


def save_adapter(model: torch.nn.Module, name: str, out_dir: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write adapter `name` as PeftModel.save_pretrained does (see the module docstring). state: the
    adapter's weights as adapter_state_dict returns them (default: read from the model)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = state if state is not None else adapter_state_dict(model, name)
    save_file({PEFT_PREFIX + k: v.contiguous() for k, v in state.items()}, str(out / ADAPTER_FILE), metadata={"format": "pt"})
    cfg = copy.deepcopy(lora_config(model, name))
    cfg.inference_mode = True  # as PeftModel.save_pretrained: a saved adapter loads for inference
    base = type(model)
    cfg.save_pretrained(str(out), auto_mapping_dict={"base_model_class": base.__name__, "parent_library": base.__module__})
    return out


def read_adapter(src_dir: str | Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """(LoraConfig, weights keyed by module path + ".lora_A.weight" / ".lora_B.weight") of a saved adapter
    folder: peft's layout, or the unprefixed one this package wrote before."""
    src = Path(src_dir)
    for f in (ADAPTER_FILE, ADAPTER_CONFIG):
        if not (src / f).is_file():
            raise FileNotFoundError(f"adapter folder {src} lacks {f}")
    raw = json.loads((src / ADAPTER_CONFIG).read_text())
    if raw.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter {src}: peft_type {raw.get('peft_type')!r} is not LORA")
    cfg = LoraConfig(r=raw["r"], lora_alpha=raw["lora_alpha"], target_modules=raw["target_modules"],
                     lora_dropout=raw.get("lora_dropout", 0.0), bias=raw.get("bias", "none"))
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(src / ADAPTER_FILE)).items()}
    return cfg, state


def resolve_adapter_dir(path: str | Path) -> Path:
    """An adapter folder from an adapter folder, a training checkpoint folder or a run directory (its
    latest checkpoint's adapter/)."""
    from . import checkpointing

    p = checkpointing.expand_latest(path)  # runs/x/checkpoints/latest[/adapter] works as a path
    if (p / ADAPTER_FILE).is_file():
        return p
    return checkpointing.resolve(p) / "adapter"


def activate(model: torch.nn.Module, scales: dict[str, float]) -> None:
    """For inference: make exactly the adapters in `scales` active, each at its scale
    (W = W0 + sum scale * dW), and leave every parameter frozen (peft's set_adapter unfreezes them)."""
    for layer in lora_layers(model):
        for name, scale in scales.items():
            layer.set_scale(name, scale)  # ignored by layers the adapter does not touch
        layer.set_adapter([n for n in scales if n in layer.lora_A])
    model.requires_grad_(False)


def load_adapter(model: torch.nn.Module, name: str, src_dir: str | Path) -> None:
    """Load saved adapter weights into the model, injecting the adapter first if it is missing. `src_dir` may
    go through a checkpoints/latest marker (runs/x/checkpoints/latest/adapter)."""
    from .checkpointing import expand_latest

    src = expand_latest(src_dir)
    cfg, state = read_adapter(src)
    _check_fits(model, state, src)
    if not any(name in m.lora_A for m in lora_layers(model)):
        add_lora(model, name, rank=cfg.r, alpha=cfg.lora_alpha, target_modules=cfg.target_modules)
    result = set_peft_model_state_dict(model, state, adapter_name=name)
    missing = [k for k in result.missing_keys if ".lora_" in k and f".{name}." in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"adapter {src}: missing keys {missing[:5]}, unexpected keys {list(result.unexpected_keys)[:5]}")


def _check_fits(model: torch.nn.Module, state: dict[str, torch.Tensor], src: Path) -> None:
    """Refuse, before anything is injected, an adapter whose factors do not fit the model's layers: one
    trained on another base model (e.g. the tiny model's adapter onto the toy model)."""
    for key, t in state.items():
        mod_name, sep, rest = key.partition(".lora_")
        if not sep or rest[:1] not in ("A", "B") or t.dim() != 2:
            continue  # not a factor: reported as an unexpected key after the load
        try:
            layer = model.get_submodule(mod_name)
        except AttributeError:
            continue
        base = layer.get_base_layer() if isinstance(layer, BaseTunerLayer) else layer
        if not isinstance(base, torch.nn.Linear):
            continue
        got, want = (t.shape[1], base.in_features) if rest[0] == "A" else (t.shape[0], base.out_features)
        if got != want:
            side = "inputs" if rest[0] == "A" else "outputs"
            raise ValueError(
                f"adapter {src} does not fit this model: its {key} {tuple(t.shape)} is for a layer of {got} {side}, "
                f"the model's {mod_name} has {want}; it was trained on another base model: load it onto that one")


def remove_lora(model: torch.nn.Module) -> None:
    """Take every LoRA adapter out of the model: each peft layer is replaced by the base layer it wraps
    (whose weights were never changed), so the model is again exactly the base model."""
    for mod_name, layer in list(model.named_modules()):
        if isinstance(layer, BaseTunerLayer):
            parent_name, _, child = mod_name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, layer.get_base_layer())
    if hasattr(model, "_arcopo_lora_configs"):
        del model._arcopo_lora_configs
    model.requires_grad_(False)


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module, scales: dict[str, float]) -> dict[str, torch.Tensor]:
    """Base weights plus sum_name scales[name] * dW_name in every LoRA layer, as a plain state dict with
    the model's original parameter names (no peft wrappers): W = W0 + dW_semi + s * dW_on."""
    out = {k.replace(".base_layer", ""): v.detach().clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    for mod_name, layer in model.named_modules():
        if not isinstance(layer, BaseTunerLayer):
            continue
        key = f"{mod_name}.weight"
        delta = torch.zeros_like(out[key], dtype=torch.float32)
        for name, s in scales.items():
            if name in layer.lora_A:
                delta += s * layer.get_delta_weight(name).float()  # B @ A * (alpha / r)
        out[key] = (out[key].float() + delta).to(out[key].dtype)
    return out


@torch.no_grad()
def diffusers_lora_state_dict(adapters: list[tuple[LoraConfig, dict[str, torch.Tensor], float]]) -> tuple[dict[str, torch.Tensor], dict]:
    """One LoRA in diffusers' WanTransformer3DModel names equal to sum_i scale_i * dW_i of the given
    (config, weights, scale) adapters (weights as read_adapter returns them, original Wan module names).

    A single adapter keeps its factors and carries its scale in lora_alpha (alpha' = scale * alpha, so
    alpha' / r = scale * alpha / r). Several are stacked along the rank (A = [A_1; A_2], B = [c_1 B_1, c_2 B_2]
    with c_i = scale_i * alpha_i / r_i, zero blocks where an adapter does not touch a module) with
    lora_alpha = rank. Returns (weights keyed "<diffusers module>.lora_A.weight" / ".lora_B.weight", the
    LoraConfig fields diffusers' loader needs: r, lora_alpha, target_modules)."""
    from .model.checkpoint import wan_to_diffusers_name

    if not adapters:
        raise ValueError("give at least one adapter")
    per_module: dict[str, list] = {}
    for i, (_, state, _) in enumerate(adapters):
        for k, a in state.items():
            if k.endswith(".lora_A.weight"):
                mod = k[: -len(".lora_A.weight")]
                per_module.setdefault(mod, [None] * len(adapters))[i] = (a.float(), state[f"{mod}.lora_B.weight"].float())
    ranks = [cfg.r for cfg, _, _ in adapters]
    out = {}
    for mod, parts in per_module.items():
        name = wan_to_diffusers_name(f"{mod}.weight")[: -len(".weight")]
        if len(adapters) == 1:
            a, b = parts[0]
        else:
            shape_a = next(p[0].shape[1] for p in parts if p is not None)
            shape_b = next(p[1].shape[0] for p in parts if p is not None)
            blocks_a, blocks_b = [], []
            for (cfg, _, scale), r, p in zip(adapters, ranks, parts):
                a_i, b_i = p if p is not None else (torch.zeros(r, shape_a), torch.zeros(shape_b, r))
                blocks_a.append(a_i)
                blocks_b.append(b_i * (scale * cfg.lora_alpha / r))
            a, b = torch.cat(blocks_a, 0), torch.cat(blocks_b, 1)
        out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = a.contiguous(), b.contiguous()
    if len(adapters) == 1:
        cfg, _, scale = adapters[0]
        r, alpha = cfg.r, scale * cfg.lora_alpha
    else:
        r = alpha = sum(ranks)
    modules = sorted(k[: -len(".lora_A.weight")] for k in out if k.endswith(".lora_A.weight"))
    return out, {"r": r, "lora_alpha": alpha, "target_modules": modules}
