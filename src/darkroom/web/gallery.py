"""The gallery: the caller's released images (what `GET /v1/jobs` and `GET /v1/images/{id}` let it see), searched by
prompt, model, date and tag; an image's page with its provenance, a verify badge and a download link.

Search runs over the caller's most recent `SCAN` finished jobs (newest first): the store keeps prompts in the job's
request JSON, which no portable index can search, so the gallery is honest about how far back it looks. A tag narrows
the jobs read to those carrying it, through the tag index (`darkroom.jobs.tags`), so it reaches further back."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from darkroom.api.auth import tenant_policy, visible_image
from darkroom.auth.principal import Permission, Principal
from darkroom.errors import HeldForReview
from darkroom.extras import MissingExtra
from darkroom.models import access as model_access
from darkroom.safety.verify import UnreadableImage, verify
from darkroom.schemas import JobState

from .render import page
from .session_auth import ui_principal

router = APIRouter(prefix="/ui/gallery", include_in_schema=False)
SCAN = 500


@dataclass(frozen=True)
class Tile:
    image_id: str
    job_id: str
    prompt: str
    model: str | None
    seed: int
    width: int
    height: int
    created_at: dt.datetime
    tags: tuple[str, ...] = ()


def _day(value: str | None) -> dt.date | None:
    try:
        return dt.date.fromisoformat(value) if value else None
    except ValueError:
        return None


def search(request: Request, who: Principal, q: str, model: str, since: str, until: str, tag: str = "") -> list[Tile]:
    store = request.app.state.services.store
    own = None if who.can(Permission.read_tenant_jobs) else (who.key_id or "")  # as GET /v1/jobs scopes a listing
    wanted = tag.strip().lower() or None  # tags are stored trimmed and lower-case
    listed = store.list_status(state=JobState.succeeded, limit=SCAN, tenant=who.tenant, key_id=own, tag=wanted)
    first, last = _day(since), _day(until)
    tiles = []
    for status in listed:
        job, req = status.job, status.job.request
        created = job.created_at.date()
        if q and q.lower() not in str(req.get("prompt", "")).lower():
            continue
        if model and req.get("model") != model:
            continue
        if (first and created < first) or (last and created > last):
            continue
        prompt, tags = str(req.get("prompt", "")), tuple(req.get("tags") or ())
        tiles += [
            Tile(i.id, job.id, prompt, req.get("model"), i.seed, i.width, i.height, job.created_at, tags)
            for i in status.images
            if i.released
        ]
    return tiles


@router.get("")
async def gallery(
    request: Request,
    q: str = Query("", max_length=200),
    model: str = Query("", max_length=200),
    since: str = Query("", max_length=10),
    until: str = Query("", max_length=10),
    tag: str = Query("", max_length=64),
) -> Response:
    who = await ui_principal(request)
    tiles = await run_in_threadpool(search, request, who, q, model, since, until, tag)
    svc = request.app.state.services
    models = await run_in_threadpool(model_access.offered_checkpoints, svc, tenant_policy(request))
    filters = {"q": q, "model": model, "since": since, "until": until, "tag": tag}
    return page(request, "gallery.html", tiles=tiles, models=models, filters=filters, scan=SCAN)


def _detail(request: Request, who: Principal, image_id: str) -> dict[str, Any]:
    svc = request.app.state.services
    image, job = visible_image(svc, who, image_id)
    if not image.released:
        raise HeldForReview(f"image {image_id} is held for review or was rejected", field="image_id")
    try:
        report: dict[str, Any] | None = verify(svc.blobs.get(image.blob_key))
        verify_error = None
    except (MissingExtra, UnreadableImage) as exc:
        report, verify_error = None, str(exc)
    return {"image": image, "job": job, "report": report, "verify_error": verify_error}


@router.get("/{image_id}")
async def detail(request: Request, image_id: str) -> Response:
    who = await ui_principal(request)
    context = await run_in_threadpool(_detail, request, who, image_id)
    return page(request, "image.html", **context)
