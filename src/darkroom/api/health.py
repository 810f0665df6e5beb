"""Liveness and readiness (open, for probes; they reveal nothing), and metrics (operators)."""

from __future__ import annotations

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

from darkroom.auth.principal import Permission

from .auth import require

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="The database answers and a model is available")
def readyz(request: Request) -> JSONResponse:
    svc = request.app.state.services
    checks: dict[str, str] = {}
    try:
        with svc.store.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {type(exc).__name__}"
    checks["models"] = "ok" if svc.registry.scan() else "error: no models"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "checks": checks}, status_code=200 if ready else 503
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics (operators: give the scraper an operator key)",
    include_in_schema=False,
    dependencies=[Depends(require(Permission.queue))],
)
def metrics(request: Request) -> Response:
    svc = request.app.state.services
    registry = CollectorRegistry()
    gauge = Gauge("darkroom_jobs", "Jobs by state", ["state"], registry=registry)
    for state, count in svc.store.counts().items():
        gauge.labels(state=state).set(count)
    Gauge("darkroom_workers_in_process", "Worker threads in this process", registry=registry).set(len(svc.workers))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
