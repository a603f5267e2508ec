"""The toy world (arcopo_fast.toy.world), the teacher-forcing forward and the build pipeline (fast tests)."""

from __future__ import annotations

import json

import pytest
import torch

from arcopo_fast.toy import base, world


def test_scenes_are_a_pure_function_of_seed_and_index():
    a, b = world.scenes(3, 6), world.scenes(3, 6)
    assert a == b and [s.prompt for s in a] != [s.prompt for s in world.scenes(4, 6)]
    assert world.sample_scene(3, 4) == a[4]  # index addressing: no hidden sequential state
    torch.testing.assert_close(world.render(a[0]), world.render(b[0]), rtol=0, atol=0)
    v = world.render_batch(a[:2])
    assert v.shape == (2, world.FRAMES, 3, world.SIZE, world.SIZE) and v.min() >= 0 and v.max() <= 1


def test_prompts_name_the_scene_and_parse_back():
    for s in world.scenes(0, 40):
        assert world.parse_prompt(s.prompt).prompt == s.prompt
        assert set(s.prompt.split()) <= set(world.TOY_WORDS)
        labels = s.labels
        assert len(labels["shape"]) == len(s.objects) and labels["background"] == [list(world.BACKGROUNDS).index(s.background)]
    assert any(len(s.objects) == 2 for s in world.scenes(0, 40))
    assert all(len(s.objects) == 1 for s in world.scenes(0, 20, two_objects=0.0))
    with pytest.raises(ValueError, match="not a toy-world prompt"):
        world.parse_prompt("a red balloon drifting over a calm lake at sunset")
    with pytest.raises(ValueError, match="object phrase"):
        world.parse_prompt("a huge red circle moving left over a black background")
    with pytest.raises(ValueError, match="two_objects"):
        world.sample_scene(0, 0, two_objects=1.5)


def _centroid(video: torch.Tensor, colour: str) -> torch.Tensor:
    """[F, 2] (x, y) centroid of the pixels close to `colour`."""
    c = torch.tensor(world.COLOURS[colour]).view(1, 3, 1, 1)
    m = ((video - c).abs().amax(1) < 0.05).float()  # [F, H, W]
    ax = torch.arange(video.shape[-1], dtype=torch.float32) + 0.5
    n = m.sum((1, 2)).clamp_min(1)
    return torch.stack([(m.sum(1) * ax).sum(1) / n, (m.sum(2) * ax).sum(1) / n], dim=1)


def test_objects_move_the_prompted_way_and_stay_in_the_frame():
    for s in world.scenes(5, 30, two_objects=0.0):
        o = s.objects[0]
        v = world.render(s)
        cen = _centroid(v, o.colour)
        dx, dy = world.DIRECTIONS[o.direction]
        step = cen[8] - cen[0]  # the first quarter: no bounce yet (objects start in the half they leave)
        assert step[0] * dx + step[1] * dy > 4.0, (s.prompt, step)
        assert (step[0] * dy).abs() + (step[1] * dx).abs() < 0.5  # axis-aligned motion
        area = ((v - torch.tensor(world.COLOURS[o.colour]).view(1, 3, 1, 1)).abs().amax(1) < 0.05).sum((1, 2)).float()
        assert area.min() > 0.8 * area.max()  # never leaves the frame (bounces keep it whole)


def test_toy_tokenizer_keeps_every_world_word_whole(tmp_path):
    from transformers import AutoTokenizer

    from arcopo_fast.model.tiny_assets import build_tiny_text_encoder

    build_tiny_text_encoder(tmp_path / "te", extra_words=world.TOY_WORDS)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "te"))
    prompt = "a big white square moving up and a small yellow triangle moving right over a dark blue background"
    ids = tok(prompt).input_ids
    assert len(ids) == len(prompt.split()) + 1  # one token per word, plus </s>
    assert tok.unk_token_id not in ids


def test_teacher_forcing_forward_equals_streaming_with_a_clean_cache():
    """Noisy chunk c of the [clean ; noisy] forward sees exactly what the streaming sampler's forward sees
    with clean chunks < c committed to its KV cache (at timestep 0)."""
    from arcopo_fast.model.config import get_preset
    from arcopo_fast.model.kv_cache import KVCache
    from arcopo_fast.model.wan import CausalWanModel

    torch.manual_seed(0)
    cfg = get_preset("toy").replace(num_layers=2, init_std_head=0.05)
    model = CausalWanModel(cfg).eval()
    B, L, cf = 2, 3, cfg.chunk_frames
    clean = torch.randn(B, L * cf, 16, 4, 6)
    noisy = torch.randn(B, L * cf, 16, 4, 6)
    t = torch.rand(B, L).repeat_interleave(cf, dim=1) * 1000
    cross = model.encode_text(torch.randn(B, 5, cfg.text_dim))
    with torch.no_grad():
        tf = base.teacher_forcing_forward(model, clean, noisy, t, cross)
        cache = KVCache.for_model(cfg, rows=B, num_chunks=L, frame_tokens=model.frame_tokens(4, 6), device="cpu", dtype=torch.float32)
        for c in range(L):
            sl = slice(c * cf, (c + 1) * cf)
            ref = model(noisy[:, sl], t[:, sl], cross, cache)
            torch.testing.assert_close(tf[:, sl], ref, rtol=1e-4, atol=1e-4)
            if c < L - 1:
                model(clean[:, sl], torch.zeros(B), cross, cache, commit=True)
    mask = base.teacher_forcing_mask(6, 3, 2)
    assert mask.shape == (24, 24) and not mask[:12, 12:].any()  # clean tokens never see noisy ones


def test_ode_grid_holds_the_student_sigmas():
    sig = [1.0, 0.9375, 0.8333333, 0.625]
    grid, where = base.ode_grid(sig, 24)
    assert grid[0] == 1.0 and grid[-1] == 0.0 and all(a > b for a, b in zip(grid, grid[1:]))
    assert [grid[i] for i in where] == pytest.approx(sig)
    with pytest.raises(ValueError, match="first sigma"):
        base.ode_grid([0.9, 0.5], 10)


def test_channels_the_decoder_ignores_are_weighted_down_in_the_loss():
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(5, 3, 4, 2, 2, generator=g)
    lat[:, :, 1] *= 1e-3  # a squashed channel (build.renormalise_vae)
    w = base.dead_channel_weights(lat, weight=0.02)
    assert w.tolist() == pytest.approx([1.0, 0.02, 1.0, 1.0])
    pred, target = torch.randn(lat.shape, generator=g), torch.randn(lat.shape, generator=g)
    err = (pred - target).pow(2).mean(dim=(0, 1, 3, 4))
    assert float(base._weighted_mse(pred, target, None)) == pytest.approx(float(err.mean()), rel=1e-6)
    assert float(base._weighted_mse(pred, target, w)) == pytest.approx(float((err * w).sum() / w.sum()), rel=1e-6)


def test_motion_term_weighs_frame_to_frame_error_changes_inside_chunks_only():
    g = torch.Generator().manual_seed(1)
    target = torch.randn(2, 6, 3, 2, 2, generator=g)
    still = target + torch.randn(2, 1, 3, 2, 2, generator=g)  # the same error in every frame: no motion error
    assert float(base._motion_mse(still, target, 3, None)) == pytest.approx(0.0, abs=1e-12)
    jump = target.clone()
    jump[:, 3:] += 1.0  # an error that changes only across the chunk boundary (frames 2 -> 3): not counted
    assert float(base._motion_mse(jump, target, 3, None)) == pytest.approx(0.0, abs=1e-12)
    drift = target.clone()
    drift[:, 1] += 1.0  # frame 1 of chunk 0 off by 1: pairs (0, 1) and (1, 2) each differ by 1 everywhere
    d = drift - target
    dt = torch.cat([d[:, 1:3] - d[:, 0:2], d[:, 4:6] - d[:, 3:5]], dim=1)
    assert float(base._motion_mse(drift, target, 3, None)) == pytest.approx(float(dt.pow(2).mean()), rel=1e-6)
    w = torch.tensor([1.0, 0.0, 1.0])  # channel weights apply as in the frame term
    drift_dead = target.clone()
    drift_dead[:, 1, 1] += 1.0
    assert float(base._motion_mse(drift_dead, target, 3, w)) == pytest.approx(0.0, abs=1e-12)


def test_teacher_ema_gives_the_model_the_average_of_its_weights():
    model = torch.nn.Linear(2, 1, bias=False)
    ema = base._Ema(model, 0.9)
    start = model.weight.detach().clone()
    expect = start.clone()
    for n in range(1, 4):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update(model)
        d = min(0.9, (1 + n) / (10 + n))
        expect = d * expect + (1 - d) * model.weight.detach()
    ema.copy_to(model)
    torch.testing.assert_close(model.weight.detach(), expect)
    assert not torch.equal(expect, start + 3)  # not the last weights
    with pytest.raises(ValueError, match="ema decay"):
        base._Ema(model, 1.0)


@pytest.mark.slow
def test_build_smoke_runs_every_stage_and_writes_a_verifiable_manifest(tmp_path):
    from arcopo_fast.toy import assets
    from arcopo_fast.toy.build import Recipe, build

    out = tmp_path / "w"
    threads = torch.get_num_threads()
    man = build(out, Recipe.smoke(), log=lambda m: None, command="test")
    assert torch.get_num_threads() == threads  # the build's single thread is not left behind
    for f in ("text_encoder/config.json", "vae/config.json", "base_model.safetensors", "reward_ta.safetensors",
              "reward_vq.safetensors", "reward_mq.safetensors", "prompts.txt", "manifest.json"):
        assert (out / f).is_file(), f
    assert set(man["stages"]) == {"assets", "data", "rewards", "teacher", "ode", "student"}
    assert json.loads((out / "manifest.json").read_text())["seed"] == 0
    assert assets.verify(out) == []
    before = {f: h for f, h in man["sha256"].items() if not f.startswith("reward_")}
    again = build(out, Recipe.smoke(), log=lambda m: None, command="again", stages=("data", "rewards"))
    assert [r["command"] for r in again["runs"]] == ["test", "again"] and set(again["stages"]) == set(man["stages"])
    assert {f: h for f, h in again["sha256"].items() if not f.startswith("reward_")} == before
    assert again["sha256"] == man["sha256"]  # every stage seeds itself: a partial rebuild gives the same files
    with pytest.raises(ValueError, match="run together"):
        build(out, Recipe.smoke(), stages=("data", "teacher"))
    (out / "prompts.txt").write_text("tampered\n")
    assert assets.verify(out) == ["prompts.txt"]


def test_toy_cli_dispatches_subcommands(capsys):
    from arcopo_fast.toy.__main__ import COMMANDS, main

    assert main([]) == 2 and "usage" in capsys.readouterr().out
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    assert main(["nonsense"]) == 2 and "unknown command" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["build", "--help"])
    assert e.value.code == 0 and "--stages" in capsys.readouterr().out


def test_importing_the_toy_package_is_light():
    import subprocess
    import sys

    code = "import sys, arcopo_fast.toy, arcopo_fast.toy.world, arcopo_fast.toy.assets; print(sorted(m for m in ('matplotlib', 'tensorboard', 'diffusers', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
