"""Tiny random stand-ins for umT5 and the Wan VAE, written to disk in their real formats.

They let tests and the default tiny training run exercise the real loading code (transformers
UMT5EncoderModel + AutoTokenizer, diffusers AutoencoderKLWan, all from local folders) with no download:

  ensure_tiny_assets(root) -> {"text_encoder": <folder>, "vae": <folder>}

Deterministic (fixed seeds, no training), idempotent (a marker file with a version; rebuilt when the
version changes), safe under concurrent callers (built in a temporary folder, then renamed), and fast
(about a second). The tokenizer is a SentencePiece-style Unigram (Metaspace) built from an explicit
vocabulary: whole words for a small prompt vocabulary, single characters for everything else.
"""

from __future__ import annotations

import json
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
]

VERSION = 1
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


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]  # T5 ids: pad 0, eos 1, unk 2
    vocab = [(s, 0.0) for s in specials]
    vocab += [("\u2581" + w, -5.0) for w in dict.fromkeys(_WORDS)]
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


def build_tiny_text_encoder(out: str | Path, *, d_model: int = TINY_TEXT_DIM, seed: int = 0) -> Path:
    """A 2-layer random UMT5EncoderModel (d_model 32) and its tokenizer, saved with save_pretrained."""
    from transformers import UMT5Config, UMT5EncoderModel

    out = Path(out)
    tokenizer, vocab_size = _tokenizer()
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


def build_tiny_vae(out: str | Path, *, seed: int = 0) -> Path:
    """A random AutoencoderKLWan with Wan2.1's structure (z_dim 16, 8x spatial / 4x temporal compression,
    Wan's latents_mean/std) at base_dim 8 and one residual block per level. Decoding 9 latent frames of
    8x8 (33 frames of 64x64) takes about 0.3 s on 2 CPU cores."""
    from diffusers import AutoencoderKLWan

    out = Path(out)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(
            base_dim=8,
            z_dim=16,
            dim_mult=[1, 2, 4, 4],
            num_res_blocks=1,
            attn_scales=[],
            temperal_downsample=[False, True, True],
        ).eval()
    vae.save_pretrained(out)
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
