"""kernels/qk_norm_rope.py: fused q/k RMSNorm + interleaved RoPE (inference), against a float64 reference
and against the model's torch path (RMSNorm modules + apply_rope) in the same dtype; ops dispatch; the
model's inference path (fused) and training path (modules, with autograd).

Runs the Triton kernel on CPU under TRITON_INTERPRET=1 (set before triton is imported). On a GPU machine,
`TRITON_INTERPRET=0 pytest tests/test_qk_norm_rope.py` runs the kernel cases on CUDA.
Accuracy rule: the kernel's max error vs float64 is at most 2x the torch path's (same dtype), plus a tiny
absolute slack for float32-level noise; and it equals the torch path except where the float32 reduction
order moves a rounding (at most a couple of ulps of the output, on a small fraction of elements).
"""

from __future__ import annotations

from triton_env import DEVICE, INTERPRET, require_kernel_device

require_kernel_device()  # sets TRITON_INTERPRET=1 (CPU) unless chosen; before triton is imported

import functools  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from model_helpers import make_tiny_model  # noqa: E402

from arcopo_fast import ops  # noqa: E402
from arcopo_fast.kernels import qk_norm_rope as qnr  # noqa: E402
from arcopo_fast.kernels import reference as ref  # noqa: E402
from arcopo_fast.model.rope import apply_rope, rope_cos_sin  # noqa: E402
from arcopo_fast.model.wan import RMSNorm  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
EPS = 1e-6


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """The kernel's output buffer starts as NaN, so an unwritten element fails the comparison."""

    def nan_empty(shape, *, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(qnr, "_empty", nan_empty)


def _inputs(B, L, H, D, dtype, seed, wdtype=None, row_pad=0):
    """Pre-norm q, k [B, L, H*D] (k optionally a strided slice of a wider tensor: rows not contiguous),
    weights in (0.5, 1.5), and tables of random angles (every pair rotates by a different amount)."""
    g = torch.Generator().manual_seed(seed)
    C = H * D
    q = (torch.randn(B, L, C, generator=g) * 3 + 0.5).to(DEVICE, dtype)
    k = torch.randn(B, L, C + row_pad, generator=g).to(DEVICE, dtype)[..., :C]
    wd = wdtype or dtype
    wq = (torch.rand(C, generator=g) + 0.5).to(DEVICE, wd)
    wk = (torch.rand(C, generator=g) + 0.5).to(DEVICE, wd)
    ang = torch.rand(L, D // 2, generator=g, dtype=torch.float64) * 100
    return q, k, wq, wk, ang.cos().float().to(DEVICE), ang.sin().float().to(DEVICE)


def _ulp(dtype) -> float:
    return torch.finfo(dtype).eps


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B,L,H,D,row_pad",
    [
        (1, 37, 2, 32, 0),
        (3, 19, 3, 6, 0),
        (2, 23, 2, 16, 8),
        (1, 1, 1, 8, 0),
        (2, 45, 4, 8, 2),
        (2, 17, 12, 128, 0),
    ],
)
def test_matches_float64_and_torch(dtype, B, L, H, D, row_pad):
    q, k, wq, wk, cos, sin = _inputs(B, L, H, D, dtype, seed=B * 100 + L, row_pad=row_pad)
    with torch.no_grad():
        got = qnr.qk_norm_rope(q, k, wq, wk, cos, sin, H, EPS)
    tq, tk = ref.qk_norm_rope_torch(q, k, wq, wk, cos, sin, H, EPS)
    for x, w, out, tor in ((q, wq, got[0], tq), (k, wk, got[1], tk)):
        assert out.shape == (B, L, H, D) and out.dtype == dtype and out.is_contiguous()
        assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) or non-finite outputs"
        want = ref.rms_norm_rope_ref(x, w, cos, sin, H, EPS)
        err = (out.double() - want).abs().max().item()
        err_torch = (tor.double() - want).abs().max().item()
        assert err <= 2 * err_torch + 1e-6, f"{dtype}: error {err:.3g} > 2x torch's {err_torch:.3g}"
        # Against the torch path itself: identical roundings except the float32 sum(x^2) order.
        diff = (out.float() - tor.float()).abs()
        scale = tor.float().abs().max().item()
        assert diff.max().item() <= 4 * _ulp(dtype) * scale, f"{dtype}: max diff {diff.max().item():.3g}"
        if dtype != torch.float32:
            assert (diff > 0).float().mean().item() <= 0.01, "more than 1% of elements differ from torch"


def test_weight_dtype_promotes_like_torch():
    """bf16 projections with float32 weights: y is rounded to bf16, the product (and the output) float32,
    exactly as `y.to(x.dtype) * weight` then apply_rope."""
    q, k, wq, wk, cos, sin = _inputs(2, 11, 2, 16, torch.bfloat16, seed=5, wdtype=torch.float32)
    got = qnr.qk_norm_rope(q, k, wq, wk, cos, sin, 2, EPS)
    want = ref.qk_norm_rope_torch(q, k, wq, wk, cos, sin, 2, EPS)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=2 * _ulp(torch.bfloat16), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_is_the_module_path(dtype):
    """ops' torch backend is op for op the model's RMSNorm modules + apply_rope (bit-identical), with the
    model's real RoPE tables."""
    from arcopo_fast.model.config import get_preset

    cfg = get_preset("tiny")
    H, D = cfg.num_heads, cfg.head_dim
    cos, sin = rope_cos_sin(cfg, 3, 3, 3, 5, DEVICE)
    L = cos.shape[0]
    q, k, *_ = _inputs(2, L, H, D, dtype, seed=7)
    nq, nk = RMSNorm(cfg.dim, cfg.eps).to(DEVICE, dtype), RMSNorm(cfg.dim, cfg.eps).to(DEVICE, dtype)
    with torch.no_grad():
        nq.weight.uniform_(0.5, 1.5)
        nk.weight.uniform_(0.5, 1.5)
    shape = (2, L, H, D)
    mq, mk = apply_rope(nq(q).view(shape), cos, sin), apply_rope(nk(k).view(shape), cos, sin)
    oq, ok = ops.qk_norm_rope(q, k, nq.weight, nk.weight, cos, sin, H, cfg.eps, backend="torch")
    assert torch.equal(oq, mq) and torch.equal(ok, mk)
    with torch.no_grad():
        fq, fk = ops.qk_norm_rope(q, k, nq.weight, nk.weight, cos, sin, H, cfg.eps, backend="triton")
    for f, m in ((fq, mq), (fk, mk)):
        torch.testing.assert_close(f, m, rtol=4 * _ulp(dtype), atol=4 * _ulp(dtype))


def test_ops_dispatch_and_errors():
    q, k, wq, wk, cos, sin = _inputs(2, 9, 2, 8, torch.float32, seed=3)
    with torch.no_grad():
        a = ops.qk_norm_rope(q, k, wq, wk, cos, sin, 2, EPS, backend="triton")
        b = ops.qk_norm_rope(q, k, wq, wk, cos, sin, 2, EPS, backend="torch")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
    # The torch backend differentiates; the triton backend refuses rather than dropping gradients.
    wq_g = wq.clone().requires_grad_()
    ops.qk_norm_rope(q, k, wq_g, wk, cos, sin, 2, EPS, backend="torch")[0].sum().backward()
    assert wq_g.grad is not None and torch.isfinite(wq_g.grad).all()
    with pytest.raises(RuntimeError, match="no autograd"):
        ops.qk_norm_rope(q, k, wq_g, wk, cos, sin, 2, EPS, backend="triton")
    with torch.no_grad():  # no gradient needed: fine
        ops.qk_norm_rope(q, k, wq_g, wk, cos, sin, 2, EPS, backend="triton")
    with pytest.raises(ValueError, match="num_heads"):
        ops.qk_norm_rope(q, k, wq, wk, cos, sin, 3, EPS)
    with pytest.raises(ValueError, match="cos and sin"):
        ops.qk_norm_rope(q, k, wq, wk, cos[:-1], sin[:-1], 2, EPS)
    with pytest.raises(ValueError, match="q and k"):
        ops.qk_norm_rope(q, k[:, :-1], wq, wk, cos, sin, 2, EPS)
    with pytest.raises(ValueError, match="weight_q"):
        qnr.qk_norm_rope(q, k, wq[:-1], wk, cos, sin, 2, EPS)
    with pytest.raises(ValueError, match="float32 tables"):
        qnr.qk_norm_rope(q, k, wq, wk, cos.double(), sin.double(), 2, EPS)
    with pytest.raises(ValueError, match="share a dtype"):
        qnr.qk_norm_rope(q, k.half(), wq, wk, cos, sin, 2, EPS)
    empty = qnr.qk_norm_rope(q[:0], k[:0], wq, wk, cos, sin, 2, EPS)
    assert empty[0].shape == (0, 9, 2, 8)


def _model_inputs(model, B=2, F=3, HW=(6, 10), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, F, 16, *HW, generator=g)
    t = torch.rand(B, F, generator=g) * 1000
    ctx = torch.randn(B, 5, model.cfg.text_dim, generator=g)
    return x.to(DEVICE), t.to(DEVICE), ctx.to(DEVICE)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_model_inference_uses_fused_kernel(monkeypatch, dtype, tol):
    """Under no_grad the self-attention calls ops.qk_norm_rope (forced to the triton backend here); the
    model's output matches the module path. On CPU with the default backend the output is bit-identical."""
    model = make_tiny_model(dtype=dtype).to(DEVICE)
    x, t, ctx = _model_inputs(model)
    with torch.no_grad():
        cross = model.encode_text(ctx.to(dtype))
        default = model(x, t, cross)  # backend auto: ops' torch path on CPU
    module = model(x, t, cross).detach()  # grad enabled, parameters require grad: the module path
    if DEVICE == "cpu":
        assert torch.equal(default, module)

    calls = []
    orig = ops.qk_norm_rope

    def fused(*a, **kw):
        calls.append(1)
        return orig(*a, **{**kw, "backend": "triton"})

    monkeypatch.setattr(ops, "qk_norm_rope", fused)
    with torch.no_grad():
        out = model(x, t, cross)
    assert len(calls) == model.cfg.num_layers
    torch.testing.assert_close(out, module, rtol=tol, atol=tol)


def test_training_path_keeps_modules_and_gradients(monkeypatch):
    """With grad enabled (full fine-tuning: every parameter trains) the module path runs, so autograd and
    training numerics are unchanged; the fused op is never called."""
    model = make_tiny_model(3).to(DEVICE)
    x, t, ctx = _model_inputs(model, B=1, seed=1)

    def forbidden(*a, **kw):
        raise AssertionError("ops.qk_norm_rope called on the training path")

    monkeypatch.setattr(ops, "qk_norm_rope", forbidden)
    out = model(x, t, model.encode_text(ctx))
    out.square().mean().backward()
    for blk in model.blocks:
        for norm in (blk.self_attn.norm_q, blk.self_attn.norm_k):
            assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0
    # Frozen weights but an input that needs a gradient (LoRA-style): still the module path.
    model.zero_grad()
    model.requires_grad_(False)
    xg = x.clone().requires_grad_()
    model(xg, t, model.encode_text(ctx)).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="CUDA graph capture needs a GPU")
def test_cuda_graph_capture():
    q, k, wq, wk, cos, sin = _inputs(2, 4680, 12, 128, torch.bfloat16, seed=11)
    launch = functools.partial(qnr.qk_norm_rope, q, k, wq, wk, cos, sin, 12, EPS)
    launch()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        launch()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = launch()
    q.mul_(2)
    graph.replay()
    want = launch()
    torch.cuda.synchronize()
    assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])
