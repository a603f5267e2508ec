"""The sample CLI: every --out kind (.mp4, .gif, .png contact sheet, PNG-frame folder) for one or many
prompts with per-video names, --prompts-file, --num-samples, pixel units; evaluate's per-model defaults."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from arcopo_fast.model.config import get_preset
from arcopo_fast.sample import main as sample_main
from arcopo_fast.sample import output_paths, video_size

SMALL = ["--height", "32", "--width", "48", "--num-frames", "9"]  # pixels: 4 x 6 latents, one chunk


def _gif_frames(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "GIF"
        frames = []
        for i in range(im.n_frames):
            im.seek(i)
            frames.append(np.asarray(im.convert("RGB")))
    return np.stack(frames)


def test_gif_for_one_prompt_is_a_valid_animation(tiny_assets, tmp_path):
    out = tmp_path / "y.gif"
    assert sample_main(["--prompt", "a red balloon", "--out", str(out), *SMALL]) == 0
    frames = _gif_frames(out)
    assert frames.shape == (9, 32, 48, 3)  # pixel units: 32 x 48 frames, not 8x larger
    assert frames.std() > 1


@pytest.mark.parametrize("suffix", [".mp4", ".gif", ".png", ""])
def test_every_format_for_many_prompts(tiny_assets, tmp_path, suffix):
    from arcopo_fast.video_io import read_mp4

    out = tmp_path / f"clip{suffix}"
    assert sample_main(["--prompt", "a red balloon", "--prompt", "a green field", "--out", str(out), *SMALL]) == 0
    paths = [tmp_path / f"clip_{p}{suffix}" for p in (0, 1)]
    assert sorted(tmp_path.iterdir()) == paths
    if suffix == ".mp4":
        shapes = [read_mp4(p)[0].shape for p in paths]
    elif suffix == ".gif":
        shapes = [_gif_frames(p).shape for p in paths]
    elif suffix == ".png":  # a contact sheet of 8 of the 9 frames, 4 per row
        shapes = [np.asarray(Image.open(p)).shape for p in paths]
        assert shapes[0] == (2 + 2 * (32 + 2), 2 + 4 * (48 + 2), 3)
    else:
        assert all(len(list(p.glob("frame_*.png"))) == 9 for p in paths)
        shapes = [np.stack([np.asarray(Image.open(f)) for f in sorted(p.glob("*.png"))]).shape for p in paths]
    if suffix != ".png":
        assert shapes == [(9, 32, 48, 3)] * 2


def test_prompts_file_and_num_samples(tiny_assets, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red balloon\n\n  a green field  \n")
    out = tmp_path / "v" / "s.gif"
    assert sample_main(["--prompts-file", str(prompts), "--num-samples", "2", "--seed", "5", "--out", str(out),
                        "--batch-size", "3", *SMALL]) == 0
    names = sorted(p.name for p in out.parent.iterdir())
    assert names == ["s_0_0.gif", "s_0_1.gif", "s_1_0.gif", "s_1_1.gif"]
    a, b = _gif_frames(out.parent / "s_0_0.gif"), _gif_frames(out.parent / "s_0_1.gif")
    assert np.abs(a.astype(float) - b.astype(float)).mean() > 0.5  # samples differ (seeds 5 and 6)
    # sample 1 of prompt 0 is the video of seed 6 on its own
    solo = tmp_path / "solo.gif"
    assert sample_main(["--prompt", "a red balloon", "--seed", "6", "--out", str(solo), *SMALL]) == 0
    assert np.abs(_gif_frames(solo).astype(float) - b.astype(float)).max() <= 2


def test_bad_arguments_fail_before_generating(tmp_path, capsys):
    assert sample_main(["--prompt", "x", "--out", str(tmp_path / "x.avi")]) == 2
    assert "unsupported video extension '.avi'" in capsys.readouterr().err
    assert sample_main(["--out", str(tmp_path / "x.mp4")]) == 2
    assert "--prompt" in capsys.readouterr().err
    assert sample_main(["--prompt", "x", "--prompts-file", str(tmp_path / "none.txt")]) == 2
    assert "none.txt does not exist" in capsys.readouterr().err
    # usage errors naming the option, not a traceback after (or deep inside) the generation
    bad = {"--fps": ("0", "--fps must be > 0"), "--device": ("gpu", "argument --device: 'gpu' is not a device")}
    if not torch.cuda.is_available():
        bad["--device "] = ("cuda", "argument --device: 'cuda': CUDA is not available")
    for flag, (value, message) in bad.items():
        with pytest.raises(SystemExit) as e:
            sample_main(["--prompt", "x", flag.strip(), value, "--out", str(tmp_path / "y.mp4")])
        assert e.value.code == 2 and message in capsys.readouterr().err, flag
    assert not (tmp_path / "y.mp4").exists()
    assert sample_main(["--prompt", "x", "--adapter", f"{tmp_path}:O.8", "--out", str(tmp_path / "y.mp4")]) == 2
    assert f"--adapter {tmp_path}:O.8: expected FOLDER or FOLDER:SCALE, and 'O.8' is not a number" in capsys.readouterr().err


def test_bad_sizes_are_named_in_pixels(tiny_assets, tmp_path, capsys):
    assert sample_main(["--prompt", "x", "--out", str(tmp_path / "x.mp4"), "--height", "100", "--width", "48",
                        "--num-frames", "9"]) == 2
    assert "height must be a positive multiple of 16 pixels" in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()


def test_model_toy_samples_the_toy_world_at_its_clip_size(tmp_path, capsys):
    """--model toy: the default run's generator with its own text encoder, VAE and shift, 33 frames of 64 x 64
    (a --checkpoint of the toy weights alone got the tiny text encoder and Self-Forcing's shift, silently)."""
    from arcopo_fast.video_io import read_mp4

    out = tmp_path / "toy.mp4"
    assert sample_main(["--model", "toy", "--prompt", "a big green circle moving right over a gray background",
                        "--out", str(out), "--quiet"]) == 0
    frames, _ = read_mp4(out)
    assert frames.shape[:3] == (33, 64, 64)
    from arcopo_fast.toy.assets import WEIGHTS_DIR

    toy_weights = ["--checkpoint", str(WEIGHTS_DIR / "base_model.safetensors"), "--prompt", "x", "--out", str(out)]
    assert sample_main(toy_weights) == 2  # without its text encoder: refused, not sampled with the tiny one
    err = capsys.readouterr().err
    assert "belong to the tiny model only" in err and "--model toy" in err


def test_output_paths():
    assert output_paths("a/v.mp4", 1, 1) == [__import__("pathlib").Path("a/v.mp4")]
    assert [p.as_posix() for p in output_paths("a/v.gif", 2, 1)] == ["a/v_0.gif", "a/v_1.gif"]
    assert [p.as_posix() for p in output_paths("frames", 1, 2)] == ["frames_0_0", "frames_0_1"]


def test_default_sizes_follow_the_model(tmp_path, monkeypatch):
    """evaluate used an 8x8 latent and 3 chunks even with the 1.3B preset: the sizes now default to the
    model's (480 x 832 x 81 for 1.3B-class models), in evaluate as in sample. A stub generator with the 1.3B
    config stands in for the 1.3B model (no weights here)."""
    import json

    import torch

    import arcopo_fast.sample as sample
    from arcopo_fast.evaluate import main as evaluate_main

    class Stub:
        model = SimpleNamespace(cfg=get_preset("wan-1.3b"))
        calls = []

        def set_progress_bar_config(self, **kw):
            pass

        def check_inputs(self, *args, **kw):
            pass

        def __call__(self, prompts, *, height, width, num_frames, seeds):
            self.calls.append((height, width, num_frames))
            return SimpleNamespace(frames=torch.rand(len(prompts), 5, 3, 8, 8))

    monkeypatch.setattr(sample, "build_pipeline", lambda args, model_seed=0: Stub())
    assert evaluate_main(["--out", str(tmp_path / "ev"), "--preset", "wan-1.3b", "--rewards", "brightness"]) == 0
    settings = json.loads((tmp_path / "ev" / "results.json").read_text())["settings"]
    assert (settings["height"], settings["width"], settings["num_frames"]) == (480, 832, 81)
    assert set(Stub.calls) == {(480, 832, 81)}

    ap = argparse.ArgumentParser()
    sample.add_model_arguments(ap)
    tiny = SimpleNamespace(model=SimpleNamespace(cfg=get_preset("tiny")))
    assert video_size(ap.parse_args([]), tiny) == (64, 64, 81)
    assert video_size(ap.parse_args(["--height", "96", "--num-frames", "21"]), Stub()) == (96, 832, 21)


def test_evaluate_refuses_bad_options_before_building_the_generator(tmp_path, monkeypatch, capsys):
    import arcopo_fast.sample as sample
    from arcopo_fast.evaluate import evaluate
    from arcopo_fast.evaluate import main as evaluate_main

    built = []
    monkeypatch.setattr(sample, "build_pipeline", lambda args, model_seed=0: built.append(1))
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "bad.json").write_text("{not json")
    cases = [(["--prompts", str(tmp_path / "missing.txt")], "--prompts"), (["--prompts", str(tmp_path / "empty.txt")], "--prompts"),
             (["--compare", str(tmp_path / "bad.json")], "bad.json")]  # fmt: skip
    for argv, named in cases:
        assert evaluate_main(["--out", str(tmp_path / "ev"), *argv]) == 2, argv
        assert named in capsys.readouterr().err, argv
    for seeds in ("0,x", "0,-1"):  # a usage error of argparse, naming the option
        with pytest.raises(SystemExit):
            evaluate_main(["--out", str(tmp_path / "ev"), "--seeds", seeds])
        assert "argument --seeds" in capsys.readouterr().err, seeds
    assert not built

    # every prompt's noise ids are checked before the first video is generated
    class Stub:
        calls = []

        def check_inputs(self, prompts, height, width, num_frames, seed=0, seeds=None):
            if any(s < 0 for s in seeds):
                raise ValueError(f"seeds must be non-negative, got {seeds}")

        def __call__(self, prompts, **kw):
            self.calls.append(prompts)

    with pytest.raises(ValueError, match="non-negative"):
        evaluate(pipeline=Stub(), prompts=["a", "b"], reward_specs=["brightness"], height=32, width=32, num_frames=9,
                 seeds=[[0], [1, -1]])
    assert Stub.calls == []
