"""The queue: the caller's queued and running jobs (as `GET /v1/jobs` scopes them) with place, ETA and cancel; for
operators the worker fleet (`GET /v1/workers`) and every tenant's queue in claim order (`GET /v1/queue`, which shows
another tenant's job without its id or prompt unless the caller is an admin)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from darkroom.api import admin, v1
from darkroom.auth.principal import Permission, Principal
from darkroom.schemas import PRIORITY_VALUE, JobState, JobView

from .render import page
from .session_auth import ui_principal

router = APIRouter(prefix="/ui", include_in_schema=False)
LIMIT = 200


@dataclass(frozen=True)
class Row:
    id: str | None
    tenant: str | None
    state: str
    priority: str
    position: int | None
    eta: float | None
    prompt: str
    model: str | None
    progress: str


def _row(view: JobView, tenant: str | None = None) -> Row:
    return Row(
        id=view.id,
        tenant=tenant,
        state=view.state.value,
        priority=view.priority,
        position=view.queue_position,
        eta=view.eta_seconds,
        prompt=str(view.request.get("prompt", ""))[:120],
        model=view.request.get("model"),
        progress=f"{view.progress.step}/{view.progress.total}" if view.progress.total else "",
    )


def _ordered(rows: list[Row]) -> list[Row]:
    """Running first, then the claim order: priority, place in the queue."""
    return sorted(rows, key=lambda r: (r.state != "running", -PRIORITY_VALUE[r.priority], r.position or 0))


def _queue(request: Request, who: Principal) -> dict:
    mine = [
        _row(view)
        for state in (JobState.running, JobState.queued)
        for view in v1.list_jobs(request, state, LIMIT, who=who)
    ]
    context: dict = {"mine": _ordered(mine), "fleet": None, "everyone": None, "current": {}}
    if who.can(Permission.queue):
        context["fleet"] = admin._list(request, None)
        context["current"] = _current_jobs(request, who)
        context["everyone"] = [_entry(e) for e in v1.whole_queue(request, LIMIT, who)]
    return context


def _entry(entry: v1.QueueEntry) -> Row:
    return Row(
        id=entry.id,
        tenant=entry.tenant,
        state=entry.state.value,
        priority=entry.priority,
        position=entry.queue_position,
        eta=entry.eta_seconds,
        prompt=(entry.prompt or "")[:120],
        model=entry.model,
        progress=f"{entry.progress.step}/{entry.progress.total}" if entry.progress.total else "",
    )


def _current_jobs(request: Request, who: Principal) -> dict[str, str | None]:
    """Worker id → the running job it holds: the id when the caller may see the job (its tenant; admins any), else
    None (busy with another tenant's job, whose id is not the caller's to know)."""
    store = request.app.state.services.store
    running = store.list(state=JobState.running, limit=LIMIT)
    return {
        job.lease_owner: job.id if who.can(Permission.admin) or job.tenant == who.tenant else None
        for job in running
        if job.lease_owner
    }


@router.get("/queue")
async def queue(request: Request) -> Response:
    who = await ui_principal(request)
    context = await run_in_threadpool(_queue, request, who)
    template = "queue_body.html" if request.headers.get("hx-request") else "queue.html"
    return page(request, template, **context)
