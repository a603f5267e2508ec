"""Trust (issue 12): nothing from a run folder executes code, run folders are owned (resume writes where it
is pointed, fresh runs do not clobber, one run per folder), checkpoints and metrics survive damage, bad
configs fail before anything is written, the replay buffer is checked, ops refuse bad arguments."""

from __future__ import annotations

import triton_env  # noqa: F401, I001  # isort: skip  (first: TRITON_INTERPRET=1 before triton is imported)

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from arcopo_fast import checkpointing, ops
from arcopo_fast.config import load_config
from arcopo_fast.metrics import MetricsLogger
from arcopo_fast.rewards import RewardError
from arcopo_fast.trainer import Trainer

TESTS = Path(__file__).resolve().parent


def tiny_overrides(*extra: str) -> list[str]:
    """The smallest training run (test_train.tiny without run.out_dir)."""
    return [
        "sampler.num_chunks=2", "sampler.latent_height=4", "sampler.latent_width=4", "algo.group_size=4",
        "algo.num_anchors=2", "run.micro_batch=4", "run.progress=false", "run.sample_videos=false",
        "run.checkpoint_every=1", "optim.lr=0.02", "adapter.rank=4", "adapter.alpha=8", "model.embed_cache_dir=null",
        "reward.rewards=[{name: 'reward_helpers:MeanRed'}]", *extra,
    ]


def tiny_cfg(out: Path, *extra: str):
    return load_config("tiny", None, tiny_overrides(f"run.out_dir={out}", *extra))


def rows(run: Path) -> list[int]:
    return [json.loads(ln)["iteration"] for ln in (run / "metrics.jsonl").read_text().splitlines()]


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "trainable.safetensors"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A 2-iteration tiny run (checkpoints iter_000001 and iter_000002); tests copy it before changing it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    Trainer(tiny_cfg(out, "run.iterations=2")).run()
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------------------
# Code execution
# ---------------------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates a marker file (stands in for any command a crafted file could run)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_resume_never_unpickles_the_optimizer_state(finished_run, tmp_path):
    import numpy

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    ckpt = _save(tmp_path / "unit", 1, model, opt)
    osd = torch.load(ckpt / "optimizer.pt", weights_only=True)
    marker = tmp_path / "pwned"
    torch.save(dict(osd, extra=_Payload(str(marker))), ckpt / "optimizer.pt")
    with pytest.raises(ValueError, match="--allow-pickle"):
        checkpointing.load(ckpt, model=model, optimizer=opt)
    assert not marker.exists()
    # a trusted legacy checkpoint (a numpy scalar where a float belongs) loads with allow_pickle only
    osd["param_groups"][0]["lr"] = numpy.float64(0.0123)
    torch.save(osd, ckpt / "optimizer.pt")
    with pytest.raises(ValueError, match="--allow-pickle"):
        checkpointing.load(ckpt, model=model, optimizer=opt)
    checkpointing.load(ckpt, model=model, optimizer=opt, allow_pickle=True)
    assert opt.param_groups[0]["lr"] == 0.0123
    # the CLI: a crafted optimizer.pt in a run folder stops the resume, and runs nothing
    from arcopo_fast.train import main

    run = copy_run(finished_run, tmp_path / "run")
    real = checkpointing.resolve(run) / "optimizer.pt"
    torch.save(dict(torch.load(real, weights_only=True), extra=_Payload(str(marker))), real)
    assert main(["--resume", str(run), "run.iterations=3", *tiny_overrides()]) == 2
    assert not marker.exists() and rows(run) == [0, 1]


def test_stored_import_strings_must_be_given_again_to_resume(finished_run, tmp_path, capsys):
    from arcopo_fast.train import main

    run = copy_run(finished_run, tmp_path / "run")
    marker = tmp_path / "pwned"
    state_file = checkpointing.resolve(run) / "state.json"
    state = json.loads(state_file.read_text())
    state["config"]["reward"]["rewards"] = [{"name": "reward_helpers:TouchOnInit", "kwargs": {"path": str(marker)}}]
    state_file.write_text(json.dumps(state))
    assert main(["--resume", str(run), "run.iterations=3", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "reward_helpers:TouchOnInit" in err and "--trust-run-config" in err
    assert not marker.exists()
    # given again on the command line, or trusted explicitly: accepted
    again = "reward.rewards=[{name: 'reward_helpers:TouchOnInit', kwargs: {path: x}}]"
    assert main(["--resume", str(run), again, "--print-config"]) == 0
    assert main(["--resume", str(run), "--trust-run-config", "--print-config"]) == 0
    assert not marker.exists()


def test_pickle_refusals_offer_the_cli_flag(tmp_path):
    import argparse

    from arcopo_fast.model.checkpoint import CheckpointError, load_model

    path = tmp_path / "obj.pt"
    torch.save({"x": torch.zeros(1), "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        load_model(path)


def test_a_checkpoint_with_non_finite_weights_is_refused(tmp_path):
    from model_helpers import make_tiny_model

    from arcopo_fast.model.checkpoint import CheckpointError, load_model, save_model
    from arcopo_fast.sample import main as sample_main

    model = make_tiny_model()
    with torch.no_grad():
        model.head.head.weight[0, 0] = float("nan")
    save_model(model, tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match="non-finite"):
        load_model(tmp_path / "nan.safetensors")
    out = tmp_path / "v.mp4"
    assert sample_main(["--prompt", "a kite", "--checkpoint", str(tmp_path / "nan.safetensors"), "--out", str(out), "--num-frames", "9",
                        "--height", "32", "--width", "32"]) != 0
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------
# Run-folder ownership
# ---------------------------------------------------------------------------------------------------------


def test_resume_of_a_copied_run_writes_into_the_copy(finished_run, tmp_path):
    from arcopo_fast.train import main

    orig = copy_run(finished_run, tmp_path / "orig")
    snap = copy_run(orig, tmp_path / "snap")  # its stored run.out_dir still names the finished run
    before = {p.relative_to(orig): p.read_bytes() for p in orig.rglob("*") if p.is_file()}
    assert main(["--resume", str(snap), "run.iterations=3", *tiny_overrides()]) == 0
    assert rows(snap) == [0, 1, 2] and checkpointing.resolve(snap).name == "iter_000003"
    assert {p.relative_to(orig): p.read_bytes() for p in orig.rglob("*") if p.is_file()} == before
    assert rows(finished_run) == [0, 1]
    # an explicit run.out_dir elsewhere is refused, naming both folders
    assert main(["--print-config", "--resume", str(snap), f"run.out_dir={orig}", *tiny_overrides()]) == 2
    # resuming an older checkpoint of a run would discard its newer iterations: refused unless --overwrite
    old = snap / "checkpoints" / "iter_000002"
    assert main(["--resume", str(old), "run.iterations=3", *tiny_overrides()]) == 2
    assert rows(snap) == [0, 1, 2]


def test_a_fresh_run_refuses_a_used_folder_unless_overwrite(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    base = (run / "base_model.safetensors").read_bytes()
    metrics = (run / "metrics.jsonl").read_text()
    with pytest.raises(FileExistsError, match="--overwrite"):
        Trainer(tiny_cfg(run, "run.iterations=1", "run.seed=3"))
    assert (run / "base_model.safetensors").read_bytes() == base and (run / "metrics.jsonl").read_text() == metrics
    t = Trainer(tiny_cfg(run, "run.iterations=1", "run.seed=3"), overwrite=True)
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
    t.close()


def test_one_run_per_folder(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    first = Trainer(tiny_cfg(run, "run.iterations=3"), resume=True)
    with pytest.raises(RuntimeError, match=f"in use by process {os.getpid()}"):
        Trainer(tiny_cfg(run, "run.iterations=3"), resume=True)
    first.close()
    # the lock of a process that is gone (a lock file nobody holds) is taken over
    Trainer(tiny_cfg(run, "run.iterations=3"), resume=True).close()


def _save(root, it, model, opt, **kw):
    return checkpointing.save(root, it, model=model, optimizer=opt, state={}, is_main=True, **kw)


def test_pruning_sorts_by_number_and_keeps_the_newest_and_latest(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    root = tmp_path / "checkpoints"
    for it in (999_998, 999_999, 1_000_000):
        _save(root, it, model, opt, keep=2)
    assert sorted(p.name for p in root.glob("iter_*")) == ["iter_1000000", "iter_999999"]
    assert checkpointing.latest(root).name == "iter_1000000"
    _save(root, 5, model, opt, keep=1)  # an older iteration saved last (explicit rewind): both survive
    assert {p.name for p in root.glob("iter_*")} == {"iter_000005", "iter_1000000"}
    assert checkpointing.latest(root).name == "iter_000005"


def test_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    root = tmp_path / "checkpoints"
    for it in (1, 2):
        _save(root, it, model, opt, keep=5)
    (root / "latest").write_text("")  # truncated
    assert checkpointing.latest(root).name == "iter_000002"
    (root / "latest").write_text("iter_000009")  # points at a folder that is gone
    assert checkpointing.latest(root).name == "iter_000002"
    (root / "iter_000002" / "optimizer.pt").unlink()  # incomplete: skipped
    assert checkpointing.latest(root).name == "iter_000001"
    assert checkpointing.resolve(tmp_path).name == "iter_000001"


def test_stale_temporary_folders_are_removed(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    root = tmp_path / "checkpoints"
    for junk in (".iter_000003.tmp-999999", ".iter_000002.old-999999"):
        (root / junk).mkdir(parents=True)
        (root / junk / "trainable.safetensors").write_bytes(b"partial")
    (root / ".latest.tmp-999999").write_text("iter_0")
    _save(root, 1, model, opt)
    assert sorted(p.name for p in root.iterdir()) == ["iter_000001", "latest"]


def test_damaged_checkpoints_are_named(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    ckpt = _save(tmp_path, 1, model, opt)
    (ckpt / "trainable.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=str(ckpt / "trainable.safetensors")):
        checkpointing.load(ckpt, model=model, optimizer=opt)
    ckpt = _save(tmp_path, 2, model, opt)
    data = (ckpt / "optimizer.pt").read_bytes()
    (ckpt / "optimizer.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=str(ckpt / "optimizer.pt")):
        checkpointing.load(ckpt, model=model, optimizer=opt)


def test_non_finite_weights_are_never_saved(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    _save(tmp_path, 1, model, opt)
    with torch.no_grad():
        model.weight.fill_(float("inf"))
    with pytest.raises(ValueError, match="non-finite"):
        _save(tmp_path, 2, model, opt)
    assert checkpointing.latest(tmp_path).name == "iter_000001"


def test_metrics_survive_a_torn_last_line(tmp_path):
    log = MetricsLogger(tmp_path)
    for it in range(3):
        log.log(it, {"reward/mean": float(it)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 3, "rew')  # a write cut short (disk full, killed)
    assert [r["iteration"] for r in MetricsLogger(tmp_path).history()] == [0, 1, 2]
    MetricsLogger(tmp_path, resume_from=2)  # a resume repairs the file
    assert rows(tmp_path) == [0, 1]
    # a failing append leaves no partial line behind
    log = MetricsLogger(tmp_path)

    real_write, calls = os.write, []

    def full(fd, data):  # the first write lands 7 bytes, the next one finds the disk full
        if calls:
            raise OSError(28, "No space left on device")
        calls.append(1)
        return real_write(fd, bytes(data[:7]))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "write", full)
        with pytest.raises(OSError, match="No space"):
            log.log(2, {"reward/mean": 2.0})
    assert rows(tmp_path) == [0, 1]


# ---------------------------------------------------------------------------------------------------------
# Interrupts inside an iteration, rewards that hang or exit
# ---------------------------------------------------------------------------------------------------------


def _boundary_snapshots(t: Trainer) -> dict[int, dict[str, torch.Tensor]]:
    """Trainable weights after each optimizer step, keyed by the step count."""
    snaps: dict[int, dict[str, torch.Tensor]] = {}

    def hook(opt, args, kwargs):
        snaps[len(snaps) + 1] = {n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}

    t.optimizer.register_step_post_hook(hook)
    return snaps


def test_an_interrupt_between_optimizer_steps_never_saves_a_torn_iteration(tmp_path):
    out = tmp_path / "torn"
    t = Trainer(tiny_cfg(out, "run.iterations=3", "run.checkpoint_every=5"))  # epochs=2: two steps per iteration
    snaps = _boundary_snapshots(t)

    def interrupt(opt, args, kwargs):
        if len(snaps) == 3:  # iteration 1 has taken its first of two steps
            raise KeyboardInterrupt

    t.optimizer.register_step_post_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        t.run()
    saved = checkpointing.latest(out / "checkpoints")
    if saved is not None:  # only a state at an iteration boundary may be saved
        it = json.loads((saved / "state.json").read_text())["iteration"]
        w = weights(saved)
        assert all(torch.equal(w[k], snaps[2 * it][k]) for k in w)
    assert rows(out) == [0]


def test_an_interrupt_during_a_rollout_saves_the_completed_iterations(tmp_path):
    out = tmp_path / "int"
    t = Trainer(tiny_cfg(out, "run.iterations=3", "run.checkpoint_every=5"))
    snaps = _boundary_snapshots(t)
    real = t.engine.rollout
    calls = []

    def rollout(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    t.engine.rollout = rollout
    with pytest.raises(KeyboardInterrupt):
        t.run()
    saved = checkpointing.latest(out / "checkpoints")
    assert saved is not None and json.loads((saved / "state.json").read_text())["iteration"] == 1
    w = weights(saved)
    assert all(torch.equal(w[k], snaps[2][k]) for k in w)
    assert rows(out) == [0]


def test_a_failed_save_after_a_failure_is_reported_not_hidden(tmp_path, caplog):
    # The emergency save of the completed iterations may fail too (a full disk): the run's own error still
    # propagates, and the log says that the completed iterations were not saved.
    t = Trainer(tiny_cfg(tmp_path / "f", "run.iterations=3", "run.checkpoint_every=5"))
    real, calls = t.engine.rollout, []

    def rollout(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    def full_disk(iteration):
        raise OSError(28, "No space left on device")

    t.engine.rollout, t.save = rollout, full_disk
    with caplog.at_level("WARNING", logger="arcopo_fast.trainer"), pytest.raises(KeyboardInterrupt):
        t.run()
    assert "No space left on device" in caplog.text and "iteration 1" in caplog.text


def test_a_failed_write_of_the_sample_scores_keeps_the_previous_file(tmp_path, monkeypatch):
    # samples/scores.json is read again by every later write_samples and at the end of the run: a file cut
    # short by a full disk would make the run (and each resume of it) fail when it finishes.
    t = Trainer(tiny_cfg(tmp_path / "sc", "run.iterations=0"))
    try:
        t.record_sample_scores("before", 0, torch.tensor([0.5, 0.7]), {"MeanRed/red": torch.tensor([0.5, 0.7])})
        real = Path.write_text

        def full_disk(self, text, *a, **k):
            real(self, text[: len(text) // 2])
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(Path, "write_text", full_disk)
        with pytest.raises(OSError, match="No space"):
            t.record_sample_scores("after", 2, torch.tensor([0.9]), {})
        monkeypatch.undo()
        assert t.sample_scores() == {"before": {"iteration": 0, "reward": pytest.approx(0.6), "MeanRed/red": pytest.approx(0.6)}}
        assert [p.name for p in (tmp_path / "sc" / "samples").iterdir()] == ["scores.json"]  # no temporary left
    finally:
        t.close()


def test_a_reward_that_hangs_times_out_naming_it(tmp_path):
    out = tmp_path / "slow"
    cfg = tiny_cfg(out, "run.iterations=3", "reward.timeout=2",
                   "reward.rewards=[{name: 'reward_helpers:SlowAfter', kwargs: {ok_calls: 1, seconds: 60}}]")
    t = Trainer(cfg)
    t0 = time.perf_counter()
    with pytest.raises(RewardError, match=r"reward 'SlowAfter' did not return within reward.timeout = 2 s"):
        t.run()
    assert time.perf_counter() - t0 < 30  # it did not wait for the reward (60 s), nor does the process
    assert checkpointing.read_state(out)["iteration"] == 1 and rows(out) == [0]


def test_a_reward_calling_sys_exit_is_a_reward_error(tmp_path):
    out = tmp_path / "exit"
    cfg = tiny_cfg(out, "run.iterations=2", "reward.rewards=[{name: 'reward_helpers:ExitAfter', kwargs: {ok_calls: 1}}]")
    with pytest.raises(RewardError, match="ExitAfter.*SystemExit"):
        Trainer(cfg).run()
    assert checkpointing.read_state(out)["iteration"] == 1


# ---------------------------------------------------------------------------------------------------------
# Config validation: before anything is written, naming the field and the constraint
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override,field",
    [
        ("optim.lr=inf", "optim.lr"),
        ("optim.lr=nan", "optim.lr"),
        ("algo.tau=.inf", "algo.tau"),
        ("optim.warmup_iterations=-1", "optim.warmup_iterations"),
        ("algo.adv_eps=-1e-6", "algo.adv_eps"),
        ("optim.betas=[1.0, 0.999]", "optim.betas"),
        ("optim.betas=[0.9, -0.1]", "optim.betas"),
        ("optim.weight_decay=-0.01", "optim.weight_decay"),
        ("optim.grad_clip=nan", "optim.grad_clip"),
        ("sampler.shift=nan", "sampler.shift"),
        ("sampler.denoising_steps=[]", "sampler.denoising_steps"),
        ("sampler.denoising_steps=[250, 500]", "sampler.denoising_steps"),
        ("sampler.context_noise=5000", "sampler.context_noise"),
        ("adapter.target_modules='(unclosed'", "adapter.target_modules"),
        ("adapter.alpha=inf", "adapter.rank/alpha"),
        ("reward.rewards=[{name: no_such_reward}]", "reward.rewards"),
        ("reward.rewards=[{name: brightness, weight: nan}]", "reward.rewards"),
        ("reward.timeout=-1", "reward.timeout"),
        ("algo.perturb_scale=nan", "algo.perturb_scale"),
        ("algo.quasi_norm_q=0", "algo.quasi_norm_q"),
    ],
)
def test_bad_values_are_refused_naming_the_field(override, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_config("tiny", None, [override])


def test_file_and_folder_errors_name_the_path(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("algo: {group_size: 4\n")
    with pytest.raises(ValueError, match=str(bad)):
        load_config("tiny", str(bad))
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match="run.out_dir"):
        load_config("tiny", None, [f"run.out_dir={afile}"])
    with pytest.raises(ValueError, match="/proc/arcopo_not_writable"):
        Trainer(tiny_cfg(Path("/proc/arcopo_not_writable/run"), "run.iterations=1"))


def test_late_failures_happen_before_anything_is_written(tmp_path):
    out = tmp_path / "late"
    with pytest.raises(RewardError, match="no_such_module_xyz"):
        Trainer(tiny_cfg(out, "run.iterations=1", "reward.rewards=[{name: 'no_such_module_xyz:R'}]"))
    assert not out.exists()


def test_a_resume_may_not_change_the_shape_of_the_run(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    for change, field in (("adapter.rank=8", "adapter.rank"), ("algo.group_size=6", "algo.group_size"),
                          ("run.seed=1", "run.seed")):
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            Trainer(tiny_cfg(run, "run.iterations=3", change), resume=True)
    assert rows(run) == [0, 1]


# ---------------------------------------------------------------------------------------------------------
# Replay buffer
# ---------------------------------------------------------------------------------------------------------


def _fake_buffer(root: Path, file: str = "group_000000.safetensors") -> None:
    from arcopo_fast.rl.replay import VERSION

    root.mkdir(parents=True, exist_ok=True)
    G, T = 4, 2
    save_file({"inputs": torch.zeros(G, T, 3, 16, 2, 2), "x0_old": torch.zeros(G, T, 3, 16, 2, 2),
               "logp_old": torch.zeros(T, G, G), "tau": torch.ones(T), "prefix_latents": torch.zeros(1, 0, 16, 2, 2)},
              str(root / "group_000000.safetensors"))
    rec = {"file": file, "group": 0, "prompt": "p", "pivot": 0, "rewards": [0.0] * G, "components": {}}
    (root / "index.json").write_text(json.dumps({"version": VERSION, "settings": {"group_size": G}, "groups": [rec]}))


def test_replay_index_paths_stay_inside_the_buffer(tmp_path):
    from arcopo_fast.rl.replay import ReplayBuffer

    _fake_buffer(tmp_path / "ok")
    assert len(ReplayBuffer(tmp_path / "ok")) == 1
    outside = tmp_path / "outside.safetensors"
    shutil.copy(tmp_path / "ok" / "group_000000.safetensors", outside)
    _fake_buffer(tmp_path / "b", file="../outside.safetensors")
    with pytest.raises(ValueError, match="outside"):
        ReplayBuffer(tmp_path / "b")
    _fake_buffer(tmp_path / "c", file="group_000007.safetensors")  # missing: found when opened, not drawn
    with pytest.raises(ValueError, match="group_000007.safetensors"):
        ReplayBuffer(tmp_path / "c")


def test_collect_refuses_a_buffer_that_exists_without_overwrite(tmp_path, capsys):
    from arcopo_fast.collect import main as collect_main

    _fake_buffer(tmp_path / "buf")
    before = (tmp_path / "buf" / "index.json").read_text()
    rc = collect_main(tiny_overrides(f"replay.buffer={tmp_path / 'buf'}", "replay.buffer_groups=1"))
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "buf" / "index.json").read_text() == before and not (tmp_path / "buf" / "collect_run").exists()
    # what the Trainer refuses (here: its run folder is a file) is one error line too, as in train
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "collect_run").write_text("")
    assert collect_main(tiny_overrides(f"replay.buffer={tmp_path / 'new'}")) == 2
    assert "run.out_dir" in capsys.readouterr().err


def test_a_failed_collection_leaves_no_index_over_new_group_files(tmp_path):
    # Collecting again (collect --overwrite) rewrites group files: the old index must be gone first, or a
    # crash would leave an index whose records (and settings) describe other tensors than the files hold.
    _fake_buffer(tmp_path / "buf")
    t = Trainer(tiny_cfg(tmp_path / "buf" / "collect_run", "run.iterations=0"))

    def crash(*args, **kwargs):
        assert not (tmp_path / "buf" / "index.json").exists()  # removed before the first rollout
        raise RuntimeError("killed mid-collection")

    t.engine.rollout = crash
    try:
        with pytest.raises(RuntimeError, match="killed"):
            t.collect_buffer(tmp_path / "buf", 2)
    finally:
        t.close()
    assert not (tmp_path / "buf" / "index.json").exists()


@pytest.fixture(scope="module")
def collected_buffer(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("buffer") / "buf"
    t = Trainer(tiny_cfg(root / "collect_run", "run.iterations=0", "replay.buffer_groups=2"))
    t.collect_buffer(root, 2)
    t.close()
    return root


@pytest.mark.parametrize("change,what", [("run.seed=1", "reference_weights"), ("model.dtype=bfloat16", "model_dtype")])
def test_a_buffer_from_other_reference_weights_is_refused(collected_buffer, tmp_path, change, what):
    with pytest.raises(ValueError, match=what):
        Trainer(tiny_cfg(tmp_path / "semi", "run.iterations=1", "run.mode=semi-on-policy",
                         f"replay.buffer={collected_buffer}", change))


def test_buffer_settings_record_seed_weights_hash_and_dtypes(collected_buffer):
    from arcopo_fast.rl.replay import ReplayBuffer

    s = ReplayBuffer(collected_buffer).settings
    assert s["seed"] == 0 and s["model_dtype"] == "float32" and s["store_dtype"] == "float32"
    assert len(s["reference_weights"]) == 64  # sha256 hex of the base weights' bytes


# ---------------------------------------------------------------------------------------------------------
# Ops: the same argument checks on every backend
# ---------------------------------------------------------------------------------------------------------


def _attn_inputs(gen=None):
    gen = gen or torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 2, 16, generator=gen) for _ in range(3))
    kc, vc = (torch.randn(3, 8, 2, 16, generator=gen) for _ in range(2))
    return q, k, v, kc, vc


BACKENDS = ["torch", "triton"] if ops.triton_available() else ["torch"]


@pytest.mark.parametrize(
    "case,match",
    [
        ("cache_len_too_long", r"cache_len must be in \[0, 8\]"),
        ("cache_len_negative", r"cache_len must be in \[0, 8\]"),
        ("cache_len_tensor_too_long", r"cache_len values must be in \[0, 8\]"),
        ("row_negative", r"cache_rows values must be in \[0, 3\)"),
        ("row_too_big", r"cache_rows values must be in \[0, 3\)"),
        ("cache_needs_grad", r"k_cache/v_cache are constants here"),
    ],
)
def test_chunk_attention_checks_arguments_on_every_backend(case, match):
    messages = []
    for be in BACKENDS:
        q, k, v, kc, vc = _attn_inputs()
        kw = dict(cache_len=4, cache_rows=torch.tensor([0, 2], dtype=torch.int32))
        if case == "cache_len_too_long":
            kw["cache_len"] = 9
        elif case == "cache_len_negative":
            kw["cache_len"] = -1
        elif case == "cache_len_tensor_too_long":
            kw["cache_len"] = torch.tensor([4, 9], dtype=torch.int32)
        elif case == "row_negative":
            kw["cache_rows"] = torch.tensor([0, -1], dtype=torch.int32)
        elif case == "row_too_big":
            kw["cache_rows"] = torch.tensor([3, 0], dtype=torch.int32)
        elif case == "cache_needs_grad":
            kc.requires_grad_(True)
        with pytest.raises(ValueError, match=match) as info:
            ops.chunk_attention(q, k, v, kc, vc, backend=be, **kw)
        messages.append(str(info.value))
    assert len(set(messages)) == 1, messages


def test_kv_fork_refuses_a_leaf_that_requires_grad_on_every_path():
    from arcopo_fast import ext

    impls = {"fallback": ext.kv_fork_torch_}
    if ext.extension_loaded():
        impls["extension"] = ext.kv_fork_
    messages = []
    for name, fn in impls.items():
        c = torch.randn(4, 3, 2).requires_grad_(True)
        before = c.detach().clone()
        with pytest.raises(ValueError, match="kv_fork_: caches\\[0\\] requires grad") as info:
            fn([c], torch.tensor([0]), torch.tensor([1]), 2)
        assert torch.equal(c.detach(), before), name
        messages.append(str(info.value))
    assert len(set(messages)) == 1, messages


def test_the_schedule_refuses_a_nan_shift_and_repeated_steps():
    from arcopo_fast.sampler import FewStepSchedule

    with pytest.raises(ValueError, match="shift"):
        FewStepSchedule(shift=float("nan"))
    with pytest.raises(ValueError, match="strictly decrease"):
        FewStepSchedule(denoising_steps=(1000, 500, 500))
