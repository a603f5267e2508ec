"""`python -m arcopo_fast.doctor` (report, --selftest, --bench --budget, --compile-report plumbing), the CUDA
arch list of the build (arcopo_fast/build_archs.py, CMakeLists.txt) and scripts/gpu_check.sh --dry-run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

from triton_env import INTERPRET  # first: sets TRITON_INTERPRET before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

from arcopo_fast import build_archs, doctor, ext, quickbench, selftest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clean_verdicts():
    selftest.reset()
    yield
    selftest.reset()


def _json(path):
    return json.loads(Path(path).read_text())


def test_report_names_versions_device_extension_and_backends(tmp_path, capsys):
    assert doctor.main(["--json", str(tmp_path / "d.json")]) == 0
    text = capsys.readouterr().out
    doc = _json(tmp_path / "d.json")
    assert doc["versions"]["torch"] == torch.__version__ and "diffusers" in doc["versions"]
    assert doc["device"]["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert doc["extension"]["built"] == ext.extension_loaded()
    assert doc["extension"]["archs"] == ext.extension_archs()
    assert set(doc["backends"]) >= {"chunk_attention", "consistency_step", "neighbour_logprobs", "kv_fork"}
    assert all(b.get("why") for b in doc["backends"].values())
    for word in ("arcopo_fast doctor", "torch " + torch.__version__, "extension arcopo_fast._C", "chunk_attention"):
        assert word in text
    md = doctor.markdown(doc)
    assert "| chunk_attention |" in md and "Extension:" in md


@pytest.mark.slow  # ~10 s: every Triton kernel family once in the interpreter
@pytest.mark.skipif(not INTERPRET, reason="the CPU self-test runs the kernels in the interpreter")
def test_selftest_passes_on_this_machine(tmp_path, capsys):
    assert doctor.main(["--selftest", "--device", "cpu", "--json", str(tmp_path / "s.json")]) == 0
    doc = _json(tmp_path / "s.json")
    seen = {(v["op"], v["backend"]) for v in doc["selftest"]}
    assert {("chunk_attention", "triton"), ("block_causal_attention", "triton"), ("qk_norm_rope", "triton"),
            ("consistency_step", "triton"), ("philox_normal", "triton"), ("neighbour_logprobs", "triton"),
            ("chunk_attention", "sdpa_math")} <= seen
    assert all(v["ok"] for v in doc["selftest"]) and doc["selftest_summary"]["failed"] == 0
    assert "0 failed" in capsys.readouterr().out


def test_selftest_failure_sets_the_exit_status(tmp_path, capsys, monkeypatch):
    from arcopo_fast.kernels import sampler_step

    monkeypatch.setattr(sampler_step, "philox_normal", lambda numel, k0, k1, c1, c2, c3: torch.zeros(c1.shape[0], numel))
    assert doctor.main(["--selftest", "--device", "cpu", "--ops", "philox_normal", "--json", str(tmp_path / "s.json")]) == 1
    out = capsys.readouterr().out
    assert "FAIL philox_normal" in out and "1 failed" in out
    (v,) = _json(tmp_path / "s.json")["selftest"]
    assert not v["ok"] and "exceeds" in v["error"]


def test_bench_stops_before_the_budget_and_keeps_finished_rows(tmp_path, capsys, monkeypatch):
    path = tmp_path / "b.json"
    assert doctor.main(["--bench", "--budget", "4", "--device", "cpu", "--json", str(path)]) == 0
    rows = _json(path)["bench"]
    fwd = {r["impl"]: r for r in rows if r.get("item") == "chunk_attention_fwd" and "ms" in r}
    assert {"torch", "sdpa_math"} <= set(fwd) and all(r["ms"] > 0 for r in fwd.values())
    assert [r for r in rows if r.get("item") == "kv_fork" and r.get("impl") == "kv_fork"][0]["ratio"] > 0
    skipped = [r["item"] for r in rows if "skipped" in r]
    assert "iteration" in skipped  # estimated beyond the 4 s budget: stopped before, not killed during
    assert "chunk_attention_fwd" in capsys.readouterr().out

    # an interrupted run (a time box) keeps the rows already written
    def interrupted(ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(quickbench.ITEMS[1], "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        doctor.main(["--bench", "--budget", "4", "--device", "cpu", "--json", str(path)])
    rows = _json(path)["bench"]
    assert {r["item"] for r in rows} == {"chunk_attention_fwd"} and any("ms" in r for r in rows)


def test_bench_video_item_streams_through_the_pipeline(tmp_path, tiny_assets):
    """The end-to-end video item (also benchmarks/bench_e2e.py) builds a StreamingPipeline around the setup's
    sampler: it had kept the constructor of the class's old name and failed with a TypeError on every device."""
    path = tmp_path / "v.json"
    assert doctor.main(["--bench", "--budget", "60", "--device", "cpu", "--ops", "video", "--json", str(path)]) == 0
    rows = _json(path)["bench"]
    assert not [r for r in rows if "error" in r], rows
    (row,) = [r for r in rows if "impl" in r]
    assert row["fps_e2e"] > 0 and row["frames"] == 33, row


def test_compile_report_plumbing(tmp_path, capsys, monkeypatch):
    """--compile-report calls arcopo_fast.compile_report.build_report(arch=90) lazily and writes its records
    as a JSON list; without the module (or without --json) it says so and exits 2."""
    calls = []
    records = [{"kernel": "_chunk_attn_fwd_kernel", "config": "BLOCK_M=128,BLOCK_N=64,w8,s3", "kept": True,
                "regs": 168, "spills": 0, "smem_bytes": 81920, "wgmma": True}]
    fake = types.ModuleType("arcopo_fast.compile_report")
    fake.build_report = lambda *, arch=90, kernels=None: calls.append((arch, kernels)) or records
    monkeypatch.setitem(sys.modules, "arcopo_fast.compile_report", fake)
    out = tmp_path / "r" / "report.json"
    assert doctor.main(["--compile-report", "--json", str(out)]) == 0
    assert _json(out) == records and calls == [(90, None)]
    assert "_chunk_attn_fwd_kernel" in capsys.readouterr().out
    assert doctor.main(["--compile-report"]) == 2
    monkeypatch.setitem(sys.modules, "arcopo_fast.compile_report", None)  # not installed
    assert doctor.main(["--compile-report", "--json", str(out)]) == 2
    assert "needs arcopo_fast/compile_report.py" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# the CUDA arch list of the build
# ---------------------------------------------------------------------------------------------------------


def test_arch_list_precedence():
    caps = ["8.6"]
    assert build_archs.choose({"TORCH_CUDA_ARCH_LIST": "8.0 9.0+PTX"}, caps, (13, 0)) == (
        "8.0;9.0+PTX", "$TORCH_CUDA_ARCH_LIST")
    assert build_archs.choose({"ARCOPO_CUDA_ARCH_LIST": "9.0", "TORCH_CUDA_ARCH_LIST": "8.0"}, caps, None)[0] == "9.0"
    assert build_archs.choose({}, ["9.0"], (13, 0)) == ("9.0", "the visible GPU")
    assert build_archs.choose({}, ["8.0", "9.0"], (13, 0))[0] == "8.0;9.0"
    assert build_archs.choose({}, [], (12, 4)) == ("8.0;8.6;8.9;9.0+PTX", "no visible GPU: portable list")
    assert build_archs.choose({}, [], (13, 0))[0] == "8.0;8.6;8.9;9.0;10.0;12.0+PTX"
    with pytest.raises(ValueError, match="'sm_90' is not of the form"):
        build_archs.choose({"TORCH_CUDA_ARCH_LIST": "sm_90"}, caps, None)


def test_arch_script_as_cmake_runs_it():
    env = {**os.environ, "TORCH_CUDA_ARCH_LIST": "8.9;9.0"}
    out = subprocess.run([sys.executable, str(ROOT / "arcopo_fast" / "build_archs.py")], capture_output=True,
                         text=True, env=env, check=True).stdout.strip()
    assert out == "8.9;9.0|$TORCH_CUDA_ARCH_LIST"


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_install_without_a_compiler_is_python_only(tmp_path):
    """No C++ compiler: the build succeeds with a warning and a wheel without arcopo_fast._C (whose absence
    kv_fork_ then reports with one warning: tests/test_kv_fork.py)."""
    import zipfile

    pytest.importorskip("scikit_build_core")
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler")}
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps", str(ROOT),
                        "-w", str(tmp_path / "w"), f"-Cbuild-dir={tmp_path / 'build'}"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "no C++ compiler found" in r.stdout + r.stderr
    (wheel,) = (tmp_path / "w").glob("arcopo_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "arcopo_fast/kernels/block_attn.py" in names and "arcopo_fast/doctor.py" in names
    assert not [n for n in names if "/_C." in n]


def test_extension_records_its_archs():
    if not ext.extension_loaded():
        pytest.skip("extension not built")
    archs = ext.extension_archs()
    if ext.extension_has_cuda():
        assert archs and all(build_archs._ENTRY.match(a) for a in archs.split(";"))
    else:
        assert archs == ""


# ---------------------------------------------------------------------------------------------------------
# scripts/gpu_check.sh
# ---------------------------------------------------------------------------------------------------------


def _gpu_check(tmp_path, *args, **env):
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), *args, str(out)], capture_output=True,
                       text=True, env={**os.environ, "PYTHON": sys.executable, **env}, timeout=300)
    return r, out


@pytest.mark.slow  # ~25-35 s: five Python processes, each importing torch
def test_gpu_check_dry_run(tmp_path):
    r, out = _gpu_check(tmp_path, "--dry-run")
    assert r.returncode == 0, r.stdout + r.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == ["bench.json", "bench_doctor.json", "doctor.json", "log.txt", "performance.md", "selftest.json",
                     "tests.xml"]
    assert len(files) <= 8  # what the device tool brings back
    page = (out / "performance.md").read_text()
    for phase in ("doctor", "selftest", "bench", "tests", "benchmarks"):
        assert f"| {phase} | rc 0 |" in page
    assert "Self-test: 4 passed, 0 failed" in page and "| kv_fork | kv_fork |" in page
    assert "test_fork_cpu_tiny[kv_fork]" in page
    assert _json(out / "selftest.json")["selftest_summary"] == {"passed": 4, "failed": 0}


def test_gpu_check_out_of_time_still_writes_the_page(tmp_path):
    r, out = _gpu_check(tmp_path, "--dry-run", ARCOPO_CHECK_SECONDS="20")
    assert r.returncode == 1, r.stdout + r.stderr  # no self-test ran: not a pass
    page = (out / "performance.md").read_text()
    assert "| doctor | skipped | 0 | no time left |" in page and "| benchmarks | skipped |" in page
    assert "no bench.json" in page


def test_arch_list_covers_arch_specific_and_ptx_builds():
    assert doctor.arch_list_covers("9.0a", "9.0")  # the card's TORCH_CUDA_ARCH_LIST (measured on an H200)
    assert doctor.arch_list_covers("8.0;8.6;9.0", "9.0")
    assert doctor.arch_list_covers("8.0;8.6+PTX", "9.0")  # PTX JIT-compiles forward
    assert doctor.arch_list_covers("10.0f", "10.0")
    assert not doctor.arch_list_covers("8.0;8.6", "9.0")
    assert not doctor.arch_list_covers("9.0+PTX", "8.6")  # PTX never runs backward


def test_bench_video_item_runs_on_cpu(tiny_assets):
    # The video item builds a StreamingPipeline around the benchmark's sampler: an error row (e.g. a
    # constructor called with another signature) would only show up in the report, never as a failure.
    rows = quickbench.run(torch.device("cpu"), 60.0, only=["video"])
    assert not [r for r in rows if "error" in r or "skipped" in r], rows
    row = next(r for r in rows if r.get("impl") == "torch")
    assert row["frames"] > 0 and row["fps_e2e"] > 0 and row["dit_s"] > 0
