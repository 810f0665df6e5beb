"""Another darkroom as an engine: a worker claims jobs from its own queue and runs each through that darkroom's API.

The local worker keeps everything that makes a job durable here (the lease, retries, cancel, provenance, storage); the
remote only computes pixels. One job is one remote job: `POST /v1/jobs` with the request as this node stored it (its
source images inlined, the fields a server sets left out), its Server-Sent Events turned into the worker's progress
calls, `DELETE` when the progress call raises (cancel, lease lost, time limit, drain), and the images fetched at the
end. A silent event stream still hands control back every `poll_seconds`, so a cancel reaches the remote even while
the remote job waits in its queue.

Failures are classified like the local engine's: a request the remote refuses (4xx) or a remote job that failed for
good fails the job for good; a remote 5xx, a dropped connection or a remote job that ran out of attempts is retried
through this node's queue; a key the remote rejects (401/403) or a remote that no longer answers at all (it died
mid-job) is the engine's fault, not the job's (`FatalEngineError`: the job goes back uncharged and the worker pauses,
re-checking `check()` before it claims again). The rules are shared by every remote engine (engines/remote_http.py).
"""

from __future__ import annotations

import contextlib
import io
import queue
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx

from darkroom.client import ApiError, Client, RetryPolicy
from darkroom.engines.base import Capabilities, EngineHealth, EngineImage, EngineResult, ProgressFn
from darkroom.engines.remote_http import base64_png, probe, service_key, status_error
from darkroom.errors import EngineError, FatalEngineError, TransientEngineError
from darkroom.schemas import GenerationRequest, ModelInfo

if TYPE_CHECKING:
    from PIL import Image

    from darkroom.config import RemoteEngineSettings

ENGINE_NAME = "darkroom-remote"
# Set by the server that stores a job (or kept with it for this node's own answers): the remote sets its own, and a
# template or webhook would act twice.
SERVER_FIELDS = frozenset(
    {
        "model_sha256",
        "embeddings",
        "workflow",
        "client_options",
        "template",
        "variables",
        "asset_type",
        "webhook_url",
        "webhook_events",
        "preview",
    }
)
TERMINAL = frozenset({"succeeded", "failed", "cancelled", "dead"})
_END = object()  # the event reader's last word


class RemoteDarkroomEngine:
    name = ENGINE_NAME

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        external: bool = False,
        timeout_seconds: float = 30.0,
        poll_seconds: float = 1.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.host = urlsplit(self.url).netloc
        self.device = self.host  # where the pixels are computed, for logs and listings
        # Upscale jobs are not sent on: the native job API takes generations; /v1/upscale is a separate route.
        self.capabilities = Capabilities(modes=frozenset({"txt2img", "img2img", "inpaint"}), external=external)
        self.poll_seconds = poll_seconds
        # A few quick retries of one call; longer outages go back through this node's queue with its backoff.
        retry = RetryPolicy(max_attempts=3, backoff=0.2, max_backoff=2.0, max_retry_after=5.0)
        self._client = Client(self.url, timeout_seconds, api_key=api_key, retry=retry, transport=transport)

    @classmethod
    def from_settings(cls, settings: RemoteEngineSettings) -> RemoteDarkroomEngine:
        if not settings.url:
            raise ValueError("engine = darkroom needs remote.url (DARKROOM_REMOTE__URL)")
        return cls(
            settings.url,
            service_key(settings),
            external=settings.external,
            timeout_seconds=settings.timeout_seconds,
            poll_seconds=settings.poll_seconds,
        )

    # --- Engine protocol ---------------------------------------------------------------------------------------------

    def preload(self, model_id: str) -> None:
        """The remote loads its own models."""

    def held_models(self) -> list[str]:
        """None: what the remote holds is its own scheduler's business."""
        return []

    def health(self) -> EngineHealth:
        return probe(self._client.http, "/readyz", self.host)

    def check(self) -> None:
        """After a `FatalEngineError` (a rejected key): the worker claims again only once the remote answers."""
        try:
            self._client.request("GET", "/v1/models")
        except (ApiError, httpx.HTTPError) as exc:
            raise FatalEngineError(f"remote darkroom {self.host} is not usable: {exc}") from exc

    def close(self) -> None:
        self._client.close()

    def generate(
        self,
        request: GenerationRequest,
        init_image: Image.Image | None,
        progress: ProgressFn,
        mask_image: Image.Image | None = None,
        control_images: list[Image.Image] | None = None,
    ) -> EngineResult:
        if request.mode not in self.capabilities.modes:
            raise EngineError(f"the remote engine {self.host} does not run {request.mode} jobs", field="mode")
        started = time.perf_counter()
        body = remote_body(request, init_image, mask_image, control_images)
        job = self._call(lambda: self._client.submit(body, idempotency_key=uuid.uuid4().hex))
        try:
            final = self._follow(job["id"], request.steps, progress)
        except BaseException:
            self._cancel(job["id"])  # cancelled, timed out, lease lost, draining, or we lost the remote
            raise
        if final["state"] != "succeeded":
            raise _job_error(final, self.host)
        images = [self._image(view) for view in final.get("images") or []]
        return self._result(final, images, time.perf_counter() - started)

    # --- the remote job --------------------------------------------------------------------------------------------

    def _follow(self, job_id: str, steps: int, progress: ProgressFn) -> dict[str, Any]:
        """Relay the remote job's progress until it ends; `progress` runs at least every `poll_seconds`. A stream
        that ends before the job did (a proxy's idle cut) is followed again rather than taken for the end."""
        step, total = 0, steps
        while True:
            events: queue.Queue[object] = queue.Queue()
            reader = threading.Thread(target=self._read, args=(job_id, events), name=f"remote-{job_id}", daemon=True)
            reader.start()
            while (event := self._next(events, progress, step, total)) is not _END:
                if isinstance(event, BaseException):
                    raise self._classified(event)
                if isinstance(event, dict) and event.get("type") == "progress":
                    step, total = int(event.get("step") or step), int(event.get("total") or total)
                    progress(step, total)
            job: dict[str, Any] = self._call(lambda: self._client.job(job_id))
            if job["state"] in TERMINAL:
                return job

    def _next(self, events: queue.Queue[object], progress: ProgressFn, step: int, total: int) -> object:
        """The reader's next event; while there is none, `progress` every `poll_seconds`: still the chance to stop."""
        while True:
            try:
                return events.get(timeout=self.poll_seconds)
            except queue.Empty:
                progress(step, total)

    def _read(self, job_id: str, events: queue.Queue[object]) -> None:
        try:
            for event in self._client.events(job_id):
                events.put(event)
        except Exception as exc:  # handed to the device thread, which classifies it
            events.put(exc)
        events.put(_END)

    def _cancel(self, job_id: str) -> None:
        with contextlib.suppress(httpx.HTTPError):  # best effort: the remote job then runs out, unread
            self._client.http.delete(f"/v1/jobs/{job_id}")

    def _call(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except (ApiError, httpx.HTTPError) as exc:
            raise self._classified(exc) from exc

    def _classified(self, exc: BaseException) -> Exception:
        """A failed call as the worker's error types (engines/remote_http.py): a refused request fails for good, a
        rejected key or a remote that no longer answers is the engine's fault, anything else is retried."""
        where = f"remote darkroom {self.host}: "
        if isinstance(exc, ApiError):
            error = exc.error
            code = str(error.get("code") or "remote_rejected")
            return status_error(exc.status, f"{where}{error.get('message') or exc}", error.get("field"), code)
        if isinstance(exc, httpx.HTTPError):
            message = f"{where}{type(exc).__name__}: {exc}"
            if isinstance(exc, httpx.ConnectError) or not self.health().ok:
                return FatalEngineError(f"{message} (the remote does not answer)")
            return TransientEngineError(message)
        return exc if isinstance(exc, Exception) else TransientEngineError(f"{where}{exc!r}")

    def _image(self, view: dict[str, Any]) -> EngineImage:
        from PIL import Image as PILImage

        data = self._call(lambda: self._client.image(str(view["id"])))
        image = PILImage.open(io.BytesIO(data))
        return EngineImage(image=image.convert("RGB"), seed=int(view["seed"]))

    def _result(self, job: dict[str, Any], images: list[EngineImage], seconds: float) -> EngineResult:
        """The remote's provenance becomes ours, with the engine and the remote named."""
        prov = job.get("provenance") or {}
        model = prov.get("model") or {}
        remote_timings = prov.get("timings") or {}
        timings = {key: float(remote_timings[key]) for key in ("load_s", "inference_s") if key in remote_timings}
        return EngineResult(
            images=images,
            model=ModelInfo(
                id=str(model.get("id") or job["request"].get("model") or "unknown"),
                name=str(model.get("name") or model.get("id") or "unknown"),
                format=model.get("format") or "diffusers",
                arch=str(model.get("arch") or "unknown"),
                path=f"{self.url}/v1/models",
                sha256=str(model.get("sha256") or ""),
                size_bytes=0,
                smoke_test=bool(model.get("smoke_test")),
            ),
            engine=ENGINE_NAME,
            scheduler=str(prov.get("scheduler") or ""),
            device=str(prov.get("device") or "remote"),
            dtype=str(prov.get("dtype") or ""),
            timings={**timings, "remote_total_s": round(seconds, 4)},
            versions={"remote_darkroom": str((prov.get("versions") or {}).get("darkroom", ""))},
            remote={"host": self.host, "job_id": str(job["id"]), "worker": str(prov.get("worker") or "")},
        )


def remote_body(
    request: GenerationRequest,
    init_image: Image.Image | None,
    mask_image: Image.Image | None,
    control_images: list[Image.Image] | None,
) -> dict[str, Any]:
    """The request as a client would send it: stored source images (`blob:` refs of this node) inlined as base64."""
    body = request.model_dump(mode="json", exclude_none=True, exclude=set(SERVER_FIELDS))
    if init_image is not None:
        body["init_image"] = base64_png(init_image)
    if mask_image is not None:
        body["mask_image"] = base64_png(mask_image)
    for unit, image in zip(body.get("controlnet") or [], control_images or [], strict=False):
        unit["image"] = base64_png(image)
    return body


def _job_error(job: dict[str, Any], host: str) -> EngineError:
    """A remote job that ended without images. `failed`: the remote judged the request at fault (its retryable
    failures end as `dead` after its attempts), so it fails here for good too; anything else is retried here."""
    error = job.get("error") or {}
    message = f"remote darkroom {host} job {job['id']} {job['state']}: {error.get('message') or 'no images'}"
    if job["state"] == "failed":
        return EngineError(message, field=error.get("field"), code=str(error.get("code") or "remote_failed"))
    return TransientEngineError(message)
