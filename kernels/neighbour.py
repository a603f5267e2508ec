"""AR-CoPO neighbour-policy distances and log-probabilities (AR-CoPO Eq. 4), forward and backward.

    d[a, i]    = mean_n (x0_old[i, n] - x0_theta[a, n])^2          anchors a < A, candidates i < G
    logp[a, i] = log_softmax_i(-d[a, i] / tau[a])

Replaces the torch path's A passes of (broadcast difference, square, mean) plus a log_softmax: A ~ 4 and
G ~ 12 are tiny and N ~ 300K elements per sample, so the op is memory-bound and every element should be
read once. Differences are formed explicitly in float32 (no |a|^2 + |b|^2 - 2ab cancellation: anchors and
candidates are close, which is the whole point of the neighbour policy).

Forward, two launches:
  _partial_kernel   grid (cdiv(N, BLOCK), cdiv(A, A_BLOCK)): a program loads a [G_PAD, BLOCK] tile of
                    x0_old once and A_BLOCK anchor rows, and writes the tile's partial sums [A, G] of
                    squared differences to part[tile] (deterministic: no atomics).
  _finalize_kernel  grid (A,): sums part[:, a, :] over tiles, divides by N, and does the log-softmax.
Backward, one launch (_backward_kernel, same grid as _partial_kernel). With W = dL/dd (total),
    W[a, i]  = gd[a, i] - (gl[a, i] - p[a, i] * sum_j gl[a, j]) / tau[a],   p = exp(logp)
    dL/dx0_theta[a, n] = (2 / N) * sum_i W[a, i] * (x0_theta[a, n] - x0_old[i, n])
W is recomputed by every program from the [A, G] tensors (a few dozen values) instead of a third launch.
Only x0_theta receives a gradient; x0_old and tau are constants of the rollout.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._launch import check_launchable, on_device

__all__ = ["neighbour_logprobs"]

MAX_CANDIDATES = 64  # G is held as one padded register tile [G_PAD, BLOCK]
A_BLOCK_MAX = 4  # anchors per program: x0_old is read cdiv(A, 4) times (once for the paper's A = 4)
TILE_ELEMS = 8192  # G_PAD * BLOCK: 32 fp32 registers per thread for the candidate tile at 8 warps
NUM_WARPS = 8
T_BLOCK = 64  # tiles summed per step of the finalize loop
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _load_candidates(c_ptr, n, nmask, g, gmask, N):
    """[G_PAD, BLOCK] float32 tile of x0_old (zeros outside [G, N])."""
    offs = g[:, None].to(tl.int64) * N + n[None, :]
    return tl.load(c_ptr + offs, mask=gmask[:, None] & nmask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _partial_kernel(
    t_ptr,  # [A, N] x0_theta, any float dtype
    c_ptr,  # [G, N] x0_old, any float dtype
    part_ptr,  # float32 [n_tiles, A, G] partial sums of squared differences
    A,
    G,
    N,
    A_BLOCK: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    tile = tl.program_id(0)
    a0 = tl.program_id(1) * A_BLOCK
    n = tile * BLOCK + tl.arange(0, BLOCK)
    nmask = n < N
    g = tl.arange(0, G_PAD)
    gmask = g < G
    c = _load_candidates(c_ptr, n, nmask, g, gmask, N)
    for j in tl.static_range(A_BLOCK):
        a = a0 + j
        # Anchor masks are built as vectors: the interpreter mis-broadcasts scalar int1 masks.
        t = tl.load(t_ptr + a.to(tl.int64) * N + n, mask=nmask & (n * 0 + a < A), other=0.0).to(tl.float32)
        diff = c - t[None, :]  # zero in padded columns (both operands are zero there)
        s = tl.sum(diff * diff, axis=1)  # [G_PAD]
        tl.store(part_ptr + (tile * A + a) * G + g, s, mask=gmask & (g * 0 + a < A))


@triton.jit
def _load_tau(tau_ptr, tau_stride, tau_val, a, A, TAU_TENSOR: tl.constexpr):
    if TAU_TENSOR:
        tau = tl.load(tau_ptr + tl.minimum(a, A - 1) * tau_stride).to(tl.float32)  # clamped: no scalar mask
    else:
        tau = tau_val
    return tau


@triton.jit
def _finalize_kernel(
    part_ptr,  # float32 [n_tiles, A, G]
    tau_ptr,  # float32 [A] view (stride tau_stride), when TAU_TENSOR
    tau_stride,
    tau_val,  # float, when not TAU_TENSOR
    d_ptr,  # float32 [A, G]
    logp_ptr,  # float32 [A, G]
    A,
    G,
    N,
    n_tiles,
    TAU_TENSOR: tl.constexpr,
    G_PAD: tl.constexpr,
    T_BLOCK: tl.constexpr,
):
    a = tl.program_id(0)
    g = tl.arange(0, G_PAD)
    gmask = g < G
    acc = tl.zeros([T_BLOCK, G_PAD], dtype=tl.float32)
    for start in range(0, n_tiles, T_BLOCK):
        r = start + tl.arange(0, T_BLOCK)
        offs = (r[:, None] * A + a) * G + g[None, :]
        acc += tl.load(part_ptr + offs, mask=(r < n_tiles)[:, None] & gmask[None, :], other=0.0)
    d = tl.sum(acc, axis=0) / N
    tau = _load_tau(tau_ptr, tau_stride, tau_val, a, A, TAU_TENSOR)
    s = tl.where(gmask, -d / tau, float("-inf"))
    m = tl.max(s, axis=0)
    lse = m + tl.log(tl.sum(tl.exp(s - m), axis=0))
    tl.store(d_ptr + a * G + g, d, mask=gmask)
    tl.store(logp_ptr + a * G + g, s - lse, mask=gmask)


@triton.jit
def _backward_kernel(
    t_ptr,  # [A, N] x0_theta
    c_ptr,  # [G, N] x0_old
    logp_ptr,  # float32 [A, G] (forward output)
    gd_ptr,  # float32 [A, G] dL/dd (incoming)
    gl_ptr,  # float32 [A, G] dL/dlogp (incoming)
    tau_ptr,
    tau_stride,
    tau_val,
    gt_ptr,  # [A, N] dL/dx0_theta, x0_theta's dtype
    A,
    G,
    N,
    two_over_n,
    TAU_TENSOR: tl.constexpr,
    A_BLOCK: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    tile = tl.program_id(0)
    a0 = tl.program_id(1) * A_BLOCK
    n = tile * BLOCK + tl.arange(0, BLOCK)
    nmask = n < N
    g = tl.arange(0, G_PAD)
    gmask = g < G
    c = _load_candidates(c_ptr, n, nmask, g, gmask, N)
    for j in tl.static_range(A_BLOCK):
        a = a0 + j
        wmask = gmask & (g * 0 + a < A)
        gl = tl.load(gl_ptr + a * G + g, mask=wmask, other=0.0)
        gd = tl.load(gd_ptr + a * G + g, mask=wmask, other=0.0)
        p = tl.where(wmask, tl.exp(tl.load(logp_ptr + a * G + g, mask=wmask, other=0.0)), 0.0)
        tau = _load_tau(tau_ptr, tau_stride, tau_val, a, A, TAU_TENSOR)
        w = gd - (gl - p * tl.sum(gl, axis=0)) / tau  # dL/dd[a, :], zero in padded rows
        w = tl.where(wmask, w, 0.0)
        rmask = nmask & (n * 0 + a < A)
        t = tl.load(t_ptr + a.to(tl.int64) * N + n, mask=rmask, other=0.0).to(tl.float32)
        grad = tl.sum(w[:, None] * (t[None, :] - c), axis=0) * two_over_n
        tl.store(gt_ptr + a.to(tl.int64) * N + n, grad.to(gt_ptr.dtype.element_ty), mask=rmask)


def _config(A: int, G: int) -> tuple[int, int, int]:
    g_pad = triton.next_power_of_2(G)
    return min(A, A_BLOCK_MAX), g_pad, max(32, TILE_ELEMS // g_pad)


def _tau_args(tau, A: int, device: torch.device):
    """(tau tensor [A] view or None, its stride, tau float) for the kernels."""
    if isinstance(tau, torch.Tensor):
        if tau.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                "tau must not require grad: the Triton path differentiates x0_theta only "
                "(tau is fixed at rollout time); pass tau.detach()"
            )
        if tau.device != device:
            if tau.device.type == "cpu" and tau.numel() == 1:
                return _tau_args(float(tau), A, device)  # a host scalar: no device read
            raise ValueError(f"tau must be a float or a tensor on {device}, got a tensor on {tau.device}")
        if not (tau.is_floating_point() or tau.dtype in (torch.int32, torch.int64)):
            raise ValueError(f"tau must be a real tensor, got {tau.dtype}")
        try:
            tau_a = torch.broadcast_to(tau.detach().to(torch.float32), (A, 1))[:, 0]
        except RuntimeError:
            raise ValueError(
                f"tau must be broadcastable to [A, 1] = [{A}, 1], got shape {tuple(tau.shape)}"
            ) from None
        return tau_a, tau_a.stride(0), 1.0
    try:
        tau = float(tau)
    except (TypeError, ValueError):
        raise ValueError(
            f"tau must be a float or a tensor broadcastable to [A, 1], got {type(tau).__name__}"
        ) from None
    if not (tau > 0 and tau < float("inf")):
        raise ValueError(f"tau must be a positive finite temperature, got {tau}")
    return None, 0, tau


def _forward(t, c, tau_a, tau_stride, tau_val):
    A, N = t.shape
    G = c.shape[0]
    a_block, g_pad, block = _config(A, G)
    n_tiles = triton.cdiv(N, block)
    part = torch.empty(n_tiles, A, G, dtype=torch.float32, device=t.device)
    d = torch.empty(A, G, dtype=torch.float32, device=t.device)
    logp = torch.empty_like(d)
    tau_ptr = tau_a if tau_a is not None else d  # dummy pointer when tau is a float
    _partial_kernel[(n_tiles, triton.cdiv(A, a_block))](
        t, c, part, A, G, N, A_BLOCK=a_block, G_PAD=g_pad, BLOCK=block, num_warps=NUM_WARPS
    )
    _finalize_kernel[(A,)](
        part,
        tau_ptr,
        tau_stride,
        tau_val,
        d,
        logp,
        A,
        G,
        N,
        n_tiles,
        TAU_TENSOR=tau_a is not None,
        G_PAD=g_pad,
        T_BLOCK=T_BLOCK,
        num_warps=4,
    )
    return d, logp


def _backward(t, c, logp, gd, gl, tau_a, tau_stride, tau_val):
    A, N = t.shape
    G = c.shape[0]
    a_block, g_pad, block = _config(A, G)
    gt = torch.empty_like(t)
    tau_ptr = tau_a if tau_a is not None else logp
    _backward_kernel[(triton.cdiv(N, block), triton.cdiv(A, a_block))](
        t,
        c,
        logp,
        gd,
        gl,
        tau_ptr,
        tau_stride,
        tau_val,
        gt,
        A,
        G,
        N,
        2.0 / N,
        TAU_TENSOR=tau_a is not None,
        A_BLOCK=a_block,
        G_PAD=g_pad,
        BLOCK=block,
        num_warps=NUM_WARPS,
    )
    return gt


class _NeighbourLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, c, tau_a, tau_stride, tau_val):
        d, logp = _forward(t, c, tau_a, tau_stride, tau_val)
        ctx.save_for_backward(t, c, logp, tau_a)
        ctx.tau_stride, ctx.tau_val = tau_stride, tau_val
        return d, logp

    @staticmethod
    @once_differentiable
    def backward(ctx, gd, gl):
        t, c, logp, tau_a = ctx.saved_tensors
        gt = None
        if ctx.needs_input_grad[0]:
            # Incoming grads may be expanded views (e.g. from .sum()): the kernel wants dense [A, G].
            gd = gd.to(torch.float32).contiguous()
            gl = gl.to(torch.float32).contiguous()
            with on_device(t):
                gt = _backward(t, c, logp, gd, gl, tau_a, ctx.tau_stride, ctx.tau_val)
        return gt, None, None, None, None


def neighbour_logprobs(
    x0_theta: torch.Tensor, x0_old: torch.Tensor, tau: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """d [A, G] and logp [A, G] (float32) for anchors x0_theta [A, ...] and candidates x0_old [G, ...]
    (float32/bfloat16/float16, same per-sample shape, same device). tau: a positive float, or a tensor
    broadcastable to [A, 1] (not differentiated). Gradients flow to x0_theta through both outputs."""
    for name, x in (("x0_theta", x0_theta), ("x0_old", x0_old)):
        if not isinstance(x, torch.Tensor) or x.ndim < 1:
            raise ValueError(
                f"{name} must be a tensor [rows, ...], got {getattr(x, 'shape', type(x).__name__)}"
            )
        if x.dtype not in _FLOATS:
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    if x0_theta.shape[1:] != x0_old.shape[1:]:
        raise ValueError(
            f"x0_theta [A, ...] and x0_old [G, ...] must share per-sample shapes, got {tuple(x0_theta.shape)} "
            f"and {tuple(x0_old.shape)}"
        )
    if x0_old.device != x0_theta.device:
        raise ValueError(f"x0_old must be on x0_theta's device {x0_theta.device}, got {x0_old.device}")
    A, G = x0_theta.shape[0], x0_old.shape[0]
    N = x0_theta[0].numel() if A else x0_old[0].numel() if G else 0
    if not 1 <= G <= MAX_CANDIDATES:
        raise ValueError(f"x0_old must hold between 1 and {MAX_CANDIDATES} candidates, got G = {G}")
    if N == 0:
        raise ValueError(f"per-sample size must be positive, got shape {tuple(x0_theta.shape)}")
    if A == 0:
        z = torch.zeros(0, G, dtype=torch.float32, device=x0_theta.device)
        return z, z.clone()
    if A > 65535 * A_BLOCK_MAX:
        raise ValueError(f"at most {65535 * A_BLOCK_MAX} anchors, got A = {A}")
    tau_a, tau_stride, tau_val = _tau_args(tau, A, x0_theta.device)
    check_launchable(x0_theta, "x0_theta")
    t = x0_theta.reshape(A, N)  # differentiable view (or copy) of the anchors
    c = x0_old.detach().reshape(G, N).contiguous()
    with on_device(t):
        return _NeighbourLogprobs.apply(t.contiguous(), c, tau_a, tau_stride, tau_val)
