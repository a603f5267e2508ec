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
