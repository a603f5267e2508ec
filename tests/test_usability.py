"""What a new user meets first: --help generated from the config, YAML --print-config, one usage per entry
point, logging (--log-level/--quiet, per-chunk sampler progress, one-time builds announced), rewards as plain
functions and objects, sample videos and a stable W&B run in the dashboards, and `latest` as a path."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import io
import json
import logging
import os
import sys
import typing
from pathlib import Path

import diffusers  # noqa: F401 - imported here, outside capsys: their log handlers keep the session's stderr
import pytest
import transformers  # noqa: F401
import yaml

from arcopo_fast import checkpointing, cli
from arcopo_fast import log as log_setup
from arcopo_fast.config import DEFAULT_PRESET, RewardEntry, TrainConfig, load_config

ENTRY_POINTS = ("train", "collect", "sample", "evaluate", "merge")
TINY = [
    "sampler.num_chunks=2", "sampler.latent_height=4", "sampler.latent_width=4", "algo.group_size=4",
    "algo.num_anchors=2", "algo.epochs=1", "run.micro_batch=4", "run.checkpoint_every=1", "adapter.rank=4",
    "adapter.alpha=8", "model.embed_cache_dir=null",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _restore_logging(monkeypatch):
    """configure() sets process-wide state (handler, level, captureWarnings, --quiet's environment for the
    Hugging Face libraries): undo it after each test."""
    for key in log_setup.QUIET_ENV:
        monkeypatch.delenv(key, raising=False)
    yield
    for key in log_setup.QUIET_ENV:  # set by configure() itself; monkeypatch then restores the originals
        os.environ.pop(key, None)
    for name in ("transformers", "diffusers"):
        mod = sys.modules.get(f"{name}.utils.logging")
        if mod is not None:
            mod.set_verbosity_warning()
            mod.enable_progress_bar()
    for name in (log_setup.ROOT, "py.warnings"):
        logger = logging.getLogger(name)
        for h in [h for h in logger.handlers if getattr(h, "_arcopo", False)]:
            logger.removeHandler(h)
        logger.setLevel(logging.NOTSET)
    logging.captureWarnings(False)


def _help(module: str, *argv: str) -> str:
    mod = importlib.import_module(f"arcopo_fast.{module}")
    out = io.StringIO()
    with pytest.raises(SystemExit) as e, _redirect_stdout(out):
        (mod.parse_args if hasattr(mod, "parse_args") else mod.main)([*argv, "--help"])
    assert e.value.code == 0
    return out.getvalue()


def _redirect_stdout(buf):
    import contextlib

    return contextlib.redirect_stdout(buf)


# ----------------------------------------------------------------------------------------- --help and usage


def test_train_help_lists_every_field_with_type_value_and_docstring():
    text = _help("train")
    g = cli.preset_values(DEFAULT_PRESET)["algo"]["group_size"]
    note = "" if g == 12 else "   (field default 12)"
    assert f"  algo.group_size: int = {g}{note}\n      G: branches forked per group." in text
    hints = typing.get_type_hints(TrainConfig)
    for sec in dataclasses.fields(TrainConfig):
        docs = cli.field_docs(hints[sec.name])
        for f in dataclasses.fields(hints[sec.name]):
            assert f"  {sec.name}.{f.name}: " in text, f"{sec.name}.{f.name} missing from --help"
            assert docs.get(f.name), f"config field {sec.name}.{f.name} has no docstring"
            assert " ".join(docs[f.name].split())[:60] in " ".join(text.split()), f"{sec.name}.{f.name}'s docstring"
    for f in dataclasses.fields(RewardEntry):
        assert f"reward.rewards[].{f.name}: " in text
    # the values shown are those of the --preset given on the same command line
    sf = _help("train", "--preset", "self-forcing-1.3b")
    assert "  algo.group_size: int = 12\n" in sf and "  model.preset: str = wan-1.3b   (field default tiny)" in sf


def test_each_entry_point_has_its_own_usage_and_the_logging_flags():
    for name in ENTRY_POINTS:
        text = _help(name)
        first_doc_line = importlib.import_module(f"arcopo_fast.{name}").__doc__.strip().splitlines()[0]
        assert text.startswith(f"usage: python -m arcopo_fast.{name} "), (name, text[:80])
        assert first_doc_line in text, name
        assert "--log-level {debug,info,warning,error}" in text and "--quiet" in text, name
    assert "Collect the semi-on-policy replay buffer" in _help("collect")
    assert "Train a streaming video generator" not in _help("collect")


def test_docstring_line_breaks_survive_into_help():
    """A backslash at a line end inside a plain docstring joins the lines ("...dmd.pt         model.te...")."""
    for name in ENTRY_POINTS:
        path = Path(importlib.import_module(f"arcopo_fast.{name}").__file__)
        source = path.read_text()
        node = ast.parse(source).body[0]
        literal = ast.get_source_segment(source, node.value)
        assert literal.count("\n") == node.value.value.count("\n"), f"{name}: a backslash-newline joins docstring lines"
    assert "model.checkpoint=ckpts/self_forcing_dmd.pt \\\n        model.text_encoder=" in _help("train")


def test_print_config_is_yaml_that_config_reads_back(tmp_path, capsys):
    from arcopo_fast.collect import main as collect_main
    from arcopo_fast.train import main as train_main

    overrides = ["algo.group_size=6", "algo.steps=[0, 2]", "optim.lr=1e-4",
                 "reward.rewards=[{name: color, weight: 2.0, kwargs: {target: [1, 0, 0]}}]"]  # fmt: skip
    assert train_main(["--print-config", *overrides]) == 0
    text = capsys.readouterr().out
    load_config(DEFAULT_PRESET, None, overrides).save(tmp_path / "saved.yaml")
    assert text == (tmp_path / "saved.yaml").read_text()  # the YAML a run saves as config.yaml, not JSON
    data = yaml.safe_load(text)
    assert data["algo"]["group_size"] == 6 and data["reward"]["rewards"][0]["kwargs"] == {"target": [1, 0, 0]}
    (tmp_path / "run.yaml").write_text(text)
    assert load_config(DEFAULT_PRESET, str(tmp_path / "run.yaml")).to_dict() == load_config(DEFAULT_PRESET, None, overrides).to_dict()
    assert collect_main(["--print-config", "--config", str(tmp_path / "run.yaml")]) == 0
    assert capsys.readouterr().out == text  # collect resolves the same config, printed the same way


# ----------------------------------------------------------------------------------------------- logging


def test_log_levels_quiet_warnings_and_progress_flag():
    buf = io.StringIO()
    log_setup.configure("info", stream=buf)
    logger = logging.getLogger("arcopo_fast.some.module")
    logger.info("hello %d", 1)
    logger.debug("not shown")
    import warnings

    warnings.warn("careful", UserWarning, stacklevel=1)
    assert log_setup.progress_enabled()
    log_setup.configure("debug", stream=buf)  # replaces the previous set-up: no doubled lines
    logger.debug("details")
    log_setup.configure("info", quiet=True, stream=buf)
    logger.info("hidden")
    logger.warning("still shown")
    assert not log_setup.progress_enabled()
    lines = buf.getvalue().splitlines()
    assert lines == [
        "[arcopo_fast] hello 1",
        "[arcopo_fast] WARNING: " + lines[1].split("WARNING: ", 1)[1],
        "[arcopo_fast] arcopo_fast.some.module: details",
        "[arcopo_fast] WARNING: still shown",
    ]
    assert "UserWarning: careful" in lines[1]
    with pytest.raises(ValueError, match="log level"):
        log_setup.configure("loud")


def test_entry_points_hide_the_hugging_face_loading_bars():
    """transformers drew a "Loading weights" bar (through our own chunk bar) for every 2 MB text encoder:
    the entry points switch the libraries' bars off, and their messages only with --quiet."""
    hf = sys.modules["transformers.utils.logging"]
    log_setup.configure("info", stream=io.StringIO())
    assert not hf.is_progress_bar_enabled() and os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1"
    assert "TRANSFORMERS_VERBOSITY" not in os.environ and hf.get_verbosity() < logging.ERROR
    log_setup.configure("info", quiet=True, stream=io.StringIO())
    assert hf.get_verbosity() == logging.ERROR and os.environ.get("TRANSFORMERS_VERBOSITY") == "error"


def test_one_time_asset_builds_announce_themselves(tmp_path):
    from arcopo_fast.model.tiny_assets import _ensure, build_tiny_text_encoder

    buf = io.StringIO()
    log_setup.configure("info", stream=buf)
    _ensure(tmp_path / "te", build_tiny_text_encoder)
    _ensure(tmp_path / "te", build_tiny_text_encoder)  # cached: silent
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("[arcopo_fast] building the tiny text encoder into " + str(tmp_path / "te"))
    assert "once; cached" in lines[0] and lines[1].startswith("[arcopo_fast] built the tiny text encoder in ")


def test_sample_reports_chunks_at_debug_and_is_silent_with_quiet(tmp_path, capsys):
    from arcopo_fast.sample import main as sample_main

    args = ["--prompt", "a red kite", "--num-frames", "21", "--height", "32", "--width", "32"]  # 2 chunks
    assert sample_main([*args, "--out", str(tmp_path / "a.mp4"), "--log-level", "debug"]) == 0
    err = capsys.readouterr().err
    assert "arcopo_fast.sampler: chunk 1/2 denoised" in err and "arcopo_fast.sampler: chunk 2/2 denoised" in err
    assert f"[arcopo_fast] wrote {tmp_path / 'a.mp4'}" in err
    assert sample_main([*args, "--out", str(tmp_path / "b.mp4"), "--quiet"]) == 0
    out = capsys.readouterr()
    assert (tmp_path / "b.mp4").is_file() and out.err == "" and out.out == ""


# ---------------------------------------------------------------- rewards, dashboards, `latest` as a path


def test_entry_points_log_under_the_package_logger_when_run_with_python_m(tmp_path):
    """Under `python -m arcopo_fast.X` the module's __name__ is "__main__": a getLogger(__name__) logger sits
    outside `arcopo_fast`, so its lines ("wrote ...", "run directory: ...") were silently dropped."""
    for name in ENTRY_POINTS:
        source = Path(importlib.import_module(f"arcopo_fast.{name}").__file__).read_text()
        assert "getLogger(__name__)" not in source, f"arcopo_fast.{name} logs as '__main__' under python -m"
    import subprocess

    res = {"means": {"brightness": 0.5}, "rewards": ["brightness"], "per_prompt": {}}
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        (tmp_path / run / "results.json").write_text(json.dumps(res))
    proc = subprocess.run(
        [sys.executable, "-m", "arcopo_fast.evaluate", "--compare", str(tmp_path / "a" / "results.json"),
         str(tmp_path / "b" / "results.json"), "--out", str(tmp_path / "cmp")],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"[arcopo_fast] wrote {tmp_path / 'cmp' / 'comparison.md'}" in proc.stderr


def test_two_iteration_training_with_a_module_function_reward(tmp_path, capsys):
    from arcopo_fast.train import main

    out = tmp_path / "fn"
    rewards = "reward.rewards=[{name: 'reward_helpers:redness'}, {name: 'reward_helpers:scaled_red', weight: 0.5, kwargs: {gain: 2.0}}]"
    assert main(["--preset", "tiny", *TINY, rewards, "run.iterations=2", "run.sample_videos=false", f"run.out_dir={out}"]) == 0
    err = capsys.readouterr().err
    assert f"[arcopo_fast] run directory: {out}" in err
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for r in rows:  # the function's name is its label; total = redness + 0.5 * (2 * red) = 2 * red
        assert r["reward/mean"] == pytest.approx(2 * r["reward/redness/mean"], rel=1e-5)
        assert r["reward/scaled_red/red/mean"] == pytest.approx(2 * r["reward/redness/mean"], rel=1e-5)


def _events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def _wandb_run_dirs(out: Path) -> list[Path]:
    return sorted((out / "wandb").glob("offline-run-*"))


def test_trainer_reward_objects_dashboard_videos_wandb_resume_and_latest(tmp_path, monkeypatch):
    """Trainer(cfg, rewards=[function, object]) trains and records them; TensorBoard gets GIF sample videos
    (before, every N, after) read back from the event files; W&B (offline) gets the mp4s, and a resumed run
    reuses the W&B run id saved in the run folder; checkpoints/latest works as a path for merge/evaluate."""
    wandb = pytest.importorskip("wandb")
    from PIL import Image
    from reward_helpers import MeanRed, redness

    from arcopo_fast.trainer import Trainer

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "dash"
    extra = ["run.tensorboard=true", "run.wandb=true", "run.sample_every=1", "run.progress=false", f"run.out_dir={out}"]
    cfg = load_config("tiny", None, [*TINY, "run.iterations=2", *extra])
    Trainer(cfg, rewards=[redness, MeanRed()]).run()
    assert cfg.reward.rewards[0].name == "brightness"  # the caller's config is not modified
    saved = yaml.safe_load((out / "config.yaml").read_text())["reward"]["rewards"]
    assert [r["name"] for r in saved] == ["reward_helpers:redness", "reward_helpers:MeanRed"]
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["reward/mean"] == pytest.approx(row["reward/redness/mean"] + row["reward/MeanRed/red/mean"], rel=1e-5)

    acc = _events(out / "tensorboard")
    images = acc.Images("samples")
    assert [im.step for im in images] == [0, 1, 2]  # before, iteration 1 (every 1), after
    gif = Image.open(io.BytesIO(images[0].encoded_image_string))
    assert gif.format == "GIF" and gif.n_frames == 4 * (2 * 3 - 1) + 1 and (images[0].width, images[0].height) == gif.size
    assert "reward/mean" in acc.Tags()["scalars"]
    for name in ("before", "iter_000001", "after"):
        assert (out / "samples" / f"{name}.mp4").is_file()

    run_id = (out / "wandb_run_id").read_text().strip()
    first = _wandb_run_dirs(out)
    assert len(first) == 1 and first[0].name.endswith(run_id)
    assert len(list(first[0].glob("files/media/videos/samples*.mp4"))) == 3
    # resume: the same W&B run id, in a new offline folder (W&B syncs both into one run)
    cfg2 = load_config("tiny", None, [*TINY, "run.iterations=3", *extra])
    Trainer(cfg2, resume=True, rewards=[redness, MeanRed()]).run()
    assert (out / "wandb_run_id").read_text().strip() == run_id
    assert [d.name.rsplit("-", 1)[1] for d in _wandb_run_dirs(out)] == [run_id, run_id]
    assert [im.step for im in _events(out / "tensorboard").Images("samples")][-1] == 3
    assert wandb.run is None  # finished

    # checkpoints/latest is a marker file; it works as a path wherever a checkpoint or adapter is taken
    from arcopo_fast.evaluate import main as eval_main
    from arcopo_fast.merge import main as merge_main

    latest = out / "checkpoints" / "latest"
    assert latest.is_file() and checkpointing.resolve(latest) == checkpointing.resolve(out)
    assert merge_main(["--base", str(out / "base_model.safetensors"), "--on", str(latest), "--out", str(tmp_path / "m.safetensors")]) == 0
    (tmp_path / "p.txt").write_text("a red kite\n")
    assert eval_main(["--checkpoint", str(out / "base_model.safetensors"), "--adapter", f"{latest}/adapter:0.8",
                      "--prompts", str(tmp_path / "p.txt"), "--num-frames", "9", "--height", "32", "--width", "32",
                      "--rewards", "brightness", "--out", str(tmp_path / "ev")]) == 0  # fmt: skip


def test_real_size_presets_refuse_random_weights(tmp_path):
    for d in ("te", "vae"):
        (tmp_path / d).mkdir()
    paths = [f"model.text_encoder={tmp_path / 'te'}", f"model.vae={tmp_path / 'vae'}"]
    with pytest.raises(ValueError, match=r"config model\.checkpoint: the 'wan-1.3b' model needs its trained weights.*model\.allow_random_init=true"):
        load_config("self-forcing-1.3b", None, paths)
    assert load_config("self-forcing-1.3b", None, [*paths, "model.allow_random_init=true"]).model.allow_random_init
    (tmp_path / "sf.pt").write_bytes(b"")
    load_config("self-forcing-1.3b", None, [*paths, f"model.checkpoint={tmp_path / 'sf.pt'}"])
    load_config("tiny")  # the tiny preset is random by design


def test_latest_marker_works_as_a_path_to_a_checkpoint_or_its_adapter(tmp_path):
    """<run>/checkpoints/latest is a file naming the newest checkpoint; the README's
    `.../checkpoints/latest/adapter` and merge's `--on .../checkpoints/latest` resolve through it."""
    from model_helpers import make_tiny_model

    from arcopo_fast import adapters
    from arcopo_fast.merge import adapter_dir

    ckpts = tmp_path / "run" / "checkpoints"
    model = make_tiny_model()
    adapters.add_lora(model, "on", rank=2, alpha=4, target_modules=load_config().adapter.target_modules)
    adapters.save_adapter(model, "on", ckpts / "iter_000003" / "adapter")
    (ckpts / "iter_000003" / "state.json").write_text('{"iteration": 3}')
    (ckpts / "latest").write_text("iter_000003")
    assert checkpointing.expand_latest(ckpts / "latest" / "adapter") == ckpts / "iter_000003" / "adapter"
    assert checkpointing.resolve(ckpts / "latest") == ckpts / "iter_000003"
    assert adapter_dir(str(ckpts / "latest")) == adapter_dir(str(ckpts / "latest" / "adapter")) == ckpts / "iter_000003" / "adapter"
    adapters.load_adapter(make_tiny_model(), "on", ckpts / "latest" / "adapter")
    (ckpts / "latest").write_text("../elsewhere")
    with pytest.raises(ValueError, match="does not name a checkpoint folder"):
        checkpointing.expand_latest(ckpts / "latest" / "adapter")


def test_sample_refuses_a_random_real_size_model(tmp_path, capsys):
    """`sample --preset wan-1.3b` without a checkpoint would write noise from a random 1.3B model: refused
    before anything is built, naming the flag that allows it."""
    from arcopo_fast.pipeline import load_generator
    from arcopo_fast.sample import main as sample_main

    assert sample_main(["--prompt", "a kite", "--preset", "wan-1.3b", "--out", str(tmp_path / "v.mp4")]) == 2
    assert "--allow-random-init" in capsys.readouterr().err and not (tmp_path / "v.mp4").exists()
    with pytest.raises(ValueError, match="random weights"):
        load_generator(preset="wan-1.3b")
