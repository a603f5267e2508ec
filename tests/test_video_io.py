"""video_io: mp4 (H.264 yuv420p) round trip, GIF, PNG contact sheet, and argument checks."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from arcopo_fast.video_io import (
    make_contact_sheet,
    read_mp4,
    save_video,
    to_uint8_frames,
    write_contact_sheet,
    write_gif,
    write_mp4,
)


def smooth_video(f=9, h=36, w=52, seed=0):
    """A smooth moving pattern (codecs keep it close to the original)."""
    g = torch.Generator().manual_seed(seed)
    phase = torch.rand(3, generator=g) * 6.28
    t = torch.arange(f).view(f, 1, 1, 1)
    y = torch.linspace(0, 3.14, h).view(1, 1, h, 1)
    x = torch.linspace(0, 3.14, w).view(1, 1, 1, w)
    c = phase.view(1, 3, 1, 1)
    return (0.5 + 0.4 * torch.sin(x + y + 0.3 * t + c)).float()


def test_mp4_round_trip_frames_size_fps(tmp_path):
    video = smooth_video()
    path = write_mp4(tmp_path / "sub" / "v.mp4", video, fps=8)
    frames, fps = read_mp4(path)
    assert frames.shape == (9, 36, 52, 3) and frames.dtype == np.uint8
    assert fps == pytest.approx(8.0)
    err = np.abs(frames.astype(np.float32) - to_uint8_frames(video).astype(np.float32)).mean()
    assert err < 4.0, err  # mean error in 8-bit levels (crf 18)


def test_mp4_is_h264_yuv420p_and_odd_sizes_are_padded(tmp_path):
    import imageio_ffmpeg

    path = write_mp4(tmp_path / "odd.mp4", smooth_video(5, 33, 47), fps=16)
    frames, _ = read_mp4(path)
    assert frames.shape == (5, 34, 48, 3)  # padded to even sizes by repeating the last row / column
    info = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True
    )
    assert "h264" in info.stderr and "yuv420p" in info.stderr, info.stderr


def test_uint8_numpy_input(tmp_path):
    frames = to_uint8_frames(smooth_video(4, 20, 30))
    assert frames.shape == (4, 20, 30, 3)
    out, _ = read_mp4(write_mp4(tmp_path / "n.mp4", frames, fps=4))
    assert out.shape == (4, 20, 30, 3)
    assert np.array_equal(to_uint8_frames(torch.from_numpy(frames).permute(0, 3, 1, 2)), frames)


def test_gif_and_png_exist_and_open(tmp_path):
    video = smooth_video(6, 24, 40)
    gif = write_gif(tmp_path / "v.gif", video, fps=10)
    with Image.open(gif) as im:
        assert im.n_frames == 6 and im.size == (40, 24)
        assert im.info["duration"] == 100
    png = write_contact_sheet(tmp_path / "v.png", video, num_frames=5, cols=3, pad=2)
    with Image.open(png) as im:
        assert im.format == "PNG"
        assert im.size == (3 * (40 + 2) + 2, 2 * (24 + 2) + 2)
    assert save_video(tmp_path / "x.gif", video).exists() and save_video(tmp_path / "x.png", video).exists()


def test_contact_sheet_places_frames():
    video = torch.stack([torch.full((3, 4, 5), i / 10) for i in range(10)])  # frame i has value i / 10
    sheet = make_contact_sheet(video, num_frames=4, cols=2, pad=1, pad_value=0)
    assert sheet.shape == (2 * 5 + 1, 2 * 6 + 1, 3)
    # frames 0, 3, 6, 9 left to right, top to bottom
    assert [int(sheet[1 + r * 5, 1 + c * 6, 0]) for r in (0, 1) for c in (0, 1)] == [0, 76, 153, 230]


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"\[F, 3, H, W\]"):
        to_uint8_frames(torch.zeros(2, 4, 5, 3))
    with pytest.raises(ValueError, match="uint8"):
        to_uint8_frames(np.zeros((2, 4, 5, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="fps"):
        write_mp4("/tmp/never.mp4", smooth_video(2, 8, 8), fps=0)
    with pytest.raises(ValueError, match="extension"):
        save_video("/tmp/never.avi", smooth_video(2, 8, 8))
    with pytest.raises(FileNotFoundError):
        read_mp4("/nonexistent/video.mp4")
