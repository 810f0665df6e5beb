"""SDXL's refiner, as A1111 runs it (`refiner_checkpoint`, `refiner_switch_at`): the base model denoises the first
`switch_at` of the schedule and hands its latents, still noisy, to the refiner, which denoises the rest.

Why a module of its own: it is a second model within one job. The refiner is loaded through the engine's own cache
(an `sdxl-refiner` folder loads as an img2img pipeline; a full SDXL model serves through its img2img twin), and each
image runs both parts alone, its own seed's generator in both, so a seed gives the same picture in any batch.
Progress counts both parts' steps, so it rises once from 0 to the end. No torch at import: the API checks
requests with `check_refiner`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from darkroom.errors import InvalidRequest
from darkroom.schemas import GenerationRequest, ModelInfo, RefinerSpec

if TYPE_CHECKING:
    from PIL import Image

    from darkroom.engines.base import ProgressFn
    from darkroom.engines.samplers import SamplerSpec

REFINER_ARCHES = ("sdxl", "sdxl-refiner")


def check_refiner(refiner: ModelInfo, model: ModelInfo, field: str = "refiner.model") -> None:
    """Both sides SDXL (the refiner works on SDXL's latents with SDXL's size conditioning); 422 with the reason."""
    if model.arch != "sdxl":
        raise InvalidRequest(f"the refiner is for SDXL models; model {model.id!r} is {model.arch}", field=field)
    if refiner.arch not in REFINER_ARCHES:
        raise InvalidRequest(
            f"model {refiner.id!r} is {refiner.arch}, not an SDXL model or refiner: it cannot refine SDXL latents",
            field=field,
        )


def split_steps(steps: int, switch_at: float) -> tuple[int, int]:
    """The base's and the refiner's share of `steps` (each at least one)."""
    first = min(steps - 1, max(1, round(steps * switch_at))) if steps > 1 else 1
    return first, max(1, steps - first)


def run_refined(
    engine: Any,
    base: Any,
    loaded: Any,
    spec: SamplerSpec,
    request: GenerationRequest,
    seeds: list[int],
    progress: ProgressFn,
) -> tuple[list[Image.Image], str]:
    """Both parts for every seed on `base` (the txt2img pipeline the engine holds) and the refiner, under the lock
    and adapters the engine's `generate` already holds. Returns the images and the base's scheduler class."""
    import torch

    from darkroom.engines.diffusers_engine import Sources, pipeline_kwargs, step_callback
    from darkroom.engines.samplers import make_scheduler, seed_scheduler_noise

    refiner = _refiner_spec(request)
    info = engine.registry.get(refiner.model)
    check_refiner(info, loaded.info)
    if refiner.sha256 and refiner.sha256 != info.sha256:
        raise InvalidRequest(
            f"refiner {info.id!r} changed since the job was queued; submit the job again", field="refiner.model"
        )
    refined, _ = engine._pipelines(info)
    second_pipe = refined.txt2img if info.arch == "sdxl-refiner" else refined.pipeline("img2img")
    first_steps, second_steps = split_steps(request.steps, refiner.switch_at)
    per_image = first_steps + second_steps
    images: list[Image.Image] = []
    scheduler_name = ""
    for index, seed in enumerate(seeds):
        offset = index * per_image
        callback = step_callback(progress, first_steps, offset=offset, grand_total=per_image * len(seeds))
        kwargs = pipeline_kwargs(request, Sources(), [seed], callback)
        kwargs.update(denoising_end=refiner.switch_at, output_type="latent")
        scheduler = make_scheduler(spec, loaded.scheduler_config)
        seed_scheduler_noise(scheduler, [seed])
        scheduler_name = type(scheduler).__name__
        latents = torch.stack(list(engine._call(base, scheduler, kwargs)))
        callback = step_callback(
            progress, second_steps, offset=offset + first_steps, grand_total=per_image * len(seeds)
        )
        kwargs = {
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt or None,
            "image": latents,
            "num_inference_steps": request.steps,
            "denoising_start": refiner.switch_at,
            "guidance_scale": request.guidance_scale,
            "num_images_per_prompt": 1,
            "generator": [torch.Generator(device="cpu").manual_seed(seed)],
            "callback_on_step_end": callback,
            "output_type": "pil",
        }
        scheduler = make_scheduler(spec, refined.scheduler_config)
        seed_scheduler_noise(scheduler, [seed])
        images.extend(engine._call(second_pipe, scheduler, kwargs))
    return images, scheduler_name


def _refiner_spec(request: GenerationRequest) -> RefinerSpec:
    if request.refiner is None:
        raise ValueError("not a refiner request")
    return request.refiner


def passes(request: dict[str, Any], model_sha256: str | None = None) -> list[dict[str, Any]]:
    """Both parts as they ran, for the provenance: which model denoised which share of the steps."""
    raw = request.get("refiner")
    if not raw:
        return []
    refiner = RefinerSpec.model_validate(raw)
    first, second = split_steps(request["steps"], refiner.switch_at)
    return [
        {"part": "base", "model": request.get("model"), "model_sha256": model_sha256, "steps": first},
        {
            "part": "refiner",
            "model": refiner.model,
            "model_sha256": refiner.sha256,
            "steps": second,
            "switch_at": refiner.switch_at,
        },
    ]


def infotext_fields(request: dict[str, Any]) -> list[tuple[str, str]]:
    """A1111's `Refiner: name [hash10], Refiner switch at: 0.8`."""
    raw = request.get("refiner")
    if not raw:
        return []
    refiner = RefinerSpec.model_validate(raw)
    return [
        ("Refiner", f"{refiner.model} [{(refiner.sha256 or '')[:10]}]"),
        ("Refiner switch at", f"{refiner.switch_at:g}"),
    ]
