"""Hires fix, as A1111 runs it: a first pass at the requested size, an upscale, and an img2img second pass at the
target size that redraws detail the upscale could not invent.

Why a module of its own: the two passes share the engine's pipelines, sampler and step callbacks, but their plumbing
(latents kept or decoded, the upscale between, progress over both passes) would double the engine's run loop.
Each image runs alone through both passes (a hires image is the largest thing a worker makes). Progress counts both
passes' steps, so it rises once from 0 to the end. Latent modes hand the resized latents to the second pass without
decoding them; every other upscaler decodes the first pass, upscales the pixels, and the second pass encodes them.

`infotext_fields` and `passes` describe a hires request for the PNG and the provenance; they need no torch (the API
reads them too).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from darkroom.engines import upscalers
from darkroom.schemas import GenerationRequest, HiresSpec

if TYPE_CHECKING:
    from PIL import Image

    from darkroom.engines.base import ProgressFn
    from darkroom.engines.samplers import SamplerSpec

HIRES_SOURCE = "hires-fix:first-pass"  # the second pass's init_image: makes it an img2img request; never loaded


def second_pass_request(request: GenerationRequest) -> GenerationRequest:
    """The second pass as an img2img request at the target size (its source is the upscaled first pass)."""
    hires = _hires(request)
    width, height = hires.target_size(request.width, request.height)
    update = {
        "hires": None,
        "width": width,
        "height": height,
        "steps": hires.steps(request.steps),
        "strength": hires.denoising_strength,
        "init_image": HIRES_SOURCE,
    }
    return request.model_copy(update=update)


def run_hires(
    engine: Any,
    loaded: Any,
    spec: SamplerSpec,
    request: GenerationRequest,
    seeds: list[int],
    progress: ProgressFn,
) -> tuple[list[Image.Image], str]:
    """Both passes for every seed, on the engine's pipelines (`loaded`), under the lock and adapters the engine's
    `generate` already holds. Returns the images at the target size and the scheduler class used."""
    import torch

    from darkroom.engines.diffusers_engine import Sources, pipeline_kwargs, step_callback, total_steps

    hires = _hires(request)
    upscaler = upscalers.resolve(engine.registry, hires.upscaler, "hires.upscaler", latent_ok=True, sha256=hires.sha256)
    first = request.model_copy(update={"hires": None})
    second = second_pass_request(request)
    target = (second.width, second.height)
    first_steps, second_steps = total_steps(first), total_steps(second)
    per_image = first_steps + second_steps
    grand_total = per_image * len(seeds)
    images: list[Image.Image] = []
    for index, seed in enumerate(seeds):
        offset = index * per_image
        callback = step_callback(progress, first_steps, offset=offset, grand_total=grand_total)
        kwargs = pipeline_kwargs(first, Sources(), [seed], callback)
        if upscaler.kind == "latent":
            kwargs["output_type"] = "latent"
        out = _pass(engine, loaded, "txt2img", spec, seed, kwargs)
        if upscaler.kind == "latent":  # the second pass starts from the resized latents (img2img takes them as is)
            scale = getattr(loaded.txt2img, "vae_scale_factor", 8)
            latents = upscalers.upscale_latents(torch.stack(list(out)), upscaler, target, vae_scale=scale)
            sources = Sources(init=cast(Any, latents))
        else:
            sources = Sources(init=upscalers.upscale_image(out[0], upscaler, target, engine.device))
        callback = step_callback(progress, second_steps, offset=offset + first_steps, grand_total=grand_total)
        kwargs = pipeline_kwargs(second, sources, [seed], callback)
        images.extend(_pass(engine, loaded, "img2img", spec, seed, kwargs))
    return images, _scheduler_name(spec, loaded)


def _pass(engine: Any, loaded: Any, mode: str, spec: SamplerSpec, seed: int, kwargs: dict[str, Any]) -> list[Any]:
    from darkroom.engines.samplers import make_scheduler, seed_scheduler_noise

    scheduler = make_scheduler(spec, loaded.scheduler_config)
    seed_scheduler_noise(scheduler, [seed])
    return list(engine._call(loaded.pipeline(mode), scheduler, kwargs))


def _scheduler_name(spec: SamplerSpec, loaded: Any) -> str:
    from darkroom.engines.samplers import make_scheduler

    return type(make_scheduler(spec, loaded.scheduler_config)).__name__


def _hires(request: GenerationRequest) -> HiresSpec:
    if request.hires is None:
        raise ValueError("not a hires request")
    return request.hires


# --- description (PNG infotext, provenance) --------------------------------------------------------------------------


def infotext_fields(request: dict[str, Any]) -> list[tuple[str, Any]]:
    """A1111's hires infotext fields (what its PNG Info pastes back into `hr_*`)."""
    hires = request.get("hires")
    if not hires:
        return []
    spec = HiresSpec.model_validate(hires)
    fields: list[tuple[str, Any]] = [
        ("Denoising strength", f"{spec.denoising_strength:g}"),
        ("Hires upscale", f"{spec.scale:g}"),
    ]
    if spec.resize_x or spec.resize_y:
        width, height = spec.target_size(request["width"], request["height"])
        fields.append(("Hires resize", f"{width}x{height}"))
    fields += [("Hires steps", spec.steps(request["steps"])), ("Hires upscaler", spec.upscaler)]
    return fields


def passes(request: dict[str, Any]) -> list[dict[str, Any]]:
    """Both passes of a hires request as they ran: size, steps and what happened between (for the provenance)."""
    hires = request.get("hires")
    if not hires:
        return []
    spec = HiresSpec.model_validate(hires)
    width, height = spec.target_size(request["width"], request["height"])
    second_steps = spec.steps(request["steps"])
    return [
        {
            "pass": "first",
            "mode": "txt2img",
            "width": request["width"],
            "height": request["height"],
            "steps": request["steps"],
        },
        {
            "pass": "second",
            "mode": "img2img",
            "width": width,
            "height": height,
            "steps": second_steps,
            "denoised_steps": int(second_steps * spec.denoising_strength),
            "denoising_strength": spec.denoising_strength,
            "upscaler": spec.upscaler,
            "upscaler_sha256": spec.sha256,
        },
    ]
