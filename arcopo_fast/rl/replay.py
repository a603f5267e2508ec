"""The semi-on-policy replay buffer: groups rolled out once by the reference policy, stored compactly.

<buffer>/
    index.json              settings that must match the training run, and one record per group:
                            file, group id (= noise sample id), prompt, pivot, rewards and components
    group_000042.safetensors   inputs [G, T, F, C, H, W] and x0_old (candidates' x_{p,k} and the reference
                            predictions, float32 or bfloat16), logp_old [T, G, G] and tau [T] (float32),
                            prefix_latents [1, p*F, C, H, W] (float32: the prefix cache is rebuilt from them)

No KV cache is stored (gigabytes per group at full size): training rebuilds the prefix cache from the clean
prefix latents with the reference weights (adapters disabled). Noise needs no storage either: the
group id and the run seed regenerate it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .rollout import GroupSample

INDEX = "index.json"
VERSION = 1


def _group_file(group: int) -> str:
    return f"group_{group:06d}.safetensors"


class ReplayBuffer:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        idx = self.root / INDEX
        if not idx.is_file():
            raise FileNotFoundError(f"replay buffer {self.root} has no {INDEX}: collect it first (python -m arcopo_fast.collect)")
        data = json.loads(idx.read_text())
        if data.get("version") != VERSION:
            raise ValueError(f"replay buffer {self.root}: version {data.get('version')} is not {VERSION}")
        self.settings: dict[str, Any] = data["settings"]
        self.records: list[dict[str, Any]] = data["groups"]
        if not self.records:
            raise ValueError(f"replay buffer {self.root} holds no group")

    def __len__(self) -> int:
        return len(self.records)

    @staticmethod
    def exists(root: str | Path) -> bool:
        return (Path(root).expanduser() / INDEX).is_file()

    def check_compatible(self, settings: dict[str, Any]) -> None:
        """Refuse a buffer whose shapes/noise settings differ from the run's (its x_{p,k} would be wrong)."""
        diff = {k: (self.settings.get(k), v) for k, v in settings.items() if self.settings.get(k) != v}
        if diff:
            raise ValueError(f"replay buffer {self.root} was collected with other settings {{key: (buffer, run)}}: {diff}")

    def load(self, i: int) -> GroupSample:
        rec = self.records[i]
        t = load_file(str(self.root / rec["file"]))
        return GroupSample(
            group=rec["group"],
            prompt=rec["prompt"],
            pivot=rec["pivot"],
            inputs=t["inputs"].float(),
            x0_old=t["x0_old"].float(),
            logp_old=t["logp_old"],
            tau=t["tau"],
            prefix_latents=t["prefix_latents"],
            rewards=torch.tensor(rec["rewards"], dtype=torch.float32),
            components={k: torch.tensor(v, dtype=torch.float32) for k, v in rec["components"].items()},
        )


def write_group(root: str | Path, sample: GroupSample, store_dtype: torch.dtype) -> dict[str, Any]:
    """Write one scored group's tensors; returns its index record (the caller writes the index)."""
    if sample.rewards is None:
        raise ValueError("write_group: the group has no rewards yet")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = _group_file(sample.group)
    tensors = {
        "inputs": sample.inputs.to(store_dtype).cpu().contiguous(),
        "x0_old": sample.x0_old.to(store_dtype).cpu().contiguous(),
        "logp_old": sample.logp_old.float().cpu().contiguous(),
        "tau": sample.tau.float().cpu().contiguous(),
        "prefix_latents": sample.prefix_latents.float().cpu().contiguous(),
    }
    tmp = root / f".{name}.tmp-{os.getpid()}"
    save_file(tensors, str(tmp))
    os.replace(tmp, root / name)
    return {
        "file": name,
        "group": sample.group,
        "prompt": sample.prompt,
        "pivot": sample.pivot,
        "rewards": sample.rewards.float().cpu().tolist(),
        "components": {k: v.float().cpu().tolist() for k, v in sample.components.items()},
    }


def write_index(root: str | Path, settings: dict[str, Any], records: list[dict[str, Any]]) -> Path:
    root = Path(root)
    path = root / INDEX
    tmp = root / f".{INDEX}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"version": VERSION, "settings": settings, "groups": sorted(records, key=lambda r: r["group"])}, indent=1))
    os.replace(tmp, path)
    return path
