"""The API's edge: one pure ASGI middleware that sees every request before any handler or body read.

In order, for each HTTP request:
1. a request id (the caller's `X-Request-ID`, or a new one), echoed on the response;
2. health probes (`/healthz`, `/readyz`) pass straight through: they must answer while everything else is busy;
3. backpressure: past the admission limit (`darkroom.api.admission`: it follows the process's latency, up to
   `max_in_flight`), an immediate 429 `overloaded` with Retry-After. Latency under overload grows without bound
   when requests queue for threads; a fast refusal lets clients back off and keeps the accepted ones fast (the
   store's queue-depth 429 is the other half). A job's event stream
   (`/v1/jobs/{id}/events`, SSE) neither counts nor is refused: it is an async wait on the change feed that costs
   nothing while nothing happens, and counted it let 64 clients that follow their jobs lock every other caller out;
4. the body cap: a declared Content-Length past it is refused at once; otherwise bytes are counted as they stream
   (chunked bodies have no Content-Length, and a declared one is only a claim), and the read that passes the cap
   raises 413 `payload_too_large` (field `body`), so at most the cap is ever buffered;
5. a request that carries a body is authenticated before the body is read (`auth.admit_before_body`); a refused
   caller's body is never read at all (the route sees an empty one and its `require(...)` raises the refusal); so is
   a submit like one the store refused `queue_full` a moment ago, for this tenant and route (`admission.QueueFullMemo`);
6. its duration goes to `darkroom_http_request_duration_seconds` by route *template* (Starlette's router leaves the
   matched route in `scope["route"]`; a request no route matched counts as `unmatched`), method and status class;
7. its log lines carry its request id (and tenant, once known), and an access line is written to `darkroom.access`
   (on by default in JSON log mode, see `darkroom.observability.logging`); with tracing on, a `request` span in the
   request id's trace (`darkroom.observability.tracing`).

Pure ASGI rather than `BaseHTTPMiddleware`: no extra task per request, and `receive` can be wrapped or withheld.
Starlette's own body limit is not used: it answers in plain text, replacing the API's error shape."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from darkroom import clock
from darkroom.jobs.store import QueueFull
from darkroom.observability import metrics, tracing
from darkroom.observability.logging import ACCESS_LOGGER
from darkroom.observability.logging import context as log_context

from .admission import InFlight, QueueFullMemo, Slot
from .errors import problem

PROBES = frozenset({"/healthz", "/readyz"})
access_log = logging.getLogger(ACCESS_LOGGER)


class BodyTooLarge(HTTPException):
    """Raised from `receive` by the read that passes the cap. An HTTPException, so FastAPI passes it on from its
    body parsing (rather than calling it a parse error) and the error handlers answer 413 in the route's shape."""

    def __init__(self, cap: int) -> None:
        super().__init__(413, f"request body is larger than {cap} bytes")


class Edge:
    def __init__(
        self,
        app: ASGIApp,
        *,
        in_flight: InFlight,
        retry_after: int,
        max_body: int,
        admit: Callable[[Request], Awaitable[None]],
        queue_full: QueueFullMemo,
    ) -> None:
        self.app = app
        self.in_flight = in_flight
        self.queue_full = queue_full
        self.retry_after = retry_after
        self.max_body = max_body
        self.admit = admit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        rid = (headers.get("x-request-id") or clock.new_id("req"))[:64]
        scope.setdefault("state", {})["request_id"] = rid
        declared = headers.get("content-length", "")
        chunked = "transfer-encoding" in headers
        body = _Body(
            unread=chunked or declared not in ("", "0"),
            small=not chunked
            and "expect" not in headers  # a client awaiting 100 Continue may never send the body it declared
            and declared.isdigit()
            and int(declared) <= KEEP_ALIVE_BODY_BYTES,
        )
        send = _response_headers(send, rid, body)
        started = clock.monotonic()
        with (
            log_context(request_id=rid),  # every log line of this request carries its id (observability.logging)
            tracing.span("request", tracing.request_context(rid), method=scope["method"]) as span,
        ):
            try:
                await self._handle(scope, receive, send, declared, body)
            finally:
                route = getattr(scope.get("route"), "path", "unmatched")
                seconds = clock.monotonic() - started
                metrics.http_request(route, scope["method"], body.status, seconds)
                _access(scope, route, body.status, seconds)
                tracing.set_attributes(span, route=route, status=body.status)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, declared: str, body: _Body) -> None:
        if scope["path"] in PROBES:
            await self.app(scope, receive, send)
            return
        if _is_event_stream(scope["path"]):
            await self.app(scope, _counted(receive, self.max_body, body), send)
            return
        if self.in_flight.full():
            refusal = problem(
                429,
                "overloaded",
                f"the server is handling {self.in_flight.count} requests; retry after {self.retry_after}s",
                headers={"Retry-After": str(self.retry_after)},
            )
            await refusal(scope, receive, send)
            return
        if declared.isdigit() and int(declared) > self.max_body:
            too_large = problem(413, "payload_too_large", f"request body is larger than {self.max_body} bytes", "body")
            await too_large(scope, receive, send)
            return
        slot = scope["state"]["in_flight"] = self.in_flight.enter()  # a route that waits for a job leaves it early
        try:
            receive = _counted(receive, self.max_body, body, slot)
            if body.unread:
                request = Request(scope)  # no receive: admission cannot read the body
                await self.admit(request)
                self._still_full(scope, request)
                if getattr(request.state, "edge_refusal", None) is not None:
                    receive = _no_body()
            await self.app(scope, receive, send)
        finally:
            slot.leave()

    def _still_full(self, scope: Scope, request: Request) -> None:
        """A submit like one the store refused `queue_full` a moment ago (and not a possible replay) is refused again:
        the same error, kept for the route's `require(...)` to raise as it does an auth refusal, so it leaves in the
        route's own shape (OpenAI's, A1111's) with its Retry-After, the body unread."""
        who = getattr(request.state, "principal", None)  # None: the caller was refused, or is not known yet
        if who is None or scope["method"] != "POST" or "idempotency-key" in request.headers:
            return
        found = self.queue_full.refusal(who.tenant, scope["path"])
        if found is not None:
            request.state.edge_refusal = QueueFull(found.message, found.retry_after, found.tenant)


def _is_event_stream(path: str) -> bool:
    """`/v1/jobs/{id}/events` (and the web UI's `/ui/jobs/{id}/events`): a GET that follows one job while it runs."""
    return path.startswith(("/v1/jobs/", "/ui/jobs/")) and path.endswith("/events") and path.count("/") == 4


KEEP_ALIVE_BODY_BYTES = 64 * 1024
"""An unread body up to this size (declared by Content-Length) does not end the connection: the server reads it
after the response and drops it, as uvicorn does (httptools and h11 alike), and the connection carries the next
request. Refusals answered before the body (429 `overloaded`, 401, a repeated `queue_full`) are the common case
under load, and closing after each made every refused client open a new connection for its next request: measured
with 200 clients on two cores, a request on a new connection waited 66 ms at p99 (155 ms at most) before the server
saw it, against 10 ms on a kept one, and that wait was the p99 of every kind of request. A larger or chunked body
still ends the connection: reading megabytes to throw them away is worse than a new handshake. So does one announced
with `Expect: 100-continue`: its client may never send it, and its next request would be read as that body."""


@dataclass
class _Body:
    """Whether the request's body is still (partly) unread when the response starts, and whether it is small enough
    (`KEEP_ALIVE_BODY_BYTES`) to be read and dropped after it. An unread body that is not says `Connection: close`,
    so a keep-alive client does not send its next request down a socket the server is about to close."""

    unread: bool
    small: bool = False
    status: int = 500  # the response's status once it starts (an exception that escapes the app answers 500)


def _counted(receive: Receive, cap: int, body: _Body, slot: Slot | None = None) -> Receive:
    total = 0

    async def counting() -> Message:
        nonlocal total
        message = await receive()
        if message["type"] == "http.request":
            total += len(message.get("body", b""))
            if total > cap:
                raise BodyTooLarge(cap)
            if not message.get("more_body", False):
                body.unread = False
                if slot is not None:
                    slot.work_starts()
        return message

    return counting


def _no_body() -> Receive:
    """The body of a refused request, as the route sees it: empty, then a disconnect. The app never reads it; the
    server drops it after the response, or closes the connection when it is large (`KEEP_ALIVE_BODY_BYTES`)."""
    messages = iter([{"type": "http.request", "body": b"", "more_body": False}])

    async def receive() -> Message:
        return next(messages, {"type": "http.disconnect"})

    return receive


def _response_headers(send: Send, rid: str, body: _Body) -> Send:
    async def sender(message: Message) -> None:
        if message["type"] == "http.response.start":
            body.status = message["status"]
            headers = MutableHeaders(scope=message)
            headers.setdefault("X-Request-ID", rid)
            if body.unread and not body.small:
                headers["Connection"] = "close"
        await send(message)

    return sender


def _access(scope: Scope, route: str, status: int, seconds: float) -> None:
    """One line per request (not per probe): method, path, route template, status and milliseconds."""
    if scope["path"] in PROBES or not access_log.isEnabledFor(logging.INFO):
        return
    extra = {"method": scope["method"], "path": scope["path"], "route": route, "status": status}
    extra["duration_ms"] = round(seconds * 1000, 2)
    access_log.info("%s %s %d", scope["method"], scope["path"], status, extra=extra)
