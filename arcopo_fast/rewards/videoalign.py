"""VideoAlign (VideoReward): the Qwen2-VL video reward model of "Improving Video Generation with Human
Feedback" (Liu et al., arXiv 2501.13918; https://github.com/KwaiVGI/VideoAlign, MIT licence), which
scores a video and its prompt on Visual Quality (VQ), Motion Quality (MQ) and Text Alignment (TA).

Returns {"VQ", "MQ", "TA", "Overall" = VQ + MQ + TA}; the total uses VQ + MQ + TA (Overall is logged).
By default the scores are raw (normalize=False): the AR-CoPO paper's "VideoAlign Overall" of 7.76 for
Self-Forcing is on this scale (the released calibration means add up to 7.65). normalize=True applies
the checkpoint's inference_config: (score - mean) / std per dimension, as VideoAlign's inference.py does.

Checkpoint layout read here (the released https://huggingface.co/KwaiVGI/VideoReward):

    VideoReward/
      model_config.json     data_config (fps 2.0, max_frame_pixels 448*448, prompt "detailed_special",
                            uniform sampling), model_config (base Qwen/Qwen2-VL-2B-Instruct, reward head
                            on 3 special tokens, output_dim 1), peft_lora_config (LoRA r 64 / alpha 128 on
                            the language model's linears), inference_config (calibration means / stds)
      checkpoint-<step>/
        model.pth           the state dict of the whole PEFT-wrapped reward model (LoRA not merged)
        tokenizer/          the Qwen2 tokenizer plus <|VQ_reward|> <|MQ_reward|> <|TA_reward|>
    (LoRA-only checkpoints written by VideoAlign's trainer are read too: checkpoint-<step>/
     adapter_model.safetensors + non_lora_state_dict.pth, base weights from the Qwen2-VL folder.)

plus the Qwen2-VL-2B-Instruct config (config.json, preprocessor_config.json; its weights are needed only
for LoRA-only checkpoints), from `base_model`, weights/Qwen2-VL-2B-Instruct, or a config.json inside
the checkpoint folder.

The model, as VideoAlign builds it: Qwen2-VL, the 3 special tokens appended to the vocabulary, LoRA on
every linear layer of the language model, and a bias-free linear reward head applied to the last
hidden state at each special token (VQ, MQ, TA, in prompt order). On load, the LoRA deltas are merged
into the weights (W + alpha / r * B A) and the language-model head is dropped: the result is a plain
transformers Qwen2VLModel plus the head, identical in exact arithmetic to the unmerged model.

Input pipeline (VideoAlign's, applied to in-memory tensors instead of mp4 files):
  * frames: n = clamp(F / video_fps * fps, 4, F) rounded to an even number (or the configured
    num_frames), at round(linspace(0, F - 1, n));
  * 8-bit quantisation, then an antialiased bicubic resize to Qwen2-VL's grid (sides multiples of 28,
    area within [128 * 28 * 28, max_frame_pixels]), rounded back to 8 bits, as torchvision resizes the
    uint8 frames of a decoded mp4;
  * CLIP mean / std normalisation, 2 x 14 x 14 patches grouped 2 x 2 for the merger;
  * the Qwen2-VL chat text: system prompt, then <|vision_start|><|video_pad|>...<|vision_end|> and the
    "detailed_special" evaluation prompt with the user prompt inserted. That prompt is VideoAlign's text and
    is not part of this package: it is read from the user's VideoAlign checkout (prompt_template.py) and
    checked against the sha256 of the released text, which the checkpoint was trained on.

Needs transformers >= 4.52 (Qwen2VLModel holding both the vision tower and the language model).
"""

from __future__ import annotations

import ast
import glob
import hashlib
import importlib.util
import inspect
import json
import math
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import (
    MissingWeightsError,
    default_weights_path,
    load_tensor_file,
    require_path,
    resolve_device,
    resolve_dtype,
)

SPECIAL_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
SCORE_NAMES = ("VQ", "MQ", "TA")
SYSTEM_PROMPT = "You are a helpful assistant."
VIDEO_MIN_PIXELS = 128 * 28 * 28
DEFAULT_MAX_PIXELS = 448 * 448
FRAME_FACTOR = 2
MIN_FRAMES = 4
MAX_FRAMES = 768
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The evaluation prompt is VideoAlign's text (its prompt_template.py): the package does not carry it, it is
# read from the user's VideoAlign checkout or installation (load_prompt_template). Facts about it kept here:
# the file, the variable ("detailed_special" in model_config.json), and the sha256 of the released text.
TEMPLATE_FILE = "prompt_template.py"
TEMPLATE_VARIABLE = "DETAILED_PROMPT_WITH_SPECIAL_TOKEN"
TEMPLATE_SHA256 = "fdb6309bac618dd0c8b1b589d3a0970a974f7856eecbb355a190b2dce54af700"
TEMPLATE_PLACEHOLDER = "{text_prompt}"

_FETCH_SOURCE = (
    "VideoAlign's source code, whose prompt_template.py holds the evaluation prompt the reward model was trained "
    "with (git clone https://github.com/KwaiVGI/VideoAlign <path>)"
)
_DOWNLOAD_CKPT = (
    "the Hugging Face repo KwaiVGI/VideoReward (git lfs install && git clone "
    "https://huggingface.co/KwaiVGI/VideoReward <path>, or huggingface-cli download KwaiVGI/VideoReward "
    "--local-dir <path>)"
)
_DOWNLOAD_BASE = (
    "Qwen/Qwen2-VL-2B-Instruct (for the released full checkpoint only its config is needed: huggingface-cli "
    "download Qwen/Qwen2-VL-2B-Instruct config.json preprocessor_config.json --local-dir <path>; LoRA-only "
    "checkpoints need its weights too)"
)


def _template_candidates(source: str | Path | None) -> list[Path]:
    """Where the template is looked for: `source`, else $ARCOPO_WEIGHTS/VideoAlign (a checkout beside the
    weights), else an importable top-level `prompt_template` module (a checkout on sys.path)."""
    if source is not None:
        return [Path(source).expanduser()]
    found = [default_weights_path("VideoAlign")]
    spec = importlib.util.find_spec("prompt_template") if "prompt_template" not in sys.modules else None
    origin = getattr(spec, "origin", None) or getattr(sys.modules.get("prompt_template"), "__file__", None)
    if origin:
        found.append(Path(origin))
    return found


def _read_template_variable(path: Path) -> str | None:
    """The string assigned to TEMPLATE_VARIABLE in a Python file, read with ast (the file is not run)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == TEMPLATE_VARIABLE for t in targets):
            if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                return node.value.value
            raise ValueError(f"{path}: {TEMPLATE_VARIABLE} is not a plain string literal")
    return None


def load_prompt_template(source: str | Path | None = None) -> str:
    """VideoAlign's "detailed_special" evaluation prompt (with {text_prompt} and the three reward tokens),
    read from the user's copy of VideoAlign.

    source: a VideoAlign checkout (folder holding prompt_template.py), its prompt_template.py, or a text
    file holding the template itself. None: $ARCOPO_WEIGHTS/VideoAlign, then an importable
    `prompt_template` module. A template that differs from the released one is used with a warning (the
    checkpoint was trained on the released text); a missing one raises MissingWeightsError saying what to
    fetch and where to put it.
    """
    tried = []
    for cand in _template_candidates(source):
        path = cand / TEMPLATE_FILE if cand.is_dir() else cand
        tried.append(str(path))
        if not path.is_file():
            continue
        if path.suffix == ".py":
            text = _read_template_variable(path)
            if text is None:
                raise ValueError(f"{path} defines no {TEMPLATE_VARIABLE}: is it VideoAlign's {TEMPLATE_FILE}?")
        else:
            text = path.read_text(encoding="utf-8")
        problems = [t for t in (TEMPLATE_PLACEHOLDER, *SPECIAL_TOKENS) if text.count(t) != 1]
        if problems:
            raise ValueError(f"the VideoAlign prompt template {path} must contain each of {problems} exactly once")
        if hashlib.sha256(text.encode()).hexdigest() != TEMPLATE_SHA256:
            warnings.warn(
                f"the VideoAlign prompt template {path} differs from the released one (sha256 "
                f"{TEMPLATE_SHA256[:12]}...); the released checkpoint was trained on that text, scores may be off",
                stacklevel=3,
            )
        return text
    raise MissingWeightsError(
        f"VideoAlign's prompt template not found (tried {', '.join(tried)}). Fetch {_FETCH_SOURCE} and put the "
        f"checkout at '{default_weights_path('VideoAlign')}', or pass its location as the reward's "
        f"prompt_template kwarg (reward.rewards: [{{name: videoalign, kwargs: {{prompt_template: <path>}}}}])."
    )


def build_prompt(prompt: str, template: str) -> str:
    """The evaluation text: `template` (load_prompt_template) with the user prompt inserted."""
    return template.replace(TEMPLATE_PLACEHOLDER, prompt)


def chat_text(prompt: str, num_video_tokens: int, template: str) -> str:
    """What Qwen2-VL's chat template makes of one user turn [video, text] plus the generation prompt, with
    the video placeholder already expanded to one <|video_pad|> per merged video token."""
    return (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
        f"<|vision_start|>{'<|video_pad|>' * num_video_tokens}<|vision_end|>{build_prompt(prompt, template)}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def smart_resize(
    height: int, width: int, *, factor: int = 28, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Qwen2-VL's frame size: sides multiples of `factor`, area in [min_pixels, max_pixels], aspect kept."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"frame aspect ratio must be below 200, got {height}x{width}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def frame_indices(total: int, *, video_fps: float, fps: float | None, num_frames: int | None) -> list[int]:
    """VideoAlign's uniform sampling: an even number of frames (fps-based, at least 4) over the video."""
    if num_frames is not None:
        n = round(num_frames / FRAME_FACTOR) * FRAME_FACTOR
    else:
        lo = math.ceil(MIN_FRAMES / FRAME_FACTOR) * FRAME_FACTOR
        hi = math.floor(min(MAX_FRAMES, total) / FRAME_FACTOR) * FRAME_FACTOR
        n = round(min(max(total / video_fps * fps, lo), hi) / FRAME_FACTOR) * FRAME_FACTOR
    n = min(n, total)
    if not FRAME_FACTOR <= n <= total:
        raise ValueError(
            f"VideoAlign needs at least {FRAME_FACTOR} frames per video, got {total} (sampling {n})"
        )
    return torch.linspace(0, total - 1, n).round().long().tolist()


def patchify(frames: torch.Tensor, *, patch_size: int, temporal_patch_size: int, merge_size: int):
    """[T, C, H, W] normalised frames -> (patches [gt * gh * gw, C * tps * ps * ps], (gt, gh, gw)), in
    Qwen2-VL's order: time, then merge blocks row-major, then the merge_size x merge_size patches inside."""
    t, c, h, w = frames.shape
    if t % temporal_patch_size:
        frames = torch.cat(
            [frames, frames[-1:].expand(temporal_patch_size - t % temporal_patch_size, -1, -1, -1)]
        )
        t = frames.shape[0]
    gt, gh, gw = t // temporal_patch_size, h // patch_size, w // patch_size
    if gh % merge_size or gw % merge_size:
        raise ValueError(f"frame size {h}x{w} must be a multiple of patch_size * merge_size")
    x = frames.reshape(
        gt,
        temporal_patch_size,
        c,
        gh // merge_size,
        merge_size,
        patch_size,
        gw // merge_size,
        merge_size,
        patch_size,
    )
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # gt, bh, bw, mh, mw, C, tps, ps, ps
    return x.reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size), (gt, gh, gw)


# ------------------------------------------------------------------------------------- checkpoint keys

_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


def _canonical(key: str) -> str | None:
    """Checkpoint key -> name relative to a (>= 4.52) Qwen2VLModel ("visual.*", "language_model.*"), or
    "rm_head.weight"; None for keys that are dropped (the language-model head). Accepts the PEFT wrapper
    prefix and both the old (visual.*, model.*) and the new (model.visual.*, model.language_model.*) layouts."""
    key = key.removeprefix("base_model.model.")
    if key.startswith(("lm_head.", "model.lm_head.")):
        return None
    if key.startswith("rm_head."):
        return key
    for prefix in ("model.visual.", "model.language_model."):
        if key.startswith(prefix):
            return key.removeprefix("model.")
    if key.startswith("visual."):
        return key
    if key.startswith("model."):
        return "language_model." + key.removeprefix("model.")
    if key.startswith("language_model."):
        return key
    raise ValueError(f"unexpected key {key!r} in the VideoAlign checkpoint")


def merge_checkpoint(
    state_dict: Mapping[str, torch.Tensor],
    *,
    lora_scale: float,
    base: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Canonical names, LoRA merged (W = W0 + lora_scale * B @ A, in float32), lm_head dropped.

    state_dict: the reward model's state dict (full PEFT layout, or a LoRA-only adapter + non-LoRA part);
    base: base-model weights for LoRA-only checkpoints (any layout _canonical accepts).
    """
    plain: dict[str, torch.Tensor] = {}
    lora: dict[str, dict[str, torch.Tensor]] = {}
    for source in (base or {}), state_dict:
        for key, value in source.items():
            k = key.replace(".modules_to_save.default.", ".")
            if ".original_module." in k:
                continue
            m = _LORA.match(k)
            if m:
                name = _canonical(m["module"])
                if name is not None:
                    lora.setdefault(name, {})[m["ab"]] = value
                continue
            if ".lora_" in k:
                raise ValueError(f"unsupported LoRA tensor {key!r} (only LoRA on linear layers is supported)")
            k = k.replace(".base_layer.", ".")
            name = _canonical(k)
            if name is not None:
                plain[name] = value  # the reward checkpoint, read second, overrides base weights
    for module, ab in lora.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"LoRA of {module!r} lacks lora_{'A' if 'A' not in ab else 'B'}")
        wkey = f"{module}.weight"
        if wkey not in plain:
            raise ValueError(f"LoRA targets {module!r} but the checkpoint has no base weight {wkey!r}")
        w = plain[wkey]
        delta = ab["B"].float() @ ab["A"].float()
        if delta.shape != w.shape:
            raise ValueError(
                f"LoRA delta of {module!r} has shape {tuple(delta.shape)}, weight {tuple(w.shape)}"
            )
        plain[wkey] = (w.float() + lora_scale * delta).to(w.dtype)
    return plain


def _base_weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise MissingWeightsError(
            f"this VideoAlign checkpoint holds LoRA weights only and needs the Qwen2-VL base weights, but "
            f"{folder} has no *.safetensors. Download {_DOWNLOAD_BASE} with its weights into {folder}."
        )
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_tensor_file(f))
    return sd


# ---------------------------------------------------------------------------------------------- reward


class _RewardModel(nn.Module):
    """Qwen2VLModel (vision tower + language model) and VideoAlign's bias-free reward head."""

    def __init__(self, backbone: nn.Module, hidden_size: int, output_dim: int):
        super().__init__()
        self.model = backbone
        self.rm_head = nn.Linear(hidden_size, output_dim, bias=False)


class VideoAlign:
    """VideoAlign reward: {"VQ", "MQ", "TA", "Overall"} per video; the total uses VQ + MQ + TA.

    checkpoint: the VideoReward folder (default $ARCOPO_WEIGHTS/VideoReward). base_model: a Qwen2-VL-2B-
    Instruct folder (default $ARCOPO_WEIGHTS/Qwen2-VL-2B-Instruct when it exists). checkpoint_step: which
    checkpoint-<step> (default: the latest). video_fps: frame rate of the videos passed in (Self-Forcing:
    16). normalize: apply the calibration of inference_config. fps / num_frames / max_pixels / min_pixels:
    override the checkpoint's sampling (defaults: its data_config). dtype: "auto" = bf16 on CUDA, fp32 on
    CPU. batch_size: videos per forward pass. prompt_template: where VideoAlign's evaluation prompt is read
    from (load_prompt_template: a VideoAlign checkout, its prompt_template.py, or a text file; default
    $ARCOPO_WEIGHTS/VideoAlign, then an importable prompt_template module).
    """

    name = "videoalign"
    weights = {"VQ": 1.0, "MQ": 1.0, "TA": 1.0}

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        base_model: str | Path | None = None,
        *,
        checkpoint_step: int | None = None,
        video_fps: float = 16.0,
        normalize: bool = False,
        fps: float | None = None,
        num_frames: int | None = None,
        max_pixels: int | None = None,
        min_pixels: int = VIDEO_MIN_PIXELS,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "auto",
        attn_implementation: str = "sdpa",
        batch_size: int = 4,
        prompt_template: str | Path | None = None,
    ):
        from transformers import AutoConfig, AutoTokenizer

        if fps is not None and num_frames is not None:
            raise ValueError("pass at most one of fps and num_frames")
        if not (isinstance(video_fps, (int, float)) and video_fps > 0):
            raise ValueError(f"video_fps must be a positive number, got {video_fps!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)

        root = require_path(
            checkpoint or default_weights_path("VideoReward"),
            what="VideoAlign (VideoReward) checkpoint",
            download=_DOWNLOAD_CKPT,
            expect="model_config.json and checkpoint-<step>/model.pth",
        )
        cfg_file = require_path(
            root / "model_config.json", what="VideoAlign model_config.json", download=_DOWNLOAD_CKPT
        )
        self.template = load_prompt_template(prompt_template)
        cfg = json.loads(cfg_file.read_text())
        data, mcfg = cfg.get("data_config") or {}, cfg.get("model_config") or {}
        peft, self.calibration = cfg.get("peft_lora_config") or {}, cfg.get("inference_config")
        self._check_config(data, mcfg, cfg_file)
        self.output_dim = int(mcfg.get("output_dim", 1))

        # Frame sampling: explicit arguments, else the checkpoint's data_config (num_frames wins over fps there).
        if fps is None and num_frames is None:
            num_frames = data.get("num_frames")
            fps = None if num_frames is not None else float(data.get("fps", 2.0))
        self.fps = fps
        self.num_frames = None if num_frames is None else int(num_frames)
        self.video_fps = float(video_fps)
        self.max_pixels = int(max_pixels or data.get("max_frame_pixels") or DEFAULT_MAX_PIXELS)
        self.min_pixels = int(min_pixels)
        self.normalize = bool(normalize)
        if self.normalize and not self.calibration:
            raise ValueError(
                f"normalize=True but {cfg_file} has no inference_config (calibration means / stds)"
            )
        self.batch_size = batch_size

        step_dir = self._step_dir(root, checkpoint_step)
        base_dir = self._base_dir(base_model, mcfg)

        # Qwen2-VL config: the base folder's, else one saved beside the checkpoint.
        candidates = [
            d for d in (base_dir, root, step_dir) if d is not None and (d / "config.json").is_file()
        ]
        if not candidates:
            raise MissingWeightsError(
                f"no Qwen2-VL config.json for the VideoAlign checkpoint {root}: download {_DOWNLOAD_BASE} to "
                f"'{default_weights_path('Qwen2-VL-2B-Instruct')}', or pass base_model=<folder>"
            )
        config = AutoConfig.from_pretrained(str(candidates[0]), local_files_only=True)
        if getattr(config, "model_type", None) != "qwen2_vl":
            raise ValueError(f"{candidates[0]}/config.json is a {config.model_type!r} config, not qwen2_vl")

        # Tokenizer: the one saved with the checkpoint (special tokens included), else the base one + tokens.
        tok_dir = step_dir / "tokenizer"
        if tok_dir.is_dir():
            tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        elif base_dir is not None:
            tokenizer = AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True)
            tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
        else:
            raise MissingWeightsError(
                f"no tokenizer: {tok_dir} is missing and no Qwen2-VL folder was found; download {_DOWNLOAD_CKPT}"
            )
        tokenizer.padding_side = "right"
        self.tokenizer = tokenizer
        self._check_chat_template()
        self.special_ids = self._token_ids(SPECIAL_TOKENS)
        (self.video_token_id,) = self._token_ids(("<|video_pad|>",))
        if self.video_token_id != config.video_token_id:
            raise ValueError(
                f"tokenizer's <|video_pad|> id {self.video_token_id} differs from config.video_token_id "
                f"{config.video_token_id}"
            )

        # Weights: full PEFT state dict, or LoRA adapter + non-LoRA parameters over the base weights.
        lora_scale = self._lora_scale(peft)
        full = step_dir / "model.pth"
        adapter, non_lora = step_dir / "adapter_model.safetensors", step_dir / "non_lora_state_dict.pth"
        if full.is_file():
            state = merge_checkpoint(load_tensor_file(full), lora_scale=lora_scale)
        elif adapter.is_file() and non_lora.is_file():
            if base_dir is None:
                raise MissingWeightsError(f"{step_dir} holds LoRA weights only; download {_DOWNLOAD_BASE}")
            sd = load_tensor_file(non_lora)
            sd.update(load_tensor_file(adapter))
            state = merge_checkpoint(sd, lora_scale=lora_scale, base=_base_weights(base_dir))
        else:
            raise MissingWeightsError(
                f"no VideoAlign weights in {step_dir}: expected model.pth (the released checkpoint) or "
                f"adapter_model.safetensors + non_lora_state_dict.pth. Download {_DOWNLOAD_CKPT}"
            )
        self.model = self._build_model(config, state, attn_implementation)
        if len(self.tokenizer) > self.vocab_size:
            raise ValueError(
                f"tokenizer has {len(self.tokenizer)} tokens but the checkpoint's embedding {self.vocab_size}"
            )
        self._pass_token_types = "mm_token_type_ids" in inspect.signature(self.model.model.forward).parameters

        # Vision preprocessing constants: the base preprocessor_config.json, else the vision config.
        vcfg = config.vision_config
        pre = {}
        if base_dir is not None and (base_dir / "preprocessor_config.json").is_file():
            pre = json.loads((base_dir / "preprocessor_config.json").read_text())
        self.patch_size = int(pre.get("patch_size", vcfg.patch_size))
        self.temporal_patch_size = int(pre.get("temporal_patch_size", vcfg.temporal_patch_size))
        self.merge_size = int(pre.get("merge_size", vcfg.spatial_merge_size))
        self.image_mean = tuple(pre.get("image_mean", OPENAI_CLIP_MEAN))
        self.image_std = tuple(pre.get("image_std", OPENAI_CLIP_STD))

    # ------------------------------------------------------------------------------------------ loading

    @staticmethod
    def _check_config(data: Mapping[str, Any], mcfg: Mapping[str, Any], where: Path) -> None:
        problems = []
        if mcfg.get("reward_token", "special") != "special" or not mcfg.get("use_special_tokens", True):
            problems.append("model_config must use the special-token reward head (reward_token 'special')")
        if int(mcfg.get("output_dim", 1)) not in (1, 3):
            problems.append(f"model_config.output_dim must be 1 or 3, got {mcfg.get('output_dim')}")
        if data.get("prompt_template_type", "detailed_special") != "detailed_special":
            problems.append(
                f"prompt_template_type {data.get('prompt_template_type')!r} (only 'detailed_special')"
            )
        eval_dim = data.get("eval_dim", list(SCORE_NAMES))
        if list(eval_dim if isinstance(eval_dim, list) else [eval_dim]) != list(SCORE_NAMES):
            problems.append(f"eval_dim {eval_dim!r} (only ['VQ', 'MQ', 'TA'])")
        if data.get("sample_type", "uniform") != "uniform":
            problems.append(f"sample_type {data.get('sample_type')!r} (only 'uniform')")
        if problems:
            raise ValueError(f"unsupported VideoAlign checkpoint config {where}: " + "; ".join(problems))

    @staticmethod
    def _step_dir(root: Path, step: int | None) -> Path:
        found = {}
        for p in glob.glob(str(root / "checkpoint-*")):
            suffix = p.rpartition("checkpoint-")[2]
            if suffix.isdigit() and Path(p).is_dir():
                found[int(suffix)] = Path(p)
        if not found:
            raise MissingWeightsError(
                f"no checkpoint-<step> folder in {root}; the download looks incomplete. Download {_DOWNLOAD_CKPT}"
            )
        if step is None:
            return found[max(found)]
        if step not in found:
            raise ValueError(f"checkpoint_step {step} not in {root}: available {sorted(found)}")
        return found[step]

    @staticmethod
    def _base_dir(base_model: str | Path | None, mcfg: Mapping[str, Any]) -> Path | None:
        if base_model is not None:
            return require_path(base_model, what="Qwen2-VL base model folder", download=_DOWNLOAD_BASE)
        # The default folder, else the training-time base model name if it is a local folder.
        names = [default_weights_path("Qwen2-VL-2B-Instruct")]
        if mcfg.get("model_name_or_path"):
            names.append(Path(str(mcfg["model_name_or_path"])))
        for cand in names:
            if cand.is_dir() and (cand / "config.json").is_file():
                return cand
        return None

    @staticmethod
    def _lora_scale(peft: Mapping[str, Any]) -> float:
        if not peft.get("lora_enable", True):
            return 0.0
        r, alpha = float(peft.get("lora_r", 16)), float(peft.get("lora_alpha", 32))
        return alpha / math.sqrt(r) if peft.get("use_rslora", False) else alpha / r

    def _check_chat_template(self) -> None:
        """Warn if the tokenizer ships a chat template that renders differently from `chat_text` (the text
        is built here so that no template is needed; this catches a mismatch with a real checkpoint)."""
        template = getattr(self.tokenizer, "chat_template", None)
        if not template:
            return
        text = build_prompt("PROMPT", self.template)
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]
        try:
            rendered = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        except Exception:  # noqa: BLE001 - a template we cannot render is not worth failing over
            return
        if rendered != chat_text("PROMPT", 1, self.template):
            warnings.warn(
                "the VideoAlign tokenizer's chat template renders the prompt differently from the built-in "
                f"Qwen2-VL text; scores may be off. Template output starts {rendered[:160]!r}",
                stacklevel=3,
            )

    def _token_ids(self, tokens: Sequence[str]) -> tuple[int, ...]:
        vocab = self.tokenizer.get_vocab()
        missing = [t for t in tokens if t not in vocab]
        if missing:
            raise ValueError(f"the VideoAlign tokenizer lacks the tokens {missing}")
        return tuple(int(vocab[t]) for t in tokens)

    def _build_model(
        self, config: Any, state: dict[str, torch.Tensor], attn_implementation: str
    ) -> _RewardModel:
        import transformers
        from transformers import Qwen2VLModel

        embed = state.get("language_model.embed_tokens.weight")
        head = state.get("rm_head.weight")
        if embed is None or head is None:
            raise ValueError(
                "the VideoAlign checkpoint lacks the token embedding or the reward head (rm_head)"
            )
        self.vocab_size = int(embed.shape[0])
        text_cfg = getattr(config, "text_config", config)
        text_cfg.vocab_size = self.vocab_size  # the checkpoint resized the embedding to the tokenizer
        if hasattr(config, "vocab_size"):
            config.vocab_size = self.vocab_size
        if head.shape != (self.output_dim, text_cfg.hidden_size):
            raise ValueError(
                f"rm_head has shape {tuple(head.shape)}, expected ({self.output_dim}, {text_cfg.hidden_size})"
            )
        dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        with torch.device(self.device):
            backbone = Qwen2VLModel._from_config(
                config, attn_implementation=attn_implementation, **{dtype_kw: self.dtype}
            )
            model = _RewardModel(backbone, text_cfg.hidden_size, self.output_dim).to(self.dtype)
        if not (hasattr(backbone, "visual") and hasattr(backbone, "language_model")):
            raise RuntimeError(
                f"transformers {transformers.__version__} has the old Qwen2-VL layout; VideoAlign needs >= 4.52"
            )
        target = {f"model.{k}" if k != "rm_head.weight" else k: v for k, v in state.items()}
        expected = set(model.state_dict())
        missing, unexpected = sorted(expected - set(target)), sorted(set(target) - expected)
        if missing or unexpected:
            raise ValueError(
                f"the VideoAlign checkpoint does not fit Qwen2-VL: missing {missing[:8]} ({len(missing)}), "
                f"unexpected {unexpected[:8]} ({len(unexpected)})"
            )
        model.load_state_dict(target, strict=True)
        return model.eval().requires_grad_(False)

    # ------------------------------------------------------------------------------------------ scoring

    def _prepare(self, videos: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        b, f, _, h, w = videos.shape
        idx = frame_indices(f, video_fps=self.video_fps, fps=self.fps, num_frames=self.num_frames)
        factor = self.patch_size * self.merge_size
        rh, rw = smart_resize(h, w, factor=factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        x = videos[:, idx].to(self.device, torch.float32).clamp(0, 1).mul(255).round()  # 8-bit frames
        if (rh, rw) != (h, w):
            x = F.interpolate(
                x.flatten(0, 1), size=(rh, rw), mode="bicubic", align_corners=False, antialias=True
            )
            x = x.clamp(0, 255).round().unflatten(0, (b, len(idx)))
        mean = torch.tensor(self.image_mean, device=self.device).view(1, 1, 3, 1, 1)
        std = torch.tensor(self.image_std, device=self.device).view(1, 1, 3, 1, 1)
        x = (x / 255.0 - mean) / std
        patches, grids = [], []
        for i in range(b):
            p, grid = patchify(
                x[i],
                patch_size=self.patch_size,
                temporal_patch_size=self.temporal_patch_size,
                merge_size=self.merge_size,
            )
            patches.append(p)
            grids.append(grid)
        n_tokens = grids[0][0] * grids[0][1] * grids[0][2] // self.merge_size**2
        texts = [chat_text(p, n_tokens, self.template) for p in prompts]
        tok = self.tokenizer(texts, padding=True, return_tensors="pt")
        return {
            "input_ids": tok["input_ids"].to(self.device),
            "attention_mask": tok["attention_mask"].to(self.device),
            "pixel_values_videos": torch.cat(patches).to(self.dtype),
            "video_grid_thw": torch.tensor(grids, dtype=torch.long, device=self.device),
        }

    @torch.no_grad()
    def raw_scores(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Uncalibrated [B, 3] scores (VQ, MQ, TA) for videos [B, F, 3, H, W] in [0, 1]."""
        out = []
        for start in range(0, videos.shape[0], self.batch_size):
            batch = self._prepare(
                videos[start : start + self.batch_size], prompts[start : start + self.batch_size]
            )
            ids = batch["input_ids"]
            kwargs = dict(batch, use_cache=False)
            if self._pass_token_types:  # transformers >= 5 computes M-RoPE positions from token types
                kwargs["mm_token_type_ids"] = (ids == self.video_token_id).to(torch.int32) * 2
            hidden = self.model.model(**kwargs)
            hidden = hidden.last_hidden_state if hasattr(hidden, "last_hidden_state") else hidden[0]
            rows = torch.arange(ids.shape[0], device=ids.device)
            scores = []
            for k, token_id in enumerate(self.special_ids):
                mask = ids == token_id
                counts = mask.sum(1)
                if not bool((counts == 1).all()):
                    raise ValueError(
                        f"{SPECIAL_TOKENS[k]} must occur once per prompt, counts {counts.tolist()} "
                        "(does a prompt contain the token text?)"
                    )
                logits = self.model.rm_head(hidden[rows, mask.int().argmax(1)])  # [b, output_dim]
                scores.append(logits[:, 0] if self.output_dim == 1 else logits[:, k])
            out.append(torch.stack(scores, dim=1).float())
        return torch.cat(out)

    def __call__(self, videos: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        raw = self.raw_scores(videos, list(prompts))
        result = {}
        for k, name in enumerate(SCORE_NAMES):
            s = raw[:, k]
            if self.normalize:
                s = (s - float(self.calibration[f"{name}_mean"])) / float(self.calibration[f"{name}_std"])
            result[name] = s.to(videos.device)
        result["Overall"] = result["VQ"] + result["MQ"] + result["TA"]
        return result
