"""VideoAlign on a tiny random Qwen2-VL saved in the released checkpoint layout (model_config.json,
checkpoint-<step>/model.pth holding the PEFT-wrapped reward model, checkpoint-<step>/tokenizer/), checked
against the unmerged PEFT model; plus the preprocessing pieces against transformers' own.

VideoAlign's evaluation prompt is not part of the package (nor of these tests): it is read from the user's
VideoAlign checkout. The tests write a stand-in checkout whose prompt_template.py holds a template of their
own (TEMPLATE below), with the same placeholder and reward tokens."""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import pytest
import torch
import torch.nn as nn

from arcopo_fast.rewards import CompositeReward, MissingWeightsError, videoalign
from arcopo_fast.rewards.videoalign import (
    SPECIAL_TOKENS,
    VideoAlign,
    chat_text,
    frame_indices,
    load_prompt_template,
    patchify,
    smart_resize,
)

# Written for these tests (not VideoAlign's text): the placeholder and the three reward tokens, once each.
TEMPLATE = (
    "\nScore the clip below on three axes, each from 0 to 10.\n\n"
    "Look of the frames: <|VQ_reward|>\nEND\n\n"
    "Movement over time: <|MQ_reward|>\nEND\n\n"
    "Prompt given - {text_prompt}\nFit to the prompt: <|TA_reward|>\nEND\n"
)


def _checkout(folder, template=TEMPLATE):
    """A stand-in VideoAlign checkout: prompt_template.py with the template variable among others. Its first
    line imports a module that does not exist: the file is read, never run."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompt_template.py").write_text(
        "import a_module_that_is_not_installed\n\n"
        f"DETAILED_PROMPT = {'other text {text_prompt}'!r}\n"
        f"DETAILED_PROMPT_WITH_SPECIAL_TOKEN = {template!r}\n"
    )
    return folder


@pytest.fixture(scope="module", autouse=True)
def videoalign_checkout(tmp_path_factory):
    """$ARCOPO_WEIGHTS/VideoAlign holds the stand-in checkout (the default place the reward looks), and the
    released template's hash is swapped for this template's so that it loads without the 'differs' warning."""
    weights = tmp_path_factory.mktemp("weights")
    _checkout(weights / "VideoAlign")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ARCOPO_WEIGHTS", str(weights))
        mp.setattr(videoalign, "TEMPLATE_SHA256", hashlib.sha256(TEMPLATE.encode()).hexdigest())
        yield weights / "VideoAlign"

BASE_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
CALIBRATION = {"VQ_mean": 1.0, "VQ_std": 2.0, "MQ_mean": 0.5, "MQ_std": 1.5, "TA_mean": -1.0, "TA_std": 4.0}
PROMPTS = ["a cat runs", "a dog", "a {strange} prompt"]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(
        set(
            re.findall(
                r"\w+|[^\w\s]+",
                TEMPLATE + " system user assistant You are helpful cat dog runs",
            )
        )
    )
    vocab = {"[UNK]": 0}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": BASE_TOKENS})
    return tok


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Build a tiny reward model the way VideoAlign does (Qwen2-VL + 3 special tokens + rm_head + LoRA on
    the language model) and save it in the released layout; returns (folder, peft model, config)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    root = tmp_path_factory.mktemp("VideoReward")
    step = root / "checkpoint-12"
    tok = _tokenizer()
    tok.add_special_tokens({"additional_special_tokens": BASE_TOKENS + list(SPECIAL_TOKENS)})
    tok.save_pretrained(step / "tokenizer")
    ids = tok.convert_tokens_to_ids
    cfg = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048, rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]},
            bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
        ),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                           temporal_patch_size=2, spatial_merge_size=2, in_channels=3),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )  # fmt: skip
    cfg.save_pretrained(root)  # the trainer saves the Qwen2-VL config beside model_config.json

    class RewardModel(Qwen2VLForConditionalGeneration):
        def __init__(self, config):
            super().__init__(config)
            self.rm_head = nn.Linear(config.text_config.hidden_size, 1, bias=False)

    torch.manual_seed(0)
    model = RewardModel(cfg).eval()
    targets = [
        n for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not any(x in n for x in ("lm_head", "rm_head", "embed_tokens", "visual"))
    ]  # fmt: skip
    # init_lora_weights=False: B is random too, so the merge is not trivially exact.
    peft_model = get_peft_model(
        model, LoraConfig(target_modules=targets, r=4, lora_alpha=8, init_lora_weights=False)
    ).eval()
    torch.save(peft_model.state_dict(), step / "model.pth")
    (root / "model_config.json").write_text(
        json.dumps(
            {
                "data_config": {"fps": 2.0, "num_frames": None, "max_frame_pixels": 56 * 84, "eval_dim": ["VQ", "MQ", "TA"],
                                "prompt_template_type": "detailed_special", "sample_type": "uniform"},
                "training_args": {},
                "model_config": {"model_name_or_path": "Qwen/Qwen2-VL-2B-Instruct", "output_dim": 1,
                                 "use_special_tokens": True, "reward_token": "special"},
                "peft_lora_config": {"lora_enable": True, "lora_r": 4, "lora_alpha": 8, "use_rslora": False},
                "inference_config": CALIBRATION,
            }
        )
    )  # fmt: skip
    return root, peft_model, cfg


def _videos(seed=1, b=3, f=9, h=50, w=70):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, f, 3, h, w, generator=g)


def _reference(reward: VideoAlign, peft_model, videos, prompts):
    """Scores from the unmerged PEFT model (the LoRA runs as separate layers) on the same inputs."""
    batch = reward._prepare(videos, prompts)
    ids = batch["input_ids"]
    kwargs = dict(batch, use_cache=False, mm_token_type_ids=(ids == reward.video_token_id).int() * 2)
    with torch.no_grad():
        hidden = peft_model.base_model.model.model(**kwargs).last_hidden_state
        cols = [(ids == t).int().argmax(1) for t in reward.special_ids]
        rows = torch.arange(ids.shape[0])
        return torch.stack([peft_model.base_model.model.rm_head(hidden[rows, c])[:, 0] for c in cols], 1)


def test_scores_names_shapes_and_match_the_peft_model(tiny):
    root, peft_model, _ = tiny
    reward = VideoAlign(root, device="cpu", min_pixels=56 * 56, batch_size=2)
    videos = _videos()
    out = reward(videos, PROMPTS)
    assert list(out) == ["VQ", "MQ", "TA", "Overall"]
    for v in out.values():
        assert v.shape == (3,) and v.dtype == torch.float32 and torch.isfinite(v).all()
    torch.testing.assert_close(out["Overall"], out["VQ"] + out["MQ"] + out["TA"])
    raw = torch.stack([out["VQ"], out["MQ"], out["TA"]], 1)
    torch.testing.assert_close(raw, _reference(reward, peft_model, videos, PROMPTS), atol=1e-5, rtol=1e-5)
    # Deterministic (a fresh instance gives the same scores), and micro-batching does not change them.
    again = VideoAlign(root, device="cpu", min_pixels=56 * 56, batch_size=3)(videos, PROMPTS)
    for k in out:
        torch.testing.assert_close(again[k], out[k], atol=1e-6, rtol=1e-6)


def test_normalize_applies_the_checkpoint_calibration(tiny):
    root, _, _ = tiny
    videos = _videos(seed=2, b=1)
    raw = VideoAlign(root, device="cpu", min_pixels=56 * 56)(videos, PROMPTS[:1])
    norm = VideoAlign(root, device="cpu", min_pixels=56 * 56, normalize=True)(videos, PROMPTS[:1])
    for name in ("VQ", "MQ", "TA"):
        expected = (raw[name] - CALIBRATION[f"{name}_mean"]) / CALIBRATION[f"{name}_std"]
        torch.testing.assert_close(norm[name], expected)


def test_composite_uses_vq_mq_ta_and_logs_overall(tiny):
    root, _, _ = tiny
    comp = CompositeReward(
        [{"name": "videoalign", "kwargs": {"checkpoint": str(root), "device": "cpu", "min_pixels": 3136}}]
    )
    total, parts = comp(_videos(seed=3, b=2), PROMPTS[:2])
    assert set(parts) == {"videoalign/VQ", "videoalign/MQ", "videoalign/TA", "videoalign/Overall"}
    torch.testing.assert_close(total, parts["videoalign/Overall"])
    ta_only = CompositeReward(
        [
            {
                "name": "videoalign",
                "components": {"TA": 1.0},
                "kwargs": {"checkpoint": str(root), "device": "cpu", "min_pixels": 3136},
            }
        ]
    )
    total_ta, parts_ta = ta_only(_videos(seed=3, b=2), PROMPTS[:2])
    torch.testing.assert_close(total_ta, parts_ta["videoalign/TA"])


def _old_layout(key: str) -> str:
    """Key names of transformers < 4.52 (what the released model.pth uses)."""
    key = key.replace("base_model.model.model.visual.", "base_model.model.visual.")
    return key.replace("base_model.model.model.language_model.", "base_model.model.model.")


def test_old_transformers_key_layout_and_lora_only_checkpoints(tiny, tmp_path):
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    root, peft_model, cfg = tiny
    videos = _videos(seed=4, b=2)
    expected = VideoAlign(root, device="cpu", min_pixels=3136)(videos, PROMPTS[:2])

    old = tmp_path / "old"
    shutil.copytree(root, old)
    sd = torch.load(old / "checkpoint-12" / "model.pth", weights_only=True)
    torch.save({_old_layout(k): v for k, v in sd.items()}, old / "checkpoint-12" / "model.pth")
    got = VideoAlign(old, device="cpu", min_pixels=3136)(videos, PROMPTS[:2])
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=1e-6, rtol=1e-6)

    # LoRA-only: adapter + trainable non-LoRA tensors, base weights (old names, as in the Qwen2-VL repo) elsewhere.
    lora = tmp_path / "lora"
    shutil.copytree(root, lora, ignore=shutil.ignore_patterns("model.pth"))
    adapter = {_old_layout(k): v.contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}
    save_file(adapter, lora / "checkpoint-12" / "adapter_model.safetensors")
    full = {_old_layout(k): v for k, v in peft_model.state_dict().items()}
    non_lora = {k: v for k, v in full.items() if "rm_head" in k or "embed_tokens" in k or ".visual." in k}
    torch.save(non_lora, lora / "checkpoint-12" / "non_lora_state_dict.pth")
    base = tmp_path / "Qwen2-VL-base"
    base.mkdir()
    cfg.save_pretrained(base)
    base_sd = {}
    for k, v in full.items():
        if "lora_" in k or "rm_head" in k:
            continue
        k = k.removeprefix("base_model.model.").replace(".base_layer.", ".")
        base_sd[k] = (
            v + 1.0 if ("embed_tokens" in k or k.startswith("visual.")) else v
        ).contiguous()  # overridden
    save_file(base_sd, base / "model.safetensors")
    with pytest.raises(MissingWeightsError, match="Qwen/Qwen2-VL-2B-Instruct"):
        VideoAlign(lora, device="cpu")
    got = VideoAlign(lora, base, device="cpu", min_pixels=3136)(videos, PROMPTS[:2])
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=1e-5, rtol=1e-5)


def test_missing_files_say_what_to_download(tiny, tmp_path):
    root, _, _ = tiny
    with pytest.raises(
        MissingWeightsError, match=r"KwaiVGI/VideoReward.*" + re.escape(str(tmp_path / "none"))
    ):
        VideoAlign(tmp_path / "none", device="cpu")
    no_weights = tmp_path / "no_weights"
    shutil.copytree(root, no_weights, ignore=shutil.ignore_patterns("model.pth"))
    with pytest.raises(MissingWeightsError, match="expected model.pth.*KwaiVGI/VideoReward"):
        VideoAlign(no_weights, device="cpu")
    no_config = tmp_path / "no_config"
    shutil.copytree(root, no_config, ignore=shutil.ignore_patterns("config.json"))
    with pytest.raises(MissingWeightsError, match="Qwen/Qwen2-VL-2B-Instruct.*base_model="):
        VideoAlign(no_config, device="cpu")
    with pytest.raises(ValueError, match="checkpoint_step 5 not in .*available \\[12\\]"):
        VideoAlign(root, device="cpu", checkpoint_step=5)


def test_prompt_containing_a_reward_token_is_rejected(tiny):
    root, _, _ = tiny
    reward = VideoAlign(root, device="cpu", min_pixels=3136)
    with pytest.raises(ValueError, match="must occur once per prompt"):
        reward(_videos(b=1), ["sneaky <|TA_reward|>"])


# ------------------------------------------------------------------------------------- preprocessing


def test_chat_text_inserts_the_prompt_into_the_template():
    text = chat_text("a {cat}", 3, TEMPLATE)
    assert text.startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
    )
    assert "<|video_pad|>" * 3 + "<|vision_end|>\nScore the clip" in text
    assert "Prompt given - a {cat}\n" in text and text.endswith("END\n<|im_end|>\n<|im_start|>assistant\n")
    assert all(text.count(t) == 1 for t in SPECIAL_TOKENS)


def test_prompt_template_is_read_from_the_users_videoalign(tmp_path, monkeypatch, videoalign_checkout):
    # default: $ARCOPO_WEIGHTS/VideoAlign; or a checkout folder, its prompt_template.py, or a text file
    assert load_prompt_template() == TEMPLATE
    other = TEMPLATE.replace("Score the clip", "Rate the video")
    monkeypatch.setattr(videoalign, "TEMPLATE_SHA256", hashlib.sha256(other.encode()).hexdigest())
    assert load_prompt_template(_checkout(tmp_path / "VA", other)) == other
    assert load_prompt_template(tmp_path / "VA" / "prompt_template.py") == other
    (tmp_path / "t.txt").write_text(other)
    assert load_prompt_template(tmp_path / "t.txt") == other
    # an "installation": a checkout on sys.path, found as the top-level module prompt_template
    monkeypatch.setenv("ARCOPO_WEIGHTS", str(tmp_path / "empty"))
    monkeypatch.syspath_prepend(str(tmp_path / "VA"))
    assert load_prompt_template() == other
    # a template that is not the released text is used, with a warning (the hash check is live)
    monkeypatch.setattr(videoalign, "TEMPLATE_SHA256", "0" * 64)
    with pytest.warns(UserWarning, match="differs from the released one"):
        load_prompt_template(tmp_path / "t.txt")


def test_missing_or_broken_template_says_what_to_fetch(tmp_path, monkeypatch, tiny):
    monkeypatch.setenv("ARCOPO_WEIGHTS", str(tmp_path / "w"))
    with pytest.raises(MissingWeightsError, match=r"github.com/KwaiVGI/VideoAlign.*" + re.escape(str(tmp_path / "w" / "VideoAlign"))):
        load_prompt_template()
    with pytest.raises(MissingWeightsError, match="prompt_template kwarg"):
        VideoAlign(tiny[0], device="cpu")  # the reward itself, before loading any weights
    (tmp_path / "bad.txt").write_text(TEMPLATE.replace("<|TA_reward|>", ""))
    with pytest.raises(ValueError, match="TA_reward"):
        load_prompt_template(tmp_path / "bad.txt")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "prompt_template.py").write_text("OTHER = 'a'\n")
    with pytest.raises(ValueError, match="defines no DETAILED_PROMPT_WITH_SPECIAL_TOKEN"):
        load_prompt_template(tmp_path / "x")


def test_frame_sampling():
    idx = frame_indices(81, video_fps=16.0, fps=2.0, num_frames=None)  # 81 / 16 * 2 = 10.1 -> 10 frames
    assert len(idx) == 10 and idx[0] == 0 and idx[-1] == 80
    assert frame_indices(9, video_fps=16.0, fps=2.0, num_frames=None) == [0, 3, 5, 8]  # at least 4 frames
    assert len(frame_indices(81, video_fps=16.0, fps=None, num_frames=7)) == 8  # rounded to an even count
    assert frame_indices(3, video_fps=16.0, fps=2.0, num_frames=None) == [0, 2]  # even count, as VideoAlign
    with pytest.raises(ValueError, match="at least 2 frames"):
        frame_indices(1, video_fps=16.0, fps=2.0, num_frames=None)


def _qwen2vl_module(*names):
    """The first importable transformers Qwen2-VL processing module (they moved between versions; the
    torchvision-backed ones need torchvision)."""
    import importlib

    for name in names:
        try:
            return importlib.import_module(f"transformers.models.qwen2_vl.{name}")
        except ImportError:
            continue
    pytest.skip(f"none of {names} importable")


def test_smart_resize_matches_transformers():
    mod = _qwen2vl_module(
        "video_processing_qwen2_vl", "image_processing_pil_qwen2_vl", "image_processing_qwen2_vl"
    )
    for h, w in [(480, 832), (50, 70), (720, 1280), (81, 33), (1000, 1000)]:
        ours = smart_resize(h, w, factor=28, min_pixels=128 * 28 * 28, max_pixels=448 * 448)
        assert ours == mod.smart_resize(h, w, factor=28, min_pixels=128 * 28 * 28, max_pixels=448 * 448)
    assert smart_resize(480, 832, factor=28, min_pixels=128 * 28 * 28, max_pixels=448 * 448) == (336, 588)


def test_patchify_matches_the_qwen2vl_processors():
    torch.manual_seed(5)
    frames = torch.randint(0, 256, (4, 3, 56, 84), dtype=torch.uint8)
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    normed = (frames.float() / 255 - mean) / std
    try:  # the video processor (transformers >= 4.52 with torchvision): the whole clip
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

        ref = Qwen2VLVideoProcessor()(
            videos=[frames], do_resize=False, do_sample_frames=False, return_tensors="pt"
        )
        ours, grid = patchify(normed, patch_size=14, temporal_patch_size=2, merge_size=2)
        assert list(grid) == ref["video_grid_thw"][0].tolist() == [2, 4, 6]
        torch.testing.assert_close(ours, ref["pixel_values_videos"], atol=1e-5, rtol=1e-5)
    except (
        ImportError
    ):  # no torchvision: one frame through the image processor (it repeats the frame in time)
        mod = _qwen2vl_module("image_processing_pil_qwen2_vl", "image_processing_qwen2_vl")
        cls = getattr(mod, "Qwen2VLImageProcessorPil", None) or mod.Qwen2VLImageProcessor
        ref = cls()(images=[frames[0].permute(1, 2, 0).numpy()], do_resize=False, return_tensors="pt")
        ours, grid = patchify(normed[:1], patch_size=14, temporal_patch_size=2, merge_size=2)
        assert list(grid) == ref["image_grid_thw"][0].tolist() == [1, 4, 6]
        torch.testing.assert_close(ours, ref["pixel_values"].float(), atol=1e-5, rtol=1e-5)
