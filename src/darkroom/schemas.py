"""Types every part shares. The three public APIs translate into `GenerationRequest`; workers read only this."""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationInfo, field_validator, model_validator

from darkroom.config import DataLabel, Limits
from darkroom.errors import InvalidRequest
from darkroom.webhooks.guard import MAX_URL_CHARS, WebhookRefused, validate_url

Priority = Literal["high", "normal", "low"]
WebhookEvent = Literal[
    "queued", "started", "progress", "retrying", "requeued", "succeeded", "failed", "cancelled", "dead", "completed"
]
WEBHOOK_EVENTS: tuple[str, ...] = get_args(WebhookEvent)
PRIORITY_VALUE: dict[str, int] = {"high": 2, "normal": 1, "low": 0}
PRIORITY_NAME: dict[int, str] = {v: k for k, v in PRIORITY_VALUE.items()}


class JobState(enum.StrEnum):
    """Job lifecycle.

    queued → running → succeeded | failed | cancelled. A running job whose lease expires goes back to queued.
    `dead`: the job used its last attempt (lease expired or transient error every time); the last error is kept.
    """

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    dead = "dead"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.succeeded, JobState.failed, JobState.cancelled, JobState.dead})
TEMPLATE_PROMPT = "(template)"  # the prompt of a request whose template has not been rendered yet
MAX_LORAS = 16  # A1111 users stack a handful; each one is loaded per pass, so the count is bounded
MAX_TAGS = 16  # labels to find a job's images by; each is a row of `job_tags`
MAX_TAG_CHARS = 32
# A tag is stored lower-case and trimmed, so `Product` and ` product ` find the same images; no control characters.
Tag = Annotated[
    str,
    StringConstraints(
        strip_whitespace=True, to_lower=True, min_length=1, max_length=MAX_TAG_CHARS, pattern=r"^[^\x00-\x1f\x7f]+$"
    ),
]


class LoraSpec(BaseModel):
    """One LoRA of a request: a file in `models/loras/` by name, with its strength. The API pins `sha256` to the
    file it validated, so the worker runs (and the PNG records) exactly that version or fails the job."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, description="file name without .safetensors (see /sdapi/v1/loras)")
    weight: float = Field(1.0, ge=-10.0, le=10.0, description="strength; 0 gives the base model's exact pixels")
    sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="filled in at submit; a client may send it to pin a version"
    )


class EmbeddingSpec(BaseModel):
    """A textual-inversion embedding a request's prompt uses, pinned at submit like a LoRA (for the worker and the
    provenance): the server fills the list from the prompt and negative prompt; a client's own list is replaced."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class AdapterInfo(BaseModel):
    """A LoRA or textual-inversion embedding file as the registry lists it. No torch here: the API reads this too."""

    kind: Literal["lora", "embedding"]
    name: str = Field(description="the file name without .safetensors: `<lora:NAME:w>`, or the embedding's token")
    alias: str
    path: str = Field(description="absolute path (kept off the API: it shows `relpath`)")
    relpath: str = Field(description="path inside models/loras/ or models/embeddings/")
    sha256: str
    size_bytes: int
    metadata: dict[str, str] = Field(default_factory=dict, description="the safetensors header's metadata")


class WorkflowSpec(BaseModel):
    """The ComfyUI workflow a job was compiled from (api/comfyui): kept verbatim for provenance and the PNG's
    `prompt` text chunk, with what the ComfyUI API needs to answer for the job (its queue, history and WebSocket
    messages name nodes). Workers do not read it: the job's other fields say everything that runs."""

    model_config = ConfigDict(extra="forbid")

    prompt: dict[str, Any] = Field(description="the API-format workflow as submitted")
    client_id: str | None = Field(None, max_length=200, description="ComfyUI's `client_id`: whose /ws hears of it")
    outputs: list[str] = Field(default_factory=list, description="ids of the output nodes (SaveImage, PreviewImage)")
    sampler_node: str | None = Field(None, description="the node progress is reported for (the last KSampler)")
    extra_data: dict[str, Any] = Field(default_factory=dict, description="ComfyUI's `extra_data` (extra_pnginfo)")


MAX_HIRES_SCALE = 8.0  # A1111's slider stops at 4; 8 leaves room, and the pixel limits bound the target anyway


class HiresSpec(BaseModel):
    """Hires fix as A1111 runs it: the first pass at the request's size, an upscale (`upscaler`: a latent mode,
    Lanczos, Nearest or a model in `models/upscalers/`), then an img2img pass at the target size that adds detail.
    The target is `scale` times the size, or `resize_x`/`resize_y` when given (one of them: the other follows the
    aspect ratio); it is rounded down to a multiple of 8, as the UNet needs."""

    model_config = ConfigDict(extra="forbid")

    scale: float = Field(2.0, ge=1.0, le=MAX_HIRES_SCALE, description="A1111 `hr_scale`")
    upscaler: str = Field(
        "Latent", min_length=1, max_length=200, description="see /sdapi/v1/upscalers and latent modes"
    )
    second_pass_steps: int = Field(0, ge=0, description="A1111 `hr_second_pass_steps`; 0: the request's steps")
    denoising_strength: float = Field(0.7, gt=0.0, le=1.0, description="how far the second pass moves from the upscale")
    resize_x: int = Field(0, ge=0, description="A1111 `hr_resize_x`: target width (0: from scale or resize_y)")
    resize_y: int = Field(0, ge=0, description="A1111 `hr_resize_y`: target height (0: from scale or resize_x)")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="a model upscaler's file, pinned at submit")

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """A1111's `calculate_target_resolution`, except that both resize values give exactly that size."""
        if not self.resize_x and not self.resize_y:
            x, y = int(width * self.scale), int(height * self.scale)
        elif not self.resize_y:
            x, y = self.resize_x, self.resize_x * height // width
        elif not self.resize_x:
            x, y = self.resize_y * width // height, self.resize_y
        else:
            x, y = self.resize_x, self.resize_y
        return max(8, x // 8 * 8), max(8, y // 8 * 8)

    def steps(self, first_pass_steps: int) -> int:
        return self.second_pass_steps or first_pass_steps

    def size_field(self) -> str:
        """The field a target that is too large is blamed on."""
        return "hires.resize_x" if self.resize_x else "hires.resize_y" if self.resize_y else "hires.scale"


class UpscaleSpec(BaseModel):
    """An upscale job (`POST /v1/upscale`, A1111's extras): the request's `init_image` upscaled by `scale`, or to
    `width` x `height` (`crop`: cover that size and cut the middle, as A1111's `upscaling_crop`; else stretch). No
    diffusion runs: the request's width and height are the source's."""

    model_config = ConfigDict(extra="forbid")

    upscaler: str = Field(min_length=1, max_length=200, description="see /sdapi/v1/upscalers")
    scale: float | None = Field(None, gt=0.0, le=MAX_HIRES_SCALE, description="factor; absent: width and height")
    width: int | None = Field(None, ge=1, description="target width (with height, instead of scale)")
    height: int | None = Field(None, ge=1, description="target height (with width, instead of scale)")
    crop: bool = Field(True, description="to width x height: crop to fit (true) or stretch (false)")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="a model upscaler's file, pinned at submit")

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        if self.scale is not None:
            return max(1, round(width * self.scale)), max(1, round(height * self.scale))
        if self.width is None or self.height is None:
            raise InvalidRequest("upscale needs scale, or width and height", field="upscale.scale")
        return self.width, self.height

    def size_field(self) -> str:
        return "upscale.scale" if self.scale is not None else "upscale.width"


MAX_CONTROLNET_UNITS = 4  # A1111's ControlNet extension shows 3 units by default; each one is a model per step
ControlMode = Literal["balanced", "prompt", "control"]
ResizeMode = Literal["resize", "crop", "fill"]


class ControlNetUnit(BaseModel):
    """One ControlNet unit: a control image, the preprocessor that turns it into a control map (`module`), and the
    ControlNet model in `models/controlnet/` that steers the UNet with it. The API stores the image and pins the
    model's sha256 at submit, so the worker runs (and the PNG records) exactly that version."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(min_length=1, description="the control image: base64 (API) or blob:<sha256> (stored)")
    module: str = Field(
        "none", min_length=1, max_length=100, description="preprocessor (see /controlnet/module_list); none: as is"
    )
    model: str = Field(min_length=1, max_length=200, description="a ControlNet in models/controlnet/ (model_list)")
    weight: float = Field(1.0, ge=0.0, le=2.0, description="conditioning scale; 0: no effect")
    guidance_start: float = Field(0.0, ge=0.0, le=1.0, description="fraction of the steps where the unit starts")
    guidance_end: float = Field(1.0, ge=0.0, le=1.0, description="fraction of the steps where the unit stops")
    control_mode: ControlMode = Field(
        "balanced", description="balanced; prompt: my prompt is more important; control: ControlNet is more important"
    )
    resize_mode: ResizeMode = Field(
        "crop", description="to the output size: resize (stretch), crop (cover, cut the middle), fill (fit, pad)"
    )
    threshold_a: float | None = Field(None, description="the preprocessor's first parameter (canny: low threshold)")
    threshold_b: float | None = Field(None, description="the preprocessor's second parameter (canny: high threshold)")
    sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="the model file's, filled in at submit (a client may pin it)"
    )

    @field_validator("guidance_end")
    @classmethod
    def _guidance_range(cls, v: float, info: ValidationInfo) -> float:
        start = info.data.get("guidance_start")
        if start is not None and v <= start:
            raise ValueError(f"guidance_end ({v:g}) must be greater than guidance_start ({start:g})")
        return v

    def key(self) -> tuple[Any, ...]:
        """What decides how the unit runs, the image aside (images may differ within a batch, like prompts)."""
        return tuple(v for k, v in self.model_dump().items() if k != "image")


class RefinerSpec(BaseModel):
    """SDXL's refiner (A1111 `refiner_checkpoint`, `refiner_switch_at`): the base model denoises the first
    `switch_at` of the schedule, the refiner model the rest, from the base's latents."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=200, description="a registered SDXL (refiner) model id")
    switch_at: float = Field(0.8, gt=0.0, lt=1.0, description="fraction of the steps after which the refiner runs")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="the refiner's version, pinned at submit")


class GenerationRequest(BaseModel):
    """One generation, as every API expresses it after translation. Stored verbatim in the job row."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, description="what to draw")
    negative_prompt: str = ""
    width: int = Field(512, ge=1)
    height: int = Field(512, ge=1)
    steps: int = Field(20, ge=1)
    guidance_scale: float = Field(7.0, ge=0.0)
    sampler: str = "Euler a"
    seed: int | None = Field(None, description="-1 or absent: a random seed is picked and recorded")
    n: int = Field(1, ge=1, description="number of images; image i uses seed + i")
    model: str | None = Field(None, description="model id from /v1/models; absent: the default model")
    model_sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="set by the server: the approved version (sha256) of the model the job runs on",
    )
    init_image: str | None = Field(
        None, min_length=1, description="img2img source: base64 image (API) or blob:<sha256> (stored)"
    )
    strength: float = Field(0.75, gt=0.0, le=1.0, description="img2img: how far to move from the source")
    mask_image: str | None = Field(
        None,
        min_length=1,
        description="inpainting (with init_image): white repaints, black keeps; base64 (API) or blob:<sha256> (stored)",
    )
    mask_crop_padding: int | None = Field(
        None,
        ge=0,
        description="inpainting: work on a crop around the mask with this margin (px) at full size, then paste it "
        "back (A1111's inpaint_full_res); absent: the whole image",
    )
    priority: Priority = "normal"
    data_label: DataLabel | None = Field(
        None,
        description="confidential work never reaches an external engine; the stricter of this and the tenant's "
        "label applies (absent: the tenant's, else routing.default_label)",
    )
    webhook_url: str | None = Field(
        None,
        max_length=MAX_URL_CHARS,
        description="POSTed signed JSON on the events in webhook_events (see docs/api.md): an http(s) URL with a "
        "host, no user name or password, no whitespace or control characters",
    )
    webhook_events: list[WebhookEvent] = Field(
        default_factory=lambda: ["completed"],  # type: ignore[arg-type]  # a list of the Literal; mypy reads list[str]
        max_length=len(WEBHOOK_EVENTS),
        description="which events to deliver; `completed` stands for succeeded, failed, cancelled and dead",
    )
    timeout_seconds: float | None = Field(None, gt=0, description="fail the job if it runs longer than this")
    preview: bool = Field(False, description="attach low-resolution previews to progress events (SSE, WebSocket)")
    tags: list[Tag] = Field(
        default_factory=list,
        max_length=MAX_TAGS,
        description=f"labels to find the job's images by (the gallery, `GET /v1/jobs?tag=`): at most {MAX_TAGS}, each "
        f"1-{MAX_TAG_CHARS} characters, stored trimmed and lower-case",
    )
    workflow: WorkflowSpec | None = Field(
        None, description="set by the ComfyUI API: the workflow this job was compiled from (provenance)"
    )
    client_options: dict[str, str | int] | None = Field(
        None,
        description="set by the OpenAI API: what the client asked for that shapes the answer, not the pixels "
        "(output_format, output_compression, background, quality's name), kept for provenance",
    )
    loras: list[LoraSpec] = Field(
        default_factory=list,
        max_length=MAX_LORAS,
        description="LoRA adapters from models/loras/ with their weights (A1111: `<lora:name:weight>` in the prompt)",
    )
    embeddings: list[EmbeddingSpec] | None = Field(
        None,
        max_length=64,
        description="set by the server: the embeddings (models/embeddings/) whose name is a word of the prompt or "
        "negative prompt, with their sha256",
    )
    hires: HiresSpec | None = Field(None, description="hires fix (txt2img only): first pass, upscale, second pass")
    upscale: UpscaleSpec | None = Field(
        None, description="set by /v1/upscale and A1111's extras: upscale init_image, no diffusion"
    )
    controlnet: list[ControlNetUnit] = Field(
        default_factory=list,
        max_length=MAX_CONTROLNET_UNITS,
        description="ControlNet units (models/controlnet/), each with its control image and preprocessor",
    )
    refiner: RefinerSpec | None = Field(None, description="SDXL refiner: a second model for the last steps")

    template: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="a prompt template of the tenant: NAME (newest version) or NAME@VERSION; the job records "
        "NAME@VERSION, and the prompt may be left out (the template makes it)",
    )
    variables: dict[str, str | int | float | bool] | None = Field(
        None, max_length=100, description="the template's variables by name (typed: see the template)"
    )
    asset_type: str | None = Field(
        None, min_length=1, max_length=200, description="an asset type of the tenant (size, model, n): NAME[@VERSION]"
    )

    @model_validator(mode="before")
    @classmethod
    def _template_prompt(cls, data: Any) -> Any:
        """A template makes the prompt: a request naming one may leave it out (`TEMPLATE_PROMPT` until rendered)."""
        if isinstance(data, dict) and data.get("template") and not data.get("prompt"):
            return {**data, "prompt": TEMPLATE_PROMPT}
        return data

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url(cls, v: str | None) -> str | None:
        """Checked strictly here, at submit: a URL the delivery log cannot store (NUL on PostgreSQL) or the SSRF
        guard would refuse anyway is a 422 now, not a failed delivery later."""
        if v is not None:
            try:
                validate_url(v)
            except WebhookRefused as exc:
                raise ValueError(str(exc)) from None
        return v

    @field_validator("webhook_events")
    @classmethod
    def _webhook_events(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))  # each event once: duplicates would only grow the stored row

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))  # each tag once

    @field_validator("loras")
    @classmethod
    def _loras(cls, v: list[LoraSpec]) -> list[LoraSpec]:
        names = [spec.name for spec in v]
        if len(set(names)) != len(names):
            raise ValueError("each LoRA may be named once")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int | None) -> int | None:
        if v is None or v == -1:
            return None
        if not 0 <= v < 2**32:
            raise ValueError("seed must be -1 or between 0 and 4294967295")
        return v

    @property
    def mode(self) -> Literal["txt2img", "img2img", "inpaint", "upscale"]:
        if self.upscale is not None:
            return "upscale"
        if not self.init_image:
            return "txt2img"
        return "inpaint" if self.mask_image else "img2img"

    def seeds(self) -> list[int]:
        if self.seed is None:
            raise ValueError("seed is resolved when the job is created")
        return [(self.seed + i) % 2**32 for i in range(self.n)]

    def batch_key(self) -> str:
        """Jobs with equal keys can share one pipeline call: same model, size, steps, sampler, guidance and mode.
        Prompts, seeds and source images may differ. The LoRA set (names, weights, pinned hashes) is part of the key:
        one pass runs with one set of adapters."""
        strength = self.strength if self.mode != "txt2img" else None
        parts: tuple[Any, ...] = (self.model, self.width, self.height, self.steps, self.sampler, self.guidance_scale)
        parts += (self.mode,)
        parts += (strength,)
        if self.loras:  # requests without adapters keep the keys they always had
            parts += (tuple(sorted((spec.name, spec.weight, spec.sha256) for spec in self.loras)),)
        if self.embeddings:  # a pass loads every embedding of its batch: another tenant's private token must never
            parts += (("embeddings", *sorted((e.name, e.sha256) for e in self.embeddings)),)  # reach this prompt
        if self.hires is not None:  # one pass plan per batch (the engine runs hires jobs one by one anyway)
            parts += (("hires", *self.hires.model_dump().values()),)
        if self.upscale is not None:
            parts += (("upscale", *self.upscale.model_dump().values()),)
        if self.controlnet:  # one pass runs one set of ControlNet models with one set of settings
            parts += (("controlnet", *(unit.key() for unit in self.controlnet)),)
        if self.refiner is not None:
            parts += (("refiner", *self.refiner.model_dump().values()),)
        if self.mask_crop_padding is not None:  # a crop-and-paste inpainting runs alone: it must not split a batch
            parts += (("crop", self.mask_crop_padding),)
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


def check_limits(req: GenerationRequest, limits: Limits) -> None:
    """Configured limits; raises InvalidRequest naming the field."""
    if req.upscale is not None:
        check_upscale_limits(req, req.upscale, limits)
        return
    for field, value, top in (("width", req.width, limits.max_width), ("height", req.height, limits.max_height)):
        if value % 8:
            raise InvalidRequest(f"{field} must be a multiple of 8 (got {value})", field=field)
        if not limits.min_side <= value <= top:
            raise InvalidRequest(f"{field} must be between {limits.min_side} and {top} (got {value})", field=field)
    if req.width * req.height > limits.max_pixels:
        raise InvalidRequest(
            f"width*height must be at most {limits.max_pixels} pixels (got {req.width * req.height})", field="width"
        )
    if req.steps > limits.max_steps:
        raise InvalidRequest(f"steps must be at most {limits.max_steps} (got {req.steps})", field="steps")
    if req.n > limits.max_n:
        raise InvalidRequest(f"n must be at most {limits.max_n} (got {req.n})", field="n")
    if req.guidance_scale > limits.max_guidance:
        raise InvalidRequest(f"guidance_scale must be at most {limits.max_guidance}", field="guidance_scale")
    for field in ("prompt", "negative_prompt"):
        if len(getattr(req, field)) > limits.max_prompt_chars:
            raise InvalidRequest(f"{field} must be at most {limits.max_prompt_chars} characters", field=field)
    if req.hires is not None:
        check_hires_limits(req, req.hires, limits)
    if req.refiner is not None and (req.mode != "txt2img" or req.hires is not None):
        raise InvalidRequest("the refiner runs on txt2img requests without hires fix", field="refiner")
    if req.controlnet and (req.hires is not None or req.refiner is not None):
        raise InvalidRequest("ControlNet units cannot be combined with hires fix or a refiner", field="controlnet")


def check_hires_limits(req: GenerationRequest, hires: HiresSpec, limits: Limits) -> None:
    """The second pass is a full generation at the target size: the same size and step limits apply to it."""
    if req.mode != "txt2img":
        raise InvalidRequest("hires fix is for txt2img requests (no init_image)", field="hires")
    check_target(hires.target_size(req.width, req.height), limits, hires.size_field(), "hires fix target")
    steps = hires.steps(req.steps)
    if steps > limits.max_steps:
        raise InvalidRequest(
            f"hires second pass steps must be at most {limits.max_steps}", field="hires.second_pass_steps"
        )
    if int(steps * hires.denoising_strength) < 1:
        raise InvalidRequest(
            f"second pass steps * denoising_strength must be at least 1 (got {steps} * {hires.denoising_strength})",
            field="hires.denoising_strength",
        )


def check_upscale_limits(req: GenerationRequest, upscale: UpscaleSpec, limits: Limits) -> None:
    if req.n != 1:
        raise InvalidRequest("an upscale job upscales one image", field="n")
    for field in ("mask_image", "hires", "refiner"):
        if getattr(req, field) is not None:
            raise InvalidRequest(f"an upscale job takes no {field}", field=field)
    if req.controlnet:
        raise InvalidRequest("an upscale job takes no controlnet units", field="controlnet")
    check_target(upscale.target_size(req.width, req.height), limits, upscale.size_field(), "upscale target")


def check_target(size: tuple[int, int], limits: Limits, field: str, what: str) -> None:
    width, height = size
    if width > limits.max_width or height > limits.max_height:
        raise InvalidRequest(
            f"{what} {width}x{height} is larger than {limits.max_width}x{limits.max_height}", field=field
        )
    if width * height > limits.max_pixels:
        raise InvalidRequest(f"{what} {width}x{height} is more than {limits.max_pixels} pixels", field=field)


class ModelDefaults(BaseModel):
    """A model's own parameters for what a request leaves out (an SDXL model wants 1024x1024, a turbo model 4 steps
    and no guidance): set in its `darkroom.json` / `NAME.json` as `"defaults": {...}`, shown in the listings."""

    model_config = ConfigDict(extra="forbid")

    width: int | None = Field(None, ge=8)
    height: int | None = Field(None, ge=8)
    steps: int | None = Field(None, ge=1)
    sampler: str | None = Field(None, min_length=1, max_length=100)
    guidance_scale: float | None = Field(None, ge=0.0)
    negative_prompt: str | None = None


class ModelInfo(BaseModel):
    """An approved model as the registry knows it. No torch here: the API reads this too."""

    id: str
    name: str
    format: Literal["diffusers", "single_file"]
    arch: str = Field(description="sd1 | sd2 | sdxl | sdxl-refiner | unknown")
    path: str
    sha256: str
    size_bytes: int
    smoke_test: bool = Field(False, description="random weights made by darkroom: for checking the plumbing only")
    description: str = ""
    defaults: ModelDefaults = Field(default_factory=ModelDefaults, description="applied to what a request leaves out")


class PublicModelInfo(BaseModel):
    """What the API shows of a model: no file-system path."""

    id: str
    name: str
    format: Literal["diffusers", "single_file"]
    arch: str
    sha256: str
    size_bytes: int
    smoke_test: bool = False
    description: str = ""
    defaults: ModelDefaults = Field(default_factory=ModelDefaults, description="applied to what a request leaves out")


class ImageView(BaseModel):
    id: str
    index: int
    seed: int
    width: int
    height: int
    sha256: str
    url: str | None = Field(description="null while the image is held for review, rejected or deleted")
    review_state: str = Field("none", description="none | pending | approved | rejected (review holds)")


class JobError(BaseModel):
    code: str
    message: str
    field: str | None = None


class JobProgress(BaseModel):
    step: int = 0
    total: int = 0


class JobView(BaseModel):
    """What clients see of a job."""

    id: str
    state: JobState
    priority: Priority
    created_at: dt.datetime
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    attempts: int
    queue_position: int | None = Field(
        None,
        description="1-based place in the claim order while queued; exact up to 1,000, and 1001 means further back"
        " (counting further would make every status read cost more as the queue grows)",
    )
    eta_seconds: float | None = Field(None, description="rough seconds to finish, from recent step rates")
    progress: JobProgress
    request: dict[str, Any]
    images: list[ImageView] = Field(default_factory=list)
    provenance: dict[str, Any] | None = None
    cache_hit: bool = Field(False, description="answered from the result cache: an identical seeded request's images")
    error: JobError | None = None
    request_id: str | None = None


class JobEvent(BaseModel):
    id: int
    job_id: str
    type: str  # queued | started | progress | succeeded | failed | cancelled | requeued | dead
    data: dict[str, Any] = Field(default_factory=dict)
    created_at: dt.datetime
