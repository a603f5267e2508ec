"""The semi-on-policy replay buffer: groups rolled out once by the reference policy, stored compactly.

<buffer>/
    index.json              settings that must match the training run (shapes, noise settings, and the
                            reference policy by content: a sha256 of its weights, its dtype, the seed), and
                            one record per group: file, group id (= noise sample id), prompt, pivot, rewards
                            and components
    group_000042.safetensors   inputs [G, T, F, C, H, W] float32 (the candidates' x_{p,k}), x0_old (the
                            reference predictions, float32 or bfloat16), logp_old [T, G, G] and tau [T]
                            (float32), prefix_latents [1, p*F, C, H, W] (float32: the prefix cache is rebuilt
                            from them)

The update recomputes the anchors' predictions from `inputs` and compares them with the stored `x0_old`
candidates; pi_old must be the same computation at the reference weights, or the ratio is not 1 at
iteration 0 (and eps = 1e-4 clips nearly everything). So `inputs` stay float32 (the reference prediction
of an exact input is the rollout's own), and logp_old and tau are computed against the candidates AS
STORED (rounded to bfloat16 when store_dtype is bfloat16), with the rollout's unrounded anchor predictions.

No KV cache is stored (gigabytes per group at full size): training rebuilds the prefix cache from the clean
prefix latents with the reference weights (adapters disabled). Noise needs no storage either: the
group id and the run seed regenerate it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .rollout import GroupSample, neighbour_table

INDEX = "index.json"
VERSION = 2  # 2: float32 inputs, logp_old against the stored candidates, reference policy by content
_GROUP_FILE = re.compile(r"^group_\d+\.safetensors$")
_TENSORS = ("inputs", "x0_old", "logp_old", "tau", "prefix_latents")
# settings recorded for information, not compared with the run's
INFO_SETTINGS = ("store_dtype", "base_checkpoint")


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a state dict: identifies weights by content."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _group_file(group: int) -> str:
    return f"group_{group:06d}.safetensors"


class ReplayBuffer:
    """A collected buffer, validated when opened: the index, every group file's presence (inside the
    buffer folder) and its tensors' names and shapes (headers only; no tensor is read)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        idx = self.root / INDEX
        if not idx.is_file():
            raise FileNotFoundError(f"replay buffer {self.root} has no {INDEX}: collect it first (python -m arcopo_fast.collect)")
        try:
            data = json.loads(idx.read_text())
        except ValueError as e:
            raise ValueError(f"replay buffer index {idx} is damaged ({e})") from None
        if not isinstance(data, dict) or data.get("version") != VERSION:
            got = data.get("version") if isinstance(data, dict) else None
            raise ValueError(f"replay buffer {self.root}: version {got} is not {VERSION} (collected by another "
                             "version of arcopo_fast: collect it again)")
        self.settings: dict[str, Any] = data.get("settings") or {}
        self.records: list[dict[str, Any]] = data.get("groups") or []
        if not self.records:
            raise ValueError(f"replay buffer {self.root} holds no group")
        for i, rec in enumerate(self.records):
            self._check_record(i, rec)

    def _check_record(self, i: int, rec: Any) -> None:
        where = f"replay buffer {self.root}, group record {i}"
        if not isinstance(rec, dict) or not all(k in rec for k in ("file", "group", "prompt", "pivot", "rewards", "components")):
            raise ValueError(f"{where}: needs file, group, prompt, pivot, rewards and components, got {rec!r:.200}")
        name = rec["file"]
        if not isinstance(name, str) or not _GROUP_FILE.match(name):
            raise ValueError(f"{where}: file {name!r} is not a group file name inside the buffer (group_N.safetensors); "
                             "index paths may not point outside the buffer folder")
        path = self.root / name
        if not path.is_file():
            raise ValueError(f"{where}: {name} is missing from {self.root}")
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - a damaged header: name the file
            raise ValueError(f"{where}: {path} is damaged ({e})") from None
        missing = [k for k in _TENSORS if k not in shapes]
        if missing:
            raise ValueError(f"{where}: {path} lacks tensors {missing}")
        G, T = shapes["inputs"][:2] if len(shapes["inputs"]) == 6 else (-1, -1)
        p = rec["pivot"]
        ok = (
            len(shapes["inputs"]) == 6 and shapes["x0_old"] == shapes["inputs"] and shapes["logp_old"] == (T, G, G)
            and shapes["tau"] == (T,) and isinstance(p, int) and p >= 0 and len(shapes["prefix_latents"]) == 5
            and shapes["prefix_latents"][0] == 1 and shapes["prefix_latents"][1] == p * shapes["inputs"][2]
            and isinstance(rec["rewards"], list) and len(rec["rewards"]) == G
        )
        if not ok:
            raise ValueError(f"{where}: {path} has inconsistent shapes {shapes} for pivot {p} and {len(rec['rewards'])} rewards")

    def __len__(self) -> int:
        return len(self.records)

    @staticmethod
    def exists(root: str | Path) -> bool:
        return (Path(root).expanduser() / INDEX).is_file()

    def check_compatible(self, settings: dict[str, Any]) -> None:
        """Refuse a buffer whose shapes, noise settings or reference policy (weights by content, dtype, seed)
        differ from the run's: its x_{p,k} and pi_old would not be this run's, and the ratio would be wrong."""
        diff = {k: (self.settings.get(k), v) for k, v in settings.items() if k not in INFO_SETTINGS and self.settings.get(k) != v}
        if diff:
            raise ValueError(f"replay buffer {self.root} was collected with other settings {{key: (buffer, run)}}: {diff}")

    def load(self, i: int) -> GroupSample:
        rec = self.records[i]
        t = load_file(str(self.root / rec["file"]))
        return GroupSample(
            group=rec["group"],
            prompt=rec["prompt"],
            pivot=rec["pivot"],
            inputs=t["inputs"],
            x0_old=t["x0_old"].float(),
            logp_old=t["logp_old"],
            tau=t["tau"],
            prefix_latents=t["prefix_latents"],
            rewards=torch.tensor(rec["rewards"], dtype=torch.float32),
            components={k: torch.tensor(v, dtype=torch.float32) for k, v in rec["components"].items()},
        )


def write_group(root: str | Path, sample: GroupSample, store_dtype: torch.dtype, tau: str | float = "auto",
                tau_auto_scale: float = 1.0) -> dict[str, Any]:
    """Write one scored group's tensors; returns its index record (the caller writes the index). `tau` and
    `tau_auto_scale` are the run's algo settings: logp_old and tau are recomputed against the candidates as
    stored (module docstring)."""
    if sample.rewards is None:
        raise ValueError("write_group: the group has no rewards yet")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = _group_file(sample.group)
    x0_stored = sample.x0_old.to(store_dtype).cpu().contiguous()
    taus, logp_old = neighbour_table(x0_stored.float(), tau, anchors=sample.x0_old.float().cpu(), auto_scale=tau_auto_scale)
    tensors = {
        "inputs": sample.inputs.float().cpu().contiguous(),
        "x0_old": x0_stored,
        "logp_old": logp_old.float().contiguous(),
        "tau": taus.float().contiguous(),
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


def clear(root: str | Path) -> None:
    """Delete a collection (its index first, so that a half-deleted folder is never a buffer), keeping the
    folder and whatever else it holds."""
    root = Path(root)
    (root / INDEX).unlink(missing_ok=True)
    for f in root.iterdir():
        if _GROUP_FILE.match(f.name):
            f.unlink(missing_ok=True)


def write_index(root: str | Path, settings: dict[str, Any], records: list[dict[str, Any]]) -> Path:
    root = Path(root)
    path = root / INDEX
    tmp = root / f".{INDEX}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"version": VERSION, "settings": settings, "groups": sorted(records, key=lambda r: r["group"])}, indent=1))
    os.replace(tmp, path)
    return path
