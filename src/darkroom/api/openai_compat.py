"""OpenAI-compatible Images API: `POST /v1/images/generations`, `/edits` and `/variations` (`GET /v1/models`, in
OpenAI's list shape, is the native listing: api/v1.py).

The official `openai` package works with `base_url="http://darkroom:8000/v1"` and any API key (keys are checked once
darkroom has them). Errors on these routes — and only these — use OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`, because OpenAI clients parse that.

Translation: `model` is a darkroom model id, or an OpenAI model name (`dall-e-2`, `dall-e-3`, `gpt-image-*`), which
means the default model. `size` is any `WxH` within darkroom's limits; absent or `auto` it is the model's native size
(SD 1: 512, SD 2: 768, SDXL: 1024) for generations and the source image's size for edits. `quality` picks the step
count; `style`, `background: opaque`, `moderation` and `user` are accepted and change nothing. `output_format`
`jpeg` or `webp` (with `output_compression`, 0-100) re-encodes the stored PNG for `b64_json` answers (a `url` serves
the PNG); these fields are kept with the job (`client_options`). Variations are img2img of the image (`strength`
0.6, `prompt` "a variation of this image", both overridable as extensions). darkroom extensions
(send them with the openai package's `extra_body`): `negative_prompt`, `seed`, `steps`, `guidance_scale`, `sampler`,
`strength` (edits without a mask), `loras` (`[{"name", "weight"}]`, as in the native API). Edits follow OpenAI's mask
convention: transparent pixels are repainted; without a mask, a source with transparency is repainted where it is
transparent, and an opaque source is re-imagined whole.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Callable, Coroutine
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException

from darkroom.auth.principal import Permission
from darkroom.config import Limits
from darkroom.errors import DarkroomError, InvalidRequest, PayloadTooLarge
from darkroom.jobs.store import JobStatus
from darkroom.schemas import GenerationRequest, ModelInfo, check_limits
from darkroom.service import Services

from . import compat
from .auth import require
from .errors import invalid_json_message
from .uploads import image_size, load_mask, open_image
from .v1 import image_url, services

VARIATION_PROMPT = "a variation of this image"
RECORDED = ("quality", "background", "output_format", "output_compression", "style", "moderation", "input_fidelity")
OPENAI_MODELS = re.compile(r"^(dall-e-[23]|gpt-image.*|chatgpt-image.*)$")
NATIVE_SIDE = {"sd1": 512, "sd2": 768, "sdxl": 1024}
QUALITY_STEPS = {"low": 12, "standard": 20, "auto": 20, "medium": 25, "hd": 40, "high": 40, "xhigh": 50, "max": 60}
FIELD_NAMES = {
    "init_image": "image",
    "mask_image": "mask",
    "width": "size",
    "height": "size",
    "steps": "quality",
}
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}


def openai_error(
    status: int, message: str, param: str | None, code: str | None, headers: dict[str, str] | None = None
) -> JSONResponse:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class OpenAIRoute(APIRoute):
    """Routes whose errors leave in OpenAI's shape. Validation fails with 400 there, not 422."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                if (invalid_json := invalid_json_message(exc)) is not None:
                    return openai_error(400, invalid_json, None, "invalid_json")
                first = exc.errors()[0] if exc.errors() else {}
                param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
                return openai_error(400, f"{param}: {first.get('msg', 'invalid request')}", param, "invalid_value")
            except DarkroomError as exc:
                status = 400 if exc.status == InvalidRequest.status else exc.status
                headers = dict(getattr(exc, "headers", None) or {})
                if retry := getattr(exc, "retry_after", None):
                    headers["Retry-After"] = str(retry)
                return openai_error(status, exc.message, exc.field, exc.code, headers)
            except HTTPException as exc:
                return openai_error(exc.status_code, str(exc.detail), None, None)

        return route


router = APIRouter(
    prefix="/v1/images",
    tags=["openai"],
    route_class=OpenAIRoute,
    dependencies=[Depends(require(Permission.generate))],
)


class Options(BaseModel):
    """Fields both endpoints share, plus darkroom's extensions."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int | None = Field(1, ge=1)
    size: str | None = None
    response_format: Literal["url", "b64_json"] | None = None
    quality: str | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: int | None = Field(None, ge=0, le=100, description="jpeg and webp: quality 0-100")
    background: str | None = None
    stream: bool | None = None
    user: str | None = None
    negative_prompt: str = ""
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    sampler: str | None = None
    loras: list[dict[str, Any]] = Field(default_factory=list)  # checked as the native API's `loras`


class GenerationsRequest(Options):
    style: str | None = None
    moderation: str | None = None


class EditsRequest(Options):
    strength: float = Field(0.75, gt=0, le=1)
    input_fidelity: str | None = None


class VariationsRequest(Options):
    """OpenAI's variations take no prompt; darkroom runs img2img of the image with `prompt` (a darkroom extension,
    default VARIATION_PROMPT) at `strength` (extension, default 0.6)."""

    prompt: str = Field(VARIATION_PROMPT, min_length=1)
    strength: float = Field(0.6, gt=0, le=1)


# --- translation ------------------------------------------------------------------------------------------------------


def resolve_model(svc: Services, name: str | None) -> ModelInfo:
    if not name or OPENAI_MODELS.match(name):
        return compat.default_model(svc)
    return compat.find_model(svc, name, "model")


def parse_size(size: str | None, auto: tuple[int, int]) -> tuple[int, int]:
    if not size or size == "auto":
        return auto
    match = re.fullmatch(r"\s*(\d{1,5})\s*[xX×]\s*(\d{1,5})\s*", size)
    if not match:
        raise InvalidRequest(f"size must be WIDTHxHEIGHT or auto (got {size!r})", field="size", code="invalid_size")
    return int(match[1]), int(match[2])


def check_unsupported(opts: Options) -> None:
    if opts.stream:
        raise InvalidRequest("streaming is not supported; leave stream unset", field="stream")
    if opts.output_compression is not None and opts.output_format in (None, "png"):
        raise InvalidRequest("output_compression is for jpeg and webp output", field="output_compression")
    if opts.background == "transparent":
        raise InvalidRequest("transparent backgrounds are not supported", field="background")


def to_generation(
    opts: Options, model: ModelInfo, size: tuple[int, int], limits: Limits, **extra: Any
) -> GenerationRequest:
    """The internal request, with every configured limit checked (errors name OpenAI's fields)."""
    quality = (opts.quality or "auto").lower()
    if opts.steps is None and quality not in QUALITY_STEPS:
        raise InvalidRequest(f"quality must be one of {sorted(QUALITY_STEPS)}", field="quality")
    fields: dict[str, Any] = {
        "prompt": opts.prompt,
        "negative_prompt": opts.negative_prompt,
        "width": size[0],
        "height": size[1],
        "steps": opts.steps or QUALITY_STEPS[quality],
        "n": opts.n or 1,
        "model": model.id,
        "seed": opts.seed,
        "loras": opts.loras,
        "client_options": recorded(opts),
        **extra,
    }
    if opts.guidance_scale is not None:
        fields["guidance_scale"] = opts.guidance_scale
    if opts.sampler:
        fields["sampler"] = opts.sampler
    body = compat.generation_request(fields, FIELD_NAMES)
    try:
        check_limits(body, limits)
    except InvalidRequest as exc:
        raise compat.renamed(exc, FIELD_NAMES) from None
    return body


def recorded(opts: Options) -> dict[str, Any] | None:
    """What OpenAI's fields asked for that shapes the answer, not the pixels (output format and compression,
    background, quality's name, style), kept with the job for provenance."""
    kept = {name: getattr(opts, name, None) for name in RECORDED}
    return {name: value for name, value in kept.items() if value is not None} or None


def encoded(png: bytes, opts: Options) -> bytes:
    """The stored PNG in the asked `output_format`: jpeg or webp at `output_compression` (OpenAI's default 100)."""
    if opts.output_format in (None, "png"):
        return png
    quality = opts.output_compression if opts.output_compression is not None else 100
    with Image.open(io.BytesIO(png)) as image:
        out = io.BytesIO()
        image.convert("RGB").save(out, format=opts.output_format.upper(), quality=quality)
    return out.getvalue()


def response_format(opts: Options) -> str:
    """OpenAI's defaults: URLs for DALL·E names, base64 for GPT image models (and for darkroom's own names)."""
    if opts.response_format:
        return opts.response_format
    return "url" if (opts.model or "").startswith("dall-e") else "b64_json"


def images_body(request: Request, svc: Services, status: JobStatus, opts: Options) -> dict[str, Any]:
    job = status.job
    compat.raise_for_job(job, FIELD_NAMES)
    fmt = response_format(opts)
    data = [
        {"url": image_url(request, image.id)} if fmt == "url" else {"b64_json": compat.b64(encoded(png, opts))}
        for image, png in compat.job_images(svc, status)
    ]
    req = job.request
    return {
        "created": int(time.time()),
        "data": data,
        "background": "opaque",
        "output_format": opts.output_format or "png" if fmt == "b64_json" else "png",
        "quality": opts.quality or "auto",
        "size": f"{req['width']}x{req['height']}",
    }


# --- generations ------------------------------------------------------------------------------------------------------


def prepare_generation(svc: Services, opts: GenerationsRequest) -> GenerationRequest:
    check_unsupported(opts)
    model = resolve_model(svc, opts.model)
    side = NATIVE_SIDE.get(model.arch, 512)
    return to_generation(opts, model, parse_size(opts.size, (side, side)), svc.settings.limits)


@router.post("/generations", summary="OpenAI Images: create images from a prompt (waits for them)")
async def generations(request: Request, opts: GenerationsRequest) -> dict[str, Any]:
    svc = services(request)
    body = await run_in_threadpool(prepare_generation, svc, opts)
    job = await compat.submit_and_wait(request, body, {}, FIELD_NAMES)
    return await run_in_threadpool(images_body, request, svc, job, opts)


# --- edits ------------------------------------------------------------------------------------------------------------


async def read_edit_form(
    request: Request, form_model: type[EditsRequest] | type[VariationsRequest] = EditsRequest
) -> tuple[Any, bytes, bytes | None]:
    """multipart/form-data as the openai package sends it: `image` (or `image[]`, first used), optional `mask`. The
    form's spooled files are closed once their bytes are read, whatever is refused."""
    try:
        form = await request.form()
    except Exception as exc:  # not multipart, or a malformed body
        raise InvalidRequest(f"expected multipart/form-data: {exc}", field="image") from None
    try:
        return await _edit_fields(request, form, form_model)
    finally:
        await form.close()


async def _edit_fields(
    request: Request, form: FormData, form_model: type[EditsRequest] | type[VariationsRequest]
) -> tuple[Any, bytes, bytes | None]:
    uploads = [v for key in ("image", "image[]") for v in form.getlist(key) if isinstance(v, UploadFile)]
    if not uploads:
        raise InvalidRequest("an image file is required", field="image")
    mask = form.get("mask")
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    try:
        opts = form_model.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = str(first["loc"][0]) if first["loc"] else None
        raise InvalidRequest(f"{param}: {first['msg']}", field=param) from None
    limit = services(request).settings.limits.max_upload_bytes
    image_bytes = await _read_upload(uploads[0], "image", limit)
    mask_bytes = await _read_upload(mask, "mask", limit) if isinstance(mask, UploadFile) else None
    return opts, image_bytes, mask_bytes


async def _read_upload(upload: UploadFile, field: str, limit: int) -> bytes:
    """The file's bytes, refused by its size before they are read into memory."""
    if upload.size is not None and upload.size > limit:
        raise PayloadTooLarge(f"{field} is larger than {limit} bytes", field=field)
    return await upload.read()


def prepare_edit(svc: Services, opts: EditsRequest, image: bytes, mask: bytes | None) -> GenerationRequest:
    """Every limit first (the source's header, the size asked for, steps, n, prompt), then the pixels: resizing a
    mask to an unchecked size was seconds of CPU per request. The mask goes to `submit` as base64, which stores it
    after its own checks: nothing is stored here."""
    check_unsupported(opts)
    limits = svc.settings.limits
    width, height = image_size(image, limits, "image")
    if mask is not None:
        image_size(mask, limits, "mask")
    size = parse_size(opts.size, (max(64, width // 8 * 8), max(64, height // 8 * 8)))
    model = resolve_model(svc, opts.model)
    body = to_generation(opts, model, size, limits, init_image=compat.b64(image), strength=opts.strength)
    if mask is None and not _has_transparency(open_image(image, limits, "image")):
        return body
    mask_source = mask if mask is not None else image
    mask_png = load_mask(mask_source, limits, "mask", size, transparent_repaints=True)
    # OpenAI repaints the masked area from scratch
    return body.model_copy(update={"mask_image": compat.b64(mask_png), "strength": 1.0})


def _has_transparency(image: Any) -> bool:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        return image.convert("RGBA").getchannel("A").getextrema()[0] < 255
    return False


def _edit_form_schema(form_model: type[Options] = EditsRequest) -> dict[str, Any]:
    """The multipart form `read_edit_form` parses, for the OpenAPI document: the options plus the files."""
    schema = form_model.model_json_schema()
    binary = {"type": "string", "format": "binary"}
    schema["properties"] = {"image": binary, "mask": binary, **schema["properties"]}
    schema["required"] = ["image", *schema.get("required", [])]
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


@router.post(
    "/edits",
    summary="OpenAI Images: edit an image (inpainting with a mask), multipart",
    openapi_extra=_edit_form_schema(),
)
async def edits(request: Request) -> dict[str, Any]:
    svc = services(request)
    opts, image, mask = await read_edit_form(request)
    body = await run_in_threadpool(prepare_edit, svc, opts, image, mask)
    job = await compat.submit_and_wait(request, body, {}, FIELD_NAMES)
    return await run_in_threadpool(images_body, request, svc, job, opts)


# --- variations -------------------------------------------------------------------------------------------------------


def prepare_variation(svc: Services, opts: VariationsRequest, image: bytes) -> GenerationRequest:
    """img2img of the image at its own size (or `size`), every limit checked before anything is decoded further."""
    check_unsupported(opts)
    limits = svc.settings.limits
    width, height = image_size(image, limits, "image")
    size = parse_size(opts.size, (max(64, width // 8 * 8), max(64, height // 8 * 8)))
    model = resolve_model(svc, opts.model)
    return to_generation(opts, model, size, limits, init_image=compat.b64(image), strength=opts.strength)


@router.post(
    "/variations",
    summary="OpenAI Images: variations of an image (img2img), multipart",
    openapi_extra=_edit_form_schema(VariationsRequest),
)
async def variations(request: Request) -> dict[str, Any]:
    svc = services(request)
    opts, image, _ = await read_edit_form(request, VariationsRequest)
    body = await run_in_threadpool(prepare_variation, svc, opts, image)
    job = await compat.submit_and_wait(request, body, {}, FIELD_NAMES)
    return await run_in_threadpool(images_body, request, svc, job, opts)
