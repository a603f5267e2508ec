"""StreamingPipeline on a tiny random diffusers WanPipeline (real diffusers / transformers classes): every
constructor, frames equal to the lower-level API's, stream() == __call__, output types, argument errors,
LoRA load / unload, the progress bar."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from arcopo_fast import StreamingPipeline, StreamingPipelineOutput, adapters  # noqa: E402

H, W, N = 32, 48, 21  # pixels; 21 frames = 2 chunks of 3 latent frames
PROMPTS = ["a red balloon over a lake", "a cat on a sunny windowsill"]


@pytest.fixture(scope="module")
def pipe(wan_pipe):
    p = StreamingPipeline.from_diffusers(wan_pipe)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def frames(pipe):
    return pipe(PROMPTS, height=H, width=W, num_frames=N, seed=3).frames


def test_from_diffusers_reuses_components_and_matches_the_lower_level_api(wan_pipe, pipe, frames):
    assert pipe.text_encoder._model is wan_pipe.text_encoder and pipe.vae.vae is wan_pipe.vae  # no copies
    assert frames.shape == (2, N, 3, H, W) and frames.dtype == torch.float32
    assert 0.02 < frames.std() and 0.01 < frames.mean() < 0.99  # a real picture, not a clamped constant
    # the same video, assembled by hand from the pieces the pipeline wraps (latent units)
    cross = pipe.model.encode_text(pipe.text_encoder.encode(PROMPTS))
    lat = pipe.sampler.generate(cross, num_chunks=2, latent_hw=(H // 8, W // 8), samples=[3, 4])
    torch.testing.assert_close(frames, pipe.vae.decode(lat), rtol=0, atol=1e-5)


def test_converted_transformer_matches_diffusers_on_one_chunk(wan_pipe, pipe):
    torch.manual_seed(0)
    x, ctx, t = torch.randn(1, 16, 3, 4, 6), torch.randn(1, pipe.model.cfg.text_len, 32), torch.tensor([937.5])
    with torch.no_grad():
        want = wan_pipe.transformer(x, t, ctx).sample
        got = pipe.model(x.transpose(1, 2), t, pipe.model.encode_text(ctx)).transpose(1, 2)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_stream_chunks_concatenate_to_the_call(pipe, frames):
    chunks = list(pipe.stream(PROMPTS, height=H, width=W, num_frames=N, seed=3))
    assert [c.shape[1] for c in chunks] == [9, 12]
    assert torch.equal(torch.cat(chunks, dim=1), frames)


def test_a_seed_gives_the_same_video_alone_or_in_a_batch(pipe, frames):
    alone = pipe(PROMPTS[1], height=H, width=W, num_frames=N, seed=4).frames
    torch.testing.assert_close(alone[0], frames[1], rtol=0, atol=1e-4)  # batched matmuls round differently
    other = pipe(PROMPTS[1], height=H, width=W, num_frames=N, seeds=[5]).frames
    assert (other[0] - frames[1]).abs().max() > 1e-3


def test_output_types(pipe, frames):
    kw = dict(height=H, width=W, num_frames=N, seed=3)
    arr = pipe(PROMPTS, output_type="np", **kw).frames
    assert arr.shape == (2, N, H, W, 3) and str(arr.dtype) == "float32"
    torch.testing.assert_close(torch.from_numpy(arr), frames.permute(0, 1, 3, 4, 2))
    pil = pipe(PROMPTS, output_type="pil", **kw).frames
    assert len(pil) == 2 and len(pil[0]) == N and pil[0][0].size == (W, H)
    import numpy as np

    assert abs(np.asarray(pil[1][5], dtype=np.float32).mean() / 255 - frames[1, 5].mean().item()) < 2e-3
    lat = pipe(PROMPTS, output_type="latent", **kw).frames
    assert lat.shape == (2, 6, 16, H // 8, W // 8)
    torch.testing.assert_close(pipe.vae.decode(lat), frames, rtol=0, atol=1e-5)
    out = pipe(PROMPTS, return_dict=False, **kw)
    assert isinstance(out, tuple) and torch.equal(out[0], frames)
    assert isinstance(pipe(PROMPTS[0], **kw), StreamingPipelineOutput)


@pytest.mark.parametrize("kw,match", [
    (dict(height=40), r"height must be a positive multiple of 16.*got 40; nearest valid: 32 or 48"),
    (dict(width=0), r"width must be a positive multiple of 16"),
    (dict(width=48.0), r"width must be an int"),
    (dict(num_frames=80), r"num_frames must be .*got 80; nearest valid: 69 or 81"),
    (dict(num_frames=5), r"num_frames .*nearest valid: 9"),
    (dict(prompt=7), r"prompt must be a string or a non-empty list of strings"),
    (dict(prompt=[]), r"prompt must be"),
    (dict(prompt=["ok", None]), r"prompt must be"),
    (dict(seeds=[1]), r"seeds must hold one non-negative int per prompt \(2\)"),
    (dict(seed=-1, prompt=["a", "b"]), r"seed must be a non-negative int"),
    (dict(output_type="mp4"), r"output_type must be one of"),
])
def test_bad_arguments_are_named(pipe, kw, match):
    args = dict(prompt=PROMPTS, height=H, width=W, num_frames=N) | kw
    prompt = args.pop("prompt")
    with pytest.raises((TypeError, ValueError), match=match):
        pipe(prompt, **args)
    with pytest.raises((TypeError, ValueError), match=match):
        pipe.stream(prompt, **args)  # checked when stream() is called, before any work


def test_lora_load_and_unload_restore_the_outputs_exactly(pipe, frames, tmp_path):
    from model_helpers import make_tiny_model

    donor = make_tiny_model()
    adapters.add_lora(donor, "on", rank=4, alpha=8, target_modules=r".*\.(self_attn\.(q|v)|ffn\.0)$")
    with torch.no_grad():
        for n, p in donor.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    adapters.save_adapter(donor, "on", tmp_path / "adapter")
    kw = dict(height=H, width=W, num_frames=N, seed=3)
    pipe.load_lora_weights(tmp_path / "adapter", scale=0.5)
    try:
        tuned = pipe(PROMPTS, **kw).frames
        assert (tuned - frames).abs().max() > 1e-3
        assert not any(p.requires_grad for p in pipe.model.parameters())
    finally:
        pipe.unload_lora_weights()
    assert not adapters.lora_layers(pipe.model)
    assert torch.equal(pipe(PROMPTS, **kw).frames, frames)


def test_lora_scale_must_be_finite(pipe, tmp_path):
    for scale in (float("nan"), float("inf"), "0.5"):
        with pytest.raises(ValueError, match="scale must be a finite number"):
            pipe.load_lora_weights(tmp_path / "adapter", scale=scale)
    assert not adapters.lora_layers(pipe.model)


def test_progress_bar_per_chunk_and_silenced(pipe, capsys):
    pipe.set_progress_bar_config(disable=False, desc="gen")
    try:
        pipe(PROMPTS[0], height=H, width=W, num_frames=N)
    finally:
        pipe.set_progress_bar_config(disable=True)
    assert "gen" in capsys.readouterr().err
    pipe(PROMPTS[0], height=H, width=W, num_frames=N)
    assert capsys.readouterr().err == ""


def test_from_pretrained_diffusers_folder_equals_from_diffusers(wan_pipe, pipe, frames, tmp_path):
    wan_pipe.save_pretrained(tmp_path / "wan")
    other = StreamingPipeline.from_pretrained(tmp_path / "wan", device="cpu")
    other.set_progress_bar_config(disable=True)
    torch.testing.assert_close(other(PROMPTS, height=H, width=W, num_frames=N, seed=3).frames, frames, rtol=0, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="not a folder.*'tiny'"):
        StreamingPipeline.from_pretrained(tmp_path / "missing")
    (tmp_path / "partial" / "transformer").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"lacks \['text_encoder', 'tokenizer', 'vae'\]"):
        StreamingPipeline.from_pretrained(tmp_path / "partial")


def test_from_pretrained_tiny_works_out_of_the_box(tiny_assets):
    p = StreamingPipeline.from_pretrained("tiny", device="cpu")
    p.set_progress_bar_config(disable=True)
    video = p("a red balloon", height=32, width=32, num_frames=9).frames
    assert video.shape == (1, 9, 3, 32, 32) and video.std() > 0.01
    assert p.to("cpu") is p and p.device.type == "cpu"


def test_from_pretrained_toy_is_the_toy_worlds_generator():
    """The toy world's model with its own text encoder, VAE and schedule (shift 1, not Self-Forcing's 5): the
    videos of toy.measure's loader, at the world's clip size by default."""
    from arcopo_fast.toy import assets
    from arcopo_fast.toy.measure import load_toy_generator

    p = StreamingPipeline.from_pretrained("toy", device="cpu")
    assert p.default_size == (64, 64, 33) and p.sampler.schedule.shift == assets.read_manifest()["sampler"]["shift"]
    prompt = "a small red circle moving left over a dark blue background"
    ours = p(prompt, height=64, width=64, num_frames=9, seed=3).frames
    ref = load_toy_generator()(prompt, height=64, width=64, num_frames=9, seed=3).frames
    assert torch.equal(ours, ref)
