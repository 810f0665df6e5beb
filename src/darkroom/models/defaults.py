"""A model's default parameters, applied to the fields a request left out.

"Left out" is what the client did not send (pydantic's `model_fields_set`), never "equal to the global default": a
client that asks for 512x512 on an SDXL model whose default is 1024x1024 gets 512x512. The compat APIs pass which of
their fields the client set (`sent`), since they fill every field of the internal request themselves."""

from __future__ import annotations

from collections.abc import Iterable

from darkroom.schemas import GenerationRequest, ModelInfo


def apply(body: GenerationRequest, model: ModelInfo, sent: Iterable[str] | None = None) -> GenerationRequest:
    given = set(body.model_fields_set if sent is None else sent)
    if body.upscale is not None:  # an upscale job's size is its source's; it has no diffusion parameters
        return body
    updates = {
        field: value for field, value in model.defaults.model_dump(exclude_none=True).items() if field not in given
    }
    return body.model_copy(update=updates) if updates else body


# A1111 field → ours: what an A1111 client leaves out gets the model's default where it has one, else A1111's own.
A1111_FIELDS = {
    "width": ("width",),
    "height": ("height",),
    "steps": ("steps",),
    "guidance_scale": ("cfg_scale",),
    "negative_prompt": ("negative_prompt",),
    "sampler": ("sampler_name", "sampler_index", "scheduler"),
}


def for_a1111(model: ModelInfo, sent: Iterable[str]) -> dict[str, object]:
    """The model's defaults for the fields an A1111 request did not send (A1111's names in `sent`)."""
    given = set(sent)
    defaults = model.defaults.model_dump(exclude_none=True)
    return {ours: value for ours, value in defaults.items() if not given & set(A1111_FIELDS.get(ours, (ours,)))}
