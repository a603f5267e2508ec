"""Fused few-step consistency step with in-kernel Philox4x32-10 noise (replaces Self-Forcing's float64
x0 conversion + argmin sigma lookup + torch.randn + add_noise: five to ten kernels and a full noise tensor).

    x0     = x - sigmas[step] * flow
    x_next = (1 - sigmas[step + 1]) * x0 + sigmas[step + 1] * noise          (noise_words given)

Noise semantics are those of kernels/reference.py (the contract lives in arcopo_fast.noise): element n of
row b is the Box-Muller normal of Philox4x32-10 words (w0, w1) of counter (n, c1[b], c2, c3[b]) under the
key (k0, k1):  u1 = ((w0 >> 8) + 1) * 2^-24,  u2 = (w1 >> 8) * 2^-24,  z = sqrt(-2 ln u1) cos(2 pi u2).
The integer words and the uniforms are bit-identical to the reference; z goes through log/cos, whose
last bits depend on the math library (libdevice __nv_logf/__nv_cosf on CUDA, numpy under the interpreter).

Graph capture: sigma is loaded from the device table by the step index, the per-row counters c1/c3 are
device tensors, and the launcher allocates only shape-dependent outputs; nothing reads device memory on the
host. Scalars (step, k0, k1, c2) are baked into a captured graph like any kernel argument.

Grid: (cdiv(numel_per_row, BLOCK), B); one program = BLOCK elements of one row, so the row's counters and
sigmas are scalar loads. Fixed launch constants (no autotune: autotuning would benchmark inside a capture).
"""

from __future__ import annotations

import operator

import torch
import triton
import triton.language as tl

from ._launch import check_launchable, interpreting, on_device

try:  # generic dispatch module (triton >= 3.0)
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - older layouts (NGC containers)
    from triton.language.extra.cuda import libdevice

__all__ = ["philox_normal", "consistency_step", "philox_words"]

BLOCK = 1024
NUM_WARPS = 4
_MAX_GRID_Y = 65535
_MAX_NUMEL = 2**31 - BLOCK  # pid * BLOCK + arange(BLOCK) must not overflow int32


# ---------------------------------------------------------------------------------------------------------
# jit helpers
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 (Salmon et al., SC'11) on uint32 blocks. Each round: two 32x32->64 products of the
    counter's even words; the high halves are mixed with the odd words and the round key, the low halves
    become the new odd words; the key is bumped by the Weyl constants."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = tl.mul(c0, 0xD2511F53, sanitize_overflow=False)
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = tl.mul(c2, 0xCD9E8D57, sanitize_overflow=False)
        c0 = hi1 ^ c1 ^ k0
        c1 = lo1
        c2 = hi0 ^ c3 ^ k1
        c3 = lo0
        k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
        k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def _normal_from_words(w0, w1, PRECISE: tl.constexpr):
    # 24-bit uniforms: exact in float32, u1 in (0, 1] so log(u1) is finite.
    u1 = ((w0 >> 8) + 1).to(tl.float32) * 5.9604644775390625e-08
    u2 = (w1 >> 8).to(tl.float32) * 5.9604644775390625e-08
    if PRECISE:
        # libdevice (<= 2 ulp) rather than tl.log/tl.cos, which may lower to lg2/cos.approx on NVIDIA.
        # 2 pi is rounded to float32 before the product, as torch rounds the Python scalar in the reference.
        r = tl.sqrt_rn(-2.0 * libdevice.log(u1))
        c = libdevice.cos(u2 * 6.283185307179586)
    else:  # the interpreter has no extern (libdevice) calls: numpy's float32 log/cos
        r = tl.sqrt_rn(-2.0 * tl.log(u1))
        c = tl.cos(u2 * 6.283185307179586)
    return r * c


@triton.jit
def _row_normals(n, c1, c2, c3, k0, k1, PRECISE: tl.constexpr):
    """Normals of elements n (int32 block) of one row: counter (n, c1, c2, c3) with scalar c1..c3, k0, k1
    (uint32)."""
    c0 = n.to(tl.uint32)
    zero = tl.zeros_like(c0)
    w0, w1, _, _ = _philox4x32_10(c0, zero + c1, zero + c2, zero + c3, k0, k1)
    return _normal_from_words(w0, w1, PRECISE)


# ---------------------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _keyed_normals(n, row, c1_ptr, c2, c3_ptr, k0, k1, PRECISE: tl.constexpr):
    """Normals of elements n of batch row `row` under the noise plan's key words (one definition, used by
    both philox_normal and consistency_step so that they draw identical noise)."""
    c1 = tl.load(c1_ptr + row).to(tl.uint32)
    c3 = tl.load(c3_ptr + row).to(tl.uint32)
    return _row_normals(
        n, c1, c2.to(tl.uint32, bitcast=True), c3, k0.to(tl.uint32, bitcast=True), k1.to(tl.uint32, bitcast=True), PRECISE
    )


@triton.jit(do_not_specialize=["k0", "k1", "c2"])
def _philox_normal_kernel(
    out_ptr,  # float32 [B, numel]
    c1_ptr,  # int32/int64 [B]
    c3_ptr,  # int32/int64 [B]
    k0,  # i32 (the uint32 key word reinterpreted as signed)
    k1,
    c2,
    numel,
    BLOCK: tl.constexpr,
    PRECISE: tl.constexpr,
):
    pid = tl.program_id(0)
    row = tl.program_id(1)
    n = pid * BLOCK + tl.arange(0, BLOCK)
    mask = n < numel
    z = _keyed_normals(n, row, c1_ptr, c2, c3_ptr, k0, k1, PRECISE)
    tl.store(out_ptr + row.to(tl.int64) * numel + n, z, mask=mask)


@triton.jit(do_not_specialize=["step", "k0", "k1", "c2"])
def _consistency_step_kernel(
    x_ptr,  # [B, numel] any float dtype
    flow_ptr,  # [B, numel] any float dtype
    sig_ptr,  # [T] float table
    step,  # int: sigma_t = sig[step], sigma_next = sig[step + 1]
    c1_ptr,  # int32/int64 [B] (unused without noise)
    c3_ptr,
    k0,  # i32 key/counter words reinterpreted as signed
    k1,
    c2,
    x0_ptr,  # float32 [B, numel]
    xn_ptr,  # float32 [B, numel] (unused without noise)
    numel,
    HAS_NOISE: tl.constexpr,
    BLOCK: tl.constexpr,
    PRECISE: tl.constexpr,
):
    pid = tl.program_id(0)
    row = tl.program_id(1)
    n = pid * BLOCK + tl.arange(0, BLOCK)
    mask = n < numel
    base = row.to(tl.int64) * numel
    x = tl.load(x_ptr + base + n, mask=mask).to(tl.float32)
    f = tl.load(flow_ptr + base + n, mask=mask).to(tl.float32)
    s_t = tl.load(sig_ptr + step).to(tl.float32)
    x0 = x - s_t * f
    tl.store(x0_ptr + base + n, x0, mask=mask)
    if HAS_NOISE:
        s_n = tl.load(sig_ptr + step + 1).to(tl.float32)
        z = _keyed_normals(n, row, c1_ptr, c2, c3_ptr, k0, k1, PRECISE)
        tl.store(xn_ptr + base + n, (1.0 - s_n) * x0 + s_n * z, mask=mask)


@triton.jit(do_not_specialize=["k0", "k1"])
def _philox_words_kernel(c0_ptr, c1_ptr, c2_ptr, c3_ptr, k0, k1, w_ptr, n_items, BLOCK: tl.constexpr):
    """Debug/test kernel: raw Philox words of arbitrary per-element counters (int64 in, int64 out)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n_items
    c0 = tl.load(c0_ptr + i, mask=mask, other=0).to(tl.uint32)
    c1 = tl.load(c1_ptr + i, mask=mask, other=0).to(tl.uint32)
    c2 = tl.load(c2_ptr + i, mask=mask, other=0).to(tl.uint32)
    c3 = tl.load(c3_ptr + i, mask=mask, other=0).to(tl.uint32)
    w0, w1, w2, w3 = _philox4x32_10(
        c0, c1, c2, c3, k0.to(tl.uint32, bitcast=True), k1.to(tl.uint32, bitcast=True)
    )
    tl.store(w_ptr + i, w0.to(tl.int64), mask=mask)
    tl.store(w_ptr + n_items + i, w1.to(tl.int64), mask=mask)
    tl.store(w_ptr + 2 * n_items + i, w2.to(tl.int64), mask=mask)
    tl.store(w_ptr + 3 * n_items + i, w3.to(tl.int64), mask=mask)


# ---------------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------------


def _word(v, name: str) -> int:
    """A uint32 word as the signed int32 with the same bits: every call then passes an i32 kernel argument
    (Python ints >= 2**31 would be typed i64 and compile a second variant)."""
    try:
        v = operator.index(v)
    except TypeError:
        raise ValueError(f"{name} must be an int in [0, 2**32), got {type(v).__name__}") from None
    if not 0 <= v < 2**32:
        raise ValueError(f"{name} must be in [0, 2**32), got {v}")
    return v - 2**32 if v >= 2**31 else v


def _row_words(t, name: str, rows: int, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be an int64 tensor [B] on {device}, got {type(t).__name__}")
    if t.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be an int64 (or int32) tensor, got {t.dtype}")
    if t.shape != (rows,):
        raise ValueError(f"{name} must have shape [B] = [{rows}], got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} (no host copies in the step), got {t.device}")
    return t.contiguous()


def philox_normal(numel: int, k0: int, k1: int, c1: torch.Tensor, c2: int, c3: torch.Tensor) -> torch.Tensor:
    """Standard normals float32 [B, numel] on c1's device: element n of row b uses the counter
    (n, c1[b], c2, c3[b]) under the key (k0, k1). Same function as reference.philox_normal_ref."""
    try:
        numel = operator.index(numel)
    except TypeError:
        raise ValueError(f"numel must be an int, got {type(numel).__name__}") from None
    if not 0 <= numel <= _MAX_NUMEL:
        raise ValueError(f"numel must be in [0, {_MAX_NUMEL}] (int32 element index in-kernel), got {numel}")
    if not isinstance(c1, torch.Tensor) or c1.ndim != 1:
        raise ValueError(f"c1 must be a 1-D int64 tensor [B], got {getattr(c1, 'shape', type(c1).__name__)}")
    B = c1.shape[0]
    dev = c1.device
    c1 = _row_words(c1, "c1", B, dev)
    c3 = _row_words(c3, "c3", B, dev)
    w = (_word(k0, "k0"), _word(k1, "k1"), _word(c2, "c2"))
    if B > _MAX_GRID_Y:
        raise ValueError(f"at most {_MAX_GRID_Y} rows per launch, got B = {B}")
    check_launchable(c1, "c1")
    out = torch.empty(B, numel, dtype=torch.float32, device=dev)
    if out.numel() == 0:
        return out
    with on_device(c1):
        _philox_normal_kernel[(triton.cdiv(numel, BLOCK), B)](
            out, c1, c3, *w, numel, BLOCK=BLOCK, PRECISE=not interpreting(), num_warps=NUM_WARPS
        )
    return out


def consistency_step(
    x: torch.Tensor,
    flow: torch.Tensor,
    sigmas: torch.Tensor,
    step: int,
    noise_words: tuple[int, int, torch.Tensor, int, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One fused pass: x0 = x - sigmas[step] * flow, and when noise_words = (k0, k1, c1 [B], c2, c3 [B])
    is given, x_next = (1 - sigmas[step+1]) * x0 + sigmas[step+1] * noise with the noise generated in-kernel.
    x, flow: [B, ...] any float dtype (same shape); sigmas: 1-D float device table on x's device.
    Returns (x0, x_next or None), float32, shaped like x."""
    if not isinstance(x, torch.Tensor) or not isinstance(flow, torch.Tensor):
        raise ValueError("x and flow must be tensors")
    if x.ndim < 1:
        raise ValueError("x must be [B, ...] with a batch dimension, got a 0-d tensor")
    if flow.shape != x.shape:
        raise ValueError(f"flow must match x's shape {tuple(x.shape)}, got {tuple(flow.shape)}")
    for name, t in (("x", x), ("flow", flow)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or not sigmas.is_floating_point():
        raise ValueError(
            f"sigmas must be a 1-D float tensor (the device sigma table), got "
            f"{getattr(sigmas, 'dtype', type(sigmas).__name__)} {tuple(getattr(sigmas, 'shape', ()))}"
        )
    for name, t in (("flow", flow), ("sigmas", sigmas)):
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device} (no host lookups), got {t.device}")
    if isinstance(step, (bool, torch.Tensor)) or not hasattr(step, "__index__"):
        # a device tensor would need a host read (sync) to check and to pass as a kernel scalar
        raise ValueError(f"step must be a Python int, got {type(step).__name__}")
    step = operator.index(step)
    T = sigmas.shape[0]
    has_noise = noise_words is not None
    hi = T - 1 if has_noise else T
    if not 0 <= step < hi:
        raise ValueError(
            f"step must be in [0, {hi}) for a table of {T} sigmas{' with noise' if has_noise else ''}, got {step}"
        )

    B = x.shape[0]
    numel = x[0].numel() if B else 0
    if numel > _MAX_NUMEL:
        raise ValueError(
            f"at most {_MAX_NUMEL} elements per row (int32 element index in-kernel), got {numel}"
        )
    if B > _MAX_GRID_Y:
        raise ValueError(f"at most {_MAX_GRID_Y} rows per launch, got B = {B}")
    if has_noise:
        if not isinstance(noise_words, (tuple, list)) or len(noise_words) != 5:
            raise ValueError("noise_words must be (k0, k1, c1 [B], c2, c3 [B]) as given by NoisePlan.words")
        k0, k1, c1, c2, c3 = noise_words
        c1 = _row_words(c1, "noise_words c1", B, x.device)
        c3 = _row_words(c3, "noise_words c3", B, x.device)
        w = (_word(k0, "noise_words k0"), _word(k1, "noise_words k1"), _word(c2, "noise_words c2"))
    check_launchable(x, "x")
    x = x.contiguous()
    flow = flow.contiguous()
    x0 = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    xn = torch.empty_like(x0) if has_noise else None
    if x0.numel() == 0:
        return x0, xn
    if not has_noise:  # dummies for the unused pointer/scalar arguments (dead code under HAS_NOISE=False)
        c1 = c3 = sigmas
        w = (0, 0, 0)
        xn_arg = x0
    else:
        xn_arg = xn
    with on_device(x):
        _consistency_step_kernel[(triton.cdiv(numel, BLOCK), B)](
            x,
            flow,
            sigmas,
            step,
            c1,
            c3,
            *w,
            x0,
            xn_arg,
            numel,
            HAS_NOISE=has_noise,
            BLOCK=BLOCK,
            PRECISE=not interpreting(),
            num_warps=NUM_WARPS,
        )
    return x0, xn


def philox_words(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0: int, k1: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The raw Philox4x32-10 words of the Triton generator (for tests): counters are int64 tensors of
    32-bit words, broadcast together; returns 4 int64 tensors of that shape (same as reference.philox4x32)."""
    cs = torch.broadcast_tensors(*(torch.as_tensor(c, dtype=torch.int64) for c in (c0, c1, c2, c3)))
    dev = cs[0].device
    cs = [(c.to(dev) & 0xFFFFFFFF).contiguous().reshape(-1) for c in cs]
    check_launchable(cs[0], "c0")
    n = cs[0].numel()
    out = torch.empty(4, n, dtype=torch.int64, device=dev)
    if n:
        with on_device(cs[0]):
            _philox_words_kernel[(triton.cdiv(n, BLOCK),)](
                *cs, _word(k0, "k0"), _word(k1, "k1"), out, n, BLOCK=BLOCK
            )
    shape = torch.broadcast_shapes(*(torch.as_tensor(c).shape for c in (c0, c1, c2, c3)))
    return tuple(o.reshape(shape) for o in out)
