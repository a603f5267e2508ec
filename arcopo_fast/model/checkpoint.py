"""Load and save CausalWanModel weights: Self-Forcing .pt, original Wan2.1 names, diffusers folders.

Every format is normalised to the ORIGINAL Wan2.1 parameter names that wan.py uses, then loaded strictly:
a missing or unexpected key, or a wrong shape, raises CheckpointError listing them all. Nothing here touches
the network.

Formats (detect_format):
  "self_forcing"  torch pickle {"generator": sd, "generator_ema": sd, ...}, keys prefixed "model.".
                  Default: generator_ema when present (Self-Forcing's released checkpoints are meant to be
                  run with --use_ema), else generator; choose with ema=True/False.
  "wan"           original names: a .safetensors / .pt / .pth / .bin state dict, or a folder with a
                  config.json of `_class_name: WanModel` (the Wan-AI/Wan2.1-T2V-1.3B layout), or a file
                  written by save_model (safetensors + `<stem>.json` config beside it).
  "diffusers"     a WanTransformer3DModel folder (config.json + diffusion_pytorch_model.safetensors, or
                  shards + diffusion_pytorch_model.safetensors.index.json), or a pipeline folder with a
                  transformer/ subfolder; names are mapped, the ModelConfig comes from config.json.

Config resolution in load_model: an explicit cfg (a ModelConfig or a preset name) is VALIDATED against the
checkpoint (its config file when there is one, else the dims read from the tensor shapes); without cfg the
config comes from the checkpoint's config, else it is inferred from the shapes (num_heads, which shapes do
not determine, comes from a preset with the same shapes, else head_dim 128 as in every Wan2.1 model).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from .config import PRESETS, ModelConfig, get_preset
from .wan import CausalWanModel

__all__ = [
    "CheckpointError",
    "config_from_diffusers",
    "config_from_state_dict",
    "detect_format",
    "diffusers_config",
    "diffusers_to_wan",
    "load_into",
    "load_model",
    "load_state_dict",
    "model_from_state_dict",
    "model_state_dict",
    "save_diffusers",
    "save_model",
    "save_self_forcing",
    "wan_to_diffusers",
    "wan_to_diffusers_name",
]

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
_SIDECAR_FORMAT = "arcopo_fast.CausalWanModel"
# Fields that fix the architecture (the rest, e.g. text_len or chunk_frames, are run settings).
ARCH_FIELDS = (
    "dim",
    "num_layers",
    "num_heads",
    "ffn_dim",
    "freq_dim",
    "text_dim",
    "in_channels",
    "out_channels",
    "patch_size",
    "eps",
)
# The architecture fields that weight shapes reveal (num_heads and eps leave no trace in them).
_SHAPE_FIELDS = tuple(f for f in ARCH_FIELDS if f not in ("num_heads", "eps"))


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model (keys, shapes, config) or cannot be read."""


# -- name mapping ------------------------------------------------------------------------------------------

# diffusers WanTransformer3DModel -> original Wan2.1 names. Note the swap: diffusers' blocks.N.norm2 is the
# affine cross-attention norm, which Wan calls norm3 (diffusers' norm3 / Wan's norm2 has no parameters).
_DIFFUSERS_TO_WAN: list[tuple[re.Pattern, str]] = [
    (re.compile(p), r)
    for p, r in [
        (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
        (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
        (r"^condition_embedder\.time_proj\.", "time_projection.1."),
        (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
        (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
        (r"^blocks\.(\d+)\.attn1\.to_q\.", r"blocks.\1.self_attn.q."),
        (r"^blocks\.(\d+)\.attn1\.to_k\.", r"blocks.\1.self_attn.k."),
        (r"^blocks\.(\d+)\.attn1\.to_v\.", r"blocks.\1.self_attn.v."),
        (r"^blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.self_attn.o."),
        (r"^blocks\.(\d+)\.attn1\.norm_([qk])\.", r"blocks.\1.self_attn.norm_\2."),
        (r"^blocks\.(\d+)\.attn2\.to_q\.", r"blocks.\1.cross_attn.q."),
        (r"^blocks\.(\d+)\.attn2\.to_k\.", r"blocks.\1.cross_attn.k."),
        (r"^blocks\.(\d+)\.attn2\.to_v\.", r"blocks.\1.cross_attn.v."),
        (r"^blocks\.(\d+)\.attn2\.to_out\.0\.", r"blocks.\1.cross_attn.o."),
        (r"^blocks\.(\d+)\.attn2\.norm_([qk])\.", r"blocks.\1.cross_attn.norm_\2."),
        (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),
        (r"^blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.0."),
        (r"^blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.2."),
        (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
        (r"^scale_shift_table$", "head.modulation"),
        (r"^proj_out\.", "head.head."),
        (r"^patch_embedding\.", "patch_embedding."),
    ]
]
# Wrapper prefixes/segments that training frameworks insert (FSDP, activation checkpointing, torch.compile,
# DDP). Removed everywhere; they never occur in a real parameter name.
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


# The inverse: original Wan2.1 names -> diffusers WanTransformer3DModel names (exports, diffusers LoRA files).
_WAN_TO_DIFFUSERS: list[tuple[re.Pattern, str]] = [
    (re.compile(p), r)
    for p, r in [
        (r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
        (r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
        (r"^time_projection\.1\.", "condition_embedder.time_proj."),
        (r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
        (r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
        (r"^blocks\.(\d+)\.self_attn\.([qkv])\.", r"blocks.\1.attn1.to_\2."),
        (r"^blocks\.(\d+)\.self_attn\.o\.", r"blocks.\1.attn1.to_out.0."),
        (r"^blocks\.(\d+)\.self_attn\.norm_([qk])\.", r"blocks.\1.attn1.norm_\2."),
        (r"^blocks\.(\d+)\.cross_attn\.([qkv])\.", r"blocks.\1.attn2.to_\2."),
        (r"^blocks\.(\d+)\.cross_attn\.o\.", r"blocks.\1.attn2.to_out.0."),
        (r"^blocks\.(\d+)\.cross_attn\.norm_([qk])\.", r"blocks.\1.attn2.norm_\2."),
        (r"^blocks\.(\d+)\.norm3\.", r"blocks.\1.norm2."),
        (r"^blocks\.(\d+)\.ffn\.0\.", r"blocks.\1.ffn.net.0.proj."),
        (r"^blocks\.(\d+)\.ffn\.2\.", r"blocks.\1.ffn.net.2."),
        (r"^blocks\.(\d+)\.modulation$", r"blocks.\1.scale_shift_table"),
        (r"^head\.modulation$", "scale_shift_table"),
        (r"^head\.head\.", "proj_out."),
        (r"^patch_embedding\.", "patch_embedding."),
    ]
]


def rename(rules: list[tuple[re.Pattern, str]], name: str) -> str | None:
    """`name` rewritten by the first of `rules` (pattern, replacement) that matches it; None if none does."""
    for pat, rep in rules:
        new, n = pat.subn(rep, name)
        if n:
            return new
    return None


def wan_to_diffusers_name(name: str) -> str:
    """The diffusers WanTransformer3DModel name of an original Wan2.1 parameter (or module) name."""
    new = rename(_WAN_TO_DIFFUSERS, name)
    if new is None:
        raise CheckpointError(f"{name!r} has no diffusers WanTransformer3DModel counterpart")
    return new


def wan_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an original-name state dict to diffusers WanTransformer3DModel names (the inverse of
    diffusers_to_wan)."""
    return {wan_to_diffusers_name(k): v for k, v in sd.items()}


def _is_diffusers_names(keys) -> bool:
    return any(k.startswith(("condition_embedder.", "proj_out.")) or ".attn1." in k for k in keys)


def diffusers_to_wan(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers WanTransformer3DModel state dict to original Wan2.1 names. Keys that no rule
    matches (e.g. the I2V image embedder) keep their name, so strict loading reports them as unexpected."""
    out = {}
    for k, v in sd.items():
        new = rename(_DIFFUSERS_TO_WAN, k) or k
        if new in out:
            raise CheckpointError(f"two diffusers keys map to {new!r} (the second is {k!r})")
        out[new] = v
    return out


def _strip(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove wrapper segments and a common "model." prefix (Self-Forcing's WanDiffusionWrapper)."""
    out = {}
    for k, v in sd.items():
        for seg in _WRAPPER_SEGMENTS:
            k = k.replace(seg, "")
        if k.startswith("module."):  # DDP
            k = k[len("module.") :]
        out[k] = v
    if out and all(k.startswith("model.") for k in out):
        out = {k[len("model.") :]: v for k, v in out.items()}
    return out


# -- reading files -----------------------------------------------------------------------------------------


def _require(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    return path


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    _require(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except SafetensorError as e:  # truncated, or not a safetensors file at all
        raise CheckpointError(f"{path} is not a readable .safetensors file ({e})") from None


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(_require(path)), framework="pt", device="cpu") as f:
            return list(f.keys())
    except SafetensorError as e:
        raise CheckpointError(f"{path} is not a readable .safetensors file ({e})") from None


def _torch_load(path: Path, allow_pickle: bool) -> object:
    _require(path)
    try:
        try:
            return torch.load(str(path), map_location="cpu", weights_only=not allow_pickle, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) serialisation cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            return torch.load(str(path), map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} holds objects other than tensors, which torch.load(weights_only=True) refuses; "
            f"if you trust the file, pass allow_pickle=True (--allow-pickle on the train command line) ({e})"
        ) from e


def _read_json(path: Path) -> dict:
    with open(_require(path)) as f:
        return json.load(f)


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _resolve_dir(path: Path) -> Path:
    """A diffusers pipeline folder (model_index.json + transformer/) -> its transformer/ folder."""
    if not (path / "config.json").exists() and (path / "transformer" / "config.json").exists():
        return path / "transformer"
    return path


def _folder_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a diffusers/Wan model folder: single safetensors file, a sharded index, or a .bin/.pth."""
    index = path / DIFFUSERS_INDEX
    if index.exists():
        shards = sorted(set(_read_json(index)["weight_map"].values()))
        sd: dict[str, torch.Tensor] = {}
        for shard in shards:
            part, _ = _read_safetensors(path / shard)
            sd.update(part)
        return sd, {}
    single = path / DIFFUSERS_WEIGHTS
    if single.exists():
        return _read_safetensors(single)
    for name in ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.pth"):
        if (path / name).exists():
            return dict(_torch_load(path / name, False)), {}
    raise FileNotFoundError(
        f"no weights in {path}: expected {DIFFUSERS_WEIGHTS} or {DIFFUSERS_INDEX} (with its shards)"
    )


def detect_format(path: str | Path) -> str:
    """The checkpoint's format: "self_forcing", "wan" or "diffusers" (see the module docstring). Raises
    FileNotFoundError naming the path if it does not exist."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        path = _resolve_dir(path)
        cfg_file = path / "config.json"
        if cfg_file.exists():
            cls = _read_json(cfg_file).get("_class_name", "")
            if cls == "WanTransformer3DModel":
                return "diffusers"
            if cls == "WanModel":
                return "wan"
        index = path / DIFFUSERS_INDEX
        if index.exists():
            keys = list(_read_json(index)["weight_map"])
        elif (path / DIFFUSERS_WEIGHTS).exists():
            keys = _safetensors_keys(path / DIFFUSERS_WEIGHTS)
        else:
            raise CheckpointError(f"{path} is a folder without {DIFFUSERS_WEIGHTS} or {DIFFUSERS_INDEX}")
        return "diffusers" if _is_diffusers_names(keys) else "wan"
    if path.suffix == ".safetensors":
        return "diffusers" if _is_diffusers_names(_safetensors_keys(path)) else "wan"
    obj = _torch_load(path, False)
    if isinstance(obj, Mapping) and ("generator" in obj or "generator_ema" in obj):
        return "self_forcing"
    if isinstance(obj, Mapping):
        return "diffusers" if _is_diffusers_names(obj) else "wan"
    raise CheckpointError(f"{path}: unrecognised checkpoint (a {type(obj).__name__}, expected a dict)")


def _pick_generator(obj: Mapping, path: Path, ema: bool | None) -> Mapping:
    if ema is None:
        ema = "generator_ema" in obj
    key = "generator_ema" if ema else "generator"
    if key not in obj:
        raise CheckpointError(f"{path} has no {key!r} entry (it has {sorted(obj)}); pass ema={not ema}")
    return obj[key]


def _load_raw(
    path: Path, ema: bool | None, allow_pickle: bool
) -> tuple[dict[str, torch.Tensor], dict | None, str]:
    """(state dict in original names, config dict or None, format). The config dict is either
    {"diffusers": <config.json>}, {"wan": <config.json>} or {"arcopo": <ModelConfig fields>}."""
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        path = _resolve_dir(path)
        fmt = detect_format(path)
        sd, _ = _folder_weights(path)
        cfg_file = path / "config.json"
        conf = _read_json(cfg_file) if cfg_file.exists() else None
        if fmt == "diffusers":
            is_cfg = conf is not None and "num_attention_heads" in conf
            return _strip(diffusers_to_wan(sd)), ({"diffusers": conf} if is_cfg else None), fmt
        is_cfg = conf is not None and conf.get("_class_name") == "WanModel"
        return _strip(sd), ({"wan": conf} if is_cfg else None), fmt
    conf = None
    side = _sidecar(path)
    if side.exists() and side != path:
        j = _read_json(side)
        if j.get("format") == _SIDECAR_FORMAT:
            conf = {"arcopo": j["config"]}
    if path.suffix == ".safetensors":
        sd, meta = _read_safetensors(path)
        if conf is None and "arcopo_config" in meta:
            conf = {"arcopo": json.loads(meta["arcopo_config"])}
        fmt = "wan"
    else:
        obj = _torch_load(path, allow_pickle)
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{path}: expected a dict of tensors, got a {type(obj).__name__}")
        if "generator" in obj or "generator_ema" in obj:
            sd, fmt = dict(_pick_generator(obj, path, ema)), "self_forcing"
        else:
            sd, fmt = dict(obj), "wan"
        bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(f"{path}: non-tensor entries {bad[:10]} (expected a state dict)")
    if _is_diffusers_names(sd):
        sd, fmt = diffusers_to_wan(sd), "diffusers"
    return _strip(sd), conf, fmt


def load_state_dict(
    path: str | Path, *, ema: bool | None = None, allow_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors (on CPU, stored dtypes) under original Wan2.1 names, "model." prefix and
    wrapper segments removed. ema picks Self-Forcing's generator_ema (True) or generator (False); default:
    generator_ema when present."""
    return _load_raw(Path(path), ema, allow_pickle)[0]


# -- configs -----------------------------------------------------------------------------------------------


def config_from_diffusers(conf: Mapping, base: ModelConfig | None = None, **overrides) -> ModelConfig:
    """ModelConfig from a diffusers WanTransformer3DModel config.json. Rejects features CausalWanModel does
    not have (I2V image embedding, no cross-attention norm, other q/k norms)."""
    unsupported = {
        "cross_attn_norm": (conf.get("cross_attn_norm", True), True),
        "qk_norm": (conf.get("qk_norm", "rms_norm_across_heads"), "rms_norm_across_heads"),
        "image_dim": (conf.get("image_dim"), None),
        "added_kv_proj_dim": (conf.get("added_kv_proj_dim"), None),
        "pos_embed_seq_len": (conf.get("pos_embed_seq_len"), None),
    }
    for name, (got, want) in unsupported.items():
        if got != want:
            raise CheckpointError(
                f"diffusers config {name}={got!r} is not supported (CausalWanModel needs {want!r})"
            )
    heads, head_dim = int(conf["num_attention_heads"]), int(conf["attention_head_dim"])
    fields = dict(
        dim=heads * head_dim,
        num_heads=heads,
        num_layers=int(conf["num_layers"]),
        ffn_dim=int(conf["ffn_dim"]),
        freq_dim=int(conf["freq_dim"]),
        text_dim=int(conf["text_dim"]),
        in_channels=int(conf["in_channels"]),
        out_channels=int(conf.get("out_channels") or conf["in_channels"]),
        patch_size=tuple(int(p) for p in conf["patch_size"]),
        eps=float(conf.get("eps", 1e-6)),
        rope_max_positions=int(conf.get("rope_max_seq_len", 1024)),
    )
    return _with_base(fields, base, overrides)


def _config_from_wan_json(conf: Mapping, base: ModelConfig | None, overrides) -> ModelConfig:
    """ModelConfig from Wan's own config.json (Wan-AI/Wan2.1-T2V-1.3B: dim, num_heads, in_dim, ...)."""
    if conf.get("model_type", "t2v") != "t2v":
        raise CheckpointError(f"Wan model_type={conf.get('model_type')!r} is not supported (only t2v)")
    fields = dict(
        dim=int(conf["dim"]),
        num_heads=int(conf["num_heads"]),
        num_layers=int(conf["num_layers"]),
        ffn_dim=int(conf["ffn_dim"]),
        freq_dim=int(conf["freq_dim"]),
        text_dim=int(conf.get("text_dim", 4096)),
        in_channels=int(conf["in_dim"]),
        out_channels=int(conf["out_dim"]),
        patch_size=tuple(int(p) for p in conf.get("patch_size", (1, 2, 2))),
        eps=float(conf.get("eps", 1e-6)),
    )
    if "text_len" in conf:
        fields["text_len"] = int(conf["text_len"])
    return _with_base(fields, base, overrides)


def _shape_fields(sd: Mapping[str, torch.Tensor]) -> dict:
    need = (
        "patch_embedding.weight",
        "text_embedding.0.weight",
        "time_embedding.0.weight",
        "blocks.0.ffn.0.weight",
        "head.head.weight",
    )
    missing = [k for k in need if k not in sd]
    if missing:
        raise CheckpointError(f"cannot infer the model config: the state dict lacks {missing}")
    pe = sd["patch_embedding.weight"].shape  # [dim, in, pt, ph, pw]
    patch = tuple(int(p) for p in pe[2:])
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    return dict(
        dim=int(pe[0]),
        in_channels=int(pe[1]),
        patch_size=patch,
        num_layers=max(layers) + 1 if layers else 0,
        text_dim=int(sd["text_embedding.0.weight"].shape[1]),
        freq_dim=int(sd["time_embedding.0.weight"].shape[1]),
        ffn_dim=int(sd["blocks.0.ffn.0.weight"].shape[0]),
        out_channels=int(sd["head.head.weight"].shape[0]) // math.prod(patch),
    )


def config_from_state_dict(
    sd: Mapping[str, torch.Tensor], base: ModelConfig | None = None, **overrides
) -> ModelConfig:
    """Infer a ModelConfig from original-name tensor shapes. num_heads is not visible in the shapes (the q/k
    RMSNorm spans all heads): it comes from `base` or `overrides`, else from a preset with the same shapes,
    else head_dim 128 (every released Wan2.1 model)."""
    fields = _shape_fields(sd)
    if base is None:
        base = next(
            (p for p in PRESETS.values() if all(getattr(p, f) == fields[f] for f in _SHAPE_FIELDS)), None
        )
    if "num_heads" not in overrides and (base is None or fields["dim"] % base.num_heads):
        if fields["dim"] % 128:
            raise CheckpointError(
                f"cannot infer num_heads for dim={fields['dim']} (not a multiple of head_dim 128 and no preset "
                f"has these shapes): pass a config"
            )
        fields["num_heads"] = fields["dim"] // 128
    return _with_base(fields, base, overrides)


def _with_base(fields: dict, base: ModelConfig | None, overrides: Mapping) -> ModelConfig:
    if base is None:
        base = next(
            (
                p
                for p in PRESETS.values()
                if all(getattr(p, f) == fields[f] for f in fields if f in ARCH_FIELDS)
            ),
            ModelConfig(),
        )
    return dataclasses.replace(base, **{**fields, **overrides})


def _config_from_arcopo(d: Mapping) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    kw = {k: (tuple(v) if k == "patch_size" else v) for k, v in d.items() if k in known}
    return ModelConfig(**kw)


def _checkpoint_config(sd, conf: Mapping | None, num_heads: int | None = None) -> ModelConfig:
    """The config the checkpoint declares (config file) or implies (tensor shapes)."""
    if conf is None:
        return config_from_state_dict(sd, **({} if num_heads is None else {"num_heads": num_heads}))
    if "diffusers" in conf:
        return config_from_diffusers(conf["diffusers"])
    if "wan" in conf:
        return _config_from_wan_json(conf["wan"], None, {})
    return _config_from_arcopo(conf["arcopo"])


def _validate(cfg: ModelConfig, found: Mapping, path) -> None:
    bad = [
        f"{f}: checkpoint {v!r} vs config {getattr(cfg, f)!r}"
        for f, v in found.items()
        if v != getattr(cfg, f)
    ]
    if bad:
        raise CheckpointError(f"{path} does not match the given model config: " + "; ".join(bad))


# -- loading into a model ----------------------------------------------------------------------------------


def _check_keys(expected: Mapping[str, torch.Size], sd: Mapping[str, torch.Tensor], source) -> None:
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k])}"
        for k in sorted(set(sd) & set(expected))
        if tuple(sd[k].shape) != tuple(expected[k])
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
        if wrong:
            parts.append(f"wrong shapes ({len(wrong)}): {wrong}")
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(parts))


def _base_name(k: str) -> str | None:
    """Plain parameter name of a (possibly peft-wrapped) model key; None for adapter parameters."""
    if re.search(r"(^|\.)lora_", k):
        return None
    k = k[len("base_model.model.") :] if k.startswith("base_model.model.") else k
    return k.replace(".base_layer.", ".")


def load_into(
    model: torch.nn.Module,
    source: str | Path | Mapping[str, torch.Tensor],
    *,
    ema: bool | None = None,
    allow_pickle: bool = False,
) -> None:
    """Copy a checkpoint (path or original-name state dict) into an existing model, strictly, in place,
    keeping the model's dtypes and devices. Works on peft-injected models: base weights are loaded, LoRA
    parameters left as they are."""
    sd = (
        load_state_dict(source, ema=ema, allow_pickle=allow_pickle)
        if isinstance(source, (str, Path))
        else _strip(diffusers_to_wan(source) if _is_diffusers_names(source) else source)
    )
    params = {}
    for k, p in model.state_dict(keep_vars=True).items():
        name = _base_name(k)
        if name is not None:
            params[name] = p
    _check_keys(
        {k: p.shape for k, p in params.items()},
        sd,
        source if isinstance(source, (str, Path)) else "state dict",
    )
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(sd[k])


def load_model(
    path: str | Path,
    cfg: ModelConfig | str | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = torch.float32,
    ema: bool | None = None,
    allow_pickle: bool = False,
    **overrides,
) -> CausalWanModel:
    """Build a CausalWanModel from a checkpoint (any format) without initialising random weights first.

    cfg: a ModelConfig or preset name, validated against the checkpoint; None derives it from the
    checkpoint. overrides: run settings that checkpoints do not store (e.g. text_len=..., chunk_frames=...),
    applied to the derived config. dtype None keeps the stored dtypes. Returns the model in eval mode."""
    path = Path(path)
    sd, conf, _ = _load_raw(path, ema, allow_pickle)
    if cfg is None:
        found = _checkpoint_config(sd, conf, overrides.get("num_heads"))
        cfg = dataclasses.replace(found, **overrides) if overrides else found
    else:
        cfg = get_preset(cfg) if isinstance(cfg, str) else cfg
        cfg = dataclasses.replace(cfg, **overrides) if overrides else cfg
        if conf is None:  # only the shapes speak: compare the dims they determine
            found = _shape_fields(sd)
        else:
            fc = _checkpoint_config(sd, conf)
            found = {f: getattr(fc, f) for f in ARCH_FIELDS}
        _validate(cfg, found, path)
    return model_from_state_dict(sd, cfg, device=device, dtype=dtype, source=path)


def model_from_state_dict(
    sd: Mapping[str, torch.Tensor],
    cfg: ModelConfig,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = torch.float32,
    source: object = "state dict",
) -> CausalWanModel:
    """A CausalWanModel of config `cfg` holding the tensors of `sd` (original or diffusers names), built on
    the meta device (no random init, one copy of the weights). Strict: CheckpointError names every missing
    or unexpected key and wrong shape. Returns the model in eval mode."""
    sd = _strip(diffusers_to_wan(sd) if _is_diffusers_names(sd) else dict(sd))
    with torch.device("meta"):
        model = CausalWanModel(cfg)
    _check_keys({k: v.shape for k, v in model.state_dict().items()}, sd, source)
    # One copy per tensor (to the target device/dtype, detached from any memory-mapped file), popping the
    # source as we go so that host memory peaks near one copy of the weights, not two.
    sd = {k: (v := sd.pop(k)).to(device=device, dtype=dtype or v.dtype, copy=True) for k in list(sd)}
    # NOTE(sync): one host read per tensor, once per load: a NaN/inf checkpoint must not sample garbage
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{source} holds non-finite values (NaN or inf) in {len(bad)} tensor(s), e.g. {bad[:3]}: "
                              "a diverged or damaged checkpoint")
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


# -- saving ------------------------------------------------------------------------------------------------


def model_state_dict(model: torch.nn.Module, *, merge_lora: bool = True) -> dict[str, torch.Tensor]:
    """Original-name state dict of a CausalWanModel, unwrapping torch.compile / DDP / peft. With peft LoRA
    layers, the active (unmerged) adapters are merged into the weights (merge_lora=False: base weights)."""
    if hasattr(model, "get_base_model"):  # peft.PeftModel
        model = model.get_base_model()
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model) if not isinstance(model, CausalWanModel) else model
    sd: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        name = _base_name(k)
        if name is not None:
            sd[name] = v.detach()
    if merge_lora:
        for mname, mod in model.named_modules():
            if not (hasattr(mod, "base_layer") and hasattr(mod, "get_delta_weight")):
                continue
            merged = set(getattr(mod, "merged_adapters", []))
            active = getattr(mod, "active_adapters", [])
            if getattr(mod, "disable_adapters", False):
                active = []
            key = f"{mname}.weight"
            for a in active:
                if a not in merged and a in getattr(mod, "lora_A", {}):
                    sd[key] = sd[key] + mod.get_delta_weight(a).to(sd[key].dtype)
    return _strip(sd)


def save_model(
    model: torch.nn.Module, path: str | Path, *, dtype: torch.dtype | None = None, merge_lora: bool = True
) -> Path:
    """Write the weights (original names) to `path` (.safetensors) and the ModelConfig to `<stem>.json`
    beside it (also embedded in the safetensors metadata). load_model(path) round-trips."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"path must end in .safetensors, got {path}")
    cfg = getattr(model, "cfg", None) or getattr(
        getattr(model, "get_base_model", lambda: None)(), "cfg", None
    )
    if not isinstance(cfg, ModelConfig):
        raise ValueError("save_model needs a CausalWanModel (a .cfg ModelConfig)")
    sd = {
        k: v.to("cpu", dtype or v.dtype).contiguous()
        for k, v in model_state_dict(model, merge_lora=merge_lora).items()
    }
    conf = dataclasses.asdict(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata={"format": _SIDECAR_FORMAT, "arcopo_config": json.dumps(conf)})
    with open(_sidecar(path), "w") as f:
        json.dump({"format": _SIDECAR_FORMAT, "config": conf}, f, indent=1)
    return path


def diffusers_config(cfg: ModelConfig) -> dict:
    """WanTransformer3DModel constructor arguments of a ModelConfig (the inverse of config_from_diffusers)."""
    return dict(
        patch_size=tuple(cfg.patch_size),
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=cfg.eps,
        rope_max_seq_len=cfg.rope_max_positions,
    )


def save_diffusers(
    model: torch.nn.Module, out_dir: str | Path, *, dtype: torch.dtype | None = None, merge_lora: bool = True
) -> Path:
    """Write the weights as a diffusers WanTransformer3DModel folder (config.json +
    diffusion_pytorch_model.safetensors, by diffusers' own save_pretrained):
    WanTransformer3DModel.from_pretrained(out_dir) reads it, and so does load_model."""
    from diffusers import WanTransformer3DModel

    cfg = _model_config(model)
    sd = {k: v.to("cpu", dtype or v.dtype) for k, v in wan_to_diffusers(model_state_dict(model, merge_lora=merge_lora)).items()}
    with torch.device("meta"):
        ref = WanTransformer3DModel(**diffusers_config(cfg))
    _check_keys({k: v.shape for k, v in ref.state_dict().items()}, sd, "diffusers export")
    ref.load_state_dict(sd, strict=True, assign=True)
    out = Path(out_dir)
    ref.save_pretrained(out)
    return out


def save_self_forcing(
    model: torch.nn.Module, path: str | Path, *, dtype: torch.dtype | None = None, merge_lora: bool = True
) -> Path:
    """Write the weights as a Self-Forcing checkpoint: a torch pickle {"generator": sd, "generator_ema": sd}
    whose keys carry the "model." prefix of Self-Forcing's WanDiffusionWrapper (both entries hold the same
    tensors, so either of Self-Forcing's --use_ema settings reads them; the file stores them once)."""
    path = Path(path)
    if path.suffix not in (".pt", ".pth"):
        raise ValueError(f"path must end in .pt or .pth, got {path}")
    sd = {f"model.{k}": v.to("cpu", dtype or v.dtype).contiguous() for k, v in model_state_dict(model, merge_lora=merge_lora).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"generator": sd, "generator_ema": sd}, path)
    return path


def _model_config(model: torch.nn.Module) -> ModelConfig:
    cfg = getattr(model, "cfg", None) or getattr(getattr(model, "get_base_model", lambda: None)(), "cfg", None)
    if not isinstance(cfg, ModelConfig):
        raise ValueError("a CausalWanModel (a .cfg ModelConfig) is needed")
    return cfg
