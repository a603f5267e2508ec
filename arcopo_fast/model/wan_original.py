"""The original Wan2.1 file layouts of the umT5 text encoder and the VAE, read into transformers' and
diffusers' classes.

Self-Forcing users hold `wan_models/Wan2.1-T2V-1.3B/` as released by Wan: the DiT in Wan's own names, the
umT5-XXL encoder as `models_t5_umt5-xxl-enc-bf16.pth` (a state dict of Wan's T5Encoder), its tokenizer in
`google/umt5-xxl/`, and the VAE as `Wan2.1_VAE.pth` (a state dict of Wan's WanVAE_). This module maps those
parameter names onto transformers' UMT5EncoderModel and diffusers' AutoencoderKLWan, which compute the same
functions (tests/test_wan_original.py checks both against independent references).

The mapping is written once, from the library's name to the original one (`umt5_original_name`,
`vae_original_name`); loading builds the library model on the meta device, lists the original name of each
of its parameters, and checks the file against that list strictly: every missing key, unexpected key and
wrong shape is named (CheckpointError) before anything is copied. The model configs are read from the
tensor shapes (the files carry none).

umT5 (Wan's T5Encoder, shared_pos=False: every block has its own relative position table):
    token_embedding                         -> shared (= encoder.embed_tokens, tied)
    blocks.N.norm1 / norm2                  -> encoder.block.N.layer.0 / layer.1 .layer_norm
    blocks.N.attn.{q,k,v,o}                 -> encoder.block.N.layer.0.SelfAttention.{q,k,v,o}
    blocks.N.pos_embedding.embedding        -> encoder.block.N.layer.0.SelfAttention.relative_attention_bias
    blocks.N.ffn.gate.0 / fc1 / fc2         -> encoder.block.N.layer.1.DenseReluDense.wi_0 / wi_1 / wo
                                               (gated GELU: wo(gelu_tanh(wi_0 x) * wi_1 x))
    norm                                    -> encoder.final_layer_norm

VAE (Wan's Encoder3d / Decoder3d keep flat Sequentials; diffusers groups the decoder by level):
    {encoder,decoder}.conv1 / head.0 / head.2           -> conv_in / norm_out / conv_out
    {encoder,decoder}.middle.0 / 1 / 2                  -> mid_block.resnets.0 / attentions.0 / resnets.1
    residual block: residual.0 / 2 / 3 / 6, shortcut    -> norm1 / conv1 / norm2 / conv2, conv_shortcut
    encoder.downsamples.I                               -> encoder.down_blocks.I (same flat index)
    decoder.upsamples.I (levels of num_res_blocks + 1
      residual blocks, then one resample but the last)  -> decoder.up_blocks.L.resnets.J / upsamplers.0
    conv1 / conv2 (top level)                           -> quant_conv / post_quant_conv
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from .checkpoint import CheckpointError, _check_keys, _torch_load, rename

__all__ = [
    "UMT5_FILE",
    "UMT5_TOKENIZER_DIR",
    "VAE_FILE",
    "load_umt5_encoder",
    "load_wan_vae",
    "umt5_config_from_original",
    "umt5_original_name",
    "umt5_to_original",
    "vae_config_from_original",
    "vae_original_name",
    "vae_to_original",
]

UMT5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
UMT5_TOKENIZER_DIR = "google/umt5-xxl"
VAE_FILE = "Wan2.1_VAE.pth"
WAN_T5_MAX_DISTANCE = 128  # Wan's T5RelativeEmbedding max_dist (not visible in any shape)


# -- umT5 --------------------------------------------------------------------------------------------------

_UMT5_RULES: list[tuple[re.Pattern, str]] = [
    (re.compile(p), r)
    for p, r in [
        (r"^(shared|encoder\.embed_tokens)\.weight$", "token_embedding.weight"),
        (r"^encoder\.block\.(\d+)\.layer\.0\.layer_norm\.", r"blocks.\1.norm1."),
        (r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\.", r"blocks.\1.norm2."),
        (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.", r"blocks.\1.pos_embedding.embedding."),
        (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.", r"blocks.\1.attn.\2."),
        (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.", r"blocks.\1.ffn.gate.0."),
        (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.", r"blocks.\1.ffn.fc1."),
        (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.", r"blocks.\1.ffn.fc2."),
        (r"^encoder\.final_layer_norm\.", "norm."),
    ]
]


def umt5_original_name(name: str) -> str:
    """Wan's name of a transformers UMT5EncoderModel parameter (KeyError for a name with no original)."""
    new = rename(_UMT5_RULES, name)
    if new is not None:
        return new
    raise KeyError(f"UMT5EncoderModel parameter {name!r} has no counterpart in Wan's T5 encoder")


def umt5_to_original(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A UMT5EncoderModel state dict under Wan's names (the tied embedding once)."""
    return {umt5_original_name(k): v for k, v in sd.items()}


def umt5_config_from_original(sd: Mapping[str, torch.Tensor], **overrides):
    """transformers UMT5Config of the encoder whose Wan-named weights are `sd` (umT5-XXL: vocab 256384,
    d_model 4096, 24 layers, 64 heads of 64, d_ff 10240, 32 buckets)."""
    from transformers import UMT5Config

    need = ["token_embedding.weight", "blocks.0.attn.q.weight", "blocks.0.ffn.fc1.weight",
            "blocks.0.pos_embedding.embedding.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise CheckpointError(f"not a Wan umT5 encoder state dict: it lacks {missing}")
    vocab, d_model = sd["token_embedding.weight"].shape
    buckets, heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    fields = dict(
        vocab_size=int(vocab),
        d_model=int(d_model),
        d_kv=int(sd["blocks.0.attn.q.weight"].shape[0]) // int(heads),
        d_ff=int(sd["blocks.0.ffn.fc1.weight"].shape[0]),
        num_layers=int(layers),
        num_heads=int(heads),
        relative_attention_num_buckets=int(buckets),
        relative_attention_max_distance=WAN_T5_MAX_DISTANCE,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
        is_encoder_decoder=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    return UMT5Config(**{**fields, **overrides})


def load_umt5_encoder(
    source: str | Path | Mapping[str, torch.Tensor], *, dtype: torch.dtype | None = None, device="cpu", **config_overrides
):
    """transformers UMT5EncoderModel from Wan's umT5 encoder file (models_t5_umt5-xxl-enc-bf16.pth) or its
    state dict. Strict: CheckpointError lists missing/unexpected keys and wrong shapes. dtype None keeps the
    stored one (bfloat16 for Wan's file)."""
    from transformers import UMT5EncoderModel

    sd = dict(_read(source))
    config = umt5_config_from_original(sd, **config_overrides)
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    names = {k: umt5_original_name(k) for k in model.state_dict()}
    _check_keys({names[k]: p.shape for k, p in model.state_dict().items()}, sd, source if not isinstance(source, Mapping) else "umT5 state dict")
    state = {k: sd[orig].to(device=device, dtype=dtype or sd[orig].dtype, copy=True) for k, orig in names.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()  # shared and encoder.embed_tokens: one tensor, as from_pretrained leaves them
    return model.eval().requires_grad_(False)


# -- VAE ---------------------------------------------------------------------------------------------------

_RESBLOCK = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
             "conv_shortcut": "shortcut"}
_ENDS = {"conv_in": "conv1", "norm_out": "head.0", "conv_out": "head.2"}
_TOP = {"quant_conv": "conv1", "post_quant_conv": "conv2"}


def _resblock_part(rest: str) -> str:
    part, _, tail = rest.partition(".")
    if part not in _RESBLOCK:
        raise KeyError(part)
    return f"{_RESBLOCK[part]}.{tail}"


def vae_original_name(name: str, num_res_blocks: int) -> str:
    """Wan's name of a diffusers AutoencoderKLWan parameter (Wan2.1 architecture: no attention outside the
    middle blocks). num_res_blocks: the VAE config's (the decoder has num_res_blocks + 1 per level)."""
    try:
        top, _, rest = name.partition(".")
        if top in _TOP:
            return f"{_TOP[top]}.{rest}"
        if top not in ("encoder", "decoder"):
            raise KeyError(top)
        part, _, rest = rest.partition(".")
        if part in _ENDS:
            return f"{top}.{_ENDS[part]}.{rest}"
        if part == "mid_block":
            kind, idx, rest = rest.split(".", 2)
            if kind == "attentions":
                return f"{top}.middle.1.{rest}"
            return f"{top}.middle.{2 * int(idx)}.{_resblock_part(rest)}"
        if part == "down_blocks" and top == "encoder":
            idx, _, rest = rest.partition(".")
            if rest.startswith(("resample.", "time_conv.")):
                return f"encoder.downsamples.{idx}.{rest}"
            return f"encoder.downsamples.{idx}.{_resblock_part(rest)}"
        if part == "up_blocks" and top == "decoder":
            level, kind, idx, rest = rest.split(".", 3)
            flat = int(level) * (num_res_blocks + 2)  # each level before it: its resnets and one resample
            if kind == "upsamplers":
                return f"decoder.upsamples.{flat + num_res_blocks + 1}.{rest}"
            return f"decoder.upsamples.{flat + int(idx)}.{_resblock_part(rest)}"
    except (KeyError, ValueError):
        pass
    raise KeyError(f"AutoencoderKLWan parameter {name!r} has no counterpart in Wan2.1's VAE")


def vae_to_original(sd: Mapping[str, torch.Tensor], num_res_blocks: int) -> dict[str, torch.Tensor]:
    """An AutoencoderKLWan state dict under Wan2.1's names."""
    return {vae_original_name(k, num_res_blocks): v for k, v in sd.items()}


def vae_config_from_original(sd: Mapping[str, torch.Tensor]) -> dict:
    """AutoencoderKLWan config fields of the VAE whose Wan-named weights are `sd` (Wan2.1: base_dim 96,
    z_dim 16, dim_mult [1, 2, 4, 4], num_res_blocks 2, temperal_downsample [False, True, True]). The latent
    normalisation (latents_mean / latents_std) is not in the file: diffusers' defaults are Wan2.1's."""
    need = ["conv2.weight", "encoder.conv1.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise CheckpointError(f"not a Wan VAE state dict: it lacks {missing}")
    if any(k.startswith("encoder.downsamples.") and ".to_qkv." in k for k in sd):
        raise CheckpointError("Wan VAE with attention outside the middle block (attn_scales) is not supported")
    base = int(sd["encoder.conv1.weight"].shape[0])
    down = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.downsamples\.(\d+)\.resample\.", k))}
    num_res_blocks = min(down) if down else 1 + max(
        int(m.group(1)) for k in sd if (m := re.match(r"encoder\.downsamples\.(\d+)\.", k)))
    levels = len(down) + 1
    dim_mult, temporal = [], []
    for level in range(levels):
        first = level * (num_res_blocks + 1)  # the level's first residual block in the flat list
        key = f"encoder.downsamples.{first}.residual.2.weight"
        if key not in sd:
            raise CheckpointError(f"unexpected Wan VAE layout: {key} is missing")
        dim_mult.append(int(sd[key].shape[0]) // base)
        if level < levels - 1:
            temporal.append(f"encoder.downsamples.{first + num_res_blocks}.time_conv.weight" in sd)
    return dict(base_dim=base, z_dim=int(sd["conv2.weight"].shape[0]), dim_mult=dim_mult,
                num_res_blocks=num_res_blocks, attn_scales=[], temperal_downsample=temporal)


def load_wan_vae(
    source: str | Path | Mapping[str, torch.Tensor], *, dtype: torch.dtype | None = None, device="cpu", **config_overrides
):
    """diffusers AutoencoderKLWan from Wan2.1's VAE file (Wan2.1_VAE.pth) or its state dict. Strict:
    CheckpointError lists missing/unexpected keys and wrong shapes. config_overrides: AutoencoderKLWan
    config fields (e.g. latents_mean / latents_std for a VAE other than Wan2.1's)."""
    from diffusers import AutoencoderKLWan

    sd = dict(_read(source))
    config = {**vae_config_from_original(sd), **config_overrides}
    with torch.device("meta"):
        vae = AutoencoderKLWan(**config)
    names = {k: vae_original_name(k, config["num_res_blocks"]) for k in vae.state_dict()}
    _check_keys({names[k]: p.shape for k, p in vae.state_dict().items()}, sd, source if not isinstance(source, Mapping) else "VAE state dict")
    state = {k: sd[orig].to(device=device, dtype=dtype or sd[orig].dtype, copy=True) for k, orig in names.items()}
    vae.load_state_dict(state, strict=True, assign=True)
    return vae.eval().requires_grad_(False)


def _read(source) -> Mapping[str, torch.Tensor]:
    if isinstance(source, Mapping):
        return source
    path = Path(source).expanduser()
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        if not path.exists():
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        return load_file(str(path))
    obj = _torch_load(path, False)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, got a {type(obj).__name__}")
    return obj
