"""Tiny stand-ins for umT5 (random) and the Wan VAE (a small trained autoencoder), written to disk in
their real formats.

They let tests and the default tiny training run exercise the real loading code (transformers
UMT5EncoderModel + AutoTokenizer, diffusers AutoencoderKLWan, all from local folders) with no download:

  ensure_tiny_assets(root) -> {"text_encoder": <folder>, "vae": <folder>}

Deterministic (fixed seeds; the VAE is trained on one thread on synthetic videos), idempotent (a marker
file with a version; rebuilt when the version changes), safe under concurrent callers (built in a
temporary folder, then renamed). The text encoder takes about a second, the VAE about 20 s on one core;
the result is cached. The tokenizer is a SentencePiece-style Unigram (Metaspace) built from an explicit
vocabulary: whole words for a small prompt vocabulary, single characters for everything else.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

__all__ = [
    "TINY_TEXT_DIM",
    "build_tiny_text_encoder",
    "build_tiny_vae",
    "default_assets_dir",
    "ensure_tiny_assets",
    "synthetic_videos",
]

VERSION = 2  # 2: the VAE is a trained autoencoder (1 was random)
MARKER = "arcopo_tiny_asset.json"
TINY_TEXT_DIM = 32  # = the 'tiny' model preset's text_dim

_WORDS = """a an the of in on at to with and or from by over under into through near above below while its
is are was being as it this that there their his her they he she who which
video scene shot view camera close-up wide aerial slow motion time-lapse cinematic realistic photo style
cat dog bird horse fish car train boat plane person man woman child people girl boy robot dragon
tree forest flower grass garden field mountain river lake sea ocean beach wave sky cloud sun moon star rain
snow fire smoke light shadow night day sunset sunrise city street road building house room kitchen window
water ice sand rock stone wood glass metal paper
walking running flying swimming dancing jumping sitting standing playing eating looking turning moving
falling rising floating spinning riding driving cooking painting reading singing smiling laughing
red orange yellow green blue purple pink white black gray brown golden silver bright dark colorful
big small tall little young old beautiful happy calm busy quiet fast slow soft warm cold
""".split()
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()/&%+=*#@"


def default_assets_dir() -> Path:
    return Path(os.environ.get("ARCOPO_FAST_CACHE", "~/.cache/arcopo_fast")).expanduser() / "tiny_assets"


def _tokenizer(extra_words: tuple[str, ...] = ()):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]  # T5 ids: pad 0, eos 1, unk 2
    vocab = [(s, 0.0) for s in specials]
    vocab += [("\u2581" + w, -5.0) for w in dict.fromkeys([*_WORDS, *extra_words])]
    vocab += [("\u2581", -8.0)] + [(c, -10.0) for c in _CHARS]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )
    return fast, len(vocab)


def build_tiny_text_encoder(
    out: str | Path, *, d_model: int = TINY_TEXT_DIM, seed: int = 0, extra_words: tuple[str, ...] = ()
) -> Path:
    """A 2-layer random UMT5EncoderModel (d_model 32) and its tokenizer, saved with save_pretrained.
    extra_words: whole-word tokens added to the prompt vocabulary (the toy world's words)."""
    from transformers import UMT5Config, UMT5EncoderModel

    out = Path(out)
    tokenizer, vocab_size = _tokenizer(tuple(extra_words))
    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UMT5EncoderModel(config).eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# -- tiny VAE ----------------------------------------------------------------------------------------------
#
# A random AutoencoderKLWan is useless as a stand-in: its RMS norms and random convs make its decoder a fixed
# texture generator whose colour does not follow the latents, so no pixel reward can be learned through it.
# The tiny VAE is therefore a real autoencoder, built in two steps:
#
# 1. Structured init. Wan's architecture holds a simple linear video codec when initialised right: the
#    encoder averages 8x8 pixels x 4 frames of YCbCr colour into latent channels 0-2 (2x2 box per spatial
#    downsample, mean of the two newest frames per temporal one), the decoder upsamples them back (nearest
#    + a [1, 2, 1] blur per level = bilinear-like) and converts to RGB. Every residual branch and attention
#    output starts near zero, so the block stack is the identity. The RMS norms would erase the colour's
#    magnitude (x and 2x normalise alike), so a constant channel K rides along: the norm maps (x, K) to
#    ~(x, K)/K, keeping x. SiLU is made exactly linear by carrying colours as pairs (+x, -x):
#    silu(a) - silu(-a) = a. Small random weights everywhere else keep all latent channels and every
#    temporal (cached) tap alive, so streaming decode and gradients see no trivially-exact path.
# 2. Adam on reconstruction (+ a tiny KL) of synthetic smooth videos (moving colour blobs, gradients,
#    global brightness/colour changes; 9 frames of 32x32), which removes most of the error that the random
#    weights add (held-out PSNR about +1 dB; from a random init, a few hundred steps do not even learn the
#    mean colour).
#
# latents_mean/std are then measured on held-out synthetic clips (std of posterior samples), so the DiT's
# roughly unit-scale latents land where the decoder was trained: latent channels 0-2 (Y, Cb, Cr) carry the
# colour; the others carry only posterior-noise-sized values that the decoder has learned to ignore.

_VAE_ARCH = dict(
    base_dim=8,
    z_dim=16,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[False, True, True],
)
_RGB_TO_YCBCR = ((0.299, 0.587, 0.114), (-0.169, -0.331, 0.5), (0.5, -0.419, -0.081))
_K = 8.0  # the constant channel's value: large next to |x| <= 1.7, so the RMS norms are nearly linear
_KC = 6  # its index (channels 0-5 hold (Y, -Y, Cb, -Cb, Cr, -Cr))
_LOGVAR = -6.0  # posterior std 0.05
_VAE_TRAIN = dict(steps=60, batch=4, frames=9, size=32, lr=2e-4, warmup=10, kl_weight=1e-3)


def synthetic_videos(
    n: int, frames: int, size: int, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Smooth synthetic colour videos [n, frames, 3, size, size] in [0, 1], the tiny VAE's training data:
    a random base colour and global brightness, a linear colour gradient, three Gaussian colour blobs
    drifting in straight lines, and a slow global brightness drift. Resolution-independent in content."""
    for name, v in (("n", n), ("frames", frames), ("size", size)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    g = generator

    def rand(*shape):
        return torch.rand(*shape, generator=g)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    ax = torch.linspace(0.0, 1.0, size)
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    t = torch.arange(frames, dtype=torch.float32).view(1, frames, 1, 1, 1)
    video = rand(n, 1, 3, 1, 1) + 0.8 * (rand(n, 1, 1, 1, 1) - 0.5)
    angle = rand(n, 1, 1, 1, 1) * (2 * math.pi)
    ramp = (xx - 0.5) * torch.cos(angle) + (yy - 0.5) * torch.sin(angle)
    video = video + 0.25 * randn(n, 1, 3, 1, 1) * ramp
    for _ in range(3):
        cx = rand(n, 1, 1, 1, 1) + 0.03 * randn(n, 1, 1, 1, 1) * t
        cy = rand(n, 1, 1, 1, 1) + 0.03 * randn(n, 1, 1, 1, 1) * t
        sigma = 0.08 + 0.25 * rand(n, 1, 1, 1, 1)
        blob = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
        video = video + 0.3 * randn(n, 1, 3, 1, 1) * blob
    video = video + 0.01 * randn(n, 1, 1, 1, 1) * t
    return video.clamp(0.0, 1.0)


def _vae_init(vae, g: torch.Generator, eps: float = 0.01) -> None:
    """The structured init (see the comment above). eps: scale of the random weights, relative to a
    variance-preserving init."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import (
        WanAttentionBlock,
        WanResample,
        WanResidualBlock,
    )
    from torch import nn

    def noise(w, scale):  # scale 1 = variance-preserving
        return torch.randn(w.shape, generator=g) * (scale / w[0].numel() ** 0.5)

    def eye(w):  # identity on the shared channels, at the current-frame (causal: last), centre tap
        i = torch.arange(min(w.shape[0], w.shape[1]))
        kt, kh, kw = w.shape[2:]
        w[i, i, kt - 1, kh // 2, kw // 2] += 1.0

    def pairs_in(conv, m):  # channels (+c, -c) for c = m @ input
        t = conv.weight.shape[2] - 1
        for c in range(3):
            conv.weight[2 * c, :3, t, 1, 1] += m[c]
            conv.weight[2 * c + 1, :3, t, 1, 1] -= m[c]
        conv.bias[_KC] = _K

    def pairs_out(conv, m):  # output = m @ (silu(a) - silu(-a)) = m @ a
        t = conv.weight.shape[2] - 1
        for c in range(3):
            conv.weight[:3, 2 * c, t, 1, 1] += m[:, c]
            conv.weight[:3, 2 * c + 1, t, 1, 1] -= m[:, c]

    with torch.no_grad():
        for mod in vae.modules():
            if isinstance(mod, (nn.Conv2d, nn.Conv3d)):
                mod.weight.copy_(noise(mod.weight, eps))
                if mod.weight.shape[1] > _KC:  # nothing reads the large constant channel: it would swamp x
                    mod.weight[:, _KC] = 0.0
                mod.bias.zero_()
        for mod in vae.modules():
            if isinstance(mod, WanResidualBlock):  # branch nearly closed: the block is ~the identity
                mod.conv1.weight.copy_(noise(mod.conv1.weight, 1.0))
                mod.conv2.weight.copy_(noise(mod.conv2.weight, eps))
                if isinstance(mod.conv_shortcut, nn.Conv3d):
                    eye(mod.conv_shortcut.weight)
            elif isinstance(mod, WanAttentionBlock):
                mod.proj.weight.copy_(noise(mod.proj.weight, eps))
            elif isinstance(mod, WanResample):
                w = mod.resample[1].weight
                i = torch.arange(min(w.shape[0], w.shape[1]))
                if mod.mode.startswith("down"):
                    w[i, i, :2, :2] += 0.25  # 2x2 box (the zero pad is right/bottom)
                    if hasattr(mod, "time_conv"):  # stride-2 causal conv: mean of the two newest frames
                        mod.time_conv.weight[i, i, 1:, 0, 0] += 0.5
                else:
                    k = torch.tensor([0.25, 0.5, 0.25])
                    w[i, i] += k[:, None] * k[None, :]  # after nearest 2x: bilinear-like
                    if hasattr(mod, "time_conv"):  # 2 output frames per input frame: repeat it
                        c = mod.time_conv.weight.shape[1]
                        j = torch.arange(c)
                        mod.time_conv.weight[j, j, 2, 0, 0] += 1.0
                        mod.time_conv.weight[c + j, j, 2, 0, 0] += 1.0
        m = torch.tensor(_RGB_TO_YCBCR)
        enc, dec, z = vae.encoder, vae.decoder, vae.config.z_dim
        pairs_in(enc.conv_in, m)  # RGB -> (Y, -Y, Cb, -Cb, Cr, -Cr, K)
        enc.norm_out.gamma.fill_(_K / enc.norm_out.gamma.shape[0] ** 0.5)  # RMS norm: x -> ~x
        pairs_out(enc.conv_out, torch.eye(3))  # latent channels 0-2: (Y, Cb, Cr)
        q = vae.quant_conv
        q.weight[:z, :z, 0, 0, 0] += torch.eye(z)
        q.weight[z:] = 0.0
        q.bias[z:] = _LOGVAR
        eye(vae.post_quant_conv.weight)
        pairs_in(dec.conv_in, torch.eye(3))
        dec.norm_out.gamma.fill_(_K / dec.norm_out.gamma.shape[0] ** 0.5)
        pairs_out(dec.conv_out, torch.linalg.inv(m))  # (Y, Cb, Cr) -> RGB


def _decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """diffusers' frame-by-frame decode loop without the final clamp (which would stop gradients)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    x = vae.post_quant_conv(z)
    cache = [None] * sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
    outs = [
        vae.decoder(x[:, :, i : i + 1], feat_cache=cache, feat_idx=[0], first_chunk=i == 0)
        for i in range(x.shape[2])
    ]
    return torch.cat(outs, dim=2)


def _vae_train(
    vae,
    g: torch.Generator,
    steps: int,
    batch: int,
    frames: int,
    size: int,
    lr: float,
    warmup: int,
    kl_weight: float,
) -> None:
    """Adam on MSE reconstruction (videos in [-1, 1]) of posterior samples + kl_weight * KL."""
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * s / steps))
    )
    vae.train()
    for _ in range(steps):
        x = synthetic_videos(batch, frames, size, generator=g).transpose(1, 2) * 2 - 1  # [B, 3, T, H, W]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = (_decode_unclamped(vae, z) - x).pow(2).mean()
        kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
        opt.zero_grad(set_to_none=True)
        (rec + kl_weight * kl).backward()
        opt.step()
        sched.step()
    vae.eval()


def build_tiny_vae(out: str | Path, *, seed: int = 0, train_steps: int | None = None) -> Path:
    """A tiny trained AutoencoderKLWan with Wan2.1's structure (z_dim 16, 8x spatial / 4x temporal
    compression) at base_dim 8 and one residual block per level, saved with save_pretrained; its config's
    latents_mean/std are measured on synthetic clips. Deterministic for a seed on a given machine (one
    thread during the build). train_steps: Adam steps (default 60; 0 keeps the structured init).

    Building takes about 20 s on one CPU core; decoding 9 latent frames of 8x8 (33 frames of 64x64) about
    0.3 s. Held-out synthetic clips reconstruct at about 32 dB PSNR (their per-clip mean colour: 16 dB)."""
    from diffusers import AutoencoderKLWan

    out = Path(out)
    cfg = dict(_VAE_TRAIN)
    if train_steps is not None:
        if not isinstance(train_steps, int) or train_steps < 0:
            raise ValueError(f"train_steps must be a non-negative integer, got {train_steps!r}")
        cfg["steps"] = train_steps
    threads = torch.get_num_threads()
    try:
        # One thread: reproducible, and on a busy 2-core machine 2 threads measured 50x slower (OpenMP waits).
        torch.set_num_threads(1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            g = torch.Generator().manual_seed(seed)
            vae = AutoencoderKLWan(**_VAE_ARCH)
            _vae_init(vae, g)
            if cfg["steps"] > 0:
                _vae_train(vae, g, **cfg)
            with torch.no_grad():  # per-channel statistics of posterior samples on held-out clips
                x = synthetic_videos(64, 9, 32, generator=torch.Generator().manual_seed(seed + 1))
                post = vae.encode(x.transpose(1, 2) * 2 - 1).latent_dist
                mean = post.mean.mean(dim=(0, 2, 3, 4))
                std = (post.mean.var(dim=(0, 2, 3, 4)) + post.var.mean(dim=(0, 2, 3, 4))).sqrt()
        vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
        vae.save_pretrained(out)
    finally:
        torch.set_num_threads(threads)
    return out


def _is_current(dest: Path) -> bool:
    try:
        return json.loads((dest / MARKER).read_text()).get("version") == VERSION
    except (OSError, ValueError):
        return False


def _ensure(dest: Path, build) -> Path:
    if _is_current(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the final folder is an ordinary shared cache
    try:
        build(tmp)
        (tmp / MARKER).write_text(json.dumps({"version": VERSION}))
        if _is_current(dest):  # another process finished first; its copy is identical
            return dest
        if dest.exists():  # a partial folder (crash) or another layout: replace it
            shutil.rmtree(dest, ignore_errors=True)
        try:
            os.rename(tmp, dest)
        except OSError:  # lost a race to another process
            if not _is_current(dest):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def ensure_tiny_assets(root: str | Path | None = None) -> dict[str, Path]:
    """Create (once) the tiny text encoder and VAE under root (default: $ARCOPO_FAST_CACHE/tiny_assets or
    ~/.cache/arcopo_fast/tiny_assets) and return their folders."""
    root = Path(root).expanduser() if root is not None else default_assets_dir()
    return {
        "text_encoder": _ensure(root / f"umt5-tiny-v{VERSION}", build_tiny_text_encoder),
        "vae": _ensure(root / f"wan-vae-tiny-v{VERSION}", build_tiny_vae),
    }
