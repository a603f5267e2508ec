"""Compile report: what the GPU code of every kernel config looks like, built on a machine without a GPU.

Each Triton kernel config that an autotuner (or a fixed-config launcher) may pick is compiled ahead of time
for triton's GPUTarget("cuda", arch, 32) with the ptxas that triton ships; the configs an autotuner prunes
are compiled too and marked kept=False. The CUDA sources of csrc/cuda are compiled with nvcc when one is
found. One record per (kernel, config):

    {"kernel": str, "config": str, "kept": bool, "regs": int, "spills": int, "smem_bytes": int,
     "wgmma": bool, ...extras}

regs / spills come from ptxas -v ("Used N registers", "N bytes spill stores"), smem_bytes from the
compiled kernel's metadata (Triton) or ptxas (nvcc), wgmma says whether the PTX issues Hopper warpgroup
MMAs. Extras: "compile_s", "tma" (TMA copies: the PTX's cp.async.bulk.tensor instructions, by direction:
{"load": n, "store": n}), "sass_tma" (UTMALDG / UTMASTG instructions in the SASS of a kernel with TMA), "wgmma_waits" (the pending-group counts of the PTX's wgmma.wait_group, in order: a
count > 0 lets MMAs run on behind the wait), "global_loads" (the
PTX's global loads by access width in bytes, e.g. {"16": 12, "4": 2}), "error" (the kernel did not
compile; regs etc. are None).

Scope: bf16 inputs at the production head dim (D = 128) and the neighbour kernel at the paper's group
(A = 4, G = 12) -- the fp32 "ieee" dot path is unusable on a GPU and takes minutes per config to compile
(fp32 attention compiled for CUDA uses TF32 tensor-core dots instead; the "chunk_fwd_fp32" records show
them).
Configs compile in parallel worker processes (one per core), each with a fresh private triton cache so
that ptxas runs and reports. `python -m arcopo_fast.doctor --compile-report --json PATH` writes the list.

    from arcopo_fast.compile_report import build_report, format_table
    print(format_table(build_report(kernels=["chunk_fwd", "chunk_dq"])))
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import multiprocessing
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["KERNELS", "ATTENTION_KERNELS", "TMA_KERNELS", "build_report", "format_table"]

HEAD_DIM = 128  # Wan2.1 1.3B and 14B
NB_A, NB_G = 4, 12  # the paper's anchors and group size

# Pointer element types of the kernels' pointer arguments, by argument name.
_ATTN_PTRS = {"Lse": "*fp32", "Delta": "*fp32", "CLEN": "*i32", "CROWS": "*i32", "PLEN": "*i32", "PROWS": "*i32",
              "OPart": "*fp32", "LsePart": "*fp32"}
_NB_PTRS = {"t_ptr": "*bf16", "c_ptr": "*bf16", "gt_ptr": "*bf16", "part_ptr": "*fp32", "tau_ptr": "*fp32",
            "d_ptr": "*fp32", "logp_ptr": "*fp32", "gd_ptr": "*fp32", "gl_ptr": "*fp32", "ticket_ptr": "*i32"}


def _attn_ptrs(dtype: str) -> dict[str, str]:
    ptrs = dict(_ATTN_PTRS)
    for n in ("Q", "K", "V", "Out", "KC", "VC", "KP", "VP", "DO", "DQ", "DK", "DV"):
        ptrs[n] = f"*{dtype}"
    return ptrs


def _spec(kernel, module, fn, constexprs, warps, stages, kept, *, ptrs, config=None, div16=(), maxnreg=None):
    if config is None:
        blocks = " ".join(f"{k}={constexprs[k]}" for k in ("BLOCK_M", "BLOCK_N", "BLOCK") if k in constexprs)
        config = f"{blocks} w{warps} s{stages}".strip() + (f" maxnreg={maxnreg}" if maxnreg else "")
    return dict(kernel=kernel, module=module, fn=fn, constexprs=constexprs, num_warps=warps, num_stages=stages,
                kept=bool(kept), ptrs=ptrs, config=config, div16=tuple(div16), maxnreg=maxnreg)


class _FakeTensor:
    """What the autotuner's prune hook reads of the Q argument."""

    def __init__(self, elem_bytes: int):
        self._elem = elem_bytes

    def element_size(self) -> int:
        return self._elem


# Report kernel name -> its autotuner's row of block_attn.SPILLING_D128 (the variants of one JIT kernel
# share an autotuner, hence a row).
_TUNER_ROW = {"chunk_fwd_split": "chunk_fwd", "chunk_fwd_fp32": "chunk_fwd", "chunk_fwd_split_tma": "chunk_fwd_tma",
              "chunk_dkdv": "dkdv", "block_causal_dkdv": "dkdv",
              "chunk_dkdv_tma": "dkdv_tma", "block_causal_dkdv_tma": "dkdv_tma"}


def _fwd_specs(kernel, fn, extra, dtype="bf16", kept_only=False, module="arcopo_fast.kernels.block_attn"):
    from arcopo_fast.kernels import block_attn as ba

    elem = 4 if dtype == "fp32" else 2
    lq, lk = ba._lq_bucket(4680), ba._lk_bucket(32760)
    named = {"Q": _FakeTensor(elem), "LQ_BUCKET": lq, "LK_BUCKET": lk}
    prune = ba._fwd_pruner(_TUNER_ROW.get(kernel, kernel))
    kept = {id(c) for c in prune(ba._FWD_CONFIGS, named, HEAD_DIM=HEAD_DIM)}
    prec = ba._dot_prec_gpu(dtype)
    specs = []
    for c in ba._FWD_CONFIGS:
        if kept_only and id(c) not in kept:
            continue
        cx = dict(extra, HEAD_DIM=HEAD_DIM, DOT_PREC=prec, **c.kwargs)
        specs.append(_spec(kernel, module, fn, cx, c.num_warps, c.num_stages,
                           id(c) in kept, ptrs=_attn_ptrs(dtype), maxnreg=getattr(c, "maxnreg", None)))
    return specs


def _bwd_specs(kernel, module, fn, extra, candidates) -> list[dict]:
    """The backward autotuner's D = 128 candidates of `kernel`, marked kept as its pruner decides (bf16)."""
    from arcopo_fast.kernels import _autotune
    from arcopo_fast.kernels import block_attn as ba

    configs = ba._bwd_configs(candidates)
    prune = ba._bwd_pruner(_TUNER_ROW.get(kernel, kernel), candidates)
    kept = {id(c) for c in prune(configs, {"Q": _FakeTensor(2)}, HEAD_DIM=HEAD_DIM)}
    specs = []
    for c in configs:
        if _autotune.tile(c) not in candidates[HEAD_DIM]:
            continue
        cx = dict(extra, HEAD_DIM=HEAD_DIM, DOT_PREC="tf32", **c.kwargs)
        specs.append(_spec(kernel, module, fn, cx, c.num_warps, c.num_stages, id(c) in kept,
                           ptrs=_attn_ptrs("bf16")))
    return specs


def _all_specs() -> dict[str, list[dict]]:
    """kernel name -> its compile specs (import of the kernel modules happens here)."""
    from arcopo_fast.kernels import block_attn as ba
    from arcopo_fast.kernels import neighbour as nb

    mod = "arcopo_fast.kernels.block_attn"
    ptrs = _attn_ptrs("bf16")
    # the most general chunk variant: zero-copy prefix (int length) + cache (per-row lengths and rows) + own
    seg = dict(ba._segment_flags(cache_len_ptr=True, cache_rows=True, prefix_len_ptr=False))
    specs: dict[str, list[dict]] = {
        "chunk_fwd": _fwd_specs("chunk_fwd", "_chunk_attn_fwd_kernel", dict(seg, SPLIT=False)),
        "chunk_fwd_split": _fwd_specs("chunk_fwd_split", "_chunk_attn_fwd_kernel", dict(seg, SPLIT=True)),
        "block_causal_fwd": _fwd_specs("block_causal_fwd", "_block_causal_fwd_kernel", {}),
        "chunk_fwd_fp32": _fwd_specs("chunk_fwd_fp32", "_chunk_attn_fwd_kernel", dict(seg, SPLIT=False),
                                     dtype="fp32", kept_only=True),
    }
    tma = "arcopo_fast.kernels.block_attn_tma"
    specs["chunk_fwd_tma"] = _fwd_specs("chunk_fwd_tma", "_chunk_attn_fwd_tma_kernel", dict(seg, SPLIT=False),
                                        module=tma)
    specs["chunk_fwd_split_tma"] = _fwd_specs("chunk_fwd_split_tma", "_chunk_attn_fwd_tma_kernel",
                                              dict(seg, SPLIT=True), module=tma)
    specs["block_causal_fwd_tma"] = _fwd_specs("block_causal_fwd_tma", "_block_causal_fwd_tma_kernel", {}, module=tma)
    for name, m, fn, cx in (("chunk_dq", mod, "_chunk_attn_bwd_dq_kernel", seg),
                            ("chunk_dq_tma", tma, "_chunk_attn_bwd_dq_tma_kernel", seg),
                            ("block_causal_dq", mod, "_block_causal_bwd_dq_kernel", {}),
                            ("block_causal_dq_tma", tma, "_block_causal_bwd_dq_tma_kernel", {})):
        specs[name] = _bwd_specs(name, m, fn, cx, ba.BWD_DQ_CONFIGS)
    for name, m, fn, causal in (("chunk_dkdv", mod, "_dkdv_kernel", False),
                                ("chunk_dkdv_tma", tma, "_dkdv_tma_kernel", False),
                                ("block_causal_dkdv", mod, "_dkdv_kernel", True),
                                ("block_causal_dkdv_tma", tma, "_dkdv_tma_kernel", True)):
        specs[name] = _bwd_specs(name, m, fn, dict(CAUSAL=causal), ba.BWD_DKDV_CONFIGS)
    specs["bwd_delta"] = [_spec("bwd_delta", mod, "_bwd_delta_kernel", dict(HEAD_DIM=HEAD_DIM, BLOCK_M=64), 4, 1,
                                True, ptrs=ptrs)]
    if hasattr(ba, "_split_combine_kernel"):
        bm, w = ba.COMBINE_CONFIG
        specs["chunk_fwd_combine"] = [_spec(
            "chunk_fwd_combine", mod, "_split_combine_kernel",
            dict(HEAD_DIM=HEAD_DIM, BLOCK_M=bm, DOT_PREC="tf32"), w, 1, True, ptrs=ptrs)]
    nbmod = "arcopo_fast.kernels.neighbour"
    for name, fn, cx, w in nb.compile_specs(NB_A, NB_G):
        blocks = " ".join(f"{k}={v}" for k, v in cx.items() if k != "TAU_TENSOR")
        specs.setdefault(name, []).append(_spec(name, nbmod, fn, cx, w, 1, True, ptrs=_NB_PTRS, div16=("N",),
                                                config=f"{fn} {blocks} w{w}"))
    return specs


# ---------------------------------------------------------------------------------------------------------
# Triton: one spec -> one record (runs in a worker process)
# ---------------------------------------------------------------------------------------------------------

_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_SMEM = re.compile(r"(\d+) bytes smem")


def _worker_init(cache_dir: str) -> None:
    # The kernels must be real JIT functions (TRITON_INTERPRET makes them interpreter stubs), and ptxas must
    # run for every config (a warm cache would skip it and its report).
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def _compile_triton(spec: dict, arch: int) -> dict:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = getattr(importlib.import_module(spec["module"]), spec["fn"])
    while not isinstance(fn, JITFunction):  # an Autotuner (or heuristics) wraps the JITFunction
        fn = fn.fn
    cx = {k: v for k, v in spec["constexprs"].items() if k in fn.arg_names}
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in cx:
            sig[name] = "constexpr"
        elif name in spec["ptrs"]:
            sig[name] = spec["ptrs"][name]
        elif "scale" in name or name.endswith("_val"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
        # what the JIT sees at run time: 16-byte aligned tensors, token/head/batch strides divisible by 16
        if sig[name].startswith("*") or name.startswith("stride_") or name in spec["div16"]:
            attrs[(i,)] = [["tt.divisibility", 16]]
    rec = {k: spec[k] for k in ("kernel", "config", "kept")}
    t0 = time.perf_counter()
    log = io.StringIO()
    old = triton.knobs.nvidia.dump_ptxas_log
    triton.knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs),
                               target=GPUTarget("cuda", arch, 32),
                               options=_options(spec))
    except Exception as e:  # noqa: BLE001 - a config that does not compile is a finding, not a crash
        rec.update(regs=None, spills=None, smem_bytes=None, wgmma=False, error=f"{type(e).__name__}: {e}"[:500])
        return rec
    finally:
        triton.knobs.nvidia.dump_ptxas_log = old
    text = log.getvalue()
    regs, spill = _REGS.search(text), _SPILL.search(text)
    ptx = k.asm.get("ptx", "")
    rec.update(
        regs=int(regs.group(1)) if regs else None,
        spills=int(spill.group(1)) + int(spill.group(2)) if spill else None,
        smem_bytes=int(k.metadata.shared),
        wgmma="wgmma.mma_async" in ptx,
        wgmma_waits=[int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)],
        global_loads=_load_widths(ptx),
        tma=_tma_copies(ptx),
        compile_s=round(time.perf_counter() - t0, 2),
    )
    if any(rec["tma"].values()):
        rec["sass_tma"] = _sass_tma(k.asm.get("cubin"))
    if regs is None:
        rec["error"] = "no ptxas report (" + text[-200:] + ")"
    return rec


_LD = re.compile(r"\b(?:ld\.global|cp\.async\.\w+\.shared\.global)((?:\.[a-z0-9_:]+)*)[^;]*;")


def _tma_copies(ptx: str) -> dict[str, int]:
    """TMA bulk tensor copies of the PTX: global -> shared ("load") and shared -> global ("store")."""
    copies = re.findall(r"cp\.async\.bulk\.tensor\.\dd\.(shared|global)", ptx)
    return {"load": copies.count("shared"), "store": copies.count("global")}


def _sass_tma(cubin: bytes | None) -> dict[str, int] | str:
    """UTMALDG / UTMASTG (the TMA instructions) in the SASS, via the cuobjdump that triton ships."""
    try:
        from triton.tools.disasm import get_sass

        sass = get_sass(cubin)
    except Exception as e:  # noqa: BLE001 - no cuobjdump: say so in the record
        return f"no SASS ({type(e).__name__})"
    return {op: len(re.findall(rf"\b{op}\b", sass)) for op in ("UTMALDG", "UTMASTG")}


def _load_widths(ptx: str) -> dict[str, int]:
    """Global-memory load instructions of the PTX by access width in bytes ({"16": 12, "2": 4}); cp.async
    copies count by their copy size."""
    out: dict[str, int] = {}
    for m in _LD.finditer(ptx):
        mods, text = m.group(1), m.group(0)
        if text.startswith("cp.async"):
            size = re.search(r",\s*(0x[0-9a-f]+|\d+)\s*(?:,[^;]*)?;$", text)
            width = int(size.group(1), 0) if size else 0
        else:
            vec = re.search(r"\.v(\d)", mods)
            bits = re.search(r"\.[bfus](8|16|32|64)\b", mods)
            width = (int(vec.group(1)) if vec else 1) * (int(bits.group(1)) // 8 if bits else 0)
        out[str(width)] = out.get(str(width), 0) + 1
    return out


def _options(spec: dict) -> dict:
    opts = {"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]}
    if spec.get("maxnreg"):
        opts["maxnreg"] = spec["maxnreg"]
    return opts


def _run_spec(args) -> dict:
    spec, arch = args
    try:
        return _compile_triton(spec, arch)
    except Exception as e:  # noqa: BLE001 - report it in the record, keep the other configs
        return dict(kernel=spec["kernel"], config=spec["config"], kept=spec["kept"], regs=None, spills=None,
                    smem_bytes=None, wgmma=False, error=f"{type(e).__name__}: {e}"[:500])


# ---------------------------------------------------------------------------------------------------------
# CUDA sources (nvcc)
# ---------------------------------------------------------------------------------------------------------


def _find_nvcc() -> str | None:
    for cand in (os.environ.get("CUDACXX"), shutil.which("nvcc"),
                 os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def _cuda_sources() -> list[Path]:
    root = Path(__file__).resolve().parents[1] / "csrc" / "cuda"
    return sorted(root.glob("*.cu")) if root.is_dir() else []


def _compile_cu(src: Path, arch: int, nvcc: str) -> list[dict]:
    import sysconfig

    import torch

    inc = Path(torch.__file__).parent / "include"
    name = f"{src.stem} ({src.parent.name}/{src.name})"
    with tempfile.TemporaryDirectory() as tmp:
        shim = Path(tmp) / "shim"
        # A CPU build of torch ships c10/cuda headers without the CMake-generated macro header they include.
        if not (inc / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
            (shim / "c10" / "cuda" / "impl").mkdir(parents=True)
            (shim / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text("#define C10_CUDA_BUILD_SHARED_LIBS\n")
        cmd = [nvcc, "-std=c++20", f"-arch=sm_{arch}", "-cubin", "-o", str(Path(tmp) / "out.cubin"),
               "-Xptxas", "-v", "-diag-suppress", "20013,20015", f"-I{src.parent.parent}", f"-I{shim}",
               f"-I{inc}", f"-I{inc / 'torch' / 'csrc' / 'api' / 'include'}",
               f"-I{sysconfig.get_paths()['include']}", str(src)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    secs = round(time.perf_counter() - t0, 2)
    if proc.returncode != 0:
        return [dict(kernel=name, config=f"nvcc sm_{arch}", kept=True, regs=None, spills=None, smem_bytes=None,
                     wgmma=False, compile_s=secs, error=proc.stderr[-500:])]
    recs = []
    # ptxas -v: per entry function, "Compiling entry function 'X'", then spill and register lines
    for block in proc.stderr.split("Compiling entry function")[1:]:
        fname = re.match(r"\s*'([^']+)'", block)
        regs, spill, smem = _REGS.search(block), _SPILL.search(block), _SMEM.search(block)
        recs.append(dict(
            kernel=name, config=f"nvcc sm_{arch} {fname.group(1)[-40:] if fname else '?'}", kept=True,
            regs=int(regs.group(1)) if regs else None,
            spills=int(spill.group(1)) + int(spill.group(2)) if spill else None,
            smem_bytes=int(smem.group(1)) if smem else 0, wgmma=False, compile_s=secs,
        ))
    return recs


# ---------------------------------------------------------------------------------------------------------
# Public
# ---------------------------------------------------------------------------------------------------------

KERNELS = ("chunk_fwd", "chunk_fwd_split", "chunk_fwd_tma", "chunk_fwd_split_tma", "chunk_fwd_combine",
           "block_causal_fwd", "block_causal_fwd_tma", "chunk_fwd_fp32",
           "chunk_dq", "chunk_dq_tma", "block_causal_dq", "block_causal_dq_tma", "chunk_dkdv", "chunk_dkdv_tma",
           "block_causal_dkdv", "block_causal_dkdv_tma", "bwd_delta",
           "neighbour_fwd", "neighbour_bwd", "cuda_ext")
# Kernels whose matmuls must run on Hopper tensor cores (wgmma) on sm_90.
ATTENTION_KERNELS = ("chunk_fwd", "chunk_fwd_split", "chunk_fwd_tma", "chunk_fwd_split_tma", "block_causal_fwd",
                     "block_causal_fwd_tma", "chunk_fwd_fp32", "chunk_dq", "chunk_dq_tma", "block_causal_dq",
                     "block_causal_dq_tma", "chunk_dkdv", "chunk_dkdv_tma", "block_causal_dkdv",
                     "block_causal_dkdv_tma")
# Kernels that move their tiles with TMA (device-side tensor descriptors) on sm_90.
TMA_KERNELS = ("chunk_fwd_tma", "chunk_fwd_split_tma", "chunk_dq_tma", "chunk_dkdv_tma", "block_causal_fwd_tma",
               "block_causal_dq_tma", "block_causal_dkdv_tma")


def build_report(*, arch: int = 90, kernels: list[str] | None = None, include_pruned: bool = True,
                 workers: int | None = None) -> list[dict]:
    """Compile every kernel config for GPUTarget("cuda", arch, 32) (and csrc/cuda with nvcc when present)
    and return one record per (kernel, config); see the module docstring. kernels: names of KERNELS
    (default: all). include_pruned=False compiles only what the autotuners keep (kept=True records).
    workers: parallel compile processes (default: the usable cores)."""
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"the compile report needs triton with its NVIDIA backend: {e}") from None
    names = list(KERNELS) if kernels is None else list(kernels)
    bad = [n for n in names if n not in KERNELS]
    if bad:
        raise ValueError(f"kernels must be names from {KERNELS}, got {bad}")
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        raise RuntimeError(f"this triton install has no ptxas ({ptxas}): cannot compile for sm_{arch}")
    all_specs = _all_specs()
    specs = [s for n in names if n != "cuda_ext" for s in all_specs.get(n, [])
             if include_pruned or s["kept"]]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n_workers = max(1, min(len(specs), workers or cores))
    records: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="arcopo_compile_report_") as cache:
        if specs:
            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(n_workers, mp_context=ctx, initializer=_worker_init,
                                                        initargs=(cache,)) as pool:
                # heaviest first (8-warp, big tiles), so that the pool's tail is short
                order = sorted(range(len(specs)), key=lambda i: -_weight(specs[i]))
                futs = {i: pool.submit(_run_spec, (specs[i], arch)) for i in order}
                records = [futs[i].result() for i in range(len(specs))]
    if "cuda_ext" in names:
        nvcc = _find_nvcc()
        for src in _cuda_sources() if nvcc else []:
            records.extend(_compile_cu(src, arch, nvcc))
    return records


def _weight(spec: dict) -> int:
    cx = spec["constexprs"]
    return cx.get("BLOCK_M", 1) * cx.get("BLOCK_N", 1) * max(1, spec["num_stages"])


def format_table(records: list[dict]) -> str:
    """Markdown table of the records (docs/performance.md's compile table)."""
    rows = ["| kernel | config | kept | regs | spills (B) | smem (KiB) | wgmma |", "|---|---|---|---|---|---|---|"]
    for r in records:
        smem = "-" if r.get("smem_bytes") is None else f"{r['smem_bytes'] / 1024:.0f}"
        regs = r.get("regs") if r.get("regs") is not None else "error"
        rows.append(f"| {r['kernel']} | {r['config']} | {'yes' if r['kept'] else 'no'} | {regs} | "
                    f"{r.get('spills') if r.get('spills') is not None else '-'} | {smem} | "
                    f"{'yes' if r.get('wgmma') else 'no'} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """python -m arcopo_fast.compile_report [--arch 90] [--kernels a,b] [--kept-only] [--json PATH]"""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m arcopo_fast.compile_report", description=main.__doc__)
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--kernels", default=None, help=f"comma-separated subset of {', '.join(KERNELS)}")
    p.add_argument("--kept-only", action="store_true", help="skip the configs the autotuners prune")
    p.add_argument("--json", default=None, help="write the records to this file")
    a = p.parse_args(argv)
    recs = build_report(arch=a.arch, kernels=a.kernels.split(",") if a.kernels else None,
                        include_pruned=not a.kept_only)
    print(format_table(recs))
    if a.json:
        Path(a.json).write_text(json.dumps(recs, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
