"""An OpenAI-compatible images API as an engine: a cloud (or any server speaking that API) takes overflow or models
this deployment does not hold.

txt2img is `POST {url}/images/generations`; img2img and inpainting are `POST {url}/images/edits` (multipart: the
source, and for inpainting a mask whose transparent pixels are repainted: darkroom's white). Answers are read as
`b64_json` (or fetched from `url`). The secret comes from the environment or a file (`remote.api_key_env` /
`api_key_file`) and is never written to the database; `remote.model` names the cloud's model (default: the job's).
Such an API has no progress and no cancel: the call runs beside the worker's thread, which keeps calling the progress
callback so a cancel or time limit still ends the job at once (the cloud's answer is then dropped). The engine is
external unless `remote.external` is set false: confidential work must not reach it. Cloud APIs take no seed: the
provenance records the job's seeds, which the pixels do not depend on.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import httpx

from darkroom.engines.base import EngineImage, EngineResult, ProgressFn
from darkroom.engines.remote_http import RemoteHTTP, decode_image, png_bytes
from darkroom.errors import EngineError
from darkroom.schemas import GenerationRequest, ModelInfo

if TYPE_CHECKING:
    from PIL import Image

    from darkroom.config import RemoteEngineSettings

ENGINE_NAME = "openai-remote"
UNSUPPORTED = ("hires", "refiner", "controlnet", "upscale", "loras")


class OpenAIImagesEngine(RemoteHTTP):
    name = ENGINE_NAME
    kind = "openai"
    example_url = "https://api.openai.com/v1"
    health_path = "/models"
    modes = frozenset({"txt2img", "img2img", "inpaint"})

    def __init__(
        self,
        url: str,
        key: str | None = None,
        *,
        model: str | None = None,
        external: bool = True,
        timeout_seconds: float = 30.0,
        poll_seconds: float = 1.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else None
        super().__init__(
            url,
            headers=headers,
            external=external,
            timeout_seconds=timeout_seconds,
            poll_seconds=poll_seconds,
            transport=transport,
        )
        self.model = model

    @classmethod
    def options(cls, settings: RemoteEngineSettings) -> dict[str, Any]:
        """A cloud: external unless the settings say otherwise, and the model it is asked for."""
        return {
            "model": settings.model,
            "external": settings.external if "external" in settings.model_fields_set else True,
        }

    def generate(
        self,
        request: GenerationRequest,
        init_image: Image.Image | None,
        progress: ProgressFn,
        mask_image: Image.Image | None = None,
        control_images: list[Image.Image] | None = None,
    ) -> EngineResult:
        started = time.perf_counter()
        self._check(request)
        model = self.model or request.model or ""
        fields: dict[str, Any] = {"prompt": request.prompt, "n": request.n, "size": f"{request.width}x{request.height}"}
        fields |= {"model": model, "response_format": "b64_json"} if model else {"response_format": "b64_json"}
        timeout = httpx.Timeout(self.http.timeout.connect, read=None)  # the job's time limit stops it instead
        if init_image is None:
            call = lambda: self.call("POST", "/images/generations", json=fields, timeout=timeout)  # noqa: E731
        else:
            files = {"image": ("image.png", png_bytes(init_image), "image/png")}
            if mask_image is not None:
                files["mask"] = ("mask.png", png_bytes(_transparent_where_white(mask_image)), "image/png")
            form = {key: str(value) for key, value in fields.items()}
            call = lambda: self.call("POST", "/images/edits", data=form, files=files, timeout=timeout)  # noqa: E731
        response = self.relay(call, progress, request.steps, lambda: None, lambda: None)
        images = [self._image(item) for item in response.json().get("data") or []]
        if not images:
            raise EngineError(f"openai {self.host} answered without images", code="remote_failed")
        found = [EngineImage(image, seed) for image, seed in zip(images, request.seeds(), strict=False)]
        return self._result(request, model, found, time.perf_counter() - started)

    def _check(self, request: GenerationRequest) -> None:
        if request.mode not in self.capabilities.modes:
            raise EngineError(f"the openai engine {self.host} does not run {request.mode} jobs", field="mode")
        for name in UNSUPPORTED:
            if getattr(request, name, None):
                raise EngineError(f"the openai engine {self.host} does not run jobs with {name}", field=name)

    def _image(self, item: dict[str, Any]) -> Image.Image:
        if item.get("b64_json"):
            return decode_image(str(item["b64_json"]))
        return decode_image(self.call("GET", str(item["url"])).content)

    def _result(
        self, request: GenerationRequest, model: str, images: list[EngineImage], seconds: float
    ) -> EngineResult:
        name = model or "unknown"
        return EngineResult(
            images=images,
            model=ModelInfo(
                id=request.model or name,
                name=name,
                format="single_file",
                arch="cloud",
                path=f"{self.url}/models",
                sha256="",
                size_bytes=0,
            ),
            engine=ENGINE_NAME,
            scheduler="",
            device="remote",
            dtype="",
            timings={"remote_total_s": round(seconds, 4)},
            remote={"host": self.host, "job_id": "", "model": name},
        )


def _transparent_where_white(mask: Image.Image) -> Image.Image:
    """darkroom's mask (white repaints) as OpenAI's: an RGBA image whose transparent pixels are repainted."""
    grey = mask.convert("L")
    rgba = mask.convert("RGB").convert("RGBA")
    rgba.putalpha(grey.point(lambda value: 255 - value))
    return rgba
