"""CLIP-family rewards, applied per frame and averaged: CLIP score, PickScore and HPSv2.

Each samples `num_frames` frames evenly from each video, embeds them with a transformers `CLIPModel`,
embeds the prompt, and averages the per-frame score (scale * cosine similarity) into one score per video.
Everything is read from local folders (nothing is downloaded):

    ClipScore   score = 100 * cos(image, text)             any HF CLIP folder (default openai/clip-vit-large-patch14)
    PickScore   score = logit_scale.exp() * cos(image, text)  yuvalkirstain/PickScore_v1 (a CLIP-H) with the
                                                           processor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K
    HPSv2       score = cos(image, text)                   HPS_v2(.1)_compressed.pt from xswu/HPSv2: an open_clip
                                                           ViT-H-14 state dict, converted on load into a
                                                           transformers CLIPModel (same architecture) built from
                                                           the laion/CLIP-ViT-H-14-laion2B-s32B-b79K config

Preprocessing runs on the reward's device in torch (no PIL round trip): shortest side resized with
antialiased bicubic and centre-cropped (CLIP, PickScore), or longest side resized and zero-padded to a
square (HPSv2's evaluation transform), then normalised with the processor's mean and std.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .base import (
    MissingWeightsError,
    default_weights_path,
    load_tensor_file,
    require_path,
    resolve_device,
    resolve_dtype,
    sample_frame_indices,
)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _read_image_config(folder: Path, default_size: int) -> dict[str, Any]:
    """Resize / crop / normalisation settings from preprocessor_config.json (defaults: CLIP's)."""
    cfg: dict[str, Any] = {}
    f = folder / "preprocessor_config.json"
    if f.is_file():
        cfg = json.loads(f.read_text())
    size = cfg.get("size", default_size)
    if isinstance(size, Mapping):
        size = size.get("shortest_edge", size.get("height", default_size))
    crop = cfg.get("crop_size", size)
    if isinstance(crop, Mapping):
        crop = crop.get("height", size)
    return {
        "size": int(size),
        "crop": int(crop),
        "mean": tuple(cfg.get("image_mean", OPENAI_CLIP_MEAN)),
        "std": tuple(cfg.get("image_std", OPENAI_CLIP_STD)),
    }


def preprocess_frames(
    frames: torch.Tensor,
    *,
    size: int,
    crop: int,
    mean: Sequence[float],
    std: Sequence[float],
    mode: str = "shortest",
) -> torch.Tensor:
    """[N, 3, H, W] in [0, 1] -> normalised [N, 3, crop, crop] (mode "shortest": resize + centre crop;
    "longest": resize the longest side to `crop` and zero-pad to a square, black before normalisation)."""
    x = frames.float()
    h, w = x.shape[-2:]
    if mode == "shortest":
        # Same rounding as CLIPImageProcessor: the short side becomes `size`, the long side int(size * long / short).
        nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(
                0, 1
            )
        top, left = (nh - crop) // 2, (nw - crop) // 2
        if top < 0 or left < 0:
            x = F.pad(x, (max(0, -left), max(0, crop - nw + left), max(0, -top), max(0, crop - nh + top)))
            top, left = max(top, 0), max(left, 0)
        x = x[..., top : top + crop, left : left + crop]
    elif mode == "longest":
        scale = crop / max(h, w)
        nh, nw = round(h * scale), round(w * scale)
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(
                0, 1
            )
        ph, pw = crop - nh, crop - nw
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
    else:
        raise ValueError(f"resize mode must be 'shortest' or 'longest', got {mode!r}")
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def _pooled(out: Any) -> torch.Tensor:
    # transformers 4.x and 5.x both return an output with pooler_output (index 1 as a tuple).
    return out.pooler_output if hasattr(out, "pooler_output") else out[1]


class ClipFrameReward:
    """Base of the CLIP-family rewards: scale * cos(image, text), averaged over sampled frames.

    model_path: folder of a transformers CLIPModel. processor_path: folder with the tokenizer and
    preprocessor_config.json (default: model_path). num_frames: frames sampled per video.
    scale: multiplies the cosine (None: the model's logit_scale.exp()). dtype: "auto" (bf16 on CUDA,
    fp32 on CPU) or a dtype name. batch_size: frames per forward pass.
    """

    weights = {"score": 1.0}
    resize_mode = "shortest"
    _download: dict[str, str] = {}

    def __init__(
        self,
        model_path: str | Path,
        processor_path: str | Path | None = None,
        *,
        num_frames: int = 4,
        scale: float | None = 100.0,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "auto",
        batch_size: int = 32,
        model: Any = None,
    ):
        from transformers import AutoTokenizer

        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        processor_path = Path(processor_path if processor_path is not None else model_path)
        if model is None:
            model_path = require_path(
                model_path, what=f"{type(self).__name__} weights", **self._download_for("model")
            )
            model = self._load_model(Path(model_path))
        processor_path = require_path(
            processor_path,
            what=f"{type(self).__name__} tokenizer/processor",
            **self._download_for("processor"),
        )
        self.model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(str(processor_path), local_files_only=True)
        vcfg = self.model.config.vision_config
        self.image_cfg = _read_image_config(processor_path, int(vcfg.image_size))
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        self.num_frames = num_frames
        self.scale = scale
        self.batch_size = batch_size

    def _download_for(self, which: str) -> dict[str, str]:
        d = self._download.get(which)
        if d is None:
            return {
                "download": "the transformers CLIPModel folder (config.json, weights, tokenizer, preprocessor_config.json)"
            }
        return {"download": d, "expect": "config.json, the weights and the tokenizer files"}

    def _load_model(self, path: Path) -> Any:
        from transformers import CLIPModel

        return CLIPModel.from_pretrained(str(path), local_files_only=True)

    @torch.no_grad()
    def embed_text(self, prompts: Sequence[str]) -> torch.Tensor:
        tok = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        out = self.model.text_model(input_ids=tok["input_ids"], attention_mask=tok.get("attention_mask"))
        return F.normalize(self.model.text_projection(_pooled(out)).float(), dim=-1)

    @torch.no_grad()
    def embed_images(self, frames: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [0, 1] -> unit-norm image embeddings [N, E] (float32)."""
        embs = []
        for chunk in frames.split(self.batch_size):
            px = preprocess_frames(chunk.to(self.device), mode=self.resize_mode, **self.image_cfg).to(
                self.dtype
            )
            out = self.model.vision_model(pixel_values=px)
            embs.append(self.model.visual_projection(_pooled(out)).float())
        return F.normalize(torch.cat(embs), dim=-1)

    @torch.no_grad()
    def __call__(self, videos: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        b = videos.shape[0]
        idx = sample_frame_indices(videos.shape[1], self.num_frames)
        frames = videos[:, idx].flatten(0, 1)  # [B * n, 3, H, W], video-major
        img = self.embed_images(frames).view(b, len(idx), -1)
        txt = self.embed_text(prompts)
        cos = (img * txt[:, None]).sum(-1).mean(1)  # [B]
        scale = float(self.model.logit_scale.exp()) if self.scale is None else self.scale
        return {"score": (scale * cos).float().to(videos.device)}


class ClipScore(ClipFrameReward):
    """CLIP score: 100 * cosine(frame, prompt) averaged over frames (no clamp at 0)."""

    name = "clip_score"
    _download = {
        "model": "openai/clip-vit-large-patch14 (huggingface-cli download openai/clip-vit-large-patch14 --local-dir <path>)"
    }

    def __init__(
        self, model_path: str | Path | None = None, processor_path: str | Path | None = None, **kw: Any
    ):
        kw.setdefault("scale", 100.0)
        super().__init__(model_path or default_weights_path("clip-vit-large-patch14"), processor_path, **kw)


class PickScore(ClipFrameReward):
    """PickScore: logit_scale.exp() * cosine (about 100 * cos), averaged over frames."""

    name = "pickscore"
    _download = {
        "model": "yuvalkirstain/PickScore_v1 (huggingface-cli download yuvalkirstain/PickScore_v1 --local-dir <path>)",
        "processor": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K's tokenizer and preprocessor files (huggingface-cli "
        "download laion/CLIP-ViT-H-14-laion2B-s32B-b79K --exclude '*.bin' '*.safetensors' --local-dir <path>)",
    }

    def __init__(
        self, model_path: str | Path | None = None, processor_path: str | Path | None = None, **kw: Any
    ):
        kw.setdefault("scale", None)
        super().__init__(
            model_path or default_weights_path("PickScore_v1"),
            processor_path or default_weights_path("CLIP-ViT-H-14-laion2B-s32B-b79K"),
            **kw,
        )


# ------------------------------------------------------------------------------------------------ HPSv2


def open_clip_to_hf_clip(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an open_clip CLIP (ViT image tower, standard text tower) state dict to transformers CLIPModel
    names. Fused attention in_proj weights are split into q/k/v; projections are transposed."""
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    out: dict[str, torch.Tensor] = {}
    block = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
    sub = {
        "ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
        "attn.out_proj": "self_attn.out_proj",
    }  # fmt: skip
    simple = {
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
        "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight",
        "ln_final.bias": "text_model.final_layer_norm.bias",
        "logit_scale": "logit_scale",
    }
    for key, value in sd.items():
        if key in simple:
            out[simple[key]] = value
        elif key == "visual.proj":
            out["visual_projection.weight"] = value.t().contiguous()
        elif key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()
        elif key == "attn_mask":
            continue  # the causal mask buffer; transformers builds its own
        elif m := block.match(key):
            tower = "vision_model" if m.group(1) else "text_model"
            prefix, rest = f"{tower}.encoder.layers.{m.group(2)}.", m.group(3)
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = "weight" if rest.endswith("weight") else "bias"
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{name}.{kind}"] = part.contiguous()
                continue
            module, _, param = rest.rpartition(".")
            if module not in sub:
                raise ValueError(
                    f"open_clip key {key!r} has no transformers CLIP equivalent (module {module!r})"
                )
            out[f"{prefix}{sub[module]}.{param}"] = value
        else:
            raise ValueError(f"open_clip key {key!r} has no transformers CLIP equivalent")
    return out


class HPSv2(ClipFrameReward):
    """Human Preference Score v2 / v2.1: cosine(frame, prompt) of the HPS-tuned open_clip ViT-H-14, averaged.

    checkpoint: HPS_v2.1_compressed.pt (or HPS_v2_compressed.pt) from the Hugging Face repo xswu/HPSv2.
    clip_path: folder of laion/CLIP-ViT-H-14-laion2B-s32B-b79K: its config.json, tokenizer and
    preprocessor_config.json are used (its weights are not). The open_clip state dict is renamed into a
    transformers CLIPModel of that config (the architectures are identical).
    """

    name = "hpsv2"
    resize_mode = "longest"  # HPSv2 scores with ResizeMaxSize(224) + zero padding

    def __init__(self, checkpoint: str | Path | None = None, clip_path: str | Path | None = None, **kw: Any):
        from transformers import CLIPConfig, CLIPModel

        kw.setdefault("scale", 1.0)
        checkpoint = require_path(
            checkpoint or default_weights_path("HPSv2/HPS_v2.1_compressed.pt"),
            what="HPSv2 checkpoint",
            download="HPS_v2.1_compressed.pt from the Hugging Face repo xswu/HPSv2 "
            "(huggingface-cli download xswu/HPSv2 HPS_v2.1_compressed.pt --local-dir <folder>)",
        )
        clip_path = require_path(
            clip_path or default_weights_path("CLIP-ViT-H-14-laion2B-s32B-b79K"),
            what="CLIP ViT-H-14 config/tokenizer folder for HPSv2",
            download="laion/CLIP-ViT-H-14-laion2B-s32B-b79K without its weights (huggingface-cli download "
            "laion/CLIP-ViT-H-14-laion2B-s32B-b79K --exclude '*.bin' '*.safetensors' --local-dir <path>)",
            expect="config.json and the tokenizer files",
        )
        raw = load_tensor_file(checkpoint)
        if "state_dict" in raw:
            raw = raw["state_dict"]
        if not isinstance(raw, Mapping):
            raise ValueError(f"{checkpoint}: expected an open_clip state dict (or {{'state_dict': ...}})")
        model = CLIPModel(CLIPConfig.from_pretrained(str(clip_path), local_files_only=True))
        converted = open_clip_to_hf_clip(raw)
        missing, unexpected = model.load_state_dict(converted, strict=False)
        # position_ids buffers are persistent in some transformers versions and absent from open_clip.
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ValueError(
                f"{checkpoint} does not fit the CLIP config in {clip_path}: missing {missing[:8]}, "
                f"unexpected {unexpected[:8]}"
            )
        super().__init__(clip_path, clip_path, model=model, **kw)


__all__ = [
    "ClipFrameReward",
    "ClipScore",
    "PickScore",
    "HPSv2",
    "MissingWeightsError",
    "open_clip_to_hf_clip",
    "preprocess_frames",
]
