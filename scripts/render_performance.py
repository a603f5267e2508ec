"""Render pytest-benchmark JSON into Markdown tables (and a scaling plot) for docs/performance.md.

    pytest benchmarks/ --benchmark-json bench.json
    python scripts/render_performance.py bench.json --out docs/perf_results.md --plot docs/iteration_scaling.png

Every benchmark stores its numbers in extra_info (see benchmarks/*.py); this script only formats them,
grouped by benchmark file, with the machine, versions and date taken from the JSON itself.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 100 else f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    return str(v)


def render(data: dict) -> str:
    mi = data.get("machine_info", {})
    ci = data.get("commit_info", {})
    lines = [
        f"Measured {data.get('datetime', '?')} on {mi.get('node', '?')} ({mi.get('processor', '') or mi.get('machine', '')}, "
        f"Python {mi.get('python_version', '?')}), commit {ci.get('id', '?')[:10]}{' (dirty)' if ci.get('dirty') else ''}.",
        "",
    ]
    by_file: dict[str, list[dict]] = defaultdict(list)
    for b in data.get("benchmarks", []):
        by_file[b["fullname"].split("::")[0]].append(b)
    for fname, benches in sorted(by_file.items()):
        lines.append(f"### {fname}")
        lines.append("")
        scalar_keys: list[str] = []
        for b in benches:
            for k, v in b.get("extra_info", {}).items():
                if k not in scalar_keys and not isinstance(v, list):
                    scalar_keys.append(k)
        lines.append("| case | median ms (host) | " + " | ".join(scalar_keys) + " |")
        lines.append("|---|---|" + "---|" * len(scalar_keys))
        for b in benches:
            ei = b.get("extra_info", {})
            med = b.get("stats", {}).get("median", float("nan")) * 1e3
            lines.append(f"| {b['name']} | {med:.3f} | " + " | ".join(_fmt(ei.get(k, "")) for k in scalar_keys) + " |")
            for k, v in ei.items():
                if isinstance(v, list) and v and isinstance(v[0], dict):
                    cols = list(v[0])
                    lines += ["", f"{b['name']} — {k}:", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in v]
        lines.append("")
    return "\n".join(lines)


def plot_scaling(data: dict, out: Path) -> bool:
    rows_by_shape = {}
    for b in data.get("benchmarks", []):
        if b["name"].startswith("test_scaling"):
            rows_by_shape[b["extra_info"].get("shape", b["name"])] = b["extra_info"]["rows"]
    if not rows_by_shape:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100)
    for shape, rows in rows_by_shape.items():
        Ls = sorted({r["L"] for r in rows})
        Gs = sorted({r["G"] for r in rows})
        by_g = [r for r in rows if r["L"] == max(Ls)]
        by_l = [r for r in rows if r["G"] == max(Gs)]
        axes[0].plot([r["G"] for r in by_g], [r["seconds"] for r in by_g], "o-", label=shape)
        axes[1].plot([r["L"] for r in by_l], [r["seconds"] for r in by_l], "o-", label=shape)
    axes[0].set_xlabel("G (branches)")
    axes[1].set_xlabel("L (chunks)")
    for ax in axes:
        ax.set_ylabel("seconds / group iteration")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", help="pytest --benchmark-json output")
    ap.add_argument("--out", help="write the Markdown here (default: print)")
    ap.add_argument("--plot", help="PNG of the iteration scaling benchmark")
    args = ap.parse_args(argv)
    data = json.loads(Path(args.json).read_text())
    md = render(data)
    if args.out:
        Path(args.out).write_text(md)
    else:
        print(md)
    if args.plot and plot_scaling(data, Path(args.plot)):
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
