"""LoRA adapters (peft) on the causal Wan DiT: one adapter per training mode, merge arithmetic.

On-policy training trains the adapter "on", semi-on-policy the adapter "semi"; they are never mixed in one
run. At inference they are merged: W = W0 + dW_semi + s * dW_on (s = 0.8 for Self-Forcing).
Adapters are saved in peft's own format (adapter_model.safetensors + adapter_config.json).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

ADAPTER_FOR_MODE = {"on-policy": "on", "semi-on-policy": "semi"}
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def add_lora(model: torch.nn.Module, name: str, *, rank: int, alpha: float, target_modules: str) -> None:
    """Inject a LoRA adapter `name` (B initialised to zero: the policy starts at the base weights), make it
    the only trainable parameters, and keep its factors in float32 whatever the base dtype."""
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules, lora_dropout=0.0, bias="none")
    inject_adapter_in_model(cfg, model, adapter_name=name)
    if not lora_layers(model):
        raise ValueError(f"adapter.target_modules {target_modules!r} matched no Linear layer of the model")
    for n, p in model.named_parameters():
        is_lora = ".lora_" in n and f".{name}." in n
        p.requires_grad_(is_lora)
        if is_lora:
            p.data = p.data.float()
    model._arcopo_lora_config = {"r": rank, "lora_alpha": alpha, "target_modules": target_modules}


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


def save_adapter(model: torch.nn.Module, name: str, out_dir: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state if state is not None else adapter_state_dict(model, name), str(out / ADAPTER_FILE))
    cfg = dict(model._arcopo_lora_config, peft_type="LORA", adapter_name=name, lora_dropout=0.0, bias="none")
    (out / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2))
    return out


def load_adapter(model: torch.nn.Module, name: str, src_dir: str | Path) -> None:
    """Load saved adapter weights into the model, injecting the adapter first if it is missing. `src_dir` may
    go through a checkpoints/latest marker (runs/x/checkpoints/latest/adapter)."""
    from .checkpointing import expand_latest

    src = expand_latest(src_dir)
    for f in (ADAPTER_FILE, ADAPTER_CONFIG):
        if not (src / f).is_file():
            raise FileNotFoundError(f"adapter folder {src} lacks {f}")
    cfg = json.loads((src / ADAPTER_CONFIG).read_text())
    if not any(name in m.lora_A for m in lora_layers(model)):
        add_lora(model, name, rank=cfg["r"], alpha=cfg["lora_alpha"], target_modules=cfg["target_modules"])
    result = set_peft_model_state_dict(model, load_file(str(src / ADAPTER_FILE)), adapter_name=name)
    missing = [k for k in result.missing_keys if ".lora_" in k and f".{name}." in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"adapter {src}: missing keys {missing[:5]}, unexpected keys {list(result.unexpected_keys)[:5]}")


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
