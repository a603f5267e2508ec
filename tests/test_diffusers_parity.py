"""Cross-check against diffusers: a random diffusers WanTransformer3DModel, saved and loaded through
checkpoint.py, must give CausalWanModel the same flow prediction on one chunk (empty cache = plain
bidirectional attention), in float32.

This pins the whole architecture against an independent implementation: name mapping (incl. the
norm2/norm3 swap), modulation order, RoPE layout (interleaved pairs, 3D split), norms, unpatchify order,
and the timestep embedding."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402

from arcopo_fast.model.checkpoint import load_model  # noqa: E402

HEADS, HEAD_DIM, TEXT_DIM = 2, 32, 32


def _random_diffusers_model(seed: int = 0) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=16,
        out_channels=16,
        text_dim=TEXT_DIM,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        eps=1e-6,
        rope_max_seq_len=1024,
    )
    # Every parameter random (scale-shift tables, norm weights and biases included), nothing 0 or 1.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm_q.weight", "norm_k.weight", "norm2.weight")):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.3 if p.ndim > 1 else 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    ref = _random_diffusers_model()
    path = tmp_path_factory.mktemp("diffusers_wan")
    ref.save_pretrained(path)
    return ref, path


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("hw", [(8, 8), (6, 10)])
def test_one_chunk_matches_diffusers(models, hw):
    ref, path = models
    B, F, Lt = 2, 3, 7
    ours = load_model(path, text_len=Lt)  # diffusers does not pad the context: make text_len = its length
    assert ours.cfg.num_heads == HEADS and ours.cfg.dim == HEADS * HEAD_DIM
    torch.manual_seed(1)
    x = torch.randn(B, 16, F, *hw)
    ctx = torch.randn(B, Lt, TEXT_DIM)
    t = torch.tensor([937.5, 250.0])
    with torch.no_grad():
        want = ref(x, t, ctx).sample  # [B, C, F, H, W]
        got = ours(x.transpose(1, 2), t, ours.encode_text(ctx)).transpose(1, 2)
    assert got.shape == want.shape
    assert _rel(got, want) < 1e-4, _rel(got, want)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_per_frame_timesteps_match_diffusers_per_token(models):
    """Our per-frame t [B, F] equals diffusers' per-token timesteps (Wan2.2 path) repeated over each frame."""
    ref, path = models
    B, F, hw, Lt = 2, 3, (8, 8), 5
    ours = load_model(path, text_len=Lt)
    torch.manual_seed(2)
    x = torch.randn(B, 16, F, *hw)
    ctx = torch.randn(B, Lt, TEXT_DIM)
    t = torch.tensor([[1000.0, 937.5, 833.3], [625.0, 250.0, 0.0]])
    tokens = (hw[0] // 2) * (hw[1] // 2)
    with torch.no_grad():
        want = ref(x, t[:, :, None].expand(B, F, tokens).reshape(B, -1), ctx).sample
        got = ours(x.transpose(1, 2), t, ours.encode_text(ctx)).transpose(1, 2)
    assert _rel(got, want) < 1e-4, _rel(got, want)


def test_zero_padding_of_short_context(models):
    """encode_text zero-pads to text_len (as the Wan pipelines do): same as diffusers fed the padded context."""
    ref, path = models
    B, Lt, L = 2, 12, 5
    ours = load_model(path, text_len=Lt)
    torch.manual_seed(3)
    x = torch.randn(B, 16, 3, 8, 8)
    ctx = torch.randn(B, L, TEXT_DIM)
    t = torch.tensor([500.0, 10.0])
    padded = torch.nn.functional.pad(ctx, (0, 0, 0, Lt - L))
    with torch.no_grad():
        want = ref(x, t, padded).sample
        got = ours(x.transpose(1, 2), t, ours.encode_text(ctx)).transpose(1, 2)
    assert _rel(got, want) < 1e-4, _rel(got, want)
