"""Rewards: videos [B, F, 3, H, W] in [0, 1] + B prompts -> named float32 scores [B]. Knows nothing of the model.

See base.py for the protocol (with an example of a user reward), RewardSpec and CompositeReward.
The CLIP-family and VideoAlign modules import transformers and are loaded only when used.
"""

from .base import (
    REGISTRY,
    CompositeReward,
    MissingWeightsError,
    Reward,
    RewardError,
    RewardSpec,
    build_reward,
    check_videos,
    load_reward_class,
    parse_reward_list,
    register_reward,
    sample_frame_indices,
    validate_scores,
    weights_dir,
)
from .offline import BrightnessTarget, ColorTarget, JpegCompressibility, TemporalSmoothness

__all__ = [
    "REGISTRY",
    "BrightnessTarget",
    "ColorTarget",
    "CompositeReward",
    "JpegCompressibility",
    "MissingWeightsError",
    "Reward",
    "RewardError",
    "RewardSpec",
    "TemporalSmoothness",
    "build_reward",
    "check_videos",
    "load_reward_class",
    "parse_reward_list",
    "register_reward",
    "sample_frame_indices",
    "validate_scores",
    "weights_dir",
]
