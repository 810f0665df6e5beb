"""The FastAPI app factory. Workers in the same process start and stop with the app's lifespan, and so do the
request thread pool's size, the auth caches' cross-process invalidation and the failed-login summaries."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import anyio.to_thread
from fastapi import FastAPI

from darkroom import __version__
from darkroom.auth import invalidation
from darkroom.auth.failures import LoginFailures
from darkroom.models import approvals
from darkroom.models.registry import ModelRegistry
from darkroom.observability.health import Sweeper
from darkroom.schemas import WEBHOOK_EVENTS
from darkroom.service import Services
from darkroom.storage.retention import start_for as start_retention
from darkroom.web import mount as web_ui
from darkroom.web.session_auth import admit_before_body
from darkroom.webhooks.deliveries import COMPLETED
from darkroom.webhooks.dispatcher import WebhookDispatcher
from darkroom.webhooks.dispatcher import start_for as start_webhooks

from . import a1111, admin, comfyui, controlnet, errors, health, landing, openai_compat, openapi, review, v1, webhooks
from .a1111_info import router as a1111_info_router
from .admission import InFlight, QueueFullMemo
from .edge import Edge
from .templates import router as templates_router

log = logging.getLogger("darkroom.api")


def create_app(
    services: Services, workers: int = 0, worker_processes: bool = False, background: bool = True
) -> FastAPI:
    """The API. `workers`: how many workers to run beside it, as child processes with `worker_processes` (what
    `darkroom serve` does: see `darkroom.worker.processes`), else as threads of this process. `background`: run the
    webhook dispatcher, retention and the sweeper here (not in the extra API processes, `darkroom.api.processes`)."""
    server = services.settings.server
    services.keys.configure_cache(server.auth_cache_seconds)
    services.tenants.configure_cache(server.auth_cache_seconds)
    services.registry.rescan_seconds = ModelRegistry.SERVICE_RESCAN_SECONDS  # a submit looks at most once a second
    services.approve_models()  # versions of what the folder holds now (first-seen names approved, per settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Sync handlers run on anyio's default limiter: its size is the request thread pool.
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = server.request_threads
        app.state.request_limiter = limiter
        listener = invalidation.listen(
            services.settings.resolved_database_url,
            {"key": services.keys, "tenant": services.tenants, "model": approvals.SERVABLE_CACHE},
        )
        app.state.cache_listener = listener
        if worker_processes:
            level = logging.getLevelName(logging.getLogger("darkroom").getEffectiveLevel()).lower()
            services.start_worker_processes(workers, log_level=level)
        else:
            services.start_workers(workers)
        dispatcher = start_webhooks(services.settings, services.store) if background else None
        unwake = _wake_on_events(services, dispatcher)
        retention = start_retention(services.settings, services) if background else None
        sweeper = Sweeper(services.settings, services.store).start() if background else None  # lost workers, disk
        try:
            yield
        finally:
            if sweeper is not None:
                sweeper.stop()
            if retention is not None:
                retention.stop()
            unwake()
            if dispatcher is not None:
                dispatcher.stop()
            services.stop_workers()
            if listener is not None:
                listener.stop()
            app.state.login_failures.flush()

    app = FastAPI(
        title="darkroom",
        version=__version__,
        description="Self-hosted image generation: durable jobs, GPU workers, full provenance.",
        lifespan=lifespan,
        docs_url=None,  # served by darkroom.web.docs from vendored assets (FastAPI's load from a CDN)
        redoc_url=None,
        # darkroom records its own request spans and metrics (api/edge.py, observability/). FastAPI's native
        # telemetry would record each request a second time wherever a global OpenTelemetry provider is set, and
        # looks the global providers up on every request even where none is: 4 % of the event loop's time with
        # 200 clients (py-spy --gil).
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    app.state.services = services
    app.state.login_failures = LoginFailures(
        services.audit,
        per_minute=server.auth_failures_per_minute,
        audited_per_minute=server.audited_failures_per_minute,
    )
    app.state.readiness = health.Readiness(services, server.ready_cache_seconds, server.ready_timeout_seconds)
    app.state.in_flight = InFlight(
        server.max_in_flight, target_seconds=server.admission_target_ms / 1000, floor=server.admission_floor
    )
    app.state.queue_full = QueueFullMemo()
    errors.install(app, database_retry_after=server.database_retry_after)
    app.add_middleware(
        Edge,
        in_flight=app.state.in_flight,
        retry_after=server.overloaded_retry_after,
        max_body=_max_body(services),
        admit=admit_before_body,
        queue_full=app.state.queue_full,
    )
    app.include_router(v1.router)
    app.include_router(health.router)
    app.include_router(admin.router)
    app.include_router(a1111.router)
    app.include_router(a1111_info_router)  # /sdapi/v1 informational routes
    app.include_router(controlnet.router)  # A1111's ControlNet extension: /controlnet/*
    app.include_router(openai_compat.router)
    for prefix in ("", "/api"):  # ComfyUI serves its routes at both (its front end uses /api/...)
        app.include_router(comfyui.router, prefix=prefix)
        app.include_router(comfyui.socket_router, prefix=prefix)
    app.include_router(webhooks.router)
    app.include_router(review.router)
    app.include_router(templates_router)  # prompt templates and asset types (darkroom.models.templates)
    app.include_router(landing.router)
    web_ui.install(app)

    app.openapi = lambda: openapi.build(app)  # type: ignore[method-assign]

    return app


def _max_body(services: Services) -> int:
    """The body cap, counted as the body streams (api/edge.py). JSON bodies carry base64 images, so by default it
    is the upload limit plus base64 and field overhead."""
    settings = services.settings
    return settings.server.max_body_bytes or settings.limits.max_upload_bytes * 4 // 3 + 256 * 1024


def _wake_on_events(services: Services, dispatcher: WebhookDispatcher | None) -> Callable[[], None]:
    """The dispatcher sleeps (backing off to a few seconds) until the change feed reports an event a webhook may be
    owed for; progress events, the most frequent, are left to its busy-time pace."""
    if dispatcher is None or services.feed is None:
        return lambda: None
    wanted = (set(WEBHOOK_EVENTS) - {"progress", "completed"}) | COMPLETED
    return services.feed.on_events(wanted, dispatcher.wake)
