"""Training checkpoints and run folders: atomic, resumable, owned by one run at a time, the same on one
process or under torchrun (DDP or FSDP2).

<run_dir>/
    .lock                       held (flock) by the run writing here; the kernel drops it when that process
                                dies, so the lock of a killed run is taken over by the next one
    checkpoints/
        iter_000020/
            trainable.safetensors   the trainable parameters by model name (LoRA factors, or the full model)
            optimizer.pt            AdamW state keyed by parameter name (tensors and plain values only)
            state.json              iteration, config, trainer state (noise seed, data cursor, buffer draws)
            adapter/                the LoRA adapter in peft's format (for merge and evaluation)
        latest                      the name of the newest complete checkpoint

A checkpoint is written into a temporary folder and renamed into place, and `latest` is replaced the same
way: a crash at any point leaves the previous checkpoint intact. A `latest` that is missing, truncated or
names a folder that is gone falls back to the complete checkpoint with the highest iteration. Temporary
folders left by a killed writer are removed by the next save (the run lock guarantees no one else writes).

Nothing read from a run folder executes code: optimizer.pt is loaded with torch.load(weights_only=True);
`allow_pickle=True` (train's --allow-pickle) is for a trusted legacy checkpoint only.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import pickle
import re
import shutil
import socket
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

log = logging.getLogger(__name__)

LATEST = "latest"
LOCK = ".lock"
CHECKPOINTS = "checkpoints"
REQUIRED_FILES = ("trainable.safetensors", "optimizer.pt", "state.json")
_ITER = re.compile(r"^iter_(\d+)$")
_TEMP = re.compile(r"^\.(iter_\d+\.(tmp|old)|latest\.tmp)-\d+$")

# What a run writes into its folder: a fresh run refuses a folder holding the first three (they belong to
# another run) and `--overwrite` removes all of them.
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "base_model.safetensors", "base_model.json", "config.yaml",
               "run_info.json", "reward_curve.png", "samples", "tensorboard", "profile")
_RUN_EVIDENCE = ("checkpoints", "metrics.jsonl", "base_model.safetensors")


def _options(**kw) -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True, **kw)


# -- small file helpers ----------------------------------------------------------------------------------------


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` in one step: a reader (or a crash) sees the old content or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint file {path} is damaged or unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"checkpoint file {path} does not hold a JSON object")
    return data


def iteration_of(path: str | Path) -> int | None:
    """The iteration of a checkpoint folder name (iter_000020 -> 20), None for other names."""
    m = _ITER.match(Path(path).name)
    return int(m.group(1)) if m else None


def is_complete(path: Path) -> bool:
    """A checkpoint folder with every file a resume needs (published folders always are, unless damaged
    afterwards)."""
    return iteration_of(path) is not None and all((path / f).is_file() for f in REQUIRED_FILES)


def complete_checkpoints(ckpt_root: str | Path) -> list[Path]:
    """The complete checkpoints under `ckpt_root`, by increasing iteration number."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and is_complete(p)), key=iteration_of)


def remove_stale_temporaries(ckpt_root: str | Path) -> list[str]:
    """Remove the temporary folders and files of interrupted writes (call it holding the run lock)."""
    root = Path(ckpt_root)
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if _TEMP.match(p.name):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p.name)
    return removed


def _check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{what}: non-finite values (NaN or inf) in {len(bad)} tensor(s), e.g. {bad[:3]}; "
                         "the training diverged (learning rate?) and nothing was written")


# -- save / find / load ----------------------------------------------------------------------------------------


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
    files (the peft adapter) into the checkpoint before it is published. Weights with NaN or inf are
    refused (ValueError) before anything is written: the previous checkpoint stays the latest. Keeps the
    `keep` highest iterations, and always the one just written."""
    msd = get_model_state_dict(model, options=_options())
    osd = get_optimizer_state_dict(model, optimizer, options=_options())
    root = Path(ckpt_root)
    final = root / f"iter_{iteration:06d}"
    if is_main:
        _check_finite(msd, f"checkpoint {final}")
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(root)
        tmp = root / f".{final.name}.tmp-{os.getpid()}"
        tmp.mkdir()
        save_file({k: v.contiguous() for k, v in msd.items()}, str(tmp / "trainable.safetensors"))
        torch.save(osd, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(dict(state, iteration=iteration), indent=2, default=str))
        if export is not None:
            export(tmp)
        for f in REQUIRED_FILES:
            _fsync(tmp / f)
        if final.exists():  # re-saving the same iteration (after a resume): replace it
            old = root / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync(root)
        atomic_write_text(root / LATEST, final.name)
        prune(root, keep, protect=final)
    dist_utils.barrier()
    return final if is_main else None


def prune(ckpt_root: Path, keep: int, *, protect: Path | None = None) -> None:
    """Remove all but the `keep` highest-numbered checkpoints, never `protect` (the one just written, which
    `latest` names) nor the newest."""
    done = complete_checkpoints(ckpt_root)
    kept = {p.name for p in done[-max(keep, 1):]}
    if protect is not None:
        kept.add(protect.name)
    for p in done:
        if p.name not in kept:
            # renamed out of sight first: a crash mid-removal leaves a temporary folder, not a damaged checkpoint
            gone = p.with_name(f".{p.name}.old-{os.getpid()}")
            os.replace(p, gone)
            shutil.rmtree(gone, ignore_errors=True)


def latest(ckpt_root: str | Path) -> Path | None:
    """The checkpoint `latest` names; when it is missing, truncated or names an incomplete or missing
    folder: the complete checkpoint with the highest iteration (None when there is none)."""
    root = Path(ckpt_root)
    marker = root / LATEST
    named = None
    if marker.is_file():
        try:
            named = marker.read_text().strip()
        except OSError:
            named = None
        if named and iteration_of(named) is not None and is_complete(root / named):
            return root / named
    found = complete_checkpoints(root)
    if not found:
        return None
    if marker.exists():
        log.warning("%s names %r, which is not a complete checkpoint: using the newest complete one, %s",
                    marker, named, found[-1].name)
    return found[-1]


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
    for root in (p, p / CHECKPOINTS):
        found = latest(root)
        if found is not None:
            return found
    if (p / "config.yaml").is_file() or (p / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"no checkpoint found at {p}: the run stopped before its first complete checkpoint; "
                                "start it again (--overwrite replaces the folder)")
    raise FileNotFoundError(f"no checkpoint found at {p} (expected a run directory, its checkpoints/ or an iter_* folder)")


def run_dir_of(checkpoint: str | Path) -> Path | None:
    """The run folder a checkpoint folder belongs to (<run>/checkpoints/iter_N), None for a loose one."""
    p = Path(checkpoint)
    return p.parent.parent if p.parent.name == CHECKPOINTS else None


def read_state(path: str | Path) -> dict[str, Any]:
    return _read_json(resolve(path) / "state.json")


def _load_optimizer_state(path: Path, allow_pickle: bool) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path} holds Python objects besides tensors; they were not loaded, because unpickling can run "
            "arbitrary code. If you trust this checkpoint (e.g. written by an older version), resume with "
            "--allow-pickle (Trainer(..., allow_pickle=True))"
        ) from e
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated zip, wrong format...: name the file
        raise ValueError(f"checkpoint file {path} is damaged or unreadable ({type(e).__name__}: {e})") from e


def load(
    path: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, allow_pickle: bool = False
) -> dict[str, Any]:
    """Restore the trainable parameters (and the optimizer) in place; returns state.json's content."""
    p = resolve(path)
    state = _read_json(p / "state.json")
    file = p / "trainable.safetensors"
    try:
        msd = load_file(str(file))
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors' header errors do not name the file
        raise ValueError(f"checkpoint file {file} is damaged or unreadable ({type(e).__name__}: {e})") from e
    _check_finite(msd, f"checkpoint {file}")
    osd = _load_optimizer_state(p / "optimizer.pt", allow_pickle) if optimizer is not None else None
    set_model_state_dict(model, msd, options=_options(strict=False))
    # every trainable parameter must have been restored: a silent partial load would fork the run
    trainable = set(get_model_state_dict(model, options=_options()))
    missing = sorted(trainable - set(msd))
    if missing:
        raise ValueError(f"checkpoint {p} lacks trainable parameters {missing[:5]} (of {len(missing)})")
    if osd is not None:
        set_optimizer_state_dict(model, optimizer, osd, options=_options())
    return state


# -- run folders: one run at a time, never clobbered ------------------------------------------------------------


class RunLockedError(RuntimeError):
    """Another live process holds the run folder."""


class RunLock:
    """An exclusive lock on a run folder: fcntl.flock on <run>/.lock, which records who holds it. The kernel
    releases it when the holder exits or is killed, so a stale lock file is simply taken over."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunLockedError(
                f"run folder {self.path.parent} is in use by {holder}: two runs in one folder would interleave "
                "their metrics and checkpoints. Wait for it to finish, stop it, or choose another run.out_dir"
            ) from None
        os.ftruncate(fd, 0)
        now = datetime.datetime.now().isoformat(timespec="seconds")
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()} (since {now})\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def _writable_folder(run_dir: Path) -> bool:
    """Create `run_dir` if needed (returns whether it was created); ValueError naming it when impossible."""
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"run.out_dir {run_dir}: cannot create or write the run folder ({e.strerror or e})") from e
    return created


def claim_run_dir(run_dir: str | Path, *, resume_from: Path | None = None, overwrite: bool = False) -> tuple[RunLock, bool]:
    """Take a run folder for a run (rank 0, before anything is written). Returns (the held lock, whether the
    folder was created). Refuses, before touching anything:
      - a folder locked by a live run (RunLockedError);
      - on a fresh run, a folder that holds another run's checkpoints, metrics or base weights, unless
        `overwrite` (they are then deleted) (FileExistsError);
      - on a resume, a checkpoint older than the folder's newest one, unless `overwrite` (the newer
        checkpoints are then deleted): resuming it would discard iterations (FileExistsError).
    Removes temporary folders left by interrupted writes."""
    run_dir = Path(run_dir).expanduser()
    created = _writable_folder(run_dir)
    lock = RunLock(run_dir).acquire()
    try:
        ckpts = run_dir / CHECKPOINTS
        if resume_from is None:
            used = [n for n in _RUN_EVIDENCE if _holds_something(run_dir / n)]
            if used and not overwrite:
                raise FileExistsError(
                    f"run folder {run_dir} already holds a run ({', '.join(used)}): resume it with "
                    f"--resume {run_dir}, choose another run.out_dir, or pass --overwrite to delete it and start over"
                )
            for n in RUN_OUTPUTS:
                p = run_dir / n
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        else:
            done = complete_checkpoints(ckpts)
            k = iteration_of(resume_from)
            newer = [p for p in done if k is not None and iteration_of(p) > k]
            if newer and not overwrite:
                raise FileExistsError(
                    f"checkpoint {resume_from.name} is older than the newest checkpoint of {run_dir} ({newer[-1].name}): "
                    f"resuming it would discard iterations {k}..{iteration_of(newer[-1]) - 1}. Copy the run folder "
                    "and resume the copy, or pass --overwrite to discard them"
                )
            for p in newer:
                shutil.rmtree(p, ignore_errors=True)
            if newer:
                atomic_write_text(ckpts / LATEST, resume_from.name)
        remove_stale_temporaries(ckpts)
    except BaseException:
        lock.release()
        raise
    return lock, created


def _holds_something(p: Path) -> bool:
    if p.is_dir():
        return any(p.iterdir())
    return p.is_file() and p.stat().st_size > 0
