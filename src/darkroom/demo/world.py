"""The demo model's world: flat coloured shapes on a plain background, each picture with a caption and exact truth.

The demo model has to show, on a machine with no checkpoint, that prompts reach the pixels, and a program has to be
able to check that it did. So the world is made of what a few lines of pixel code can score (colour, background,
position, count) and is described in the plain English a first user would type ("two small red circles on a blue
background", "a yellow star in the top left corner on a black background").

A scene is a pure function of a seed (`Scene.sample(rng)`), drawn with Pillow at `SIZE` pixels without antialiasing
so that every pixel is either the background or a shape's colour. Some (colour, shape, background) combinations are
held out (`is_held_out`): training never sees them, evaluation uses only them, so a score measures composition rather
than memory. Shapes are kept a margin away from the border so the border always shows the background, and several
shapes sit in distinct cells of a 3x3 grid so they never touch and can be counted as connected components.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from typing import Literal

from PIL import Image, ImageDraw

SIZE = 64  # the model's native side in pixels; the smallest side darkroom accepts (`limits.min_side`)
MARGIN = 3  # pixels of pure background kept along every edge

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 225),
    "yellow": (245, 220, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "purple": (140, 50, 185),
    "orange": (245, 140, 20),
}
SHAPES: dict[str, str] = {  # singular → plural
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "ring": "rings",
    "cross": "crosses",
    "heart": "hearts",
    "diamond": "diamonds",
}
SIZES: dict[str, float] = {"small": 6.5, "large": 12.5}  # radius in pixels
COUNT_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}
# Position word → the shape's centre as fractions of the side; the phrase the caption uses.
POSITIONS: dict[str, tuple[float, float, str]] = {
    "centre": (0.5, 0.5, "in the centre"),
    "left": (0.28, 0.5, "on the left"),
    "right": (0.72, 0.5, "on the right"),
    "top": (0.5, 0.28, "at the top"),
    "bottom": (0.5, 0.72, "at the bottom"),
    "top left": (0.28, 0.28, "in the top left corner"),
    "top right": (0.72, 0.28, "in the top right corner"),
    "bottom left": (0.28, 0.72, "in the bottom left corner"),
    "bottom right": (0.72, 0.72, "in the bottom right corner"),
}
JITTER = 2  # pixels a placed shape may move, in x and in y
HELD_OUT_SHARE = 8  # one (colour, shape, background) combination in this many is never used in training

Split = Literal["train", "held_out"]


@dataclass(frozen=True)
class Scene:
    """Exact ground truth of one picture; `position` is None when the caption leaves it open (or count > 1)."""

    shape: str
    colour: str
    background: str
    count: int
    size: str
    size_said: bool  # whether the caption names the size
    position: str | None
    centres: tuple[tuple[float, float], ...]  # pixel centres of the shapes, one per shape

    @property
    def caption(self) -> str:
        return caption_of(self)

    @staticmethod
    def sample(rng: random.Random, split: Split = "train", placed: bool = False) -> Scene:
        """A random scene whose (colour, shape, background) lies in `split`; `placed`: one shape at a named position.

        `placed` draws nothing extra, and without it the draws are those of every earlier release, so the held-out
        list and the batches of a training run stay the same."""
        while True:
            colour, shape, background = rng.choice(list(COLOURS)), rng.choice(list(SHAPES)), rng.choice(list(COLOURS))
            if colour != background and is_held_out(colour, shape, background) == (split == "held_out"):
                break
        count = 1 if placed else rng.choice((1, 1, 2, 3, 4))  # positions are about single shapes
        if count == 1:
            size = rng.choice(list(SIZES))
            position = rng.choice(list(POSITIONS)) if placed else rng.choice([*POSITIONS, None])
            centres: tuple[tuple[float, float], ...] = (_single_centre(rng, size, position),)
        else:  # several shapes are small, in distinct cells of a 3x3 grid
            size, position = "small", None
            cells = rng.sample(range(9), count)
            centres = tuple(_cell_centre(rng, c) for c in cells)
        size_said = rng.random() < 0.6
        return Scene(shape, colour, background, count, size, size_said, position, centres)

    def render(self) -> Image.Image:
        image = Image.new("RGB", (SIZE, SIZE), COLOURS[self.background])
        draw = ImageDraw.Draw(image)
        for cx, cy in self.centres:
            draw_shape(draw, self.shape, cx, cy, SIZES[self.size], COLOURS[self.colour], COLOURS[self.background])
        return image


def caption_of(scene: Scene) -> str:
    """Plain English: '[a|two..] [size] colour shape[s] [position phrase] on a|an colour background'."""
    words = [scene.size] if scene.size_said else []
    words += [scene.colour, scene.shape if scene.count == 1 else SHAPES[scene.shape]]
    article = COUNT_WORDS[scene.count]
    if article == "a" and words[0][0] in "aeiou":
        article = "an"
    text = " ".join([article, *words])
    if scene.position is not None:
        text += " " + POSITIONS[scene.position][2]
    background_article = "an" if scene.background[0] in "aeiou" else "a"
    return f"{text} on {background_article} {scene.background} background"


def is_held_out(colour: str, shape: str, background: str) -> bool:
    """A fixed hash of the combination, so the split is the same on every machine and in every release."""
    digest = hashlib.sha256(f"{colour}/{shape}/{background}".encode()).digest()
    return digest[0] % HELD_OUT_SHARE == 0


def held_out_scenes(n: int, seed: int = 2024) -> list[Scene]:
    """The evaluation set: `n` scenes drawn from held-out combinations only, the same list every time."""
    rng = random.Random(seed)
    return [Scene.sample(rng, "held_out") for _ in range(n)]


def vocabulary() -> list[str]:
    """Every word a caption can use, for the demo tokenizer."""
    words = {"a", "an", "on", "in", "the", "at", "corner", "background", *COUNT_WORDS.values(), *SIZES, *COLOURS}
    words |= set(SHAPES) | set(SHAPES.values())
    for _, _, phrase in POSITIONS.values():
        words |= set(phrase.split())
    return sorted(words)


def _single_centre(rng: random.Random, size: str, position: str | None) -> tuple[float, float]:
    if position is not None:
        fx, fy, _ = POSITIONS[position]
        return fx * SIZE + rng.uniform(-JITTER, JITTER), fy * SIZE + rng.uniform(-JITTER, JITTER)
    low, high = MARGIN + SIZES[size], SIZE - MARGIN - SIZES[size]
    return rng.uniform(low, high), rng.uniform(low, high)


def _cell_centre(rng: random.Random, cell: int) -> tuple[float, float]:
    lines = (12.0, SIZE / 2, SIZE - 12.0)  # cell centres: neighbours stay 3 px apart, the border 3 px away
    return lines[cell % 3] + rng.uniform(-JITTER, JITTER), lines[cell // 3] + rng.uniform(-JITTER, JITTER)


def draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    cx: float,
    cy: float,
    r: float,
    fill: tuple[int, int, int],
    background: tuple[int, int, int],
) -> None:
    """One filled shape of 'radius' r centred at (cx, cy); a ring is a disc with a background-coloured hole."""
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "ring":
        draw.ellipse(box, fill=fill)
        hole = r * 0.5
        draw.ellipse((cx - hole, cy - hole, cx + hole, cy + hole), fill=background)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "cross":
        arm = r * 0.38
        draw.rectangle((cx - r, cy - arm, cx + r, cy + arm), fill=fill)
        draw.rectangle((cx - arm, cy - r, cx + arm, cy + r), fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=fill)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)]
    if shape == "star":
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else r * 0.48
            angle = -math.pi / 2 + i * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    if shape == "heart":
        points = []
        for i in range(32):
            t = 2 * math.pi * i / 32
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            points.append((cx + x * r / 16, cy - y * r / 16 - r * 0.1))
        return points
    raise ValueError(f"unknown shape {shape!r}")
