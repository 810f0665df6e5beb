"""AUTOMATIC1111-compatible API under `/sdapi/v1/`: tools written for A1111's web UI API work with a base-URL change.

Requests keep A1111's field names, defaults and response shape (`images` as base64 PNG, `parameters` as received,
`info` as a JSON string) and become ordinary darkroom jobs through `v1.submit`. Like A1111 the calls are synchronous.
A1111's process-wide state maps onto darkroom as follows: the "current job" of `progress`, `interrupt` and `skip` is the
most recently started running job; the checkpoint chosen with `POST /options` is stored in the database and is the
default model of the A1111 and OpenAI APIs (a request's `override_settings.sd_model_checkpoint` wins for that request).

LoRAs: `<lora:name:weight>` (and `<lyco:…>`) tags are taken out of the prompt before it reaches the text encoder and
become the request's `loras` (the last tag for a name wins; `disable_extra_networks` drops them); the infotext writes
them back into the prompt with `Lora hashes`. `/loras` and `/embeddings` list `models/loras/` and `models/embeddings/`
(an embedding is used when its name appears in the prompt or negative prompt).

Hires fix (`enable_hr`, `hr_scale`, `hr_upscaler`, `hr_second_pass_steps`, `denoising_strength`, `hr_resize_x/y`)
becomes the request's `hires`; a second-pass checkpoint, sampler or prompt that differs from the first pass's is a 422
naming the field, never ignored. `/upscalers` and `/latent-upscale-modes` list what `hr_upscaler` and the extras take;
`/extra-single-image` and `/extra-batch-images` queue upscale jobs (one per image) and wait for them.

ControlNet: the extension's `alwayson_scripts.controlnet.args` units and its `/controlnet/*` routes (api/controlnet.py);
`refiner_checkpoint` and `refiner_switch_at` become the request's `refiner` (an SDXL model or refiner).

Styles: `styles` are the tenant's prompt templates (`darkroom.models.templates`), applied as A1111 applies styles;
`/prompt-styles` lists them. Checkpoints, LoRAs, embeddings and upscalers are listed as the tenant's policy allows.

Accepted and ignored (darkroom has no equivalent): `restore_faces`, `tiling`, subseeds, scripts
(`script_name`, `alwayson_scripts` other than ControlNet), `eta`/`s_*` sampler tweaks, `resize_mode` (the source is
always resized to the requested size), `save_images`. `skip` stops the current job like `interrupt`: darkroom runs a
job's images as one unit.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import io
import json
import os
import re
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from PIL import Image, ImageFilter
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from darkroom import __version__
from darkroom.auth import audit
from darkroom.auth.principal import Permission, Principal
from darkroom.engines import hires, upscalers
from darkroom.engines.controlnet import infotext_fields as controlnet_fields
from darkroom.engines.refiner import infotext_fields as refiner_fields
from darkroom.engines.samplers import SAMPLERS, resolve_sampler
from darkroom.errors import Conflict, InvalidRequest
from darkroom.jobs.db import read_tx
from darkroom.jobs.store import JobRecord, JobStatus
from darkroom.jobs.tables import job_events, jobs
from darkroom.kv import DEFAULT_MODEL
from darkroom.models import access as model_access
from darkroom.models import defaults as model_defaults
from darkroom.models import templates
from darkroom.models.registry import safetensors_header
from darkroom.safety.provenance import lora_hashes, prompt_with_tags, read_png
from darkroom.schemas import AdapterInfo, GenerationRequest, HiresSpec, JobState, UpscaleSpec, check_limits
from darkroom.service import Services

from . import compat, controlnet
from .auth import principal, require, sees_job, tenant_policy
from .uploads import decode_base64_image, image_size, load_image, load_mask, open_image, png_bytes
from .v1 import UPSCALE_PROMPT, services, upscale_source_size

router = APIRouter(prefix="/sdapi/v1", tags=["a1111"], dependencies=[Depends(require(Permission.generate))])

# Internal field → the A1111 field a client sent, for error messages.
FIELD_NAMES = {
    "guidance_scale": "cfg_scale",
    "strength": "denoising_strength",
    "init_image": "init_images",
    "mask_image": "mask",
    "n": "batch_size",
    "sampler": "sampler_name",
    "model": "sd_model_checkpoint",
    "loras": "prompt",  # A1111 names LoRAs with <lora:name:weight> tags in the prompt
    "hires": "enable_hr",
    "hires.scale": "hr_scale",
    "hires.upscaler": "hr_upscaler",
    "hires.second_pass_steps": "hr_second_pass_steps",
    "hires.denoising_strength": "denoising_strength",
    "hires.resize_x": "hr_resize_x",
    "hires.resize_y": "hr_resize_y",
    **controlnet.a1111_field_names(),
}
HIRES_FIELDS = {  # HiresSpec field → A1111's
    "scale": "hr_scale",
    "upscaler": "hr_upscaler",
    "second_pass_steps": "hr_second_pass_steps",
    "denoising_strength": "denoising_strength",
    "resize_x": "hr_resize_x",
    "resize_y": "hr_resize_y",
}
# A1111's extra-network tags for LoRA-type networks: <lora:name>, <lora:name:weight>, <lora:name:te:unet>.
LORA_TAG = re.compile(r"<(?:lora|lyco):([^>]*)>", re.IGNORECASE)
OPTIONS_KEY = "a1111.options"
MAX_MASK_BLUR = 64  # px; A1111's UI offers up to 64
MAX_JOB_COUNT = 1000
BASE_OPTIONS: dict[str, Any] = {
    "samples_format": "png",
    "sd_vae": "Automatic",
    "CLIP_stop_at_last_layers": 1,
    "eta_noise_seed_delta": 0,
    "live_previews_enable": True,
    "show_progress_every_n_steps": 10,  # A1111's default: live previews on
    "img2img_fix_steps": False,
}
SCHEDULERS = [
    {"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1.0, "need_inner_model": False},
    {"name": "uniform", "label": "Uniform", "aliases": None, "default_rho": -1.0, "need_inner_model": True},
    {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False},
]


class Processing(BaseModel):
    """Fields txt2img and img2img share, with A1111's defaults. Unknown fields are ignored, as A1111 does."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    comments: dict[str, Any] | None = None
    sampler_index: str = "Euler"
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    force_task_id: str | None = None
    infotext: str | None = None


class Txt2ImgRequest(Processing):
    enable_hr: bool = False
    denoising_strength: float | None = 0.75
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(Processing):
    init_images: list[str] | None = None
    resize_mode: int = 0
    denoising_strength: float = 0.75
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = Field(4, ge=0, le=MAX_MASK_BLUR)
    mask_blur_y: int = Field(4, ge=0, le=MAX_MASK_BLUR)
    mask_blur: int | None = Field(None, ge=0, le=MAX_MASK_BLUR)
    mask_round: bool = True
    inpainting_fill: int = Field(0, ge=0, le=3, description="0 fill, 1 original, 2 latent noise, 3 latent nothing")
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = Field(0, ge=0)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


class ImagesResponse(BaseModel):
    images: list[str] | None = Field(None, description="base64 PNGs (with their A1111 `parameters` text chunk)")
    parameters: dict[str, Any]
    info: str = Field(description="JSON string: seeds, infotexts, model, darkroom's job id …")


P = TypeVar("P", bound=Processing)


# --- translation ------------------------------------------------------------------------------------------------------


def sampler_name(req: Processing) -> str:
    """A1111 ≥ 1.9 splits "DPM++ 2M Karras" into sampler "DPM++ 2M" and scheduler "Karras"; older clients send the
    combined name (or only `sampler_index`). darkroom's names are the combined ones."""
    name = req.sampler_name or req.sampler_index or "Euler"
    scheduler = (req.scheduler or "automatic").strip().lower()
    if scheduler in ("automatic", "uniform", ""):
        return name
    if scheduler == "karras":
        combined = name if name.lower().endswith("karras") else f"{name} Karras"
        try:
            return resolve_sampler(combined).name
        except InvalidRequest:
            raise InvalidRequest(f"sampler {name!r} has no Karras variant", field="scheduler") from None
    raise InvalidRequest(f"scheduler {req.scheduler!r} is not supported; use automatic or karras", field="scheduler")


def request_model(svc: Services, req: Processing) -> str:
    override = (req.override_settings or {}).get("sd_model_checkpoint")
    if override:
        return compat.find_model(svc, str(override), "override_settings.sd_model_checkpoint").id
    return compat.default_model(svc).id


def extract_loras(prompt: str) -> tuple[str, list[dict[str, Any]]]:
    """The prompt without its LoRA tags (removed as A1111 removes them, nothing else touched) and the LoRAs they
    name. A1111 may weight the text encoder and the UNet differently (`<lora:name:te:unet>`); darkroom has one weight
    per adapter, so differing weights are refused rather than half ignored."""
    found: dict[str, float] = {}
    for match in LORA_TAG.finditer(prompt):
        args = [a.strip() for a in match.group(1).split(":")]
        name = args[0]
        if not name:
            raise InvalidRequest(f"prompt: {match.group(0)} names no LoRA", field="prompt")
        try:
            weights = [float(a) for a in args[1:3] if a]
        except ValueError:
            raise InvalidRequest(f"prompt: the weight in {match.group(0)} must be a number", field="prompt") from None
        if len(set(weights)) > 1:
            raise InvalidRequest(
                f"prompt: {match.group(0)}: separate text-encoder and UNet weights are not supported", field="prompt"
            )
        found[name] = weights[0] if weights else 1.0
    return LORA_TAG.sub("", prompt), [{"name": name, "weight": weight} for name, weight in found.items()]


def to_generation(svc: Services, req: Processing, **extra: Any) -> GenerationRequest:
    """The internal request, with every configured limit checked (errors name A1111's fields)."""
    prompt, loras = extract_loras(req.prompt)
    if req.disable_extra_networks:
        loras = []
    if not prompt.strip():
        raise InvalidRequest("prompt: darkroom needs a non-empty prompt", field="prompt")
    fields = {
        "prompt": prompt,
        "loras": loras,
        "negative_prompt": req.negative_prompt or "",
        "width": req.width,
        "height": req.height,
        "steps": req.steps,
        "guidance_scale": req.cfg_scale,
        "sampler": sampler_name(req),
        "seed": req.seed,
        "n": req.batch_size * req.n_iter,
        "model": request_model(svc, req),
        "preview": live_previews(svc),  # A1111's live-preview options: whether /progress shows `current_image`
        **extra,
    }
    fields.update(model_defaults.for_a1111(svc.registry.get(fields["model"]), req.model_fields_set))
    extensions = (req.alwayson_scripts, req.refiner_checkpoint, req.refiner_switch_at)  # ControlNet units, refiner
    fields.update(controlnet.a1111_fields(svc, *extensions, fields["model"]))
    body = compat.generation_request(fields, FIELD_NAMES)
    try:
        check_limits(body, svc.settings.limits)
    except InvalidRequest as exc:
        raise compat.renamed(exc, FIELD_NAMES) from None
    return body


def hires_fix(req: Txt2ImgRequest) -> HiresSpec | None:
    """`enable_hr` and the `hr_*` fields as the request's `hires`, checked with A1111's field names. A second pass
    that A1111 would run differently (another checkpoint, sampler or prompt) is refused, not approximated."""
    if not req.enable_hr:
        return None
    for field, value, same in (
        ("hr_checkpoint_name", req.hr_checkpoint_name, ("", "Use same checkpoint")),
        ("hr_sampler_name", req.hr_sampler_name, ("", "Use same sampler", req.sampler_name)),
        ("hr_scheduler", req.hr_scheduler, ("", "Use same scheduler", req.scheduler)),
        ("hr_prompt", req.hr_prompt, ("", req.prompt)),
        ("hr_negative_prompt", req.hr_negative_prompt, ("", req.negative_prompt)),
    ):
        if value is not None and value not in same:
            raise InvalidRequest(f"{field}: a second pass unlike the first is not supported", field=field)
    fields = {
        "scale": req.hr_scale,
        "upscaler": req.hr_upscaler or "Latent",  # A1111's default latent upscale mode
        "second_pass_steps": req.hr_second_pass_steps,
        "denoising_strength": req.denoising_strength if req.denoising_strength is not None else 0.7,
        "resize_x": req.hr_resize_x,
        "resize_y": req.hr_resize_y,
    }
    try:
        return HiresSpec(**fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = HIRES_FIELDS.get(str(first["loc"][0]) if first["loc"] else "", "enable_hr")
        raise InvalidRequest(f"{field}: {first['msg']}", field=field) from None


def prepare_img2img(svc: Services, req: Img2ImgRequest) -> GenerationRequest:
    """The request with every limit checked first (size, steps, n, prompt, upload bytes and pixels), and only then the
    source and mask decoded and A1111's mask options applied: invert, blur, and `inpainting_fill` (how the masked area
    starts) approximated in pixel space. Resizing a mask to an unchecked size was seconds of CPU per request.

    Images go to `submit` as base64, which stores them after its own checks: nothing is stored here."""
    if not req.init_images:
        raise InvalidRequest("init_images: img2img needs at least one image", field="init_images")
    crop = req.inpaint_full_res_padding if (req.mask and req.inpaint_full_res) else None
    extra = {"init_image": req.init_images[0], "strength": req.denoising_strength, "mask_crop_padding": crop}
    body = to_generation(svc, req, **extra)
    if not req.mask:
        return body
    limits, size = svc.settings.limits, (body.width, body.height)
    blur = req.mask_blur if req.mask_blur is not None else max(req.mask_blur_x, req.mask_blur_y)
    init = req.init_images[0]
    raw_init = decode_base64_image(init, limits, "init_images")
    image_size(raw_init, limits, "init_images")  # a bad source is refused before the mask costs anything
    raw_mask = decode_base64_image(req.mask, limits, "mask")
    mask_png = load_mask(raw_mask, limits, "mask", size, invert=bool(req.inpainting_mask_invert), blur=blur)
    if req.inpainting_fill != 1:
        source = load_image(raw_init, limits, "init_images", size)
        init = compat.b64(fill_masked(source, mask_png, req.inpainting_fill))
    return body.model_copy(update={"init_image": init, "mask_image": compat.b64(mask_png)})


def fill_masked(source_png: bytes, mask_png: bytes, mode: int) -> bytes:
    """A1111's masked content: 0 `fill` (colours from around the mask), 2 `latent noise` (noise), 3 `latent nothing`
    (flat grey, what a zero latent decodes to). darkroom does it on pixels before encoding, not on latents."""
    image = Image.open(io.BytesIO(source_png)).convert("RGB")
    mask = Image.open(io.BytesIO(mask_png)).convert("L")
    if mode == 2:
        filler = Image.frombytes("RGB", image.size, os.urandom(image.width * image.height * 3))
    elif mode == 3:
        filler = Image.new("RGB", image.size, (127, 127, 127))
    else:
        filler = _fill_from_surroundings(image, mask)
    return png_bytes(Image.composite(filler, image, mask.point(lambda v: 255 if v > 0 else 0)))


def _fill_from_surroundings(image: Image.Image, mask: Image.Image) -> Image.Image:
    """Repeatedly blur with the known pixels pinned: colours from the unmasked area flow into the hole."""
    keep = mask.point(lambda v: 255 if v == 0 else 0)
    filled = image.copy()
    for radius in (64, 32, 16, 8, 4, 2):
        filled = Image.composite(image, filled.filter(ImageFilter.GaussianBlur(radius)), keep)
    return filled


# --- responses ------------------------------------------------------------------------------------------------------


def images_response(svc: Services, status: JobStatus, req: Processing, parameters: dict[str, Any]) -> ImagesResponse:
    job = status.job
    compat.raise_for_job(job, FIELD_NAMES)
    images = compat.job_images(svc, status)
    infotexts = [read_png(data)["parameters"] or "" for _, data in images]
    encoded = [compat.b64(data) for _, data in images] if req.send_images else []
    return ImagesResponse(images=encoded, parameters=parameters, info=json.dumps(info(svc, job, images, infotexts)))


def info(svc: Services, job: JobRecord, images: list, infotexts: list[str]) -> dict[str, Any]:
    """The fields of A1111's `Processed.js()` that clients read, plus darkroom's job id and state."""
    request = job.request
    seeds = [image.seed for image, _ in images] or GenerationRequest.model_validate(request).seeds()
    model = job.result.get("model", {}) if job.result else {}
    n = request["n"]
    loras = request.get("loras") or []
    prompt = prompt_with_tags(request["prompt"], loras)  # as the client wrote it: A1111 keeps the tags in `prompt`
    return {
        "prompt": prompt,
        "all_prompts": [prompt] * n,
        "negative_prompt": request["negative_prompt"],
        "all_negative_prompts": [request["negative_prompt"]] * n,
        "seed": seeds[0],
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * len(seeds),
        "subseed_strength": 0,
        "width": request["width"],
        "height": request["height"],
        "sampler_name": request["sampler"],
        "cfg_scale": request["guidance_scale"],
        "steps": request["steps"],
        "batch_size": n,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": request["model"],
        "sd_model_hash": (model.get("sha256") or "")[:10] or None,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": denoising_strength(request),
        "extra_generation_params": extra_params(request),
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": [],
        "job_timestamp": (job.started_at or job.created_at).strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": False,
        "version": f"darkroom {__version__}",
        "job_id": job.id,
        "state": job.state.value,
    }


def denoising_strength(request: dict[str, Any]) -> float | None:
    if request.get("init_image"):
        return float(request["strength"])
    hires = request.get("hires")
    return float(hires["denoising_strength"]) if hires else None


def extra_params(request: dict[str, Any]) -> dict[str, Any]:
    """A1111's `extra_generation_params`: the adapter hashes and hires fields its infotext carries."""
    extra: dict[str, Any] = {key: value for key, value in hires.infotext_fields(request) if key != "Denoising strength"}
    if request.get("loras"):
        extra["Lora hashes"] = lora_hashes(request["loras"])
    if request.get("embeddings"):
        extra["TI hashes"] = lora_hashes(request["embeddings"])
    extra.update(refiner_fields(request) + controlnet_fields(request))
    return extra


def echo(req: Processing, include_images: bool = False) -> dict[str, Any]:
    """`parameters` as A1111 returns it: the request with defaults filled in, images left out unless asked for."""
    out = req.model_dump()
    if not include_images:
        out.update({k: None for k in ("init_images", "mask") if k in out})
    return out


# --- generation -----------------------------------------------------------------------------------------------------


def styled(request: Request, req: P) -> P:
    """`styles` are the tenant's prompt templates (`darkroom.models.templates`), applied as A1111 applies styles."""
    if not req.styles:
        return req
    store = templates.TemplateStore(services(request).store.engine)
    prompt, negative = templates.apply_styles(
        store, principal(request).tenant, req.styles, req.prompt, req.negative_prompt or ""
    )
    return req.model_copy(update={"prompt": prompt, "negative_prompt": negative})


@router.post("/txt2img", response_model=ImagesResponse, summary="A1111 txt2img: waits and returns base64 PNGs")
async def txt2img(request: Request, req: Txt2ImgRequest) -> ImagesResponse:
    svc = services(request)
    req = await run_in_threadpool(styled, request, req)
    body = await run_in_threadpool(lambda: to_generation(svc, req, hires=hires_fix(req)))
    job = await compat.submit_and_wait(request, body, {}, FIELD_NAMES)
    return await run_in_threadpool(images_response, svc, job, req, echo(req))


@router.post("/img2img", response_model=ImagesResponse, summary="A1111 img2img and inpainting (with `mask`)")
async def img2img(request: Request, req: Img2ImgRequest) -> ImagesResponse:
    svc = services(request)
    req = await run_in_threadpool(styled, request, req)
    body = await run_in_threadpool(prepare_img2img, svc, req)
    job = await compat.submit_and_wait(request, body, {}, FIELD_NAMES)
    return await run_in_threadpool(images_response, svc, job, req, echo(req, req.include_init_images))


# --- state: progress, interrupt, skip ---------------------------------------------------------------------------------


def current_job(svc: Services, who: Principal) -> JobRecord | None:
    """The caller's most recently started running job (A1111 has one job at a time; darkroom has one per tenant)."""
    listed = svc.store.list(state=JobState.running, limit=50, tenant=who.tenant)
    running = [j for j in listed if sees_job(who, j)]
    return max(running, key=lambda j: j.started_at or j.created_at) if running else None


def waiting_jobs(svc: Services, who: Principal) -> int:
    """A1111's `job_count`: the caller's queued and running jobs (its tenant's, or its own for a `user` key), never
    other tenants'. Counted up to `MAX_JOB_COUNT` on the (tenant, state) index: a poll must not scan the table."""
    where = [jobs.c.tenant == who.tenant, jobs.c.state.in_([JobState.queued.value, JobState.running.value])]
    if not who.can(Permission.read_tenant_jobs):
        where.append(jobs.c.key_id == (who.key_id or ""))
    capped = sa.select(jobs.c.id).where(*where).limit(MAX_JOB_COUNT).subquery()
    with read_tx(svc.store.engine) as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(capped)).scalar_one())


def progress_view(svc: Services, who: Principal, skip_current_image: bool) -> dict[str, Any]:
    waiting = waiting_jobs(svc, who)
    job = current_job(svc, who)
    state = {
        "skipped": False,
        "interrupted": False,
        "stopping_generation": False,
        "job": "",
        "job_count": waiting,
        "job_timestamp": "0",
        "job_no": 0,
        "sampling_step": 0,
        "sampling_steps": 0,
    }
    if job is None:
        return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
    fraction = job.progress_step / job.progress_total if job.progress_total else 0.0
    started = job.started_at or job.created_at
    elapsed = (dt.datetime.now(dt.UTC) - started).total_seconds()
    eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
    state.update(
        job=job.id,
        interrupted=job.cancel_requested,
        job_timestamp=started.strftime("%Y%m%d%H%M%S"),
        sampling_step=job.progress_step,
        sampling_steps=job.progress_total,
    )
    asked = bool(job.request.get("preview"))  # only a job that asked for previews shows one, as A1111 does
    preview = latest_preview(svc, job) if asked and not skip_current_image else None
    return {
        "progress": round(fraction, 4),
        "eta_relative": round(max(eta, 0.0), 2),
        "state": state,
        "current_image": preview,
        "textinfo": f"darkroom job {job.id}: step {job.progress_step}/{job.progress_total}",
    }


def live_previews(svc: Services) -> bool:
    """Whether A1111 jobs ask for previews: A1111 records them when `live_previews_enable` is on and
    `show_progress_every_n_steps` is positive (options set with POST /options; on by default, as in A1111)."""
    options = {**BASE_OPTIONS, **(compat.kv(svc).get(OPTIONS_KEY, {}) or {})}
    try:
        every = int(options.get("show_progress_every_n_steps") or 0)
    except (TypeError, ValueError):
        every = 0
    return bool(options.get("live_previews_enable")) and every > 0


def latest_preview(svc: Services, job: JobRecord) -> str | None:
    """The preview a worker recorded in a recent progress event (`preview`: base64 PNG or JPEG, or a data URL),
    as A1111 sends it: bare base64 of a PNG (workers record JPEGs; A1111 documents a PNG). None when there is none."""
    query = (
        sa.select(job_events.c.data)
        .where(job_events.c.job_id == job.id, job_events.c.type == "progress")
        .order_by(job_events.c.id.desc())
        .limit(20)
    )
    with read_tx(svc.store.engine) as conn:
        for (data,) in conn.execute(query):
            if data and data.get("preview"):
                return _as_png(str(data["preview"]).split(",", 1)[-1])
    return None


def _as_png(b64: str) -> str | None:
    try:
        with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
            return compat.b64(png_bytes(image.convert("RGB")))
    except (ValueError, OSError):
        return None


@router.get("/progress", summary="Progress of the current job (the most recently started running one)")
def progress(request: Request, skip_current_image: bool = False) -> dict[str, Any]:
    return progress_view(services(request), principal(request), skip_current_image)


def _stop_current(svc: Services, who: Principal) -> None:
    job = current_job(svc, who)
    if job is None:
        return
    with contextlib.suppress(Conflict):  # it finished between the look and the cancel
        svc.store.cancel(job.id, record=lambda conn, state: audit.record(conn, who, "job.cancel", job.id, state))


@router.post("/interrupt", summary="Stop the current job at its next step")
def interrupt(request: Request) -> dict[str, Any]:
    _stop_current(services(request), principal(request))
    return {}


@router.post("/skip", summary="Like interrupt: darkroom runs a job's images as one unit")
def skip(request: Request) -> dict[str, Any]:
    _stop_current(services(request), principal(request))
    return {}


# --- models, options, lists -----------------------------------------------------------------------------------------


@router.get("/sd-models", summary="Checkpoints, as A1111 lists them")
def sd_models(request: Request) -> list[dict[str, Any]]:
    return [
        {
            "title": compat.a1111_title(m),
            "model_name": m.id,
            "hash": m.sha256[:10],
            "sha256": m.sha256,
            "filename": os.path.basename(m.path),
            "config": None,
        }
        for m in model_access.offered_checkpoints(services(request), tenant_policy(request))
    ]


@router.post("/refresh-checkpoints", summary="Rescan the models folder")
def refresh_checkpoints(request: Request) -> None:
    services(request).registry.rescan()


def options_view(svc: Services) -> dict[str, Any]:
    model = compat.default_model(svc)
    stored = compat.kv(svc).get(OPTIONS_KEY, {}) or {}
    return {
        **BASE_OPTIONS,
        **stored,
        "sd_model_checkpoint": compat.a1111_title(model),
        "sd_checkpoint_hash": model.sha256,
    }


def set_options(svc: Services, who: Principal, values: dict[str, Any]) -> None:
    """`sd_model_checkpoint` chooses the default model (checked, stored in the database for every process); other
    options are kept and echoed back by GET, but change nothing in how darkroom renders. Audited as a settings
    change."""
    values = dict(values)
    checkpoint = values.pop("sd_model_checkpoint", None)
    values.pop("sd_checkpoint_hash", None)
    store = compat.kv(svc)
    changed: dict[str, Any] = {}
    if checkpoint:
        changed["default_model"] = compat.find_model(svc, str(checkpoint), "sd_model_checkpoint").id
        store.set(DEFAULT_MODEL, changed["default_model"])
    if values:
        store.set(OPTIONS_KEY, {**(store.get(OPTIONS_KEY, {}) or {}), **values})
        changed["options"] = sorted(values)
    if changed:
        svc.audit.record(who, "settings.update", "a1111.options", changed)


@router.get("/options", summary="Options; `sd_model_checkpoint` is the default model")
def get_options(request: Request) -> dict[str, Any]:
    return options_view(services(request))


@router.post("/options", summary="Set options; `sd_model_checkpoint` chooses the default model")
def post_options(
    request: Request, values: dict[str, Any], who: Principal = Depends(require(Permission.models))
) -> None:
    set_options(services(request), who, values)


@router.get("/samplers", summary="Sampler names")
def samplers() -> list[dict[str, Any]]:
    return [{"name": s.name, "aliases": list(s.aliases), "options": {}} for s in SAMPLERS]


@router.get("/schedulers", summary="Noise schedules a sampler can be combined with")
def schedulers() -> list[dict[str, Any]]:
    return SCHEDULERS


@router.get("/loras", summary="LoRA adapters in models/loras/ (`path` is relative to that folder)")
def loras(request: Request) -> list[dict[str, Any]]:
    svc = services(request)
    return [
        {"name": a.name, "alias": a.alias, "path": a.relpath, "metadata": a.metadata}
        for a in model_access.offered(svc, tenant_policy(request), "lora", svc.registry.loras(), _name, _sha)
    ]


def _name(adapter: AdapterInfo) -> str:
    return adapter.name


def _sha(adapter: AdapterInfo) -> str:
    return adapter.sha256


@router.get("/prompt-styles", summary="Styles: the tenant's prompt templates (see /v1/templates)")
def prompt_styles(request: Request) -> list[dict[str, str]]:
    store = templates.TemplateStore(services(request).store.engine)
    return [templates.as_style(named) for named in store.list("template", principal(request).tenant)]


@router.post("/refresh-loras", summary="Rescan models/loras/ (darkroom rescans on every request anyway)")
def refresh_loras(request: Request) -> None:
    services(request).registry.loras()


@router.get("/sd-vae", summary="Separate VAEs (none: each model brings its own)")
def sd_vae() -> list[dict[str, Any]]:
    return []


@router.get("/embeddings", summary="Textual-inversion embeddings in models/embeddings/, by token")
def embeddings(request: Request) -> dict[str, Any]:
    """A1111's shape. Every readable file is `loaded` (darkroom loads an embedding into the pipeline only for the
    prompts that use it; one that does not fit the model fails that job), files without a tensor are `skipped`."""
    svc = services(request)
    loaded: dict[str, Any] = {}
    skipped: dict[str, Any] = {}
    for info in model_access.offered(svc, tenant_policy(request), "embedding", svc.registry.embeddings(), _name, _sha):
        try:
            vectors, shape = embedding_shape(info.path)
        except Exception:  # no tensors, or a header that lies: not an embedding
            skipped[info.name] = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None}
            continue
        loaded[info.name] = {
            "step": _int_or_none(info.metadata.get("step")),
            "sd_checkpoint": info.metadata.get("sd_checkpoint"),
            "sd_checkpoint_name": info.metadata.get("sd_checkpoint_name"),
            "shape": shape,
            "vectors": vectors,
        }
    return {"loaded": loaded, "skipped": skipped}


@router.post("/refresh-embeddings", summary="Rescan models/embeddings/")
def refresh_embeddings(request: Request) -> None:
    services(request).registry.embeddings()


def embedding_shape(path: str) -> tuple[int, int]:
    """(vectors, width) from the safetensors header alone: A1111's `emb_params`, diffusers' single tensor, or SDXL's
    `clip_l` (the first encoder's width, as A1111 reports it)."""
    header = safetensors_header(Path(path))
    keys = [k for k in header if k != "__metadata__"]
    key = "clip_l" if "clip_l" in keys else "emb_params" if "emb_params" in keys else keys[0]
    shape = [int(n) for n in header[key]["shape"]]
    return (shape[0], shape[-1]) if len(shape) > 1 else (1, shape[0])


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


class PngInfoRequest(BaseModel):
    image: str


@router.post("/png-info", summary="The generation parameters a PNG carries")
def png_info(request: Request, body: PngInfoRequest) -> dict[str, Any]:
    limits = services(request).settings.limits
    data = decode_base64_image(body.image, limits, "image")
    open_image(data, limits, "image")  # the same checks as any upload before reading its chunks
    meta = read_png(data)
    items = {"darkroom": meta["provenance"]} if meta["provenance"] else {}
    return {"info": meta["parameters"] or "", "items": items, "parameters": {}}


# --- upscalers and extras -------------------------------------------------------------------------------------------

EXTRAS_FIELDS = {  # internal field → the extras field a client sent
    "upscale.upscaler": "upscaler_1",
    "upscale.scale": "upscaling_resize",
    "upscale.width": "upscaling_resize_w",
    "init_image": "image",
}


class ExtrasRequest(BaseModel):
    """A1111's extras (postprocessing) fields with its defaults. Face restoration and a second upscaler blended in
    are refused (422 naming the field) rather than ignored."""

    model_config = ConfigDict(extra="ignore")

    resize_mode: int = Field(0, ge=0, le=1, description="0: upscaling_resize is a factor; 1: to _w x _h")
    show_extras_results: bool = True
    gfpgan_visibility: float = Field(0, ge=0, le=1)
    codeformer_visibility: float = Field(0, ge=0, le=1)
    codeformer_weight: float = Field(0, ge=0, le=1)
    upscaling_resize: float = Field(2, gt=0, le=8)
    upscaling_resize_w: int = Field(512, ge=1)
    upscaling_resize_h: int = Field(512, ge=1)
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = Field(0, ge=0, le=1)
    upscale_first: bool = False


class ExtrasSingleImageRequest(ExtrasRequest):
    image: str = Field("", description="base64 image")


class FileData(BaseModel):
    data: str = Field(description="base64 image")
    name: str = ""


class ExtrasBatchImagesRequest(ExtrasRequest):
    imageList: list[FileData] = Field(default_factory=list, max_length=64)  # noqa: N815  # A1111's name


class ExtrasSingleImageResponse(BaseModel):
    html_info: str
    image: str | None = None


class ExtrasBatchImagesResponse(BaseModel):
    html_info: str
    images: list[str]


def extras_request(svc: Services, req: ExtrasRequest, image: str, field: str) -> GenerationRequest:
    """One image's upscale job, every extras field checked before anything is queued."""
    for name in ("gfpgan_visibility", "codeformer_visibility"):
        if getattr(req, name) > 0:
            raise InvalidRequest(f"{name}: face restoration is not available in darkroom", field=name)
    if req.upscaler_2 != "None" and req.extras_upscaler_2_visibility > 0:
        raise InvalidRequest("upscaler_2: blending a second upscaler is not supported", field="upscaler_2")
    if not image:
        raise InvalidRequest(f"{field}: an image is needed", field=field)
    try:
        if req.resize_mode == 0:
            spec = UpscaleSpec(upscaler=req.upscaler_1, scale=req.upscaling_resize)
        else:
            size = {"width": req.upscaling_resize_w, "height": req.upscaling_resize_h}
            spec = UpscaleSpec(upscaler=req.upscaler_1, crop=req.upscaling_crop, **size)
    except ValidationError as exc:  # only the upscaler's name can fail here (empty or too long)
        raise InvalidRequest(f"upscaler_1: {exc.errors()[0]['msg']}", field="upscaler_1") from None
    body = GenerationRequest(prompt=UPSCALE_PROMPT, init_image=image, upscale=spec, model=compat.default_model(svc).id)
    return body


async def run_extras(request: Request, bodies: list[GenerationRequest], field: str) -> list[tuple[str, str]]:
    """Queue one upscale job per image and wait for each: (base64 PNG, its infotext) in order. Every upscaler and
    size is checked before the first job is queued, so a bad request queues nothing."""
    svc = services(request)
    names = {**EXTRAS_FIELDS, "init_image": field}
    for body in bodies:
        try:
            upscalers.pin(svc.registry, body)
            check_limits(upscale_source_size(body, svc.settings.limits), svc.settings.limits)
        except InvalidRequest as exc:
            raise compat.renamed(exc, names) from None
    out: list[tuple[str, str]] = []
    for body in bodies:
        status = await compat.submit_and_wait(request, body, {}, names)
        compat.raise_for_job(status.job, names)
        images = await run_in_threadpool(compat.job_images, svc, status)
        out += [(compat.b64(data), read_png(data)["parameters"] or "") for _, data in images]
    return out


@router.get("/upscalers", summary="Upscalers for hr_upscaler and the extras: built-in, then models/upscalers/")
def list_upscalers(request: Request) -> list[dict[str, Any]]:
    policy = tenant_policy(request)
    listed = upscalers.listing(services(request).registry)
    return [u for u in listed if u["model_name"] is None or model_access.may_use(policy, "upscaler", u["name"])]


@router.get("/latent-upscale-modes", summary="Latent upscale modes (hr_upscaler only)")
def latent_upscale_modes() -> list[dict[str, Any]]:
    return [{"name": name} for name in upscalers.LATENT_MODES]


@router.post("/extra-single-image", response_model=ExtrasSingleImageResponse, summary="Upscale one image (a job)")
async def extra_single_image(request: Request, req: ExtrasSingleImageRequest) -> ExtrasSingleImageResponse:
    svc = services(request)
    try:
        body = await run_in_threadpool(extras_request, svc, req, req.image, "image")
    except InvalidRequest as exc:
        raise compat.renamed(exc, EXTRAS_FIELDS) from None
    [(image, info)] = await run_extras(request, [body], "image")
    return ExtrasSingleImageResponse(html_info=info, image=image)


@router.post("/extra-batch-images", response_model=ExtrasBatchImagesResponse, summary="Upscale images (a job each)")
async def extra_batch_images(request: Request, req: ExtrasBatchImagesRequest) -> ExtrasBatchImagesResponse:
    svc = services(request)
    if not req.imageList:
        raise InvalidRequest("imageList: at least one image is needed", field="imageList")
    try:
        bodies = [await run_in_threadpool(extras_request, svc, req, item.data, "imageList") for item in req.imageList]
    except InvalidRequest as exc:
        raise compat.renamed(exc, {**EXTRAS_FIELDS, "init_image": "imageList"}) from None
    done = await run_extras(request, bodies, "imageList")
    return ExtrasBatchImagesResponse(html_info=done[0][1] if done else "", images=[image for image, _ in done])
