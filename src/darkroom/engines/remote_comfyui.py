"""A ComfyUI server as an engine: darkroom builds the workflow from the job and drives the server through its own API.

One job is one prompt: a source image (img2img) is uploaded with `POST /upload/image`, the API-format workflow
(checkpoint loader, two text encoders, an empty or encoded latent, KSampler, VAE decode, SaveImage) is queued with
`POST /prompt` under this engine's `client_id`, whose `/ws` socket (opened first, so no message is missed) carries
`progress` to the worker's callback until `executing` with no node says the prompt ended. `GET /history/{id}` then
names the output files and `GET /view` fetches them. When the progress callback raises (cancel, time limit, lease
lost, drain), `POST /interrupt` stops the running prompt and `POST /queue` deletes it if it still waits. The socket
hands control back every `poll_seconds`, so a cancel reaches the server even while the prompt waits in its queue.
Failures are classified as for every remote (engines/remote_http.py).
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from websockets.exceptions import WebSocketException
from websockets.sync.client import ClientConnection, connect

from darkroom.engines.base import EngineImage, EngineResult, ProgressFn
from darkroom.engines.remote_http import RemoteHTTP, decode_image, png_bytes
from darkroom.errors import EngineError, TransientEngineError
from darkroom.schemas import GenerationRequest, ModelInfo

if TYPE_CHECKING:
    from PIL import Image


ENGINE_NAME = "comfyui-remote"
UNSUPPORTED = ("hires", "refiner", "controlnet", "upscale", "mask_image")
# darkroom's (A1111's) sampler names → ComfyUI's sampler_name and scheduler.
SAMPLERS = {
    "Euler": ("euler", "normal"),
    "Euler a": ("euler_ancestral", "normal"),
    "Heun": ("heun", "normal"),
    "DPM2": ("dpm_2", "normal"),
    "DPM2 a": ("dpm_2_ancestral", "normal"),
    "LMS": ("lms", "normal"),
    "DPM++ SDE": ("dpmpp_sde", "normal"),
    "DPM++ 2M": ("dpmpp_2m", "normal"),
    "DPM++ 2M SDE": ("dpmpp_2m_sde", "normal"),
    "DDIM": ("ddim", "normal"),
    "UniPC": ("uni_pc", "normal"),
    "DEIS": ("deis", "normal"),
    "DDPM": ("ddpm", "normal"),
}
MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


class ComfyUIEngine(RemoteHTTP):
    name = ENGINE_NAME
    kind = "comfyui"
    health_path = "/system_stats"
    modes = frozenset({"txt2img", "img2img"})

    def __init__(
        self,
        url: str,
        key: str | None = None,
        *,
        username: str | None = None,
        external: bool = False,
        timeout_seconds: float = 30.0,
        poll_seconds: float = 1.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        # ComfyUI behind an authenticating proxy: Basic with a user name, else the key as a Bearer token.
        if key and username:
            token = base64.b64encode(f"{username}:{key}".encode()).decode()
            self._authorization: str | None = f"Basic {token}"
        else:
            self._authorization = f"Bearer {key}" if key else None
        headers = {"Authorization": self._authorization} if self._authorization else None
        super().__init__(
            url,
            headers=headers,
            external=external,
            timeout_seconds=timeout_seconds,
            poll_seconds=poll_seconds,
            transport=transport,
        )
        self.client_id = uuid.uuid4().hex

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
        source = self._upload(init_image) if init_image is not None else None
        graph = workflow(request, source)
        with self._socket() as socket:
            answer = self.call("POST", "/prompt", json={"prompt": graph, "client_id": self.client_id}).json()
            prompt_id = str(answer["prompt_id"])
            try:
                self._follow(socket, prompt_id, request.steps, progress)
            except BaseException:
                self._interrupt(prompt_id)
                raise
        images = self._outputs(prompt_id)
        seeds = request.seeds()
        found = [EngineImage(image, seed) for image, seed in zip(images, seeds, strict=False)]
        return self._result(request, prompt_id, found, time.perf_counter() - started)

    def _check(self, request: GenerationRequest) -> None:
        if request.mode not in self.capabilities.modes:
            raise EngineError(f"the comfyui engine {self.host} does not run {request.mode} jobs", field="mode")
        for name in UNSUPPORTED:
            if getattr(request, name, None):
                raise EngineError(f"the comfyui engine {self.host} does not run jobs with {name}", field=name)
        if request.sampler not in SAMPLERS and request.sampler.removesuffix(" Karras") not in SAMPLERS:
            raise EngineError(f"the comfyui engine has no sampler {request.sampler!r}", field="sampler")

    def _upload(self, image: Image.Image) -> str:
        files = {"image": (f"darkroom-{uuid.uuid4().hex}.png", png_bytes(image), "image/png")}
        stored = self.call("POST", "/upload/image", files=files, data={"overwrite": "true"}).json()
        subfolder = str(stored.get("subfolder") or "")
        return f"{subfolder}/{stored['name']}" if subfolder else str(stored["name"])

    def _socket(self) -> ClientConnection:
        parts = urlsplit(self.url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        url = urlunsplit((scheme, parts.netloc, f"{parts.path}/ws", f"clientId={self.client_id}", ""))
        headers = {"Authorization": self._authorization} if self._authorization else None
        try:
            return connect(url, additional_headers=headers, open_timeout=self.http.timeout.connect, max_size=None)
        except (OSError, WebSocketException) as exc:
            raise self.transport_error(exc) from exc

    def _follow(self, socket: ClientConnection, prompt_id: str, steps: int, progress: ProgressFn) -> None:
        """Relay the prompt's progress until it ends; `progress` runs at least every `poll_seconds`."""
        step, total = 0, steps
        while True:
            try:
                raw = socket.recv(timeout=self.poll_seconds)
            except TimeoutError:
                progress(step, total)
                continue
            except (OSError, WebSocketException) as exc:
                raise self.transport_error(exc) from exc
            if isinstance(raw, bytes):  # a preview frame
                continue
            message = json.loads(raw)
            kind, data = message.get("type"), message.get("data") or {}
            if data.get("prompt_id") != prompt_id:
                continue
            if kind == "progress":
                step, total = int(data.get("value") or step), int(data.get("max") or total)
                progress(step, total)
            elif kind in ("execution_error", "execution_interrupted"):
                detail = data.get("exception_message") or kind
                raise TransientEngineError(f"comfyui {self.host} prompt {prompt_id}: {detail}")
            elif kind == "executing" and data.get("node") is None:
                return

    def _interrupt(self, prompt_id: str) -> None:
        """Best effort: stop the prompt if it runs, drop it if it waits."""
        for path, body in (("/interrupt", None), ("/queue", {"delete": [prompt_id]})):
            with contextlib.suppress(httpx.HTTPError):
                self.http.post(path, json=body)

    def _outputs(self, prompt_id: str) -> list[Image.Image]:
        history = self.call("GET", f"/history/{prompt_id}").json().get(prompt_id) or {}
        images: list[Image.Image] = []
        for output in (history.get("outputs") or {}).values():
            for ref in output.get("images") or []:
                params = {"filename": ref["filename"], "subfolder": ref.get("subfolder", ""), "type": ref.get("type")}
                images.append(decode_image(self.call("GET", "/view", params=params).content))
        if not images:
            raise TransientEngineError(f"comfyui {self.host} prompt {prompt_id} ended without images")
        return images

    def _result(
        self, request: GenerationRequest, prompt_id: str, images: list[EngineImage], seconds: float
    ) -> EngineResult:
        model = request.model or "unknown"
        return EngineResult(
            images=images,
            model=ModelInfo(
                id=model,
                name=model,
                format="single_file",
                arch="unknown",
                path=f"{self.url}/models/checkpoints",
                sha256="",
                size_bytes=0,
            ),
            engine=ENGINE_NAME,
            scheduler=request.sampler,
            device="remote",
            dtype="",
            timings={"remote_total_s": round(seconds, 4)},
            remote={"host": self.host, "job_id": prompt_id},
        )


def workflow(request: GenerationRequest, source: str | None) -> dict[str, Any]:
    """The job as a ComfyUI API-format workflow. `source`: the uploaded image's name, for img2img."""
    base = request.sampler.removesuffix(" Karras")
    sampler, scheduler = SAMPLERS[base][0], "karras" if base != request.sampler else SAMPLERS[base][1]
    model = request.model or ""
    checkpoint = model if model.lower().endswith(MODEL_EXTENSIONS) else f"{model}.safetensors"
    graph: dict[str, Any] = {"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}}}
    weights = _loras(request, graph)
    graph |= {
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": request.prompt, "clip": [weights, 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": request.negative_prompt, "clip": [weights, 1]}},
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": request.seed,
                "steps": request.steps,
                "cfg": request.guidance_scale,
                "sampler_name": sampler,
                "scheduler": scheduler,
                "denoise": 1.0 if source is None else request.strength,
                "model": [weights, 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "darkroom"}},
    }
    if source is None:
        size = {"width": request.width, "height": request.height, "batch_size": request.n}
        graph["5"] = {"class_type": "EmptyLatentImage", "inputs": size}
        return graph
    graph["10"] = {"class_type": "LoadImage", "inputs": {"image": source}}
    graph["5"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    if request.n > 1:  # one encoded source, repeated for each image
        graph["11"] = {"class_type": "RepeatLatentBatch", "inputs": {"samples": ["5", 0], "amount": request.n}}
        graph["3"]["inputs"]["latent_image"] = ["11", 0]
    return graph


def _loras(request: GenerationRequest, graph: dict[str, Any]) -> str:
    """Chain a LoraLoader per LoRA after the checkpoint loader ("4"); the node the sampler and encoders read from."""
    last = "4"
    for index, lora in enumerate(request.loras):
        node = f"20{index}"
        inputs = {
            "lora_name": f"{lora.name}.safetensors",
            "strength_model": lora.weight,
            "strength_clip": lora.weight,
            "model": [last, 0],
            "clip": [last, 1],
        }
        graph[node] = {"class_type": "LoraLoader", "inputs": inputs}
        last = node
    return last
