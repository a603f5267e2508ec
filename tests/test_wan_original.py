"""Wan's original umT5 / VAE files (Self-Forcing's wan_models/Wan2.1-T2V-1.3B/) read into transformers'
UMT5EncoderModel and diffusers' AutoencoderKLWan, and StreamingPipeline.from_self_forcing on tiny files.

Checks that do not trust the mapping itself: the umT5 encoder loaded from Wan names equals a float64 model
of Wan's T5 encoder written here from its definition (so a swap of two same-shaped tensors, which a round
trip would not see, fails); the VAE names agree with diffusers' own Wan-VAE converter on the full 1.3B key
set; and a few names of the released files are checked literally."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from arcopo_fast.model.checkpoint import CheckpointError  # noqa: E402
from arcopo_fast.model.wan_original import (  # noqa: E402
    UMT5_FILE,
    VAE_FILE,
    load_umt5_encoder,
    load_wan_vae,
    umt5_to_original,
    vae_config_from_original,
    vae_original_name,
    vae_to_original,
)


def _tiny_umt5(seed=0, layers=2):
    from pipeline_helpers import randomize
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=24, num_layers=layers, num_heads=4,
                     relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                     dropout_rate=0.0)
    return randomize(UMT5EncoderModel(cfg), seed, scale=0.5)


def wan_t5_encoder_ref(sd, ids, mask, *, num_buckets, max_dist=128, eps=1e-6):
    """Wan's T5Encoder (umT5: a relative position table per block) in float64, from its definition:
    x = emb(ids); per block: x += o(attn(norm1 x)) with scores q.k (no scaling) + bias[bucket(j - i)] and the
    padding keys masked; x += fc2(gelu_tanh(gate x) * fc1 x) on norm2 x; out = norm(x). RMS norms without
    mean subtraction."""
    sd = {k: v.double() for k, v in sd.items()}
    rms = lambda x, w: w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # noqa: E731
    gelu = lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))  # noqa: E731
    x = sd["token_embedding.weight"][ids]
    B, L, _ = x.shape
    rel = torch.arange(L)[None, :] - torch.arange(L)[:, None]  # key - query
    half = num_buckets // 2
    bucket = (rel > 0).long() * half
    dist = rel.abs()
    exact = half // 2
    far = exact + (torch.log(dist.clamp(min=1).double() / exact) / math.log(max_dist / exact) * (half - exact)).long()
    bucket = bucket + torch.where(dist < exact, dist, far.clamp(max=half - 1))
    n = 0
    while f"blocks.{n}.norm1.weight" in sd:
        p = f"blocks.{n}."
        heads = sd[p + "pos_embedding.embedding.weight"].shape[1]
        h = rms(x, sd[p + "norm1.weight"])
        q, k, v = (torch.einsum("bld,ed->ble", h, sd[p + f"attn.{c}.weight"]).unflatten(-1, (heads, -1)) for c in "qkv")
        s = torch.einsum("bihc,bjhc->bhij", q, k) + sd[p + "pos_embedding.embedding.weight"][bucket].permute(2, 0, 1)
        s = s.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
        a = torch.einsum("bhij,bjhc->bihc", s.softmax(-1), v).flatten(2)
        x = x + a @ sd[p + "attn.o.weight"].T
        h = rms(x, sd[p + "norm2.weight"])
        x = x + (gelu(h @ sd[p + "ffn.gate.0.weight"].T) * (h @ sd[p + "ffn.fc1.weight"].T)) @ sd[p + "ffn.fc2.weight"].T
        n += 1
    return rms(x, sd["norm.weight"])


def test_umt5_from_wan_names_equals_wans_encoder(tmp_path):
    sd = umt5_to_original(_tiny_umt5().state_dict())
    path = tmp_path / UMT5_FILE
    torch.save({k: v.to(torch.bfloat16) for k, v in sd.items()}, path)  # Wan's file is bfloat16
    model = load_umt5_encoder(path, dtype=torch.float32)
    assert model.shared.weight is model.encoder.embed_tokens.weight
    ids = torch.tensor([[5, 9, 3, 17, 1, 0, 0], [22, 1, 0, 0, 0, 0, 0]])
    mask = (torch.arange(7)[None] < torch.tensor([[5], [2]])).long()
    want = wan_t5_encoder_ref({k: v.to(torch.bfloat16) for k, v in sd.items()}, ids, mask, num_buckets=8)
    got = model(input_ids=ids, attention_mask=mask).last_hidden_state.double()
    valid = mask.bool()  # Wan keeps (and the DiT sees) only the valid rows
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-4, atol=1e-4)


def test_umt5_wan_key_layout_and_strict_errors():
    sd = umt5_to_original(_tiny_umt5(layers=1).state_dict())
    # the released file's names (Wan's T5Encoder with shared_pos=False), literally
    assert set(sd) == {
        "token_embedding.weight", "norm.weight", "blocks.0.norm1.weight", "blocks.0.norm2.weight",
        "blocks.0.attn.q.weight", "blocks.0.attn.k.weight", "blocks.0.attn.v.weight", "blocks.0.attn.o.weight",
        "blocks.0.ffn.gate.0.weight", "blocks.0.ffn.fc1.weight", "blocks.0.ffn.fc2.weight",
        "blocks.0.pos_embedding.embedding.weight",
    }
    bad = dict(sd)
    bad.pop("blocks.0.ffn.fc2.weight")
    bad["blocks.0.ffn.fc3.weight"] = torch.zeros(1)
    bad["blocks.0.attn.o.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError) as err:
        load_umt5_encoder(bad)
    msg = str(err.value)
    assert "missing keys (1): ['blocks.0.ffn.fc2.weight']" in msg and "unexpected keys (1): ['blocks.0.ffn.fc3.weight']" in msg
    assert "blocks.0.attn.o.weight: checkpoint (3, 3)" in msg


def test_vae_names_agree_with_diffusers_converter_on_the_13b_layout():
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    with torch.device("meta"):
        vae = AutoencoderKLWan()  # diffusers' defaults are Wan2.1's VAE
    ours = {k: vae_original_name(k, 2) for k in vae.state_dict()}
    theirs = convert_wan_vae_to_diffusers({orig: orig for orig in ours.values()})  # diffusers name -> value
    assert theirs == ours
    for name in ("decoder.upsamples.4.shortcut.weight", "decoder.upsamples.3.time_conv.weight",
                 "decoder.upsamples.11.resample.1.weight", "encoder.downsamples.5.time_conv.bias",
                 "decoder.middle.1.to_qkv.weight", "decoder.head.2.weight", "encoder.head.0.gamma", "conv2.bias"):
        assert name in ours.values(), name
    meta_sd = {orig: torch.empty(vae.state_dict()[k].shape, device="meta") for k, orig in ours.items()}
    cfg = vae_config_from_original(meta_sd)
    assert cfg == dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                       temperal_downsample=[False, True, True])


def test_vae_from_wan_names_decodes_and_encodes_the_same(tmp_path):
    from diffusers import AutoencoderKLWan
    from pipeline_helpers import randomize

    ref = randomize(AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 3], num_res_blocks=1,
                                     temperal_downsample=[True, False, True],
                                     latents_mean=[0.0] * 4, latents_std=[1.0] * 4), 0, scale=0.1)
    torch.save(vae_to_original(ref.state_dict(), 1), tmp_path / VAE_FILE)
    vae = load_wan_vae(tmp_path / VAE_FILE, latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    assert {k: vae.config[k] for k in ("base_dim", "dim_mult", "num_res_blocks", "temperal_downsample")} == dict(
        base_dim=8, dim_mult=[1, 2, 2, 3], num_res_blocks=1, temperal_downsample=[True, False, True])
    torch.manual_seed(0)
    z, x = torch.randn(1, 4, 3, 4, 4), torch.rand(1, 3, 5, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(vae.decode(z).sample, ref.decode(z).sample)
        assert torch.equal(vae.encode(x).latent_dist.mean, ref.encode(x).latent_dist.mean)
    sd = vae_to_original(ref.state_dict(), 1)
    sd["decoder.upsamples.3.extra.weight"] = sd.pop("decoder.upsamples.3.residual.6.weight")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): \['decoder.upsamples.3.residual.6.weight'\].*"
                                              r"unexpected keys \(1\): \['decoder.upsamples.3.extra.weight'\]"):
        load_wan_vae(sd)


def test_from_self_forcing_equals_from_diffusers(wan_pipe, tmp_path):
    from pipeline_helpers import write_self_forcing_layout

    from arcopo_fast import StreamingPipeline

    ckpt, wan_dir = write_self_forcing_layout(tmp_path, wan_pipe)
    sf = StreamingPipeline.from_self_forcing(ckpt, wan_dir, device="cpu")
    release = StreamingPipeline.from_pretrained(wan_dir, checkpoint=ckpt, device="cpu")  # Wan's folder, detected
    ref = StreamingPipeline.from_diffusers(wan_pipe)
    for p in (sf, release, ref):
        p.set_progress_bar_config(disable=True)
    kw = dict(height=32, width=32, num_frames=9, seed=1)
    want = ref("a red balloon", **kw).frames
    torch.testing.assert_close(sf("a red balloon", **kw).frames, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(release("a red balloon", **kw).frames, want, rtol=0, atol=1e-5)
    assert not torch.allclose(StreamingPipeline.from_self_forcing(ckpt, wan_dir, ema=False).model.head.head.weight,
                              sf.model.head.head.weight)  # ema=False reads "generator"
    (wan_dir / VAE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks Wan's original files: VAE \(.*Wan2.1_VAE.pth\)"):
        StreamingPipeline.from_self_forcing(ckpt, wan_dir)
