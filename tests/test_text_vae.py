"""Text encoder and VAE wrappers on the tiny random assets (real transformers/diffusers classes, local files)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from arcopo_fast.model.text_encoder import TextEncoder, clean_prompt  # noqa: E402
from arcopo_fast.model.tiny_assets import MARKER, TINY_TEXT_DIM, ensure_tiny_assets  # noqa: E402
from arcopo_fast.model.vae import WanVAE  # noqa: E402

PROMPTS = ["A cat walking on the beach at sunset", "  a   dog\n running ", "zebra & 42 quokkas!"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return ensure_tiny_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="module")
def vae(assets):
    return WanVAE(assets["vae"])


# -- tiny assets -------------------------------------------------------------------------------------------


def test_tiny_assets_idempotent_and_deterministic(assets, tmp_path):
    root = assets["vae"].parent
    stamp = {k: (p / MARKER).stat().st_mtime_ns for k, p in assets.items()}
    again = ensure_tiny_assets(root)
    assert again == assets
    assert {k: (p / MARKER).stat().st_mtime_ns for k, p in again.items()} == stamp  # not rebuilt
    other = ensure_tiny_assets(tmp_path)  # built afresh elsewhere: identical weights
    from safetensors.torch import load_file

    for name, fname in (
        ("text_encoder", "model.safetensors"),
        ("vae", "diffusion_pytorch_model.safetensors"),
    ):
        a, b = load_file(str(assets[name] / fname)), load_file(str(other[name] / fname))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


# -- text encoder ------------------------------------------------------------------------------------------


def test_encode_zeroes_padding_and_matches_direct_run(assets):
    from transformers import AutoTokenizer, UMT5EncoderModel

    te = TextEncoder(assets["text_encoder"], text_len=24)  # longer than every prompt (the third: 21 tokens)
    emb = te.encode(PROMPTS)
    assert emb.shape == (3, 24, TINY_TEXT_DIM) and emb.dtype == torch.float32
    tok = AutoTokenizer.from_pretrained(str(assets["text_encoder"]), local_files_only=True)
    model = UMT5EncoderModel.from_pretrained(str(assets["text_encoder"]), local_files_only=True).eval()
    for i, p in enumerate(PROMPTS):
        ids = tok(clean_prompt(p), return_tensors="pt").input_ids  # unpadded: the prompt alone
        n = ids.shape[1]
        assert ids[0, -1].item() == tok.eos_token_id
        with torch.no_grad():
            want = model(input_ids=ids).last_hidden_state[0]
        torch.testing.assert_close(emb[i, :n], want, rtol=1e-5, atol=1e-5)
        assert emb[i, n:].abs().sum() == 0  # padding rows are exactly zero
        assert emb[i, :n].abs().sum(-1).min() > 0


def test_truncation_to_text_len(assets):
    te = TextEncoder(assets["text_encoder"], text_len=8)
    emb = te.encode(["the cat and the dog and the bird and the horse in the forest"])
    assert emb.shape == (1, 8, TINY_TEXT_DIM) and emb.abs().sum(-1).min() > 0  # every row is a real token


def test_prompt_cache_skips_the_encoder(assets, tmp_path):
    te = TextEncoder(assets["text_encoder"], text_len=16, cache_dir=tmp_path)
    first = te.encode(PROMPTS)
    assert te.encoder_runs == 1
    again = te.encode(list(reversed(PROMPTS)))
    assert te.encoder_runs == 1  # all cached
    torch.testing.assert_close(again, first.flip(0), rtol=0, atol=0)
    fresh = TextEncoder(assets["text_encoder"], text_len=16, cache_dir=tmp_path)
    torch.testing.assert_close(fresh.encode(PROMPTS[1]), first[1:2], rtol=0, atol=0)
    assert fresh.encoder_runs == 0 and fresh._model is None  # never even loaded
    # Cleaning makes whitespace variants one prompt; a new prompt runs the encoder for it alone.
    fresh.encode(["a dog running", "a bird flying"])
    assert fresh.encoder_runs == 1
    # Another text_len (or dtype, or encoder) is another identity: no stale hits.
    other = TextEncoder(assets["text_encoder"], text_len=12, cache_dir=tmp_path)
    assert other.identity != te.identity
    assert other.encode(PROMPTS).shape == (3, 12, TINY_TEXT_DIM) and other.encoder_runs == 1
    bf = TextEncoder(
        assets["text_encoder"], text_len=16, cache_dir=tmp_path, dtype=torch.bfloat16, out_dtype=torch.float32
    )
    assert bf.identity != te.identity


def test_text_encoder_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        TextEncoder(tmp_path / "nowhere")
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        TextEncoder(tmp_path / "enc")


# -- VAE ---------------------------------------------------------------------------------------------------


def _latents(B=2, F=9, hw=(4, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, F, 16, *hw, generator=g)


def test_decode_shapes_and_range(vae):
    video = vae.decode(_latents(1, 4, (4, 6)))
    assert video.shape == (1, 13, 3, 32, 48) and video.dtype == torch.float32
    assert video.min() >= 0 and video.max() <= 1 and video.std() > 0.01


@pytest.fixture(scope="module")
def whole(vae):
    z = _latents()  # 3 chunks of 3 latent frames, 4x6 -> 33 frames of 32x48
    return z, vae.decode(z)


@pytest.mark.parametrize("chunks", [(3, 3, 3), (1, 2, 3, 3), (9,)])
def test_streaming_decode_equals_whole(vae, whole, chunks):
    z, whole = whole
    dec = vae.stream()
    parts, f0 = [], 0
    for f in chunks:
        out = dec.decode_chunk(z[:, f0 : f0 + f])
        assert out.shape[1] == (1 + 4 * (f - 1) if f0 == 0 else 4 * f)
        parts.append(out)
        f0 += f
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=1e-5, atol=1e-5)
    dec.reset()  # a second video on the same decoder
    torch.testing.assert_close(dec.decode_chunk(z[:, :3]), whole[:, :9], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="batch changed"):
        dec.decode_chunk(z[:1, 3:6])


def test_batched_decode_equals_per_video(vae):
    z = _latents(3, 3, seed=1)
    batched = vae.decode(z)
    for i in range(3):
        torch.testing.assert_close(batched[i : i + 1], vae.decode(z[i : i + 1]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vae.decode(z, batch_size=2), batched, rtol=1e-5, atol=1e-5)


def test_encode_and_normalisation(vae):
    z = _latents(2, 3, (4, 4), seed=2)
    torch.testing.assert_close(vae.normalize(vae.denormalize(z)), z, rtol=1e-5, atol=1e-5)
    cfg = vae.vae.config
    assert torch.allclose(
        vae.denormalize(torch.zeros(1, 1, 16, 1, 1)).flatten(), torch.tensor(cfg.latents_mean)
    )
    video = vae.decode(z)
    lat = vae.encode(video)
    assert lat.shape == z.shape
    mu = vae.vae.encode((video * 2 - 1).transpose(1, 2)).latent_dist.mean.transpose(1, 2)
    mean = torch.tensor(cfg.latents_mean).view(1, 1, -1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, 1, -1, 1, 1)
    torch.testing.assert_close(lat, (mu - mean) / std, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="4k\\+1"):
        vae.encode(video[:, :4])
    with pytest.raises(ValueError, match="latents must be"):
        vae.decode(z[:, :, :8])


# -- the tiny VAE is a real autoencoder whose colours follow the latents ----------------------------------

_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 1, 3, 1, 1)


def _brightness(video):
    return (video * _LUMA).sum(2).mean()


def _psnr(mse):
    return float(-10 * torch.log10(mse))


def test_tiny_vae_reconstructs_synthetic_clips(vae):
    from arcopo_fast.model.tiny_assets import synthetic_videos

    x = synthetic_videos(6, 17, 64, generator=torch.Generator().manual_seed(99))  # held out
    assert x.shape == (6, 17, 3, 64, 64) and x.min() >= 0 and x.max() <= 1
    z = vae.encode(x)
    # latents_mean/std normalise the colour channels (Y, Cb, Cr) to about N(0, 1)
    std, mean = z.std(dim=(0, 1, 3, 4)), z.mean(dim=(0, 1, 3, 4))
    assert (std[:3] > 0.5).all() and (std[:3] < 2.0).all() and (std < 2.0).all(), std
    assert (mean.abs() < 1.0).all(), mean
    psnr = _psnr((vae.decode(z) - x).pow(2).mean())
    flat = _psnr((x - x.mean(dim=(1, 3, 4), keepdim=True)).pow(2).mean())  # each clip's mean colour
    assert psnr > 26 and psnr > flat + 8, (psnr, flat)


def test_tiny_vae_colour_follows_latents(vae):
    """Uniform shifts of N(0, 1) latents along encoded directions move brightness and each RGB mean."""
    from arcopo_fast.model.tiny_assets import synthetic_videos

    g = torch.Generator().manual_seed(5)
    x = synthetic_videos(4, 9, 32, generator=g)

    def direction(delta):  # encoded difference of a brighter/more-coloured and a darker/less-coloured x
        d = (vae.encode((x + delta).clamp(0, 1)) - vae.encode((x - delta).clamp(0, 1))).mean(dim=(0, 1, 3, 4))
        return (d / d.norm()).view(1, 1, -1, 1, 1)

    z = torch.randn(2, 9, 16, 8, 8, generator=g)  # 3 chunks of 3 latent frames: 33 frames of 64x64
    video = vae.decode(z)
    assert 0.3 < _brightness(video) < 0.7 and 0.05 < video.std() < 0.35
    assert ((video <= 0) | (video >= 1)).float().mean() < 0.1  # sane, not clamped
    d = direction(0.15)
    b = [float(_brightness(vae.decode(z + s * d))) for s in (-1.0, 1.0)]
    assert b[0] < float(_brightness(video)) - 0.15 and b[1] > float(_brightness(video)) + 0.15, b
    for c in range(3):
        delta = torch.zeros(1, 1, 3, 1, 1)
        delta[0, 0, c] = 0.15
        d = direction(delta)
        lo, hi = (vae.decode(z + s * d)[:, :, c].mean() for s in (-1.0, 1.0))
        assert hi - lo > 0.2, (c, float(lo), float(hi))
    # Latents constant in time decode to a steady video: flicker follows the latents, not a texture.
    steady = vae.decode(z[:, :1].expand_as(z))
    flicker = (steady[:, 1:] - steady[:, :-1]).abs().mean()
    assert flicker < 0.25 * (video[:, 1:] - video[:, :-1]).abs().mean()


def test_tiny_vae_bad_arguments(tmp_path):
    from arcopo_fast.model.tiny_assets import build_tiny_vae, synthetic_videos

    with pytest.raises(ValueError, match="train_steps"):
        build_tiny_vae(tmp_path, train_steps=-1)
    with pytest.raises(ValueError, match="frames"):
        synthetic_videos(2, 0, 32)
