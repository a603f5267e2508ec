"""Rewards used by the trainer tests, loaded by 'module:Class' import strings."""

from __future__ import annotations

import os


class MeanRed:
    """Mean of the red channel (a smooth, learnable reward)."""

    def __call__(self, videos, prompts):
        return {"red": videos[:, :, 0].mean(dim=(1, 2, 3))}


class FailAfter:
    """Behaves like MeanRed for `ok_calls` calls, then fails in the requested way: 'nan', 'shape' or
    'raise'. The call count is kept in a file so a resumed run continues it."""

    def __init__(self, ok_calls: int = 1, mode: str = "nan", counter: str = ""):
        self.ok_calls, self.mode, self.counter = ok_calls, mode, counter

    def _count(self) -> int:
        n = int(open(self.counter).read()) if self.counter and os.path.exists(self.counter) else 0
        if self.counter:
            open(self.counter, "w").write(str(n + 1))
        return n

    def __call__(self, videos, prompts):
        n = self._count()
        r = videos[:, :, 0].mean(dim=(1, 2, 3))
        if n < self.ok_calls:
            return {"red": r}
        if self.mode == "nan":
            return {"red": r * float("nan")}
        if self.mode == "shape":
            return {"red": r[:1]}
        raise RuntimeError("reward server unavailable")


def redness(videos, prompts):
    """A plain reward function (loaded as 'reward_helpers:redness'): one score per video, the mean red."""
    return videos[:, :, 0].mean(dim=(1, 2, 3))


def scaled_red(videos, prompts, gain=1.0):
    """A reward function with a keyword argument, given through the config's kwargs."""
    return {"red": gain * videos[:, :, 0].mean(dim=(1, 2, 3))}


def make_mean_red(scale=1.0):
    """A factory (no two required positional arguments): called with the kwargs, returns the reward."""
    return MeanRed()
