"""arcopo_fast.compile_report: the sm_90 compile report built on a machine without a GPU, and the CI gate on it.

Every config the autotuners keep (and the fixed backward / neighbour configs) is compiled for
GPUTarget("cuda", 90) with the ptxas that triton ships. The gate: no register spills in a kept config, every
attention kernel issues wgmma (Hopper tensor cores), and the kernel-design targets of issue 15 hold
(forward 128x64 within 168 registers, dq with 64-key tiles, a one-launch neighbour forward, fp32 attention
on tensor cores), and the TMA kernels issue TMA copies. CI compiles the kept configs only (include_pruned=False; the pruned ones are the doctor's
and docs/performance.md's business), in parallel worker processes, each config once per session.
"""

from __future__ import annotations

import json
import pathlib
import re

import pytest

triton = pytest.importorskip("triton")
if not (pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
    pytest.skip("this triton install has no NVIDIA backend / ptxas", allow_module_level=True)

from arcopo_fast import compile_report as cr  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report() -> list[dict]:
    return cr.build_report(arch=90, include_pruned=False)


def _cfg(rec: dict) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"(BLOCK_M|BLOCK_N|BLOCK)=(\d+)", rec["config"])} | {
        "warps": int(re.search(r"\bw(\d+)", rec["config"]).group(1))
    }


def test_records_have_the_shared_fields(report):
    assert report
    for r in report:
        assert {"kernel", "config", "kept", "regs", "spills", "smem_bytes", "wgmma"} <= r.keys(), r
        assert r["kept"] is True  # include_pruned=False
        assert "error" not in r, r
        assert isinstance(r["regs"], int) and 0 < r["regs"] <= 255, r
    json.dumps(report)  # what doctor --compile-report --json writes
    kernels = {r["kernel"] for r in report}
    assert set(cr.ATTENTION_KERNELS) | {"bwd_delta", "chunk_fwd_combine", "neighbour_fwd", "neighbour_bwd"} <= kernels


def test_no_spills_in_kept_configs(report):
    spilling = [(r["kernel"], r["config"], r["spills"]) for r in report if r["spills"]]
    assert not spilling, spilling


def test_attention_kernels_use_wgmma(report):
    missing = [(r["kernel"], r["config"]) for r in report if r["kernel"] in cr.ATTENTION_KERNELS and not r["wgmma"]]
    assert not missing, missing


def test_kernel_design_targets(report):
    by = lambda name: [r for r in report if r["kernel"] == name]
    fwd_128x64 = [r for r in by("chunk_fwd") if _cfg(r)["BLOCK_M"] == 128 and _cfg(r)["BLOCK_N"] == 64]
    assert fwd_128x64, "the 128x64 forward config is no longer kept"
    assert max(r["regs"] for r in fwd_128x64) <= 168, fwd_128x64
    for name in ("chunk_dq", "block_causal_dq"):
        assert all(_cfg(r)["BLOCK_N"] >= 64 for r in by(name)), by(name)
    for name in ("chunk_dq", "block_causal_dq", "chunk_dkdv", "block_causal_dkdv"):  # the card times candidates
        assert len(by(name)) > 1 and len(by(name + "_tma")) > 1, name
    assert len(by("neighbour_fwd")) == 1, "the neighbour forward must be one kernel (one launch)"
    assert by("chunk_fwd_fp32") and all(r["wgmma"] for r in by("chunk_fwd_fp32"))
    # the neighbour kernels read their bf16 rows 16 bytes at a time (no 2- or 4-byte bf16 loads; the 4-byte
    # loads of the backward are its fp32 [A, G] inputs)
    for r in by("neighbour_fwd") + by("neighbour_bwd"):
        assert r["global_loads"].get("16", 0) > 0 and "2" not in r["global_loads"], r
    assert set(by("neighbour_fwd")[0]["global_loads"]) == {"16"}, by("neighbour_fwd")


def test_tma_kernels_use_tma_and_wgmma(report):
    """The TMA forward, dq and dk/dv of chunk and block-causal attention (kernels/block_attn_tma.py) load their
    tiles with TMA (cp.async.bulk.tensor in the PTX, UTMALDG in the SASS), store O / dq / dk, dv with TMA
    (UTMASTG; the split forward writes fp32 partials with plain stores), run their MMAs as wgmma; the chunk
    forward's 128x64 configs stay within its register budget, the block-causal forward's 128x64 configs and
    every dq and dk/dv take fewer registers than their pointer kernels; the pointer kernels issue no TMA."""
    for name in cr.TMA_KERNELS:
        recs = [r for r in report if r["kernel"] == name]
        assert recs, name
        for r in recs:
            assert r["wgmma"] and r["tma"]["load"] >= 4 and r["sass_tma"]["UTMALDG"] >= 4, r
            stores = r["tma"]["store"] >= 1 and r["sass_tma"]["UTMASTG"] >= 1
            assert stores == (name != "chunk_fwd_split_tma"), r
        pointer = [r for r in report if r["kernel"] == name.replace("_tma", "")]
        if "_dq" in name or "_dkdv" in name:  # every config both keep: fewer registers than the pointer kernel's
            regs = {r["config"]: r["regs"] for r in pointer}
            shared = [r for r in recs if r["config"] in regs]
            assert shared and all(r["regs"] < regs[r["config"]] for r in shared), (recs, pointer)
        else:
            tiles = [r for r in recs if _cfg(r)["BLOCK_M"] == 128 and _cfg(r)["BLOCK_N"] == 64]
            assert tiles and max(r["regs"] for r in tiles) <= 168, tiles
        if name == "block_causal_fwd_tma":  # same configs as the pointer forward, each with fewer registers
            regs = {r["config"]: r["regs"] for r in pointer}
            assert all(r["regs"] < regs[r["config"]] for r in tiles), (tiles, regs)
    pointer_kernels = ("chunk_fwd", "chunk_dq", "chunk_dkdv", "block_causal_fwd", "block_causal_dq",
                       "block_causal_dkdv")
    assert all(r["tma"] == {"load": 0, "store": 0} for r in report if r["kernel"] in pointer_kernels)


def test_pruned_configs_are_marked_and_a_bad_name_raises():
    with pytest.raises(ValueError, match="kernels must be names"):
        cr.build_report(kernels=["no_such_kernel"])
    specs = cr._all_specs()["chunk_fwd"]
    assert {s["kept"] for s in specs} == {True, False}  # some of the 24 configs are pruned at D = 128


@pytest.mark.skipif(not cr._find_nvcc(), reason="no nvcc: the CUDA sources are not compiled")
def test_cuda_sources_compile_without_spills():
    recs = cr.build_report(kernels=["cuda_ext"])
    assert recs and all("error" not in r for r in recs), recs
    assert all(r["spills"] == 0 for r in recs), recs


def test_format_table_lists_every_record(report):
    table = cr.format_table(report)
    assert table.count("\n") == len(report) + 1
