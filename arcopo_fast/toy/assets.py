"""Where the toy world's shipped weights live, and the manifest that says how they were made.

arcopo_fast/toy/weights/
    text_encoder/            a random 2-layer UMT5 whose vocabulary holds every world word (TOY_WORDS)
    vae/                     the tiny Wan VAE (AutoencoderKLWan) the generator was trained through
    base_model.safetensors   the few-step streaming generator (`toy` preset of the causal Wan) + .json
    reward_{ta,vq,mq}.safetensors   the toy reward models (arcopo_fast.rewards.toy)
    prompts.txt              the default run's prompts (world scenes of a held-out seed)
    manifest.json            the command, seed, CPU/wall time per stage, and the sha256 of every file

All of it is rebuilt by `python -m arcopo_fast.toy build` (see build.py).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def weights_path(name: str, root: str | Path | None = None) -> Path:
    return Path(root or WEIGHTS_DIR) / name


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_hashes(root: str | Path) -> dict[str, str]:
    """sha256 of every file under root (relative paths), the manifest itself excluded."""
    root = Path(root)
    return {
        str(p.relative_to(root)): sha256(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "manifest.json" and "__pycache__" not in p.parts
    }


def read_prompts(root: str | Path | None = None) -> list[str]:
    """The non-empty lines of prompts.txt (the default run's prompts)."""
    return [p for p in weights_path("prompts.txt", root).read_text().splitlines() if p.strip()]


def read_manifest(root: str | Path | None = None) -> dict:
    path = weights_path("manifest.json", root)
    if not path.is_file():
        raise FileNotFoundError(f"no toy-world manifest at {path}: build the weights with `python -m arcopo_fast.toy build`")
    return json.loads(path.read_text())


def verify(root: str | Path | None = None) -> list[str]:
    """Files whose sha256 differs from the manifest's (empty: all intact)."""
    root = Path(root or WEIGHTS_DIR)
    want = read_manifest(root)["sha256"]
    have = file_hashes(root)
    return sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
