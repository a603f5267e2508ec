"""Where the Triton kernel tests run. Import it before anything imports triton: it sets TRITON_INTERPRET=1
unless the caller chose (kernels then run on CPU tensors in the interpreter; `TRITON_INTERPRET=0 pytest`
on a GPU machine runs them compiled, on CUDA).

    from triton_env import DEVICE, INTERPRET, require_kernel_device
    require_kernel_device()      # at module level: skips cleanly where neither can run
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
DEVICE = "cpu" if INTERPRET else "cuda"


@pytest.fixture(autouse=True)
def tf32_reference_on_gpu():
    """Compiled on a GPU, our attention kernels take fp32 inputs through TF32 tensor-core dots (by design:
    block_attn._dot_prec; "auto" never sends fp32 CUDA attention to them). The reference in the inputs' dtype
    then runs its matmuls in TF32 as well, so the 2x rule compares like with like (the float64 reference is
    unaffected). Measured on an H200 without it: fp32 cases 2.1e-3 off against an fp32-matmul bound of 1.3e-5.
    A no-op under the interpreter (CPU matmuls have no TF32). Modules opt in by importing this fixture."""
    if INTERPRET:
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def require_kernel_device() -> None:
    pytest.importorskip("triton")
    if not INTERPRET and not torch.cuda.is_available():
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)
    if INTERPRET and (why := _interpreter_broken()):
        pytest.skip(why, allow_module_level=True)


_PROBE: list[str | None] = []


def _interpreter_broken() -> str | None:
    """Why this Triton's interpreter cannot run a loop, or None. Triton 3.6's interpreter turns 1-element
    arrays into Python ints, which numpy 2.4 made an error (every kernel with a loop fails); triton 3.9 is
    fine. Probed once with a one-loop kernel rather than guessed from version numbers."""
    if not _PROBE:
        import numpy
        import triton
        import triton.language as tl

        @triton.jit
        def _count(out, n):
            acc = 0
            for _ in range(0, n):
                acc += 1
            tl.store(out, acc)

        out = torch.zeros(1, dtype=torch.int32)
        try:
            _count[(1,)](out, 3)
            _PROBE.append(None if int(out) == 3 else f"the Triton {triton.__version__} interpreter miscounts a loop")
        except Exception as e:  # noqa: BLE001 - any failure of the probe is the reason to skip
            _PROBE.append(f"the Triton {triton.__version__} interpreter cannot run a loop with numpy "
                          f"{numpy.__version__} ({type(e).__name__}: {str(e)[:120]}); install numpy<2.4 or a newer triton")
    return _PROBE[0]


def backward_candidates(block_attn) -> list[tuple]:
    """(op, kind, tile) for every D = 128 backward candidate of block_attn's dq / dk-dv autotuners, for chunk
    ("chunk") and block-causal ("causal") attention; with `candidate_id` as pytest ids."""
    tables = (("dq", block_attn.BWD_DQ_CONFIGS), ("dkdv", block_attn.BWD_DKDV_CONFIGS))
    return [(op, kind, t) for op in ("chunk", "causal") for kind, table in tables for t in table[128]]


def candidate_id(x) -> str:
    return x if isinstance(x, str) else "x".join(map(str, x))


def pin_tiles(monkeypatch, tuners, pinned_tuner, tile) -> None:
    """Every autotuner in `tuners` to one small 32x32 config, `pinned_tuner` to `tile` = (BLOCK_M, BLOCK_N,
    warps, stages): one config each, so the GPU launch path runs under the interpreter without timing."""
    import triton

    small = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2)]
    for tuned in tuners:
        monkeypatch.setattr(tuned, "configs", small)
    bm, bn, w, s = tile
    monkeypatch.setattr(pinned_tuner, "configs",
                        [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)])
