"""kernels/sampler_step.py (fused consistency step + in-kernel Philox) against kernels/reference.py.

Runs the Triton kernels on CPU under TRITON_INTERPRET=1 (set before triton is imported). Outputs are
poisoned: every torch.empty/empty_like made during a kernel call is NaN-filled, so an element the kernel
fails to write shows up as NaN.

Normal-vs-reference bound: the Philox words and the 24-bit uniforms are bit-identical; the normal goes
through log/cos, whose last bits differ between math libraries (numpy under the interpreter, SLEEF/glibc
in torch on CPU, libdevice on CUDA). Measured here: max |z_triton - z_ref| = 4.8e-7 over 1e5 normals
(|z| <= 5.8); the tests assert <= 1e-5.
"""

from __future__ import annotations

from triton_env import DEVICE, require_kernel_device

require_kernel_device()  # sets TRITON_INTERPRET=1 (CPU) unless chosen; before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

from arcopo_fast.kernels import reference as ref  # noqa: E402
from arcopo_fast.kernels import sampler_step as ss  # noqa: E402

from arcopo_fast import ops  # noqa: E402
from arcopo_fast.noise import NoiseKind, NoisePlan  # noqa: E402

NORMAL_ATOL = 1e-5  # library-dependent last bits of log/cos, see the module docstring


def _rand_words(n, gen):
    return torch.randint(0, 2**32, (n,), generator=gen, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------------------
# Philox words and normals
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [(0, 0), (0xFFFFFFFF, 0xFFFFFFFF), (0xA4093822, 0x299F31D0), (1, 0x80000000)])
def test_philox_words_bit_exact(key, poison):
    gen = torch.Generator().manual_seed(key[0] ^ 123)
    n = 3001  # not a multiple of the block
    c = [_rand_words(n, gen) for _ in range(4)]
    # corner words: 0, 1, 2^31 - 1, 2^31, 2^32 - 1 in every position
    corners = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1])
    c = [torch.cat([ci, corners.roll(j)]) for j, ci in enumerate(c)]
    got = ss.philox_words(*[ci.to(DEVICE) for ci in c], *key)
    want = ref.philox4x32(*c, *key)
    for j in range(4):
        assert torch.equal(got[j].cpu(), want[j]), f"word {j} differs"


def test_philox_words_broadcast():
    c0 = torch.arange(7, device=DEVICE)[None, :]
    c1 = torch.tensor([[3], [2**32 - 1]], device=DEVICE)
    got = ss.philox_words(c0, c1, torch.tensor(5), torch.tensor(9), 11, 13)
    want = ref.philox4x32(c0.cpu(), c1.cpu(), torch.tensor(5), torch.tensor(9), 11, 13)
    assert got[0].shape == (2, 7)
    assert all(torch.equal(g.cpu(), w) for g, w in zip(got, want))


@pytest.mark.parametrize("B,numel", [(1, 1), (1, 2049), (3, 1155)])
def test_philox_normal_matches_reference(B, numel, poison):
    gen = torch.Generator().manual_seed(numel)
    c1, c3 = _rand_words(B, gen), _rand_words(B, gen)
    k0, k1, c2 = 0x9E3779B9, 0x01234567, 0xFEDCBA98
    got = ss.philox_normal(numel, k0, k1, c1.to(DEVICE), c2, c3.to(DEVICE)).cpu()
    want = ref.philox_normal_ref(numel, k0, k1, c1, c2, c3)
    assert got.shape == (B, numel) and got.dtype == torch.float32
    assert torch.isfinite(got).all()
    assert (got - want).abs().max().item() <= NORMAL_ATOL


def test_philox_normal_bound_on_1e5_samples():
    """The documented bound, measured on enough samples to hit the tails (|z| up to ~4.5)."""
    c1 = torch.tensor([17, 2**32 - 2])
    c3 = torch.tensor([1 << 24, 5])
    got = ss.philox_normal(50_001, 7, 8, c1.to(DEVICE), 9, c3.to(DEVICE)).cpu()
    want = ref.philox_normal_ref(50_001, 7, 8, c1, 9, c3)
    err = (got - want).abs()
    assert err.max().item() <= NORMAL_ATOL
    assert (err <= 1e-6 * want.abs().clamp_min(1)).float().mean() > 0.999  # nearly all within a few ulp


def test_philox_normal_rows_are_batch_invariant():
    """Row b depends only on its own counters: a batch equals the rows launched one by one."""
    c1 = torch.tensor([4, 5, 6], device=DEVICE)
    c3 = torch.tensor([7, 7, 1 << 24], device=DEVICE)
    full = ss.philox_normal(1500, 1, 2, c1, 3, c3)
    for b in range(3):
        one = ss.philox_normal(1500, 1, 2, c1[b : b + 1], 3, c3[b : b + 1])
        assert torch.equal(full[b], one[0])


def test_philox_normal_empty():
    out = ss.philox_normal(
        0, 1, 2, torch.tensor([1, 2], device=DEVICE), 3, torch.tensor([1, 2], device=DEVICE)
    )
    assert out.shape == (2, 0)


# ---------------------------------------------------------------------------------------------------------
# Consistency step
# ---------------------------------------------------------------------------------------------------------

SIGMAS = [0.9977, 0.9375, 0.8333, 0.625]  # Self-Forcing-like shifted sigmas at t = 1000, 750, 500, 250


def _inputs(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(dtype)
    flow = torch.randn(shape, generator=gen).to(dtype)
    sig = torch.tensor(SIGMAS, dtype=torch.float32)
    return x.to(DEVICE), flow.to(DEVICE), sig.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 3, 5, 7, 11), (3, 2, 3, 13, 17), (2, 1031)])
@pytest.mark.parametrize("step", [0, 2, 3])
def test_consistency_step_matches_torch_path(shape, dtype, step, poison):
    x, flow, sig = _inputs(shape, dtype, seed=step + len(shape))
    B = shape[0]
    last = step == len(SIGMAS) - 1  # the final step draws no noise
    words = None
    if not last:
        plan = NoisePlan(0x0123456789ABCDEF)
        key = plan.key(
            list(range(5, 5 + B)),
            chunk=3,
            step=step + 1,
            kind=NoiseKind.SOLVER,
            branch=[b * 7 for b in range(B)],
        )
        words = plan.words(key, device=x.device)
    x0, xn = ss.consistency_step(x, flow, sig, step, words)
    want_x0, want_xn = ops.consistency_step(
        x.cpu(),
        flow.cpu(),
        sig.cpu(),
        step,
        None if last else (words[0], words[1], words[2].cpu(), words[3], words[4].cpu()),
        backend="torch",
    )
    assert x0.dtype == torch.float32 and x0.shape == x.shape
    # x0 involves no transcendental: float32 mul + sub, identical up to FMA contraction on GPU (1 ulp).
    torch.testing.assert_close(x0.cpu(), want_x0, rtol=1e-6, atol=1e-6)
    if last:
        assert xn is None
        return
    assert xn.dtype == torch.float32 and xn.shape == x.shape
    torch.testing.assert_close(xn.cpu(), want_xn, rtol=1e-6, atol=NORMAL_ATOL)
    # and against the float64 formula with the float64-converted reference noise
    noise = ref.philox_normal_ref(x[0].numel(), words[0], words[1], words[2].cpu(), words[3], words[4].cpu())
    r0, rn = ref.consistency_step_ref(
        x.cpu(), flow.cpu(), SIGMAS[step], SIGMAS[step + 1], noise.view(x.shape), upcast=True
    )
    assert (xn.cpu().double() - rn.double()).abs().max() <= 2e-5


def test_consistency_step_noncontiguous_input(poison):
    x, flow, sig = _inputs((2, 33, 5), torch.float32, seed=1)
    xt, ft = x.transpose(1, 2), flow.transpose(1, 2)  # [2, 5, 33] non-contiguous views
    plan = NoisePlan(5)
    words = plan.words(plan.key([0, 1], 0, 1, NoiseKind.SOLVER), device=x.device)
    x0, xn = ss.consistency_step(xt, ft, sig, 0, words)
    w0, wn = ops.consistency_step(xt.contiguous(), ft.contiguous(), sig, 0, words, backend="torch")
    torch.testing.assert_close(x0, w0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(xn, wn, rtol=1e-6, atol=NORMAL_ATOL)


def test_consistency_step_sigma_table_dtype(poison):
    """A float64 table is read and rounded to float32 in-kernel, as the torch path does."""
    x, flow, _ = _inputs((1, 300), torch.float32, seed=2)
    sig64 = torch.tensor(SIGMAS, dtype=torch.float64, device=x.device)
    x0, _ = ss.consistency_step(x, flow, sig64, 1)
    w0, _ = ops.consistency_step(x, flow, sig64, 1, backend="torch")
    torch.testing.assert_close(x0, w0, rtol=1e-6, atol=1e-6)


def test_ops_dispatch_triton_equals_torch():
    x, flow, sig = _inputs((2, 3, 4, 5), torch.bfloat16, seed=3)
    plan = NoisePlan(99)
    words = plan.words(plan.key([0, 1], 2, 1, NoiseKind.SOLVER), device=x.device)
    a = ops.consistency_step(x, flow, sig, 0, words, backend="triton")
    b = ops.consistency_step(x, flow, sig, 0, words, backend="torch")
    torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a[1], b[1], rtol=1e-6, atol=NORMAL_ATOL)


def test_consistency_step_empty_batch():
    x = torch.empty(0, 3, 4, device=DEVICE)
    x0, xn = ss.consistency_step(
        x,
        x,
        torch.tensor(SIGMAS, device=DEVICE),
        0,
        (
            1,
            2,
            torch.empty(0, dtype=torch.int64, device=DEVICE),
            3,
            torch.empty(0, dtype=torch.int64, device=DEVICE),
        ),
    )
    assert x0.shape == x.shape and xn.shape == x.shape


def _bad_step_calls():
    x = torch.randn(2, 8, device=DEVICE)
    sig = torch.tensor(SIGMAS, device=DEVICE)
    c = torch.tensor([1, 2], device=DEVICE)
    good = (1, 2, c, 3, c)
    yield "flow must match", lambda: ss.consistency_step(x, torch.randn(2, 9, device=DEVICE), sig, 0, good)
    yield "floating-point", lambda: ss.consistency_step(x.long(), x.long(), sig, 0, good)
    yield "1-D float tensor", lambda: ss.consistency_step(x, x, sig[None], 0, good)
    yield "1-D float tensor", lambda: ss.consistency_step(x, x, [0.5, 0.2], 0, good)
    yield "sigmas must be on", lambda: ss.consistency_step(x, x, sig.to("meta"), 0, good)
    yield "step must be in", lambda: ss.consistency_step(x, x, sig, 3, good)  # no sigma_next for step 3
    yield "step must be in", lambda: ss.consistency_step(x, x, sig, 4, None)
    yield "step must be in", lambda: ss.consistency_step(x, x, sig, -1, None)
    yield "step must be a Python int", lambda: ss.consistency_step(x, x, sig, torch.tensor(0), None)
    yield "noise_words must be", lambda: ss.consistency_step(x, x, sig, 0, (1, 2, c))
    yield "c1 must have shape", lambda: ss.consistency_step(x, x, sig, 0, (1, 2, c[:1], 3, c))
    yield "int64", lambda: ss.consistency_step(x, x, sig, 0, (1, 2, c.float(), 3, c))
    yield "c3 must be on", lambda: ss.consistency_step(x, x, sig, 0, (1, 2, c, 3, c.to("meta")))
    yield "k0 must be in", lambda: ss.consistency_step(x, x, sig, 0, (2**32, 2, c, 3, c))
    yield "c2 must be in", lambda: ss.consistency_step(x, x, sig, 0, (1, 2, c, -1, c))
    yield "k1 must be an int", lambda: ss.consistency_step(x, x, sig, 0, (1, 2.5, c, 3, c))
    yield "numel must be in", lambda: ss.philox_normal(-1, 1, 2, c, 3, c)
    yield "c3 must have shape", lambda: ss.philox_normal(10, 1, 2, c, 3, c[:1])
    yield "k0 must be in", lambda: ss.philox_normal(10, -5, 2, c, 3, c)


_BAD = list(_bad_step_calls())


@pytest.mark.parametrize("match,call", _BAD, ids=[f"{i}:{m}" for i, (m, _) in enumerate(_BAD)])
def test_bad_arguments_raise(match, call):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
def test_consistency_step_cuda_graph_capture():
    x, flow, sig = _inputs((2, 3, 16, 6, 10), torch.bfloat16, seed=4)
    plan = NoisePlan(7)
    words = plan.words(plan.key([0, 1], 1, 1, NoiseKind.SOLVER), device=x.device)
    eager = ss.consistency_step(x, flow, sig, 0, words)  # also compiles the kernel outside the capture
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ss.consistency_step(x, flow, sig, 0, words)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = ss.consistency_step(x, flow, sig, 0, words)
    x.copy_(torch.randn_like(x))  # replay must read the new input in place
    g.replay()
    want = ss.consistency_step(x, flow, sig, 0, words)
    torch.cuda.synchronize()
    assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])
    assert not torch.equal(out[0], eager[0])
