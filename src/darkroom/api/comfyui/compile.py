"""ComfyUI API-format workflows compiled into one darkroom job's fields: pure functions, no I/O but `read_input`.

A workflow is not interpreted node by node. The compiler walks back from the output nodes (SaveImage, PreviewImage)
through the graph and recognises the shapes standard workflows have: txt2img (EmptyLatentImage → KSampler), img2img
(LoadImage → VAEEncode → KSampler), inpainting (VAEEncodeForInpaint, or SetLatentNoiseMask), LoRA chains, hires fix as
two KSamplers with a latent or pixel upscale between them, a model or pixel upscale of a loaded image, and ControlNet
conditioning. Each becomes the fields of one `GenerationRequest`, which darkroom runs as any other job. A node outside
the supported set, or a supported node used in a shape darkroom cannot run as one job, is a `WorkflowInvalid` listing
every such node in ComfyUI's `node_errors` form, so nothing of such a workflow ever runs.

Mappings that are not exact: seeds are taken modulo 2**32 (darkroom's seed range); a hires second pass uses the first
pass's seed; ImageScale's bilinear, bicubic and area methods resample with Lanczos; VAEEncodeForInpaint's
`grow_mask_by` dilates the mask in pixels.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageFilter, ImageOps

OUTPUT_NODES = frozenset({"SaveImage", "PreviewImage"})
SUPPORTED_NODES = frozenset(
    {
        "CheckpointLoaderSimple",
        "CLIPTextEncode",
        "CLIPSetLastLayer",
        "EmptyLatentImage",
        "KSampler",
        "KSamplerAdvanced",
        "VAEDecode",
        "VAEEncode",
        "VAEEncodeForInpaint",
        "SetLatentNoiseMask",
        "LoadImage",
        "LoadImageMask",
        "LoraLoader",
        "LatentUpscale",
        "LatentUpscaleBy",
        "ImageScale",
        "ImageScaleBy",
        "UpscaleModelLoader",
        "ImageUpscaleWithModel",
        "ControlNetLoader",
        "ControlNetApply",
        "ControlNetApplyAdvanced",
        *OUTPUT_NODES,
    }
)
# ComfyUI sampler names → darkroom's (A1111's); the scheduler `karras` picks the Karras variant.
SAMPLERS = {
    "euler": "Euler",
    "euler_ancestral": "Euler a",
    "heun": "Heun",
    "dpm_2": "DPM2",
    "dpm_2_ancestral": "DPM2 a",
    "lms": "LMS",
    "dpmpp_sde": "DPM++ SDE",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "ddim": "DDIM",
    "uni_pc": "UniPC",
    "deis": "DEIS",
    "ddpm": "DDPM",
}
KARRAS_SAMPLERS = frozenset({"lms", "dpm_2", "dpm_2_ancestral", "dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde"})
SCHEDULERS = ("normal", "karras", "simple", "sgm_uniform", "ddim_uniform")
LATENT_METHODS = {"nearest-exact": "Latent (nearest-exact)", "bilinear": "Latent", "bicubic": "Latent (bicubic)"}
PIXEL_METHODS = {"nearest-exact": "Nearest", "lanczos": "Lanczos", "bilinear": "Lanczos", "bicubic": "Lanczos"}
PIXEL_METHODS["area"] = "Lanczos"
IMAGE_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

ReadInput = Callable[[str], bytes]  # an uploaded input image's bytes by LoadImage's `image` value; KeyError if none
ModelScale = Callable[[str], int]  # an upscale model's factor by name


@dataclass
class NodeProblem:
    node: str
    class_type: str
    message: str
    kind: str = "value_not_valid"
    input_name: str | None = None


class WorkflowInvalid(Exception):
    """The workflow cannot run: `problems` per node (ComfyUI's node_errors), or `kind`/`message` for the whole."""

    def __init__(self, message: str, problems: list[NodeProblem] | None = None, kind: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.problems = problems or []
        self.kind = kind or ("prompt_outputs_failed_validation" if self.problems else "invalid_prompt")


class _Problem(Exception):
    def __init__(self, problem: NodeProblem) -> None:
        super().__init__(problem.message)
        self.problem = problem


@dataclass
class Compiled:
    """One job's fields, the nodes they came from (to name a node when a field is refused), and the nodes the
    ComfyUI API reports on."""

    fields: dict[str, Any]
    outputs: list[str]
    sampler_node: str | None
    origin: dict[str, tuple[str, str]] = field(default_factory=dict)  # request field → (node id, class_type)


@dataclass
class _Image:
    """An IMAGE value: a loaded upload or a decoded sampler output, then pixel upscales (node, upscaler, params)."""

    node: str
    source: bytes | None = None
    sampled: _Sampled | None = None
    upscales: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)


@dataclass
class _Latent:
    node: str
    empty: tuple[int, int, int] | None = None  # width, height, batch
    image: _Image | None = None  # encoded pixels
    mask: tuple[str, bytes] | None = None  # (node, mask PNG: white repaints)
    sampled: _Sampled | None = None
    upscale: tuple[str, dict[str, Any]] | None = None  # a latent upscale of `sampled`: (node, HiresSpec fields)


@dataclass
class _Sampled:
    node: str
    fields: dict[str, Any]
    latent: _Latent
    denoise: float
    steps: int


class Compiler:
    def __init__(self, graph: dict[str, Any], read_input: ReadInput, model_scale: ModelScale) -> None:
        self.graph = graph
        self.read_input = read_input
        self.model_scale = model_scale
        self.origin: dict[str, tuple[str, str]] = {}

    # --- graph access -------------------------------------------------------------------------------------------

    def node(self, node_id: str) -> dict[str, Any]:
        return self.graph[node_id]

    def cls(self, node_id: str) -> str:
        return str(self.graph[node_id]["class_type"])

    def fail(
        self, node_id: str, message: str, input_name: str | None = None, kind: str = "value_not_valid"
    ) -> _Problem:
        return _Problem(NodeProblem(node_id, self.cls(node_id), message, kind, input_name))

    def value(self, node_id: str, name: str, default: Any = None) -> Any:
        inputs = self.node(node_id).get("inputs") or {}
        if name not in inputs:
            if default is None:
                raise self.fail(node_id, f"required input {name!r} is missing", name, "required_input_missing")
            return default
        got = inputs[name]
        if _is_link(got):
            raise self.fail(node_id, f"input {name!r} must be a value here, not a link", name)
        return got

    def number(self, node_id: str, name: str, kind: type, default: Any = None) -> Any:
        got = self.value(node_id, name, default)
        if isinstance(got, bool) or not isinstance(got, int | float):
            raise self.fail(node_id, f"input {name!r} must be a number (got {got!r})", name, "invalid_input_type")
        return kind(got)

    def link(self, node_id: str, name: str, classes: tuple[str, ...]) -> tuple[str, int]:
        """The node (and output index) an input is linked to, which must be one of `classes`."""
        inputs = self.node(node_id).get("inputs") or {}
        got = inputs.get(name)
        if got is None:
            raise self.fail(node_id, f"required input {name!r} is missing", name, "required_input_missing")
        if not _is_link(got) or str(got[0]) not in self.graph:
            raise self.fail(node_id, f"input {name!r} must link to a node of this workflow", name)
        source = str(got[0])
        if self.cls(source) not in classes:
            raise self.fail(
                node_id,
                f"input {name!r}: darkroom runs {', '.join(classes)} here, not {self.cls(source)} (node {source})",
                name,
            )
        return source, int(got[1])

    def note(self, request_field: str, node_id: str) -> None:
        self.origin.setdefault(request_field, (node_id, self.cls(node_id)))

    # --- images -------------------------------------------------------------------------------------------------

    def image(self, node_id: str, name: str) -> _Image:
        classes = ("LoadImage", "VAEDecode", "ImageUpscaleWithModel", "ImageScale", "ImageScaleBy")
        source, _ = self.link(node_id, name, classes)
        kind = self.cls(source)
        if kind == "LoadImage":
            return _Image(source, source=self.load(source))
        if kind == "VAEDecode":
            self.checkpoint_output(source, "vae", 2)
            latent = self.latent(source, "samples")
            if latent.sampled is None or latent.upscale is not None:
                raise self.fail(source, "darkroom decodes a KSampler's output only", "samples")
            return _Image(source, sampled=latent.sampled)
        inner = self.image(source, "image")
        if kind == "ImageUpscaleWithModel":
            loader, _ = self.link(source, "upscale_model", ("UpscaleModelLoader",))
            model = _stem(str(self.value(loader, "model_name")))
            inner.upscales.append((source, model, {"scale": float(self.model_scale(model))}))
        elif kind == "ImageScaleBy":
            method = self.pixel_method(source)
            inner.upscales.append((source, method, {"by": self.number(source, "scale_by", float)}))
        else:  # ImageScale
            method = self.pixel_method(source)
            if self.value(source, "crop", "disabled") not in ("disabled", "center"):
                raise self.fail(source, "crop must be disabled or center", "crop")
            size = {"width": self.number(source, "width", int), "height": self.number(source, "height", int)}
            inner.upscales.append(
                (source, method, {**size, "crop": self.value(source, "crop", "disabled") != "disabled"})
            )
        return inner

    def pixel_method(self, node_id: str) -> str:
        method = str(self.value(node_id, "upscale_method"))
        if method not in PIXEL_METHODS:
            raise self.fail(node_id, f"upscale_method {method!r} is not supported ({', '.join(PIXEL_METHODS)})")
        return PIXEL_METHODS[method]

    def load(self, node_id: str) -> bytes:
        name = str(self.value(node_id, "image"))
        try:
            return self.read_input(name)
        except KeyError:
            raise self.fail(node_id, f"image {name!r} is not an uploaded input (POST /upload/image)", "image") from None

    def mask(self, node_id: str, name: str) -> tuple[str, bytes]:
        """A MASK as a PNG, white where ComfyUI's mask is 1 (repaint): LoadImage's second output (its alpha) or
        LoadImageMask's channel."""
        source, index = self.link(node_id, name, ("LoadImage", "LoadImageMask"))
        with Image.open(io.BytesIO(self.load(source))) as img:
            channel = (
                "A" if self.cls(source) == "LoadImage" else str(self.value(source, "channel", "alpha"))[:1].upper()
            )
            if self.cls(source) == "LoadImage" and index != 1:
                raise self.fail(node_id, f"input {name!r} takes LoadImage's MASK output (1)", name)
            rgba = img.convert("RGBA")
            if channel not in "RGBA":
                raise self.fail(source, f"channel {channel!r} must be alpha, red, green or blue", "channel")
            plane = rgba.getchannel(channel)
            if channel == "A":  # ComfyUI: transparent pixels are masked
                plane = ImageOps.invert(plane)
        return source, _png(plane)

    # --- latents and samplers -----------------------------------------------------------------------------------

    def latent(self, node_id: str, name: str) -> _Latent:
        classes = (
            "EmptyLatentImage",
            "VAEEncode",
            "VAEEncodeForInpaint",
            "SetLatentNoiseMask",
            "KSampler",
            "KSamplerAdvanced",
            "LatentUpscale",
            "LatentUpscaleBy",
        )
        source, _ = self.link(node_id, name, classes)
        kind = self.cls(source)
        if kind == "EmptyLatentImage":
            size = (self.number(source, "width", int), self.number(source, "height", int))
            self.note("width", source)
            self.note("height", source)
            self.note("n", source)
            return _Latent(source, empty=(*size, self.number(source, "batch_size", int, 1)))
        if kind in ("VAEEncode", "VAEEncodeForInpaint"):
            self.checkpoint_output(source, "vae", 2)
            latent = _Latent(source, image=self.image(source, "pixels"))
            self.note("init_image", source)
            if kind == "VAEEncodeForInpaint":
                mask_node, png = self.mask(source, "mask")
                grow = self.number(source, "grow_mask_by", int, 6)
                latent.mask = (mask_node, _grow(png, grow))
                self.note("mask_image", source)
            return latent
        if kind == "SetLatentNoiseMask":
            latent = self.latent(source, "samples")
            if latent.image is None or latent.mask is not None:
                raise self.fail(source, "darkroom masks a VAEEncode's latent only", "samples")
            latent.mask = self.mask(source, "mask")
            self.note("mask_image", source)
            return latent
        if kind in ("KSampler", "KSamplerAdvanced"):
            return _Latent(source, sampled=self.sampler(source))
        inner = self.latent(source, "samples")
        if inner.sampled is None or inner.upscale is not None:
            raise self.fail(source, "darkroom upscales a KSampler's latent only (hires fix)", "samples")
        method = str(self.value(source, "upscale_method"))
        if method not in LATENT_METHODS:
            raise self.fail(source, f"upscale_method {method!r} is not supported ({', '.join(LATENT_METHODS)})")
        spec: dict[str, Any] = {"upscaler": LATENT_METHODS[method]}
        if kind == "LatentUpscaleBy":
            spec["scale"] = self.number(source, "scale_by", float)
        else:
            if self.value(source, "crop", "disabled") != "disabled":
                raise self.fail(source, "crop must be disabled", "crop")
            spec.update(resize_x=self.number(source, "width", int), resize_y=self.number(source, "height", int))
        inner.upscale = (source, spec)
        return inner

    def sampler(self, node_id: str) -> _Sampled:
        advanced = self.cls(node_id) == "KSamplerAdvanced"
        steps = self.number(node_id, "steps", int)
        if advanced:
            seed = self.number(node_id, "noise_seed", int)
            start = self.number(node_id, "start_at_step", int, 0)
            end = min(self.number(node_id, "end_at_step", int, 10000), steps)
            if end < steps or self.value(node_id, "return_with_leftover_noise", "disable") != "disable":
                raise self.fail(node_id, "darkroom runs a sampler to the last step (end_at_step >= steps)")
            if self.value(node_id, "add_noise", "enable") != "enable":
                raise self.fail(node_id, "add_noise must be enable", "add_noise")
            denoise = (steps - start) / steps if steps else 1.0
        else:
            seed = self.number(node_id, "seed", int)
            denoise = self.number(node_id, "denoise", float, 1.0)
        model = self.model(node_id)
        positive, units = self.conditioning(node_id, "positive")
        negative, _ = self.conditioning(node_id, "negative")
        fields = {
            **model,
            "prompt": positive,
            "negative_prompt": negative,
            "steps": steps,
            "guidance_scale": self.number(node_id, "cfg", float),
            "sampler": self.sampler_name(node_id),
            "seed": seed % 2**32,
        }
        if units:
            fields["controlnet"] = units
        for name in ("steps", "guidance_scale", "sampler", "seed", "strength", "hires"):
            self.note(name, node_id)
        return _Sampled(node_id, fields, self.latent(node_id, "latent_image"), denoise, steps)

    def sampler_name(self, node_id: str) -> str:
        name = str(self.value(node_id, "sampler_name"))
        scheduler = str(self.value(node_id, "scheduler", "normal"))
        if name not in SAMPLERS:
            raise self.fail(node_id, f"sampler_name {name!r} is not supported ({', '.join(SAMPLERS)})", "sampler_name")
        if scheduler not in SCHEDULERS:
            raise self.fail(node_id, f"scheduler {scheduler!r} is not supported ({', '.join(SCHEDULERS)})", "scheduler")
        if scheduler == "karras":
            if name not in KARRAS_SAMPLERS:
                raise self.fail(node_id, f"sampler {name!r} has no Karras variant", "scheduler")
            return f"{SAMPLERS[name]} Karras"
        return SAMPLERS[name]

    def model(self, node_id: str) -> dict[str, Any]:
        """The checkpoint and the LoRAs applied to it, walking the MODEL chain to CheckpointLoaderSimple."""
        loras: list[dict[str, Any]] = []
        source, _ = self.link(node_id, "model", ("CheckpointLoaderSimple", "LoraLoader"))
        while self.cls(source) == "LoraLoader":
            strength = self.number(source, "strength_model", float)
            if self.number(source, "strength_clip", float, strength) != strength:
                raise self.fail(source, "darkroom applies a LoRA with one strength (strength_clip = strength_model)")
            loras.insert(0, {"name": _stem(str(self.value(source, "lora_name"))), "weight": strength})
            self.note("loras", source)
            source, _ = self.link(source, "model", ("CheckpointLoaderSimple", "LoraLoader"))
        self.note("model", source)
        return {"model": str(self.value(source, "ckpt_name")), "loras": loras}

    def checkpoint_output(self, node_id: str, name: str, index: int) -> None:
        """VAE and CLIP must come from the checkpoint (through LoRA and CLIPSetLastLayer nodes for CLIP)."""
        source, got = self.link(node_id, name, ("CheckpointLoaderSimple", "LoraLoader", "CLIPSetLastLayer"))
        while self.cls(source) != "CheckpointLoaderSimple":
            if self.cls(source) == "CLIPSetLastLayer" and self.number(source, "stop_at_clip_layer", int) != -1:
                raise self.fail(source, "darkroom uses the text encoder's last layer (stop_at_clip_layer -1)")
            source, got = self.link(source, "clip", ("CheckpointLoaderSimple", "LoraLoader", "CLIPSetLastLayer"))
        if got != index:
            raise self.fail(node_id, f"input {name!r} must come from the checkpoint's {name.upper()} output", name)

    def conditioning(self, node_id: str, name: str) -> tuple[str, list[dict[str, Any]]]:
        """The prompt text, and the ControlNet units applied on the way."""
        classes = ("CLIPTextEncode", "ControlNetApply", "ControlNetApplyAdvanced")
        source, index = self.link(node_id, name, classes)
        kind = self.cls(source)
        if kind == "CLIPTextEncode":
            self.checkpoint_output(source, "clip", 1)
            self.note("prompt" if name == "positive" else "negative_prompt", source)
            return str(self.value(source, "text")), []
        inner = ("conditioning" if kind == "ControlNetApply" else ("positive", "negative")[index]) if index < 2 else ""
        if not inner:
            raise self.fail(node_id, f"input {name!r} links to an output {source} does not have", name)
        text, units = self.conditioning(source, inner)
        unit = self.controlnet_unit(source)
        return text, units if unit in units else [*units, unit]

    def controlnet_unit(self, node_id: str) -> dict[str, Any]:
        loader, _ = self.link(node_id, "control_net", ("ControlNetLoader",))
        image = self.image(node_id, "image")
        if image.source is None or image.upscales:
            raise self.fail(node_id, "the control image must come straight from LoadImage", "image")
        self.note("controlnet", node_id)
        unit = {
            "image": _b64(image.source),
            "model": _stem(str(self.value(loader, "control_net_name"))),
            "weight": self.number(node_id, "strength", float),
        }
        if self.cls(node_id) == "ControlNetApplyAdvanced":
            unit["guidance_start"] = self.number(node_id, "start_percent", float, 0.0)
            unit["guidance_end"] = self.number(node_id, "end_percent", float, 1.0)
        return unit


def compile_workflow(graph: Any, read_input: ReadInput, model_scale: ModelScale) -> Compiled:
    """The job a workflow describes, or WorkflowInvalid naming every node darkroom cannot run."""
    if not isinstance(graph, dict) or not graph:
        raise WorkflowInvalid("prompt must be an API-format workflow: {node_id: {class_type, inputs}}")
    problems: list[NodeProblem] = []
    for node_id, node in graph.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            raise WorkflowInvalid(f"node {node_id!r} has no class_type", kind="invalid_prompt")
        if not isinstance(node.get("inputs", {}), dict):
            raise WorkflowInvalid(f"node {node_id!r}: inputs must be an object", kind="invalid_prompt")
        if node["class_type"] not in SUPPORTED_NODES:
            message = f"node class {node['class_type']!r} is not supported by darkroom (see GET /object_info)"
            problems.append(NodeProblem(str(node_id), node["class_type"], message, "node_not_supported"))
    if problems:
        raise WorkflowInvalid("workflow has nodes darkroom does not run", problems)
    outputs = sorted((str(k) for k, n in graph.items() if n["class_type"] in OUTPUT_NODES), key=_node_order)
    if not outputs:
        raise WorkflowInvalid("prompt has no outputs (SaveImage or PreviewImage)", kind="prompt_no_outputs")
    compiled: Compiled | None = None
    for output in outputs:
        compiler = Compiler({str(k): v for k, v in graph.items()}, read_input, model_scale)
        try:
            fields, sampler_node = _job(compiler, compiler.image(output, "images"))
        except _Problem as exc:
            problems.append(exc.problem)
            continue
        except RecursionError:  # a link cycle: ComfyUI refuses those too
            raise WorkflowInvalid("the workflow's links form a cycle", kind="invalid_prompt") from None
        if compiled is None:
            compiled = Compiled(fields, [output], sampler_node, compiler.origin)
        elif fields != compiled.fields:
            message = "darkroom runs one image chain per workflow; this output shows another"
            problems.append(NodeProblem(output, compiler.cls(output), message))
        else:
            compiled.outputs.append(output)
    if problems or compiled is None:
        raise WorkflowInvalid("workflow failed validation", problems)
    return compiled


def _job(c: Compiler, image: _Image) -> tuple[dict[str, Any], str | None]:
    """The job for the image an output node shows: an upscale of a loaded image, or a sampler's decoded output."""
    if image.source is not None:
        return _upscale_job(c, image), None
    assert image.sampled is not None
    if image.upscales:
        raise c.fail(image.upscales[0][0], "darkroom upscales a sampler's output only before a second KSampler")
    return _sampled_job(c, image.sampled), image.sampled.node


def _upscale_job(c: Compiler, image: _Image) -> dict[str, Any]:
    assert image.source is not None
    if not image.upscales:
        raise c.fail(image.node, "a loaded image must be upscaled or sampled before it is saved")
    upscaler, spec = _upscale_spec(c, image.upscales)
    return {"prompt": "(upscale)", "init_image": _b64(image.source), "upscale": {"upscaler": upscaler, **spec}}


def _upscale_spec(c: Compiler, steps: list[tuple[str, str, dict[str, Any]]]) -> tuple[str, dict[str, Any]]:
    """A model upscale, optionally followed by a scale by factor (the common `4x model, then 0.5`), or one pixel
    scale: darkroom runs one upscaler per job."""
    first_node, upscaler, params = steps[0]
    rest = steps[1:]
    if "scale" in params:  # a model
        scale = params["scale"]
        for node, _, extra in rest:
            if "by" not in extra:
                raise c.fail(node, "after a model upscale darkroom can only scale by a factor", "width")
            scale *= extra["by"]
        c.note("upscale", first_node)
        return upscaler, {"scale": scale}
    if rest:
        raise c.fail(rest[0][0], "darkroom runs one pixel scale per image")
    c.note("upscale", first_node)
    if "by" in params:
        return upscaler, {"scale": params["by"]}
    return upscaler, {"width": params["width"], "height": params["height"], "crop": params["crop"]}


def _sampled_job(c: Compiler, sampled: _Sampled) -> dict[str, Any]:
    latent = sampled.latent
    fields = dict(sampled.fields)
    if latent.empty is not None:
        fields.update(width=latent.empty[0], height=latent.empty[1], n=latent.empty[2])
        _full_denoise(c, sampled)
        return fields
    if latent.sampled is not None:  # hires fix: a latent upscale of a first pass
        assert latent.upscale is not None  # a KSampler straight into a KSampler is refused by `latent`
        return _hires(c, latent.sampled, sampled, latent.upscale[1])
    image = latent.image
    assert image is not None
    if image.sampled is not None:  # hires fix with a pixel upscale
        if not image.upscales:
            raise c.fail(image.node, "a second KSampler needs an upscaled first pass (hires fix)")
        upscaler, spec = _upscale_spec(c, image.upscales)
        hires = {"upscaler": upscaler, **({"scale": spec["scale"]} if "scale" in spec else {})}
        if "width" in spec:
            hires.update(resize_x=spec["width"], resize_y=spec["height"])
        return _hires(c, image.sampled, sampled, hires)
    assert image.source is not None
    width, height = _source_size(c, image)
    fields.update(width=width, height=height, init_image=_b64(image.source), strength=min(sampled.denoise, 1.0))
    if latent.mask is not None:
        fields["mask_image"] = _b64(latent.mask[1])
    if sampled.denoise <= 0:
        raise c.fail(sampled.node, "denoise must be greater than 0", "denoise")
    return fields


def _source_size(c: Compiler, image: _Image) -> tuple[int, int]:
    """img2img runs at the source's size (multiples of 8), or the size an ImageScale before VAEEncode asks for."""
    assert image.source is not None
    with Image.open(io.BytesIO(image.source)) as img:
        width, height = img.size
    for node, _, params in image.upscales:
        if "scale" in params:
            raise c.fail(node, "darkroom does not run an upscale model before sampling a loaded image")
        if "by" in params:
            width, height = round(width * params["by"]), round(height * params["by"])
        else:
            width, height = params["width"], params["height"]
    return max(8, width // 8 * 8), max(8, height // 8 * 8)


def _full_denoise(c: Compiler, sampled: _Sampled) -> None:
    if sampled.denoise < 1.0:
        raise c.fail(sampled.node, "an empty latent is sampled with denoise 1", "denoise")


def _hires(c: Compiler, first: _Sampled, second: _Sampled, spec: dict[str, Any]) -> dict[str, Any]:
    """Two KSamplers as darkroom's hires fix: the second must sample like the first (model, LoRAs, prompts, sampler,
    guidance); its steps and denoise are the second pass's."""
    if first.latent.empty is None:
        raise c.fail(first.node, "hires fix starts from an EmptyLatentImage", "latent_image")
    _full_denoise(c, first)
    for key in ("model", "loras", "prompt", "negative_prompt", "sampler", "guidance_scale", "controlnet"):
        if first.fields.get(key) != second.fields.get(key):
            raise c.fail(second.node, f"the second pass must use the first pass's {key} (darkroom's hires fix)")
    fields = dict(first.fields)
    width, height, n = first.latent.empty
    hires = {**spec, "second_pass_steps": second.steps, "denoising_strength": min(second.denoise, 1.0)}
    fields.update(width=width, height=height, n=n, hires=hires)
    c.origin["hires"] = (second.node, c.cls(second.node))
    return fields


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str | int) and isinstance(value[1], int)


def _stem(name: str) -> str:
    """`sub/foo.safetensors` → `foo`: darkroom names adapters, upscalers and ControlNets by file stem."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    for ext in IMAGE_EXTENSIONS:
        if base.lower().endswith(ext):
            return base[: -len(ext)]
    return base


def _node_order(node_id: str) -> tuple[int, str]:
    return (int(node_id), "") if node_id.isdigit() else (1 << 30, node_id)


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _grow(mask_png: bytes, pixels: int) -> bytes:
    if pixels <= 0:
        return mask_png
    with Image.open(io.BytesIO(mask_png)) as mask:
        return _png(mask.convert("L").filter(ImageFilter.MaxFilter(2 * min(pixels, 64) + 1)))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
