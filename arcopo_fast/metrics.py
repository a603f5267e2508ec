"""Run observability: metrics.jsonl (always), TensorBoard and W&B (when installed and asked for), a PNG
plot of the reward curve, and the run's provenance (git SHA, versions, config)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import torch


def provenance() -> dict[str, Any]:
    """What produced a run: git SHA (and whether the tree was dirty), versions, devices."""
    root = Path(__file__).resolve().parent.parent

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=5).stdout.strip()
        except Exception:  # noqa: BLE001 - not a git checkout
            return ""

    info = {
        "git_sha": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain")),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "command": " ".join(sys.argv),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    for mod in ("triton", "transformers", "diffusers", "peft"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            info[mod] = None
    return info


class MetricsLogger:
    """Rank 0 only. log(step, metrics) appends a JSON line and forwards to TensorBoard / W&B."""

    def __init__(self, run_dir: Path, *, tensorboard: bool = False, wandb: bool = False, wandb_project: str = "", config=None, resume_from: int | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        if resume_from is not None:
            self.truncate(resume_from)
        self.tb = None
        self.wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:
                warnings.warn("run.tensorboard=true but tensorboard is not installed (pip install tensorboard): skipped", stacklevel=2)
        if wandb:
            try:
                import wandb as wb

                self.wandb = wb.init(project=wandb_project, dir=str(self.run_dir), config=config, resume="allow")
            except ImportError:
                warnings.warn("run.wandb=true but wandb is not installed (pip install wandb): skipped", stacklevel=2)

    def _read_rows(self) -> list[dict[str, Any]]:
        """The rows of metrics.jsonl. A last line cut short (a full disk, a killed process) is dropped with a
        warning; a damaged line elsewhere raises, naming the file and the line."""
        if not self.path.is_file():
            return []
        lines = self.path.read_text().splitlines()
        out = []
        for i, ln in enumerate(lines):
            if not ln.strip():
                continue
            try:
                out.append(json.loads(ln))
            except ValueError:
                if i == len(lines) - 1:
                    warnings.warn(f"{self.path}: ignoring a damaged last line ({ln[:60]!r}...)", stacklevel=3)
                    break
                raise ValueError(f"{self.path}, line {i + 1}: not a JSON row ({ln[:60]!r}...)") from None
        return out

    def truncate(self, iteration: int) -> None:
        """On resume: drop lines of iterations >= `iteration` (written after the checkpoint we resume) and a
        damaged last line; the file is replaced atomically."""
        if not self.path.is_file():
            return
        keep = [r for r in self._read_rows() if r.get("iteration", -1) < iteration]
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(r, default=float) + "\n" for r in keep))
        os.replace(tmp, self.path)

    def log(self, iteration: int, metrics: dict[str, Any]) -> None:
        row = {"iteration": iteration, **metrics}
        _append_line(self.path, json.dumps(row, default=float) + "\n")
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, iteration)
        if self.wandb is not None:
            self.wandb.log(scalars, step=iteration)

    def history(self) -> list[dict[str, Any]]:
        return self._read_rows()

    def plot(self, key: str = "reward/mean", out: str = "reward_curve.png") -> Path | None:
        rows = [r for r in self.history() if key in r]
        if not rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        xs = [r["iteration"] for r in rows]
        ys = [r[key] for r in rows]
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot(xs, ys, lw=1, alpha=0.5, label=key)
        w = max(1, len(ys) // 10)
        if len(ys) >= w > 1:
            smooth = [sum(ys[max(0, i - w + 1) : i + 1]) / len(ys[max(0, i - w + 1) : i + 1]) for i in range(len(ys))]
            ax.plot(xs, smooth, lw=2, label=f"moving mean ({w})")
        ax.set_xlabel("iteration")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = self.run_dir / out
        fig.savefig(path)
        plt.close(fig)
        return path

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _append_line(path: Path, line: str) -> None:
    """Append one line with O_APPEND writes; if a write fails (disk full), cut the file back to where it
    was, so that no partial line is left behind."""
    data = memoryview(line.encode())
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.fstat(fd).st_size
        try:
            while data:
                data = data[os.write(fd, data):]
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux -> GiB
    except Exception:  # noqa: BLE001
        return float("nan")
