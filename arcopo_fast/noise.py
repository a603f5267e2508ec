"""Counter-based noise plan: every Gaussian tensor of a rollout is a pure function of its key.

A key is (seed, sample, chunk, step, kind, branch). Regenerating noise from counters instead of storing it
makes forks, distributed ranks and the replay buffer cheap: a buffer entry stores seeds, not tensors.

Generator: Philox4x32-10 (Salmon et al., SC'11), counter = (element, sample, kind|chunk, step|branch),
key = the 64-bit seed. Each element uses the first two 32-bit words of its own counter and a Box-Muller
transform. The Triton step kernel (kernels/sampler_step.py) evaluates the same function in-kernel: the
integer words and the uniforms are bit-identical; the normal itself goes through log/cos, whose last bits
depend on the math library (see `normal_from_uniform`).

The generator itself lives with the kernels (kernels/reference.py: torch, exact on every device;
kernels/sampler_step.py: Triton); this module owns the key -> counter layout and the public API.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import ops

__all__ = ["NoiseKind", "NoisePlan", "NoiseKey", "split_seed", "counter_words"]

MASK32 = 0xFFFFFFFF

class NoiseKind(enum.IntEnum):
    """Which noise of a rollout a key names (kept in the counter's third word, above the chunk)."""

    INITIAL = 0  # e*_c: a chunk's initial noise (step 0)
    SOLVER = 1  # xi_{c,k}: re-noising between few-step steps (step k = 1..T-1)
    PERTURB = 2  # d_i: a branch's perturbation of the pivot chunk's initial noise


def split_seed(seed: int) -> tuple[int, int]:
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed & MASK32, (seed >> 32) & MASK32


def counter_words(
    sample: torch.Tensor, chunk: int, step: int, kind: int, branch: torch.Tensor | int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Counter words c1..c3 of a key (c0 is the element index). Layout shared with the Triton kernel:
    c1 = sample, c2 = kind << 24 | chunk, c3 = step << 24 | branch."""
    if not 0 <= chunk < 2**24:
        raise ValueError(f"chunk must be in [0, 2**24), got {chunk}")
    if not 0 <= step < 256:
        raise ValueError(f"step must be in [0, 256), got {step}")
    c1 = torch.as_tensor(sample, dtype=torch.int64) & MASK32
    c2 = torch.as_tensor((int(kind) << 24) | chunk, dtype=torch.int64)
    c3 = (int(step) << 24) | (torch.as_tensor(branch, dtype=torch.int64) & 0xFFFFFF)
    return c1, c2, c3


@dataclass(frozen=True)
class NoiseKey:
    """Everything that names one noise tensor except its shape. `sample` and `branch` may be per-row
    int64 tensors [B] (one row per sample of a batch); chunk, step and kind are shared by the batch."""

    sample: torch.Tensor
    chunk: int
    step: int
    kind: NoiseKind
    branch: torch.Tensor


@dataclass(frozen=True)
class NoisePlan:
    """Deterministic noise for a whole run: `NoisePlan(seed).normal(shape, key)`.

    The same (seed, key, shape) gives the same tensor on every call, rank and device (up to the last bits
    of log/cos, see the module docstring). Different keys give independent streams.
    """

    seed: int

    def __post_init__(self):
        split_seed(self.seed)

    def key(
        self,
        sample: Sequence[int] | torch.Tensor | int,
        chunk: int,
        step: int = 0,
        kind: NoiseKind = NoiseKind.INITIAL,
        branch: Sequence[int] | torch.Tensor | int = 0,
    ) -> NoiseKey:
        """A key for a batch: one row per entry of `sample` (a device tensor stays on its device, so
        building keys inside a CUDA loop copies nothing from the host; ids are range-checked only on CPU,
        where that costs no sync)."""
        sample = torch.as_tensor(sample, dtype=torch.int64)
        sample = sample.reshape(1) if sample.ndim == 0 else sample
        if sample.ndim != 1:
            raise ValueError(f"sample must be an int or a 1-D sequence, got shape {tuple(sample.shape)}")
        branch = torch.as_tensor(branch, dtype=torch.int64, device=sample.device).expand(sample.shape)
        if sample.device.type == "cpu":
            if (sample < 0).any() or (sample >= 2**32).any():
                raise ValueError("sample ids must be in [0, 2**32)")
            if (branch < 0).any() or (branch >= 2**24).any():
                raise ValueError("branch ids must be in [0, 2**24)")
        return NoiseKey(sample, int(chunk), int(step), NoiseKind(kind), branch)

    def normal(
        self,
        shape: Sequence[int],
        key: NoiseKey,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Standard normal noise of shape [B, *shape], row b keyed by (key.sample[b], key.branch[b])."""
        shape = tuple(int(s) for s in shape)
        numel = 1
        for s in shape:
            numel *= s
        if numel >= 2**32:
            raise ValueError(f"a noise tensor holds at most 2**32 elements per sample, got {numel}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        k0, k1 = split_seed(self.seed)
        c1, c2, c3 = counter_words(key.sample, key.chunk, key.step, key.kind, key.branch)
        z = ops.philox_normal(numel, k0, k1, c1.to(device), int(c2), c3.to(device))
        return z.reshape(len(key.sample), *shape).to(dtype)

    def words(self, key: NoiseKey, device=None) -> tuple[int, int, torch.Tensor, int, torch.Tensor]:
        """(k0, k1, c1 [B], c2, c3 [B]): the raw Philox key and counter words of `key`, for kernels that
        generate this noise in-kernel (ops.consistency_step)."""
        k0, k1 = split_seed(self.seed)
        c1, c2, c3 = counter_words(key.sample, key.chunk, key.step, key.kind, key.branch)
        return k0, k1, c1.to(device), int(c2), c3.to(device)
