"""kernels/_autotune.py: the autotuner that compiles a tuning key's configs together before timing them.

No GPU here: a stand-in CUDA driver reports an sm_90 device, so Triton compiles for it with its bundled
ptxas (as the compile report does) while nothing is launched. The real dk/dv autotuner is driven through
block_attn's own launcher in a child process (the kernels must be JIT functions, not the interpreter's).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import triton_env  # noqa: F401  (sets TRITON_INTERPRET before triton is imported)

triton = pytest.importorskip("triton")
from arcopo_fast.kernels import _autotune as at  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


def _double(X, Y, N, BLOCK):  # the body never runs: the tests below stub out compile and launch
    pass


def _tuner(n_configs: int) -> at.ParallelCompileAutotuner:
    configs = [triton.Config({"BLOCK": 16 * (i + 1)}, num_warps=4) for i in range(n_configs)]
    fn = JITFunction(_double)
    return at.autotune(fn, configs, ["N"], lambda configs, named, **kw: configs)


def test_first_call_of_a_key_precompiles_once_under_autotuners_own_key(monkeypatch):
    """ParallelCompileAutotuner.run compiles ahead only when triton's Autotuner is about to tune: its
    tuning_key is the key the base class files the choice under (checked by letting the base class tune),
    so a second call with the same key, and a call after tuning, do not compile again; a new key does."""
    import torch

    tuner = _tuner(3)
    launches, warmups = [], []
    monkeypatch.setattr(tuner.fn, "run", lambda *a, **kw: (warmups if kw["warmup"] else launches).append(kw))
    monkeypatch.setattr(tuner, "_bench", lambda *a, config, **kw: [float(config.kwargs["BLOCK"])])
    monkeypatch.setattr(at, "_ASYNC_COMPILE", lambda pool, ignore_errors: _NullMode())
    monkeypatch.setenv("ARCOPO_COMPILE_THREADS", "2")
    x = torch.zeros(64)
    for n in (64, 64, 128):
        tuner[(1,)](x, x, n)
    assert len(warmups) == 6  # 3 configs at N = 64, 3 at N = 128; none for the repeated key
    assert {w["BLOCK"] for w in warmups} == {16, 32, 48}
    assert tuner.tuning_key((x, x, 64), {}) in tuner.cache and tuner.tuning_key((x, x, 128), {}) in tuner.cache
    assert len(launches) == 3 and all(kw["BLOCK"] == 16 for kw in launches)  # the fastest config ran


class _NullMode:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_compile_threads_env(monkeypatch):
    monkeypatch.setenv("ARCOPO_COMPILE_THREADS", "3")
    assert at.compile_threads() == 3
    for bad in ("0", "x"):
        monkeypatch.setenv("ARCOPO_COMPILE_THREADS", bad)
        with pytest.raises(ValueError, match="ARCOPO_COMPILE_THREADS must be an integer >= 1"):
            at.compile_threads()
    monkeypatch.delenv("ARCOPO_COMPILE_THREADS")
    assert at.compile_threads() >= 1


_CHILD = textwrap.dedent("""
    import json, os, tempfile, threading
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()
    import torch, triton, triton.compiler
    from triton.backends.compiler import GPUTarget
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.driver import driver

    class Sm90:  # what JITFunction.run asks of the driver before a launch
        def get_current_device(self): return 0
        def get_current_stream(self, device=None): return 0
        def get_current_target(self): return GPUTarget("cuda", 90, 32)

    threads, real_compile = set(), triton.compiler.compile
    def compile_and_note(*a, **kw):
        threads.add(threading.get_ident())
        return real_compile(*a, **kw)
    triton.compiler.compile = compile_and_note
    driver.set_active(Sm90())
    tuned = []
    Autotuner.run = lambda self, *a, **kw: tuned.append(self.tuning_key(a, kw))  # time nothing, launch nothing

    from arcopo_fast.kernels import block_attn as ba
    ba._gpu_tiles = lambda: True
    B, L, H, D = 1, 96, 2, 128
    q, k, v, do = (torch.zeros(B, L, H, D, dtype=torch.bfloat16) for _ in range(4))
    lse, delta = (torch.zeros(B, H, L) for _ in range(2))
    ba._dkdv(do, q, k, v, lse, delta, L, 0.1, causal=False)
    kernels = list(ba._dkdv_kernel.device_caches[0][0].values())
    named = {"Q": q}
    kept = ba._dkdv_tuned.early_config_prune(ba._dkdv_tuned.configs, named, HEAD_DIM=D)
    print(json.dumps(dict(compiled=len(kernels), kept=len(kept), threads=len(threads), tuned=len(tuned),
                          warps=sorted(kn.metadata.num_warps for kn in kernels),
                          wanted=sorted(c.num_warps for c in kept))))
""")


@pytest.mark.slow
def test_dkdv_launcher_compiles_every_kept_config_on_threads():
    """block_attn's dk/dv launcher on the GPU path (the Autotuner's timing and the launch stubbed out): the
    configs the dk/dv autotuner keeps at D = 128 are all compiled for sm_90 before tuning, on 2 threads."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(ARCOPO_COMPILE_THREADS="2", TRITON_DEFAULT_FP_FUSION="1")
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["kept"] > 1 and res["compiled"] == res["kept"], res
    assert res["warps"] == res["wanted"], res
    assert res["threads"] == 2, res
    assert res["tuned"] == 1, res
