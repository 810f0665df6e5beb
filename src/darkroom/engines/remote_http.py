"""What every remote engine shares: its key, its HTTP client, the error classes of a failed call, images as base64
PNG, and a progress relay for backends whose generation call blocks until the images are ready.

A remote engine (another darkroom, an A1111 server, a ComfyUI server, an OpenAI-compatible cloud API) only computes
pixels; the local worker keeps the lease, retries, cancel and provenance. Its failures are classified once, here, like
the local engine's (engines/classify.py):
- the request is at fault (a 4xx other than 401/403/408/429): a permanent `EngineError`, naming the field when the
  remote names one;
- the key is rejected (401/403), or the remote does not answer at all (connection refused, and its health probe
  fails too): `FatalEngineError`, the engine's fault, not the job's: the job goes back uncharged and the worker
  claims again only once `check()` passes, so a remote that died mid-job loses no job and burns no attempts;
- anything else (5xx, 408/429, a connection dropped while the remote still answers): a retryable
  `TransientEngineError`.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import httpx

from darkroom.engines.base import Capabilities, EngineHealth, ProgressFn
from darkroom.errors import EngineError, FatalEngineError, TransientEngineError

if TYPE_CHECKING:
    from PIL import Image

    from darkroom.config import RemoteEngineSettings, Settings
    from darkroom.engines.base import Engine

T = TypeVar("T")
PROBE_SECONDS = 3.0  # how long a health probe after a lost connection may take


def service_key(settings: RemoteEngineSettings) -> str | None:
    """The remote's API key, from the named environment variable or file; never from the database."""
    if settings.api_key_env:
        key = os.environ.get(settings.api_key_env, "").strip()
        if not key:
            raise ValueError(f"remote.api_key_env names {settings.api_key_env}, which is not set")
        return key
    if settings.api_key_file:
        try:
            return settings.api_key_file.read_text().strip() or None
        except OSError as exc:
            raise ValueError(f"remote.api_key_file {settings.api_key_file}: {exc}") from None
    return None


def build_remote(settings: Settings) -> Engine:
    """The remote engine `settings.engine` names, configured by `settings.remote`."""
    from darkroom.engines import remote_a1111, remote_comfyui, remote_darkroom, remote_openai

    kinds: dict[str, Callable[[RemoteEngineSettings], Engine]] = {
        "darkroom": remote_darkroom.RemoteDarkroomEngine.from_settings,
        "a1111": remote_a1111.A1111Engine.from_settings,
        "comfyui": remote_comfyui.ComfyUIEngine.from_settings,
        "openai": remote_openai.OpenAIImagesEngine.from_settings,
    }
    return kinds[settings.engine](settings.remote)  # each kind's `from_settings` says what is missing


def base64_png(image: Image.Image) -> str:
    return base64.b64encode(png_bytes(image)).decode()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode_image(data: bytes | str) -> Image.Image:
    """A remote's image (bytes, or base64 as A1111 and OpenAI send it) as RGB."""
    from PIL import Image as PILImage

    raw = base64.b64decode(data.split(",", 1)[-1]) if isinstance(data, str) else data
    return PILImage.open(io.BytesIO(raw)).convert("RGB")


def probe(http: httpx.Client, path: str, host: str) -> EngineHealth:
    """A remote's health: `path` answers 200 within `PROBE_SECONDS`, and how long that took."""
    started = time.perf_counter()
    try:
        response = http.get(path, timeout=PROBE_SECONDS)
    except httpx.HTTPError as exc:
        return EngineHealth(ok=False, detail=f"{host}: {type(exc).__name__}: {exc}")
    latency = round((time.perf_counter() - started) * 1000, 1)
    if response.status_code != 200:
        return EngineHealth(ok=False, detail=f"{host}: {path} answered {response.status_code}", latency_ms=latency)
    return EngineHealth(ok=True, detail=host, latency_ms=latency)


def status_error(status: int, message: str, field: str | None = None, code: str | None = None) -> Exception:
    """A remote's error answer as the worker's error types (see the module docstring)."""
    if status in (401, 403):
        return FatalEngineError(message)
    if status < 500 and status not in (408, 429):
        return EngineError(message, field=field, code=code or "remote_rejected")
    return TransientEngineError(message)


def error_message(response: httpx.Response) -> tuple[str, str | None]:
    """The message and field of an error answer, in darkroom's, OpenAI's, ComfyUI's or FastAPI's shape."""
    try:
        body: Any = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase, None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            field = error.get("field") or error.get("param")
            return str(error.get("message") or error), str(field) if field else None
        if error or body.get("detail"):
            return str(error or body.get("detail"))[:300], None
    return str(body)[:300], None


_Remote = TypeVar("_Remote", bound="RemoteHTTP")


class RemoteHTTP:
    """An HTTP backend: the base URL, one `httpx.Client` with the engine's auth, health, and classified calls."""

    kind = "remote"
    example_url = ""  # shown when remote.url is missing
    health_path = "/"  # answers 200 when the remote is up and takes our key
    modes: frozenset[str] = frozenset({"txt2img"})  # what the kind can run (`Capabilities.modes`)

    @classmethod
    def from_settings(cls: type[_Remote], settings: RemoteEngineSettings) -> _Remote:
        """The engine `settings.remote` describes: its URL, the service key (env or file), and `options`."""
        if not settings.url:
            example = f", e.g. {cls.example_url}" if cls.example_url else ""
            raise ValueError(f"engine = {cls.kind} needs remote.url (DARKROOM_REMOTE__URL){example}")
        make: Callable[..., _Remote] = cls  # each kind takes (url, key, *, timeout_seconds, poll_seconds, **options)
        return make(
            settings.url,
            service_key(settings),
            timeout_seconds=settings.timeout_seconds,
            poll_seconds=settings.poll_seconds,
            **cls.options(settings),
        )

    @classmethod
    def options(cls, settings: RemoteEngineSettings) -> dict[str, Any]:
        """What else of `settings.remote` this kind of engine takes."""
        return {"username": settings.username, "external": settings.external}

    def __init__(
        self,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        auth: httpx.Auth | None = None,
        external: bool = False,
        timeout_seconds: float = 30.0,
        poll_seconds: float = 1.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.host = urlsplit(self.url).netloc
        self.device = self.host  # where the pixels are computed, for logs and listings
        self.poll_seconds = poll_seconds
        self.capabilities = Capabilities(modes=self.modes, external=external)
        self.http = httpx.Client(
            base_url=self.url, headers=headers, auth=auth, timeout=timeout_seconds, transport=transport
        )

    # --- Engine protocol (the parts every remote shares) -------------------------------------------------------------

    def preload(self, model_id: str) -> None:
        """The remote loads its own models."""

    def held_models(self) -> list[str]:
        """None: what the remote holds is its own business."""
        return []

    def health(self) -> EngineHealth:
        return probe(self.http, self.health_path, self.host)

    def check(self) -> None:
        """After a `FatalEngineError`: the worker claims again only once the remote answers, with our key."""
        self.call("GET", self.health_path)

    def close(self) -> None:
        self.http.close()

    # --- calls ---------------------------------------------------------------------------------------------------

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request; an error answer or a failed connection raises the worker's error type for it."""
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise self.transport_error(exc) from exc
        if response.status_code >= 400:
            message, field = error_message(response)
            where = f"{self.kind} {self.host}: {method} {path} answered {response.status_code}: {message}"
            raise status_error(response.status_code, where, field)
        return response

    def transport_error(self, exc: BaseException) -> Exception:
        """A call that got no answer: the engine's fault when the remote is gone, else worth a retry."""
        message = f"{self.kind} {self.host}: {type(exc).__name__}: {exc}"
        if isinstance(exc, httpx.ConnectError) or not self.health().ok:
            return FatalEngineError(f"{message} (the remote does not answer)")
        return TransientEngineError(message)

    def relay(
        self,
        call: Callable[[], T],
        progress: ProgressFn,
        steps: int,
        poll: Callable[[], tuple[int, int] | None],
        interrupt: Callable[[], None],
    ) -> T:
        """Run a blocking generation `call` beside this thread, which relays `poll()`'s (step, total) to `progress`
        every `poll_seconds`. When `progress` raises (cancel, time limit, lease lost, drain), `interrupt()` asks the
        remote to stop and the exception goes on; the call's late answer is dropped."""
        outcome: dict[str, Any] = {}
        done = threading.Event()

        def run() -> None:
            try:
                outcome["value"] = call()
            except BaseException as exc:  # handed to the worker's thread
                outcome["error"] = exc
            finally:
                done.set()

        threading.Thread(target=run, name=f"{self.kind}-call", daemon=True).start()
        step, total = 0, steps
        while not done.wait(self.poll_seconds):
            # A progress probe is best effort; the call itself says whether the remote failed.
            with contextlib.suppress(Exception):
                step, total = poll() or (step, total)
            try:
                progress(step, total)
            except BaseException:
                interrupt()
                raise
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]
