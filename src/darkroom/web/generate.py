"""Generate, and follow a job: the form, the job page (live progress and previews over SSE), its results, cancel,
and the image bytes. Each route calls the native API's own functions (`api.v1`) with the session's principal, so
limits, prompt policy, quotas, tenant scoping and the audit log are the API's, not a copy."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response, StreamingResponse

from darkroom.api import v1
from darkroom.api.auth import tenant_policy, visible_job
from darkroom.engines.samplers import SAMPLERS
from darkroom.errors import DarkroomError
from darkroom.models import access as model_access
from darkroom.schemas import JobView
from darkroom.service import Services

from . import form as forms
from .render import page
from .session_auth import check_csrf, ui_principal

router = APIRouter(prefix="/ui", include_in_schema=False)


def _services(request: Request) -> Services:
    return request.app.state.services


def _form_page(request: Request, values: dict, error: DarkroomError | None = None) -> Response:
    svc = _services(request)
    return page(
        request,
        "generate.html",
        status=error.status if error else 200,
        values=values,
        models=model_access.offered_checkpoints(svc, tenant_policy(request)),  # as GET /v1/models
        samplers=[spec.name for spec in SAMPLERS],
        limits=svc.settings.limits,
        error=error,
    )


@router.get("/generate")
async def generate_form(request: Request, reuse: str | None = Query(None, alias="from", max_length=64)) -> Response:
    who = await ui_principal(request)
    values = dict(forms.DEFAULTS)
    if reuse:
        job = await run_in_threadpool(visible_job, _services(request), who, reuse)
        values = forms.values_from_request(job.request)
    return await run_in_threadpool(_form_page, request, values)


@router.post("/generate")
async def generate(request: Request) -> Response:
    await ui_principal(request)
    async with request.form() as form:  # its spooled upload files are closed on the way out
        check_csrf(request, str(form.get("csrf_token") or ""))
        try:
            body = await forms.request_from_form(form)
            status, _ = await v1.submit_status(request, body, None)
        except DarkroomError as exc:
            return await run_in_threadpool(_form_page, request, forms.values_from_form(form), exc)
    return RedirectResponse(f"/ui/jobs/{status.job.id}", status_code=303)


def ui_image_url(image_id: str, released: bool) -> str | None:
    return f"/ui/images/{image_id}" if released else None


async def job_page_view(request: Request, job_id: str) -> JobView:
    """The API's view of the job (`GET /v1/jobs/{id}`, same 404 for another tenant's), with UI image links."""
    view = await v1.get_job(request, job_id, request.state.principal)
    for image in view.images:
        image.url = ui_image_url(image.id, image.url is not None)
    return view


@router.get("/jobs/{job_id}")
async def job_page(request: Request, job_id: str) -> Response:
    await ui_principal(request)
    view = await job_page_view(request, job_id)
    return page(request, "job.html", job=view)


@router.get("/jobs/{job_id}/result")
async def job_result(request: Request, job_id: str) -> Response:
    """The job's state and results as a fragment: htmx swaps it in when the event stream says the job ended."""
    await ui_principal(request)
    view = await job_page_view(request, job_id)
    return page(request, "job_result.html", job=view)


@router.get("/jobs/{job_id}/events")
async def job_events(request: Request, job_id: str) -> StreamingResponse:
    """The API's SSE stream of the job's events (progress with previews), for the browser's EventSource."""
    who = await ui_principal(request)
    await run_in_threadpool(visible_job, _services(request), who, job_id)
    after = v1.event_cursor(request.headers.get("Last-Event-ID"))
    return StreamingResponse(
        v1._event_stream(request, job_id, after),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.post("/jobs/{job_id}/cancel")
async def cancel(request: Request, job_id: str) -> Response:
    who = await ui_principal(request)
    form = await request.form()
    check_csrf(request, str(form.get("csrf_token") or ""))
    await run_in_threadpool(v1.cancel_job, request, job_id, who)
    back = str(form.get("back") or "")
    target = back if back.startswith("/ui/") and "//" not in back else f"/ui/jobs/{job_id}"
    if request.headers.get("hx-request"):
        return Response(status_code=204, headers={"HX-Redirect": target})
    return RedirectResponse(target, status_code=303)


@router.get("/images/{image_id}")
async def image(request: Request, image_id: str, download: bool = False) -> Response:
    """The PNG, as `GET /v1/images/{id}` answers it (held or rejected images are refused the same way)."""
    who = await ui_principal(request)
    response = await run_in_threadpool(v1.get_image, request, image_id, who)
    if download:
        response.headers["Content-Disposition"] = f'attachment; filename="darkroom-{image_id}.png"'
    return response
