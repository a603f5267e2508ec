"""The causal Wan model: streaming with a KV cache equals teacher forcing; shapes, presets, errors."""

from __future__ import annotations

import pytest
import torch
from model_helpers import make_tiny_model

from arcopo_fast.model.config import get_preset
from arcopo_fast.model.kv_cache import KVCache
from arcopo_fast.model.wan import CausalWanModel

HW = (6, 10)  # odd latent grid: 3 x 5 = 15 tokens per frame


def _streamed(model, x, t, cross, *, local_attn_frames=None, sink_frames=0, rows=None):
    cfg = model.cfg
    B, F = x.shape[:2]
    n = F // cfg.chunk_frames
    cache = KVCache.for_model(
        cfg,
        rows=rows or B,
        num_chunks=n,
        frame_tokens=model.frame_tokens(*x.shape[-2:]),
        dtype=model.dtype,
        local_attn_frames=local_attn_frames,
        sink_frames=sink_frames,
    )
    outs = []
    for c in range(n):
        sl = slice(c * cfg.chunk_frames, (c + 1) * cfg.chunk_frames)
        outs.append(model(x[:, sl], t[:, sl], cross, cache, commit=c < n - 1))
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("num_chunks,batch", [(1, 1), (2, 2), (4, 1), (3, 3)])
def test_cached_streaming_equals_full_sequence(num_chunks, batch):
    model = make_tiny_model()
    F = num_chunks * model.cfg.chunk_frames
    x = torch.randn(batch, F, 16, *HW)
    t = torch.rand(batch, F) * 1000  # per-frame timesteps
    cross = model.encode_text(torch.randn(batch, 7, model.cfg.text_dim))
    with torch.no_grad():
        full = model.forward_full(x, t, cross)
        streamed, cache = _streamed(model, x, t, cross)
    torch.testing.assert_close(streamed, full, rtol=1e-5, atol=1e-5)
    assert cache.total_tokens == (num_chunks - 1) * model.cfg.chunk_frames * model.frame_tokens(*HW)


@pytest.mark.parametrize("local_attn_frames,sink_frames,num_chunks", [(6, 0, 4), (6, 1, 4), (9, 1, 5), (7, 2, 4)])
def test_rolling_window_equals_windowed_full_sequence(local_attn_frames, sink_frames, num_chunks):
    model = make_tiny_model(1)
    F = num_chunks * model.cfg.chunk_frames
    x = torch.randn(2, F, 16, *HW)
    t = torch.rand(2, F) * 1000
    cross = model.encode_text(torch.randn(2, 5, model.cfg.text_dim))
    kw = dict(local_attn_frames=local_attn_frames, sink_frames=sink_frames)
    with torch.no_grad():
        full = model.forward_full(x, t, cross, **kw)
        streamed, cache = _streamed(model, x, t, cross, **kw)
        plain = model.forward_full(x, t, cross)
    torch.testing.assert_close(streamed, full, rtol=1e-5, atol=1e-5)
    # the window must actually bite on the last chunk (otherwise this test proves nothing)
    assert not torch.allclose(full[:, -3:], plain[:, -3:], atol=1e-4)
    assert cache.capacity == (local_attn_frames - model.cfg.chunk_frames) * model.frame_tokens(*HW)


def test_cache_row_view_and_bf16_cache():
    """A batch can read/write arbitrary cache rows; a bf16 cache stays close to the fp32 result."""
    model = make_tiny_model(2)
    x = torch.randn(2, 6, 16, *HW)
    t = torch.rand(2, 6) * 1000
    cross = model.encode_text(torch.randn(2, 5, model.cfg.text_dim))
    with torch.no_grad():
        ref, _ = _streamed(model, x, t, cross)
        cache = KVCache.for_model(model.cfg, rows=4, num_chunks=2, frame_tokens=model.frame_tokens(*HW))
        view = cache.view(torch.tensor([3, 1]))
        model(x[:, :3], t[:, :3], cross, view, commit=True)
        out = model(x[:, 3:], t[:, 3:], cross, view)
    torch.testing.assert_close(out.float(), ref[:, 3:], rtol=0.05, atol=0.05)


def test_preset_parameter_count_on_meta():
    with torch.device("meta"):
        model = CausalWanModel(get_preset("wan-1.3b"))
    n = sum(p.numel() for p in model.parameters())
    assert n == 1_418_996_800  # "about 1.42 B" (Wan2.1-T2V-1.3B)
    tiny = sum(p.numel() for p in make_tiny_model().parameters())
    assert tiny * 4 < 2_000_000  # "a few MB"


def test_bad_inputs_raise_clear_errors(tiny_model):
    m = tiny_model
    cross = m.encode_text(torch.randn(1, 4, m.cfg.text_dim))
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(1, 3, 8, 4, 4), 0.0, cross)
    with pytest.raises(ValueError, match="multiples of the patch"):
        m(torch.randn(1, 3, 16, 5, 4), 0.0, cross)
    with pytest.raises(ValueError, match="t must be"):
        m(torch.randn(1, 3, 16, 4, 4), torch.zeros(2, 3), cross)
    with pytest.raises(ValueError, match="context must be"):
        m.encode_text(torch.randn(1, 4, 7))
    with pytest.raises(ValueError, match="text_len"):
        m.encode_text(torch.randn(1, m.cfg.text_len + 1, m.cfg.text_dim))
    cache = KVCache.for_model(m.cfg, rows=1, num_chunks=2, frame_tokens=4)
    with torch.no_grad():
        m(torch.randn(1, 3, 16, 4, 4), 0.0, cross, cache, commit=True)
        with pytest.raises(ValueError, match="KV cache full"):
            m(torch.randn(1, 3, 16, 4, 4), 0.0, cross, cache, commit=True)
    with pytest.raises(ValueError, match="RoPE"):
        m(torch.randn(1, 3, 16, 4, 4), 0.0, cross, start_frame=m.cfg.rope_max_positions - 1)
