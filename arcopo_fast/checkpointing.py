"""Training checkpoints: atomic, resumable, the same on one process or under torchrun (DDP or FSDP2).

<run_dir>/checkpoints/
    iter_000020/
        trainable.safetensors   the trainable parameters by model name (LoRA factors, or the full model)
        optimizer.pt            AdamW state keyed by parameter name
        state.json              iteration, config, trainer state (noise seed, data cursor, buffer draws)
        adapter/                the LoRA adapter in peft's format (for merge and evaluation)
    latest                      the name of the newest complete checkpoint

A checkpoint is written into a temporary folder and renamed into place, and `latest` is replaced the same
way: a crash at any point leaves the previous checkpoint intact and `latest` pointing at it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from . import distributed as dist_utils

LATEST = "latest"


def _options(**kw) -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True, **kw)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(
    ckpt_root: str | Path,
    iteration: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    is_main: bool,
    keep: int = 2,
    export=None,
) -> Path | None:
    """Collective: every rank calls it (FSDP gathers shards); rank 0 writes. `export(dir)` may write extra
    files (the peft adapter) into the checkpoint before it is published."""
    msd = get_model_state_dict(model, options=_options())
    osd = get_optimizer_state_dict(model, optimizer, options=_options())
    root = Path(ckpt_root)
    final = root / f"iter_{iteration:06d}"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.contiguous() for k, v in msd.items()}, str(tmp / "trainable.safetensors"))
        torch.save(osd, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(dict(state, iteration=iteration), indent=2, default=str))
        if export is not None:
            export(tmp)
        if final.exists():  # re-saving the same iteration (after a resume): replace it
            old = root / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
        _atomic_write_text(root / LATEST, final.name)
        for old in sorted(p for p in root.glob("iter_*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist_utils.barrier()
    return final if is_main else None


def latest(ckpt_root: str | Path) -> Path | None:
    root = Path(ckpt_root)
    marker = root / LATEST
    if not marker.is_file():
        return None
    path = root / marker.read_text().strip()
    return path if (path / "state.json").is_file() else None


def expand_latest(path: str | Path) -> Path:
    """`path` with each component that is a `latest` marker file replaced by the checkpoint it names, so that
    <run>/checkpoints/latest/adapter works wherever a checkpoint or adapter folder is taken."""
    p = Path(path).expanduser()
    out = Path()
    for part in p.parts:  # the first part of an absolute path is its root ("/")
        out = out / part
        if part == LATEST and out.is_file():
            name = out.read_text().strip()
            if not name or "/" in name or name.startswith("."):
                raise ValueError(f"{out} does not name a checkpoint folder (content {name!r})")
            out = out.parent / name
    return out


def resolve(path: str | Path) -> Path:
    """A checkpoint folder from a checkpoint folder, a checkpoints/ folder, a run directory, or
    <checkpoints>/latest."""
    p = expand_latest(path)
    if (p / "state.json").is_file():
        return p
    for root in (p, p / "checkpoints"):
        found = latest(root)
        if found is not None:
            return found
    raise FileNotFoundError(f"no checkpoint found at {p} (expected a run directory, its checkpoints/ or an iter_* folder)")


def read_state(path: str | Path) -> dict[str, Any]:
    return json.loads((resolve(path) / "state.json").read_text())


def load(path: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Restore the trainable parameters (and the optimizer) in place; returns state.json's content."""
    p = resolve(path)
    msd = load_file(str(p / "trainable.safetensors"))
    set_model_state_dict(model, msd, options=_options(strict=False))
    # every trainable parameter must have been restored: a silent partial load would fork the run
    trainable = set(get_model_state_dict(model, options=_options()))
    missing = sorted(trainable - set(msd))
    if missing:
        raise ValueError(f"checkpoint {p} lacks trainable parameters {missing[:5]} (of {len(missing)})")
    if optimizer is not None:
        osd = torch.load(p / "optimizer.pt", map_location="cpu", weights_only=False)
        set_optimizer_state_dict(model, optimizer, osd, options=_options())
    return json.loads((p / "state.json").read_text())
