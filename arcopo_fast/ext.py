"""Python face of the compiled extension arcopo_fast._C (csrc/, built by CMakeLists.txt).

    kv_fork_(caches, src_rows, dst_rows, n_tokens)   batched in-place KV-cache fork (one CUDA launch)
    extension_loaded() -> bool                       arcopo_fast._C imported (ops.describe() reports it)
    extension_has_cuda() -> bool                     ... and was compiled with csrc/cuda
    extension_archs() -> str                         the CUDA archs it was compiled for ("8.0;9.0+PTX")
    fallback_reason(device) -> str | None            why kv_fork_ on `device` runs the torch fallback
    kv_fork_cpp_(...)                                the compiled op, unchecked by the self-test
    kv_fork_torch_(...)                              the pure-torch fallback, same semantics and messages

kv_fork_ runs the pure-torch fallback, with one warning, when the extension cannot be imported (not
built, or built for another torch), has no CUDA kernels and gets CUDA tensors, fails its self-test on the
device (arcopo_fast.selftest: the first fork on each CUDA device and dtype is checked against the torch
fork), or raises a kernel-image / arch error (built for other archs than the card's: "no kernel image is
available", "invalid device function"). The op is registered with TORCH_LIBRARY as arcopo_fast::kv_fork_
and has a fake kernel here, so torch.compile traces it.

Checks (both paths, same ValueError texts, each naming the argument): a cache that requires grad (under
grad mode) is refused: the compiled op writes in place without autograd; metadata always (no sync); row
values (in range, distinct destinations, no destination is a source) on the host when the index tensors
are on the CPU. On CUDA they are checked on the device without a sync (device-side asserts, reported at
the next synchronizing call); ARCOPO_KV_FORK_CHECK=1 adds the host checks there too (a sync: debugging
only, not inside CUDA graph capture).
"""

from __future__ import annotations

import operator
import os
import warnings
from collections.abc import Sequence

import torch  # first: arcopo_fast._C links libtorch/libc10, which importing torch loads

try:
    from . import _C  # registers torch.ops.arcopo_fast.* (static initializers in csrc/)
except (ImportError, OSError) as _e:  # not built, or built against another torch
    _C = None
    _IMPORT_ERROR: BaseException | None = _e
else:
    _IMPORT_ERROR = None

__all__ = [
    "extension_archs", "extension_has_cuda", "extension_loaded", "fallback_reason", "kv_fork_", "kv_fork_cpp_",
    "kv_fork_torch_",
]


def extension_loaded() -> bool:
    """True when the compiled module arcopo_fast._C was imported (its ops are registered)."""
    return _C is not None


def extension_has_cuda() -> bool:
    """True when arcopo_fast._C was compiled with its CUDA kernels (torch with CUDA + nvcc at build time)."""
    return _C is not None and bool(_C.WITH_CUDA)


def extension_archs() -> str:
    """The CUDA archs arcopo_fast._C was compiled for, TORCH_CUDA_ARCH_LIST style ("" without CUDA;
    "unknown" for a module built before the list was recorded)."""
    if _C is None or not _C.WITH_CUDA:
        return ""
    return str(getattr(_C, "CUDA_ARCHS", "unknown")).replace(",", ";")


if _C is not None:

    @torch.library.register_fake("arcopo_fast::kv_fork_")
    def _kv_fork_fake(caches, src_rows, dst_rows, n_tokens):
        # Mutates `caches` in place and returns nothing: no output metadata to describe.
        return None


_warned = False  # the extension is missing: one warning per process
_warned_devices: set[str] = set()  # the extension is there but cannot serve a device: one per device
# devices where the compiled op raised a kernel-image error: the torch fork serves them from then on
_BROKEN: dict[str, str] = {}
# Messages of a CUDA binary built for other archs than the card's (cudaErrorNoKernelImageForDevice,
# cudaErrorInvalidDeviceFunction): not sticky, so the torch fallback can serve after them.
_ARCH_ERRORS = ("no kernel image is available", "invalid device function", "not compiled for")


def _warn_fallback(reason: str, device: str | None = None) -> None:
    global _warned
    if (device is None and not _warned) or (device is not None and device not in _warned_devices):
        if device is None:
            _warned = True
        else:
            _warned_devices.add(device)
        warnings.warn(
            f"arcopo_fast: kv_fork_ uses the pure-torch fallback ({reason}); build the extension with "
            "./setup.sh (pip install --no-build-isolation -e .)",
            RuntimeWarning,
            stacklevel=3,
        )


def fallback_reason(device: torch.device | str) -> str | None:
    """Why kv_fork_ on `device` runs the torch fallback (None: the compiled op serves). Does not run the
    self-test; a failed verdict already recorded counts."""
    device = torch.device(device)
    if _C is None:
        return f"arcopo_fast._C did not import: {_IMPORT_ERROR}"
    if device.type == "cuda" and not _C.WITH_CUDA:
        return "arcopo_fast._C was built without CUDA kernels"
    if str(device) in _BROKEN:
        return _BROKEN[str(device)]
    from . import selftest

    for v in selftest.verdicts():
        if v.op == "kv_fork" and v.device == str(device) and not v.ok:
            return f"self-test failed: {v.error}"
    return None


def kv_fork_cpp_(caches: list[torch.Tensor], src_rows: torch.Tensor, dst_rows: torch.Tensor, n_tokens: int) -> None:
    """The compiled op itself (no self-test, no fallback): what the self-test checks."""
    torch.ops.arcopo_fast.kv_fork_(caches, src_rows, dst_rows, n_tokens)


def _is_arch_error(e: BaseException) -> bool:
    text = str(e).lower()
    return any(m in text for m in _ARCH_ERRORS)


def kv_fork_(
    caches: Sequence[torch.Tensor], src_rows: torch.Tensor, dst_rows: torch.Tensor, n_tokens: int
) -> None:
    """In place, for every tensor c of `caches` and every pair j:

        c[dst_rows[j], :n_tokens] = c[src_rows[j], :n_tokens]

    caches:   tensors [rows_i, tokens_i, ...] (e.g. K and V of every layer; trailing shapes may differ),
              same device and dtype, dims after the row dim contiguous (rows may be strided)
    src_rows: int64 [P] on the caches' device
    dst_rows: int64 [P], distinct, none of them a source row
    n_tokens: 0 <= n_tokens <= tokens_i for every tensor
    CUDA: one launch for all tensors and pairs (up to 128 tensors), stream-ordered, no host sync, CUDA-graph
    capturable (the index VALUES are read at replay time; the tensors and n_tokens are fixed at capture).
    """
    caches = list(caches)
    n_tokens = operator.index(n_tokens)
    _check_grad(caches)  # the compiled op would write into a graph behind autograd's back
    if _C is not None:
        devs = [t.device for t in (*caches, src_rows, dst_rows) if t.is_cuda]
        device = str(devs[0]) if devs else "cpu"
        dtype = str(caches[0].dtype) if caches else "none"
        reason = _fork_fallback(device, dtype)
        if reason is None:
            try:
                kv_fork_cpp_(caches, src_rows, dst_rows, n_tokens)
                return
            except RuntimeError as e:  # torch.AcceleratorError (CUDA errors) derives from it
                if not _is_arch_error(e):
                    raise
                _BROKEN[device] = (
                    f"arcopo_fast._C (built for CUDA archs {extension_archs() or '?'}) has no kernel for "
                    f"{device}: {' '.join(str(e).split())[:200]}"
                )
                reason = _REASONS[(device, dtype)] = _BROKEN[device]
        _warn_fallback(reason, device)
    else:
        _warn_fallback(f"arcopo_fast._C did not import: {_IMPORT_ERROR}")
    kv_fork_torch_(caches, src_rows, dst_rows, n_tokens)


_REASONS: dict[tuple[str, str], str | None] = {}


def _fork_fallback(device: str, dtype: str) -> str | None:
    """fallback_reason after the self-test of the first fork on (device, dtype); memoised: one dict lookup
    per later fork. Constant for torch.compile (Python arguments, evaluated at trace time)."""
    key = (device, dtype)
    if key not in _REASONS:
        from . import selftest

        reason = fallback_reason(device)
        if reason is None and dtype != "none" and not selftest.passed("kv_fork", "fwd", "cpp", device, dtype):
            reason = fallback_reason(device)
            _warned_devices.add(device)  # the self-test's warning was the one
        _REASONS[key] = reason
    return _REASONS[key]


_fork_fallback._dynamo_marked_constant = True


def _forget() -> None:
    _REASONS.clear()
    _BROKEN.clear()
    _warned_devices.clear()


def _register_reset() -> None:
    from . import selftest

    selftest.on_reset(_forget)


_register_reset()


# ---------------------------------------------------------------------------------------------------------
# Pure-torch fallback: the same checks, in the same order, with the same messages as csrc/kv_fork.cpp.
# ---------------------------------------------------------------------------------------------------------


def _fail(msg: str) -> None:
    raise ValueError(f"kv_fork_: {msg}")


def _check_grad(caches: list[torch.Tensor]) -> None:
    if torch.is_grad_enabled():
        for i, c in enumerate(caches):
            if c.requires_grad:
                _fail(
                    f"caches[{i}] requires grad: the fork is an in-place copy that autograd does not record; fork "
                    "caches built under torch.no_grad() (or detach them)"
                )


def _check_metadata(
    caches: list[torch.Tensor], src_rows: torch.Tensor, dst_rows: torch.Tensor, n_tokens: int
) -> None:
    for x, name in ((src_rows, "src_rows"), (dst_rows, "dst_rows")):
        if x.dtype != torch.int64:
            _fail(f"{name} must be an int64 tensor, got {x.dtype}")
        if x.dim() != 1:
            _fail(f"{name} must be 1-D, got shape {list(x.shape)}")
    if src_rows.shape[0] != dst_rows.shape[0]:
        _fail(
            f"src_rows and dst_rows must have the same length, got {src_rows.shape[0]} and {dst_rows.shape[0]}"
        )
    if n_tokens < 0:
        _fail(f"n_tokens must be >= 0, got {n_tokens}")
    for i, c in enumerate(caches):
        if c.dim() < 2:
            _fail(f"caches[{i}] must be [rows, tokens, ...] (at least 2-D), got shape {list(c.shape)}")
        if c.device != caches[0].device:
            _fail(f"caches[{i}] must be on caches[0]'s device {caches[0].device}, got {c.device}")
        if c.dtype != caches[0].dtype:
            _fail(f"caches[{i}] must have caches[0]'s dtype {caches[0].dtype}, got {c.dtype}")
        expected = 1
        for d in range(c.dim() - 1, 0, -1):
            if c.shape[d] != 1 and c.stride(d) != expected:
                _fail(
                    f"caches[{i}] must be contiguous after the row dim, got shape {list(c.shape)} and strides "
                    f"{list(c.stride())}"
                )
            expected *= c.shape[d]
        if c.shape[0] > 1 and expected != 0 and c.stride(0) < expected:
            _fail(
                f"caches[{i}] has overlapping rows: stride(0) = {c.stride(0)} is less than the {expected} "
                f"elements of a row (shape {list(c.shape)})"
            )
        if n_tokens > c.shape[1]:
            _fail(f"n_tokens ({n_tokens}) must be <= the tokens of caches[{i}] (shape {list(c.shape)})")
    if caches:
        for x, name in ((src_rows, "src_rows"), (dst_rows, "dst_rows")):
            if x.device != caches[0].device:
                _fail(f"{name} must be on the caches' device {caches[0].device}, got {x.device}")


def _check_row_values(caches: list[torch.Tensor], src_rows: torch.Tensor, dst_rows: torch.Tensor) -> None:
    s, d = src_rows.tolist(), dst_rows.tolist()
    if caches:
        imin = min(range(len(caches)), key=lambda i: caches[i].shape[0])  # first with the fewest rows
        R = caches[imin].shape[0]
        for j in range(len(s)):
            if not 0 <= s[j] < R:
                _fail(f"src_rows[{j}] = {s[j]} is out of range for caches[{imin}] with {R} rows")
            if not 0 <= d[j] < R:
                _fail(f"dst_rows[{j}] = {d[j]} is out of range for caches[{imin}] with {R} rows")
    first_src: dict[int, int] = {}
    for j, v in enumerate(s):
        first_src.setdefault(v, j)
    first_dst: dict[int, int] = {}
    for j, v in enumerate(d):
        if v in first_dst:
            _fail(f"dst_rows must be distinct, got dst_rows[{first_dst[v]}] = dst_rows[{j}] = {v}")
        first_dst[v] = j
        if v in first_src:
            _fail(
                f"dst_rows[{j}] = {v} is also a source row (src_rows[{first_src[v]}]): a destination must never be a source"
            )


def _assert_rows_on_device(
    caches: list[torch.Tensor], src_rows: torch.Tensor, dst_rows: torch.Tensor
) -> None:
    # The CUDA kernel's device-side checks, without a sync: O(P^2) compares, P is small.
    R = min(c.shape[0] for c in caches)
    in_range = ((src_rows >= 0) & (src_rows < R) & (dst_rows >= 0) & (dst_rows < R)).all()
    torch._assert_async(in_range, "kv_fork_: src_rows/dst_rows out of range of the caches' rows")
    same = dst_rows[:, None] == dst_rows[None, :]
    ok = (same.sum() == dst_rows.numel()) & ~(dst_rows[:, None] == src_rows[None, :]).any()
    torch._assert_async(ok, "kv_fork_: dst_rows must be distinct and never a source row")


def kv_fork_torch_(
    caches: Sequence[torch.Tensor], src_rows: torch.Tensor, dst_rows: torch.Tensor, n_tokens: int
) -> None:
    """The pure-torch fallback of kv_fork_ (same semantics, same error messages); one gather and one
    scatter per tensor."""
    caches = list(caches)
    n_tokens = operator.index(n_tokens)
    _check_grad(caches)
    _check_metadata(caches, src_rows, dst_rows, n_tokens)
    if not src_rows.is_cuda:
        _check_row_values(caches, src_rows, dst_rows)
    elif os.environ.get("ARCOPO_KV_FORK_CHECK", "0") == "1":
        # NOTE(kv_fork_): host sync (indices copied to the host); debug mode only.
        _check_row_values(caches, src_rows.cpu(), dst_rows.cpu())
    if not caches or n_tokens == 0 or src_rows.numel() == 0:
        return
    if src_rows.is_cuda:
        _assert_rows_on_device(caches, src_rows, dst_rows)
    for c in caches:
        c[dst_rows, :n_tokens] = c[src_rows, :n_tokens]
