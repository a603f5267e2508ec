"""On-device self-test of every non-torch backend before it serves a call.

The first time arcopo_fast.ops would run an op on a CUDA device with a backend other than the plain torch
path (our Triton kernels, the C++ fork, an SDPA/Flex/flash-attn attention candidate), it first runs a small
check of that backend on that very device, in that dtype, for that op variant (e.g. chunk attention with a
cache segment, forward only, head dim 128): fresh random inputs, outputs poisoned with NaN (every
torch.empty / empty_like of the backend's call is NaN-filled, so an element it forgets to write fails),
and the 2x-torch-error rule against a float64 reference:

    max |backend - ref64|  <=  2 * max |torch path - ref64|  +  eps(dtype) * (1 + max |ref64|)

for the outputs and, for ops with a backward, the gradients. A backend that fails to compile, raises, or
fails the rule is disabled for that (op, variant, device, dtype) for the rest of the process, with ONE
warning naming the op, the device and the error; the torch path serves instead. Never a crash, never a
silent wrong result.

    ARCOPO_SELFTEST=0     skip the checks (every backend serves unchecked)
    ARCOPO_SELFTEST=1     (default) check before the first use on a CUDA device
    ARCOPO_SELFTEST=cpu   also check kernels that run on CPU tensors (TRITON_INTERPRET=1): for tests

Verdicts live in a dict keyed by Python values (op, variant, backend, device, dtype): after the first call
a lookup costs a dict access and no device work. `passed` is marked constant for torch.compile, so a
compiled graph asks once at trace time and bakes the answer in (no check inside the traced region).
`python -m arcopo_fast.doctor --selftest` runs every check on the present device, at a small shape and at
the 1.3B shape, through `run_all`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

ENV = "ARCOPO_SELFTEST"
SIZES = ("small", "1.3b")


class SelfTestFailure(AssertionError):
    """A backend's result broke the 2x-torch-error rule (the message says which output, by how much)."""


@dataclass(frozen=True)
class Verdict:
    op: str
    variant: str
    backend: str
    device: str
    dtype: str
    ok: bool
    error: str = ""
    seconds: float = 0.0
    size: str = "small"
    detail: str = ""  # worst error against its bound, for the doctor

    def as_dict(self) -> dict:
        return asdict(self)


_VERDICTS: dict[tuple[str, str, str, str, str], Verdict] = {}
_LOCK = threading.RLock()


def mode() -> str:
    m = os.environ.get(ENV, "1").strip().lower()
    if m not in ("0", "1", "cpu"):
        raise ValueError(f"{ENV} must be 0, 1 or cpu, got {os.environ[ENV]!r}")
    return m


def applies(device: str) -> bool:
    """Whether calls on `device` ('cuda:0', 'cpu') are checked before their first use."""
    m = mode()
    return m != "0" and (device.startswith("cuda") or (m == "cpu" and device == "cpu"))


def passed(op: str, variant: str, backend: str, device: str, dtype: str) -> bool:
    """True when `backend` may serve `op` (variant, device, dtype): its check passed, or checks do not apply.
    Runs the check on the first ask (thread-safe) and warns once on failure."""
    key = (op, variant, backend, device, dtype)
    v = _VERDICTS.get(key)
    if v is not None:
        return v.ok
    if not applies(device):
        return True
    with _LOCK:
        v = _VERDICTS.get(key)
        if v is None:
            v = run_check(op, variant, backend, device, dtype)
            _VERDICTS[key] = v
            if not v.ok:
                warnings.warn(
                    f"arcopo_fast: {op} [{variant}] with backend '{backend}' failed its self-test on {_device_name(device)} "
                    f"in {dtype}: {v.error}. It is disabled for this process; the torch path serves these calls "
                    f"({ENV}=0 skips the checks).",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return v.ok


# torch.compile: evaluated once while tracing (arguments are Python constants), answer baked into the graph.
passed._dynamo_marked_constant = True


def verdicts() -> list[Verdict]:
    return list(_VERDICTS.values())


_RESET_HOOKS: list[Callable[[], None]] = []  # memos built on verdicts (ops, ext) clear themselves too


def on_reset(fn: Callable[[], None]) -> Callable[[], None]:
    _RESET_HOOKS.append(fn)
    return fn


def reset() -> None:
    """Forget every verdict and what was derived from them (tests; a process that changed its kernels)."""
    with _LOCK:
        _VERDICTS.clear()
        for fn in _RESET_HOOKS:
            fn()


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device


# ---------------------------------------------------------------------------------------------------------
# Running a check
# ---------------------------------------------------------------------------------------------------------


def run_check(op: str, variant: str, backend: str, device: str, dtype: str, size: str = "small") -> Verdict:
    """Check `backend` for one (op, variant) on `device` now; never raises (the error goes in the verdict)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    t0 = time.perf_counter()
    try:
        check = _check_for(op, variant)
        gen = torch.Generator().manual_seed(_seed(op, variant, backend, device, dtype, size))
        with torch.inference_mode(False), torch.enable_grad(), _on(device):
            detail = check(backend=backend, device=torch.device(device), dtype=_dtype(dtype), gen=gen, size=size)
        if device.startswith("cuda"):
            torch.cuda.synchronize(torch.device(device))  # device-side asserts surface here, not later
        ok, err = True, ""
    except Exception as e:  # noqa: BLE001 - any failure disables the backend, with its message
        ok, err, detail = False, _one_line(e), ""
        if os.environ.get("ARCOPO_SELFTEST_TRACEBACK") == "1":
            traceback.print_exc()
    return Verdict(op, variant, backend, device, dtype, ok, err, round(time.perf_counter() - t0, 4), size, detail)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:400]}"


def _seed(*key: str) -> int:
    return int.from_bytes(hashlib.sha256("|".join(key).encode()).digest()[:4], "little")


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt


@contextlib.contextmanager
def _on(device: str):
    if device.startswith("cuda"):
        with torch.cuda.device(torch.device(device)):
            yield
    else:
        yield


@contextlib.contextmanager
def poisoned_outputs():
    """NaN-fill (float) / -7-fill (int) every torch.empty / empty_like while active. Legal at any time:
    empty memory is undefined, so code that reads it before writing is wrong anyway."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-7)

    torch.empty = lambda *a, **k: fill(real_empty(*a, **k))
    torch.empty_like = lambda *a, **k: fill(real_empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps if dtype.is_floating_point else 0.0


NOISE_SLACK = 1e-5  # absolute: Box-Muller's float32 log/cos may differ by a few ulps between libraries


def compare(name: str, got: torch.Tensor, torch_out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype,
            slack: float = 0.0) -> str:
    """The 2x-torch-error rule for one output (plus `slack`, absolute, where the reference itself is only
    known to float32 math-library accuracy); raises SelfTestFailure, else returns 'name err/bound'."""
    ref64 = ref.detach().double()
    err_torch = (torch_out.detach().double() - ref64).abs().max().item() if ref.numel() else 0.0
    err = (got.detach().double() - ref64).abs().max().item() if ref.numel() else 0.0
    bound = 2.0 * err_torch + _eps(dtype) * (1.0 + (ref64.abs().max().item() if ref.numel() else 0.0)) + slack
    if got.shape != ref.shape:
        raise SelfTestFailure(f"{name}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}")
    if not err <= bound:  # NaN (a poisoned element left unwritten) fails too
        raise SelfTestFailure(
            f"{name}: max abs error {err:.3g} against the float64 reference exceeds {bound:.3g} "
            f"(2x the torch path's {err_torch:.3g} + eps)"
        )
    return f"{name} {err:.2g}/{bound:.2g}"


# ---------------------------------------------------------------------------------------------------------
# The checks: one function per op, variants parsed from the variant string
# ---------------------------------------------------------------------------------------------------------

CheckFn = Callable[..., str]
_CHECKS: dict[str, CheckFn] = {}


def _register(op: str):
    def deco(fn: CheckFn) -> CheckFn:
        _CHECKS[op] = fn
        return fn

    return deco


def _check_for(op: str, variant: str) -> Callable[..., str]:
    if op not in _CHECKS:
        raise KeyError(f"no self-test for op {op!r} (known: {sorted(_CHECKS)})")
    fn = _CHECKS[op]
    return lambda **kw: fn(variant=variant, **kw)


def _parts(variant: str) -> dict[str, str]:
    """'cache/fwd+bwd/d64' -> {'kind': 'cache', 'pass': 'fwd+bwd', 'd': '64'}."""
    out = {}
    for p in variant.split("/"):
        if p in ("fwd", "fwd+bwd"):
            out["pass"] = p
        elif p.startswith("d") and p[1:].isdigit():
            out["d"] = p[1:]
        elif p:
            out["kind"] = p
    return out


def _rand(gen, *shape, device, dtype, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)


def _grads(fn, inputs, cot):
    ins = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*ins)
    grads = torch.autograd.grad(out, ins, cot.to(out.dtype))
    return out.detach(), grads


def _run_compare(name, cand, torch_fn, ref_fn, inputs, dtype, grad, cot):
    """Forward (and gradients) of backend, torch path and float64 reference on the same inputs."""
    if grad:
        with poisoned_outputs():
            out_c, g_c = _grads(cand, inputs, cot)
        out_t, g_t = _grads(torch_fn, inputs, cot)
        out_r, g_r = _grads(ref_fn, [t.double() for t in inputs], cot.double())
    else:
        with torch.no_grad():
            with poisoned_outputs():
                out_c = cand(*inputs)
            out_t, out_r = torch_fn(*inputs), ref_fn(*[t.double() for t in inputs])
        g_c = g_t = g_r = ()
    notes = [compare(name, out_c, out_t, out_r, dtype)]
    for n, a, b, c in zip(("dq", "dk", "dv"), g_c, g_t, g_r):
        notes.append(compare(f"{name}.{n}", a, b, c, dtype))
    return "; ".join(notes)


@_register("chunk_attention")
def _check_chunk_attention(*, variant, backend, device, dtype, gen, size):
    from . import ops
    from .kernels import reference as ref

    p = _parts(variant)
    kind, grad, D = p.get("kind", "cache"), p.get("pass") == "fwd+bwd", int(p.get("d", 64))
    if size == "small":
        B, Lq, H, Lc, Lp = 2, 24, 2, 40, 20
    else:  # 1.3B: 3 latent frames of 60x104 / 4 patches = 4680 tokens, 12 heads, one chunk of past
        B, Lq, H, Lc, Lp = 1, 4680, 12, 4680, 4680
    r = lambda *s, sc=1.0: _rand(gen, *s, device=device, dtype=dtype, scale=sc)
    q, k, v = r(B, Lq, H, D), r(B, Lq, H, D), r(B, Lq, H, D)
    cot = r(B, Lq, H, D)
    seg: dict = {}
    if kind in ("cache", "ragged", "prefix"):
        rows = 3 if kind == "ragged" else B
        seg.update(k_cache=r(rows, Lc + Lq, H, D, sc=1.5), v_cache=r(rows, Lc + Lq, H, D))
        seg["cache_len"] = Lc - 3
        if kind == "ragged":
            seg["cache_len"] = torch.tensor([Lc - 3, Lc // 3][:B] + [Lc] * max(0, B - 2), device=device, dtype=torch.int32)
            seg["cache_rows"] = torch.tensor([2, 0][:B] + [1] * max(0, B - 2), device=device, dtype=torch.int32)
    if kind == "prefix":
        seg.update(k_prefix=r(2, Lp, H, D), v_prefix=r(2, Lp, H, D), prefix_len=Lp - 5)
        seg["prefix_rows"] = torch.ones(B, device=device, dtype=torch.int32)
    if kind not in ("own", "cache", "ragged", "prefix"):
        raise ValueError(f"unknown chunk_attention variant {variant!r}")
    # cache_scratch: an SDPA candidate reads the contiguous [past ; own] view, as it would in KVCache
    cand = lambda q, k, v: ops.chunk_attention(q, k, v, **seg, backend=backend, cache_scratch=kind == "cache")
    torch_fn = lambda q, k, v: ops.chunk_attention(q, k, v, **seg, backend="torch")

    def ref_fn(q, k, v):
        s64 = {n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for n, t in seg.items()}
        return ref.chunk_attention_ref(q, k, v, **s64)[0]

    return _run_compare("out", cand, torch_fn, ref_fn, [q, k, v], dtype, grad, cot)


@_register("block_causal_attention")
def _check_block_causal(*, variant, backend, device, dtype, gen, size):
    from . import ops
    from .kernels import reference as ref

    p = _parts(variant)
    grad, D = p.get("pass") == "fwd+bwd", int(p.get("d", 64))
    B, L, H, chunk = (1, 70, 2, 24) if size == "small" else (1, 2 * 4680, 12, 4680)  # float64 ref: ~40 GB
    q, k, v, cot = (_rand(gen, B, L, H, D, device=device, dtype=dtype) for _ in range(4))
    cand = lambda q, k, v: ops.block_causal_attention(q, k, v, chunk, backend=backend)
    torch_fn = lambda q, k, v: ops.block_causal_attention(q, k, v, chunk, backend="torch")
    ref_fn = lambda q, k, v: ref.block_causal_attention_ref(q, k, v, chunk)[0]
    return _run_compare("out", cand, torch_fn, ref_fn, [q, k, v], dtype, grad, cot)


@_register("qk_norm_rope")
def _check_qk_norm_rope(*, variant, backend, device, dtype, gen, size):
    from . import ops
    from .kernels import reference as ref

    D = int(_parts(variant).get("d", 64))
    H, B, L = (2, 2, 18) if size == "small" else (12, 1, 4680)
    dim, eps = H * D, 1e-6
    q, k = (_rand(gen, B, L, dim, device=device, dtype=dtype) for _ in range(2))
    wq, wk = (1 + 0.1 * _rand(gen, dim, device=device, dtype=dtype) for _ in range(2))
    ang = torch.rand(L, D // 2, generator=gen).to(device) * 6.28
    cos, sin = ang.cos(), ang.sin()
    with torch.no_grad():
        with poisoned_outputs():
            got = ops.qk_norm_rope(q, k, wq, wk, cos, sin, H, eps, backend=backend)
        want = ops.qk_norm_rope(q, k, wq, wk, cos, sin, H, eps, backend="torch")
    notes = []
    for name, g, t, x, w in zip(("q", "k"), got, want, (q, k), (wq, wk)):
        r64 = ref.rms_norm_rope_ref(x, w, cos, sin, H, eps, upcast=True)
        notes.append(compare(name, g, t, r64, dtype))
    return "; ".join(notes)


def _step_inputs(gen, device, dtype, size):
    from .noise import NoiseKind, NoisePlan

    B, shape = (2, (3, 4, 6, 10)) if size == "small" else (12, (3, 16, 60, 104))
    x, flow = (_rand(gen, B, *shape, device=device, dtype=dtype) for _ in range(2))
    sigmas = torch.tensor([1.0, 0.9375, 0.8333, 0.625], device=device)
    plan = NoisePlan(int(torch.randint(0, 2**31, (1,), generator=gen)))
    words = plan.words(plan.key(list(range(B)), chunk=1, step=2, kind=NoiseKind.SOLVER), device=device)
    return x, flow, sigmas, words


@_register("consistency_step")
def _check_consistency_step(*, variant, backend, device, dtype, gen, size):
    from . import ops
    from .kernels import reference as ref

    x, flow, sigmas, words = _step_inputs(gen, device, dtype, size)
    final = _parts(variant).get("kind") == "final"
    step = 3 if final else 1
    w = None if final else words
    with poisoned_outputs():
        x0, xn = ops.consistency_step(x, flow, sigmas, step, w, backend=backend)
    t0, tn = ops.consistency_step(x, flow, sigmas, step, w, backend="torch")
    if final:
        r0, _ = ref.consistency_step_ref(x, flow, sigmas[step].item(), upcast=True)
        return compare("x0", x0, t0, r0, torch.float32)
    k0, k1, c1, c2, c3 = words
    noise = ref.philox_normal_ref(x[0].numel(), k0, k1, c1.to(device), c2, c3.to(device)).view(x.shape)
    r0, rn = ref.consistency_step_ref(x, flow, sigmas[step].item(), sigmas[step + 1].item(), noise, upcast=True)
    # x_next's noise comes from float32 log/cos (library-dependent last bits): NOISE_SLACK on top
    return "; ".join([compare("x0", x0, t0, r0, torch.float32),
                      compare("x_next", xn, tn, rn, torch.float32, slack=NOISE_SLACK)])


@_register("philox_normal")
def _check_philox(*, variant, backend, device, dtype, gen, size):
    from . import ops

    B, n = (3, 4099) if size == "small" else (12, 299_520)
    k0, k1 = (int(torch.randint(0, 2**32 - 1, (1,), generator=gen)) for _ in range(2))
    c1 = torch.randint(0, 2**31, (B,), generator=gen).to(device)
    c3 = torch.randint(0, 2**31, (B,), generator=gen).to(device)
    with poisoned_outputs():
        got = ops.philox_normal(n, k0, k1, c1, 5, c3, backend=backend)
    want = ops.philox_normal(n, k0, k1, c1, 5, c3, backend="torch")
    # The integer words are exact; float32 log/cos last bits differ between math libraries (tests: 1e-5).
    return compare("normals", got, want, want, torch.float32, slack=NOISE_SLACK)


@_register("neighbour_logprobs")
def _check_neighbour(*, variant, backend, device, dtype, gen, size):
    from . import ops
    from .kernels import reference as ref

    grad = _parts(variant).get("pass") == "fwd+bwd"
    A, G, N = (3, 5, 1000) if size == "small" else (4, 12, 299_520)
    base = _rand(gen, 1, N, device=device, dtype=torch.float32)
    t = (base + 0.05 * _rand(gen, A, N, device=device, dtype=torch.float32)).to(dtype)
    c = (base + 0.05 * _rand(gen, G, N, device=device, dtype=torch.float32)).to(dtype)
    tau = 0.01
    cot = _rand(gen, A, G, device=device, dtype=torch.float32)

    def run(fn, x):
        if not grad:
            with torch.no_grad():
                return fn(x)[1], ()
        x = x.detach().clone().requires_grad_(True)
        d, lp = fn(x)
        (g,) = torch.autograd.grad((lp * cot.to(lp.dtype)).sum() + (d * cot.to(d.dtype)).sum(), (x,))
        return lp.detach(), (g,)

    with poisoned_outputs():
        lp_c, g_c = run(lambda x: ops.neighbour_logprobs(x, c, tau, backend=backend), t)
    lp_t, g_t = run(lambda x: ops.neighbour_logprobs(x, c, tau, backend="torch"), t)
    lp_r, g_r = run(lambda x: ref.neighbour_logprobs_ref(x, c.double(), tau, upcast=True), t.double())
    notes = [compare("logp", lp_c, lp_t, lp_r, torch.float32)]
    if grad:
        notes.append(compare("dx0_theta", g_c[0], g_t[0], g_r[0], dtype))
    return "; ".join(notes)


@_register("kv_fork")
def _check_kv_fork(*, variant, backend, device, dtype, gen, size):
    from . import ext

    if backend != "cpp":
        raise ValueError(f"kv_fork's checked backend is 'cpp', got {backend!r}")
    layers, rows, tokens, H, D = (3, 5, 37, 2, 16) if size == "small" else (30, 13, 4680, 12, 128)
    caches = [_rand(gen, rows, tokens, H, D, device=device, dtype=dtype) for _ in range(2 * layers)]
    want = [c.clone() for c in caches]
    src = torch.zeros(3, dtype=torch.int64, device=device)
    dst = torch.tensor([1, 3, 4], dtype=torch.int64, device=device)
    ext.kv_fork_cpp_(caches, src, dst, tokens - 2)
    ext.kv_fork_torch_(want, src, dst, tokens - 2)
    for i, (a, b) in enumerate(zip(caches, want)):
        if not torch.equal(a, b):
            raise SelfTestFailure(f"caches[{i}] differs from the torch fork (max abs {(a - b).abs().max().item():.3g})")
    return "bit-exact"


# ---------------------------------------------------------------------------------------------------------
# Every check, for the doctor
# ---------------------------------------------------------------------------------------------------------


# One variant per kernel family: the interpreter's share of `doctor --selftest` on a CPU machine
QUICK = {("chunk_attention", "cache/fwd+bwd"), ("chunk_attention", "prefix/fwd"), ("block_causal_attention", "fwd"),
         ("qk_norm_rope", "fwd"), ("consistency_step", "noise"), ("philox_normal", "fwd"),
         ("neighbour_logprobs", "fwd+bwd"), ("kv_fork", "fwd")}


def all_checks(device: str, dtype: str, head_dim: int = 128, quick: bool = False) -> list[tuple[str, str, str]]:
    """(op, variant, backend) of every non-torch backend that could serve on `device` in `dtype` (quick: one
    variant per kernel family, and the attention candidates' forward)."""
    from . import ext, ops

    d = f"d{head_dim}"
    out: list[tuple[str, str, str]] = []
    if ops.triton_available() and (device.startswith("cuda") or ops.interpreting()):
        for kind in ("own", "cache", "ragged", "prefix"):
            for p in ("fwd", "fwd+bwd"):
                out.append(("chunk_attention", f"{kind}/{p}/{d}", "triton"))
        for p in ("fwd", "fwd+bwd"):
            out.append(("block_causal_attention", f"{p}/{d}", "triton"))
        out.append(("qk_norm_rope", f"fwd/{d}", "triton"))
        out += [("consistency_step", "final", "triton"), ("consistency_step", "noise", "triton")]
        out.append(("philox_normal", "fwd", "triton"))
        out += [("neighbour_logprobs", "fwd", "triton"), ("neighbour_logprobs", "fwd+bwd", "triton")]
    from . import attention_backends as ab

    call = ab.Call(torch.device(device).type, _dtype(dtype), head_dim, True, True, False)
    for cand in ops.attention_candidates(torch.device(device)):
        if cand not in ("torch", "triton") and ab.unsupported(cand, call) is None:
            out.append(("chunk_attention", f"cache/fwd/{d}", cand))
    if ext.extension_loaded() and (not device.startswith("cuda") or ext.extension_has_cuda()):
        out.append(("kv_fork", "fwd", "cpp"))
    if ops.triton_available() and device.startswith("cuda") and ops.tma_unsupported(device) is None:
        # sm_90+: the TMA kernels too, last (a time budget cuts these before the kernels every card runs)
        out += [("chunk_attention", f"{kind}/{p}/{d}", "triton_tma") for kind in ("own", "cache", "ragged", "prefix")
                for p in ("fwd", "fwd+bwd")]
        out += [("block_causal_attention", f"{p}/{d}", "triton_tma") for p in ("fwd", "fwd+bwd")]
    if quick:
        out = [c for c in out if c[2] not in ("triton", "triton_tma") or (c[0], c[1].removesuffix(f"/{d}")) in QUICK]
    return out


def run_all(device: str, dtype: str, sizes=SIZES, head_dim: int = 128, ops_filter=None, budget_s: float | None = None,
            progress: Callable[[Verdict], None] | None = None, quick: bool = False) -> list[Verdict]:
    """Run every check now (not cached: a report). The 1.3B size only on CUDA (far too slow interpreted)."""
    out = []
    t0 = time.perf_counter()
    for size in sizes:
        if size == "1.3b" and not device.startswith("cuda"):
            continue
        for op, variant, backend in all_checks(device, dtype, head_dim, quick):
            if ops_filter and op not in ops_filter:
                continue
            if budget_s is not None and time.perf_counter() - t0 > budget_s:
                return out
            v = run_check(op, variant, backend, device, dtype, size)
            out.append(v)
            if progress is not None:
                progress(v)
    return out
