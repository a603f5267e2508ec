"""The on-device self-test (arcopo_fast/selftest.py) and its fallback, exercised on CPU: the Triton kernels
run under TRITON_INTERPRET=1 at tiny shapes, ARCOPO_SELFTEST=cpu makes CPU calls checked as CUDA calls
are, and failing / wrong / sloppy backends are injected by replacing the kernel module's function.
(That every real kernel passes its check here: tests/test_doctor.py::test_selftest_passes_on_this_machine.)"""

from __future__ import annotations

import warnings

from triton_env import require_kernel_device

require_kernel_device()  # sets TRITON_INTERPRET=1 (CPU) unless chosen; before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

from arcopo_fast import ext, ops, selftest  # noqa: E402
from arcopo_fast.kernels import block_attn, neighbour  # noqa: E402
from arcopo_fast.kernels import reference as ref  # noqa: E402

B, LQ, H, D, LC = 2, 12, 2, 16, 20


@pytest.fixture
def checked(monkeypatch):
    """CPU calls are self-tested; the process forces the triton backend (as ARCOPO_BACKEND=triton would)."""
    monkeypatch.setenv("ARCOPO_SELFTEST", "cpu")
    monkeypatch.setenv("ARCOPO_BACKEND", "triton")
    selftest.reset()
    yield
    selftest.reset()


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, LQ, H, D, generator=g) for _ in range(3))
    kc, vc = (torch.randn(B, LC, H, D, generator=g) for _ in range(2))
    return q, k, v, kc, vc


def _attention_warnings(record):
    return [w for w in record if issubclass(w.category, RuntimeWarning) and "self-test" in str(w.message)]


@pytest.mark.parametrize("fault", ["raises", "wrong", "unwritten"])
def test_faulty_kernel_falls_back_with_one_warning(checked, monkeypatch, fault):
    real = block_attn.chunk_attention

    def faulty(q, k, v, *args, **kw):
        if fault == "raises":
            raise RuntimeError("PTX JIT compilation failed (injected)")
        out = real(q, k, v, *args, **kw)
        if fault == "wrong":
            return out * 1.01
        partial = torch.empty_like(out)  # poisoned by the self-test: a row left unwritten shows as NaN
        partial[:, :-1] = out[:, :-1]
        return partial

    monkeypatch.setattr(block_attn, "chunk_attention", faulty)
    q, k, v, kc, vc = _inputs()
    want = ref.chunk_attention_torch(q, k, v, kc, vc, LC - 3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        outs = [ops.chunk_attention(q, k, v, kc, vc, LC - 3) for _ in range(3)]
    ws = _attention_warnings(record)
    assert len(ws) == 1, [str(w.message) for w in record]
    msg = str(ws[0].message)
    assert "chunk_attention" in msg and "cpu" in msg and "torch path serves" in msg
    assert {"raises": "PTX JIT compilation failed", "wrong": "exceeds", "unwritten": "exceeds"}[fault] in msg
    for out in outs:
        torch.testing.assert_close(out, want, rtol=0, atol=0)  # the torch path itself served
    (verdict,) = [x for x in selftest.verdicts() if x.op == "chunk_attention"]
    assert not verdict.ok and verdict.variant == "cache/fwd/d16" and verdict.backend == "triton"


def test_gradient_check_catches_a_wrong_backward(checked, monkeypatch):
    """The fwd+bwd variant compares gradients: a kernel with a right forward and a wrong backward fails."""
    real = neighbour.neighbour_logprobs

    class Scaled(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            return 1.5 * g

    monkeypatch.setattr(neighbour, "neighbour_logprobs", lambda t, c, tau: real(Scaled.apply(t), c, tau))
    g = torch.Generator().manual_seed(1)
    t = torch.randn(3, 40, generator=g, requires_grad=True)
    c = torch.randn(5, 40, generator=g)
    with torch.no_grad():
        ops.neighbour_logprobs(t, c, 0.1)  # forward-only variant: passes
    with pytest.warns(RuntimeWarning, match=r"neighbour_logprobs \[fwd\+bwd\].*dx0_theta"):
        d, logp = ops.neighbour_logprobs(t, c, 0.1)
    logp.sum().backward()
    want_t = t.detach().clone().requires_grad_(True)
    ref.neighbour_logprobs_torch(want_t, c, 0.1)[1].sum().backward()
    torch.testing.assert_close(t.grad, want_t.grad)
    ok = {v.variant: v.ok for v in selftest.verdicts() if v.op == "neighbour_logprobs"}
    assert ok == {"fwd": True, "fwd+bwd": False}


def test_selftest_0_skips_the_checks(checked, monkeypatch):
    monkeypatch.setenv("ARCOPO_SELFTEST", "0")
    calls = []
    monkeypatch.setattr(selftest, "run_check", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(block_attn, "chunk_attention", lambda q, *a, **k: torch.zeros_like(q))
    q, k, v, kc, vc = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ops.chunk_attention(q, k, v, kc, vc, LC)
    assert calls == [] and torch.count_nonzero(out) == 0  # unchecked: the (injected) kernel served


def test_check_runs_once_per_key_and_explicit_backends_are_not_gated(checked, monkeypatch):
    runs = []
    real_run = selftest.run_check
    monkeypatch.setattr(selftest, "run_check", lambda *a, **k: runs.append(a) or real_run(*a, **k))
    q, k, v, kc, vc = _inputs()
    for n in (LC, LC - 5, 7):
        ops.chunk_attention(q, k, v, kc, vc, n)
    ops.chunk_attention(q.double(), k.double(), v.double(), kc.double(), vc.double(), LC)  # another dtype
    assert [r[:2] + r[4:] for r in runs] == [("chunk_attention", "cache/fwd/d16", "torch.float32"),
                                            ("chunk_attention", "cache/fwd/d16", "torch.float64")]
    monkeypatch.setattr(block_attn, "chunk_attention", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(RuntimeError, match="x"):  # backend= argument: exactly that backend, no fallback
        ops.chunk_attention(q, k, v, kc, vc, LC, backend="triton")


def test_compiled_graph_uses_the_verdict(checked, monkeypatch):
    """Under torch.compile(fullgraph=True) the verdict is a trace-time constant: a failing kernel is never
    traced, the graph holds the torch path, and there is still exactly one warning."""
    monkeypatch.setattr(block_attn, "chunk_attention", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("bad")))
    q, k, v, kc, vc = _inputs(2)

    def f(q, k, v, kc, vc):
        return ops.chunk_attention(q * 2, k, v, kc, vc, LC).sin()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = compiled(q, k, v, kc, vc)
    assert len(_attention_warnings(record)) == 1
    torch.testing.assert_close(got, ref.chunk_attention_torch(q * 2, k, v, kc, vc, LC).sin())


def test_kv_fork_arch_error_falls_back_once(monkeypatch):
    """A kernel-image error at the first fork (extension built for other archs) -> one warning, the torch
    fork serves, correct result, and the doctor's reason names the archs."""
    if not ext.extension_loaded():
        pytest.skip("needs the compiled extension")
    selftest.reset()

    def no_image(*a):
        raise torch.AcceleratorError("CUDA error: no kernel image is available for execution on the device")

    monkeypatch.setattr(ext, "kv_fork_cpp_", no_image)
    g = torch.Generator().manual_seed(3)
    caches = [torch.randn(4, 9, 2, 3, generator=g) for _ in range(4)]
    want = [c.clone() for c in caches]
    src, dst = torch.tensor([0, 0]), torch.tensor([1, 3])
    ext.kv_fork_torch_(want, src, dst, 7)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ext.kv_fork_(caches, src, dst, 7)
        ext.kv_fork_(caches, src, dst, 7)
    ws = [w for w in record if "pure-torch fallback" in str(w.message)]
    assert len(ws) == 1 and "no kernel image" in str(ws[0].message)
    for a, b in zip(caches, want):
        assert torch.equal(a, b)
    assert "no kernel image" in ext.fallback_reason("cpu") and ops.describe()["kv_fork"] == "torch-fallback"
    selftest.reset()
    assert ext.fallback_reason("cpu") is None


def test_kv_fork_self_test_catches_a_wrong_op(monkeypatch):
    if not ext.extension_loaded():
        pytest.skip("needs the compiled extension")
    monkeypatch.setenv("ARCOPO_SELFTEST", "cpu")
    selftest.reset()
    real = ext.kv_fork_cpp_

    def off_by_one(caches, src, dst, n):
        real(caches, src, dst, max(n - 1, 0))

    monkeypatch.setattr(ext, "kv_fork_cpp_", off_by_one)
    g = torch.Generator().manual_seed(4)
    caches = [torch.randn(3, 8, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    want = [c.clone() for c in caches]
    src, dst = torch.tensor([2]), torch.tensor([0])
    ext.kv_fork_torch_(want, src, dst, 8)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ext.kv_fork_(caches, src, dst, 8)
        ext.kv_fork_(caches, src, dst, 8)
    assert len(record) == 1, [str(w.message) for w in record]
    assert "kv_fork [fwd] with backend 'cpp' failed its self-test on cpu" in str(record[0].message)
    assert "SelfTestFailure: caches[0] differs" in str(record[0].message)
    for a, b in zip(caches, want):
        assert torch.equal(a, b)
    selftest.reset()


def test_a_triton_older_than_the_kernels_need_counts_as_absent(monkeypatch):
    """torch 2.8/2.9 pin triton 3.4/3.5, which lack tl.mul: "auto" must not hand those kernels out."""
    import triton

    from arcopo_fast import ops

    for version, ok in (("3.5.1", False), ("3.4.0+git1234", False), ("3.6.0", True), ("3.10.0", True)):
        monkeypatch.setattr(triton, "__version__", version)
        ops._triton_recent.cache_clear()
        assert ops.triton_available() is ok, version
    ops._triton_recent.cache_clear()
