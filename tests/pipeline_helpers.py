"""Tiny random diffusers / transformers components (the real classes) for the pipeline and export tests:
a WanTransformer3DModel of the 'tiny' preset's shape, a small AutoencoderKLWan, the tiny umT5 encoder and
tokenizer, and a diffusers WanPipeline made of them. Seconds to build; the session fixtures in conftest.py
build them once."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_TRANSFORMER = dict(  # = the 'tiny' preset: dim 64 = 2 heads x 32, 2 layers, ffn 128, freq 32, text 32
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16,
    text_dim=32, freq_dim=32, ffn_dim=128, num_layers=2, cross_attn_norm=True, eps=1e-6, rope_max_seq_len=1024,
)
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])


def randomize(module: torch.nn.Module, seed: int, scale: float = 0.2) -> torch.nn.Module:
    """Every parameter random (norm weights near 1), so no path is trivially exact."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("norm_q.weight", "norm_k.weight", "norm2.weight", "gamma")) or "layer_norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (scale if p.ndim > 1 else scale / 2))
    return module.eval()


def tiny_transformer(seed: int = 0):
    from diffusers import WanTransformer3DModel

    return randomize(WanTransformer3DModel(**TINY_TRANSFORMER), seed)


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(**TINY_VAE)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # default init, plus random gains and biases: outputs depend on every tensor
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return vae.eval()


def tiny_text_encoder(folder: Path, seed: int = 0):
    """(UMT5EncoderModel, tokenizer) of the tiny umT5 (d_model 32), saved to `folder` and read back, with
    Wan's relative-position max distance (128, which Wan's files do not record)."""
    import json

    from transformers import AutoTokenizer, UMT5EncoderModel

    from arcopo_fast.model.tiny_assets import build_tiny_text_encoder

    build_tiny_text_encoder(folder, seed=seed)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "relative_attention_max_distance": 128}))
    return UMT5EncoderModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def tiny_wan_pipeline(folder: Path, seed: int = 0):
    """A diffusers WanPipeline of tiny random components."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    encoder, tokenizer = tiny_text_encoder(folder / "umt5", seed)
    return WanPipeline(tokenizer=tokenizer, text_encoder=encoder, transformer=tiny_transformer(seed),
                       vae=tiny_vae(seed), scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))


def write_self_forcing_layout(root, wan_pipe):
    """Self-Forcing's files, tiny: checkpoints/self_forcing_dmd.pt and wan_models/Wan2.1-T2V-1.3B/ with Wan's
    original umT5 / VAE files and the umT5 tokenizer, from the components of `wan_pipe`."""
    from arcopo_fast.model.checkpoint import diffusers_to_wan
    from arcopo_fast.model.wan_original import (
        UMT5_FILE,
        UMT5_TOKENIZER_DIR,
        VAE_FILE,
        umt5_to_original,
        vae_to_original,
    )

    ckpt = root / "checkpoints" / "self_forcing_dmd.pt"
    ckpt.parent.mkdir(parents=True)
    gen = {f"model.{k}": v for k, v in diffusers_to_wan(wan_pipe.transformer.state_dict()).items()}
    torch.save({"generator": {k: v + 1 for k, v in gen.items()}, "generator_ema": gen}, ckpt)
    wan_dir = root / "wan_models" / "Wan2.1-T2V-1.3B"
    wan_dir.mkdir(parents=True)
    torch.save(umt5_to_original(wan_pipe.text_encoder.state_dict()), wan_dir / UMT5_FILE)
    torch.save(vae_to_original(wan_pipe.vae.state_dict(), wan_pipe.vae.config.num_res_blocks), wan_dir / VAE_FILE)
    wan_pipe.tokenizer.save_pretrained(wan_dir / UMT5_TOKENIZER_DIR)
    return ckpt, wan_dir
