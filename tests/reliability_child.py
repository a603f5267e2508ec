"""The child side of test_reliability.py: one `python -m arcopo_fast.train` process (forked from a server
that has imported everything once), with an optional fault injected at a precise point:

    ("kill_in_save", point)       SIGKILL itself inside its first checkpoint save, at `point`:
                                  after_trainable | after_optimizer | before_publish | before_latest | in_prune
    ("signals", [(step, SIG)...]) send itself SIG just before its step-th training step (1-based; two per
                                  iteration): SIGINTs before steps 3 and 4 stop it between the two steps of an
                                  iteration
    ("fsize", row, extra)         after its row-th metrics row, limit the size of any file it writes to the
                                  current size of metrics.jsonl + extra bytes (RLIMIT_FSIZE: writes past it fail
                                  with EFBIG, as on a full disk)
"""

from __future__ import annotations

import os
import re
import signal
import sys


def _kill():
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_in_save(point: str) -> None:
    import shutil

    import torch

    from arcopo_fast import checkpointing

    real_save_file, real_torch_save = checkpointing.save_file, torch.save
    real_replace, real_rmtree = os.replace, shutil.rmtree

    def save_file(tensors, path, *a, **k):
        real_save_file(tensors, path, *a, **k)
        if point == "after_trainable":
            _kill()

    def torch_save(obj, f, *a, **k):
        real_torch_save(obj, f, *a, **k)
        if point == "after_optimizer" and str(f).endswith("optimizer.pt"):
            _kill()

    def replace(src, dst, *a, **k):
        name = os.path.basename(str(dst))
        if (point == "before_publish" and re.fullmatch(r"iter_\d+", name)) or (point == "before_latest" and name == "latest"):
            _kill()
        return real_replace(src, dst, *a, **k)

    def rmtree(path, *a, **k):
        if point == "in_prune" and re.fullmatch(r"\.iter_\d+\.old-\d+", os.path.basename(str(path))):
            files = sorted(f for f in os.listdir(path) if os.path.isfile(os.path.join(path, f)))
            os.remove(os.path.join(path, files[0]))  # half removed
            _kill()
        return real_rmtree(path, *a, **k)

    checkpointing.save_file = save_file
    torch.save = torch_save
    os.replace = replace
    shutil.rmtree = rmtree


def _signals_at_steps(plan: list[tuple[int, int]]) -> None:
    import torch

    real_step = torch.optim.AdamW.step
    count = [0]

    def step(self, *a, **k):
        if all(float(g["lr"]) == 0.0 for g in self.param_groups):
            return real_step(self, *a, **k)  # torch.distributed.checkpoint's state-initialising step on load
        count[0] += 1
        for at, sig in plan:
            if at == count[0]:
                os.kill(os.getpid(), sig)  # handled before the next bytecode: a second SIGINT raises here
        return real_step(self, *a, **k)

    torch.optim.AdamW.step = step


def _fsize_after_row(row: int, extra: int) -> None:
    import resource

    from arcopo_fast.metrics import MetricsLogger

    real_log = MetricsLogger.log
    count = [0]

    def log(self, iteration, metrics):
        real_log(self, iteration, metrics)
        count[0] += 1
        if count[0] == row:
            size = self.path.stat().st_size + extra
            resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))

    MetricsLogger.log = log


def run(argv: list[str], fault: tuple | None, log_path: str) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    import torch

    torch.set_num_threads(1)
    if fault is not None:
        kind, *args = fault
        {"kill_in_save": _kill_in_save, "signals": _signals_at_steps, "fsize": _fsize_after_row}[kind](*args)
    from arcopo_fast.train import main

    code = main(argv)
    # A signal the test sends "at a random moment" can land after the run has finished (its last checkpoint
    # written, main returned): not the trainer's to handle, and no reason for a finished run to exit 1.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(code)
