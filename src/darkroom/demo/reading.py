"""Reading a demo picture back: background colour, shape colour, position and count, from the pixels alone.

This is how the demo model is scored (`bench/demo_model_eval.py`) and how the tests check that a prompt reached the
pixels, so it knows nothing about the model: the background is the colour of the border (the world keeps a margin of
pure background), the shapes are the pixels far from it, their colour is the palette colour most of them are nearest
to, the position is where their centroid falls on a 3x3 grid, and the count is their connected components.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image

from darkroom.demo.world import COLOURS, POSITIONS

if TYPE_CHECKING:
    import numpy as np

BORDER = 2  # pixels of the edge read as background
FOREGROUND_DISTANCE = 45.0  # RGB distance from the background beyond which a pixel is a shape's: about half the
# distance of the closest pair of palette colours (orange and yellow)
MIN_COMPONENT = 6  # pixels; smaller specks are not counted as shapes
_NAMES = list(COLOURS)


@dataclass(frozen=True)
class Reading:
    background: str
    colour: str | None  # None when no shape was found
    position: str | None
    count: int


def nearest_colours(pixels: np.ndarray) -> np.ndarray:
    """Index into the palette of the nearest colour for each RGB row."""
    import numpy as np

    palette = np.array([COLOURS[name] for name in _NAMES], dtype=np.float32)
    distances = ((pixels[:, None, :] - palette[None, :, :]) ** 2).sum(axis=2)
    return np.asarray(distances.argmin(axis=1))


def read_picture(image: Image.Image) -> Reading:
    import numpy as np  # numpy is the worker's: the API never reads pictures back

    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    height, width, _ = rgb.shape
    edge = np.ones((height, width), dtype=bool)
    edge[BORDER:-BORDER, BORDER:-BORDER] = False
    border = rgb[edge]
    background = _NAMES[Counter(nearest_colours(border).tolist()).most_common(1)[0][0]]
    reference = np.median(border, axis=0)
    mask = np.sqrt(((rgb - reference) ** 2).sum(axis=2)) > FOREGROUND_DISTANCE
    mask &= ~edge
    components = [c for c in _components(mask) if len(c) >= MIN_COMPONENT]
    if not components:
        return Reading(background, None, None, 0)
    votes = Counter(nearest_colours(rgb[mask]).tolist())
    colour = next((_NAMES[i] for i, _ in votes.most_common() if _NAMES[i] != background), None)
    ys, xs = np.nonzero(mask)
    position = position_of(float(xs.mean() + 0.5) / width, float(ys.mean() + 0.5) / height)
    return Reading(background, colour, position, len(components))


def position_of(fx: float, fy: float) -> str:
    """The world's position word for a centroid given as fractions of the side."""
    column = "left" if fx < 0.39 else "right" if fx > 0.61 else ""
    row = "top" if fy < 0.39 else "bottom" if fy > 0.61 else ""
    name = f"{row} {column}".strip() or "centre"
    assert name in POSITIONS
    return name


def _components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """4-connected components of a small boolean mask (a plain flood fill: the pictures are 64x64)."""
    import numpy as np

    seen = np.zeros_like(mask)
    height, width = mask.shape
    found = []
    for y, x in zip(*np.nonzero(mask), strict=True):
        if seen[y, x]:
            continue
        stack, component = [(int(y), int(x))], []
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            component.append((cy, cx))
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        found.append(component)
    return found
