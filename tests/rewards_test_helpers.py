"""Rewards used by tests/test_rewards.py through "module:Class" import strings (pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch


class GainRed:
    """A user-style reward: mean of the red channel, times `gain`; logs the raw mean beside it."""

    weights = {"score": 1.0}

    def __init__(self, gain: float = 1.0):
        self.gain = gain

    def __call__(self, videos, prompts):
        red = videos[:, :, 0].float().mean(dim=(1, 2, 3))
        return {"score": self.gain * red, "mean_red": red}


class PromptLength:
    """No `weights` attribute: every component enters the total with weight 1."""

    def __call__(self, videos, prompts):
        return {"chars": torch.tensor([float(len(p)) for p in prompts], device=videos.device)}


class Broken:
    """Returns whatever `mode` asks for, to exercise CompositeReward's checks."""

    def __init__(self, mode: str = "nan"):
        self.mode = mode

    def __call__(self, videos, prompts):
        b = videos.shape[0]
        if self.mode == "nan":
            x = torch.zeros(b)
            x[b - 1] = float("nan")
            return {"score": x}
        if self.mode == "inf":
            return {"score": torch.full((b,), float("inf"))}
        if self.mode == "shape":
            return {"score": torch.zeros(b, 1)}
        if self.mode == "int":
            return {"score": torch.zeros(b, dtype=torch.long)}
        if self.mode == "list":
            return {"score": [0.0] * b}
        if self.mode == "not_dict":
            return [0.0] * b
        if self.mode == "empty":
            return {}
        if self.mode == "raise":
            raise RuntimeError("model exploded")
        raise ValueError(f"unknown mode {self.mode}")
