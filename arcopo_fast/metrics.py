"""Run observability: metrics.jsonl (always), TensorBoard and W&B (when installed and asked for), sample
videos on both dashboards, a PNG plot of the reward curve, and the run's provenance (git SHA, versions,
config).

The W&B run id is written to <run_dir>/wandb_run_id when the run starts and read back on resume, so a
resumed training continues the same W&B run (and its charts) instead of opening a new one.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import platform
import subprocess
import sys
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

WANDB_ID_FILE = "wandb_run_id"
PREVIEW_SIDE = 320
"""Longest side (pixels) of the GIF previews sent to TensorBoard (the mp4 files keep the full size)."""


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

    def __init__(self, run_dir: Path, *, tensorboard: bool = False, wandb: bool = False, wandb_project: str = "", config=None,
                 resume_from: int | None = None, resuming: bool = False):
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
            except ImportError:
                warnings.warn("run.wandb=true but wandb is not installed (pip install wandb): skipped", stacklevel=2)
            else:
                self.wandb = wb.init(project=wandb_project, dir=str(self.run_dir), config=config, id=self._wandb_id(resuming),
                                     resume="allow")
                logger.info("W&B run %s (id %s)", getattr(self.wandb, "name", ""), self.wandb.id)

    def _wandb_id(self, resuming: bool) -> str:
        """The id of this run's W&B run: the saved one when resuming, else a new one (saved before init, so
        that even a run that dies during its first iteration is continued by --resume)."""
        path = self.run_dir / WANDB_ID_FILE
        if resuming and path.is_file() and path.read_text().strip():
            return path.read_text().strip()
        run_id = uuid.uuid4().hex[:12]  # W&B accepts any unique [a-z0-9] id
        path.write_text(run_id + "\n")
        return run_id

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

    def log_video(self, tag: str, iteration: int, video: torch.Tensor, *, fps: float = 16, mp4: Path | None = None) -> None:
        """A sample video [F, 3, H, W] in [0, 1] to the dashboards: TensorBoard gets an animated GIF preview
        (longest side PREVIEW_SIDE px) in its images tab; W&B gets the mp4 file when given (full size)."""
        if self.tb is not None:
            from tensorboard.compat.proto.summary_pb2 import Summary

            gif, (h, w) = gif_preview(video, fps=fps)
            image = Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=gif)
            self.tb._get_file_writer().add_summary(  # what SummaryWriter.add_image does, with GIF bytes
                Summary(value=[Summary.Value(tag=tag, image=image)]), iteration)
            self.tb.flush()
        if self.wandb is not None:
            import wandb as wb

            media = wb.Video(str(mp4), format="mp4") if mp4 is not None else wb.Video(_uint8(video), fps=int(round(fps)))
            self.wandb.log({tag: media}, step=iteration)

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


def _uint8(video: torch.Tensor):
    from .video_io import to_uint8_frames

    return to_uint8_frames(video).transpose(0, 3, 1, 2)  # [F, 3, H, W] uint8, as wandb.Video takes it


def gif_preview(video: torch.Tensor, *, fps: float = 16, side: int = PREVIEW_SIDE) -> tuple[bytes, tuple[int, int]]:
    """An animated GIF (bytes) of video [F, 3, H, W] in [0, 1], downscaled so that its longest side is at
    most `side` pixels; returns (bytes, (height, width))."""
    from PIL import Image

    from .video_io import to_uint8_frames

    frames = to_uint8_frames(video)
    h, w = frames.shape[1:3]
    scale = min(1.0, side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    images = [Image.fromarray(f) if scale == 1.0 else Image.fromarray(f).resize(size, Image.BILINEAR) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=max(20, round(1000 / fps)), loop=0)
    return buf.getvalue(), (size[1], size[0])


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux -> GiB
    except Exception:  # noqa: BLE001
        return float("nan")
