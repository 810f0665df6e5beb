"""A request's text encoding and starting noise, made before its pass so the device never waits for them.

The denoising loop is what must keep the device busy; encoding the prompts (the text encoders) and drawing the first
latents are small but serial steps in front of it. `prepare` does them ahead: on another thread while the current
batch denoises or decodes (the worker's look-ahead, or another worker thread sharing the engine), on CUDA on a side
stream, and the pass then hands the results to the pipeline (`prompt_embeds`, `latents`, ...) instead of the prompts.

Pixels do not change with this, whenever it ran: each job's prompts are encoded alone exactly as diffusers encodes
one prompt (`encode_prompt`, one prompt, its negative), and each image's starting noise is drawn from its own CPU
generator seeded with its own seed, which then goes on (from the state after that draw) to the sampler's per-step
noise, as in a pass that draws it itself. Because the encoding is per job, the images of a joint batch see exactly
the embeddings of their solo runs (the batch no longer encodes its prompts as one text-encoder batch).

Only plain passes are prepared: a LoRA or an embedding changes the text encoders for its own pass, and hires, refiner
and ControlNet passes build their own inputs; those encode inside their pass as before.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from darkroom.schemas import GenerationRequest

EMBED_KEYS_SD = ("prompt_embeds", "negative_prompt_embeds")
EMBED_KEYS_SDXL = (*EMBED_KEYS_SD, "pooled_prompt_embeds", "negative_pooled_prompt_embeds")


@dataclass
class Prepared:
    """One request's encoded prompts (for one image) and, for txt2img, each image's starting noise (unscaled) with
    its generator's state after drawing it. Read-only once made, so an out-of-memory retry reuses it."""

    request: GenerationRequest
    model: tuple[str, str]  # (id, sha256): embeddings belong to those weights
    embeds: dict[str, torch.Tensor]
    noise: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # seed → (latents, state)
    ready: Any = None  # CUDA: the side stream's event after the last kernel; None elsewhere
    started: float = 0.0  # time.perf_counter() around the work, for tests and timings
    ended: float = 0.0

    def fits(self, request: GenerationRequest, model: tuple[str, str]) -> bool:
        """Made for this very request on these weights (anything else is ignored and encoded afresh)."""
        return self.model == model and self.request == request

    def wait(self, device: str) -> None:
        """Order the device's current stream after the side stream's work, and tell the allocator the tensors are
        used there (CUDA; nothing elsewhere)."""
        if self.ready is None:
            return
        stream = torch.cuda.current_stream(torch.device(device))
        stream.wait_event(self.ready)
        for tensor in [*self.embeds.values(), *(latents for latents, _ in self.noise.values())]:
            tensor.record_stream(stream)

    def apply(self, kwargs: dict[str, Any], seeds: list[int], per_image: bool) -> dict[str, Any]:
        """`kwargs` of a pass over `seeds` with the prompts replaced by their embeddings and, when drawn, the starting
        noise given with generators that continue after it. `per_image`: the pass takes one prompt per image
        (`num_images_per_prompt=1`), so the embeddings are repeated here; otherwise the pipeline repeats them."""
        out = {key: value for key, value in kwargs.items() if key not in ("prompt", "negative_prompt")}
        for key, tensor in self.embeds.items():
            out[key] = _repeat(tensor, len(seeds)) if per_image else tensor
        if self.noise and all(seed in self.noise for seed in seeds):
            out["latents"] = torch.cat([self.noise[seed][0] for seed in seeds])
            out["generator"] = [_generator(self.noise[seed][1]) for seed in seeds]
        return out


def joint(prepared: list[Prepared], seeds_per_job: list[list[int]], kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` of a joint pass (one prompt per image, jobs in order) from every job's preparation."""
    parts = [p.apply(kwargs, seeds, per_image=True) for p, seeds in zip(prepared, seeds_per_job, strict=True)]
    out = dict(parts[0])
    for key in prepared[0].embeds:
        out[key] = torch.cat([part[key] for part in parts])
    if all("latents" in part for part in parts):
        out["latents"] = torch.cat([part["latents"] for part in parts])
        out["generator"] = [generator for part in parts for generator in part["generator"]]
    else:  # some job without drawn noise: every image draws its own in the pass, from fresh generators
        out.pop("latents", None)
        out["generator"] = kwargs["generator"]
    return out


def encode(pipe: Any, request: GenerationRequest, model: tuple[str, str], device: str, stream: Any) -> Prepared:
    """Encode `request`'s prompts with `pipe`'s text encoders and draw its txt2img starting noise. `stream`: a CUDA
    stream to run on (None: the current one). The caller holds whatever keeps the text encoders unchanged."""
    started = time.perf_counter()
    context = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
    with torch.inference_mode(), context:
        guided = request.guidance_scale > 1 and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None
        encoded = pipe.encode_prompt(
            prompt=request.prompt,
            device=torch.device(device),
            num_images_per_prompt=1,
            do_classifier_free_guidance=guided,
            negative_prompt=request.negative_prompt or None,
        )
        keys = EMBED_KEYS_SDXL if len(encoded) == len(EMBED_KEYS_SDXL) else EMBED_KEYS_SD
        embeds = {key: value for key, value in zip(keys, encoded, strict=True) if value is not None}
        noise = _noise(pipe, request, device, embeds["prompt_embeds"].dtype) if request.mode == "txt2img" else {}
        ready = stream.record_event() if stream is not None else None
    return Prepared(request, model, embeds, noise, ready, started, time.perf_counter())


def _noise(
    pipe: Any, request: GenerationRequest, device: str, dtype: torch.dtype
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Each image's first latents as the pipeline draws them (`randn_tensor` on its own CPU generator), before the
    sampler's `init_noise_sigma` (the pipeline applies that, for the sampler the pass uses)."""
    from diffusers.utils.torch_utils import randn_tensor

    factor = int(pipe.vae_scale_factor)
    shape = (1, int(pipe.unet.config.in_channels), request.height // factor, request.width // factor)
    noise: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for seed in request.seeds():
        generator = torch.Generator(device="cpu").manual_seed(seed)
        latents = randn_tensor(shape, generator=generator, device=torch.device(device), dtype=dtype)
        noise[seed] = (latents, generator.get_state())
    return noise


def _generator(state: torch.Tensor) -> torch.Generator:
    generator = torch.Generator(device="cpu")
    generator.set_state(state)
    return generator


def _repeat(tensor: torch.Tensor, count: int) -> torch.Tensor:
    return tensor.repeat(count, *([1] * (tensor.ndim - 1)))
