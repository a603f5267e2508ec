"""kernels/neighbour.py (neighbour distances + log-softmax, forward and backward) against the float64
reference (kernels/reference.neighbour_logprobs_ref(upcast=True)).

Triton runs on CPU under TRITON_INTERPRET=1. Outputs are poisoned (every torch.empty/empty_like made in a
call is NaN-filled, the partial-sum buffer included). Tolerances: float32 inputs must match float64 to
float32 accumulation error; for bfloat16 anchors the gradient is stored in bfloat16, so its error must be
at most 2x the error of the torch path in the same dtype (flash-attention's rule), both against float64
(3x under the interpreter, which truncates instead of rounding float32 -> bfloat16).
"""

from __future__ import annotations

from triton_env import DEVICE, require_kernel_device

require_kernel_device()  # sets TRITON_INTERPRET=1 (CPU) unless chosen; before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

from arcopo_fast.kernels import neighbour as nb  # noqa: E402
from arcopo_fast.kernels import reference as ref  # noqa: E402

from arcopo_fast import ops  # noqa: E402

# The interpreter converts float32 -> bfloat16 by truncation (measured: up to 1 ulp, where CUDA rounds to
# nearest even, half an ulp), so the kernel's bf16 gradient may be one ulp off there: 3x instead of 2x.
BF16_GRAD_FACTOR = 2.0 if DEVICE == "cuda" else 3.0


def _inputs(A, G, shape, dtype, old_dtype, seed, spread=0.1):
    """Anchors and candidates close to a common base (the regime of the neighbour policy)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(1, *shape, generator=gen)
    t = (base + spread * torch.randn(A, *shape, generator=gen)).to(dtype)
    c = (base + spread * torch.randn(G, *shape, generator=gen)).to(old_dtype)
    w_d = torch.randn(A, G, generator=gen, dtype=torch.float64)
    w_l = torch.randn(A, G, generator=gen, dtype=torch.float64)
    return t.to(DEVICE), c.to(DEVICE), w_d, w_l


def _tau(kind, A):
    if kind == "float":
        return 0.013
    if kind == "0d":
        return torch.tensor(0.02, device=DEVICE)
    if kind == "[1,1]":
        return torch.tensor([[0.017]], device=DEVICE)
    return (0.01 + 0.02 * torch.rand(A, 1, generator=torch.Generator().manual_seed(A))).to(DEVICE)  # "[A,1]"


def _tau64(tau):
    return tau.double().cpu() if isinstance(tau, torch.Tensor) else tau


def _loss(d, logp, w_d, w_l):
    return (d.double() * w_d.to(d.device)).sum() + (logp.double() * w_l.to(d.device)).sum()


def _ref_grad(t, c, tau, w_d, w_l):
    t64 = t.detach().cpu().double().requires_grad_()
    d, logp = ref.neighbour_logprobs_ref(t64, c.cpu(), _tau64(tau), upcast=True)
    _loss(d, logp, w_d, w_l).backward()
    return d, logp, t64.grad


CASES = [
    # A, G, per-sample shape, anchor dtype, candidate dtype, tau
    (4, 12, (3, 5, 67), torch.bfloat16, torch.bfloat16, "float"),  # paper's A and G, odd N = 1005
    (1, 2, (1001,), torch.float32, torch.float32, "[1,1]"),  # smallest group
    (5, 3, (7, 11), torch.float32, torch.float32, "[A,1]"),  # A > A_BLOCK_MAX: two anchor blocks
    (4, 12, (2, 1051), torch.float32, torch.bfloat16, "0d"),  # several N tiles, mixed dtypes
    (2, 33, (301,), torch.bfloat16, torch.float32, "[A,1]"),  # G_PAD = 64
]


@pytest.mark.parametrize("A,G,shape,dtype,old_dtype,tau_kind", CASES)
def test_forward_and_grad_vs_float64(A, G, shape, dtype, old_dtype, tau_kind, poison):
    t, c, w_d, w_l = _inputs(A, G, shape, dtype, old_dtype, seed=A * 100 + G)
    tau = _tau(tau_kind, A)
    t.requires_grad_()
    d, logp = nb.neighbour_logprobs(t, c, tau)
    assert d.shape == logp.shape == (A, G) and d.dtype == logp.dtype == torch.float32
    _loss(d, logp, w_d, w_l).backward()
    d64, logp64, g64 = _ref_grad(t, c, tau, w_d, w_l)

    # forward: float32 accumulation of explicit differences
    torch.testing.assert_close(d.cpu().double(), d64, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(logp.cpu().double(), logp64, rtol=1e-5, atol=2e-5)

    g = t.grad.cpu().double()
    assert g.shape == t.shape and t.grad.dtype == dtype
    assert torch.isfinite(g).all()
    scale = g64.abs().max().item()
    err = (g - g64).abs().max().item()
    if dtype == torch.float32:
        assert err <= 1e-4 * scale, (err, scale)
    else:
        tt = t.detach().clone().requires_grad_()
        dt_, lt = ref.neighbour_logprobs_torch(tt, c, tau)
        _loss(dt_, lt, w_d, w_l).backward()
        err_torch = (tt.grad.cpu().double() - g64).abs().max().item()
        assert err <= BF16_GRAD_FACTOR * err_torch + 1e-6 * scale, (err, err_torch, scale)


@pytest.mark.parametrize("which", ["d", "logp"])
def test_grad_through_one_output(which, poison):
    """The other output's gradient arrives as None (materialised zeros): the kernel must not care."""
    t, c, _, _ = _inputs(3, 5, (257,), torch.float32, torch.float32, seed=7)
    t.requires_grad_()
    d, logp = nb.neighbour_logprobs(t, c, 0.05)
    out = d if which == "d" else logp
    (out[:, 1] * torch.tensor([1.0, -2.0, 0.5], device=DEVICE)).sum().backward()
    t64 = t.detach().cpu().double().requires_grad_()
    d64, logp64 = ref.neighbour_logprobs_ref(t64, c.cpu(), 0.05, upcast=True)
    (
        (d64 if which == "d" else logp64)[:, 1] * torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    ).sum().backward()
    torch.testing.assert_close(
        t.grad.cpu().double(), t64.grad, rtol=1e-4, atol=1e-4 * t64.grad.abs().max().item()
    )


def test_clipped_objective_gradient(poison):
    """The AR-CoPO loss shape: ratio of exp(logp) to a detached old logp, clipped, times advantages."""
    A, G = 4, 12
    t, c, _, _ = _inputs(A, G, (3, 4, 29), torch.float32, torch.float32, seed=11, spread=0.05)
    adv = torch.randn(G, dtype=torch.float64)

    def objective(x, tau, fn):
        d, logp = fn(x, c if x.device.type == c.device.type else c.cpu(), tau)
        _, old = fn(x.detach() + 0.01, c if x.device.type == c.device.type else c.cpu(), tau)
        rho = torch.exp(logp.double() - old.double().detach())
        adv_ = adv.to(rho.device)
        return (
            -torch.minimum(rho * adv_, rho.clamp(1 - 0.2, 1 + 0.2) * adv_).mean() + 1e-3 * d.double().mean()
        )

    t.requires_grad_()
    objective(t, 0.01, nb.neighbour_logprobs).backward()
    t64 = t.detach().cpu().double().requires_grad_()
    objective(t64, 0.01, lambda x, cc, tau: ref.neighbour_logprobs_ref(x, cc, tau, upcast=True)).backward()
    torch.testing.assert_close(
        t.grad.cpu().double(), t64.grad, rtol=1e-4, atol=1e-4 * t64.grad.abs().max().item()
    )


def test_candidates_get_no_gradient():
    t, c, _, _ = _inputs(2, 3, (40,), torch.float32, torch.float32, seed=3)
    t.requires_grad_()
    c.requires_grad_()
    d, logp = nb.neighbour_logprobs(t, c, 0.1)
    (d.sum() + logp.sum()).backward()
    assert c.grad is None and t.grad is not None


def test_ops_dispatch_triton_equals_torch():
    t, c, _, _ = _inputs(3, 4, (5, 31), torch.bfloat16, torch.bfloat16, seed=5)
    a = ops.neighbour_logprobs(t, c, 0.02, backend="triton")
    b = ops.neighbour_logprobs(t, c, 0.02, backend="torch")
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=2e-5)


def test_no_anchors():
    c = torch.randn(3, 10, device=DEVICE)
    d, logp = nb.neighbour_logprobs(torch.empty(0, 10, device=DEVICE), c, 0.1)
    assert d.shape == logp.shape == (0, 3)


def _bad_calls():
    t, c = torch.randn(2, 8, device=DEVICE), torch.randn(3, 8, device=DEVICE)
    yield (
        "must share per-sample shapes",
        lambda: nb.neighbour_logprobs(t, torch.randn(3, 9, device=DEVICE), 0.1),
    )
    yield "float32, bfloat16 or float16", lambda: nb.neighbour_logprobs(t.double(), c, 0.1)
    yield "float32, bfloat16 or float16", lambda: nb.neighbour_logprobs(t, c.long(), 0.1)
    yield (
        "between 1 and 64 candidates",
        lambda: nb.neighbour_logprobs(t, torch.randn(0, 8, device=DEVICE), 0.1),
    )
    yield (
        "between 1 and 64 candidates",
        lambda: nb.neighbour_logprobs(t, torch.randn(65, 8, device=DEVICE), 0.1),
    )
    yield (
        "per-sample size must be positive",
        lambda: nb.neighbour_logprobs(
            torch.randn(2, 0, device=DEVICE), torch.randn(3, 0, device=DEVICE), 0.1
        ),
    )
    yield (
        "broadcastable to \\[A, 1\\]",
        lambda: nb.neighbour_logprobs(t, c, torch.tensor([0.1, 0.2], device=DEVICE)),
    )
    yield "positive finite temperature", lambda: nb.neighbour_logprobs(t, c, 0.0)
    yield "positive finite temperature", lambda: nb.neighbour_logprobs(t, c, float("nan"))
    yield (
        "must not require grad",
        lambda: nb.neighbour_logprobs(t, c, torch.tensor(0.1, requires_grad=True, device=DEVICE)),
    )
    yield "tau must be a float", lambda: nb.neighbour_logprobs(t, c, "auto")
    yield "x0_old must be on", lambda: nb.neighbour_logprobs(t, c.to("meta"), 0.1)


_BAD = list(_bad_calls())


@pytest.mark.parametrize("match,call", _BAD, ids=[f"{i}:{m}" for i, (m, _) in enumerate(_BAD)])
def test_bad_arguments_raise(match, call):
    with pytest.raises(ValueError, match=match):
        call()


def test_forward_is_one_launch_of_several_programs(monkeypatch, poison):
    """One forward launch: 2 anchor blocks (A = 5, a padded slot) x 3 programs over 7 tiles (3, 3 and 1 tiles
    each), the last program (by ticket) reduces; the ticket is back at 0 for the next call."""
    import triton

    launches = []
    for name in dir(nb):  # every kernel of the module (helpers called inside kernels are not launched)
        obj = getattr(nb, name)
        if name.endswith("_kernel") and (isinstance(obj, triton.runtime.JITFunction)
                                         or type(obj).__name__ == "InterpretedFunction"):
            class Spy:
                def __init__(self, fn, name):
                    self.fn, self.name = fn, name

                def __getitem__(self, grid):
                    launches.append((self.name, grid))
                    return self.fn[grid]

            monkeypatch.setattr(nb, name, Spy(obj, name))
    monkeypatch.setattr(nb, "INTERPRET_SLOTS", 6)  # per anchor block: 3
    A, G, shape = 5, 12, (7 * 256 - 100,)  # G_PAD 16 -> 256-element tiles: 7 tiles
    t, c, _, _ = _inputs(A, G, shape, torch.bfloat16, torch.bfloat16, seed=21)
    for _ in range(2):  # the second call checks the ticket reset
        d, logp = nb.neighbour_logprobs(t, c, 0.02)
        d64, logp64 = ref.neighbour_logprobs_ref(t.cpu().double(), c.cpu(), 0.02, upcast=True)
        torch.testing.assert_close(d.cpu().double(), d64, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(logp.cpu().double(), logp64, rtol=1e-5, atol=2e-5)
    assert launches == [("_forward_kernel", (3, 2))] * 2
    assert int(nb._ticket(t.device)) == 0

