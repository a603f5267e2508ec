"""Prompts: a built-in list for the default run, or a text file with one prompt per line. Group g of a run
uses prompt order[g % n], where `order` is a seeded permutation: every rank and every resumed run agrees on
which prompt a group gets, without any shared state."""

from __future__ import annotations

from pathlib import Path

import torch

BUILTIN_PROMPTS = (
    "a red balloon drifting over a calm lake at sunset",
    "a golden retriever running through fresh snow",
    "waves crashing against a lighthouse during a storm",
    "a paper boat floating down a rainy city street",
    "time-lapse of clouds rolling over green mountains",
    "a hummingbird hovering near a bright pink flower",
    "neon signs reflecting on wet pavement at night",
    "a steaming cup of coffee on a wooden table, morning light",
    "a hot air balloon rising above a desert canyon",
    "fireflies glowing in a dark forest clearing",
    "a skateboarder gliding down an empty parking lot",
    "autumn leaves swirling in the wind in a park",
    "an astronaut walking slowly on a dusty red planet",
    "a koi fish swimming in a clear garden pond",
    "a train crossing a stone bridge in the countryside",
    "snowflakes falling past a warmly lit window",
)


def read_prompt_file(path: str | Path, option: str) -> list[str]:
    """A prompt file (train's data.prompts, sample's --prompts-file, evaluate's --prompts): one prompt per
    line; blank lines and lines starting with '#' are skipped. Errors name `option`."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{option}: {p} does not exist")
    prompts = [ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    if not prompts:
        raise ValueError(f"{option}: {p} holds no prompt (one per line)")
    return prompts


class PromptSet:
    def __init__(self, prompts_file: str | None, seed: int):
        self.prompts = list(BUILTIN_PROMPTS) if prompts_file is None else read_prompt_file(prompts_file, "data.prompts")
        g = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(len(self.prompts), generator=g).tolist()

    def __len__(self) -> int:
        return len(self.prompts)

    def for_group(self, group: int) -> str:
        return self.prompts[self.order[group % len(self.prompts)]]
