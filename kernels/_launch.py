"""Launch plumbing shared by the kernel modules (no kernels here)."""

from __future__ import annotations

import contextlib
import os

import torch


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (kernels then run on CPU tensors, for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_launchable(t: torch.Tensor, name: str) -> None:
    if not (t.is_cuda or interpreting()):
        raise RuntimeError(f"{name} must be a CUDA tensor (or run with TRITON_INTERPRET=1 on CPU), got {t.device}")


def on_device(t: torch.Tensor):
    """Make t's CUDA device current for the launch (Triton launches on the current device)."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
