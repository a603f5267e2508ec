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


class TouchOnInit:
    """Creates `path` when constructed: stands in for a reward import string that runs code."""

    def __init__(self, path: str):
        open(path, "w").close()

    def __call__(self, videos, prompts):
        return {"red": videos[:, :, 0].mean(dim=(1, 2, 3))}


class _AfterCalls(MeanRed):
    def __init__(self, ok_calls: int = 1):
        self.ok_calls, self.calls = ok_calls, 0

    def __call__(self, videos, prompts):
        self.calls += 1
        if self.calls > self.ok_calls:
            self.misbehave()
        return super().__call__(videos, prompts)


class SlowAfter(_AfterCalls):
    """MeanRed for `ok_calls` calls, then sleeps `seconds` before answering (a hung reward server)."""

    def __init__(self, ok_calls: int = 1, seconds: float = 60.0):
        super().__init__(ok_calls)
        self.seconds = seconds

    def misbehave(self):
        import time

        time.sleep(self.seconds)


class ExitAfter(_AfterCalls):
    """MeanRed for `ok_calls` calls, then calls sys.exit(0)."""

    def misbehave(self):
        import sys

        sys.exit(0)


class MeanRedStall(MeanRed):
    """MeanRed, except that while the file `stall` exists a call first touches `stall + '.hit'` and then
    hangs for `seconds` (a reward server that stopped answering)."""

    def __init__(self, stall: str = "", seconds: float = 60.0):
        self.stall, self.seconds = stall, seconds

    def __call__(self, videos, prompts):
        if self.stall and os.path.exists(self.stall):
            import time

            open(self.stall + ".hit", "w").close()
            time.sleep(self.seconds)
        return super().__call__(videos, prompts)


def redness(videos, prompts):
    """A plain reward function (loaded as 'reward_helpers:redness'): one score per video, the mean red."""
    return videos[:, :, 0].mean(dim=(1, 2, 3))


def scaled_red(videos, prompts, gain=1.0):
    """A reward function with a keyword argument, given through the config's kwargs."""
    return {"red": gain * videos[:, :, 0].mean(dim=(1, 2, 3))}


def make_mean_red(scale=1.0):
    """A factory (no two required positional arguments): called with the kwargs, returns the reward."""
    return MeanRed()
