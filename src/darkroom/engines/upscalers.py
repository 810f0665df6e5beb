"""Upscalers by the names A1111 users know: `None`, `Lanczos`, `Nearest`, the latent modes, and ESRGAN-family models.

Why one module: hires fix (engines/hires.py) and upscale jobs (`POST /v1/upscale`, A1111's extras) pick an upscaler by
the same names and must refuse the same unknown ones at submit, before a job exists. Models are safetensors files in
`models/upscalers/` (pickled `.pth` files are never loaded: they can run code), loaded with spandrel, which knows the
architectures (ESRGAN/RRDBNet, Real-ESRGAN compact, SwinIR, …) from the weights alone.

Imported by the API too: torch, numpy and spandrel are imported inside the functions that run models.

A model upscales by its own factor; like A1111 it runs again while the image is smaller than the target (at most
`MAX_MODEL_PASSES` times) and a Lanczos resize then gives the exact size. `None` is A1111's "no upscaler": the
final Lanczos resize alone. Latent modes (hires fix only) resize the first pass's latents with `torch.nn.functional.
interpolate` and let the second pass decode them, as A1111 does.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import threading
import time
import types
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from darkroom.errors import EngineError, InvalidRequest
from darkroom.models.registry import UPSCALERS_DIR, ModelRegistry

if TYPE_CHECKING:
    from PIL import Image

    from darkroom.engines.base import EngineResult, ProgressFn
    from darkroom.schemas import GenerationRequest

PIXEL_UPSCALERS = ("None", "Lanczos", "Nearest")
# A1111's `shared.latent_upscale_modes`: name → (torch interpolate mode, antialias).
LATENT_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
MAX_MODEL_PASSES = 3  # a 2x model reaches 8x in three passes; the pixel limits stop anything larger at submit
MODEL_CACHE_SIZE = 2
DEFAULT_MODEL_SCALE = 4  # what A1111 lists for a model whose file name does not say its factor
_SCALE_IN_NAME = re.compile(r"(?:^|[^a-z0-9])(?:(\d)x|x(\d))(?:[^a-z0-9]|$)", re.IGNORECASE)


class UpscalerError(EngineError):
    """The upscaler model cannot run (not an upscaler, changed since submit): retrying fails the same way."""

    code = "upscaler_failed"
    permanent = True


@dataclass(frozen=True)
class Upscaler:
    """An upscaler as a request names it, resolved: `kind` says how it runs; models carry their file and hash."""

    name: str
    kind: Literal["pixel", "latent", "model"]
    path: Path | None = None
    sha256: str | None = None


# --- names (API and worker) ------------------------------------------------------------------------------------------


def listing(registry: ModelRegistry) -> list[dict[str, Any]]:
    """`/sdapi/v1/upscalers` in A1111's shape; `model_path` is relative to models/upscalers/ (no server paths)."""
    builtin = [
        {"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": DEFAULT_MODEL_SCALE}
        for name in PIXEL_UPSCALERS
    ]
    root = registry.models_dir / UPSCALERS_DIR
    models = [
        {
            "name": name,
            "model_name": "ESRGAN",
            "model_path": path.relative_to(root).as_posix(),
            "model_url": None,
            "scale": model_scale_from_name(name),
        }
        for name, path in sorted(registry.upscaler_files().items(), key=lambda item: item[0].casefold())
    ]
    return builtin + models


def model_scale_from_name(name: str) -> int:
    """`4x-UltraSharp`, `RealESRGAN_x2plus` → 4, 2; anything else → A1111's default of 4."""
    match = _SCALE_IN_NAME.search(name)
    return int(match.group(1) or match.group(2)) if match else DEFAULT_MODEL_SCALE


def resolve(registry: ModelRegistry, name: str, field: str, *, latent_ok: bool, sha256: str | None = None) -> Upscaler:
    """The upscaler `name` names (exact, else case-insensitive), or InvalidRequest naming it and `field`. A model is
    hashed (cached by size and mtime); a given `sha256` (pinned at submit) must still match the file."""
    for builtin in PIXEL_UPSCALERS:
        if name.casefold() == builtin.casefold():
            return Upscaler(builtin, "pixel")
    for mode in LATENT_MODES:
        if name.casefold() == mode.casefold():
            if not latent_ok:
                raise InvalidRequest(f"upscaler {name!r} is a latent mode: only hires fix can use it", field=field)
            return Upscaler(mode, "latent")
    files = registry.upscaler_files()
    path = files.get(name)
    if path is None:
        folded = [key for key in files if key.casefold() == name.casefold()]
        path = files[folded[0]] if len(folded) == 1 else None
    if path is None:
        known = [*PIXEL_UPSCALERS, *(LATENT_MODES if latent_ok else ()), *sorted(files, key=str.casefold)]
        raise InvalidRequest(f"unknown upscaler {name!r} (available: {', '.join(known)})", field=field)
    digest = registry.file_sha256(path)
    if sha256 and sha256 != digest:
        raise UpscalerError(
            f"upscaler {path.stem!r} changed since the job was queued ({sha256[:12]} → {digest[:12]})", field=field
        )
    return Upscaler(path.stem, "model", path=path, sha256=digest)


def pin(registry: ModelRegistry, request: GenerationRequest) -> dict[str, Any]:
    """The request's upscalers checked (unknown → 422 naming it) and pinned: the canonical name, and a model's
    sha256, which the worker checks again. Returns the fields to update (`hires`, `upscale`), or none."""
    updates: dict[str, Any] = {}
    if request.hires is not None:
        found = resolve(registry, request.hires.upscaler, "hires.upscaler", latent_ok=True, sha256=request.hires.sha256)
        updates["hires"] = request.hires.model_copy(update={"upscaler": found.name, "sha256": found.sha256})
    if request.upscale is not None:
        spec = request.upscale
        found = resolve(registry, spec.upscaler, "upscale.upscaler", latent_ok=False, sha256=spec.sha256)
        updates["upscale"] = spec.model_copy(update={"upscaler": found.name, "sha256": found.sha256})
    return updates


def infotext(request: dict[str, Any], version: str) -> str:
    """An upscale job's PNG `parameters`, in the words A1111's extras tab writes."""
    spec = request["upscale"]
    if spec.get("scale") is not None:
        fields = [("Postprocess upscale by", f"{spec['scale']:g}")]
    else:
        fields = [
            ("Postprocess upscale to", f"{spec['width']}x{spec['height']}"),
            ("Postprocess crop to fit", spec["crop"]),
        ]
    fields.append(("Postprocess upscaler", spec["upscaler"]))
    if spec.get("sha256"):
        fields.append(("Postprocess upscaler hash", spec["sha256"][:10]))
    fields.append(("Version", f"darkroom {version}"))
    return ", ".join(f"{key}: {value}" for key, value in fields)


# --- running (worker) ------------------------------------------------------------------------------------------------


def upscale_image(
    image: Image.Image, upscaler: Upscaler, size: tuple[int, int], device: str, *, crop: bool = False
) -> Image.Image:
    """`image` at exactly `size`: the upscaler's own factor first (models), then a resize (Lanczos unless
    `Nearest`); `crop` covers `size` keeping the aspect ratio and cuts the middle instead of stretching."""
    from PIL import Image as PILImage
    from PIL import ImageOps

    image = image.convert("RGB")
    if upscaler.kind == "model":
        image = _run_model(image, upscaler, size, device)
    elif upscaler.kind != "pixel":
        raise InvalidRequest(f"upscaler {upscaler.name!r} works on latents, not images", field="upscaler")
    resample = PILImage.Resampling.NEAREST if upscaler.name == "Nearest" else PILImage.Resampling.LANCZOS
    if image.size == size:
        return image
    if crop:
        return ImageOps.fit(image, size, method=resample)
    return image.resize(size, resample)


def upscale_latents(latents: Any, upscaler: Upscaler, size: tuple[int, int], vae_scale: int = 8) -> Any:
    """Latents (batch, channels, h, w) resized to the latent grid of the pixel `size`."""
    import torch

    mode, antialias = LATENT_MODES[upscaler.name]
    grid = (size[1] // vae_scale, size[0] // vae_scale)
    with torch.inference_mode():
        return torch.nn.functional.interpolate(latents, size=grid, mode=mode, antialias=antialias)


def run_upscale(
    request: GenerationRequest,
    image: Image.Image | None,
    registry: ModelRegistry,
    device: str,
    progress: ProgressFn,
) -> EngineResult:
    """An upscale job: the worker's whole engine part of it, with no diffusion pipeline loaded."""
    from darkroom.engines.base import EngineImage, EngineResult
    from darkroom.schemas import ModelInfo

    spec = request.upscale
    if spec is None or image is None:
        raise InvalidRequest("an upscale job needs upscale and init_image", field="init_image")
    started = time.perf_counter()
    progress(0, 1)  # a cancelled or timed-out job stops here, before the model is loaded
    upscaler = resolve(registry, spec.upscaler, "upscale.upscaler", latent_ok=False, sha256=spec.sha256)
    size = spec.target_size(image.width, image.height)
    result = upscale_image(image, upscaler, size, device, crop=spec.crop and spec.scale is None)
    progress(1, 1)
    info = ModelInfo(
        id=f"upscaler:{upscaler.name}",
        name=upscaler.name,
        format="single_file",
        arch="upscaler",
        path="",
        sha256=upscaler.sha256 or "",
        size_bytes=upscaler.path.stat().st_size if upscaler.path else 0,
    )
    return EngineResult(
        images=[EngineImage(image=result, seed=request.seed or 0)],
        model=info,
        engine="upscale",
        scheduler="",
        device=device if upscaler.kind == "model" else "cpu",
        dtype="float32" if upscaler.kind == "model" else "uint8",
        timings={"total_s": time.perf_counter() - started},
        versions=_versions(),
    )


def _versions() -> dict[str, str]:
    from darkroom import __version__

    out = {"darkroom": __version__}
    if "spandrel" in sys.modules:
        out["spandrel"] = str(getattr(sys.modules["spandrel"], "__version__", ""))
    return out


_models: OrderedDict[tuple[str, str, str], Any] = OrderedDict()
_models_lock = threading.Lock()


def _run_model(image: Image.Image, upscaler: Upscaler, size: tuple[int, int], device: str) -> Image.Image:
    """Model passes until the image covers `size` (or stops growing). Pixels in 0..1, RGB, float32."""
    import numpy as np
    import torch
    from PIL import Image as PILImage

    model = _model(upscaler, device)
    for _ in range(MAX_MODEL_PASSES):
        if image.width >= size[0] and image.height >= size[1]:
            break
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).unsqueeze(0)
        try:
            with torch.inference_mode():
                out = model(pixels.to(device)).clamp(0, 1)
        except torch.OutOfMemoryError as exc:
            raise EngineError(f"out of memory upscaling {image.width}x{image.height} with {upscaler.name}") from exc
        array = (out[0].permute(1, 2, 0).float().cpu().numpy() * 255.0).round().astype(np.uint8)
        bigger = PILImage.fromarray(array, "RGB")
        if bigger.width <= image.width:
            break
        image = bigger
    return image


def _model(upscaler: Upscaler, device: str) -> Any:
    """The model on `device`, kept for the next job (the last `MODEL_CACHE_SIZE` used, by file hash)."""
    assert upscaler.path is not None and upscaler.sha256 is not None
    key = (str(upscaler.path), upscaler.sha256, device)
    with _models_lock:
        if key in _models:
            _models.move_to_end(key)
            return _models[key]
        # The engine's load lock: a pipeline loading on another thread builds modules on the meta device
        # process-wide (accelerate's init_empty_weights), which would leave this model's weights empty.
        from darkroom.engines.diffusers_engine import _LOAD_LOCK

        spandrel = import_spandrel()
        try:
            with _LOAD_LOCK:
                descriptor = spandrel.ModelLoader(device=device).load_from_file(str(upscaler.path))
        except Exception as exc:
            raise UpscalerError(
                f"{upscaler.path.name} is not an upscaler model spandrel knows: {type(exc).__name__}: {exc}",
                field="upscaler",
            ) from exc
        if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.purpose != "SR":
            raise UpscalerError(
                f"{upscaler.path.name} is a {descriptor.purpose} model, not an upscaler", field="upscaler"
            )
        if descriptor.input_channels != 3:
            raise UpscalerError(f"{upscaler.path.name} takes {descriptor.input_channels} channels, not RGB")
        descriptor.eval()
        _models[key] = descriptor
        while len(_models) > MODEL_CACHE_SIZE:
            _models.popitem(last=False)
        return descriptor


_spandrel_lock = threading.Lock()


def import_spandrel() -> Any:
    """spandrel, also where torchvision is absent. spandrel imports every architecture it knows at import time, and
    two that are no upscalers (LaMa inpainting, RestoreFormer face restoration) import torchvision, which has no
    build for the CPU torch on PyPI. While spandrel imports, those names resolve to stand-ins that fail if called;
    the stand-ins leave `sys.modules` at once, so no other library mistakes them for torchvision."""
    with _spandrel_lock:
        if "spandrel" in sys.modules or importlib.util.find_spec("torchvision") is not None:
            import spandrel

            return spandrel
        names = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
        sys.modules.update({name: _Unavailable(name) for name in names})
        try:
            import spandrel
        finally:
            for name in names:
                sys.modules.pop(name, None)
        return spandrel


class _Unavailable(types.ModuleType):
    """A module whose every public attribute is a function raising ImportError (see `import_spandrel`)."""

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)

        def missing(*args: Any, **kwargs: Any) -> Any:
            raise ImportError(f"{self.__name__}.{attr} needs torchvision, which is not installed")

        return missing
