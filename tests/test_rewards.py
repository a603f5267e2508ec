"""Rewards: the protocol and CompositeReward's checks, the offline rewards on synthetic videos with known
answers, and the CLIP-family rewards on a tiny random CLIPModel with a tokenizer built offline."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from arcopo_fast.rewards import (
    BrightnessTarget,
    ColorTarget,
    CompositeReward,
    JpegCompressibility,
    MissingWeightsError,
    RewardError,
    RewardSpec,
    TemporalSmoothness,
    build_reward,
    check_videos,
    load_reward_class,
    parse_reward_list,
    sample_frame_indices,
)

PROMPTS3 = ["a cat", "a red dog", "blue video"]


def flat_video(b=3, f=6, h=24, w=32, rgb=(0.5, 0.5, 0.5)):
    return torch.tensor(rgb).view(1, 1, 3, 1, 1).expand(b, f, 3, h, w).clone()


# ------------------------------------------------------------------------------------- offline rewards


def test_static_video_has_zero_flicker_and_best_smoothness():
    torch.manual_seed(0)
    frame = torch.rand(1, 1, 3, 24, 32)
    static = frame.expand(2, 6, 3, 24, 32).clone()
    noisy = static + 0.05 * torch.randn_like(static)
    noisy = noisy.clamp(0, 1)
    videos = torch.cat([static, noisy])
    for order in (1, 2):
        out = TemporalSmoothness(order=order)(videos, ["p"] * 4)
        assert out["flicker"].shape == (4,) and out["flicker"].dtype == torch.float32
        assert torch.equal(out["flicker"][:2], torch.zeros(2))
        assert torch.equal(out["score"][:2], torch.zeros(2))  # the best possible score
        assert (out["score"][2:] < 0).all()


def test_flicker_value_and_second_order():
    # Brightness stepping by 0.1 per frame: first differences are 0.1 everywhere, second differences 0.
    ramp = torch.linspace(0.1, 0.6, 6).view(1, 6, 1, 1, 1).expand(1, 6, 3, 8, 8).clone()
    torch.testing.assert_close(TemporalSmoothness(order=1)(ramp, ["p"])["flicker"], torch.tensor([0.1]))
    torch.testing.assert_close(
        TemporalSmoothness(order=2)(ramp, ["p"])["flicker"], torch.tensor([0.0]), atol=1e-6, rtol=0
    )
    # Alternating frames (pumping) cost under both orders; downsampling keeps a global flicker unchanged.
    pump = torch.tensor([0.2, 0.8] * 3).view(1, 6, 1, 1, 1).expand(1, 6, 3, 8, 8).clone()
    torch.testing.assert_close(TemporalSmoothness(order=1)(pump, ["p"])["flicker"], torch.tensor([0.6]))
    torch.testing.assert_close(
        TemporalSmoothness(order=1, downsample=4)(pump, ["p"])["flicker"], torch.tensor([0.6])
    )
    torch.testing.assert_close(
        TemporalSmoothness(order=1, frame_stride=2)(pump, ["p"])["flicker"], torch.tensor([0.0])
    )


def test_smoothness_rejects_bad_arguments():
    with pytest.raises(ValueError, match="order"):
        TemporalSmoothness(order=3)
    with pytest.raises(ValueError, match="downsample"):
        TemporalSmoothness(downsample=0)
    with pytest.raises(ValueError, match="at least 3 frames"):
        TemporalSmoothness(order=2)(flat_video(f=2), PROMPTS3)


def test_flat_video_is_more_jpeg_compressible_than_noise():
    torch.manual_seed(0)
    h, w = 64, 96
    flat = flat_video(1, 4, h, w)
    gradient = torch.linspace(0, 1, w).view(1, 1, 1, 1, w).expand(1, 4, 3, h, w).clone()
    noise = torch.rand(1, 4, 3, h, w)
    out = JpegCompressibility(quality=75, num_frames=2)(torch.cat([flat, gradient, noise]), PROMPTS3)
    bpp = out["bits_per_pixel"]
    assert out["score"].shape == (3,) and out["score"].dtype == torch.float32
    torch.testing.assert_close(out["score"], -bpp)
    assert bpp[0] < bpp[1] < bpp[2], bpp
    assert bpp[2] > 4.0 and bpp[0] < 1.0  # noise costs several bits per pixel, a flat frame a fraction
    with pytest.raises(ValueError, match="quality"):
        JpegCompressibility(quality=100)


def test_brightness_target_scores_highest_at_target():
    levels = [0.1, 0.3, 0.5, 0.7, 0.9]
    videos = torch.cat([flat_video(1, 3, 8, 8, (v, v, v)) for v in levels])
    out = BrightnessTarget(target=0.7)(videos, ["p"] * 5)
    torch.testing.assert_close(out["brightness"], torch.tensor(levels))
    assert int(out["score"].argmax()) == 3
    assert abs(float(out["score"][3])) < 1e-6
    torch.testing.assert_close(out["score"], -(torch.tensor(levels) - 0.7).abs())
    with pytest.raises(ValueError, match="target"):
        BrightnessTarget(target=1.5)


def test_color_target_scores_highest_at_target():
    target = (0.8, 0.2, 0.3)
    colours = [(0.0, 0.0, 0.0), (1.0, 1.0, 1.0), target, (0.8, 0.2, 0.6), (0.2, 0.8, 0.3)]
    videos = torch.cat([flat_video(1, 2, 8, 8, c) for c in colours])
    out = ColorTarget(target=target)(videos, ["p"] * 5)
    assert int(out["score"].argmax()) == 2
    assert abs(float(out["score"][2])) < 1e-6
    torch.testing.assert_close(out["distance"][3], torch.tensor(0.3 / math.sqrt(3)))
    assert (out["score"] >= -1).all()
    with pytest.raises(ValueError, match="target"):
        ColorTarget(target=(0.1, 0.2))


def test_sample_frame_indices():
    assert sample_frame_indices(81, 4) == [0, 27, 53, 80]
    assert sample_frame_indices(3, 8) == [0, 1, 2]
    assert sample_frame_indices(9, 1) == [4]
    with pytest.raises(ValueError, match="sampled frames must be >= 1"):
        sample_frame_indices(5, 0)
    with pytest.raises(ValueError, match="num_frames must be >= 1"):
        sample_frame_indices(0, 3)


# ---------------------------------------------------------------------------------- composite + specs


def test_composite_weighted_total_and_component_names():
    torch.manual_seed(0)
    videos = torch.rand(3, 5, 3, 16, 16)
    comp = CompositeReward(
        [
            {"name": "temporal_smoothness", "weight": 2.0},
            RewardSpec("brightness", weight=-0.5, kwargs={"target": 0.2}),
            "jpeg_compressibility",
        ]
    )
    total, parts = comp(videos, PROMPTS3)
    assert set(parts) == {
        "temporal_smoothness/score", "temporal_smoothness/flicker", "brightness/score", "brightness/brightness",
        "jpeg_compressibility/score", "jpeg_compressibility/bits_per_pixel",
    }  # fmt: skip
    for v in parts.values():
        assert v.shape == (3,) and v.dtype == torch.float32
    expected = (
        2.0 * parts["temporal_smoothness/score"]
        - 0.5 * parts["brightness/score"]
        + parts["jpeg_compressibility/score"]
    )
    torch.testing.assert_close(total, expected)
    assert total.dtype == torch.float32 and total.shape == (3,)
    assert "brightness (weight -0.5" in comp.describe()


def test_user_reward_by_import_string():
    videos = flat_video(3, 2, 8, 8, (0.25, 0.5, 0.5))
    assert load_reward_class("rewards_test_helpers:GainRed").__name__ == "GainRed"
    comp = CompositeReward(
        [
            {"name": "rewards_test_helpers:GainRed", "weight": 2.0, "kwargs": {"gain": 3.0}},
            {"name": "rewards_test_helpers:PromptLength", "weight": 0.1, "label": "chars"},
        ]
    )
    total, parts = comp(videos, PROMPTS3)
    assert comp.labels == ["GainRed", "chars"]
    torch.testing.assert_close(parts["GainRed/score"], torch.full((3,), 0.75))
    torch.testing.assert_close(parts["GainRed/mean_red"], torch.full((3,), 0.25))  # logged, not weighted
    lengths = torch.tensor([5.0, 9.0, 10.0])
    torch.testing.assert_close(parts["chars/chars"], lengths)
    torch.testing.assert_close(total, 2.0 * 0.75 + 0.1 * lengths)


def test_plain_functions_and_objects_are_rewards():
    """A function (videos, prompts) -> Tensor[B] | dict is a reward: by import string (kwargs passed on each
    call), or as an object, like any built reward object; a bare tensor is logged under the label alone."""
    from reward_helpers import MeanRed, redness
    from rewards_test_helpers import GainRed

    videos = flat_video(3, 2, 8, 8, (0.25, 0.5, 0.5))
    comp = CompositeReward(
        [
            "reward_helpers:redness",
            {"name": "reward_helpers:scaled_red", "kwargs": {"gain": 2.0}, "weight": 0.5},
            {"name": "reward_helpers:make_mean_red", "kwargs": {"scale": 3.0}},  # a factory is still called
            RewardSpec(reward=GainRed(gain=4.0), weight=0.25, label="gain"),
            MeanRed(),
        ]
    )
    total, parts = comp(videos, PROMPTS3)
    assert comp.labels == ["redness", "scaled_red", "make_mean_red", "gain", "MeanRed"]
    torch.testing.assert_close(parts["redness"], torch.full((3,), 0.25))  # bare tensor: the label alone
    torch.testing.assert_close(parts["scaled_red/red"], torch.full((3,), 0.5))
    torch.testing.assert_close(parts["make_mean_red/red"], torch.full((3,), 0.25))
    torch.testing.assert_close(total, torch.full((3,), 0.25 + 0.5 * 0.5 + 0.25 + 0.25 * 1.0 + 0.25))
    # a function object given directly; `components` weights name a bare tensor "score"
    comp = CompositeReward([redness, RewardSpec(reward=redness, label="r2", components={"score": 2.0})])
    total, parts = comp(videos, PROMPTS3)
    assert set(parts) == {"redness", "r2"}
    torch.testing.assert_close(total, torch.full((3,), 0.75))
    assert RewardSpec(reward=redness).to_config()["name"] == "reward_helpers:redness"
    with pytest.raises(ValueError, match="already built"):
        RewardSpec(reward=redness, kwargs={"gain": 1})


def test_spec_component_weights_override_the_reward_weights():
    videos = flat_video(3, 2, 8, 8, (0.25, 0.5, 0.5))
    comp = CompositeReward([{"name": "rewards_test_helpers:GainRed", "components": {"mean_red": 4.0}}])
    total, _ = comp(videos, PROMPTS3)
    torch.testing.assert_close(total, torch.full((3,), 1.0))
    bad = CompositeReward([{"name": "rewards_test_helpers:GainRed", "components": {"missing": 1.0}}])
    with pytest.raises(RewardError, match="'GainRed' did not return components \\['missing'\\]"):
        bad(videos, PROMPTS3)


def test_from_rewards_and_duplicate_labels():
    from rewards_test_helpers import GainRed

    comp = CompositeReward.from_rewards({"a": GainRed(), "b": GainRed(gain=2.0)}, weights={"b": 0.5})
    total, parts = comp(flat_video(3, 2, 8, 8, (0.4, 0.0, 0.0)), PROMPTS3)
    torch.testing.assert_close(total, torch.full((3,), 0.4 + 0.5 * 0.8))
    with pytest.raises(ValueError, match="duplicates"):
        CompositeReward(["brightness", "brightness"])
    CompositeReward(
        ["brightness", {"name": "brightness", "label": "brightness_dark", "kwargs": {"target": 0.1}}]
    )
    with pytest.raises(ValueError, match="unknown rewards"):
        CompositeReward.from_rewards({"a": GainRed()}, weights={"z": 1.0})


@pytest.mark.parametrize(
    "mode, message",
    [
        ("nan", r"reward 'bad', component 'score': non-finite scores \(NaN or inf\) for videos \[2\]"),
        ("inf", r"reward 'bad', component 'score': non-finite"),
        (
            "shape",
            r"reward 'bad', component 'score': expected shape \[3\] \(one score per video\), got \[3, 1\]",
        ),
        ("int", r"reward 'bad', component 'score': expected a floating tensor, got dtype torch.int64"),
        ("list", r"reward 'bad', component 'score': expected a torch.Tensor of shape \[3\], got list"),
        ("not_dict", r"reward 'bad' returned list; expected a Tensor\[B\] or a dict"),
        ("empty", r"reward 'bad' returned an empty dict"),
        ("raise", r"reward 'bad' raised RuntimeError: model exploded"),
    ],
)
def test_reward_errors_name_the_reward(mode, message):
    comp = CompositeReward(
        ["brightness", {"name": "rewards_test_helpers:Broken", "label": "bad", "kwargs": {"mode": mode}}]
    )
    with pytest.raises(RewardError, match=message):
        comp(flat_video(), PROMPTS3)


def test_loading_errors():
    with pytest.raises(ValueError, match="unknown reward 'nope'.*'package.module:Class'"):
        build_reward("nope")
    with pytest.raises(RewardError, match="cannot import module 'no_such_module_xyz'"):
        build_reward("no_such_module_xyz:Thing")
    with pytest.raises(RewardError, match="has no attribute 'Nope'"):
        build_reward("rewards_test_helpers:Nope")
    with pytest.raises(
        RewardError, match="reward 'rewards_test_helpers:GainRed': construction failed \\(TypeError"
    ):
        build_reward({"name": "rewards_test_helpers:GainRed", "kwargs": {"colour": 1}})
    with pytest.raises(ValueError, match="unknown keys \\['wieght'\\]"):
        RewardSpec.from_config({"name": "brightness", "wieght": 1.0})
    with pytest.raises(ValueError, match="weight"):
        RewardSpec("brightness", weight=float("nan"))


def test_parse_reward_list():
    specs = parse_reward_list("videoalign=1, rewards_test_helpers:GainRed=0.5,flicker")
    assert [(s.name, s.weight) for s in specs] == [
        ("videoalign", 1.0),
        ("rewards_test_helpers:GainRed", 0.5),
        ("flicker", 1.0),
    ]
    with pytest.raises(ValueError, match="not a number"):
        parse_reward_list("flicker=x")


def test_check_videos_rejects_bad_input():
    v = flat_video()
    check_videos(v, PROMPTS3)
    with pytest.raises(ValueError, match=r"\[B, F, 3, H, W\]"):
        check_videos(v[0], PROMPTS3)
    with pytest.raises(ValueError, match="list of 3 strings"):
        check_videos(v, PROMPTS3[:2])
    with pytest.raises(ValueError, match="float"):
        check_videos(v.to(torch.uint8), PROMPTS3)
    bad = v.clone()
    bad[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        check_videos(bad, PROMPTS3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_videos(v + 0.6, PROMPTS3)
    with pytest.raises(ValueError, match="NaN"):
        CompositeReward(["brightness"])(bad, PROMPTS3)


# ------------------------------------------------------------------------------- missing weights paths


@pytest.mark.parametrize(
    "spec, needle",
    [
        ({"name": "clip_score", "kwargs": {"model_path": "{tmp}/clip"}}, "openai/clip-vit-large-patch14"),
        ({"name": "pickscore", "kwargs": {"model_path": "{tmp}/ps"}}, "yuvalkirstain/PickScore_v1"),
        ({"name": "hpsv2", "kwargs": {"checkpoint": "{tmp}/hps.pt"}}, "xswu/HPSv2"),
        ({"name": "videoalign", "kwargs": {"checkpoint": "{tmp}/VideoReward"}}, "KwaiVGI/VideoReward"),
    ],
)
def test_missing_weights_say_what_to_download_and_where(tmp_path, spec, needle):
    spec = {**spec, "kwargs": {k: v.format(tmp=tmp_path) for k, v in spec["kwargs"].items()}}
    where = next(iter(spec["kwargs"].values()))
    with pytest.raises(MissingWeightsError) as info:
        CompositeReward([spec])
    msg = str(info.value)
    assert needle in msg and where in msg and "Download" in msg, msg
    assert isinstance(info.value, RewardError) and isinstance(info.value, FileNotFoundError)


def test_default_weights_folder_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ARCOPO_WEIGHTS", str(tmp_path / "w"))
    with pytest.raises(MissingWeightsError, match=re.escape(str(tmp_path / "w" / "VideoReward"))):
        build_reward("videoalign")


# ------------------------------------------------------------------------------------ CLIP family (tiny)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIPModel + a WordLevel tokenizer (built with `tokenizers`, nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_clip")
    vocab = {"<|pad|>": 0, "<|startoftext|>": 1, "<|endoftext|>": 2, "[UNK]": 3}
    for word in "a photo of cat dog red blue video".split():
        vocab[word] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", 1), ("<|endoftext|>", 2)],
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token="[UNK]",
        pad_token="<|pad|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
    )
    tok.save_pretrained(folder)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=16, eos_token_id=2, bos_token_id=1, pad_token_id=0,
        ),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32},
                    "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]})
    )  # fmt: skip
    return folder, model


def _clip_logits(model, pixel_values, tokenizer, prompts):
    tok = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(
            input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=pixel_values
        )
    return out.logits_per_image  # logit_scale.exp() * cos, [images, texts]


def test_clip_and_pickscore_match_clipmodel(tiny_clip):
    from arcopo_fast.rewards.clip import ClipScore, PickScore, preprocess_frames

    folder, model = tiny_clip
    torch.manual_seed(1)
    frame = torch.rand(2, 1, 3, 40, 56)
    static = frame.expand(2, 5, 3, 40, 56)  # every frame equal: the frame average is that frame's score
    prompts = ["a photo of cat", "red dog"]
    clip = ClipScore(folder, device="cpu", num_frames=3)
    pick = PickScore(folder, folder, device="cpu")
    px = preprocess_frames(frame[:, 0], size=32, crop=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    logits = _clip_logits(model, px, clip.tokenizer, prompts).diagonal()
    scale = model.logit_scale.exp().item()
    out_clip, out_pick = clip(static, prompts), pick(static, prompts)
    assert (
        set(out_clip) == {"score"}
        and out_clip["score"].shape == (2,)
        and out_clip["score"].dtype == torch.float32
    )
    torch.testing.assert_close(out_clip["score"], 100.0 * logits / scale, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_pick["score"], logits, atol=1e-4, rtol=1e-4)
    # Deterministic, and per-frame: different frames give a different average.
    torch.testing.assert_close(clip(static, prompts)["score"], out_clip["score"], atol=0, rtol=0)
    moving = torch.rand(2, 5, 3, 40, 56)
    assert not torch.allclose(clip(moving, prompts)["score"], out_clip["score"])


def test_clip_preprocessing_matches_clip_image_processor(tiny_clip):
    from transformers import CLIPImageProcessor

    from arcopo_fast.rewards.clip import preprocess_frames

    torch.manual_seed(2)
    # Smooth images (PIL and torch bicubic agree closely there), quantised to 8 bits for PIL.
    base = torch.rand(2, 3, 6, 8)
    frames = torch.nn.functional.interpolate(base, size=(45, 61), mode="bilinear", align_corners=True)
    frames = (frames * 255).round() / 255
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    proc = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=mean, image_std=std
    )
    ref = proc(images=list((frames * 255).round().to(torch.uint8)), return_tensors="pt")["pixel_values"]
    ours = preprocess_frames(frames, size=32, crop=32, mean=mean, std=std)
    assert ours.shape == ref.shape == (2, 3, 32, 32)
    assert (ours - ref).abs().mean() < 0.02, (ours - ref).abs().mean()


def test_hpsv2_loads_an_open_clip_state_dict(tiny_clip, tmp_path):
    from arcopo_fast.rewards.clip import ClipFrameReward, HPSv2, open_clip_to_hf_clip

    folder, model = tiny_clip
    # Write the tiny model in open_clip's layout (fused qkv, transposed projections), as HPSv2 ships it.
    oc = {}
    for key, value in model.state_dict().items():
        if key.endswith("position_ids"):
            continue
        m = re.match(r"(vision|text)_model\.encoder\.layers\.(\d+)\.(.+)", key)
        if m:
            prefix = ("visual." if m[1] == "vision" else "") + f"transformer.resblocks.{m[2]}."
            rest = m[3]
            qkv = re.match(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
            if qkv:
                if qkv[1] == "q":
                    parts = [
                        model.state_dict()[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")
                    ]
                    oc[f"{prefix}attn.in_proj_{qkv[2]}"] = torch.cat(parts)
                continue
            for hf, o in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                          ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj")):  # fmt: skip
                if rest.startswith(hf + "."):
                    oc[prefix + o + rest[len(hf) :]] = value
            continue
        names = {
            "vision_model.embeddings.class_embedding": "visual.class_embedding",
            "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
            "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
            "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight", "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
            "vision_model.post_layernorm.weight": "visual.ln_post.weight",
            "vision_model.post_layernorm.bias": "visual.ln_post.bias",
            "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
            "text_model.embeddings.position_embedding.weight": "positional_embedding",
            "text_model.final_layer_norm.weight": "ln_final.weight", "text_model.final_layer_norm.bias": "ln_final.bias",
            "logit_scale": "logit_scale",
        }  # fmt: skip
        if key in names:
            oc[names[key]] = value
        elif key == "visual_projection.weight":
            oc["visual.proj"] = value.t().contiguous()
        elif key == "text_projection.weight":
            oc["text_projection"] = value.t().contiguous()
        else:
            raise AssertionError(f"unmapped key {key}")
    oc["attn_mask"] = torch.full((16, 16), float("-inf")).triu(1)
    ckpt = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": oc}, ckpt)

    hps = HPSv2(ckpt, folder, device="cpu")
    ref = ClipFrameReward(folder, device="cpu", scale=1.0)
    ref.resize_mode = "longest"
    torch.manual_seed(3)
    videos = torch.rand(2, 4, 3, 30, 50)
    prompts = ["a cat", "blue video"]
    out = hps(videos, prompts)["score"]
    torch.testing.assert_close(out, ref(videos, prompts)["score"], atol=1e-5, rtol=1e-5)
    assert (out.abs() <= 1 + 1e-5).all()  # a cosine
    with pytest.raises(ValueError, match="no transformers CLIP equivalent"):
        open_clip_to_hf_clip({"visual.attn_pool.query": torch.zeros(1)})
