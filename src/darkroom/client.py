"""darkroom's Python SDK: `Client` (sync) and `AsyncClient` (asyncio), both on httpx.

    from darkroom.client import Client

    with Client("http://127.0.0.1:8000") as dr:
        job = dr.generate(prompt="a lighthouse at dusk", steps=20, seed=42)   # submit + wait (SSE)
        paths = dr.download(job, "out/")                                     # the PNGs, provenance inside

What it takes care of:
- **Retries** on 429, 503 and connection errors, with exponential backoff and full jitter, honouring the server's
  `Retry-After` (never retrying sooner than it says). Other errors raise `ApiError` at once.
- **Idempotency**: every submit carries an `Idempotency-Key` (generated unless given), and its retries reuse it, so a
  submit retried after a lost response never makes a second job: the server answers with the first one.
- **Progress**: `events()` streams a job's Server-Sent Events and resumes a dropped stream with `Last-Event-ID`.
- **Webhooks**: `verify_webhook()` checks a delivery's `X-Darkroom-Signature` (see docs/api.md).

The transport-independent parts (retry decisions, error parsing, SSE framing) are shared by both clients.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from darkroom import __version__
from darkroom.webhooks.signing import (
    DEFAULT_TOLERANCE_SECONDS,
    SIGNATURE_HEADER,
    WebhookVerificationError,
)
from darkroom.webhooks.signing import verify as _verify_signature

__all__ = [
    "ApiError",
    "AsyncClient",
    "Client",
    "JobFailed",
    "RetryPolicy",
    "WebhookVerificationError",
    "verify_webhook",
]

TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled", "dead"})
TERMINAL_EVENTS = TERMINAL_STATES
EventCallback = Callable[[dict[str, Any]], None]


class ApiError(RuntimeError):
    """The server answered with an error: `status`, and `error` = {"code", "message", "field"}."""

    def __init__(self, status: int, error: dict[str, Any]) -> None:
        self.status = status
        self.error = error
        field_ = f" [{error.get('field')}]" if error.get("field") else ""
        super().__init__(f"{status} {error.get('code')}: {error.get('message')}{field_}")


class JobFailed(RuntimeError):
    """`wait()`/`generate()` saw the job end without images (failed, cancelled or dead); `job` is its last view."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.job = job
        error = job.get("error") or {}
        super().__init__(f"job {job['id']} {job['state']}: {error.get('message', '')}".rstrip(": "))


@dataclass(frozen=True)
class RetryPolicy:
    """When to try again. `delay()` returns seconds to wait before the next attempt, or None to give up."""

    max_attempts: int = 5
    backoff: float = 0.5
    max_backoff: float = 30.0
    max_retry_after: float = 300.0
    statuses: frozenset[int] = field(default_factory=lambda: frozenset({429, 503}))
    rand: Callable[[], float] = random.random

    def delay(self, attempt: int, response: httpx.Response | None = None) -> float | None:
        """`attempt`: how many attempts were made (1 after the first). `response`: None after a connection error."""
        if attempt >= self.max_attempts:
            return None
        if response is not None:
            if response.status_code not in self.statuses:
                return None
            after = retry_after_seconds(response.headers.get("Retry-After"))
            if after is not None:
                return after if after <= self.max_retry_after else None
        return self.rand() * min(self.max_backoff, self.backoff * 2 ** (attempt - 1))


def retry_after_seconds(value: str | None, now: dt.datetime | None = None) -> float | None:
    """`Retry-After` is delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - (now or dt.datetime.now(dt.UTC))).total_seconds())


def verify_webhook(
    body: bytes | str,
    signature: str | Mapping[str, str] | None,
    secret: str,
    *,
    tolerance: float = DEFAULT_TOLERANCE_SECONDS,
) -> dict[str, Any]:
    """Check a webhook delivery and return its parsed JSON.

    `body`: the raw request body exactly as received; `signature`: the `X-Darkroom-Signature` header value, or the
    request's headers (any mapping, case-insensitive lookup). Raises `WebhookVerificationError` when the signature
    does not match `secret` or is older than `tolerance` seconds (a replay)."""
    raw = body.encode() if isinstance(body, str) else body
    if signature is not None and not isinstance(signature, str):
        lowered = {k.lower(): v for k, v in signature.items()}
        signature = lowered.get(SIGNATURE_HEADER.lower())
    _verify_signature(raw, signature, secret, tolerance=tolerance)
    return json.loads(raw)


# --- shared, transport-independent parts ----------------------------------------------------------------------------


def _error_of(response: httpx.Response) -> ApiError:
    try:
        error = response.json()["error"]
        if not isinstance(error, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        error = {"code": "http_error", "message": response.text[:200]}
    return ApiError(response.status_code, error)


def _submit_body(body: Mapping[str, Any] | None, fields: dict[str, Any]) -> dict[str, Any]:
    merged = {**(body or {}), **fields}
    if "prompt" not in merged:
        raise ValueError("a job needs a prompt")
    return merged


def _image_path(image_id_or_url: str) -> str:
    return image_id_or_url if "/" in image_id_or_url else f"/v1/images/{image_id_or_url}"


def _download_paths(job: dict[str, Any], target: str | Path) -> list[Path]:
    """A folder gets `<job id>-<index>.png`; a file name gets `name.png`, `name-2.png` … for several images."""
    target = Path(target)
    images = job.get("images") or []
    if target.suffix.lower() != ".png":
        return [target / f"{job['id']}-{image['index']}.png" for image in images]
    if len(images) == 1:
        return [target]
    return [target.with_name(f"{target.stem}-{i + 1}{target.suffix}") for i in range(len(images))]


class _SSE:
    """Server-Sent Events framing: feed lines, get (id, data) pairs; remembers the last id to resume from."""

    def __init__(self, last_id: int = 0) -> None:
        self.last_id = last_id
        self._data: list[str] = []
        self._id: int | None = None

    def feed(self, line: str) -> dict[str, Any] | None:
        if line.startswith("data:"):
            self._data.append(line[5:].strip())
        elif line.startswith("id:") and line[3:].strip().isdigit():
            self._id = int(line[3:].strip())
        elif not line and self._data:
            event = json.loads("\n".join(self._data))
            self._data = []
            if self._id is not None:
                self.last_id, self._id = self._id, None
            return event
        return None


def _headers(api_key: str | None) -> dict[str, str]:
    headers = {"User-Agent": f"darkroom-python/{__version__}"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


# --- the sync client ------------------------------------------------------------------------------------------------


class Client:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        timeout: float = 60.0,
        *,
        api_key: str | None = None,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self.http = httpx.Client(
            base_url=base_url.rstrip("/"), timeout=timeout, headers=_headers(api_key), transport=transport
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One call with the retry policy applied; raises ApiError for an error answer."""
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self.http.request(method, path, **kwargs)
            except httpx.TransportError:
                wait = self.retry.delay(attempt)
                if wait is None:
                    raise
                time.sleep(wait)
                continue
            if response.status_code < 400:
                return response
            wait = self.retry.delay(attempt, response)
            if wait is None:
                raise _error_of(response)
            time.sleep(wait)

    def submit(
        self, body: Mapping[str, Any] | None = None, idempotency_key: str | None = None, **fields: Any
    ) -> dict[str, Any]:
        """Queue a job (`body` and/or keyword fields: prompt, width, steps, seed, webhook_url …). Every submit
        carries an idempotency key, and retries reuse it, so a retried submit never makes two jobs."""
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        return self.request("POST", "/v1/jobs", json=_submit_body(body, fields), headers=headers).json()

    def job(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{job_id}").json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.request("DELETE", f"/v1/jobs/{job_id}").json()

    def events(self, job_id: str, after: int = 0) -> Iterator[dict[str, Any]]:
        """The job's events (queued, started, progress, succeeded …) until it ends; a dropped stream is resumed."""
        yield from self._events(job_id, _SSE(after))

    def _events(self, job_id: str, sse: _SSE, read_timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """With `read_timeout`, a silent stream raises httpx.ReadTimeout instead of being resumed (wait's deadline)."""
        attempt = 0
        while True:
            try:
                for event in self._event_stream(job_id, sse, read_timeout):
                    attempt = 0
                    yield event
                    if event.get("type") in TERMINAL_EVENTS:
                        return
                return  # the server closed the stream after the end
            except httpx.TransportError as exc:
                attempt += 1
                wait = self.retry.delay(attempt)
                if wait is None or (read_timeout is not None and isinstance(exc, httpx.ReadTimeout)):
                    raise
                time.sleep(wait)

    def _event_stream(self, job_id: str, sse: _SSE, read_timeout: float | None) -> Iterator[dict[str, Any]]:
        headers = {"Last-Event-ID": str(sse.last_id)} if sse.last_id else {}
        timeout = httpx.Timeout(self.http.timeout.connect, read=read_timeout)
        with self.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=timeout) as resp:
            if resp.status_code >= 400:
                resp.read()
                raise _error_of(resp)
            for line in resp.iter_lines():
                if (event := sse.feed(line)) is not None:
                    yield event

    def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        on_event: EventCallback | None = None,
        raise_on_failure: bool = True,
    ) -> dict[str, Any]:
        """Follow the job's events until it ends (or `timeout` seconds pass: TimeoutError); returns the job."""
        deadline = None if timeout is None else time.monotonic() + timeout
        sse = _SSE()
        job = self.job(job_id)
        while job["state"] not in TERMINAL_STATES:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"job {job_id} did not finish within {timeout} s")
            try:
                for event in self._events(job_id, sse, remaining):
                    if on_event is not None:
                        on_event(event)
                    if deadline is not None and time.monotonic() > deadline:
                        break
            except httpx.ReadTimeout:
                pass  # nothing happened before the deadline: the loop raises TimeoutError
            job = self.job(job_id)
        if raise_on_failure and job["state"] != "succeeded":
            raise JobFailed(job)
        return job

    def generate(
        self,
        body: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        on_event: EventCallback | None = None,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Submit and wait: the finished job, with its images' URLs (JobFailed if it did not succeed)."""
        job = self.submit(body, idempotency_key, **fields)
        return self.wait(job["id"], timeout=timeout, on_event=on_event)

    def image(self, image_id_or_url: str) -> bytes:
        return self.request("GET", _image_path(image_id_or_url)).content

    def download(self, job: dict[str, Any] | str, target: str | Path = ".") -> list[Path]:
        """Save a finished job's PNGs into a folder (`<job>-<i>.png`) or to a `.png` path; returns the paths."""
        job = self.job(job) if isinstance(job, str) else job
        paths = _download_paths(job, target)
        for path, image in zip(paths, job.get("images") or [], strict=True):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(self.image(image["id"]))
        return paths

    def models(self) -> list[dict[str, Any]]:
        """The models this key may use (`data` of OpenAI's list envelope, which `GET /v1/models` answers in)."""
        return self.request("GET", "/v1/models").json()["data"]


# --- the async client -----------------------------------------------------------------------------------------------


class AsyncClient:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        timeout: float = 60.0,
        *,
        api_key: str | None = None,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self.http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), timeout=timeout, headers=_headers(api_key), transport=transport
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.aclose()

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self.http.request(method, path, **kwargs)
            except httpx.TransportError:
                wait = self.retry.delay(attempt)
                if wait is None:
                    raise
                await asyncio.sleep(wait)
                continue
            if response.status_code < 400:
                return response
            wait = self.retry.delay(attempt, response)
            if wait is None:
                raise _error_of(response)
            await asyncio.sleep(wait)

    async def submit(
        self, body: Mapping[str, Any] | None = None, idempotency_key: str | None = None, **fields: Any
    ) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        return (await self.request("POST", "/v1/jobs", json=_submit_body(body, fields), headers=headers)).json()

    async def job(self, job_id: str) -> dict[str, Any]:
        return (await self.request("GET", f"/v1/jobs/{job_id}")).json()

    async def cancel(self, job_id: str) -> dict[str, Any]:
        return (await self.request("DELETE", f"/v1/jobs/{job_id}")).json()

    async def events(self, job_id: str, after: int = 0) -> AsyncIterator[dict[str, Any]]:
        sse, attempt = _SSE(after), 0
        while True:
            try:
                async for event in self._event_stream(job_id, sse):
                    attempt = 0
                    yield event
                    if event.get("type") in TERMINAL_EVENTS:
                        return
                return
            except httpx.TransportError:
                attempt += 1
                wait = self.retry.delay(attempt)
                if wait is None:
                    raise
                await asyncio.sleep(wait)

    async def _event_stream(self, job_id: str, sse: _SSE) -> AsyncIterator[dict[str, Any]]:
        headers = {"Last-Event-ID": str(sse.last_id)} if sse.last_id else {}
        timeout = httpx.Timeout(self.http.timeout.connect, read=None)
        async with self.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=timeout) as resp:
            if resp.status_code >= 400:
                await resp.aread()
                raise _error_of(resp)
            async for line in resp.aiter_lines():
                if (event := sse.feed(line)) is not None:
                    yield event

    async def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        on_event: EventCallback | None = None,
        raise_on_failure: bool = True,
    ) -> dict[str, Any]:
        async def follow() -> None:
            async for event in self.events(job_id):
                if on_event is not None:
                    on_event(event)

        job = await self.job(job_id)
        if job["state"] not in TERMINAL_STATES:
            try:
                await asyncio.wait_for(follow(), timeout)
            except TimeoutError:
                raise TimeoutError(f"job {job_id} did not finish within {timeout} s") from None
            job = await self.job(job_id)
        if raise_on_failure and job["state"] != "succeeded":
            raise JobFailed(job)
        return job

    async def generate(
        self,
        body: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        on_event: EventCallback | None = None,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        job = await self.submit(body, idempotency_key, **fields)
        return await self.wait(job["id"], timeout=timeout, on_event=on_event)

    async def image(self, image_id_or_url: str) -> bytes:
        return (await self.request("GET", _image_path(image_id_or_url))).content

    async def download(self, job: dict[str, Any] | str, target: str | Path = ".") -> list[Path]:
        job = await self.job(job) if isinstance(job, str) else job
        paths = _download_paths(job, target)
        for path, image in zip(paths, job.get("images") or [], strict=True):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(await self.image(image["id"]))
        return paths

    async def models(self) -> list[dict[str, Any]]:
        return (await self.request("GET", "/v1/models")).json()["data"]
