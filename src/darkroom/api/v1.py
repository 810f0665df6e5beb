"""Native API v1: jobs, their events, images and models."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Literal

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Header, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from darkroom import clock
from darkroom.auth import audit
from darkroom.auth.limits import check_quotas
from darkroom.auth.principal import Permission, Principal
from darkroom.auth.tenants import TenantPolicy
from darkroom.config import Limits
from darkroom.engines import routing, upscalers
from darkroom.engines.samplers import SAMPLERS, resolve_sampler
from darkroom.errors import Conflict, DarkroomError, HeldForReview, InvalidRequest, NotAcceptable, NotFound
from darkroom.jobs import result_cache
from darkroom.jobs.store import JobRecord, JobStatus, QueueFull, SubmitOptions, request_hash
from darkroom.models import access as model_access
from darkroom.models import defaults as model_defaults
from darkroom.models import templates
from darkroom.observability import metrics
from darkroom.observability.logging import bind as bind_log_context
from darkroom.safety.policy import check_prompt
from darkroom.schemas import (
    MAX_HIRES_SCALE,
    MAX_TAG_CHARS,
    PRIORITY_NAME,
    GenerationRequest,
    ImageView,
    JobError,
    JobEvent,
    JobProgress,
    JobState,
    JobView,
    ModelInfo,
    Priority,
    PublicModelInfo,
    UpscaleSpec,
    check_limits,
)
from darkroom.service import Services
from darkroom.storage.base import content_key

from . import waiting
from .auth import principal, require, sees_job, tenant_policy, visible_image, visible_job, websocket_principal
from .controlnet import prepare as prepare_controlnet
from .uploads import decode_base64_image, image_size, load_image, load_mask

TERMINAL_EVENTS = {"succeeded", "failed", "cancelled", "dead"}
LOOP_PROMPT_RULES = 16  # a tenant with more prompt rules than this has a submit's checks run in a request thread

router = APIRouter(prefix="/v1", tags=["v1"])
Generate = Depends(require(Permission.generate))


def services(request: Request) -> Services:
    return request.app.state.services


def public_url(request: Request, path: str) -> str:
    """`path` on the base URL clients use (`settings.public_url`, else the one this request came in on)."""
    base = services(request).settings.public_url or str(request.base_url)
    return f"{base.rstrip('/')}{path}"


def image_url(request: Request, image_id: str) -> str:
    return public_url(request, f"/v1/images/{image_id}")


def job_view(request: Request, job: JobRecord | JobStatus) -> JobView:
    """The public view of a job. Given a `JobStatus` (read with the job in one transaction) it reads nothing more;
    given a bare record it reads the status in one read transaction."""
    status = job if isinstance(job, JobStatus) else services(request).store.status_of(job)
    job = status.job
    images = [
        ImageView(
            id=i.id,
            index=i.index,
            seed=i.seed,
            width=i.width,
            height=i.height,
            sha256=i.sha256,
            url=image_url(request, i.id) if i.released else None,
            review_state=i.review_state,
        )
        for i in status.images
    ]
    return JobView(
        id=job.id,
        state=job.state,
        priority=PRIORITY_NAME[job.priority],
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        attempts=job.attempts,
        queue_position=status.queue_position,
        eta_seconds=status.eta_seconds,
        progress=JobProgress(step=job.progress_step, total=job.progress_total),
        request=job.request,
        images=images,
        provenance=job.result,
        cache_hit=bool((job.result or {}).get("cache_hit")),
        error=JobError(**job.error) if job.error else None,
        request_id=job.request_id,
    )


def check_idempotency_key(key: str | None) -> None:
    """A key is 1-200 printable characters: anything else is the client's mistake (4xx naming the header), never a
    500 from a database that refuses the bytes."""
    if key is None:
        return
    if not 1 <= len(key) <= 200 or not key.isprintable():
        raise InvalidRequest(
            "Idempotency-Key must be 1-200 printable characters (no control characters)", field="Idempotency-Key"
        )


async def submit_status(
    request: Request,
    body: GenerationRequest,
    idempotency_key: str | None,
    stored: dict[str, str] | None = None,
    with_status: bool = True,
) -> tuple[JobStatus, bool]:
    """`submit`, answering with the job's status (queue position, ETA) read in the same, single write transaction
    (`with_status`). The transaction is joined from the event loop (`JobStore.enqueue_async`), and the checks before
    it run on the loop too when they are quick (`checks_on_loop`), else in a worker thread. Measured on an API-only
    node, 16 clients on 2 cores: 254 submits/s at 3.9 ms of CPU each with the whole submit in a worker thread,
    343-390/s with the checks in one and the transaction joined from the loop, 434-468/s at 2.0-2.2 ms with both
    from the loop (docs/performance.md)."""
    svc = services(request)
    if checks_on_loop(svc, body, tenant_policy(request)):
        checked = _checked(request, body, idempotency_key, stored, with_status)
    else:
        checked = await run_in_threadpool(_checked, request, body, idempotency_key, stored, with_status)
    try:
        status, created = await svc.store.enqueue_async(checked.request, **checked.options)
    except QueueFull as full:  # the next submits like this one are refused at the edge for a moment (api.admission)
        request.app.state.queue_full.note(full.tenant, request.scope["path"], full.message, full.retry_after)
        raise
    if not created and not sees_job(checked.who, status.job):  # keys are scoped to the caller; no replay across
        raise Conflict("this Idempotency-Key belongs to another caller", field="Idempotency-Key")
    if created:
        metrics.job_submitted(request.scope["path"], checked.request.priority)
    bind_log_context(job_id=status.job.id)  # the request's access line names its job
    return status, created


def checks_on_loop(svc: Services, body: GenerationRequest, policy: TenantPolicy) -> bool:
    """Whether a submit's checks are quick enough for the event loop: CPU on what is in memory, a few stats. Anything
    that decodes an image (init, mask, control images, an upscale's source), reads a template, may hash a file the
    registry has not seen (a LoRA, an upscaler, a refiner, a rescan of the models folder), calls the prompt
    classifier or runs more than a few of the tenant's prompt rules takes a worker thread, so the loop never waits
    on it."""
    heavy = (
        body.init_image
        or body.mask_image
        or body.controlnet
        or body.upscale
        or body.hires
        or body.refiner
        or body.loras
    )
    templated = body.template or body.asset_type or body.variables
    screened = svc.settings.security.prompt_classifier or len(policy.prompt_rules) > LOOP_PROMPT_RULES
    return not (heavy or templated or screened) and svc.registry.fresh()


async def submit(
    request: Request, body: GenerationRequest, idempotency_key: str | None, stored: dict[str, str] | None = None
) -> tuple[JobRecord, bool]:
    """Everything between a validated body and a queued job: limits, prompt policy, model, seed, init image,
    quotas, idempotency, and the audit record (committed with the job).
    `stored`: fields the caller already checked and stored as blobs (`{"mask_image": "blob:…"}`), taken as given.
    Reads no queue position or ETA: a caller that waits for the job does not show them."""
    status, created = await submit_status(request, body, idempotency_key, stored, with_status=False)
    return status.job, created


@dataclass(frozen=True)
class _Checked:
    """A request that passed every check before the transaction, resolved (model, seed, sampler, pins), with what
    `JobStore.enqueue` needs to write it."""

    request: GenerationRequest
    who: Principal
    options: SubmitOptions


def _checked(
    request: Request,
    body: GenerationRequest,
    idempotency_key: str | None,
    stored: dict[str, str] | None,
    with_status: bool,
) -> _Checked:
    """Everything a submit does before its transaction; every refusal here is the client's (4xx naming a field)."""
    svc = services(request)
    who = principal(request)
    check_idempotency_key(idempotency_key)
    limits = svc.settings.limits
    if body.upscale is not None:  # an upscale job's size is its source's: read from the upload's header
        body = upscale_source_size(body, limits)
    policy = tenant_policy(request)
    body_hash = request_hash(body.model_dump(mode="json"))
    sent = set(body.model_fields_set)  # the fields the client gave; the model's defaults fill the rest
    if body.template or body.asset_type or body.variables:  # rendered first: every check below sees the result
        body, sent = templates.apply(templates.TemplateStore(svc.store.engine), who.tenant, body, sent)
    model = model_access.resolve_checkpoint(svc.registry, policy, body.model)  # unknown → 422, not allowed → 403
    body = model_defaults.apply(body, model, sent)
    check_limits(body, limits)
    check_prompt(svc.settings, policy, who.tenant, body.prompt, body.negative_prompt)
    updates: dict = {
        "model": model.id,
        "model_sha256": model.sha256,
        "sampler": resolve_sampler(body.sampler).name,
        "seed": body.seed if body.seed is not None else clock.random_seed(),
        # Which engines may run it: the stricter of the request's and the tenant's label (engines/routing.py).
        "data_label": routing.job_label(body.data_label, policy.data_label, svc.settings.routing.default_label),
        **(stored or {}),
    }
    if body.loras:  # unknown adapter → 422 naming it; the rest pinned to the file versions found
        updates["loras"] = svc.registry.pin_loras(body.loras)
    # Embeddings are matched from the prompt's words, never asked for by name: one the tenant may not use is left
    # out (its name stays a plain word) rather than refused, which would tell the tenant that it exists.
    embeddings = svc.registry.pin_embeddings(body.prompt, body.negative_prompt)  # for provenance
    updates["embeddings"] = model_access.visible(policy, "embedding", embeddings, lambda e: e.name)
    updates.update(upscalers.pin(svc.registry, body))  # unknown upscaler → 422 naming it; models pinned by sha256
    if body.webhook_url and not svc.settings.webhooks.secret:
        raise InvalidRequest("webhooks are not configured (DARKROOM_WEBHOOKS__SECRET)", field="webhook_url")
    uploads: list[bytes] = []  # decoded and checked now; stored only once the job is admitted (see `admit`)
    control, control_images = prepare_controlnet(svc.registry, body, model, limits)  # units and refiner: 422s first
    updates.update(control)
    uploads += control_images
    if body.init_image:
        raw = decode_base64_image(body.init_image, limits, "init_image")
        uploads.append(load_image(raw, limits, "init_image", size=(body.width, body.height)))
        updates["init_image"] = f"blob:{content_key(uploads[-1])[1]}"
    if body.mask_image and "mask_image" not in (stored or {}):
        if not body.init_image:
            raise InvalidRequest("mask_image needs init_image", field="mask_image")
        raw = decode_base64_image(body.mask_image, limits, "mask_image")
        uploads.append(load_mask(raw, limits, "mask_image", (body.width, body.height)))
        updates["mask_image"] = f"blob:{content_key(uploads[-1])[1]}"
    resolved = body.model_copy(update=updates)
    model_access.check_request(policy, resolved)  # any model, adapter or upscaler the tenant may not use → 403
    versions = _versions_used(svc, model, resolved)
    approvals = svc.approvals
    seeded = policy.result_cache and body.seed is not None  # a random seed asks for a new picture: never cached
    cache_key = result_cache.cache_key(who.tenant, resolved) if seeded else None

    def admit(conn: sa.Connection, images_today: int) -> None:
        """Model versions (approved and enabled, else refused at once), quotas, then the uploads: a refused request
        stores nothing. The bytes are written inside the submit transaction so no worker can claim the job before
        its source exists (a few KB to a few MB: on SQLite this holds the write lock for the time of one file
        write, and only for img2img and inpainting)."""
        approvals.check_in(conn, versions)
        check_quotas(conn, who.tenant, policy, resolved.n, images_today)
        for data in uploads:
            svc.blobs.put(data, "image/png")

    options = SubmitOptions(
        tenant=who.tenant,
        key_id=who.key_id,
        idempotency_key=idempotency_key,
        request_id=request.state.request_id,
        body_hash=body_hash,
        max_attempts=svc.settings.max_attempts,
        admit=admit,
        record=lambda conn, job_id: audit.record(conn, who, "job.submit", job_id, _audit_details(resolved)),
        cache_key=cache_key,
        with_status=with_status,
    )
    return _Checked(resolved, who, options)


def _versions_used(svc: Services, model: ModelInfo, request: GenerationRequest) -> list[tuple[str, str, str, str]]:
    """(kind, name, sha256, path) of the checkpoint and adapters a resolved request runs on: what the approvals
    check. Adapter infos come from the registry's cache (the pins above just read them)."""
    used = [("checkpoint", model.id, model.sha256, model.path)]
    for lora in request.loras:
        info = svc.registry.lora(lora.name)
        used.append(("lora", info.name, info.sha256, info.path))
    for embedding in request.embeddings or []:
        info = svc.registry.embedding(embedding.name)
        used.append(("embedding", info.name, info.sha256, info.path))
    for unit in request.controlnet:
        control = svc.registry.controlnet(unit.model)
        used.append(("controlnet", control.name, control.sha256, control.path))
    if request.refiner is not None:
        refiner = svc.registry.get(request.refiner.model)
        used.append(("checkpoint", refiner.id, refiner.sha256, refiner.path))
    for spec in (request.hires, request.upscale):  # model upscalers only: built-in ones carry no sha256
        if spec is not None and spec.sha256:
            path = svc.registry.upscaler_files()[spec.upscaler]
            used.append(("upscaler", spec.upscaler, spec.sha256, str(path.resolve())))
    return used


def upscale_source_size(body: GenerationRequest, limits: Limits) -> GenerationRequest:
    """The request with the source image's width and height (an upscale job keeps the source's size)."""
    if not body.init_image:
        raise InvalidRequest("an upscale job needs the image", field="init_image")
    raw = decode_base64_image(body.init_image, limits, "init_image")
    width, height = image_size(raw, limits, "init_image")
    return body.model_copy(update={"width": width, "height": height})


def _audit_details(body: GenerationRequest) -> dict:
    """What the audit log keeps of a request: its shape, never the prompt (prompts expire; the log does not)."""
    return {
        "model": body.model,
        "n": body.n,
        "size": f"{body.width}x{body.height}",
        "steps": body.steps,
        "priority": body.priority,
        "mode": body.mode,  # txt2img | img2img | inpaint | upscale
        "prompt_chars": len(body.prompt),
    }


@router.post(
    "/jobs",
    status_code=202,
    response_model=JobView,
    summary="Queue a generation job",
    responses={200: {"model": JobView, "description": "A replay of an Idempotency-Key: the job it queued"}},
)
async def create_job(
    request: Request,
    body: GenerationRequest,
    idempotency_key: str | None = Header(None, alias="Idempotency-Key", description="1-200 printable characters"),
    who: Principal = Generate,
) -> Response:
    status, created = await submit_status(request, body, idempotency_key)
    return Response(  # pydantic writes the JSON itself: a third of the CPU of model_dump and then json.dumps
        job_view(request, status).model_dump_json(),
        status_code=202 if created else 200,
        headers={"Location": f"/v1/jobs/{status.job.id}"},
        media_type="application/json",
    )


@router.post(
    "/generate",
    response_model=JobView,
    summary="Queue a job and wait for it to finish",
    responses={
        200: {"content": {"image/png": {}}, "description": "The job; with `Accept: image/png`, its picture"},
        202: {"model": JobView, "description": "Not finished within the wait: the job goes on; poll it"},
    },
)
async def generate(
    request: Request,
    body: GenerationRequest,
    idempotency_key: str | None = Header(None, alias="Idempotency-Key", max_length=200),
    timeout: float | None = Query(None, gt=0, description="seconds to wait; default from settings"),
    who: Principal = Generate,
) -> Response:
    return await submit_and_wait(request, body, idempotency_key, timeout)


async def submit_and_wait(
    request: Request, body: GenerationRequest, idempotency_key: str | None, timeout: float | None
) -> Response:
    """Queue the job and wait for it, woken by the change feed (not a poll), at most `sync_timeout_seconds`. Not
    finished in time: the job goes on, and the answer is a 202 like POST /v1/jobs, so the client can poll.

    With `Accept: image/png` (and n = 1) a succeeded job answers with the picture itself, its job and seed in headers:
    the client wanted the image, and fetching it was a second round trip. Anything else (not finished in time, failed,
    held for review) answers with the job as JSON, as without the header."""
    svc = services(request)
    png = wants_png(request)
    if png and body.n != 1:
        raise NotAcceptable("Accept: image/png answers with one image: ask for n = 1, or accept JSON", field="Accept")
    job, _ = await submit(request, body, idempotency_key)
    limit = min(timeout or svc.settings.sync_timeout_seconds, svc.settings.sync_timeout_seconds)
    picture: Response | None = None

    def read(job_id: str) -> JobStatus:  # the picture comes with the job's last read, in the same request thread
        nonlocal picture
        status = svc.store.outcome(job_id)
        if png and status.job.state is JobState.succeeded:
            picture = png_response(svc, status)
        return status

    status = await waiting.wait_for_job(svc, job, limit, request, read)
    job = status.job
    if png and job.state is JobState.succeeded and picture is not None:
        return picture
    # A job still queued or running shows its position and ETA, which the wait does not read.
    view = await run_in_threadpool(job_view, request, status if job.state.terminal else job)
    return JSONResponse(view.model_dump(mode="json"), status_code=200 if job.state.terminal else 202)


def wants_png(request: Request) -> bool:
    """The caller's Accept names image/png before any JSON type (`*/*` and no header mean JSON, as before)."""
    kinds = [part.split(";")[0].strip().lower() for part in request.headers.get("accept", "").split(",")]
    return "image/png" in kinds and all(k not in ("application/json", "*/*") for k in kinds[: kinds.index("image/png")])


def png_response(svc: Services, status: JobStatus) -> Response | None:
    """The job's one released image as the response body (one blob read), or None."""
    job, images = status.job, status.images
    if len(images) != 1 or not images[0].released:
        return None
    image = images[0]
    headers = {"X-Job-ID": job.id, "X-Image-ID": image.id, "X-Seed": str(image.seed), "Location": f"/v1/jobs/{job.id}"}
    return Response(svc.blobs.get(image.blob_key), media_type=image.content_type, headers=headers)


@router.get("/jobs", response_model=list[JobView], summary="Recent jobs")
def list_jobs(
    request: Request,
    state: JobState | None = None,
    limit: int = Query(50, ge=1, le=500),
    tag: Annotated[str | None, Query(min_length=1, max_length=MAX_TAG_CHARS, description="jobs with this tag")] = None,
    who: Principal = Generate,
) -> list[JobView]:
    """The caller's tenant's jobs; a `user` key sees the jobs it submitted."""
    own = None if who.can(Permission.read_tenant_jobs) else (who.key_id or "")
    wanted = tag.strip().lower() if tag else None  # as tags are stored
    listed = services(request).store.list_status(state=state, limit=limit, tenant=who.tenant, key_id=own, tag=wanted)
    return [job_view(request, status) for status in listed]


class QueueEntry(BaseModel):
    """One job of the whole queue as an operator sees it: where it stands, for which tenant. Its id and prompt only
    when the caller may read the job (its own tenant's, as `GET /v1/jobs`; admins: every tenant's)."""

    id: str | None
    tenant: str
    state: JobState
    priority: Priority
    queue_position: int | None
    eta_seconds: float | None
    model: str | None
    created_at: dt.datetime
    progress: JobProgress
    prompt: str | None = None


@router.get("/queue", response_model=list[QueueEntry], summary="Every tenant's running and queued jobs (operator)")
def whole_queue(
    request: Request, limit: int = Query(200, ge=1, le=1000), who: Principal = Depends(require(Permission.queue))
) -> list[QueueEntry]:
    """Running jobs first, then the queue in claim order (highest priority first, then oldest): what workers take
    next, across tenants."""
    entries = []
    for status in services(request).store.queue_status(limit):
        job = status.job
        readable = who.can(Permission.admin) or sees_job(who, job)
        entries.append(
            QueueEntry(
                id=job.id if readable else None,
                tenant=job.tenant,
                state=job.state,
                priority=PRIORITY_NAME[job.priority],
                queue_position=status.queue_position,
                eta_seconds=status.eta_seconds,
                model=job.request.get("model"),
                created_at=job.created_at,
                progress=JobProgress(step=job.progress_step, total=job.progress_total),
                prompt=str(job.request.get("prompt", "")) if readable else None,
            )
        )
    return entries


@router.get("/jobs/{job_id}", response_model=JobView, summary="A job: state, queue position, progress, images")
async def get_job(request: Request, job_id: str, who: Principal = Generate) -> JobView:
    """One read transaction: the job, its images, queue position and ETA (`JobStore.status`), in a request thread;
    the rest on the loop. A coroutine, because FastAPI runs a plain function's answer through the thread pool a second
    time to validate it (two hops a poll, and polls are what waiting clients send most)."""
    status = await run_in_threadpool(services(request).store.status, job_id)
    if status is None or not sees_job(who, status.job):
        raise NotFound(f"no job {job_id!r}", field="job_id")  # the same 404 either way: ids never leak
    return job_view(request, status)


@router.delete("/jobs/{job_id}", response_model=JobView, summary="Cancel: queued at once, running at the next step")
def cancel_job(request: Request, job_id: str, who: Principal = Generate) -> JobView:
    svc = services(request)
    visible_job(svc, who, job_id)
    job = svc.store.cancel(job_id, record=lambda conn, state: audit.record(conn, who, "job.cancel", job_id, state))
    return job_view(request, job)


@router.get("/jobs/{job_id}/events", summary="Server-Sent Events: queued, started, progress, succeeded/failed")
async def job_events(request: Request, job_id: str, who: Principal = Generate) -> StreamingResponse:
    await run_in_threadpool(visible_job, services(request), who, job_id)
    after = event_cursor(request.headers.get("Last-Event-ID"))
    return StreamingResponse(
        _event_stream(request, job_id, after),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def event_cursor(value: str | None) -> int:
    """A client's last-seen event id (`Last-Event-ID`, `?after=`); anything that is not one starts from the top."""
    value = (value or "").strip()
    return int(value) if value.isdigit() and len(value) <= 18 else 0


def _job_events(svc: Services, job_id: str, after: int) -> AsyncGenerator[JobEvent | None, None]:
    """A job's events from `after` until its terminal event; None every tick while nothing happens. Stored events
    first, then as the change feed delivers them (`api.waiting`): no polling per stream."""
    return waiting.job_events(svc, job_id, after)


def _payload(event: JobEvent) -> dict:
    return {"job_id": event.job_id, "type": event.type, **event.data, "at": event.created_at.isoformat()}


async def _event_stream(request: Request, job_id: str, after: int) -> AsyncIterator[str]:
    idle_since = time.monotonic()
    async with contextlib.aclosing(_job_events(services(request), job_id, after)) as events:
        async for event in events:
            if await request.is_disconnected():
                return
            if event is not None:
                idle_since = time.monotonic()
                yield f"id: {event.id}\nevent: {event.type}\ndata: {json.dumps(_payload(event))}\n\n"
            elif time.monotonic() - idle_since > 15:
                idle_since = time.monotonic()
                yield ": keep-alive\n\n"


@router.websocket("/jobs/{job_id}/ws")
async def job_websocket(websocket: WebSocket, job_id: str) -> None:
    """The same events as the SSE stream, as JSON messages; closes after the terminal event."""
    svc: Services = websocket.app.state.services
    who = await websocket_principal(websocket, Permission.generate)
    if who is None:
        return
    try:
        await run_in_threadpool(visible_job, svc, who, job_id)
    except DarkroomError:
        await websocket.close(code=4404, reason="no such job")
        return
    await websocket.accept()
    try:
        after = event_cursor(websocket.query_params.get("after"))
        async with contextlib.aclosing(_job_events(svc, job_id, after)) as events:
            async for event in events:
                if event is not None:
                    await websocket.send_json({"id": event.id, **_payload(event)})
        await websocket.close()
    except WebSocketDisconnect:
        return


@router.get(
    "/images/{image_id}", summary="An image (PNG with provenance)", responses={200: {"content": {"image/png": {}}}}
)
def get_image(request: Request, image_id: str, who: Principal = Generate) -> Response:
    svc = services(request)
    image, _ = visible_image(svc, who, image_id)
    if not image.released:
        state = "rejected in review" if image.review_state == "rejected" else "held for review"
        raise HeldForReview(f"image {image_id} is {state}", field="image_id")
    return Response(
        svc.blobs.get(image.blob_key),
        media_type=image.content_type,
        headers={"Cache-Control": "private, max-age=31536000, immutable", "ETag": f'"{image.sha256}"'},
    )


class ListedModel(PublicModelInfo):
    """A model in `GET /v1/models`: darkroom's fields and OpenAI's (`object`, `created`, `owned_by`)."""

    object: Literal["model"] = "model"
    created: int = Field(description="unix time the model's files were last changed")
    owned_by: str = "darkroom"


class ModelList(BaseModel):
    """OpenAI's list envelope, so the official `openai` package's `models.list()` reads it; darkroom's own clients
    read the same `data` (the SDK's `models()` returns it)."""

    object: Literal["list"] = "list"
    data: list[ListedModel]


@router.get("/models", response_model=ModelList, summary="Approved models (OpenAI's list shape)")
def list_models(request: Request, who: Principal = Generate) -> ModelList:
    """The checkpoints this tenant may use (`models.access`) whose file is approved, with their default parameters."""
    models = model_access.offered_checkpoints(services(request), tenant_policy(request))
    return ModelList(data=[ListedModel(**m.model_dump(), created=_changed_at(m.path)) for m in models])


def _changed_at(path: str) -> int:
    try:
        return int(os.stat(path).st_mtime)
    except OSError:
        return 0


@router.get("/samplers", summary="Sampler names (AUTOMATIC1111's) and the diffusers scheduler each maps to")
def list_samplers(who: Principal = Generate) -> list[dict]:
    return [spec.public() for spec in SAMPLERS]


# --- upscale jobs ----------------------------------------------------------------------------------------------------

UPSCALE_PROMPT = "(upscale)"  # an upscale job has no prompt; GenerationRequest needs one, and the audit counts it


class UpscaleBody(BaseModel):
    """`POST /v1/upscale`: one image, upscaled by `scale` (default 2) or to `width` x `height`, as a queued job."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(min_length=1, description="base64 image (PNG, JPEG or WebP)")
    upscaler: str = Field("Lanczos", min_length=1, max_length=200, description="a name from /sdapi/v1/upscalers")
    scale: float | None = Field(None, gt=0.0, le=MAX_HIRES_SCALE, description="factor (default 2 without width/height)")
    width: int | None = Field(None, ge=1)
    height: int | None = Field(None, ge=1)
    crop: bool = Field(True, description="with width and height: crop to fit (true) or stretch (false)")
    priority: Priority = "normal"
    webhook_url: str | None = None
    timeout_seconds: float | None = Field(None, gt=0)

    def generation_request(self) -> GenerationRequest:
        scale = self.scale
        if scale is None and (self.width is None or self.height is None):
            if self.width is not None or self.height is not None:
                raise InvalidRequest("give both width and height, or scale", field="width" if self.height else "height")
            scale = 2.0
        extra = {k: getattr(self, k) for k in ("priority", "webhook_url", "timeout_seconds")}
        try:
            spec = UpscaleSpec(
                upscaler=self.upscaler, scale=scale, width=self.width, height=self.height, crop=self.crop
            )
            return GenerationRequest(prompt=UPSCALE_PROMPT, init_image=self.image, upscale=spec, **extra)
        except ValidationError as exc:  # e.g. a webhook URL the guard refuses: the client's field, never a 500
            first = exc.errors()[0]
            field = str(first["loc"][0]) if first["loc"] else None
            raise InvalidRequest(f"{field}: {first['msg']}", field=field) from None


@router.post(
    "/upscale",
    response_model=JobView,
    summary="Upscale an image as a job (Lanczos, Nearest, ESRGAN-family models) and wait for it",
    responses={202: {"model": JobView, "description": "Not finished within the wait: the job goes on; poll it"}},
)
async def upscale(
    request: Request,
    body: UpscaleBody,
    idempotency_key: str | None = Header(None, alias="Idempotency-Key", max_length=200),
    timeout: float | None = Query(None, gt=0, description="seconds to wait; default from settings"),
    who: Principal = Generate,
) -> Response:
    """Runs on the job queue like a generation (priority, quotas, audit, provenance), without a diffusion pass."""
    return await submit_and_wait(request, body.generation_request(), idempotency_key, timeout)
