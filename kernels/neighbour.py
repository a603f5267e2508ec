"""AR-CoPO neighbour-policy distances and log-probabilities (AR-CoPO Eq. 4), forward and backward.

    d[a, i]    = mean_n (x0_old[i, n] - x0_theta[a, n])^2          anchors a < A, candidates i < G
    logp[a, i] = log_softmax_i(-d[a, i] / tau[a])

Replaces the torch path's A passes of (broadcast difference, square, mean) plus a log_softmax: A ~ 4 and
G ~ 12 are tiny and N ~ 300K elements per sample, so the op is memory-bound and every element should be
read once. Differences are formed explicitly in float32 (no |a|^2 + |b|^2 - 2ab cancellation: anchors and
candidates are close, which is the whole point of the neighbour policy).

Forward, one launch (_forward_kernel), grid (P, cdiv(A, A_BLOCK)):
  every program loads contiguous [G_PAD, BLOCK] tiles of x0_old once for A_BLOCK anchor rows and keeps
  the partial sums [A_BLOCK, G] of squared differences of its tiles in registers; P (at most the device's
  resident CTA slots) is chosen so that every program gets the same number of tiles. Each program writes
  its partial row to part[p] and takes a ticket (an atomic counter); the program that draws the last ticket
  sums part over the programs (a fixed order: deterministic), divides by N and does the log-softmax, then
  resets the counter. Anchors and candidates are read with 16-byte loads: the anchor row of a padded slot
  (a >= A) is clamped to A - 1 instead of masked, so the load mask stays uniform along the row.
Backward, one launch (_backward_kernel, grid (cdiv(N, BLOCK), cdiv(A, A_BLOCK))). With W = dL/dd (total),
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
TILE_ELEMS = 4096  # G_PAD * BLOCK: 16 fp32 registers per thread for the candidate tile at 8 warps
NUM_WARPS = 8
T_BLOCK = 64  # partial rows summed per step of the final reduction
CTAS_PER_SM = 4  # resident forward programs per SM (8 warps, few registers): the persistent grid's slots
INTERPRET_SLOTS = 3  # "slots" under the CPU interpreter: several programs, several tiles each
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _load_candidates(c_ptr, n, nmask, g, gmask, N):
    """[G_PAD, BLOCK] float32 tile of x0_old (zeros outside [G, N])."""
    offs = g[:, None].to(tl.int64) * N + n[None, :]
    return tl.load(c_ptr + offs, mask=gmask[:, None] & nmask[None, :], other=0.0).to(tl.float32)


@triton.jit
def _load_anchor(t_ptr, row, n, nmask, g):
    """Anchor row `row` over columns n, loaded as a [G_PAD, BLOCK] tile whose rows are all equal: in the
    candidate tile's layout, so each thread reads its 8 or 16 contiguous bytes at once (a [BLOCK] load gets
    one element per thread when BLOCK = threads). The repeated rows come from L1, not from memory."""
    offs = row + n[None, :] + 0 * g[:, None]
    return tl.load(t_ptr + offs, mask=nmask[None, :] & (g[:, None] >= 0), other=0.0).to(tl.float32)


@triton.jit
def _load_tau(tau_ptr, tau_stride, tau_val, a, A, TAU_TENSOR: tl.constexpr):
    if TAU_TENSOR:
        tau = tl.load(tau_ptr + tl.minimum(a, A - 1) * tau_stride).to(tl.float32)  # clamped: no scalar mask
    else:
        tau = tau_val
    return tau


@triton.jit
def _forward_kernel(
    t_ptr,  # [A, N] x0_theta, any float dtype
    c_ptr,  # [G, N] x0_old, any float dtype
    part_ptr,  # float32 [P * n_ablocks, A_PAD, G_PAD] partial sums of squared differences, one row per program
    ticket_ptr,  # int32 [1], 0 between launches (the last program resets it)
    tau_ptr,  # float32 [A] view (stride tau_stride), when TAU_TENSOR
    tau_stride,
    tau_val,  # float, when not TAU_TENSOR
    d_ptr,  # float32 [A, G]
    logp_ptr,  # float32 [A, G]
    A,
    G,
    N,
    tiles_per_program,
    TAU_TENSOR: tl.constexpr,
    A_BLOCK: tl.constexpr,
    A_PAD: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK: tl.constexpr,
    T_BLOCK: tl.constexpr,
):
    p = tl.program_id(0)
    ab = tl.program_id(1)
    n_programs = tl.num_programs(0) * tl.num_programs(1)
    a0 = ab * A_BLOCK
    g = tl.arange(0, G_PAD)
    gmask = g < G
    ar = tl.arange(0, A_PAD)
    acc = tl.zeros([A_PAD, G_PAD], dtype=tl.float32)
    tile0 = p * tiles_per_program
    for tile in range(tile0, tile0 + tiles_per_program):
        n = tile * BLOCK + tl.arange(0, BLOCK)
        nmask = n < N
        c = _load_candidates(c_ptr, n, nmask, g, gmask, N)
        for j in tl.static_range(A_BLOCK):
            a = tl.minimum(a0 + j, A - 1)  # a padded slot re-reads row A - 1 (from L2); its sums are dropped
            diff = c - _load_anchor(t_ptr, a.to(tl.int64) * N, n, nmask, g)  # zero in padded columns
            acc += tl.where(ar[:, None] == j, tl.sum(diff * diff, axis=1)[None, :], 0.0)
    row = p * tl.num_programs(1) + ab
    tl.store(part_ptr + (row * A_PAD + ar[:, None]) * G_PAD + g[None, :], acc)
    # All partial rows stored (every thread) before the ticket (acq_rel, gpu scope) publishes them.
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
    if ticket == n_programs - 1:
        # The last program: sum the partial rows of every anchor's block in program order, then finish.
        for a in range(0, A):
            ab_a = a // A_BLOCK
            slot = a - ab_a * A_BLOCK
            s = tl.zeros([T_BLOCK, G_PAD], dtype=tl.float32)
            for start in range(0, tl.num_programs(0), T_BLOCK):
                r = start + tl.arange(0, T_BLOCK)
                offs = ((r * tl.num_programs(1) + ab_a) * A_PAD + slot)[:, None] * G_PAD + g[None, :]
                s += tl.load(part_ptr + offs, mask=(r < tl.num_programs(0))[:, None], other=0.0,
                             cache_modifier=".cg")
            d = tl.sum(s, axis=0) / N
            tau = _load_tau(tau_ptr, tau_stride, tau_val, a, A, TAU_TENSOR)
            x = tl.where(gmask, -d / tau, float("-inf"))
            m = tl.max(x, axis=0)
            lse = m + tl.log(tl.sum(tl.exp(x - m), axis=0))
            tl.store(d_ptr + a * G + g, d, mask=gmask)
            tl.store(logp_ptr + a * G + g, x - lse, mask=gmask)
        tl.atomic_xchg(ticket_ptr, 0)  # ready for the next launch


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
        row = tl.minimum(a, A - 1).to(tl.int64) * N  # a padded slot reads row A - 1 and stores nothing
        grad = tl.sum(w[:, None] * (_load_anchor(t_ptr, row, n, nmask, g) - c), axis=0) * two_over_n
        # stored from the tile's first row (the candidate layout: 16-byte stores), as the anchor was loaded
        grad2 = tl.broadcast_to(grad[None, :], (G_PAD, BLOCK))
        smask = nmask[None, :] & (g[:, None] == 0) & (g[:, None] * 0 + a < A)
        tl.store(gt_ptr + row + n[None, :] + 0 * g[:, None], grad2.to(gt_ptr.dtype.element_ty), mask=smask)


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


def _slots(device: torch.device) -> int:
    """Resident forward programs the device holds at once (the persistent grid's upper bound)."""
    if device.type != "cuda":
        return INTERPRET_SLOTS
    return torch.cuda.get_device_properties(device).multi_processor_count * CTAS_PER_SM


_TICKETS: dict[tuple, torch.Tensor] = {}


def _ticket(device: torch.device) -> torch.Tensor:
    """The forward's int32 counter for this device and stream: zero between launches (the kernel's last
    program resets it), so launches on one stream reuse it; another stream gets its own."""
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    key = (device.type, device.index, stream)
    if key not in _TICKETS:
        _TICKETS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return _TICKETS[key]


def _grid(A: int, G: int, N: int, device: torch.device) -> tuple[int, int, int, int, int]:
    """(a_block, g_pad, block, programs P, tiles per program) of the forward: P <= the resident slots (per
    anchor block), every program with the same number of tiles (the last one possibly fewer)."""
    a_block, g_pad, block = _config(A, G)
    n_tiles = triton.cdiv(N, block)
    slots = max(1, _slots(device) // triton.cdiv(A, a_block))
    per = triton.cdiv(n_tiles, slots)
    return a_block, g_pad, block, triton.cdiv(n_tiles, per), per


def _forward(t, c, tau_a, tau_stride, tau_val):
    A, N = t.shape
    G = c.shape[0]
    a_block, g_pad, block, programs, per = _grid(A, G, N, t.device)
    n_ab = triton.cdiv(A, a_block)
    a_pad = triton.next_power_of_2(a_block)
    part = torch.empty(programs * n_ab, a_pad, g_pad, dtype=torch.float32, device=t.device)
    d = torch.empty(A, G, dtype=torch.float32, device=t.device)
    logp = torch.empty_like(d)
    tau_ptr = tau_a if tau_a is not None else d  # dummy pointer when tau is a float
    _forward_kernel[(programs, n_ab)](
        t, c, part, _ticket(t.device), tau_ptr, tau_stride, tau_val, d, logp, A, G, N, per,
        TAU_TENSOR=tau_a is not None, A_BLOCK=a_block, A_PAD=a_pad, G_PAD=g_pad, BLOCK=block, T_BLOCK=T_BLOCK,
        num_warps=NUM_WARPS,
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


def compile_specs(A: int, G: int) -> list[tuple[str, str, dict, int]]:
    """(report name, kernel name, constexprs, num_warps) of the launches at group shape (A, G), for
    arcopo_fast.compile_report."""
    a_block, g_pad, block = _config(A, G)
    fwd = dict(TAU_TENSOR=False, A_BLOCK=a_block, A_PAD=triton.next_power_of_2(a_block), G_PAD=g_pad, BLOCK=block,
               T_BLOCK=T_BLOCK)
    return [
        ("neighbour_fwd", "_forward_kernel", fwd, NUM_WARPS),
        ("neighbour_bwd", "_backward_kernel", dict(TAU_TENSOR=False, A_BLOCK=a_block, G_PAD=g_pad, BLOCK=block),
         NUM_WARPS),
    ]


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
