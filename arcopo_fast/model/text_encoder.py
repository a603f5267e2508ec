"""umT5 text encoder (transformers UMT5EncoderModel + tokenizer) as Wan uses it, with an on-disk cache.

Wan/Self-Forcing: clean the prompt (ftfy when installed, HTML unescape, collapse whitespace), tokenize with
padding to text_len (512) and truncation, run the encoder with the attention mask, then ZERO the embeddings
past each prompt's length. The DiT cross-attends to all text_len positions without a mask.

Everything is loaded from local paths (local_files_only=True). The encoder is loaded lazily: a batch whose
prompts are all in the cache never loads it.

Cache: one safetensors file per (encoder identity, prompt) holding the prompt's valid rows [len, dim];
the identity hashes the resolved paths, the encoder's config.json, the weight files' names/sizes/mtimes,
text_len and the compute dtype.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["TextEncoder", "clean_prompt", "resolve_text_encoder_paths"]


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning (basic_clean + whitespace_clean)."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:  # ftfy only repairs mojibake; plain prompts are unchanged without it
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def _has_tokenizer(p: Path) -> bool:
    return any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "spiece.model"))


def resolve_text_encoder_paths(
    path: str | Path, tokenizer_path: str | Path | None = None
) -> tuple[Path, Path]:
    """(encoder folder, tokenizer folder). Accepts an encoder folder that holds its tokenizer, a diffusers
    pipeline root (text_encoder/ + tokenizer/), or its text_encoder/ folder (tokenizer/ beside it)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"text encoder folder not found: {path}")
    if not (path / "config.json").exists() and (path / "text_encoder" / "config.json").exists():
        path = path / "text_encoder"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no config.json in the text encoder folder {path}")
    if tokenizer_path is None:
        for cand in (path, path.parent / "tokenizer"):
            if _has_tokenizer(cand):
                tokenizer_path = cand
                break
        else:
            raise FileNotFoundError(
                f"no tokenizer in {path} or {path.parent / 'tokenizer'}; pass tokenizer_path"
            )
    tokenizer_path = Path(tokenizer_path).expanduser()
    if not tokenizer_path.exists():
        raise FileNotFoundError(f"tokenizer folder not found: {tokenizer_path}")
    return path.resolve(), tokenizer_path.resolve()


class TextEncoder:
    """encode(prompts) -> [B, text_len, dim] embeddings, padding rows zero.

    path: local folder (see resolve_text_encoder_paths). dtype: the encoder's compute dtype (umT5-XXL:
    bfloat16); outputs are returned in out_dtype (default: dtype) on `device`. cache_dir: on-disk cache of
    prompt embeddings (None: off). encoder_runs counts actual encoder forwards (for tests and logs).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        tokenizer_path: str | Path | None = None,
        text_len: int = 512,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        out_dtype: torch.dtype | None = None,
        cache_dir: str | Path | None = None,
        batch_size: int = 16,
    ):
        if text_len < 1:
            raise ValueError(f"text_len must be >= 1, got {text_len}")
        self.path, self.tokenizer_path = resolve_text_encoder_paths(path, tokenizer_path)
        self.text_len = text_len
        self.device = torch.device(device)
        self.dtype = dtype
        self.out_dtype = out_dtype or dtype
        self.batch_size = batch_size
        self.config = json.loads((self.path / "config.json").read_text())
        self.dim = int(self.config["d_model"])
        self.cache_dir = None if cache_dir is None else Path(cache_dir).expanduser() / self.identity[:20]
        self.encoder_runs = 0
        self._model = None
        self._tokenizer = None
        self._owned = True  # loaded from `path` by _load (release() may drop it)

    @classmethod
    def from_modules(
        cls,
        model,
        tokenizer,
        *,
        text_len: int = 512,
        out_dtype: torch.dtype | None = None,
        batch_size: int = 16,
    ) -> TextEncoder:
        """Wrap an already loaded encoder (a transformers UMT5EncoderModel, e.g. a diffusers WanPipeline's
        text_encoder) and its tokenizer, without copying them: the encoder runs where it lives, in its
        dtype. No on-disk cache (there is no file identity to key it on)."""
        if text_len < 1:
            raise ValueError(f"text_len must be >= 1, got {text_len}")
        self = cls.__new__(cls)
        self.path = self.tokenizer_path = None
        self.text_len, self.batch_size = text_len, batch_size
        self.config = model.config.to_dict()
        self.dim = int(model.config.d_model)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.out_dtype = out_dtype or self.dtype
        self.cache_dir = None
        self.encoder_runs = 0
        self._model, self._tokenizer, self._owned = model.eval(), tokenizer, False
        return self

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextEncoder:
        """Move the encoder (and its outputs) to `device`; dtype sets the output dtype."""
        if device is not None:
            self.device = torch.device(device)
            if self._model is not None:
                self._model.to(self.device)
        if dtype is not None:
            self.out_dtype = dtype
        return self

    # -- identity and cache ----------------------------------------------------------------------------

    @property
    def identity(self) -> str:
        """Hash of everything that determines the embeddings (but the prompt)."""
        weights = sorted(
            (f.name, f.stat().st_size, f.stat().st_mtime_ns)
            for f in self.path.iterdir()
            if f.suffix in (".safetensors", ".bin", ".pth", ".pt") or f.name.endswith(".index.json")
        )
        tok_files = sorted(
            (f.name, f.stat().st_size, f.stat().st_mtime_ns)
            for f in self.tokenizer_path.iterdir()
            if f.is_file()
        )
        ident = dict(
            path=str(self.path),
            tokenizer=str(self.tokenizer_path),
            config=self.config,
            weights=weights,
            tokenizer_files=tok_files,
            text_len=self.text_len,
            dtype=str(self.dtype),
        )
        return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()

    def _cache_file(self, prompt: str) -> Path:
        return self.cache_dir / f"{hashlib.sha256(prompt.encode()).hexdigest()[:40]}.safetensors"

    def _cache_get(self, prompt: str) -> torch.Tensor | None:
        if self.cache_dir is None:
            return None
        f = self._cache_file(prompt)
        if not f.exists():
            return None
        from safetensors import safe_open

        with safe_open(str(f), framework="pt") as fh:
            if (fh.metadata() or {}).get("prompt") != prompt:  # hash collision or foreign file
                return None
            return fh.get_tensor("emb")

    def _cache_put(self, prompt: str, emb: torch.Tensor) -> None:
        from safetensors.torch import save_file

        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, suffix=".tmp")
        os.close(fd)
        try:
            save_file({"emb": emb.detach().cpu().contiguous()}, tmp, metadata={"prompt": prompt})
            os.replace(tmp, self._cache_file(prompt))  # atomic: concurrent writers never expose half a file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    # -- model -------------------------------------------------------------------------------------------

    def _load(self) -> None:
        if self._model is not None:
            return
        import transformers
        from transformers import AutoTokenizer, UMT5EncoderModel

        self._tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer_path), local_files_only=True)
        # transformers >= 4.56 takes dtype=, older versions torch_dtype=.
        major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
        kw = {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": self.dtype}
        model = UMT5EncoderModel.from_pretrained(str(self.path), local_files_only=True, **kw)
        self._model = model.to(self.device).eval().requires_grad_(False)

    def release(self) -> None:
        """Free the encoder (umT5-XXL is ~11 GB in bf16); it is reloaded on the next cache miss. An encoder
        given to from_modules belongs to the caller and is kept."""
        if self._owned:
            self._model = self._tokenizer = None

    @torch.no_grad()
    def _run(self, prompts: list[str]) -> list[torch.Tensor]:
        """Valid rows [len_i, dim] of each prompt (encoder dtype, on device)."""
        self._load()
        tok = self._tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=self.text_len,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids, mask = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)
        hidden = self._model(input_ids=ids, attention_mask=mask).last_hidden_state
        self.encoder_runs += 1
        lens = mask.sum(dim=1).tolist()  # host sync: fine here, once per prompt batch outside the hot loop
        return [h[:n] for h, n in zip(hidden, lens)]

    # -- public ------------------------------------------------------------------------------------------

    def encode(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """[B, text_len, dim] embeddings in out_dtype on device; rows past each prompt's length are zero."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("prompts must be a non-empty list of strings")
        cleaned = [clean_prompt(p) for p in prompts]
        rows: dict[str, torch.Tensor] = {}
        for p in dict.fromkeys(cleaned):
            hit = self._cache_get(p)
            if hit is not None:
                rows[p] = hit
        todo = [p for p in dict.fromkeys(cleaned) if p not in rows]
        for i in range(0, len(todo), self.batch_size):
            batch = todo[i : i + self.batch_size]
            for p, emb in zip(batch, self._run(batch)):
                rows[p] = emb
                if self.cache_dir is not None:
                    self._cache_put(p, emb)
        out = torch.zeros(len(cleaned), self.text_len, self.dim, dtype=self.out_dtype, device=self.device)
        for i, p in enumerate(cleaned):
            r = rows[p]
            out[i, : r.shape[0]] = r.to(device=self.device, dtype=self.out_dtype)
        return out

    __call__ = encode
