"""Training configuration: presets, files, overrides, validation messages that name the field."""

from __future__ import annotations

import pytest

from arcopo_fast.config import TrainConfig, load_config, parse_override


def test_default_preset_is_valid_and_round_trips(tmp_path):
    cfg = load_config()
    assert cfg.model.preset == "toy" and cfg.algo.group_size >= 2
    cfg.save(tmp_path / "c.yaml")
    again = load_config(config_file=str(tmp_path / "c.yaml"))
    assert again.to_dict() == cfg.to_dict()


def test_overrides_and_files(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("algo:\n  group_size: 6\nreward:\n  rewards:\n    - {name: color, weight: 2.0, kwargs: {target: [1, 0, 0]}}\n")
    cfg = load_config("tiny", str(f), ["algo.num_anchors=3", "algo.tau=0.25", "algo.steps=[0,2]", "run.fork=zero_copy", "algo.quasi_norm_q=0.8"])
    assert cfg.algo.group_size == 6 and cfg.algo.num_anchors == 3 and cfg.algo.tau == 0.25
    assert cfg.algo.steps == (0, 2) and cfg.run.fork == "zero_copy" and cfg.algo.quasi_norm_q == 0.8
    assert cfg.reward.rewards[0].name == "color" and cfg.reward.rewards[0].kwargs == {"target": [1, 0, 0]}
    assert parse_override("optim.lr=1e-4") == (["optim", "lr"], 1e-4)


@pytest.mark.parametrize(
    "override,field",
    [
        ("algo.group_size=1", "algo.group_size"),
        ("algo.perturb_scale=1.0", "algo.perturb_scale"),
        ("algo.num_anchors=99", "algo.num_anchors"),
        ("algo.clip_eps=0", "algo.clip_eps"),
        ("algo.tau=-1", "algo.tau"),
        ("algo.tau_auto_scale=0", "algo.tau_auto_scale"),
        ("algo.tau_auto_scale=.inf", "algo.tau_auto_scale"),
        ("algo.steps=[7]", "algo.steps"),
        ("algo.pivot_max=9", "algo.pivot_min/pivot_max"),
        ("sampler.latent_height=5", "sampler.latent_height"),
        ("run.mode=offline", "run.mode"),
        ("run.fork=share", "run.fork"),
        ("model.checkpoint=/nonexistent/ckpt.pt", "model.checkpoint"),
        ("data.prompts=/nonexistent.txt", "data.prompts"),
        ("model.dtype=float16", "model.dtype"),
        ("model.vae_memory_format=channels_last", "model.vae_memory_format"),
        ("model.vae_compile=reduce-overhead", "model.vae_compile"),
        ("algo.group_size=abc", "algo.group_size"),
        ("algo.bogus=1", "algo"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.").replace("/", "/")):
        load_config("tiny", None, [override])


def test_tau_auto_scale_applies_to_auto_only():
    assert load_config("tiny", None, ["algo.tau_auto_scale=0.25"]).algo.tau_auto_scale == 0.25
    assert load_config().algo.tau_auto_scale == 0.25 and load_config().algo.tau == "auto"  # the toy preset's choice
    with pytest.raises(ValueError, match="algo.tau_auto_scale.*numeric algo.tau"):
        load_config("tiny", None, ["algo.tau=0.5", "algo.tau_auto_scale=0.25"])


def test_real_model_preset_needs_local_weights(tmp_path):
    with pytest.raises(ValueError, match="model.text_encoder/vae"):
        load_config("self-forcing-1.3b")
    for d in ("te", "vae"):
        (tmp_path / d).mkdir()
    cfg = load_config("self-forcing-1.3b", None, [f"model.text_encoder={tmp_path / 'te'}", f"model.vae={tmp_path / 'vae'}",
                                                  "model.allow_random_init=true"])
    assert cfg.algo.group_size == 12 and cfg.adapter.rank == 64 and cfg.adapter.alpha == 128
    with pytest.raises(ValueError, match="unknown config sections"):
        TrainConfig.from_dict({"algorithm": {}})
    with pytest.raises(ValueError, match="override"):
        parse_override("nodot=1")
