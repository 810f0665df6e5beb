"""Liveness and readiness (open, for probes; they reveal nothing), metrics (operators and `metrics` keys), and the
fleet's health for operators (`GET /v1/admin/health`: lost workers, stuck jobs, disk; see observability/health.py).

Probes must answer while the service is busy, or an orchestrator restarts a healthy but loaded node. So `/healthz`
is a coroutine (it never waits for a request thread), the edge middleware lets both probes past its in-flight limit,
and `/readyz` runs its database and models check on a thread of its own (not the request pool), with a timeout,
sharing one result for up to `ready_cache_seconds` however many probes arrive."""

from __future__ import annotations

import asyncio

import anyio
import sqlalchemy as sa
from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from darkroom import clock
from darkroom.auth.principal import Permission
from darkroom.jobs.workers import WorkerRegistry, WorkerState, stale_after
from darkroom.observability.health import sweep
from darkroom.observability.metrics import exposition, scrape_registry
from darkroom.service import Services
from darkroom.storage import storage_health

from .auth import require

router = APIRouter(tags=["health"])


class Readiness:
    """The last readiness check and when it ran; at most one check runs at a time."""

    def __init__(self, svc: Services, max_age: float, timeout: float) -> None:
        self.svc = svc
        self.max_age = max_age
        self.timeout = timeout
        self._checks: dict[str, str] | None = None
        self._at = 0.0
        self._lock: asyncio.Lock | None = None
        self._limiter: anyio.CapacityLimiter | None = None

    async def checks(self) -> dict[str, str]:
        if self._lock is None or self._limiter is None:  # made on the event loop, at first use
            self._lock, self._limiter = asyncio.Lock(), anyio.CapacityLimiter(1)
        async with self._lock:
            if self._checks is not None and clock.monotonic() - self._at <= self.max_age:
                return self._checks
            checks = {"database": f"error: no answer within {self.timeout:g}s", "models": "unknown"}
            with anyio.move_on_after(self.timeout):
                checks = await anyio.to_thread.run_sync(self._check, limiter=self._limiter, abandon_on_cancel=True)
            self._checks, self._at = checks, clock.monotonic()
            return checks

    def _check(self) -> dict[str, str]:
        checks: dict[str, str] = {}
        try:
            with self.svc.store.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"error: {type(exc).__name__}"
        checks["models"] = "ok" if self.svc.registry.scan() else "error: no models"
        checks["workers"] = str(self.svc.worker_health()["status"])
        checks["storage"] = storage_health(self.svc.blobs)
        if self.svc.settings.observability.expect_workers:
            checks["fleet"] = _fleet(self.svc)
        return checks


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="The database answers, a model is available, workers are healthy, storage has room",
    responses={503: {"description": "Not ready: `checks` says which check failed"}},
)
async def readyz(request: Request) -> JSONResponse:
    checks = await request.app.state.readiness.checks()
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "checks": checks}, status_code=200 if ready else 503
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics (operators: give the scraper an admin, operator or `metrics` key)",
    include_in_schema=False,
    dependencies=[Depends(require(Permission.metrics))],
)
def metrics(request: Request) -> Response:
    """The node's metrics (`darkroom.observability.metrics`): with `darkroom serve`'s worker processes, theirs too."""
    registry = scrape_registry(request.app.state.services.store.engine)
    return Response(exposition(registry), media_type=CONTENT_TYPE_LATEST)


def _fleet(svc: Services) -> str:
    """`ok` while at least one worker anywhere heartbeats (`observability.expect_workers`: API nodes whose workers
    run elsewhere are not ready without one)."""
    registry = WorkerRegistry(svc.store.engine)
    registry.mark_lost(stale_after(svc.settings.lease_seconds, svc.settings.heartbeat_seconds))
    live = [w for w in registry.list() if w.state in (WorkerState.active, WorkerState.draining)]
    return "ok" if live else "error: no live worker"


@router.get(
    "/v1/admin/health",
    tags=["admin"],
    summary="The fleet's health: lost workers, requeued and stuck jobs, data disk (operators; acts on what it finds)",
    dependencies=[Depends(require(Permission.queue))],
)
async def fleet_health(request: Request) -> dict:
    """Sweeps now (the same sweep the API runs every `observability.health_sweep_seconds`) and reports it, with the
    readiness checks beside it."""
    svc: Services = request.app.state.services
    report = await run_in_threadpool(sweep, svc.settings, svc.store)
    checks = await request.app.state.readiness.checks()
    return {**report.to_dict(), "checks": checks}
