"""scripts/render_performance.py turns pytest-benchmark JSON into Markdown tables and a scaling plot."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location("render_performance", ROOT / "scripts" / "render_performance.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_render_tables_and_plot(tmp_path):
    data = {
        "datetime": "2026-11-25T00:00:00",
        "machine_info": {"node": "box", "python_version": "3.11"},
        "commit_info": {"id": "abcdef1234567", "dirty": False},
        "benchmarks": [
            {"fullname": "benchmarks/bench_step.py::test_step[1]", "name": "test_step[1]", "stats": {"median": 1e-5},
             "extra_info": {"device_us": 7.5, "gbps": 1234.5}},
            {"fullname": "benchmarks/bench_iteration.py::test_scaling[tiny]", "name": "test_scaling[tiny]",
             "stats": {"median": 0.1}, "extra_info": {"shape": "tiny", "rows": [
                 {"G": 4, "L": 3, "seconds": 1.0}, {"G": 8, "L": 3, "seconds": 1.8}, {"G": 8, "L": 5, "seconds": 2.9}]}},
        ],
    }
    src = tmp_path / "b.json"
    src.write_text(json.dumps(data))
    mod = _load()
    out, png = tmp_path / "r.md", tmp_path / "s.png"
    assert mod.main([str(src), "--out", str(out), "--plot", str(png)]) == 0
    md = out.read_text()
    assert "| test_step[1] | 0.010 | 7.5 | 1234.5 |" in md
    assert "| G | L | seconds |" in md and "abcdef1234" in md
    assert png.stat().st_size > 1000
