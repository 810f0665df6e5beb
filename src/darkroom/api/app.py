"""The FastAPI app factory. Workers in the same process start and stop with the app's lifespan."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import RedirectResponse

from darkroom import __version__, clock
from darkroom.service import Services
from darkroom.storage.retention import start_for as start_retention
from darkroom.webhooks.dispatcher import start_for as start_webhooks

from . import a1111, admin, errors, health, openai_compat, review, v1, webhooks

log = logging.getLogger("darkroom.api")


def create_app(services: Services, workers: int = 0) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services.start_workers(workers)
        dispatcher = start_webhooks(services.settings, services.store)
        retention = start_retention(services.settings, services)
        try:
            yield
        finally:
            retention.stop()
            if dispatcher is not None:
                dispatcher.stop()
            services.stop_workers()

    app = FastAPI(
        title="darkroom",
        version=__version__,
        description="Self-hosted image generation: durable jobs, GPU workers, full provenance.",
        lifespan=lifespan,
    )
    app.state.services = services
    errors.install(app)
    _install_middleware(app, services)
    app.include_router(v1.router)
    app.include_router(health.router)
    app.include_router(admin.router)
    app.include_router(a1111.router)
    app.include_router(openai_compat.router)
    app.include_router(webhooks.router)
    app.include_router(review.router)

    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/docs")

    return app


def _install_middleware(app: FastAPI, services: Services) -> None:
    # JSON bodies carry base64 images, so the cap is the upload limit plus base64 and field overhead.
    max_body = services.settings.limits.max_upload_bytes * 4 // 3 + 256 * 1024

    @app.middleware("http")
    async def request_context(request: Request, call_next):  # type: ignore[no-untyped-def]
        rid = request.headers.get("X-Request-ID") or clock.new_id("req")
        request.state.request_id = rid[:64]
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_body:
            return errors.problem(413, "payload_too_large", f"request body is larger than {max_body} bytes", "body")
        response = await call_next(request)
        response.headers["X-Request-ID"] = request.state.request_id
        return response


PROBLEM_SCHEMA = {
    "title": "Problem",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "field": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            },
        }
    },
}


def _openapi(app: FastAPI) -> dict:
    """FastAPI documents validation errors as its own `{"detail": …}`; darkroom answers `{"error": …}` (errors.py)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        if "HTTPValidationError" in components:
            components["HTTPValidationError"] = PROBLEM_SCHEMA
            components.pop("ValidationError", None)  # only FastAPI's shape used it
        app.openapi_schema = schema
    return app.openapi_schema
