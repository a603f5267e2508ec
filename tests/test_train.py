"""The trainer end to end on CPU: resume equivalence, semi-on-policy replay, merge arithmetic, failures that
lose nothing, Ctrl-C, the CLIs, and a 2-rank gloo run."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from arcopo_fast import adapters, checkpointing
from arcopo_fast.config import load_config
from arcopo_fast.rewards import RewardError
from arcopo_fast.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


def tiny(out: Path, *extra: str) -> list[str]:
    return [
        "sampler.num_chunks=2",
        "sampler.latent_height=4",
        "sampler.latent_width=4",
        "algo.group_size=4",
        "algo.num_anchors=2",
        "run.groups_per_rank=1",
        "run.micro_batch=4",
        "run.progress=false",
        "run.sample_videos=false",
        "run.checkpoint_every=1",
        "optim.lr=0.02",
        "adapter.rank=4",
        "adapter.alpha=8",
        "model.embed_cache_dir=null",
        "reward.rewards=[{name: 'reward_helpers:MeanRed'}]",
        f"run.out_dir={out}",
        *extra,
    ]


def train(out: Path, *extra: str, resume=None) -> tuple[dict, Trainer]:
    cfg = load_config("tiny", None, tiny(out, *extra))
    t = Trainer(cfg, resume=resume)
    return t.run(), t


def metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


DETERMINISTIC = lambda row: {k: v for k, v in row.items() if not k.startswith(("time/", "mem/", "branch_videos"))}


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, caplog):
    a, b = tmp_path / "a", tmp_path / "b"
    train(a, "run.iterations=3")
    train(b, "run.iterations=2")
    summary, _ = train(b, "run.iterations=3", resume=True)
    assert summary["iterations"] == 3
    ma, mb = metrics(a), metrics(b)
    assert [r["iteration"] for r in mb] == [0, 1, 2]
    assert DETERMINISTIC(ma[2]) == DETERMINISTIC(mb[2])
    wa = load_file(str(checkpointing.resolve(a) / "trainable.safetensors"))
    wb = load_file(str(checkpointing.resolve(b) / "trainable.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    state = checkpointing.read_state(b)
    assert state["iteration"] == 3 and state["adapter"] == "on" and state["data_cursor"] == 3
    # a resume below the iterations done is refused before anything is written; at them it says so
    with pytest.raises(ValueError, match=r"run.iterations=2 is below the 3 iterations .* run.iterations=3 or more"):
        train(b, "run.iterations=2", resume=True)
    assert "iterations: 3" in (b / "config.yaml").read_text()
    with caplog.at_level(logging.INFO, logger="arcopo_fast"):
        assert train(b, "run.iterations=3", resume=True)[0]["iterations"] == 3
    assert "the run has done all run.iterations=3; raise run.iterations" in caplog.text
    # the first update of an iteration is exactly on-policy: ratio 1, nothing clipped
    assert all(r["update/ratio_max_dev/epoch0"] < 1e-4 and r["update/clip_frac/epoch0"] == 0 for r in ma)
    # the run directory holds what a user needs
    for f in ("config.yaml", "run_info.json", "base_model.safetensors", "reward_curve.png"):
        assert (a / f).is_file(), f
    assert (checkpointing.resolve(a) / "adapter" / adapters.ADAPTER_FILE).is_file()


def test_semi_on_policy_trains_the_semi_adapter_from_a_collected_buffer(tmp_path, capsys):
    buf = tmp_path / "buffer"
    summary, t = train(tmp_path / "semi", "run.mode=semi-on-policy", f"replay.buffer={buf}", "replay.buffer_groups=3",
                       "run.iterations=3", "replay.groups_per_iteration=2", "optim.lr=0.5", "algo.pivot_min=1")
    idx = json.loads((buf / "index.json").read_text())
    assert len(idx["groups"]) == 3 and all(len(g["rewards"]) == 4 for g in idx["groups"])
    assert checkpointing.read_state(tmp_path / "semi")["adapter"] == "semi"
    rows = metrics(tmp_path / "semi")
    assert rows[0]["update/ratio_max_dev/epoch0"] < 1e-4  # pi_theta = pi_ref before any step
    assert any(r["update/clip_frac"] > 0 for r in rows)  # the ratio left the trust region and was clipped
    assert all(torch.isfinite(torch.tensor(r["update/loss"])) for r in rows)
    # the prefix cache is rebuilt with the adapters DISABLED (reference weights), not the trained ones
    for n, p in t.model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.5)
    samples, crosses, _ = t.replay_groups(0)
    s = samples[0]
    with torch.no_grad(), adapters.adapters_disabled(t.model):
        ref = t.engine.rebuild_prefix_cache(crosses[0], s.prefix_latents)
    with torch.no_grad():
        tuned = t.engine.rebuild_prefix_cache(crosses[0], s.prefix_latents)
    assert s.pivot > 0  # algo.pivot_min=1: every group has a prefix
    assert torch.equal(s.prefix_cache._s.k[0][:, : s.prefix_cache.length], ref._s.k[0][:, : ref.length])
    assert not torch.allclose(s.prefix_cache._s.k[0][:, : s.prefix_cache.length], tuned._s.k[0][:, : tuned.length])
    # a buffer collected with other settings is refused (its pi_old was taken at another temperature, too)
    with pytest.raises(ValueError, match="other settings"):
        train(tmp_path / "semi2", "run.mode=semi-on-policy", f"replay.buffer={buf}", "algo.group_size=3", "run.iterations=1",
              "algo.pivot_min=1")
    with pytest.raises(ValueError, match="other settings.*tau"):
        train(tmp_path / "semi3", "run.mode=semi-on-policy", f"replay.buffer={buf}", "algo.tau_auto_scale=0.5",
              "run.iterations=1", "algo.pivot_min=1")
    # collecting again into it is refused (hours of rollouts at full size) unless --overwrite, which replaces it
    from arcopo_fast.collect import main as collect_main

    again = ["--preset", "tiny", *tiny(tmp_path / "unused", f"replay.buffer={buf}", "replay.buffer_groups=2", "algo.pivot_min=1")]
    index = (buf / "index.json").read_text()
    assert collect_main(again) == 2 and (buf / "index.json").read_text() == index
    assert "already holds a replay buffer" in capsys.readouterr().err
    assert collect_main([*again, "--overwrite"]) == 0
    assert sorted(f.name for f in buf.glob("group_*")) == ["group_000000.safetensors", "group_000001.safetensors"]
    assert len(json.loads((buf / "index.json").read_text())["groups"]) == 2


def test_merge_writes_w0_plus_semi_plus_scaled_on(tmp_path):
    from arcopo_fast.merge import main as merge_main
    from arcopo_fast.model.checkpoint import load_model

    run = tmp_path / "on"
    train(run, "run.iterations=1")
    base = run / "base_model.safetensors"
    on_dir = checkpointing.resolve(run) / "adapter"
    # a second, different adapter plays the semi-on-policy one
    semi_dir = tmp_path / "semi_adapter"
    m = load_model(base)
    adapters.add_lora(m, "semi", rank=4, alpha=8, target_modules=load_config().adapter.target_modules)
    for n, p in m.named_parameters():
        if "lora_" in n:
            p.data.normal_(0, 0.1)
    adapters.save_adapter(m, "semi", semi_dir)
    out = tmp_path / "merged.safetensors"
    assert merge_main(["--base", str(base), "--semi", str(semi_dir), "--on", str(run), "--scale", "0.8", "--out", str(out)]) == 0
    merged = load_model(out).state_dict()
    w0 = load_file(str(base))
    on = adapters.read_adapter(on_dir)[1]
    semi = adapters.read_adapter(semi_dir)[1]
    key = "blocks.0.self_attn.q"
    d_on = on[f"{key}.lora_B.weight"] @ on[f"{key}.lora_A.weight"] * (8 / 4)
    d_semi = semi[f"{key}.lora_B.weight"] @ semi[f"{key}.lora_A.weight"] * (8 / 4)
    assert d_on.abs().max() > 0 and d_semi.abs().max() > 0
    torch.testing.assert_close(merged[f"{key}.weight"], w0[f"{key}.weight"] + d_semi + 0.8 * d_on, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merged["head.head.weight"], w0["head.head.weight"])  # untouched by LoRA
    # generating with the adapters loaded at their scales equals generating from the merged weights
    from arcopo_fast.pipeline import load_generator

    kw = dict(embed_cache_dir=None)
    with_adapters = load_generator(checkpoint=str(base), adapters_spec=[(str(semi_dir), 1.0), (str(on_dir), 0.8)], **kw)
    from_merged = load_generator(checkpoint=str(out), **kw)
    for gen in (with_adapters, from_merged):
        gen.lat = gen.sampler.generate(gen.cross(["a red kite"]), num_chunks=2, latent_hw=(4, 4))
    torch.testing.assert_close(with_adapters.lat, from_merged.lat, rtol=1e-4, atol=1e-4)
    base_gen = load_generator(checkpoint=str(base), **kw)
    assert not torch.allclose(base_gen.sampler.generate(base_gen.cross(["a red kite"]), num_chunks=2, latent_hw=(4, 4)), from_merged.lat, atol=1e-3)


@pytest.mark.parametrize("mode,match", [("nan", "NaN|non-finite"), ("shape", "shape"), ("raise", "reward server unavailable")])
def test_a_failing_reward_is_reported_by_name_and_the_checkpoint_is_kept(tmp_path, mode, match):
    out = tmp_path / mode
    counter = tmp_path / f"{mode}.count"
    bad = f"reward.rewards=[{{name: 'reward_helpers:FailAfter', kwargs: {{ok_calls: 2, mode: {mode}, counter: '{counter}'}}}}]"
    with pytest.raises(RewardError, match=match) as info:
        train(out, "run.iterations=4", bad)
    assert "FailAfter" in str(info.value) or "fail_after" in str(info.value).lower()
    assert checkpointing.read_state(out)["iteration"] == 2  # iterations 0 and 1 completed and saved
    assert len(metrics(out)) == 2
    if mode == "nan":  # fix the reward and resume: the run continues from its checkpoint
        summary, _ = train(out, "run.iterations=3", resume=True)
        assert summary["iterations"] == 3 and [r["iteration"] for r in metrics(out)] == [0, 1, 2]


def test_bad_config_and_missing_checkpoint_errors(tmp_path):
    from arcopo_fast.train import main

    assert main(["algo.group_size=1"]) == 2
    assert main(["--resume", str(tmp_path / "nothing")]) == 2
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpointing.resolve(tmp_path / "nothing")


def _env():
    env = dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    env.pop("ARCOPO_BACKEND", None)
    return env


def test_ctrl_c_writes_a_checkpoint_then_resume_continues(tmp_path):
    out = tmp_path / "int"
    cmd = [sys.executable, "-m", "arcopo_fast.train", *tiny(out, "run.iterations=1000", "run.checkpoint_every=1000")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, stdout
    state = checkpointing.read_state(out)
    assert state["iteration"] == len(metrics(out)) >= 1
    assert '"interrupted": true' in stdout
    assert f"checkpoint written: continue with --resume {out}" in stdout  # says how to go on


def test_evaluate_wants_noise_ids_for_every_prompt():
    from arcopo_fast.evaluate import evaluate

    kw = dict(pipeline=None, reward_specs=[], height=64, width=64, num_frames=9)
    with pytest.raises(ValueError, match="seeds: need noise ids for every prompt"):
        evaluate(prompts=["a", "b"], seeds=[[1, 2]], **kw)  # per-prompt lists: one list per prompt
    with pytest.raises(ValueError, match="seeds: need noise ids for every prompt"):
        evaluate(prompts=["a"], seeds=[], **kw)


def test_evaluate_names_bad_inputs_and_leaves_no_folder(tmp_path, capsys):
    from arcopo_fast.evaluate import main as eval_main

    (tmp_path / "empty.json").write_text("{}")
    (tmp_path / "rows.jsonl").write_text('{"a": 1}\n{"a": 2}\n')
    out = tmp_path / "out"
    for bad, message in (("empty.json", "is not a results.json"), ("rows.jsonl", "is not JSON"), ("none.json", "does not exist")):
        assert eval_main(["--compare", str(tmp_path / bad), str(tmp_path / bad), "--out", str(out)]) == 2
        assert f"--compare: {tmp_path / bad} {message}" in capsys.readouterr().err
    assert eval_main(["--prompts", str(tmp_path / "none.txt"), "--out", str(out)]) == 2
    assert f"--prompts: {tmp_path / 'none.txt'} does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_main(["--seeds", "0,a", "--out", str(out)])
    assert "argument --seeds: expected a comma list of integers, got '0,a'" in capsys.readouterr().err
    assert not out.exists()


def test_sample_and_evaluate_clis(tmp_path):
    from arcopo_fast.evaluate import main as eval_main
    from arcopo_fast.sample import main as sample_main
    from arcopo_fast.video_io import read_mp4

    mp4 = tmp_path / "v.mp4"
    assert sample_main(["--prompt", "a red balloon", "--out", str(mp4), "--num-frames", "21", "--height", "32", "--width", "32"]) == 0
    frames, fps = read_mp4(mp4)
    assert frames.shape[0] == 21 and fps == 16
    ev = tmp_path / "eval"
    assert eval_main(["--out", str(ev), "--num-frames", "9", "--height", "32", "--width", "32", "--rewards", "brightness,flicker"]) == 0
    res = json.loads((ev / "results.json").read_text())
    assert res["num_videos"] == 4 and "brightness/score" in res["means"] and "total" in res["means"]
    assert (ev / "results.md").read_text().startswith("| metric |")
    assert eval_main(["--out", str(tmp_path / "cmp"), "--compare", str(ev / "results.json"), str(ev / "results.json")]) == 0
    assert "Change" in (tmp_path / "cmp" / "comparison.md").read_text()


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_two_rank_gloo_run(tmp_path, kind):
    out = tmp_path / kind
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",  # a free port: runs may overlap
           "-m", "arcopo_fast.train", *tiny(out, "run.iterations=2", f"adapter.kind={kind}", "run.device=cpu")]
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = metrics(out)
    assert len(rows) == 2 and all(len(r["pivots"]) == 2 for r in rows)  # one group per rank, gathered
    assert checkpointing.read_state(out)["world_size"] == 2


def test_non_finite_loss_skips_the_step_and_leaves_the_weights_alone(tmp_path):
    cfg = load_config("tiny", None, tiny(tmp_path / "nf", "run.iterations=0"))
    t = Trainer(cfg)
    pool = __import__("concurrent.futures").futures.ThreadPoolExecutor(1)
    samples, crosses, _ = t.rollout_groups(0, pool)
    samples[0].x0_old[:, :, 0, 0, 0, 0] = float("nan")  # poisons every distance -> NaN loss
    before = {n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}
    out = t.update(0, samples, crosses)
    assert out["skipped_steps"] == cfg.algo.epochs
    assert all(torch.equal(before[n], p) for n, p in t.model.named_parameters() if p.requires_grad)


def test_update_reads_the_device_once_per_step_and_once_for_the_logs(tmp_path, monkeypatch):
    # Each optimizer step needs one host read (apply or skip it); the logged numbers are read back once, at
    # the end: a read per statistic after each step would stall the next epoch behind the optimizer.
    cfg = load_config("tiny", None, tiny(tmp_path / "s", "run.iterations=0", "algo.epochs=3"))
    t = Trainer(cfg)
    pool = __import__("concurrent.futures").futures.ThreadPoolExecutor(1)
    samples, crosses, _ = t.rollout_groups(0, pool)
    reads = []  # host reads made by the trainer's own code (torch's CPU-side optimizer bookkeeping aside)

    def counted(name):
        real = getattr(torch.Tensor, name)

        def read(self, *a):
            if sys._getframe(1).f_code.co_filename.endswith(os.path.join("arcopo_fast", "trainer.py")):
                reads.append(name)
            return real(self, *a)

        return read

    for name in ("__float__", "__bool__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    out = t.update(0, samples, crosses)
    monkeypatch.undo()
    assert len(reads) == cfg.algo.epochs + 1, reads
    assert out["skipped_steps"] == 0 and out["update/grad_norm"] == out["update/grad_norm/epoch2"]
    assert {f"update/{k}/epoch{e}" for k in ("loss", "kl", "clip_frac") for e in range(3)} <= set(out)


def test_observability_outputs(tmp_path):
    out = tmp_path / "obs"
    summary, _ = train(out, "run.iterations=2", "run.tensorboard=true", "run.sample_videos=true", "run.profile=true")
    assert any((out / "tensorboard").iterdir())
    for f in ("samples/before.mp4", "samples/after.mp4", "samples/before.png", "profile/iteration1.json"):
        assert (out / f).is_file(), f
    # the sample videos are scored with the training reward: a paired before/after measure in the summary
    scores = json.loads((out / "samples" / "scores.json").read_text())
    assert scores["before"]["iteration"] == 0 and scores["after"]["iteration"] == 2
    assert set(scores["after"]) == {"iteration", "reward", "MeanRed/red"}
    assert summary["samples_reward_before"] == scores["before"]["reward"] != summary["samples_reward_after"]
    row = metrics(out)[-1]
    for key in ("reward/mean", "reward/std", "reward/MeanRed/red/mean", "adv/abs_mean", "update/ratio_mean", "update/clip_frac",
                "update/loss", "update/grad_norm", "lr", "pivots", "tau/mean", "time/rollout", "time/update",
                "branch_videos_per_s", "mem/peak_gb", "update/kl"):
        assert key in row, key


def test_compiled_rollouts_train_like_eager_ones(tmp_path):
    """sampler.compile traces the LoRA-wrapped (peft) model's forward fullgraph; the run's metrics match the
    eager run (the 'eager' backend runs the traced graphs as they are: same numbers, no code generation)."""
    import torch._dynamo

    torch._dynamo.reset()
    train(tmp_path / "eager", "run.iterations=2")
    train(tmp_path / "compiled", "run.iterations=2", "sampler.compile=default", "sampler.compile_backend=eager")
    torch._dynamo.reset()
    for a, b in zip(metrics(tmp_path / "eager"), metrics(tmp_path / "compiled"), strict=True):
        a, b = DETERMINISTIC(a), DETERMINISTIC(b)
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], float):
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
            else:
                assert a[k] == b[k], k


def test_lora_factors_do_not_depend_on_earlier_random_draws(tmp_path):
    """A run from a checkpoint draws its LoRA factors from run.seed, not from whatever consumed the global RNG
    before the Trainer was built (the reproduce harness builds several trainers in one process)."""
    from model_helpers import make_tiny_model

    from arcopo_fast.model.checkpoint import save_model

    save_model(make_tiny_model(), tmp_path / "base.safetensors")
    factors = []
    for i, junk in enumerate((0, 17)):
        torch.randn(junk)  # other code drew random numbers first
        t = Trainer(load_config("tiny", None, tiny(tmp_path / f"r{i}", "run.iterations=0", f"model.checkpoint={tmp_path / 'base.safetensors'}")))
        factors.append({k: v.clone() for k, v in t.model.state_dict().items() if "lora_A" in k})
        t.close()
    assert factors[0].keys() and factors[0].keys() == factors[1].keys()
    assert all(torch.equal(factors[0][k], factors[1][k]) for k in factors[0])
