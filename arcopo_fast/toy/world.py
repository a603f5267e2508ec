"""The toy world: procedural text-to-video scenes, deterministic by seed.

A scene is one or two flat-coloured objects (shape, colour, size) moving along an axis (direction, speed)
over a background, bouncing off the frame's edges. Its prompt is generated from it:

    "a small red circle moving left over a dark blue background"
    "a big white square moving up and a small yellow triangle moving right over a black background"

Videos are [F, 3, S, S] in [0, 1] (S = 64: the tiny VAE's 8x8 latent grid; F = 33: 3 chunks of 3 latent
frames through its 4x temporal compression). Every word of a prompt is a whole token of the toy text
encoder (TOY_WORDS), so the prompt's attributes are separable in the text embedding.

Ground truth: each scene carries its attribute indices (Scene.labels), which the toy reward models are
trained on (rewards.py); `parse_prompt` inverts `Scene.prompt` so rewards can score a video against any
prompt of the world.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

import torch

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "DIRECTIONS",
    "FRAMES",
    "SHAPES",
    "SIZE",
    "SIZES",
    "TOY_WORDS",
    "Obj",
    "Scene",
    "parse_prompt",
    "render",
    "render_batch",
    "sample_scene",
    "scenes",
]

SIZE = 64  # pixels (8x8 latents through the 8x spatial VAE)
FRAMES = 33  # 9 latent frames through the 4x temporal VAE (first frame alone): 3 chunks of 3

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.16, 0.12),
    "green": (0.18, 0.82, 0.22),
    "blue": (0.22, 0.42, 1.0),
    "yellow": (0.96, 0.88, 0.12),
    "white": (0.96, 0.96, 0.96),
}
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "black": (0.04, 0.04, 0.05),
    "dark blue": (0.05, 0.08, 0.32),
    "gray": (0.42, 0.42, 0.44),
}
SHAPES = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 7.5, "big": 12.0}  # radius-like scale in pixels
DIRECTIONS: dict[str, tuple[float, float]] = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
SPEEDS = (0.6, 1.3)  # pixels per frame: the range of an object's speed (not named in the prompt)
_EXTENT = {"circle": 1.0, "square": 0.86, "triangle": 1.45}  # half-extent / size scale: where it bounces

TOY_WORDS = tuple(
    dict.fromkeys(
        ["a", "and", "moving", "over", "background", "dark", *SIZES, *COLOURS, *SHAPES, *DIRECTIONS]
        + [w for b in BACKGROUNDS for w in b.split()]
    )
)


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    direction: str
    speed: float  # pixels per frame
    x: float  # centre at frame 0, pixels
    y: float

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} moving {self.direction}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str

    @property
    def prompt(self) -> str:
        return " and ".join(o.phrase() for o in self.objects) + f" over a {self.background} background"

    @property
    def labels(self) -> dict[str, list[int]]:
        """Attribute indices of the objects (lists, one entry per object) and of the background."""
        return {
            "shape": [SHAPES.index(o.shape) for o in self.objects],
            "colour": [list(COLOURS).index(o.colour) for o in self.objects],
            "size": [list(SIZES).index(o.size) for o in self.objects],
            "direction": [list(DIRECTIONS).index(o.direction) for o in self.objects],
            "background": [list(BACKGROUNDS).index(self.background)],
        }


def _rng(seed: int, index: int) -> random.Random:
    return random.Random(int(hashlib.sha256(f"toy-world:{seed}:{index}".encode()).hexdigest()[:16], 16))


def sample_scene(seed: int, index: int, *, two_objects: float = 0.25) -> Scene:
    """Scene `index` of the world with seed `seed` (a pure function of both). two_objects: the probability
    of a second object (different colour and shape from the first)."""
    if not 0.0 <= two_objects <= 1.0:
        raise ValueError(f"two_objects must be a probability in [0, 1], got {two_objects}")
    r = _rng(seed, index)
    n = 2 if r.random() < two_objects else 1
    objs: list[Obj] = []
    for _ in range(n):
        shape = r.choice([s for s in SHAPES if all(o.shape != s for o in objs)])
        colour = r.choice([c for c in COLOURS if all(o.colour != c for o in objs)])
        size = r.choice(list(SIZES))
        direction = r.choice(list(DIRECTIONS))
        m = _EXTENT[shape] * SIZES[size] + 1
        # start in the half the object moves away from: it travels at least half the frame before a bounce
        x, y = r.uniform(m, SIZE - m), r.uniform(m, SIZE - m)
        dx, dy = DIRECTIONS[direction]
        if dx:
            x = r.uniform(SIZE / 2, SIZE - m) if dx < 0 else r.uniform(m, SIZE / 2)
        else:
            y = r.uniform(SIZE / 2, SIZE - m) if dy < 0 else r.uniform(m, SIZE / 2)
        objs.append(Obj(shape, colour, size, direction, r.uniform(*SPEEDS), x, y))
    return Scene(tuple(objs), r.choice(list(BACKGROUNDS)))


def scenes(seed: int, n: int, *, start: int = 0, two_objects: float = 0.25) -> list[Scene]:
    return [sample_scene(seed, i, two_objects=two_objects) for i in range(start, start + n)]


def _bounce(p: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Free positions p reflected into [lo, hi] (a triangle wave: elastic bounces off both walls)."""
    span = hi - lo
    u = torch.remainder(p - lo, 2 * span)
    return lo + torch.where(u > span, 2 * span - u, u)


def _coverage(shape: str, dx: torch.Tensor, dy: torch.Tensor, r: float) -> torch.Tensor:
    """Anti-aliased coverage in [0, 1] from a signed distance (pixels) to the shape's edge."""
    if shape == "circle":
        d = torch.sqrt(dx * dx + dy * dy) - r
    elif shape == "square":
        d = torch.maximum(dx.abs(), dy.abs()) - _EXTENT["square"] * r
    elif shape == "triangle":  # upward equilateral, circumradius R, centroid at the centre
        R = _EXTENT["triangle"] * r
        d = torch.maximum(dy - R / 2, (math.sqrt(3.0) * dx.abs() - dy) / 2 - R / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")
    return (0.5 - d).clamp(0.0, 1.0)


def render(scene: Scene, frames: int = FRAMES, size: int = SIZE) -> torch.Tensor:
    """The scene's video [frames, 3, size, size] float32 in [0, 1]. Object centres move in pixel units of
    a 64-pixel frame (other sizes scale the whole scene)."""
    if frames < 1 or size < 8:
        raise ValueError(f"need frames >= 1 and size >= 8, got {frames}, {size}")
    k = size / SIZE
    ax = (torch.arange(size, dtype=torch.float32) + 0.5) / k
    yy, xx = ax.view(1, size, 1), ax.view(1, 1, size)
    t = torch.arange(frames, dtype=torch.float32).view(frames, 1, 1)
    bg = torch.tensor(BACKGROUNDS[scene.background]).view(1, 3, 1, 1)
    shade = 1.0 + 0.12 * (0.5 - yy / SIZE)  # a soft vertical gradient: the background is not one flat colour
    video = (bg * shade.unsqueeze(1)).expand(frames, 3, size, size).clone()
    for o in scene.objects:
        r = SIZES[o.size]
        m = _EXTENT[o.shape] * r
        dxn, dyn = DIRECTIONS[o.direction]
        cx = _bounce(o.x + dxn * o.speed * t, m, SIZE - m)
        cy = _bounce(o.y + dyn * o.speed * t, m, SIZE - m)
        alpha = _coverage(o.shape, xx - cx, yy - cy, r).unsqueeze(1)  # [frames, 1, size, size]
        colour = torch.tensor(COLOURS[o.colour]).view(1, 3, 1, 1)
        video = video * (1 - alpha) + colour * alpha
    return video.clamp(0.0, 1.0)


def render_batch(batch: list[Scene], frames: int = FRAMES, size: int = SIZE) -> torch.Tensor:
    """[B, frames, 3, size, size]."""
    return torch.stack([render(s, frames, size) for s in batch])


def parse_prompt(prompt: str) -> Scene:
    """The attributes a prompt of this world names, as a Scene (positions and speeds are 0). Raises
    ValueError naming the prompt when it is not one of the world's."""
    text = " ".join(prompt.lower().split())
    head, sep, bg = text.rpartition(" over a ")
    if not sep or not bg.endswith(" background") or bg[: -len(" background")] not in BACKGROUNDS:
        raise ValueError(f"prompt {prompt!r} is not a toy-world prompt (expected '... over a <background> background')")
    objs = []
    for part in head.split(" and "):
        w = part.split()
        if len(w) != 6 or w[0] != "a" or w[4] != "moving" or w[1] not in SIZES or w[2] not in COLOURS or w[3] not in SHAPES or w[5] not in DIRECTIONS:
            raise ValueError(f"prompt {prompt!r}: cannot read the object phrase {part!r} (expected 'a <size> <colour> <shape> moving <direction>')")
        objs.append(Obj(w[3], w[2], w[1], w[5], 0.0, 0.0, 0.0))
    return Scene(tuple(objs), bg[: -len(" background")])
