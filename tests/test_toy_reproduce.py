"""`python -m arcopo_fast.toy reproduce`: the verdict rules on hand-made numbers, and the whole harness
(runs, buffer, merge, evaluation, report) at the tiniest settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from arcopo_fast.toy import reproduce
from arcopo_fast.toy.reproduce import POLICIES, combine, judge, judge_all, paired, pooled

KEYS = ("total", "r/TA", "r/VQ", "r/MQ")


def _raw(shift: dict[str, dict[str, float]], spreads=(0.02, 0.005), n=6) -> dict:
    """Eval rows per policy: a per-video baseline plus a shift per metric; curves with the given spreads."""
    base = [{"total": 1.0 + 0.1 * i, "r/TA": 0.5 + 0.01 * i, "r/VQ": 0.3 - 0.01 * i, "r/MQ": 0.2 + 0.02 * (i % 2)} for i in range(n)]
    ev = {}
    for p in POLICIES:
        rows = []
        for i, b in enumerate(base):
            noise = 0.001 * ((i * 7 + len(p)) % 3 - 1)  # small, deterministic, paired noise
            rows.append({"prompt": f"p{i}", "seed": 0, **{k: b[k] + shift.get(p, {}).get(k, 0.0) + noise for k in KEYS}})
        ev[p] = {"rows": rows, "means": {k: sum(r[k] for r in rows) / n for k in KEYS}, "num_videos": n}
    curve = lambda s: [{"iteration": i, "reward/mean": 0.1 * i, "reward/group_std": s, "update/clip_frac": 0.1} for i in range(6)]  # noqa: E731
    return {
        "plan": {"ta_key": "r/TA", "quality_keys": ["r/VQ", "r/MQ"], "name": "unit", "seed": 0},
        "eval": ev,
        "curves": {"ar-copo": curve(spreads[0]), "sde-grpo": curve(spreads[1]), "ta-only": curve(0.01), "semi": curve(0.01), "semi-unclipped": curve(0.01)},
    }


PAPER = {
    "ar-copo": {"total": 0.3, "r/TA": 0.1},
    "sde-grpo": {"total": 0.05},
    "ta-only": {"r/TA": 0.2, "r/MQ": -0.1, "total": 0.1},
    "semi": {"total": 0.1},
    "semi-unclipped": {"r/VQ": -0.2, "r/MQ": -0.1, "total": -0.3},
    "merged": {"total": 0.35, "r/TA": 0.1},
}
OPPOSITE = {
    "ar-copo": {"total": -0.2},
    "sde-grpo": {"total": 0.3},
    "ta-only": {"r/TA": -0.1, "r/VQ": 0.1, "r/MQ": 0.1},
    "semi": {"r/VQ": -0.3, "total": -0.3},
    "semi-unclipped": {"r/VQ": 0.2, "r/MQ": 0.1},
    "merged": {"total": -0.4, "r/VQ": -0.5},
}


def test_paired_difference_and_standard_error_by_hand():
    ev = {"a": {"rows": [{"prompt": "x", "seed": 0, "m": 1.0}, {"prompt": "y", "seed": 0, "m": 2.0}, {"prompt": "z", "seed": 0, "m": 3.0}]},
          "b": {"rows": [{"prompt": "x", "seed": 0, "m": 2.0}, {"prompt": "y", "seed": 0, "m": 2.0}, {"prompt": "z", "seed": 0, "m": 6.0}]}}
    p = paired(ev, "a", "b", "m")  # differences 1, 0, 3: mean 4/3, sample var 7/3, se sqrt(7/9)
    assert p["diff"] == pytest.approx(4 / 3) and p["se"] == pytest.approx((7 / 9) ** 0.5) and p["n"] == 3
    ev["b"]["rows"][0]["seed"] = 1
    with pytest.raises(ValueError, match="same videos"):
        paired(ev, "a", "b", "m")


def test_paired_standard_error_is_over_prompts_not_videos():
    """Two videos per prompt: the prompt's differences are averaged first (videos of a prompt are not
    independent), so n is the number of prompts and a prompt's repeated videos do not shrink the SE."""
    rows = lambda vals: [{"prompt": f"p{i // 2}", "seed": 100 + i, "m": v} for i, v in enumerate(vals)]  # noqa: E731
    ev = {"a": {"rows": rows([0.0] * 6)}, "b": {"rows": rows([1.0, 3.0, 0.0, 0.0, 3.0, 5.0])}}
    p = paired(ev, "a", "b", "m")  # prompt means 2, 0, 4: mean 2, sample var 4, se sqrt(4/3)
    assert p["n"] == 3 and p["diff"] == pytest.approx(2.0) and p["se"] == pytest.approx((4 / 3) ** 0.5)


def test_every_prompt_is_evaluated_on_its_own_noises():
    ids = [reproduce.eval_noise_ids(i, 6) for i in range(32)]
    flat = [j for row in ids for j in row]
    assert len(set(flat)) == len(flat) == 192 and min(flat) == reproduce.EVAL_NOISE_ID0


def test_the_paper_s_pattern_reproduces_every_claim():
    raw = _raw(PAPER)
    claims = {c["id"]: c for c in judge(raw)}
    assert {k: c["verdict"] for k, c in claims.items()} == dict.fromkeys("abcde", "reproduced")
    assert claims["b"]["numbers"]["iterations_sde_spread_smaller"] == 6
    assert claims["d"]["numbers"]["r/MQ_change"]["diff"] == pytest.approx(-0.1, abs=0.01)
    assert "_quality_keys" not in raw["eval"]["base"]["rows"][0]  # judge leaves the rows as it found them


def test_the_opposite_pattern_reproduces_none():
    raw = _raw(OPPOSITE, spreads=(0.005, 0.02))
    assert [c["verdict"] for c in judge(raw)] == ["not"] * 5


def test_partial_patterns_are_called_partly():
    # ar-copo ahead of sde-grpo but within noise, while sde-grpo's spread is smaller: b partly
    raw = _raw({"ar-copo": {"total": 0.3}, "sde-grpo": {"total": 0.2995}})
    raw["eval"]["sde-grpo"]["rows"][0]["total"] += 0.05  # a noisy pair: the difference loses its 2 SE
    assert {c["id"]: c["verdict"] for c in judge(raw)}["b"] == "partly"


def test_changes_below_the_reward_resolution_are_not_moves():
    shift = {"ta-only": {"r/TA": 0.2, "r/MQ": -0.005}}
    raw = _raw(shift)
    assert {c["id"]: c["verdict"] for c in judge(raw)}["d"] == "reproduced"  # 5e-3 is > 2 SE here
    raw = _raw(shift)
    raw["plan"]["min_effect"] = 0.01
    claims = {c["id"]: c for c in judge(raw)}
    assert claims["d"]["verdict"] == "partly"  # ... but below a resolution of 0.01
    assert "ta-only r/MQ" not in claims["d"]["moved"] and "ta-only r/TA" in claims["d"]["moved"]


def _replicated(*shifts) -> dict:
    """A multi-replicate raw result (run_all's layout): one shared base evaluation, one replicate per shift."""
    views = [_raw(sh, spreads=(0.02, 0.005) if sh is PAPER else (0.005, 0.02)) for sh in shifts]
    return {"plan": views[0]["plan"], "eval_base": views[0]["eval"]["base"],
            "replicates": [{"seed": i, "eval": {k: v for k, v in view["eval"].items() if k != "base"},
                            "curves": view["curves"], "buffer_rewards": []} for i, view in enumerate(views)]}


def test_replicates_combine_into_one_verdict_per_claim():
    assert combine(["reproduced", "reproduced"]) == "reproduced"
    assert combine(["not", "not", "not"]) == "not"
    assert combine(["reproduced", "not"]) == combine(["partly", "partly"]) == combine(["not", "partly"]) == "partly"
    same = judge_all(_replicated(PAPER, PAPER))
    assert [c["verdict"] for c in same] == ["reproduced"] * 5
    assert [[r["seed"] for r in c["replicates"]] for c in same] == [[0, 1]] * 5
    mixed = judge_all(_replicated(PAPER, OPPOSITE))
    assert [c["verdict"] for c in mixed] == ["partly"] * 5
    assert [[r["verdict"] for r in c["replicates"]] for c in mixed] == [["reproduced", "not"]] * 5
    assert [c["verdict"] for c in judge_all(_replicated(OPPOSITE, OPPOSITE))] == ["not"] * 5


def test_pooled_change_averages_replicates_per_prompt_before_the_se():
    raw = _replicated(PAPER, OPPOSITE)
    p = pooled(raw, "ar-copo", "total")  # +0.3 and -0.2 on every prompt, plus the tiny paired noise
    assert p["n"] == 6 and p["diff"] == pytest.approx(0.05, abs=2e-3) and p["se"] < 1e-3
    one = [paired({"base": raw["eval_base"], "x": rep["eval"]["ar-copo"]}, "base", "x", "total")["diff"] for rep in raw["replicates"]]
    assert p["diff"] == pytest.approx(sum(one) / 2)
    q = pooled(raw, "semi-unclipped", "quality")  # quality = VQ + MQ of the plan's quality keys
    assert q["diff"] == pytest.approx((-0.3 + 0.3) / 2, abs=2e-3)
    raw["replicates"][1]["eval"]["ar-copo"]["rows"][0]["seed"] = 7
    with pytest.raises(ValueError, match="seed 1.*base's videos"):
        pooled(raw, "ar-copo", "total")


@pytest.mark.slow
def test_reproduce_command_writes_report_plot_and_numbers_at_the_tiniest_settings(tmp_path):
    out, work = tmp_path / "docs", tmp_path / "work"
    argv = ["--plan", "tiny", "--out", str(out), "--work", str(work), "--jobs", "1", "--iterations", "1", "--replicates", "2",
            "--semi-iterations", "1", "--buffer-groups", "1", "--eval-prompts", "2", "--eval-seeds", "1", "model.embed_cache_dir=null"]
    assert reproduce.main(argv) == 0
    data = json.loads((out / "toy_reproduction.json").read_text())
    assert [c["id"] for c in data["claims"]] == list("abcde")
    assert all(c["verdict"] in ("reproduced", "partly", "not") for c in data["claims"])
    assert all([r["seed"] for r in c["replicates"]] == [0, 1] for c in data["claims"])
    assert [rep["seed"] for rep in data["replicates"]] == [0, 1]
    assert data["eval_base"]["num_videos"] == 2 and len({r["seed"] for r in data["eval_base"]["rows"]}) == 2  # own noises
    for rep in data["replicates"]:
        assert set(rep["eval"]) == set(POLICIES[1:]) and all(r["num_videos"] == 2 for r in rep["eval"].values())
        assert all(len(rows) == 1 for rows in rep["curves"].values())
        assert rep["curves"]["sde-grpo"][0]["update/ratio_max_dev/epoch0"] < 1e-4  # went through the shared update
        # the merged weights differ from the base (W0 + dW_semi + s dW_on), and so do their eval numbers
        assert (work / f"seed{rep['seed']}" / "merged.safetensors").is_file()
        assert rep["eval"]["merged"]["means"] != data["eval_base"]["means"]
    # the replicates are different training runs: their groups (prompts, noises) and adapters differ
    a, b = (rep["curves"]["ar-copo"][0]["reward/mean"] for rep in data["replicates"])
    assert a != b
    md = (out / "toy_reproduction.md").read_text()
    for c in data["claims"]:
        assert f"**{c['verdict']}**" in md
    assert "| ar-copo | pooled |" in md
    assert (out / "toy_reproduction.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second invocation clears its own work folder; a foreign non-empty folder is refused
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    assert reproduce.main(["--plan", "tiny", "--work", str(foreign), "--out", str(out)]) == 2
    assert (foreign / "keep.txt").is_file()


def test_the_tiny_plan_does_not_write_over_the_toy_report(tmp_path, monkeypatch):
    """`toy reproduce --plan tiny` (the README's quick check) wrote its report into docs/, over the committed
    toy-world report, and cleared the toy plan's work folder: each plan now has its own default folders."""
    seen = {}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(reproduce, "run_all", lambda plan, work, jobs: seen.update(work=work) or {"seconds": {"total": 0}})
    monkeypatch.setattr(reproduce, "judge_all", lambda raw: [])
    monkeypatch.setattr(reproduce, "write_report", lambda raw, claims, out, stem, command: seen.update(out=out) or
                        {k: out / f"{stem}.{k}" for k in ("md", "png", "json")})
    for plan, out, work in (("tiny", "runs/tiny_reproduction", "runs/tiny_reproduce"), ("toy", "docs", "runs/toy_reproduce")):
        assert reproduce.main(["--plan", plan]) == 0
        assert (seen["out"], seen["work"]) == (Path(out), Path(work)), plan
