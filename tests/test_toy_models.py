"""The shipped toy-world weights: the reward models' protocol and sanity, the base model's samples recognised
by TA, and the embedded default run aligning the toy model (toy_videoalign rises, VQ does not fall)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from arcopo_fast.rewards import CompositeReward, RewardError
from arcopo_fast.toy import assets, world

ROOT = Path(__file__).resolve().parent.parent
# Measured on the shipped weights (python -m arcopo_fast.toy measure --prompts 16 --samples 2; the CI test
# below uses one sample of 16 prompts): background recognised in 1.0 of the samples (CI case 1.0), colour in
# 0.91 (1.0), every prompted attribute at once in 0.06 (0.06): direction and shape are its weak points.
BACKGROUND_RATE_MIN, COLOUR_RATE_MIN, ALL_ATTRIBUTES_MAX = 0.9, 0.75, 0.5
# The default run cut to 40 of its 200 iterations (its lr 1e-4 and tau scale 0.25). Measured on fixed prompts
# and noises (8 prompts x 2, each video its own noise; 2 threads): Overall 1.3877 -> 1.4132 (VQ +0.008, MQ
# +0.021, TA -0.003); 20 iterations: +0.0000, 60: +0.034. On 192 videos the full run raises the sum by
# +0.029 +- 0.010 (README).
SHORT_ITERATIONS, SHORT_LR, OVERALL_RISE_MIN, VQ_TOLERANCE = 40, 1e-4, 0.01, 0.0


@pytest.fixture(scope="module")
def vae():
    from arcopo_fast.model.vae import WanVAE

    return WanVAE(assets.weights_path("vae"))


@pytest.fixture(scope="module")
def world_videos(vae):
    """Six one-object world scenes as the generator would show them: through the VAE."""
    scenes = world.scenes(123, 6, two_objects=0.0)
    with torch.no_grad():
        videos = vae.decode(vae.encode(world.render_batch(scenes)))
    return scenes, videos


def test_shipped_weights_match_their_manifest_and_ship_in_the_wheel():
    man = assets.read_manifest()
    assert man["command"].startswith("python -m arcopo_fast.toy build") and isinstance(man["seed"], int)
    assert assets.verify() == [], "shipped toy weights differ from manifest.json: rebuild or re-hash them"
    size = sum(p.stat().st_size for p in assets.WEIGHTS_DIR.rglob("*") if p.is_file())
    assert size < 8e6, f"the shipped toy weights should stay a few MB, got {size / 1e6:.1f} MB"
    if shutil.which("git") and (ROOT / ".git").exists():  # scikit-build-core's wheel skips git-ignored files
        files = [str(assets.WEIGHTS_DIR / f) for f in man["sha256"]]
        res = subprocess.run(["git", "check-ignore", *files], cwd=ROOT, capture_output=True, text=True)
        assert res.stdout.strip() == "", f"git-ignored (left out of the wheel): {res.stdout}"


def test_toy_rewards_follow_the_reward_protocol(world_videos):
    scenes, videos = world_videos
    prompts = [s.prompt for s in scenes]
    total, comp = CompositeReward(["toy_videoalign"])(videos, prompts)
    assert total.shape == (6,) and total.dtype == torch.float32
    for k in ("VQ", "MQ", "TA", "Overall", "TA_colour", "TA_direction"):
        v = comp[f"toy_videoalign/{k}"]
        assert v.shape == (6,) and torch.isfinite(v).all()
    for k in ("VQ", "MQ", "TA"):
        assert 0 <= comp[f"toy_videoalign/{k}"].min() and comp[f"toy_videoalign/{k}"].max() <= 1
    torch.testing.assert_close(total, comp["toy_videoalign/Overall"])  # VQ + MQ + TA, each weight 1
    single = CompositeReward(["toy_ta", "toy_vq", "toy_mq"])(videos, prompts)[1]
    torch.testing.assert_close(single["toy_ta/TA"], comp["toy_videoalign/TA"])
    # other sizes and lengths are resampled to what the networks see
    small = torch.nn.functional.interpolate(videos[:2].flatten(0, 1), size=(48, 48)).view(2, -1, 3, 48, 48)
    assert CompositeReward(["toy_mq"])(small[:, :20], prompts[:2])[0].shape == (2,)
    with pytest.raises(RewardError, match="not a toy-world prompt"):
        CompositeReward(["toy_ta"])(videos[:1], ["a red balloon drifting over a calm lake at sunset"])


def _other_prompt(s: world.Scene) -> str:
    """The same scene with its colour, shape and direction changed."""
    o = s.objects[0]
    cols, shapes, dirs = list(world.COLOURS), list(world.SHAPES), list(world.DIRECTIONS)
    swapped = world.Obj(shapes[(shapes.index(o.shape) + 1) % 3], cols[(cols.index(o.colour) + 2) % 5], o.size,
                        dirs[(dirs.index(o.direction) + 1) % 4], o.speed, o.x, o.y)
    return world.Scene((swapped,), s.background).prompt


def test_toy_rewards_prefer_the_world_truth(world_videos):
    """TA: the true prompt over a wrong one; VQ: clean frames over noisy/blurred ones; MQ: the world's motion
    over shuffled frames."""
    from arcopo_fast.rewards.toy import ToyMQ, ToyTA, ToyVQ

    scenes, videos = world_videos
    prompts = [s.prompt for s in scenes]
    ta = ToyTA()
    right, wrong = ta(videos, prompts)["TA"], ta(videos, [_other_prompt(s) for s in scenes])["TA"]
    assert (right > wrong + 0.2).all(), (right, wrong)
    vq = ToyVQ()
    noisy = (videos + 0.25 * torch.randn(videos.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert (vq(videos, prompts)["VQ"] > vq(noisy, prompts)["VQ"] + 0.2).all()
    mq = ToyMQ()
    perm = torch.randperm(videos.shape[1], generator=torch.Generator().manual_seed(0))
    assert (mq(videos, prompts)["MQ"] > mq(videos[:, perm], prompts)["MQ"] + 0.2).all()


# The ceiling: the world's own videos of the first 16 shipped prompts, through the VAE (toy measure's
# ground_truth; measured: colour, size, background 1.0, direction 0.94, shape 0.25, every attribute 0.25: the
# VAE's 8x8-pixel cells keep no shape a TA model can read, so shape is at chance for any generator).
GT_RATE_MIN = {"colour": 0.9, "size": 0.9, "background": 0.95, "direction": 0.8}
# Pixel tracking (measure.pixel_motion, no reward model) of the same videos: the ground truth's object moves the
# prompted way over chunk 0 in 1.0 of them at 0.96 pixels per frame; the base model's (16 prompts x 1) in
# 0.31 (chance: the initial noise picks the direction), at 0.72 pixels per frame.
GT_MOVES_MIN, GT_SPEED_RANGE, BASE_MOVES_MAX = 0.9, (0.6, 1.3), 0.6


def test_ground_truth_through_the_vae_is_recognised(vae):
    from arcopo_fast.toy.measure import ground_truth_recognition, read_prompts, scenes_of_prompts, toy_rewards

    prompts = read_prompts()[:16]
    scenes = scenes_of_prompts(prompts)
    assert scenes is not None and [s.prompt for s in scenes] == prompts  # prompts.txt is the recipe's scenes
    res = ground_truth_recognition(vae, toy_rewards(), scenes)
    for head, low in GT_RATE_MIN.items():
        assert res[f"recognition_rate/{head}"] >= low, (head, res)
    assert res["pixel/videos"] == 16 and res["pixel/moves_prompted_way"] >= GT_MOVES_MIN, res
    assert GT_SPEED_RANGE[0] <= res["pixel/speed"] <= GT_SPEED_RANGE[1], res
    assert scenes_of_prompts(["a small red circle moving left over a black background"]) is None


def test_pixel_motion_reads_speed_and_direction(world_videos):
    from arcopo_fast.toy.measure import pixel_motion

    scenes, videos = world_videos
    moving = pixel_motion(videos, scenes)
    assert moving["pixel/moves_prompted_way"] == 1.0 and moving["pixel/speed"] > 0.5 and moving["pixel/mass"] > 0
    frozen = pixel_motion(videos[:, :1].expand_as(videos), scenes)  # frame 0 held: no motion at all
    assert frozen["pixel/moves_prompted_way"] == 0.0 and frozen["pixel/speed"] < 1e-3
    backwards = videos.clone()
    backwards[:, :9] = videos[:, :9].flip(1)  # the first chunk played in reverse: every object moves the other way
    assert pixel_motion(backwards, scenes)["pixel/moves_prompted_way"] == 0.0
    with pytest.raises(ValueError, match="one scene per video"):
        pixel_motion(videos, scenes[:2])


@pytest.mark.slow
def test_base_model_samples_are_recognised_by_ta():
    """The shipped generator follows its prompts, imperfectly: the TA model recognises the prompted
    background and colour in most samples, but every prompted attribute at once in few (room for RL)."""
    from arcopo_fast.toy.measure import load_toy_generator, read_prompts, recognition, toy_rewards

    from arcopo_fast.toy.measure import scenes_of_prompts

    prompts = read_prompts()[:16]
    res = recognition(load_toy_generator(), toy_rewards(), prompts, samples_per_prompt=1, scenes=scenes_of_prompts(prompts))
    assert res["recognition_rate/background"] >= BACKGROUND_RATE_MIN, res
    assert res["recognition_rate/colour"] >= COLOUR_RATE_MIN, res
    assert res["recognition_rate"] <= ALL_ATTRIBUTES_MAX, res
    assert res["pixel/videos"] == 16 and res["pixel/moves_prompted_way"] <= BASE_MOVES_MAX, res  # direction: RL's room


@pytest.mark.slow
def test_short_default_run_raises_toy_videoalign_and_keeps_vq(tmp_path):
    """The embedded default run, cut short (see SHORT_ITERATIONS): on fixed prompts and
    noises, the adapter raises toy_videoalign over the base model while VQ does not fall."""
    from arcopo_fast.config import load_config
    from arcopo_fast.toy.measure import adapter_effect, read_prompts
    from arcopo_fast.trainer import Trainer

    cfg = load_config(overrides=[f"run.out_dir={tmp_path}", f"run.iterations={SHORT_ITERATIONS}", f"optim.lr={SHORT_LR}", "run.progress=false",
                                 "run.sample_videos=false", "model.embed_cache_dir=null"])
    t = Trainer(cfg)
    t.run()
    eff = adapter_effect(t, read_prompts()[:8], samples_per_prompt=2)
    assert eff["after"]["Overall"] > eff["before"]["Overall"] + OVERALL_RISE_MIN, eff
    assert eff["after"]["VQ"] >= eff["before"]["VQ"] - VQ_TOLERANCE, eff
