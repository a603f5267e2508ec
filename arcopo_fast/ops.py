"""The one place that picks a backend for every hot op (Triton kernel, C++ op, or plain torch).

Backends:
  "triton"      arcopo_fast.kernels (CUDA, or CPU tensors under TRITON_INTERPRET=1 for tests)
  "torch"       kernels/reference.py's production torch path (SDPA for attention)
  "flash_attn"  attention only, when the flash-attn package is importable (optional baseline)
  "auto"        triton for CUDA tensors when triton imports, torch otherwise

The default is "auto"; set ARCOPO_BACKEND=torch|triton|auto to force one for a whole process, or pass
`backend=` to a call. An explicitly requested backend that cannot run raises; "auto" never guesses silently:
`describe()` reports what it resolved to.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

from .kernels import reference as ref

_BACKENDS = ("auto", "torch", "triton", "flash_attn")


@functools.cache
def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return True


def triton_available() -> bool:
    return _importable("triton")


def flash_attn_available() -> bool:
    return _importable("flash_attn")


# torch.compile calls these two while tracing and bakes the answer into the graph: dynamo cannot trace
# importlib. This is what torch.compiler.assume_constant_result does, without importing torch._dynamo here
# (that imports triton, which must wait for tests to set TRITON_INTERPRET). On a functools.cache wrapper the
# mark would be ignored, hence the separate _importable.
triton_available._dynamo_marked_constant = True
flash_attn_available._dynamo_marked_constant = True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(t: torch.Tensor, backend: str | None = None, *, op: str = "op") -> str:
    """The backend that will run `op` on tensors like `t`."""
    want = backend or os.environ.get("ARCOPO_BACKEND", "auto")
    if want not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS} (argument or ARCOPO_BACKEND), got {want!r}")
    if want == "auto":
        return "triton" if (t.is_cuda and triton_available()) else "torch"
    if want == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend 'triton' requested but triton is not importable")
        if not (t.is_cuda or _interpreting()):
            raise RuntimeError(f"{op}: backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 on CPU")
    if want == "flash_attn" and not flash_attn_available():
        raise RuntimeError(f"{op}: backend 'flash_attn' requested but flash_attn is not installed")
    return want


def describe(device: torch.device | str = "cpu") -> dict[str, str]:
    """Which backend each op resolves to on `device` (logged at the start of every run)."""
    t = torch.empty(0, device=device)
    fork = "cpp" if _ext().extension_loaded() else "torch-fallback"
    return {
        "attention": resolve_backend(t, op="attention"),
        "step": resolve_backend(t, op="step"),
        "qk_norm_rope": resolve_backend(t, op="qk_norm_rope"),
        "kv_fork": fork,
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
) -> torch.Tensor:
    """A chunk's queries attend, unmasked, to [prefix segment ; cache segment ; the chunk itself].

    q, k, v:            [B, Lq, H, D]    the chunk's own queries/keys/values (gradients flow to all three)
    k_cache, v_cache:   [Rc, Lc, H, D]   cached keys/values, constant (no gradient work is spent on them)
    cache_len:          int or int32 [B] valid tokens of row cache_rows[b]
    cache_rows:         int32 [B]        cache row read by query row b (default: b)
    k_prefix, v_prefix: [Rp, Lp, H, D]   zero-copy fork: a parent's prefix, read before the cache segment
    prefix_len, prefix_rows              as above, for the prefix segment

        keys of query row b (chunk = Lq tokens, every query sees every key: block-causal by construction)
        |<- k_prefix[prefix_rows[b], :prefix_len] ->|<- k_cache[cache_rows[b], :cache_len] ->|<- k[b] ->|
    Returns [B, Lq, H, D] in q's dtype. Every backend checks the arguments alike (ValueError): lengths in
    [0, Lmax], rows in [0, rows) (index values of CPU tensors; CUDA ones are not read on the host), and a
    cache or prefix that requires grad is refused under grad mode.
    """
    _check_attention_inputs(q, k, v, k_cache, v_cache, k_prefix, v_prefix, prefix_rows, cache_len, cache_rows, prefix_len)
    be = resolve_backend(q, backend, op="chunk_attention")
    args = (k_cache, v_cache, cache_len, cache_rows, k_prefix, v_prefix, prefix_len, prefix_rows)
    if be == "triton":
        from .kernels import block_attn  # a plain import: torch.compile traces it, not importlib

        return block_attn.chunk_attention(q, k, v, *args, scale=scale)
    if be == "flash_attn":
        import flash_attn

        kk, vv, mask = ref.gather_chunk_kv(k, v, *args)
        if mask is not None:
            raise ValueError("backend 'flash_attn' supports equal lengths per row only (int cache_len/prefix_len)")
        return flash_attn.flash_attn_func(q, kk, vv, softmax_scale=scale)
    return ref.chunk_attention_torch(q, k, v, *args, scale=scale)


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
    """
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share a [B, L, H, D] shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    window = {"window_tokens": window_tokens, "sink_tokens": sink_tokens}
    be = resolve_backend(q, backend, op="block_causal_attention")
    if be == "triton" and window_tokens is None:
        from .kernels import block_attn  # a plain import: torch.compile traces it, not importlib

        return block_attn.block_causal_attention(q, k, v, chunk_tokens, scale=scale)
    if q.is_cuda and be != "torch":
        # The rolling-window variant (and the flash_attn request) use FlexAttention's block mask on CUDA.
        return _flex_block_causal(q, k, v, chunk_tokens, scale=scale, **window)
    return ref.block_causal_attention_torch(q, k, v, chunk_tokens, scale=scale, **window)


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
    be = resolve_backend(q, backend, op="qk_norm_rope")
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
    be = resolve_backend(x, backend, op="consistency_step")
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
    be = resolve_backend(x0_theta, backend, op="neighbour_logprobs")
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
