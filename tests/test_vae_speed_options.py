"""WanVAE decoder speed options (memory_format, compile): the fixed-shape per-frame step must give the plain
(diffusers) path's frames, whole and streamed, and compile to one static graph per video shape.

A random-weight AutoencoderKLWan with the tiny VAE's architecture (tiny_assets._VAE_ARCH) stands in for
the trained tiny VAE: building that takes ~40 s on 2 cores, and random weights exercise every cached tap
(its frames are in range: ~0.5% clamped). torch.compile is tested with a counting backend (dynamo's
fullgraph trace, then the graph runs eagerly) and aot_eager (functionalised); inductor's C++ compile of the
whole decoder step takes about a minute on 2 CPU cores, so the inductor test runs on CUDA, or on CPU with
ARCOPO_TEST_INDUCTOR=1."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("diffusers")

from arcopo_fast.model.vae import WanVAE  # noqa: E402

FORMATS = ["contiguous", "channels_last_3d"]
TOL = dict(rtol=0, atol=1e-5)  # fp32: measured max |difference| 1.8e-6 (contiguous), 2.4e-6 (channels_last_3d)


def _module(seed=0):
    from diffusers import AutoencoderKLWan

    from arcopo_fast.model.tiny_assets import _VAE_ARCH

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKLWan(**_VAE_ARCH)


def _latents(B, F, hw, seed=0):
    return torch.randn(B, F, 16, *hw, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def plain():
    return WanVAE(_module(), memory_format="contiguous")  # diffusers' own decode


@pytest.fixture(scope="module")
def case(plain):
    z = _latents(2, 5, (3, 5))  # odd latent size: 17 frames of 24x40
    return z, plain.decode(z)


def _stream(vae, z, chunks):
    dec, parts, f0 = vae.stream(), [], 0
    for f in chunks:
        parts.append(dec.decode_chunk(z[:, f0 : f0 + f]))
        f0 += f
    return dec, torch.cat(parts, dim=1)


def test_auto_is_channels_last_on_cpu_and_decodes_the_same(case):
    z, want = case
    from arcopo_fast.model.vae import resolve_memory_format

    assert resolve_memory_format("auto", "cpu") == "channels_last_3d"
    assert resolve_memory_format("auto", torch.device("cuda", 0)) == "contiguous"  # not measured there yet
    assert resolve_memory_format("contiguous", "cpu") == "contiguous"
    vae = WanVAE(_module())
    assert vae.memory_format == "channels_last_3d" and vae._step is not None
    torch.testing.assert_close(vae.decode(z), want, **TOL)
    torch.testing.assert_close(_stream(vae, z, (2, 3))[1], want, **TOL)
    plain = WanVAE(_module(), memory_format="contiguous")
    assert plain.memory_format == "contiguous" and plain._step is None


def test_auto_falls_back_to_diffusers_decode_where_the_step_cannot_run(monkeypatch, case):
    """A VAE the fixed-shape step refuses (Wan2.2's patchified residual decoder, here faked by the check's
    own error): "auto" decodes with diffusers' path; an explicit layout or compile still raises."""
    from arcopo_fast.model import vae as vae_mod

    def refuse(self, vae, memory_format):
        raise ValueError("memory_format/compile: the fast decoder supports Wan2.1 VAEs only")

    monkeypatch.setattr(vae_mod._DecoderStep, "__init__", refuse)
    z, want = case
    vae = WanVAE(_module())
    assert vae.memory_format == "contiguous" and vae._step is None
    assert all(p.is_contiguous() for p in vae.vae.decoder.parameters())
    torch.testing.assert_close(vae.decode(z), want, rtol=0, atol=0)
    for kw in (dict(memory_format="channels_last_3d"), dict(compile=True, compile_backend="eager")):
        with pytest.raises(ValueError, match="Wan2.1 VAEs only"):
            WanVAE(_module(), **kw)


def test_bad_options_name_the_argument():
    m = _module()
    with pytest.raises(ValueError, match="memory_format must be one of .*channels_last_3d"):
        WanVAE(m, memory_format="channels_last")
    for bad in ("reduce-overhead", "max-autotune", 1, None):
        with pytest.raises(ValueError, match="compile must be one of"):
            WanVAE(m, compile=bad)
    with pytest.raises(ValueError, match="compile_backend"):
        WanVAE(m, compile=True, compile_backend=3)


@pytest.mark.parametrize("fmt", FORMATS)
def test_step_matches_plain_whole_and_streamed(case, fmt):
    z, want = case
    vae = WanVAE(_module(), memory_format=fmt)
    vae._use_step(fmt, False)  # contiguous too: the eager step itself, not diffusers' loop
    torch.testing.assert_close(vae.decode(z), want, **TOL)
    torch.testing.assert_close(vae.decode(z, batch_size=1), want, **TOL)
    for chunks in [(3, 2), (1, 1, 3)]:
        dec, got = _stream(vae, z, chunks)
        torch.testing.assert_close(got, want, **TOL)
    assert dec.frames_done == 5 and len(dec._caches) == 24  # one 2-frame cache per causal conv
    layout = torch.channels_last_3d if fmt == "channels_last_3d" else torch.contiguous_format
    assert all(c.shape[2] == 2 and c.is_contiguous(memory_format=layout) for c in dec._caches)
    dec.reset()  # a second video on the same decoder
    torch.testing.assert_close(dec.decode_chunk(z[:, :2]), want[:, :5], **TOL)
    with pytest.raises(ValueError, match="batch changed"):
        dec.decode_chunk(z[:1, 2:4])
    # the in-place NDHWC weights leave diffusers' own decoder correct
    x = vae.denormalize(z).transpose(1, 2)
    torch.testing.assert_close(((vae.vae.decode(x).sample + 1) / 2).transpose(1, 2), want, **TOL)


def test_channels_last_3d_holds_for_every_conv(case, monkeypatch):
    """Every conv of the NDHWC step reads NDHWC input and weight and writes NDHWC (no hidden transposes)."""
    z, _ = case
    vae = WanVAE(_module(), memory_format="channels_last_3d")
    seen, conv3d = [], torch.nn.functional.conv3d

    def spy(x, w, *args, **kw):
        out = conv3d(x, w, *args, **kw)
        if w is not vae.vae.post_quant_conv.weight:  # 1x1x1 at latent size, before the step
            seen.append(all(t.is_contiguous(memory_format=torch.channels_last_3d) for t in (x, w, out)))
        return out

    monkeypatch.setattr(torch.nn.functional, "conv3d", spy)
    vae.decode(z[:, :2])
    assert len(seen) > 50 and all(seen)


def test_bf16_step_error_matches_plain_bf16():
    """bf16: both paths' error vs the fp32 decode is rounding-sized and the step's is at most 2x plain's."""
    z = _latents(1, 3, (2, 3), seed=3)
    ref = WanVAE(_module(), memory_format="contiguous").decode(z)
    plain = (WanVAE(_module(), dtype=torch.bfloat16, memory_format="contiguous").decode(z) - ref).abs()
    step = (WanVAE(_module(), dtype=torch.bfloat16, memory_format="channels_last_3d").decode(z) - ref).abs()
    assert plain.max() < 0.1 and step.mean() <= 2 * plain.mean() + 1e-4, (plain.max(), plain.mean(), step.mean())


class _Counting:
    """A torch.compile backend that counts the graphs dynamo hands it and runs them eagerly."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.mark.parametrize("fmt", FORMATS)
def test_compiled_step_one_static_graph(case, fmt):
    torch._dynamo.reset()
    z, want = case
    backend = _Counting()
    vae = WanVAE(_module(), memory_format=fmt, compile=True, compile_backend=backend)
    torch.testing.assert_close(vae.decode(z), want, **TOL)
    for chunks in [(3, 2), (1, 4)]:  # chunk lengths do not matter: one graph per frame shape
        torch.testing.assert_close(_stream(vae, z, chunks)[1], want, **TOL)
    assert backend.graphs == 1
    vae.decode(z[:1])  # another batch size: one more static graph (dynamic=False)
    assert backend.graphs == 2


def test_aot_eager_compiled_step(case):
    """AOTAutograd's functionalised graph (what inductor lowers) gives the same frames."""
    torch._dynamo.reset()
    z, want = case
    vae = WanVAE(_module(), memory_format="channels_last_3d", compile=True, compile_backend="aot_eager")
    torch.testing.assert_close(_stream(vae, z[:, :3], (1, 2))[1], want[:, :9], **TOL)


@pytest.mark.slow
@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("ARCOPO_TEST_INDUCTOR")),
                    reason="inductor's C++ compile of the decoder step takes ~1 min on CPU: set ARCOPO_TEST_INDUCTOR=1")
def test_inductor_compiled_step(monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 convs, not TF32, for the fp32 check
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    z = _latents(1, 3, (2, 2), seed=4).to(dev)
    want = WanVAE(_module(), device=dev, memory_format="contiguous").decode(z)
    for fmt in FORMATS if dev.type == "cuda" else ["channels_last_3d"]:
        vae = WanVAE(_module(), device=dev, memory_format=fmt, compile=True)
        torch.testing.assert_close(_stream(vae, z, (1, 2))[1], want, **TOL)
        torch.testing.assert_close(vae.decode(z), want, **TOL)
    if dev.type == "cuda":  # bf16: compiled NDHWC step's error vs fp32 at most 2x diffusers' bf16 error
        plain = (WanVAE(_module(), device=dev, dtype=torch.bfloat16, memory_format="contiguous").decode(z) - want).abs()
        vae = WanVAE(_module(), device=dev, dtype=torch.bfloat16, memory_format="channels_last_3d", compile=True)
        step = (vae.decode(z) - want).abs()
        assert plain.max() < 0.1 and step.mean() <= 2 * plain.mean() + 1e-4, (plain.max(), plain.mean(), step.mean())
