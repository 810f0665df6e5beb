"""What the drop-in APIs (A1111, OpenAI) share: the chosen default model, waiting for a job, reading its images.

Both answer synchronously like the services they imitate, but underneath every request is an ordinary job in the same
store and queue as native ones (`v1.submit`), so priorities, batching, retries and webhooks apply to them too.
"""

from __future__ import annotations

import base64

from fastapi import Request
from pydantic import ValidationError

from darkroom.errors import DarkroomError, HeldForReview, InvalidRequest, JobTimeout
from darkroom.jobs.store import ImageRecord, JobRecord, JobStatus
from darkroom.kv import DEFAULT_MODEL, SettingsKV
from darkroom.schemas import GenerationRequest, JobState, ModelInfo
from darkroom.service import Services

from .auth import principal, visible_job
from .v1 import services, submit
from .waiting import wait_for_job


def kv(svc: Services) -> SettingsKV:
    return SettingsKV(svc.store.engine)


def default_model(svc: Services) -> ModelInfo:
    """The model chosen with A1111's `POST /sdapi/v1/options` if it still exists, else the registry's default."""
    chosen = kv(svc).get(DEFAULT_MODEL)
    if chosen:
        for info in svc.registry.scan():
            if info.id == chosen:
                return info
    return svc.registry.default()


def a1111_title(info: ModelInfo) -> str:
    """A1111 names a checkpoint `file [short hash]`; clients echo that title back in `sd_model_checkpoint`."""
    return f"{info.id} [{info.sha256[:10]}]"


def find_model(svc: Services, name: str, field: str) -> ModelInfo:
    """A model by any name A1111 or OpenAI clients use: id, title, file name, or (short) sha256."""
    wanted = name.strip()
    stem = wanted.split(" [")[0].removesuffix(".safetensors").removesuffix(".ckpt")
    for info in svc.registry.scan():
        names = {info.id, info.name, a1111_title(info)}
        if wanted in names or stem in names or (len(wanted) >= 8 and info.sha256.startswith(wanted.lower())):
            return info
    known = ", ".join(a1111_title(m) for m in svc.registry.scan()) or "none"
    raise InvalidRequest(f"unknown model {name!r} (available: {known})", field=field)


def generation_request(fields: dict, names: dict[str, str]) -> GenerationRequest:
    """Build the internal request; a validation error names the field as the *client's* API calls it."""
    try:
        return GenerationRequest(**fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        ours = str(first["loc"][0]) if first["loc"] else None
        field = names.get(ours or "", ours)
        raise InvalidRequest(f"{field}: {first['msg']}", field=field) from None


def renamed(exc: DarkroomError, names: dict[str, str]) -> DarkroomError:
    """The same error, naming the client's field instead of the internal one."""
    if exc.field in names:
        exc.field = names[exc.field]
    return exc


async def submit_and_wait(
    request: Request, body: GenerationRequest, stored: dict[str, str], names: dict[str, str]
) -> JobStatus:
    """Queue through `v1.submit` (errors name the client's fields) and wait for the job: the compat APIs are sync.
    The job comes with its images (`wait_for`)."""
    key = request.headers.get("Idempotency-Key")
    try:
        job, _ = await submit(request, body, key, stored)
    except DarkroomError as exc:
        raise renamed(exc, names) from None
    return await wait_for(request, job)


async def wait_for(request: Request, job: JobRecord) -> JobStatus:
    """Wait for a job like `POST /v1/generate` does: the job with its images once it ended. Past the sync timeout the
    job goes on and the caller gets a 504 naming it; a client that hangs up stops the waiting, not the job."""
    svc = services(request)
    limit = svc.settings.sync_timeout_seconds
    status = await wait_for_job(svc, job, limit, request)  # woken by the change feed, not a poll
    if status.job.state.terminal or await request.is_disconnected():
        return status
    raise JobTimeout(f"job {job.id} did not finish within {limit:g} s; it goes on: GET /v1/jobs/{job.id}")


def job_images(svc: Services, status: JobStatus) -> list[tuple[ImageRecord, bytes]]:
    """The job's released images (read with it by the wait). Held ones are left out; when every image is held the call
    fails with 403 `held_for_review`, naming the job so the client can poll `GET /v1/jobs/{id}` until an operator
    decides."""
    job, images = status.job, status.images
    if job.state is not JobState.succeeded:
        return []
    released = [image for image in images if image.released]
    if images and not released:
        raise HeldForReview(f"the images of job {job.id} are held for review; GET /v1/jobs/{job.id} shows when")
    return [(image, svc.blobs.get(image.blob_key)) for image in released]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def tenant_job(request: Request, job_id: str) -> JobRecord:
    return visible_job(services(request), principal(request), job_id)


def raise_for_job(job: JobRecord, names: dict[str, str]) -> None:
    """A job that did not succeed becomes the error it ended with (its own status: 422 for bad input, else 500)."""
    if job.state in (JobState.succeeded, JobState.cancelled):
        return
    error = job.error or {"code": "internal_error", "message": f"job {job.id} ended {job.state.value}"}
    field = names.get(error.get("field") or "", error.get("field"))
    exc = DarkroomError(f"job {job.id} {job.state.value}: {error.get('message')}", field=field)
    exc.code = error.get("code") or "internal_error"
    exc.status = InvalidRequest.status if exc.code == InvalidRequest.code else 500
    raise exc
