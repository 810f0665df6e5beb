"""Operator endpoints: the worker fleet.

TODO(auth): admin-only once API keys and roles exist (issue: auth); until then anyone who reaches the API can read
this. It exposes host names, pids and devices, nothing that controls the service.
"""

from __future__ import annotations

import datetime as dt

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from darkroom.jobs.workers import WorkerRegistry, WorkerState, stale_after
from darkroom.service import Services

router = APIRouter(prefix="/v1", tags=["admin"])


class WorkerView(BaseModel):
    id: str
    host: str
    pid: int
    device: str
    memory_bytes: int | None
    loaded_models: list[str]
    models_available: list[str]
    state: WorkerState
    started_at: dt.datetime
    last_heartbeat_at: dt.datetime
    jobs_done: int


def _registry(request: Request) -> tuple[WorkerRegistry, Services]:
    svc: Services = request.app.state.services
    return WorkerRegistry(svc.store.engine), svc


def _list(request: Request, state: WorkerState | None) -> list[WorkerView]:
    registry, svc = _registry(request)
    # Mark silent workers lost before answering: when every worker is dead, nobody else is left to do it.
    registry.mark_lost(stale_after(svc.settings.lease_seconds, svc.settings.heartbeat_seconds))
    return [WorkerView.model_validate(w, from_attributes=True) for w in registry.list(state)]


@router.get("/workers", response_model=list[WorkerView], summary="Worker processes: device, models, liveness")
async def list_workers(request: Request, state: WorkerState | None = None) -> list[WorkerView]:
    return await run_in_threadpool(_list, request, state)
