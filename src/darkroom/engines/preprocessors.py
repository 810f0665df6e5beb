"""ControlNet preprocessors that need no downloaded weights: a control image becomes the control map a ControlNet
was trained on (edges for a canny model, lines for a scribble model ...), written here with Pillow and numpy.

Why only these: the annotators of A1111's ControlNet extension that are networks (HED, MiDaS, OpenPose ...) download
their weights on first use, which darkroom never does. A unit whose `module` is not here is refused at submit with the
list of those that are; a client can always run its own annotator and send the map with `module: none`.

The names are A1111's extension's, so its clients' units work unchanged. `threshold_a` / `threshold_b` are the
extension's generic slider values, read per module as below (None: the module's default).

The API imports this module for the names (`MODULES`, `resolve`): numpy and scipy load only when a map is made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from darkroom.errors import InvalidRequest

if TYPE_CHECKING:
    from PIL import Image


@dataclass(frozen=True)
class Slider:
    name: str
    value: float
    min: float
    max: float


@dataclass(frozen=True)
class Module:
    name: str
    description: str
    threshold_a: Slider | None = None
    threshold_b: Slider | None = None

    def detail(self) -> dict[str, Any]:
        """A1111's `module_detail` entry: which sliders the module reads."""
        sliders: list[dict[str, Any]] = [{"name": "Preprocessor Resolution", "value": 512, "min": 64, "max": 2048}]
        sliders += [vars(s) for s in (self.threshold_a, self.threshold_b) if s is not None]
        return {"model_free": True, "sliders": sliders}


MODULES: dict[str, Module] = {
    m.name: m
    for m in (
        Module("none", "the control image is the map as it is"),
        Module("invert", "white background and black lines become black background and white lines"),
        Module(
            "canny",
            "Canny edges",
            Slider("Canny Low Threshold", 100, 1, 255),
            Slider("Canny High Threshold", 200, 1, 255),
        ),
        Module(
            "tile_resample", "the image downsampled (tile models add detail)", Slider("Down Sampling Rate", 1, 1, 8)
        ),
        Module("blur_gaussian", "a Gaussian blur", Slider("Sigma", 9, 0.01, 64)),
        Module(
            "scribble_xdog",
            "scribble lines from a drawing (difference of Gaussians)",
            Slider("XDoG Threshold", 32, 1, 64),
        ),
    )
}
ALIASES = {
    "None": "none",
    "invert (from white bg & black line)": "invert",
    "tile": "tile_resample",
    "blur": "blur_gaussian",
}


def resolve(name: str, field: str = "controlnet.module") -> str:
    """The module's canonical name, or a 422 naming the field and listing what is available."""
    canonical = ALIASES.get(name, name.strip().lower())
    if canonical not in MODULES:
        raise InvalidRequest(
            f"ControlNet preprocessor {name!r} is not available (built in: {', '.join(MODULES)}; "
            "preprocessors that need downloaded weights are not)",
            field=field,
        )
    return canonical


def control_map(
    image: Image.Image,
    module: str,
    size: tuple[int, int],
    resize_mode: str = "crop",
    threshold_a: float | None = None,
    threshold_b: float | None = None,
) -> Image.Image:
    """The unit's control map at the output size: fitted first (`resize_mode`), then preprocessed, so thresholds
    act on the pixels the ControlNet sees."""
    spec = MODULES[resolve(module)]
    a = threshold_a if threshold_a is not None else (spec.threshold_a.value if spec.threshold_a else 0.0)
    b = threshold_b if threshold_b is not None else (spec.threshold_b.value if spec.threshold_b else 0.0)
    fitted = fit(image.convert("RGB"), size, resize_mode)
    return RUNNERS[spec.name](fitted, a, b)


def fit(image: Image.Image, size: tuple[int, int], resize_mode: str) -> Image.Image:
    """A1111's resize modes: `resize` stretches, `crop` covers the size and cuts the middle, `fill` fits inside and
    pads with black (no control there)."""
    from PIL import Image as PILImage
    from PIL import ImageOps

    if image.size == size:
        return image
    lanczos = PILImage.Resampling.LANCZOS
    if resize_mode == "resize":
        return image.resize(size, lanczos)
    if resize_mode == "fill":
        return ImageOps.pad(image, size, lanczos, color=(0, 0, 0))
    return ImageOps.fit(image, size, lanczos)


# --- the maps ---------------------------------------------------------------------------------------------------------


def _none(image: Image.Image, a: float, b: float) -> Image.Image:
    return image


def _invert(image: Image.Image, a: float, b: float) -> Image.Image:
    from PIL import ImageOps

    return ImageOps.invert(image)


def _tile_resample(image: Image.Image, rate: float, b: float) -> Image.Image:
    """Downsampled by `rate` and back to size: the tile model then redraws the detail that was lost."""
    from PIL import Image as PILImage

    if rate <= 1:
        return image
    small = (max(1, round(image.width / rate)), max(1, round(image.height / rate)))
    return image.resize(small, PILImage.Resampling.BOX).resize(image.size, PILImage.Resampling.BICUBIC)


def _blur(image: Image.Image, sigma: float, b: float) -> Image.Image:
    from PIL import ImageFilter

    return image.filter(ImageFilter.GaussianBlur(max(0.0, sigma)))


def _scribble_xdog(image: Image.Image, threshold: float, b: float) -> Image.Image:
    """Dark strokes stand out as where a wide blur is brighter than a narrow one; those become white lines."""
    import numpy as np
    from PIL import Image as PILImage
    from PIL import ImageFilter

    gray = image.convert("L")
    narrow = np.asarray(gray.filter(ImageFilter.GaussianBlur(0.5)), dtype=np.float32)
    wide = np.asarray(gray.filter(ImageFilter.GaussianBlur(5.0)), dtype=np.float32)
    lines = 2.0 * (wide - narrow) > threshold
    return PILImage.fromarray((lines * 255).astype(np.uint8)).convert("RGB")


def _canny(image: Image.Image, low: float, high: float) -> Image.Image:
    """Canny on the grey image: Sobel gradients (L1 magnitude, the scale the usual 100/200 thresholds are for),
    thinning to the ridge along the gradient, then weak edges kept only where they touch a strong one."""
    import numpy as np
    from PIL import Image as PILImage
    from scipy import ndimage

    gray = np.asarray(image.convert("L"), dtype=np.float32)
    gx = ndimage.sobel(gray, axis=1, mode="nearest")
    gy = ndimage.sobel(gray, axis=0, mode="nearest")
    magnitude = np.abs(gx) + np.abs(gy)
    ridge = magnitude * _is_ridge(magnitude, gx, gy)
    strong = ridge >= max(low, high)
    weak = ridge >= min(low, high)
    labels, count = ndimage.label(weak, structure=np.ones((3, 3), dtype=bool))
    keep = np.zeros(count + 1, dtype=bool)
    keep[np.unique(labels[strong])] = True
    keep[0] = False
    edges = keep[labels]
    return PILImage.fromarray((edges * 255).astype(np.uint8)).convert("RGB")


def _is_ridge(magnitude: Any, gx: Any, gy: Any) -> Any:
    """Non-maximum suppression: a pixel stays if it is no smaller than both neighbours along its gradient,
    the direction rounded to one of four (0, 45, 90, 135 degrees)."""
    import numpy as np

    padded = np.pad(magnitude, 1, mode="constant")
    h, w = magnitude.shape

    def shifted(dy: int, dx: int) -> Any:
        return padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    angle = (np.rad2deg(np.arctan2(gy, gx)) + 180.0) % 180.0
    sector = (np.floor((angle + 22.5) / 45.0).astype(int)) % 4  # 0: horizontal gradient, 2: vertical
    neighbours = {0: ((0, -1), (0, 1)), 1: ((-1, -1), (1, 1)), 2: ((-1, 0), (1, 0)), 3: ((-1, 1), (1, -1))}
    ridge = np.zeros_like(magnitude, dtype=bool)
    for index, (one, two) in neighbours.items():
        peak = (magnitude >= shifted(*one)) & (magnitude >= shifted(*two))
        ridge |= (sector == index) & peak
    return ridge


RUNNERS = {
    "none": _none,
    "invert": _invert,
    "canny": _canny,
    "tile_resample": _tile_resample,
    "blur_gaussian": _blur,
    "scribble_xdog": _scribble_xdog,
}
