"""Autotuning shared by the attention kernels: which configs a kernel may use, and compiling them at once.

The candidates of a kernel are pruned by what its sm_90 compile report shows (arcopo_fast.compile_report):
a config that spills registers under either Triton the project meets (3.9 on the CPU machines and CI, 3.6
on the GPU machines) is dropped, per kernel, because the same tile spills in one kernel and not in another.

A first call with a new tuning key makes triton's Autotuner compile each candidate inside its timing loop,
one after the other (10-13 kept forward configs per key, every key and flag combination again: a large
share of the first iterations and of a time-boxed GPU check). ParallelCompileAutotuner compiles the candidates of the key together first, on a
thread pool (Triton's passes and ptxas run outside the GIL), then times them as triton's Autotuner does.
"""

from __future__ import annotations

import concurrent.futures
import os

import triton
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

__all__ = ["ParallelCompileAutotuner", "autotune", "compile_threads", "tile", "spill_free"]

# Feature-detected: Triton >= 3.5 (the GPU machines run 3.6); without it the autotuner is triton's own.
_ASYNC_COMPILE = getattr(triton, "AsyncCompileMode", None)


def compile_threads() -> int:
    """Threads that compile a tuning key's configs: ARCOPO_COMPILE_THREADS, else the usable cores."""
    env = os.environ.get("ARCOPO_COMPILE_THREADS")
    if env is not None:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"ARCOPO_COMPILE_THREADS must be an integer >= 1, got {env!r}") from None
        if n < 1:
            raise ValueError(f"ARCOPO_COMPILE_THREADS must be an integer >= 1, got {env!r}")
        return n
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def tile(conf: triton.Config) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, warps, stages) of a config: the key of the spill tables."""
    return conf.kwargs["BLOCK_M"], conf.kwargs["BLOCK_N"], conf.num_warps, conf.num_stages


def spill_free(configs, table: dict, head_dim: int, elem_bytes: int) -> list:
    """The configs of `configs` that `table` (element size -> tiles that spill at D = 128) does not list."""
    if head_dim != 128:
        return list(configs)
    bad = table.get(elem_bytes, ())
    return [c for c in configs if tile(c) not in bad]


class ParallelCompileAutotuner(Autotuner):
    """triton's Autotuner, plus: the first call of a tuning key compiles every candidate config that
    prune_configs keeps concurrently (compile_threads() threads) before the timing loop, which then finds
    them compiled. A config that fails to compile is left to the timing loop (which skips it as before)."""

    def run(self, *args, **kwargs):
        if self.compiles() and len(self.configs) > 1 and self.tuning_key(args, kwargs) not in self.cache:
            self.precompile(*args, **kwargs)
        return super().run(*args, **kwargs)

    def compiles(self) -> bool:
        """True when the kernel compiles (a JIT function, not the interpreter's) and Triton can do it async."""
        return _ASYNC_COMPILE is not None and isinstance(self.fn, JITFunction)

    def tuning_key(self, args, kwargs) -> tuple:
        """The key Autotuner.run files its choice under: the key arguments, then every tensor's dtype."""
        named = {**dict(zip(self.arg_names, args)), **kwargs}
        named = {k: v for k, v in named.items() if k in self.arg_names}
        key = [named[k] for k in self.keys if k in named]
        key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
        return tuple(key)

    def precompile(self, *args, **kwargs) -> int:
        """Compile the configs prune_configs keeps for these launch arguments (those of `kernel[grid](...)`);
        returns how many were submitted (0: nothing to gain from threads, or no AsyncCompileMode)."""
        self.nargs = dict(zip(self.arg_names, args))
        try:
            configs = self.prune_configs(kwargs)
        finally:
            self.nargs = None
        threads = min(len(configs), compile_threads())
        if not self.compiles() or threads <= 1:
            return 0
        launch = {**kwargs, "warmup": True}
        with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="arcopo-compile") as pool:
            with _ASYNC_COMPILE(pool, ignore_errors=True):
                for conf in configs:
                    self.fn.run(*args, **launch, **conf.all_kwargs())
        return len(configs)


def autotune(kernel, configs, key, prune):
    """ParallelCompileAutotuner over a JIT kernel (what triton.autotune builds, with parallel compiles)."""
    return ParallelCompileAutotuner(kernel, kernel.arg_names, configs, key, None, None,
                                    prune_configs_by={"early_config_prune": prune})
