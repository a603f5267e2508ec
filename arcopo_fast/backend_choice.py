"""The measured backend choice of "auto" for attention on CUDA.

The first call of an attention op in a new (device name, dtype, op variant, shape bucket) times every
candidate that can serve it and passed its self-test (arcopo_fast.selftest) a few times on the call's own
tensors, and keeps the fastest. Verdicts are cached in memory (a dict lookup per later call: no sync, no
timing) and on disk, in $ARCOPO_FAST_CACHE or ~/.cache/arcopo_fast/backend_choice-<env>.json, where <env>
hashes the torch, triton and CUDA driver versions, the device name and our kernels' sources: a new driver
or a kernel change re-measures.

Variants separate what must be chosen separately: forward-only calls (rollouts, sampling: ".../fwd") and
calls that need gradients (the update: ".../fwd+bwd", timed forward + backward). Each picks its own
winner, e.g. SDPA-cuDNN for the forward and our kernel for forward + backward, whose backward spends
nothing on the detached cache and prefix. (Mixing one implementation's forward with another's backward is
not offered: neither backward can consume the other's saved state without recomputing the forward.)

Shape buckets keep the timings few: B, Lq and Lk (prefix + cache + chunk) rounded up to powers of two, H
and D exact. An 81-frame video (Lk = 4680 .. 32760 in 7 steps) measures in 3 buckets per variant.
Candidates that raise at the call's shape are left out, with their error in the verdict.
`python -m arcopo_fast.doctor` prints the verdicts with their timings.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

Timer = Callable[[str, Callable[[], object], torch.device], float]  # (candidate, call, device) -> ms
FORMAT = 1


def pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def bucket(batch: int, lq: int, lk: int, heads: int, head_dim: int) -> str:
    return f"B{pow2(batch)}-Lq{pow2(lq)}-Lk{pow2(lk)}-H{heads}-D{head_dim}"


def bucket_size(b: str) -> int:
    """B * Lq * Lk * H of a bucket name: the largest bucket stands for a compiled graph (see ops)."""
    f = dict((p[:2] if p[:2] in ("Lq", "Lk") else p[:1], int(p[2:] if p[:2] in ("Lq", "Lk") else p[1:]))
             for p in b.split("-"))
    return f["B"] * f["Lq"] * f["Lk"] * f["H"]


def default_timer(name: str, fn: Callable[[], object], device: torch.device) -> float:
    from .timing import median_ms

    # a few iterations: enough to rank candidates that differ by more than a few percent
    return median_ms(fn, device, warmup_ms=10, rep_ms=40)


def cache_dir() -> Path:
    return Path(os.environ.get("ARCOPO_FAST_CACHE", "~/.cache/arcopo_fast")).expanduser()


def _driver_version() -> str:
    try:
        v = torch._C._cuda_getDriverVersion()  # e.g. 13000
        return f"{v // 1000}.{v % 1000 // 10}"
    except Exception:  # noqa: BLE001 - older torch or no CUDA
        return "none"


def _kernels_digest() -> str:
    from . import kernels

    h = hashlib.sha256()
    for p in sorted(Path(kernels.__file__).parent.glob("*.py")):
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def environment(device: torch.device) -> dict[str, str]:
    """What a verdict depends on besides the call: versions, driver, device, our kernels' sources."""
    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        triton_v = "none"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"torch": torch.__version__, "triton": triton_v, "cuda": str(torch.version.cuda), "driver": _driver_version(),
            "device": name, "kernels": _kernels_digest()}


@dataclass
class Choice:
    backend: str
    ms: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    when: float = 0.0

    def as_dict(self) -> dict:
        return {"backend": self.backend, "ms": self.ms, "failed": self.failed, "when": self.when}


class Chooser:
    """Times candidates once per key and remembers the winner (memory + a JSON file per environment)."""

    def __init__(self, directory: Path | str | None = None, timer: Timer | None = None,
                 env: Callable[[torch.device], dict[str, str]] = environment):
        self.directory = Path(directory) if directory is not None else None
        self.timer = timer or default_timer
        self._env = env
        self._lock = threading.RLock()
        self._choices: dict[tuple[str, str], dict[str, Choice]] = {}  # (device type, device name) -> key -> choice
        self._files: dict[tuple[str, str], Path] = {}
        self.timings_run = 0  # how many candidate timings this chooser ran (tests, doctor)

    def _table(self, device: torch.device) -> tuple[dict[str, Choice], Path | None]:
        dev_key = (device.type, str(device))
        table = self._choices.get(dev_key)
        if table is None:
            env = self._env(device)
            digest = hashlib.sha256(json.dumps(env, sort_keys=True).encode()).hexdigest()[:16]
            path = (self.directory or cache_dir()) / f"backend_choice-{digest}.json"
            table = {}
            try:
                data = json.loads(path.read_text())
                if data.get("format") == FORMAT and data.get("env") == env:
                    table = {k: Choice(**v) for k, v in data.get("choices", {}).items()}
            except (OSError, ValueError, TypeError):
                table = {}  # missing or unreadable: measure again
            self._choices[dev_key], self._files[dev_key] = table, path
        return table, self._files.get(dev_key)

    @staticmethod
    def key(op: str, variant: str, dtype: torch.dtype | str, bucket_name: str) -> str:
        return f"{op}|{variant}|{str(dtype).removeprefix('torch.')}|{bucket_name}"

    def lookup(self, device: torch.device, key: str) -> Choice | None:
        table, _ = self._table(device)
        return table.get(key)

    def choices(self, device: torch.device) -> dict[str, Choice]:
        return dict(self._table(device)[0])

    def choose(self, device: torch.device, key: str, candidates: dict[str, Callable[[], object]]) -> str:
        """The fastest candidate for `key` (timed now when unknown). `candidates` maps name -> a zero-argument
        call of that candidate on the real inputs; the first of them is the safe default when all fail."""
        table, _ = self._table(device)
        c = table.get(key)
        if c is not None and (c.backend in candidates):
            return c.backend
        with self._lock:
            c = table.get(key)
            if c is not None and c.backend in candidates:
                return c.backend
            c = self._measure(device, candidates)
            table[key] = c
            self._save(device)
        return c.backend

    def _measure(self, device: torch.device, candidates: dict[str, Callable[[], object]]) -> Choice:
        ms, failed = {}, {}
        for name, fn in candidates.items():
            try:
                fn()  # compile / autotune outside the clock; a candidate that cannot run this shape drops out
                ms[name] = round(float(self.timer(name, fn, device)), 5)
                self.timings_run += 1
            except Exception as e:  # noqa: BLE001
                failed[name] = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
        best = min(ms, key=ms.get) if ms else next(iter(candidates))
        return Choice(best, ms, failed, round(time.time(), 1))

    def _save(self, device: torch.device) -> None:
        table, path = self._table(device)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            data = {"format": FORMAT, "env": self._env(device), "choices": {k: c.as_dict() for k, c in table.items()}}
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the new file, never half
        except OSError:
            pass  # a read-only home: the in-memory verdicts still serve this process


_CHOOSER: Chooser | None = None


def chooser() -> Chooser:
    global _CHOOSER
    if _CHOOSER is None:
        _CHOOSER = Chooser()
    return _CHOOSER


def set_chooser(c: Chooser | None) -> None:
    """Install a chooser (tests: a temporary directory and a fake timer); None restores the default."""
    global _CHOOSER
    _CHOOSER = c
