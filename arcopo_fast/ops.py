"""The one place that picks a backend for every hot op (Triton kernel, C++ op, or plain torch).

Backends:
  "triton"      arcopo_fast.kernels (CUDA, or CPU tensors under TRITON_INTERPRET=1 for tests)
  "torch"       kernels/reference.py's production torch path (SDPA with its own dispatch for attention)
  "triton_tma"  chunk and block-causal attention: our kernels with TMA loads (kernels/block_attn_tma.py;
                sm_90+ and a Triton with device-side tensor descriptors); other ops run "triton".
                Never picked by "auto" on CPU; timed against the others by the measured choice on CUDA.
  attention only (arcopo_fast.attention_backends): "sdpa_cudnn", "sdpa_flash", "sdpa_efficient",
                "sdpa_math" (SDPA with that kernel forced), "flex" (FlexAttention), "flash_attn" (when the
                flash-attn package is importable)
  "auto"        the default, see below

How a call resolves (`explain()` / `python -m arcopo_fast.doctor` print it for every op):
  backend= argument   exactly that backend; it raises if it cannot run (tests and benchmarks use this).
  ARCOPO_BACKEND=...  (or the run config) that backend for the whole process, except where it fails its
                      on-device self-test: then the torch path serves, after one warning (selftest.py).
  auto                CUDA attention: the fastest candidate that passed its self-test, measured once per
                      (device, dtype, op variant, shape bucket) and cached on disk (backend_choice.py).
                      Other CUDA ops: triton if it passed its self-test, else torch. CPU: torch.
Every non-torch backend is self-tested on its device before its first call there (ARCOPO_SELFTEST=0
skips that). Under torch.compile the choice is made once at trace time (functions marked constant for
dynamo, called with Python values) and baked into the graph; see `_traced_attention_backend`.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

from . import selftest
from .kernels import reference as ref

_OP_BACKENDS = ("auto", "torch", "triton")
_ATTENTION_ONLY = ("triton_tma", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math", "flex", "flash_attn")
_BACKENDS = (*_OP_BACKENDS, *_ATTENTION_ONLY)
_OURS = ("triton", "triton_tma")  # the backends that run arcopo_fast.kernels
# Devices where "auto" measures attention candidates (tests add "cpu", with fake timers)
MEASURE_ON = ("cuda",)


@functools.cache
def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return True


TRITON_MIN = (3, 6)
"""Oldest Triton our kernels compile with (they use tl.mul); an older one counts as absent (torch paths)."""


@functools.cache
def _triton_recent() -> bool:
    if not _importable("triton"):
        return False
    import triton
    from packaging.version import Version

    return Version(triton.__version__).release[:2] >= TRITON_MIN


def triton_available() -> bool:
    return _triton_recent()


def flash_attn_available() -> bool:
    return _importable("flash_attn")


def tma_unsupported(device: torch.device | str) -> str | None:
    """Why the "triton_tma" attention kernels cannot run on `device` (None: it can): no Triton, a
    Triton without device-side tensor descriptors, a GPU below sm_90, CPU without the interpreter."""
    if not triton_available():
        return "triton is not importable"
    return _kernel("block_attn_tma").tma_unsupported(device)


# torch.compile calls these two while tracing and bakes the answer into the graph: dynamo cannot trace
# importlib. This is what torch.compiler.assume_constant_result does, without importing torch._dynamo here
# (that imports triton, which must wait for tests to set TRITON_INTERPRET). On a functools.cache wrapper the
# mark would be ignored, hence the separate _importable.
triton_available._dynamo_marked_constant = True
flash_attn_available._dynamo_marked_constant = True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_interpreting = interpreting


def _requested(backend: str | None) -> tuple[str, bool]:
    """(wanted backend, explicit): the argument, else $ARCOPO_BACKEND, else auto."""
    want = backend or os.environ.get("ARCOPO_BACKEND", "auto")
    if want not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS} (argument or ARCOPO_BACKEND), got {want!r}")
    return want, backend is not None


def _check_runnable(want: str, t: torch.Tensor, op: str) -> None:
    if want in _OURS:
        if not triton_available():
            raise RuntimeError(f"{op}: backend '{want}' requested but triton is not importable")
        if not (t.is_cuda or interpreting()):
            raise RuntimeError(f"{op}: backend '{want}' needs CUDA tensors, or TRITON_INTERPRET=1 on CPU")
    if want == "triton_tma" and (why := tma_unsupported(t.device)):
        raise RuntimeError(f"{op}: backend 'triton_tma' cannot run here: {why}")
    if want == "flash_attn" and not flash_attn_available():
        raise RuntimeError(f"{op}: backend 'flash_attn' requested but flash_attn is not installed")


def _gate(op: str, variant: str, be: str, t: torch.Tensor) -> str:
    """be, or "torch" when be failed its self-test on t's device in t's dtype."""
    if be == "torch" or selftest.passed(op, variant, be, str(t.device), str(t.dtype)):
        return be
    return "torch"


def _resolve(t: torch.Tensor, backend: str | None, op: str) -> tuple[str, bool]:
    want, explicit = _requested(backend)
    if want == "auto":
        want = "triton" if (t.is_cuda and triton_available() and _triton_dtype(t.dtype)) else "torch"
    elif want == "triton_tma":
        want = "triton"  # TMA variants exist for the attention ops: the other ops run their Triton kernels
    elif want in _ATTENTION_ONLY:
        want = "torch"  # an attention-only backend forced for the process: other ops run their torch path
    _check_runnable(want, t, op)
    return want, explicit


def resolve_backend(t: torch.Tensor, backend: str | None = None, *, op: str = "op", variant: str = "fwd") -> str:
    """The backend that will run `op` (non-attention ops: torch or triton) on tensors like `t`: a backend
    other than torch that was not requested by the argument serves only after passing its self-test."""
    want, explicit = _resolve(t, backend, op)
    return want if explicit else _gate(op, variant, want, t)


_TRITON_DTYPES = ("float16", "bfloat16", "float32")  # what every Triton kernel of the package takes


def _triton_dtype(dtype) -> bool:
    return str(dtype).removeprefix("torch.") in _TRITON_DTYPES


def _triton_serves_auto(device: torch.device, dtype) -> bool:
    """Whether "auto" may run our attention kernels for `dtype` on `device`: not for a dtype they lack (e.g.
    float64: it would only fail its self-test with a warning), not fp32 on CUDA, where they would compute
    TF32 dots (less accurate than the fp32 the caller chose; an fp32 FMA loop is never used). An explicit
    backend="triton" still gets them."""
    if dtype is not None and not _triton_dtype(dtype):
        return False
    return not (torch.device(device).type == "cuda" and str(dtype).removeprefix("torch.") == "float32")


def attention_candidates(device: torch.device, op: str = "chunk_attention", dtype=None) -> list[str]:
    """The backends "auto" may measure for an attention op on `device` for inputs of `dtype` (before
    per-call support checks)."""
    device = torch.device(device)
    out = []
    if triton_available() and (device.type == "cuda" or interpreting()) and _triton_serves_auto(device, dtype):
        out.append("triton")
        if device.type == "cuda" and tma_unsupported(device) is None:
            out.append("triton_tma")
    out.append("torch")
    if op == "chunk_attention":
        if device.type == "cuda":
            out += ["sdpa_cudnn", "sdpa_flash", "flex"]
            if flash_attn_available():
                out.append("flash_attn")
        else:
            out += ["sdpa_math", "sdpa_flash"]  # CPU (tests): SDPA's math and flash CPU kernels
    return out


def explain(device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16) -> dict[str, dict]:
    """Per op: the backend a call on `device` resolves to, and why (self-test verdicts, measured choices)."""
    from . import backend_choice

    device = torch.device(device)
    t = torch.empty(0, device=device, dtype=dtype)
    want, _ = _requested(None)
    verdicts = [v for v in selftest.verdicts() if v.device == str(device)]
    out: dict[str, dict] = {}
    for op in ("chunk_attention", "block_causal_attention", "qk_norm_rope", "consistency_step", "philox_normal",
               "neighbour_logprobs"):
        failed = {f"{v.variant} {v.backend}": v.error for v in verdicts if v.op == op and not v.ok}
        info: dict = {"requested": want, "selftest_failed": failed}
        if op.endswith("attention") and want == "auto" and device.type in MEASURE_ON:
            chosen = {k: c.as_dict() for k, c in backend_choice.chooser().choices(device).items()
                      if k.startswith(op + "|")}
            info.update(backend="measured per call shape", candidates=attention_candidates(device, op),
                        measured=chosen)
            info["why"] = "auto on CUDA: fastest self-tested candidate per (dtype, variant, shape bucket)"
        else:
            try:
                be = _resolve(t, None, op)[0] if want in _OP_BACKENDS or not op.endswith("attention") else want
                info["backend"] = be
            except RuntimeError as e:
                info["backend"], info["error"] = "unavailable", str(e)
            if want != "auto":
                info["why"] = "forced by ARCOPO_BACKEND / run.attention_backend (self-tested before first use)"
            elif device.type == "cuda":
                info["why"] = "auto on CUDA: triton after its self-test passes" if triton_available() else \
                    "auto on CUDA: triton is not importable"
            else:
                info["why"] = "auto on CPU: the torch path"
            if failed:
                info["why"] += "; self-test failures fall back to torch"
        out[op] = info
    ext = _ext()
    out["kv_fork"] = {"backend": _fork_backend(device), "why": ext.fallback_reason(device) or "the C++ extension"}
    return out


def _fork_backend(device: torch.device) -> str:
    ext = _ext()
    return "torch-fallback" if ext.fallback_reason(device) else "cpp"


def describe(device: torch.device | str = "cpu") -> dict[str, str]:
    """Which backend each op resolves to on `device` (logged at the start of every run; `explain` says why)."""
    device = torch.device(device)
    t = torch.empty(0, device=device)
    want, _ = _requested(None)
    if want == "auto" and device.type in MEASURE_ON:
        attention = "auto (measured per shape: " + ", ".join(attention_candidates(device)) + ")"
    else:
        attention = want if want in _ATTENTION_ONLY else _resolve(t, None, "attention")[0]
    return {
        "attention": attention,
        "step": _resolve(t, None, "step")[0],
        "qk_norm_rope": _resolve(t, None, "qk_norm_rope")[0],
        "kv_fork": "cpp" if _ext().extension_loaded() and _fork_backend(device) == "cpp" else "torch-fallback",
    }


def _kernel(name: str):
    return importlib.import_module(f"arcopo_fast.kernels.{name}")


def _ext():
    return importlib.import_module("arcopo_fast.ext")


# ---------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------


def _check_attention_inputs(q, k, v, k_cache, v_cache, k_prefix, v_prefix, prefix_rows, cache_len=0, cache_rows=None, prefix_len=0):
    """The argument checks of chunk_attention, the same for every backend (and so the same messages). Index
    VALUES (tensor lengths, rows) are checked for CPU tensors only: on CUDA that would be a host sync."""
    if q.ndim != 4:
        raise ValueError(f"q must be [B, Lq, H, D], got shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"k and v must match q's shape {tuple(q.shape)}, got {tuple(k.shape)}, {tuple(v.shape)}")
    segments = {"cache": (k_cache, v_cache, cache_len, cache_rows), "prefix": (k_prefix, v_prefix, prefix_len, prefix_rows)}
    for name, (kc, vc, length, rows) in segments.items():
        if (kc is None) != (vc is None):
            raise ValueError(f"k_{name} and v_{name} must be given together")
        if name == "prefix" and kc is not None and prefix_rows is None:
            raise ValueError("prefix_rows (int32 [B]: the parent row of each query row) is required with k_prefix")
        if kc is None:
            continue
        if kc.ndim != 4 or kc.shape[2:] != q.shape[2:] or vc.shape != kc.shape:
            raise ValueError(
                f"k_{name}/v_{name} must be [rows, Lmax, H={q.shape[2]}, D={q.shape[3]}], "
                f"got {tuple(kc.shape)} and {tuple(vc.shape)}"
            )
        if torch.is_grad_enabled() and (kc.requires_grad or vc.requires_grad):
            # a cache with a graph would carry gradients into earlier chunks (the update's prefix is constant)
            raise ValueError(f"k_{name}/v_{name} are constants here (no gradient); pass them detached")
        R, Lmax = kc.shape[0], kc.shape[1]
        host = not torch.compiler.is_compiling()
        if isinstance(length, torch.Tensor):
            if host and length.device.type == "cpu" and length.numel() and bool(((length < 0) | (length > Lmax)).any()):
                raise ValueError(f"{name}_len values must be in [0, {Lmax}] (k_{name}.shape[1]), got {length.tolist()}")
        elif not 0 <= length <= Lmax:  # a python int, or a symbolic one under torch.compile (a guard, no sync)
            raise ValueError(f"{name}_len must be in [0, {Lmax}] (k_{name}.shape[1]), got {length}")
        if isinstance(rows, torch.Tensor) and host and rows.device.type == "cpu" and rows.numel():
            if bool(((rows < 0) | (rows >= R)).any()):
                raise ValueError(f"{name}_rows values must be in [0, {R}) (k_{name}.shape[0]), got {rows.tolist()}")


def _grad_wanted(*ts: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def _attention_variant(kind: str, grad: bool, head_dim: int) -> str:
    return f"{kind}/{'fwd+bwd' if grad else 'fwd'}/d{head_dim}"


def _traced_attention_backend(op: str, variant: str, device: str, dtype: str) -> str:
    """The backend of an attention call inside a torch.compile'd graph (one per op variant: shapes are
    symbolic there). The measured winner of the largest bucket seen so far for (op, variant, dtype) when
    it is our kernel; SDPA's own dispatch (torch) when another candidate won (forced-kernel contexts and
    cache writes stay out of compiled graphs); before any measurement, triton when it passes its self-test.
    Constant for dynamo: evaluated once at trace time."""
    dev = torch.device(device)
    if dev.type not in MEASURE_ON:
        return "torch"
    from . import backend_choice

    ours = lambda be: (triton_available() and _triton_serves_auto(dev, dtype)
                       and (be == "triton" or tma_unsupported(dev) is None)
                       and selftest.passed(op, variant, be, device, dtype))
    prefix = f"{op}|{variant}|{dtype.removeprefix('torch.')}|"
    measured = [(backend_choice.bucket_size(k.split("|")[3]), c.backend)
                for k, c in backend_choice.chooser().choices(dev).items() if k.startswith(prefix)]
    if measured:
        won = max(measured)[1]
        return won if won in _OURS and ours(won) else "torch"
    return "triton" if ours("triton") else "torch"


_traced_attention_backend._dynamo_marked_constant = True

# (op, variant, device, dtype, bucket, call) -> backend: the measured choice after its first call, one dict
# lookup (no sync, no timing)
_AUTO_MEMO: dict[tuple, str] = {}
selftest.on_reset(_AUTO_MEMO.clear)


def _auto_attention(op: str, variant: str, q: torch.Tensor, lk: int, call, names, runner) -> str:
    """The backend of an "auto" attention call: see the module docstring. `runner(name)` runs the call with
    candidate `name` on its own tensors (the timing), `names()` lists the candidates that support the call
    (asked only when the memo misses: a later call costs one dict lookup)."""
    if q.device.type not in MEASURE_ON:
        return "torch"
    if torch.compiler.is_compiling():
        return _traced_attention_backend(op, variant, str(q.device), str(q.dtype))
    from . import backend_choice

    B, Lq, H, D = q.shape
    bucket = backend_choice.bucket(B, Lq, lk, H, D)
    memo_key = (op, variant, str(q.device), q.dtype, bucket, call)
    be = _AUTO_MEMO.get(memo_key)
    if be is not None:
        return be
    if q.is_cuda and torch.cuda.is_current_stream_capturing():
        return _traced_attention_backend(op, variant, str(q.device), str(q.dtype))  # no timing in a capture
    ok = [n for n in names() if n == "torch" or selftest.passed(op, variant, n, str(q.device), str(q.dtype))]
    ch = backend_choice.chooser()
    key = ch.key(op, variant, q.dtype, bucket)
    be = ch.choose(q.device, key, {n: (lambda n=n: runner(n)) for n in ["torch"] + [n for n in ok if n != "torch"]})
    _AUTO_MEMO[memo_key] = be
    return be


def _timed_call(fn, grad: bool, q, k, v):
    """A zero-argument timing call of fn(q, k, v): forward only, or forward + backward on fresh leaves
    (the caller's autograd graph is never touched)."""
    if not grad:
        with torch.no_grad():
            return fn(q, k, v)
    qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
    with torch.enable_grad():
        out = fn(qq, kk, vv)
        return torch.autograd.grad(out, (qq, kk, vv), torch.ones_like(out))


def chunk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor | None = None,
    v_cache: torch.Tensor | None = None,
    cache_len: int | torch.Tensor = 0,
    cache_rows: torch.Tensor | None = None,
    k_prefix: torch.Tensor | None = None,
    v_prefix: torch.Tensor | None = None,
    prefix_len: int | torch.Tensor = 0,
    prefix_rows: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    backend: str | None = None,
    cache_scratch: bool = False,
) -> torch.Tensor:
    """A chunk's queries attend, unmasked, to [prefix segment ; cache segment ; the chunk itself].

    q, k, v:            [B, Lq, H, D]    the chunk's own queries/keys/values (gradients flow to all three)
    k_cache, v_cache:   [Rc, Lc, H, D]   cached keys/values, constant (no gradient work is spent on them)
    cache_len:          int or int32 [B] valid tokens of row cache_rows[b]
    cache_rows:         int32 [B]        cache row read by query row b (default: b)
    k_prefix, v_prefix: [Rp, Lp, H, D]   zero-copy fork: a parent's prefix, read before the cache segment
    prefix_len, prefix_rows              as above, for the prefix segment
    cache_scratch:      the caller allows writing the chunk's k, v into k_cache/v_cache[b, cache_len:
                        cache_len + Lq] (free slots): SDPA candidates then read one contiguous view
                        (attention_backends.py). KVCache passes True: those slots are its next chunk's.

        keys of query row b (chunk = Lq tokens, every query sees every key: block-causal by construction)
        |<- k_prefix[prefix_rows[b], :prefix_len] ->|<- k_cache[cache_rows[b], :cache_len] ->|<- k[b] ->|
    Returns [B, Lq, H, D] in q's dtype. Every backend checks the arguments alike (ValueError): lengths in
    [0, Lmax], rows in [0, rows) (index values of CPU tensors; CUDA ones are not read on the host), and a
    cache or prefix that requires grad is refused under grad mode.

    fp32 on CUDA: "auto" runs the torch path (SDPA in fp32). The triton backend, when asked for, computes
    fp32 dots as TF32 on the tensor cores (torch's allow_tf32 accuracy), never as an fp32 FMA loop. Same for
    block_causal_attention.
    """
    _check_attention_inputs(q, k, v, k_cache, v_cache, k_prefix, v_prefix, prefix_rows, cache_len, cache_rows, prefix_len)
    args = (k_cache, v_cache, cache_len, cache_rows, k_prefix, v_prefix, prefix_len, prefix_rows)
    grad = _grad_wanted(q, k, v)
    if k_prefix is not None:
        kind = "prefix"
    elif k_cache is None:
        kind = "own"
    elif isinstance(cache_len, torch.Tensor) or cache_rows is not None:
        kind = "ragged"
    else:
        kind = "cache"
    variant = _attention_variant(kind, grad, q.shape[-1])
    want, explicit = _requested(backend)

    def run(be: str, q=q, k=k, v=v):
        if be in _OURS:
            from .kernels import block_attn  # a plain import: torch.compile traces it, not importlib

            return block_attn.chunk_attention(q, k, v, *args, scale=scale, tma=be == "triton_tma")
        if be == "torch":
            return ref.chunk_attention_torch(q, k, v, *args, scale=scale)
        from . import attention_backends

        return attention_backends.chunk_attention(be, q, k, v, *args, scale=scale, cache_scratch=cache_scratch)

    if want != "auto":
        _check_runnable(want, q, "chunk_attention")
        return run(want if explicit else _gate("chunk_attention", variant, want, q))
    if q.device.type not in MEASURE_ON:
        return run("torch")
    if torch.compiler.is_compiling():  # before anything below guards on a symbolic cache length
        return run(_traced_attention_backend("chunk_attention", variant, str(q.device), str(q.dtype)))
    from . import attention_backends as ab

    lengths_equal = not isinstance(cache_len, torch.Tensor) and not isinstance(prefix_len, torch.Tensor)
    contiguous = ab.contiguous_view_ok(q, k, k_cache, cache_len, cache_rows, k_prefix, cache_scratch, grad)
    call = ab.Call(q.device.type, q.dtype, q.shape[-1], lengths_equal, contiguous, grad)
    lk = q.shape[1]
    for kc, n in ((k_cache, cache_len), (k_prefix, prefix_len)):
        if kc is not None:
            lk += n if isinstance(n, int) else kc.shape[1]  # a tensor length: its capacity (no sync)
    names = lambda: [n for n in attention_candidates(q.device, "chunk_attention", q.dtype)
                     if n in ("torch", *_OURS) or ab.unsupported(n, call) is None]
    be = _auto_attention("chunk_attention", variant, q, lk, call, names,
                         lambda n: _timed_call(lambda a, b, c: run(n, a, b, c), grad, q, k, v))
    return run(be)


def block_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    chunk_tokens: int,
    *,
    window_tokens: int | None = None,
    sink_tokens: int = 0,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Full-sequence attention where a query of chunk c sees the keys of chunks <= c (teacher forcing).
    q, k, v: [B, L, H, D]; chunk_tokens: tokens per chunk. With window_tokens, a query sees only the last
    window_tokens keys up to its chunk's end plus the first sink_tokens keys (Self-Forcing's rolling window).

        keys ->   c0  c1  c2
        c0       [##][  ][  ]
        c1       [##][##][  ]
        c2       [##][##][##]      (## = attend; tiles above the diagonal are skipped, not masked)

    Backends: triton and triton_tma (no window), flex (FlexAttention's block mask, CUDA), torch (SDPA with a
    boolean mask); any other attention backend runs flex on CUDA and torch on CPU.
    """
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share a [B, L, H, D] shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    window = {"window_tokens": window_tokens, "sink_tokens": sink_tokens}
    grad = _grad_wanted(q, k, v)
    variant = _attention_variant("window" if window_tokens is not None else "causal", grad, q.shape[-1])
    variant = variant.removeprefix("causal/")
    want, explicit = _requested(backend)

    def run(be: str, q=q, k=k, v=v):
        if be in _OURS and window_tokens is None:  # no window in our kernels
            from .kernels import block_attn  # a plain import: torch.compile traces it, not importlib

            tma = be == "triton_tma"
            return block_attn.block_causal_attention(q, k, v, chunk_tokens, scale=scale, tma=tma)
        if q.is_cuda and be != "torch":
            return _flex_block_causal(q, k, v, chunk_tokens, scale=scale, **window)
        return ref.block_causal_attention_torch(q, k, v, chunk_tokens, scale=scale, **window)

    if want != "auto":
        _check_runnable(want, q, "block_causal_attention")
        return run(want if explicit else _gate("block_causal_attention", variant, want, q))
    if q.device.type not in MEASURE_ON:
        return run("torch")
    names = lambda: [n for n in attention_candidates(q.device, "block_causal_attention", q.dtype)
                     if not (n in _OURS and window_tokens is not None)] + (["flex"] if q.is_cuda else [])
    be = _auto_attention("block_causal_attention", variant, q, q.shape[1], window_tokens, names,
                         lambda n: _timed_call(lambda a, b, c: run(n, a, b, c), grad, q, k, v))
    return run(be)


def _flex_block_causal(q, k, v, chunk_tokens, *, scale, window_tokens, sink_tokens):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, qi, ki):
        q_end = (qi // chunk_tokens + 1) * chunk_tokens
        ok = ki < q_end
        if window_tokens is not None:
            ok = ok & ((ki >= q_end - (window_tokens - sink_tokens)) | (ki < sink_tokens))
        return ok

    L = q.shape[1]
    bm = create_block_mask(mask_mod, None, None, L, L, device=q.device)
    out = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=bm, scale=scale)
    return out.transpose(1, 2)


# ---------------------------------------------------------------------------------------------------------
# q/k RMSNorm + 3D RoPE of the self-attention
# ---------------------------------------------------------------------------------------------------------


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    weight_q: torch.Tensor,
    weight_k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    eps: float,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan's q/k RMSNorm over all dim channels (RMS in float32, cast to the input dtype, times the weight)
    followed by the interleaved 3D RoPE (float32 rotation, cast back), for q and k together.

    q, k:               [B, L, dim] pre-norm projections (same shape and dtype)
    weight_q, weight_k: [dim] RMSNorm weights
    cos, sin:           float32 [L, dim / num_heads / 2] (model/rope.py's tables for this chunk)
    Returns (q, k) [B, L, num_heads, dim / num_heads] in promote(q.dtype, weight dtype).
    The triton backend is one fused launch without autograd (inference: rollouts and sampling); it raises
    when a gradient would be needed. The torch backend is the model's module path op for op."""
    if q.ndim != 3 or k.shape != q.shape:
        raise ValueError(f"q and k must share a [B, L, dim] shape, got {tuple(q.shape)}, {tuple(k.shape)}")
    dim = q.shape[-1]
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0 or dim % num_heads:
        raise ValueError(f"num_heads must be a positive int dividing dim={dim}, got {num_heads!r}")
    half = dim // num_heads // 2
    if cos.shape != (q.shape[1], half) or sin.shape != cos.shape:
        raise ValueError(
            f"cos and sin must be [L={q.shape[1]}, head_dim/2={half}], "
            f"got {tuple(cos.shape)}, {tuple(sin.shape)}"
        )
    be = resolve_backend(q, backend, op="qk_norm_rope", variant=f"fwd/d{dim // num_heads}")
    if be == "triton":
        needs_grad = any(t.requires_grad for t in (q, k, weight_q, weight_k))
        if torch.is_grad_enabled() and needs_grad:
            raise RuntimeError(
                "qk_norm_rope: backend 'triton' has no autograd (inference only); use backend='torch' or "
                "run under torch.no_grad()"
            )
        return _kernel("qk_norm_rope").qk_norm_rope(q, k, weight_q, weight_k, cos, sin, num_heads, eps)
    return ref.qk_norm_rope_torch(q, k, weight_q, weight_k, cos, sin, num_heads, eps)


# ---------------------------------------------------------------------------------------------------------
# Noise and the few-step consistency step
# ---------------------------------------------------------------------------------------------------------


def philox_normal(
    numel: int, k0: int, k1: int, c1: torch.Tensor, c2: int, c3: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """Standard normals [B, numel] (float32) from Philox4x32-10: element n of row b uses the counter
    (n, c1[b], c2, c3[b]) under the key (k0, k1). See arcopo_fast.noise for the key layout."""
    be = resolve_backend(c1, backend, op="philox_normal")
    if be == "triton":
        return _kernel("sampler_step").philox_normal(numel, k0, k1, c1, c2, c3)
    return ref.philox_normal_ref(numel, k0, k1, c1, c2, c3)


def consistency_step(
    x: torch.Tensor,
    flow: torch.Tensor,
    sigmas: torch.Tensor,
    step: int,
    noise_words: tuple[int, int, torch.Tensor, int, torch.Tensor] | None = None,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One few-step consistency update of a batch of latents x [B, ...] with flow prediction `flow`:

        x0     = x - sigmas[step] * flow
        x_next = (1 - sigmas[step + 1]) * x0 + sigmas[step + 1] * noise      (only when noise_words given)

    sigmas: float32 device table [T] (no host lookup); noise_words = NoisePlan.words(key) of the SOLVER
    noise for step + 1: the Triton kernel generates it in-kernel, the torch path with the same Philox.
    Returns (x0, x_next or None), float32."""
    if flow.shape != x.shape:
        raise ValueError(f"flow must match x's shape {tuple(x.shape)}, got {tuple(flow.shape)}")
    T = sigmas.shape[0]
    last = noise_words is None
    if not (0 <= step < T - (0 if last else 1)):
        raise ValueError(f"step must be in [0, {T - (0 if last else 1)}) for a table of {T} sigmas, got {step}")
    be = resolve_backend(x, backend, op="consistency_step", variant="final" if last else "noise")
    if be == "triton":
        return _kernel("sampler_step").consistency_step(x, flow, sigmas, step, noise_words)
    sig = sigmas.to(device=x.device, dtype=torch.float32)
    if last:
        return ref.consistency_step_ref(x, flow, sig[step])
    k0, k1, c1, c2, c3 = noise_words
    noise = ref.philox_normal_ref(x[0].numel(), k0, k1, c1.to(x.device), c2, c3.to(x.device)).view(x.shape)
    return ref.consistency_step_ref(x, flow, sig[step], sig[step + 1], noise)


# ---------------------------------------------------------------------------------------------------------
# AR-CoPO neighbour-policy distances
# ---------------------------------------------------------------------------------------------------------


def neighbour_logprobs(
    x0_theta: torch.Tensor, x0_old: torch.Tensor, tau: float | torch.Tensor, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """d[a, i] = mean((x0_old[i] - x0_theta[a])^2) and logp[a, i] = log_softmax_i(-d[a, i] / tau) for
    anchors x0_theta [A, ...] (gradient flows here) and candidates x0_old [G, ...] (constant)."""
    if x0_theta.shape[1:] != x0_old.shape[1:]:
        raise ValueError(
            f"x0_theta [A, ...] and x0_old [G, ...] must share per-sample shapes, got {tuple(x0_theta.shape)} "
            f"and {tuple(x0_old.shape)}"
        )
    grad = _grad_wanted(x0_theta)
    be = resolve_backend(x0_theta, backend, op="neighbour_logprobs", variant="fwd+bwd" if grad else "fwd")
    if be == "triton":
        return _kernel("neighbour").neighbour_logprobs(x0_theta, x0_old.detach(), tau)
    return ref.neighbour_logprobs_torch(x0_theta, x0_old.detach(), tau)


# ---------------------------------------------------------------------------------------------------------
# KV-cache fork (C++/CUDA extension, see csrc/)
# ---------------------------------------------------------------------------------------------------------


def kv_fork_(caches: list[torch.Tensor], src_rows: torch.Tensor, dst_rows: torch.Tensor, n_tokens: int) -> None:
    """In place, for every tensor c of `caches` ([rows, Lmax, ...]) and every pair j:
    c[dst_rows[j], :n_tokens] = c[src_rows[j], :n_tokens]. One launch for all tensors and pairs on CUDA."""
    _ext().kv_fork_(caches, src_rows, dst_rows, n_tokens)
