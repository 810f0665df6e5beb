"""ControlNet units on the engine's pipelines: the models loaded (and kept in a small cache), the control maps made,
and the request's pass run on the ControlNet twin of the cached pipeline.

Why a twin and not a new pipeline: diffusers' `from_pipe` builds the ControlNet variant of a pipeline (txt2img,
img2img or inpainting, SD 1.x/2.x or SDXL) around the very same modules, so a unit costs the ControlNet's weights
only, and the cached pipeline itself is never changed: the next job without units runs exactly as before.

Control modes (A1111's): `balanced` is plain diffusers. `prompt` ("my prompt is more important") scales the
residuals down level by level, deepest strongest (0.825 per level, as A1111 does); `control` ("ControlNet is more
important") also keeps them off the unconditional half of classifier-free guidance, so the prompt cannot pull the
picture away from the map. Both are forward hooks on the unit's model for the one call, removed afterwards.

Single-file ControlNets take their architecture from the base model's UNet (a ControlNet is a copy of its encoder),
so no config needs downloading; diffusers converts the original key layout (`control_model.*`) when it finds it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from darkroom.engines import preprocessors
from darkroom.engines.dtype_arg import dtype_kwargs
from darkroom.errors import DarkroomError, EngineError, FatalEngineError, InvalidRequest
from darkroom.models.controlnets import ControlNetInfo, compatible
from darkroom.models.registry import ModelRegistry
from darkroom.schemas import ControlNetUnit, GenerationRequest, ModelInfo

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

CACHE_SIZE = 4  # ControlNet models kept loaded (an SD 1.5 one is 0.7 GB in half precision)
SOFT_INJECTION = 0.825  # A1111's per-level factor for the prompt / ControlNet "more important" modes


class ControlNetError(EngineError):
    """The unit's model cannot steer this model (another family, changed or missing file): retrying cannot help."""

    code = "controlnet_incompatible"
    permanent = True


# --- checks (the API runs these at submit, the worker again before it runs) -----------------------------------------


def pin_units(registry: ModelRegistry, units: list[ControlNetUnit], model: ModelInfo) -> list[ControlNetUnit]:
    """Each unit's preprocessor and model checked (422 naming them) and the model pinned to the version found."""
    pinned: list[ControlNetUnit] = []
    for i, unit in enumerate(units):
        module = preprocessors.resolve(unit.module, field=f"controlnet[{i}].module")
        info = _model(registry, unit.model, f"controlnet[{i}].model")
        if unit.sha256 and unit.sha256 != info.sha256:
            raise InvalidRequest(
                f"ControlNet {unit.model!r} is version {info.sha256[:12]} here, not {unit.sha256[:12]}",
                field=f"controlnet[{i}].model",
            )
        check_family(info, model, f"controlnet[{i}].model")
        pinned.append(unit.model_copy(update={"module": module, "model": info.name, "sha256": info.sha256}))
    return pinned


def check_family(info: ControlNetInfo, model: ModelInfo, field: str) -> None:
    if not compatible(info.arch, model.arch):
        raise InvalidRequest(
            f"ControlNet {info.name!r} is for {info.arch} models and model {model.id!r} is {model.arch}: "
            f"use a ControlNet made for {model.arch}",
            field=field,
        )


def _model(registry: ModelRegistry, name: str, field: str) -> ControlNetInfo:
    try:
        return registry.controlnet(name)
    except InvalidRequest as exc:
        raise InvalidRequest(exc.message, field=field) from None


# --- running --------------------------------------------------------------------------------------------------------


@dataclass
class Control:
    """What one pass needs for its units: the models, the maps, and the pipeline arguments."""

    units: list[ControlNetUnit]
    models: list[Any]
    maps: list[Image.Image]
    kwargs: dict[str, Any] = field(default_factory=dict)

    def pipeline(self, base: Any) -> Any:
        """The ControlNet twin of `base` (same modules, same mode)."""
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image

        from darkroom.engines.acceleration import pin_execution_device

        auto = {
            "Inpaint": AutoPipelineForInpainting,
            "Img2Img": AutoPipelineForImage2Image,
        }
        kind = next((auto[k] for k in auto if k in type(base).__name__), AutoPipelineForText2Image)
        controlnet = self.models[0] if len(self.models) == 1 else list(self.models)
        try:
            twin = kind.from_pipe(base, controlnet=controlnet)
        except ValueError as exc:
            raise InvalidRequest(f"{type(base).__name__} has no ControlNet variant: {exc}", field="controlnet") from exc
        twin.set_progress_bar_config(disable=True)
        return pin_execution_device(twin)

    def call_kwargs(self, mode: str) -> dict[str, Any]:
        """Arguments for the twin's call: the maps go to `image` in txt2img and to `control_image` otherwise."""
        single = len(self.units) == 1

        def per_unit(values: list[Any]) -> Any:
            return values[0] if single else values

        maps = per_unit(self.maps)
        return {
            ("image" if mode == "txt2img" else "control_image"): maps,
            "controlnet_conditioning_scale": per_unit([u.weight for u in self.units]),
            "control_guidance_start": per_unit([u.guidance_start for u in self.units]),
            "control_guidance_end": per_unit([u.guidance_end for u in self.units]),
        }

    @contextlib.contextmanager
    def modes(self, pipe: Any) -> Iterator[None]:
        """The units' control modes as forward hooks on their models, for the body of the `with` only."""
        wanted: dict[int, tuple[Any, str]] = {}
        for unit, model in zip(self.units, self.models, strict=True):
            known = wanted.get(id(model))
            if known is not None and known[1] != unit.control_mode:
                raise InvalidRequest(
                    f"two units use ControlNet {unit.model!r} with different control modes", field="controlnet"
                )
            wanted[id(model)] = (model, unit.control_mode)
        handles = [
            model.register_forward_hook(_soft_injection(pipe, cond_only=mode == "control"))
            for model, mode in wanted.values()
            if mode != "balanced"
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _soft_injection(pipe: Any, cond_only: bool) -> Any:
    def hook(module: Any, args: Any, output: Any) -> Any:
        down, mid = (
            (output[0], output[1])
            if isinstance(output, tuple)
            else (output.down_block_res_samples, output.mid_block_res_sample)
        )
        levels = len(down)
        down = [sample * SOFT_INJECTION ** float(levels - i) for i, sample in enumerate(down)]
        if cond_only and getattr(pipe, "do_classifier_free_guidance", False):  # batch: [unconditional, conditional]
            half = mid.shape[0] // 2
            down = [_zero_first(sample, half) for sample in down]
            mid = _zero_first(mid, half)
        return (down, mid)

    return hook


def _zero_first(sample: Any, half: int) -> Any:
    import torch

    return torch.cat([torch.zeros_like(sample[:half]), sample[half:]])


class ControlNets:
    """Loads ControlNet models for an engine's device and dtype, keeping the last few used."""

    def __init__(self, registry: ModelRegistry, device: str, dtype: Any, lock: threading.Lock) -> None:
        self.registry = registry
        self.device = device
        self.dtype = dtype
        self._lock = lock  # the engine's load lock (diffusers builds modules on the meta device, process-wide)
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()

    def prepare(
        self, request: GenerationRequest, images: list[Image.Image] | None, model: ModelInfo, unet: Any
    ) -> Control | None:
        """The request's units ready to run, or None without units. `images`: each unit's control image, in order."""
        if not request.controlnet:
            return None
        if images is None or len(images) != len(request.controlnet):
            raise InvalidRequest("each ControlNet unit needs its control image", field="controlnet")
        size = (request.width, request.height)
        models, maps = [], []
        for i, (unit, image) in enumerate(zip(request.controlnet, images, strict=True)):
            info = self._info(unit, i)
            check_family(info, model, f"controlnet[{i}].model")
            models.append(self._load(info, unet))
            maps.append(
                preprocessors.control_map(
                    image, unit.module, size, unit.resize_mode, unit.threshold_a, unit.threshold_b
                )
            )
        return Control(units=list(request.controlnet), models=models, maps=maps)

    def clear(self) -> None:
        self._cache.clear()

    def _info(self, unit: ControlNetUnit, index: int) -> ControlNetInfo:
        try:
            info = self.registry.controlnet(unit.model)
        except DarkroomError as exc:
            raise ControlNetError(
                f"ControlNet {unit.model!r} is no longer available: {exc}", field="controlnet"
            ) from None
        if unit.sha256 and unit.sha256 != info.sha256:
            raise ControlNetError(
                f"ControlNet {unit.model!r} changed since the job was queued (now {info.sha256[:12]}, queued with "
                f"{unit.sha256[:12]}); submit the job again",
                field=f"controlnet[{index}].model",
            )
        return info

    def _load(self, info: ControlNetInfo, unet: Any) -> Any:
        key = (info.path, info.sha256)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        try:
            with self._lock:
                model = load_controlnet(info, unet, self.dtype)
            model.to(self.device)
        except DarkroomError:
            raise
        except Exception as exc:
            from darkroom.engines.classify import classify  # torch: the API imports this module for its checks

            if isinstance(fatal := classify(exc), FatalEngineError):
                raise fatal from exc
            first_line = (str(exc).strip().splitlines() or [""])[0][:300]
            raise ControlNetError(
                f"ControlNet {info.name!r} ({info.relpath}) does not fit this model (another family, or not a "
                f"ControlNet file diffusers can read): {type(exc).__name__}: {first_line}",
                field="controlnet",
            ) from exc
        model.eval()
        self._cache[key] = model
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return model


def load_controlnet(info: ControlNetInfo, unet: Any, dtype: Any) -> Any:
    """A diffusers folder as it is; a single file with the base UNet's architecture as its config."""
    from diffusers import ControlNetModel

    from darkroom.engines.acceleration import presign_attention

    if info.format == "diffusers":
        model = ControlNetModel.from_pretrained(
            info.path, local_files_only=True, use_safetensors=True, **dtype_kwargs(dtype)
        )
    else:
        with tempfile.TemporaryDirectory(prefix="darkroom-controlnet-") as tmp:
            (Path(tmp) / "config.json").write_text(json.dumps(config_from_unet(unet)))
            model = ControlNetModel.from_single_file(
                info.path, config=tmp, local_files_only=True, **dtype_kwargs(dtype)
            )
    presign_attention(model)  # its attention blocks run every step beside the UNet's
    return model


def config_from_unet(unet: Any) -> dict[str, Any]:
    """A ControlNet's config: the base UNet's for every field a ControlNet shares (what `from_unet` copies)."""
    from diffusers import ControlNetModel

    expected, optional = ControlNetModel._get_signature_keys(ControlNetModel)
    accepted = set(expected) | set(optional)
    config = {k: v for k, v in dict(unet.config).items() if k in accepted and not k.startswith("_")}
    return {"_class_name": "ControlNetModel", **config}


# --- description (PNG infotext, provenance): no torch ---------------------------------------------------------------

CONTROL_MODE_TEXT = {
    "balanced": "Balanced",
    "prompt": "My prompt is more important",
    "control": "ControlNet is more important",
}
RESIZE_MODE_TEXT = {"resize": "Just Resize", "crop": "Crop and Resize", "fill": "Resize and Fill"}


def infotext_fields(request: dict[str, Any]) -> list[tuple[str, str]]:
    """A1111's ControlNet extension writes one `ControlNet N: "Module: …, Model: name [hash], …"` field per unit;
    darkroom adds the control image's sha256, so a PNG names exactly what steered it."""
    fields: list[tuple[str, str]] = []
    for i, raw in enumerate(request.get("controlnet") or []):
        unit = ControlNetUnit.model_validate(raw)
        image = unit.image.removeprefix("blob:") if unit.image.startswith("blob:") else ""
        parts = [
            ("Module", unit.module),
            ("Model", f"{unit.model} [{(unit.sha256 or '')[:8]}]"),
            ("Weight", f"{unit.weight:g}"),
            ("Resize Mode", RESIZE_MODE_TEXT[unit.resize_mode]),
            ("Guidance Start", f"{unit.guidance_start:g}"),
            ("Guidance End", f"{unit.guidance_end:g}"),
            ("Control Mode", CONTROL_MODE_TEXT[unit.control_mode]),
        ]
        if unit.threshold_a is not None:
            parts.append(("Threshold A", f"{unit.threshold_a:g}"))
        if unit.threshold_b is not None:
            parts.append(("Threshold B", f"{unit.threshold_b:g}"))
        if image:
            parts.append(("Image Hash", image[:12]))
        fields.append((f"ControlNet {i}", '"' + ", ".join(f"{k}: {v}" for k, v in parts) + '"'))
    return fields


def units_record(request: dict[str, Any]) -> list[dict[str, Any]]:
    """The provenance's `controlnet` entry: each unit's model and hash, module, weight, range and image sha256."""
    out = []
    for raw in request.get("controlnet") or []:
        unit = ControlNetUnit.model_validate(raw)
        record = unit.model_dump(exclude={"image"})
        record["model_sha256"] = record.pop("sha256")
        record["image_sha256"] = unit.image.removeprefix("blob:") if unit.image.startswith("blob:") else None
        out.append(record)
    return out
