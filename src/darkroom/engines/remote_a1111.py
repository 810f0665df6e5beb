"""An AUTOMATIC1111-compatible server as an engine: teams that already run A1111 boxes drive them from darkroom's queue.

One job is one blocking `POST /sdapi/v1/txt2img` (or `img2img`, with the mask for inpainting) that answers with
base64 PNGs. While it runs, `GET /sdapi/v1/progress` is relayed to the worker's progress callback every
`poll_seconds`; when that callback raises (cancel, time limit, lease lost, drain) `POST /sdapi/v1/interrupt` stops the
server's current job. Basic auth (`--api-auth user:password`): `remote.username` with the key as password. The model
goes in `override_settings.sd_model_checkpoint`, LoRAs as A1111's `<lora:name:weight>` prompt tags. Failures are
classified as for every remote (engines/remote_http.py).
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import TYPE_CHECKING, Any

import httpx

from darkroom.engines.base import EngineImage, EngineResult, ProgressFn
from darkroom.engines.remote_http import RemoteHTTP, base64_png, decode_image
from darkroom.errors import EngineError
from darkroom.schemas import GenerationRequest, ModelInfo

if TYPE_CHECKING:
    from PIL import Image


ENGINE_NAME = "a1111-remote"
UNSUPPORTED = ("hires", "refiner", "controlnet", "upscale")  # request fields this engine does not send on


class A1111Engine(RemoteHTTP):
    name = ENGINE_NAME
    kind = "a1111"
    health_path = "/sdapi/v1/sd-models"
    modes = frozenset({"txt2img", "img2img", "inpaint"})

    def __init__(
        self,
        url: str,
        password: str | None = None,
        *,
        username: str | None = None,
        external: bool = False,
        timeout_seconds: float = 30.0,
        poll_seconds: float = 1.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        auth = httpx.BasicAuth(username or "darkroom", password) if password else None
        super().__init__(
            url,
            auth=auth,
            external=external,
            timeout_seconds=timeout_seconds,
            poll_seconds=poll_seconds,
            transport=transport,
        )

    def generate(
        self,
        request: GenerationRequest,
        init_image: Image.Image | None,
        progress: ProgressFn,
        mask_image: Image.Image | None = None,
        control_images: list[Image.Image] | None = None,
    ) -> EngineResult:
        started = time.perf_counter()
        path, body = self.body(request, init_image, mask_image)
        # No read limit on the generation call itself: the job's own time limit stops it through `progress`.
        timeout = httpx.Timeout(self.http.timeout.connect, read=None)
        response = self.relay(
            lambda: self.call("POST", path, json=body, timeout=timeout),
            progress,
            request.steps,
            self._progress,
            self._interrupt,
        )
        answer = response.json()
        info = _info(answer.get("info"))
        encoded = list(answer.get("images") or [])[-request.n :]  # a grid (when the server adds one) comes first
        if not encoded:
            raise EngineError(f"a1111 {self.host} answered without images", code="remote_failed")
        seeds = [int(s) for s in info.get("all_seeds") or []] or request.seeds()
        images = [EngineImage(decode_image(data), seed) for data, seed in zip(encoded, seeds, strict=False)]
        return self._result(request, info, images, time.perf_counter() - started)

    def body(
        self, request: GenerationRequest, init_image: Image.Image | None, mask_image: Image.Image | None
    ) -> tuple[str, dict[str, Any]]:
        """The A1111 route and body for a job; fields A1111 cannot take here fail the job naming them."""
        if request.mode not in self.capabilities.modes:
            raise EngineError(f"the a1111 engine {self.host} does not run {request.mode} jobs", field="mode")
        for name in UNSUPPORTED:
            if getattr(request, name, None):
                raise EngineError(f"the a1111 engine {self.host} does not run jobs with {name}", field=name)
        tags = "".join(f" <lora:{lora.name}:{lora.weight:g}>" for lora in request.loras)
        body: dict[str, Any] = {
            "prompt": request.prompt + tags,
            "negative_prompt": request.negative_prompt,
            "width": request.width,
            "height": request.height,
            "steps": request.steps,
            "cfg_scale": request.guidance_scale,
            "sampler_name": request.sampler,
            "seed": request.seed,
            "batch_size": request.n,
            "n_iter": 1,
            "send_images": True,
            "save_images": False,
        }
        if request.model:
            body["override_settings"] = {"sd_model_checkpoint": request.model}
        if init_image is None:
            return "/sdapi/v1/txt2img", body
        body |= {"init_images": [base64_png(init_image)], "denoising_strength": request.strength}
        if mask_image is not None:
            body["mask"] = base64_png(mask_image)  # A1111 also repaints where the mask is white
        return "/sdapi/v1/img2img", body

    def _progress(self) -> tuple[int, int] | None:
        state = self.http.get("/sdapi/v1/progress", params={"skip_current_image": "true"}).json().get("state") or {}
        step, total = int(state.get("sampling_step") or 0), int(state.get("sampling_steps") or 0)
        return (step, total) if total else None

    def _interrupt(self) -> None:
        with contextlib.suppress(httpx.HTTPError):  # best effort: the server's job then runs out, unread
            self.http.post("/sdapi/v1/interrupt")

    def _result(
        self, request: GenerationRequest, info: dict[str, Any], images: list[EngineImage], seconds: float
    ) -> EngineResult:
        model = str(info.get("sd_model_name") or request.model or "unknown")
        return EngineResult(
            images=images,
            model=ModelInfo(
                id=request.model or model,
                name=model,
                format="single_file",
                arch="unknown",
                path=f"{self.url}/sdapi/v1/sd-models",
                sha256=str(info.get("sd_model_hash") or ""),
                size_bytes=0,
            ),
            engine=ENGINE_NAME,
            scheduler=str(info.get("sampler_name") or request.sampler),
            device="remote",
            dtype="",
            timings={"remote_total_s": round(seconds, 4)},
            versions={"remote_a1111": str(info.get("version") or "")},
            remote={"host": self.host, "job_id": str(info.get("job_id") or info.get("job_timestamp") or "")},
        )


def _info(raw: object) -> dict[str, Any]:
    """A1111's `info` is a JSON string (some forks send an object)."""
    if isinstance(raw, dict):
        return raw
    try:
        parsed = json.loads(str(raw or "{}"))
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}
