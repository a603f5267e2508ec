"""Reliability harness: a tiny training run is stopped every way a real one is (kill -9 at random moments
and inside checkpoint writes, one Ctrl-C, two Ctrl-Cs between the optimizer steps of an iteration and while a
reward hangs, SIGTERM, a full disk while writing metrics or a checkpoint), resumed after each, and must end
bit-exact with an uninterrupted run, with every metrics row exactly once.

The training processes are forked from a multiprocessing forkserver that imports torch and the package once
(a fresh interpreter per process would cost most of the time budget); the kill moments come from a seeded RNG.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
import reliability_child
import torch
from safetensors.torch import load_file

from arcopo_fast import checkpointing

N = 10  # iterations of the run
KILL_POINTS = ["after_trainable", "after_optimizer", "before_publish", "before_latest", "in_prune"]
NOISY = ("time/", "mem/", "branch_videos")


def _argv(out: Path, stall: Path) -> list[str]:
    return [
        "sampler.num_chunks=2", "sampler.latent_height=4", "sampler.latent_width=4", "algo.group_size=4",
        "algo.num_anchors=2", "run.micro_batch=4", "run.progress=false", "run.sample_videos=false",
        "optim.lr=0.02", "adapter.rank=4", "adapter.alpha=8", "model.embed_cache_dir=null",
        f"run.iterations={N}", "run.checkpoint_every=2", "run.keep_checkpoints=1", f"run.out_dir={out}",
        f"reward.rewards=[{{name: 'reward_helpers:MeanRedStall', kwargs: {{stall: '{stall}'}}}}]",
    ]


@pytest.fixture(scope="module")
def forkserver():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["reliability_child", "reward_helpers", "arcopo_fast.train", "arcopo_fast.trainer",
                                "arcopo_fast.model.text_encoder", "arcopo_fast.model.vae", "matplotlib.pyplot"])
    return ctx


class Run:
    """One training process of the chain."""

    def __init__(self, ctx, argv, fault, log: Path):
        self.log = log
        self.proc = ctx.Process(target=reliability_child.run, args=(argv, fault, str(log)))
        self.proc.start()

    def wait(self, timeout: float = 180) -> int:
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
            pytest.fail(f"training process did not end in {timeout} s; log:\n{self.log.read_text()[-3000:]}")
        return self.proc.exitcode

    def signal(self, sig) -> None:
        os.kill(self.proc.pid, sig)


def _rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.is_file() else []


def _until(cond, timeout=60.0, what="") -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def _check_folder(out: Path, clean_exit: bool) -> None:
    """After any stop: metrics rows 0..r-1 once each, all whole lines; `latest` a complete checkpoint, no
    further than the rows (and equal to them after a clean exit)."""
    rows = [r["iteration"] for r in _rows(out)]
    assert rows == list(range(len(rows))), rows
    ckpt = checkpointing.latest(out / "checkpoints")
    if ckpt is None:
        return
    assert checkpointing.is_complete(ckpt)
    k = checkpointing.iteration_of(ckpt)
    assert k <= len(rows) and (not clean_exit or k == len(rows)), (k, rows)


@pytest.mark.slow
def test_kills_signals_and_full_disks_lose_nothing_and_resume_bit_exact(forkserver, tmp_path):
    rng = random.Random(2024)
    stall = tmp_path / "stall"
    logs = iter(tmp_path / f"child{i}.log" for i in range(100))

    # the reference: uninterrupted
    ref = tmp_path / "ref"
    assert Run(forkserver, _argv(ref, stall), None, next(logs)).wait() == 0
    out = tmp_path / "run"
    argv, resume = _argv(out, stall), ["--resume", str(out)]

    def start(fault=None, fresh=False):
        return Run(forkserver, (argv if fresh else resume + argv), fault, next(logs))

    def done() -> bool:
        return len(_rows(out)) >= N and checkpointing.iteration_of(checkpointing.latest(out / "checkpoints") or "x") == N

    # 1. kill -9 at a random moment after the first checkpoint
    run = start(fresh=True)
    _until(lambda: checkpointing.latest(out / "checkpoints") is not None, what="the first checkpoint")
    time.sleep(rng.uniform(0.0, 0.7))
    run.signal(signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    _check_folder(out, clean_exit=False)

    # 2. a reward that hangs, then two Ctrl-Cs: the run stops at once (not after the reward's 60 s)
    stall.touch()
    hit = Path(str(stall) + ".hit")
    run = start()
    _until(hit.exists, what="the hung reward")
    run.signal(signal.SIGINT)
    time.sleep(0.3)
    run.signal(signal.SIGINT)
    t0 = time.monotonic()
    assert run.wait() == 130
    assert time.monotonic() - t0 < 20
    stall.unlink()
    hit.unlink()
    _check_folder(out, clean_exit=False)

    # 3-4. kill -9 inside a checkpoint write, at two of its points
    for point in rng.sample(KILL_POINTS, 2):
        before = len(_rows(out))
        code = start(("kill_in_save", point)).wait()
        assert done() or code == -signal.SIGKILL, (point, code, before)
        _check_folder(out, clean_exit=False)

    # 5. two Ctrl-Cs between the two optimizer steps of an iteration: stops at once, saves no torn state
    code = start(("signals", [(3, signal.SIGINT), (4, signal.SIGINT)])).wait()
    assert done() or code == 130, code
    _check_folder(out, clean_exit=False)

    # 6-7. one Ctrl-C, one SIGTERM: the iteration finishes, a checkpoint is written, exit 0
    for sig in (signal.SIGINT, signal.SIGTERM):
        assert start(("signals", [(1, sig)])).wait() == 0
        _check_folder(out, clean_exit=True)

    # 8-9. a full disk while appending a metrics row (the limit leaves room for less than a row, set after a
    # row that is not followed by a checkpoint), and while writing a checkpoint (room for rows, not for it)
    for what, extra in (("metrics", 300), ("checkpoint", 5000)):
        k = checkpointing.iteration_of(checkpointing.latest(out / "checkpoints") or "iter_0") or 0
        row = 2 if what == "metrics" and (k + 1) % 2 == 0 else 1
        log = tmp_path / f"fsize_{what}.log"
        code = Run(forkserver, resume + argv, ("fsize", row, extra), log).wait()
        if not done():
            assert code not in (0, 130, -signal.SIGKILL) and "File too large" in log.read_text(), code
        _check_folder(out, clean_exit=False)

    # 10. one Ctrl-C at a random moment
    before = len(_rows(out))
    run = start()
    _until(lambda: len(_rows(out)) > before or done(), what="a new metrics row")
    time.sleep(rng.uniform(0.0, 0.3))
    if not done():  # a run that has already finished has nothing left to interrupt
        run.signal(signal.SIGINT)
    assert run.wait() == 0
    _check_folder(out, clean_exit=True)

    # then to the end
    if not done():
        assert start().wait() == 0
    _check_folder(out, clean_exit=True)
    ref_rows, rows = _rows(ref), _rows(out)
    assert [r["iteration"] for r in rows] == list(range(N))
    for a, b in zip(ref_rows, rows, strict=True):
        assert {k: v for k, v in a.items() if not k.startswith(NOISY)} == {k: v for k, v in b.items() if not k.startswith(NOISY)}
    wa = load_file(str(checkpointing.resolve(ref) / "trainable.safetensors"))
    wb = load_file(str(checkpointing.resolve(out) / "trainable.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"iter_{N:06d}", "latest"]
