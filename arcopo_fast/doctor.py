"""`python -m arcopo_fast.doctor`: what this machine will run, why, and (on request) whether it is right
and how fast. In the spirit of `python -m torch.utils.collect_env` and `python -m xformers.info`.

    python -m arcopo_fast.doctor                         versions, device, extension (archs), backends + why
    python -m arcopo_fast.doctor --selftest              run every kernel check now on this device: a small
                                                         and the 1.3B shape on CUDA; on CPU the Triton
                                                         interpreter at the small shape
    python -m arcopo_fast.doctor --bench --budget 120    the headline comparisons (arcopo_fast/quickbench.py)
                                                         in priority order, stopping before the budget
    python -m arcopo_fast.doctor --compile-report --json report.json
                                                         the sm_90 compile report (arcopo_fast.compile_report)
    --json PATH   everything as JSON, rewritten after every check / row (an interrupted run keeps them)
    --markdown-from A.json [B.json ...]   Markdown tables of such JSON files (scripts/gpu_check.sh's page)
    --device cuda:N|cpu, --dtype bfloat16|float16|float32, --ops a,b (restrict --selftest / --bench)

Exit status: 0, or 1 when a self-test failed (--selftest), 2 for a usage error or a missing module.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ("torch", "triton", "diffusers", "transformers", "peft", "flash_attn", "nvtx", "numpy", "safetensors")


def _pkg_version(name: str) -> str | None:
    for dist in (name, name.replace("_", "-")):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=10", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + (" (dirty)" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _nvidia_smi() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def versions() -> dict:
    import torch

    from . import __version__, backend_choice

    v = {"arcopo_fast": __version__, "commit": _git_commit(), "python": platform.python_version(),
         "platform": platform.platform()}
    for p in PACKAGES:
        v[p] = _pkg_version(p)
    v["torch"] = torch.__version__
    v["cuda_runtime"] = torch.version.cuda
    v["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    v["driver"] = _nvidia_smi() or (backend_choice._driver_version() if torch.cuda.is_available() else None)
    return v


def device_info(device) -> dict:
    import torch

    if device.type != "cuda":
        return {"device": str(device), "name": platform.processor() or platform.machine(),
                "cpu_threads": torch.get_num_threads(), "cuda_available": torch.cuda.is_available()}
    p = torch.cuda.get_device_properties(device)
    return {"device": str(device), "name": p.name, "capability": f"{p.major}.{p.minor}",
            "memory_gib": round(p.total_memory / 2**30, 1), "multiprocessors": p.multi_processor_count,
            "visible_devices": torch.cuda.device_count()}


def extension_info(device) -> dict:
    from . import ext

    info = {"built": ext.extension_loaded(), "with_cuda": ext.extension_has_cuda(), "archs": ext.extension_archs(),
            "kv_fork": "torch-fallback" if ext.fallback_reason(device) else "cpp"}
    if ext.fallback_reason(device):
        info["fallback_reason"] = ext.fallback_reason(device)
    if device.type == "cuda" and info["with_cuda"]:
        import torch

        cap = "{}.{}".format(*torch.cuda.get_device_capability(device))
        info["covers_device"] = info["archs"] == "unknown" or arch_list_covers(info["archs"], cap)
    return info


def arch_list_covers(archs: str, cap: str) -> bool:
    """Whether an extension built for `archs` ("8.0;9.0a;10.0+PTX") runs natively or through its PTX on a
    device of capability `cap` ("9.0"). The arch-specific and family suffixes (9.0a, 10.0f) are machine code
    for that capability too: the H200 run built for TORCH_CUDA_ARCH_LIST=9.0a and was reported uncovered."""
    entries = [a for a in archs.split(";") if a]
    base = lambda a: a.removesuffix("+PTX").rstrip("af")
    return cap in (base(a) for a in entries) or any(float(base(a)) <= float(cap) for a in entries if a.endswith("+PTX"))


def _report(args, device) -> dict:
    import torch

    from . import backend_choice, ops

    dtype = getattr(torch, args.dtype)
    chooser = backend_choice.chooser()
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": versions(),
        "device": device_info(device),
        "extension": extension_info(device),
        "env": {k: os.environ.get(k) for k in ("ARCOPO_BACKEND", "ARCOPO_SELFTEST", "TRITON_INTERPRET",
                                               "TORCH_CUDA_ARCH_LIST", "ARCOPO_FAST_CACHE")},
        "backends": ops.explain(device, dtype),
        "backend_cache": str(chooser._table(device)[1]) if device.type in ops.MEASURE_ON else None,
    }


# ---------------------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------------------


class Out:
    """The human report on stdout and the JSON document, rewritten whenever it grows."""

    def __init__(self, path: str | None):
        self.path = Path(path) if path else None
        self.doc: dict = {}

    def update(self, **kw) -> None:
        self.doc.update(kw)
        self.flush()

    def flush(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1, default=str))
        os.replace(tmp, self.path)


def _table(rows: list[list[str]], head: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def _print_report(rep: dict) -> None:
    v, d, e = rep["versions"], rep["device"], rep["extension"]
    print("arcopo_fast doctor")
    print(f"  arcopo_fast {v['arcopo_fast']} ({v['commit'] or 'no git'}), Python {v['python']}, {v['platform']}")
    print("  " + ", ".join(f"{p} {v.get(p) or '-'}" for p in PACKAGES if p != "torch"))
    print(f"  torch {v['torch']} (CUDA {v['cuda_runtime'] or '-'}, cuDNN {v['cudnn'] or '-'}), driver {v['driver'] or '-'}")
    extra = f", capability {d['capability']}, {d['memory_gib']} GiB" if "capability" in d else ""
    print(f"  device {d['device']}: {d['name']}{extra}")
    built = "built" if e["built"] else "NOT built"
    archs = f", CUDA archs {e['archs']}" if e["archs"] else (", CPU only" if e["built"] else "")
    print(f"  extension arcopo_fast._C {built}{archs}; kv_fork -> {e['kv_fork']}"
          + (f" ({e['fallback_reason']})" if e.get("fallback_reason") else ""))
    if e.get("covers_device") is False:
        print(f"  WARNING: the extension was not built for this device's capability {d['capability']}")
    rows = []
    for op, info in rep["backends"].items():
        why = info.get("why", "")
        if info.get("selftest_failed"):
            why += "; failed: " + ", ".join(info["selftest_failed"])
        rows.append([op, info.get("backend", "?"), why])
    print()
    print(_table(rows, ["op", "backend", "why"]))
    measured = {k: c for op in rep["backends"].values() for k, c in op.get("measured", {}).items()}
    if measured:
        print("\nmeasured choices (" + str(rep.get("backend_cache")) + ")")
        rows = [[k, c["backend"], ", ".join(f"{n} {ms:.3g}" for n, ms in sorted(c["ms"].items(), key=lambda x: x[1]))]
                for k, c in measured.items()]
        print(_table(rows, ["op|variant|dtype|bucket", "chosen", "ms"]))


def _print_verdict(v) -> None:
    status = "ok  " if v.ok else "FAIL"
    print(f"  {status} {v.op:<24} {v.variant:<22} {v.backend:<10} {v.size:<5} {v.seconds:7.2f} s  "
          + (v.detail if v.ok else v.error)[:150], flush=True)


def _print_bench(rows: list[dict]) -> None:
    table = []
    for r in rows:
        if "impl" not in r or r.get("impl") == "check":
            continue
        t = r.get("ms", r.get("s", r.get("dit_s")))
        unit = "ms" if "ms" in r else "s"
        ratio = f"{r['ratio']:.2f}x vs {r['vs']}" if "ratio" in r else ""
        extra = ", ".join(f"{k} {r[k]}" for k in ("B", "Lk", "fps_dit", "fps_e2e", "TB/s", "us") if k in r)
        table.append([r["item"], r["impl"], "-" if t is None else f"{t:.4g} {unit}", ratio, r.get("error", extra)[:90]])
    print(_table(table, ["item", "impl", "time", "ours vs baseline", "notes"]))
    for r in rows:
        if "skipped" in r or ("error" in r and "impl" not in r):
            print(f"  {r['item']}: {r.get('skipped') or r.get('error')}")


# ---------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m arcopo_fast.doctor", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--selftest", action="store_true", help="run every kernel check now on this device")
    p.add_argument("--bench", action="store_true", help="run the headline comparisons (see --budget)")
    p.add_argument("--budget", type=float, default=60.0, help="seconds for --bench (and --selftest) (default 60)")
    p.add_argument("--compile-report", action="store_true", help="write the sm_90 compile report (needs --json)")
    p.add_argument("--json", metavar="PATH", help="write everything as JSON")
    p.add_argument("--device", default=None, help="cuda:N or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="dtype of the checks (default bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--ops", default=None, help="comma-separated ops (--selftest) or items (--bench) to run")
    p.add_argument("--markdown-from", nargs="+", metavar="JSON", help="print Markdown tables of doctor JSON files")
    return p


def _md_table(rows: list[list], head: list[str]) -> str:
    cell = lambda c: "" if c is None else str(c).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows])


def markdown(doc: dict) -> str:
    """Markdown of one doctor JSON document (whichever of report / selftest / bench it holds)."""
    out = []
    if "versions" in doc:
        v, d, e = doc["versions"], doc["device"], doc["extension"]
        out.append(f"{d.get('name')} ({d['device']}{', sm ' + d['capability'] if 'capability' in d else ''}), "
                   f"torch {v['torch']} (CUDA {v['cuda_runtime']}), triton {v.get('triton')}, driver {v.get('driver')}, "
                   f"Python {v['python']}, arcopo_fast {v['commit'] or v['arcopo_fast']}, {doc.get('when', '')}. "
                   f"Extension: {'built' if e['built'] else 'not built'}"
                   f"{' for CUDA archs ' + e['archs'] if e.get('archs') else ''}, kv_fork -> {e['kv_fork']}.")
        out.append("")
        out.append(_md_table([[op, i.get("backend"), i.get("why")] for op, i in doc["backends"].items()],
                             ["op", "backend", "why"]))
        out.append("")
    if doc.get("selftest"):
        s = doc.get("selftest_summary", {})
        out.append(f"Self-test: {s.get('passed', '?')} passed, {s.get('failed', '?')} failed "
                   f"({len(doc['selftest'])} checks run).")
        out.append("")
        out.append(_md_table([[v["op"], v["variant"], v["backend"], v["size"], "ok" if v["ok"] else "FAIL",
                               v["seconds"], v["detail"] if v["ok"] else v["error"]] for v in doc["selftest"]],
                             ["op", "variant", "backend", "size", "verdict", "s", "max error / bound, or the error"]))
        out.append("")
    if doc.get("bench"):
        rows = []
        for r in doc["bench"]:
            if "impl" in r and r["impl"] != "check":
                t = r.get("ms", r.get("s", r.get("dit_s")))
                ratio = f"{r['ratio']:.2f}x vs {r['vs']}" if "ratio" in r else ""
                info = ", ".join(f"{k} {r[k]}" for k in ("B", "Lq", "Lk", "children", "prefix", "G", "fps_dit", "fps_e2e",
                                                         "first_chunk_s", "TB/s", "us") if k in r)
                rows.append([r["item"], r["impl"], t, "ms" if "ms" in r else "s", ratio, r.get("error", info)])
            elif "skipped" in r or "error" in r:
                rows.append([r["item"], "", "", "", "", r.get("skipped") or r.get("error")])
        out.append(_md_table(rows, ["item", "impl", "time", "unit", "ours vs baseline", "notes"]))
        out.append("")
    return "\n".join(out)


def _compile_report(args) -> int:
    if not args.json:
        print("doctor: --compile-report needs --json PATH", file=sys.stderr)
        return 2
    try:
        mod = importlib.import_module("arcopo_fast.compile_report")
    except ModuleNotFoundError as e:
        if e.name != "arcopo_fast.compile_report":
            raise
        print("doctor: --compile-report needs arcopo_fast/compile_report.py (the sm_90 compile report), which "
              "this installation does not have", file=sys.stderr)
        return 2
    records = mod.build_report(arch=90)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(records, indent=1))
    rows = [[r.get("kernel"), r.get("config"), r.get("kept"), r.get("regs"), r.get("spills"), r.get("smem_bytes"),
             r.get("wgmma")] for r in records]
    print(_table(rows, ["kernel", "config", "kept", "regs", "spills", "smem", "wgmma"]) if rows else "no records")
    print(f"\n{len(records)} records -> {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.markdown_from:
        for path in args.markdown_from:
            try:
                print(markdown(json.loads(Path(path).read_text())))
            except (OSError, ValueError, KeyError) as e:
                print(f"({path}: not available: {type(e).__name__}: {e})\n")
        return 0
    if args.compile_report:
        return _compile_report(args)
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cpu" and args.selftest:
        # the kernels' only way to run without a GPU; must be set before triton is first imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    only = [s.strip() for s in args.ops.split(",")] if args.ops else None

    out = Out(args.json)
    rep = _report(args, device)
    out.update(**rep)
    _print_report(rep)
    status = 0
    if args.selftest:
        from . import selftest

        print(f"\nself-test on {device} in {args.dtype} (2x-torch-error rule, poisoned outputs)", flush=True)
        verdicts: list[dict] = []

        def progress(v):
            _print_verdict(v)
            verdicts.append(v.as_dict())
            out.update(selftest=verdicts)

        head_dim = 128 if device.type == "cuda" else 16  # the interpreter: the smallest head dim
        res = selftest.run_all(str(device), f"torch.{args.dtype}", head_dim=head_dim, ops_filter=only,
                               budget_s=args.budget, progress=progress, quick=device.type != "cuda")
        failed = [v for v in res if not v.ok]
        print(f"  {len(res) - len(failed)} passed, {len(failed)} failed")
        out.update(selftest=verdicts, selftest_summary={"passed": len(res) - len(failed), "failed": len(failed)})
        status = 1 if failed else 0
    if args.bench:
        from . import quickbench

        print(f"\nbench on {device}, budget {args.budget:.0f} s", flush=True)
        rows: list[dict] = []

        def row(r):
            rows.append(r)
            out.update(bench=rows)

        quickbench.run(device, args.budget, only=only, progress=row)
        _print_bench(rows)
        out.update(bench=rows)
    if args.json:
        print(f"\nJSON -> {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
