"""Write videos as mp4 (H.264, yuv420p), GIF and PNG contact sheets; read an mp4 back.

Inputs are one video as a torch tensor [F, 3, H, W] (float in [0, 1], or uint8) or a uint8 numpy array
[F, H, W, 3]. mp4 goes through the ffmpeg binary bundled with imageio-ffmpeg (libx264, yuv420p, so
ordinary players open it); yuv420p needs even sizes, so odd heights or widths are padded by repeating
the last row or column. GIF and PNG go through Pillow.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch


def to_uint8_frames(video: torch.Tensor | np.ndarray) -> np.ndarray:
    """[F, 3, H, W] tensor (float in [0, 1] or uint8) or [F, H, W, 3] uint8 array -> uint8 [F, H, W, 3]."""
    if isinstance(video, torch.Tensor):
        if video.ndim != 4 or video.shape[1] != 3:
            raise ValueError(f"video tensor must have shape [F, 3, H, W], got {tuple(video.shape)}")
        v = video.detach()
        if v.is_floating_point():
            v = v.float().clamp(0, 1).mul(255).round().to(torch.uint8)
        elif v.dtype != torch.uint8:
            raise ValueError(f"video tensor must be float in [0, 1] or uint8, got {v.dtype}")
        frames = v.permute(0, 2, 3, 1).cpu().numpy()
    elif isinstance(video, np.ndarray):
        if video.ndim != 4 or video.shape[3] != 3:
            raise ValueError(f"video array must have shape [F, H, W, 3], got {video.shape}")
        if video.dtype != np.uint8:
            raise ValueError(f"video array must be uint8, got {video.dtype}")
        frames = video
    else:
        raise ValueError(f"video must be a torch.Tensor or a numpy array, got {type(video).__name__}")
    if frames.shape[0] == 0 or frames.shape[1] == 0 or frames.shape[2] == 0:
        raise ValueError(f"video must be non-empty, got {frames.shape} as [F, H, W, 3]")
    return np.ascontiguousarray(frames)


def _pad_even(frames: np.ndarray) -> np.ndarray:
    """Repeat the last row / column so that H and W are even (yuv420p subsamples chroma 2x2)."""
    _, h, w, _ = frames.shape
    ph, pw = h % 2, w % 2
    if ph or pw:
        frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    return frames


def _check_fps(fps: float) -> float:
    if not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    return float(fps)


def write_mp4(
    path: str | os.PathLike, video: torch.Tensor | np.ndarray, fps: float = 16, crf: int = 18
) -> Path:
    """Write an H.264 (libx264, yuv420p) mp4. crf: x264 constant rate factor (0 lossless .. 51 worst)."""
    import imageio_ffmpeg

    fps = _check_fps(fps)
    if not isinstance(crf, int) or not 0 <= crf <= 51:
        raise ValueError(f"crf must be an integer in [0, 51], got {crf!r}")
    frames = _pad_even(to_uint8_frames(video))
    _, h, w, _ = frames.shape
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = imageio_ffmpeg.write_frames(
        str(path),
        (w, h),
        pix_fmt_in="rgb24",
        pix_fmt_out="yuv420p",
        fps=fps,
        codec="libx264",
        quality=None,  # rate control comes from -crf below
        macro_block_size=1,  # sizes are already even; never let the writer rescale
        ffmpeg_log_level="error",
        output_params=["-crf", str(crf), "-movflags", "+faststart"],
    )
    writer.send(None)  # start the generator
    try:
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
    finally:
        writer.close()
    return path


def read_mp4(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Decode a video file to (uint8 frames [F, H, W, 3], fps)."""
    import imageio_ffmpeg

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no video file at {path}")
    gen = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(gen)
    w, h = meta["size"]
    frames = [np.frombuffer(buf, dtype=np.uint8).reshape(h, w, 3) for buf in gen]
    if not frames:
        raise ValueError(f"{path} decoded to zero frames")
    return np.stack(frames), float(meta.get("fps", 0.0))


def write_gif(
    path: str | os.PathLike, video: torch.Tensor | np.ndarray, fps: float = 16, loop: int = 0
) -> Path:
    """Write an animated GIF (Pillow, adaptive palette per frame). loop=0 repeats forever."""
    from PIL import Image

    fps = _check_fps(fps)
    frames = to_uint8_frames(video)
    images = [Image.fromarray(f) for f in frames]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # GIF stores delays in centiseconds; Pillow takes milliseconds.
    duration = max(20, int(round(1000.0 / fps)))
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=loop)
    return path


def make_contact_sheet(
    video: torch.Tensor | np.ndarray,
    num_frames: int = 8,
    cols: int | None = None,
    pad: int = 2,
    pad_value: int = 255,
) -> np.ndarray:
    """A grid of `num_frames` frames spread evenly over the video, left to right, top to bottom.

    Returns uint8 [rows * (H + pad) + pad, cols * (W + pad) + pad, 3]. cols defaults to min(n, 4).
    """
    frames = to_uint8_frames(video)
    f, h, w, _ = frames.shape
    if not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
    if not isinstance(pad, int) or pad < 0:
        raise ValueError(f"pad must be a non-negative integer, got {pad!r}")
    n = min(num_frames, f)
    idx = [round(i * (f - 1) / (n - 1)) for i in range(n)] if n > 1 else [(f - 1) // 2]
    cols = min(n, 4) if cols is None else cols
    if not isinstance(cols, int) or cols < 1:
        raise ValueError(f"cols must be a positive integer, got {cols!r}")
    rows = math.ceil(n / cols)
    sheet = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), pad_value, dtype=np.uint8)
    for k, i in enumerate(idx):
        r, c = divmod(k, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        sheet[y : y + h, x : x + w] = frames[i]
    return sheet


def write_contact_sheet(
    path: str | os.PathLike,
    video: torch.Tensor | np.ndarray,
    num_frames: int = 8,
    cols: int | None = None,
    pad: int = 2,
) -> Path:
    """Write `make_contact_sheet(...)` as a PNG."""
    from PIL import Image

    sheet = make_contact_sheet(video, num_frames=num_frames, cols=cols, pad=pad)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(path, format="PNG")
    return path


def save_video(path: str | os.PathLike, video: torch.Tensor | np.ndarray, fps: float = 16) -> Path:
    """Write by extension: .mp4 (H.264), .gif, or .png (contact sheet)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".mp4":
        return write_mp4(path, video, fps=fps)
    if suffix == ".gif":
        return write_gif(path, video, fps=fps)
    if suffix == ".png":
        return write_contact_sheet(path, video)
    raise ValueError(f"unsupported video extension {suffix!r} in {path}: use .mp4, .gif or .png")


def tile_videos(videos: torch.Tensor, cols: int | None = None, pad: int = 2, scale: int = 1) -> torch.Tensor:
    """Several videos [N, F, 3, H, W] (float in [0, 1]) side by side in one video [F, 3, H', W']: a grid of
    `cols` columns (default: ceil(sqrt(N))) with white `pad`-pixel borders, each tile upscaled `scale`x
    (nearest: small videos stay crisp in players)."""
    if videos.ndim != 5 or videos.shape[2] != 3:
        raise ValueError(f"videos must have shape [N, F, 3, H, W], got {tuple(videos.shape)}")
    if not isinstance(scale, int) or scale < 1 or not isinstance(pad, int) or pad < 0:
        raise ValueError(f"scale must be a positive integer and pad a non-negative one, got {scale!r}, {pad!r}")
    n, f = videos.shape[:2]
    cols = math.ceil(math.sqrt(n)) if cols is None else cols
    if not isinstance(cols, int) or cols < 1:
        raise ValueError(f"cols must be a positive integer, got {cols!r}")
    v = videos.float()
    if scale > 1:
        v = v.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    h, w = v.shape[-2:]
    rows = math.ceil(n / cols)
    grid = torch.ones(f, 3, rows * (h + pad) + pad, cols * (w + pad) + pad, dtype=v.dtype, device=v.device)
    for k in range(n):
        r, c = divmod(k, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[:, :, y : y + h, x : x + w] = v[k]
    return grid
