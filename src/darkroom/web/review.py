"""Review (operators and admins): the held images of the caller's scope, each with its prompt, and approve / reject
with a reason. Listing, reading and deciding go through the review API's own functions (`api.review`), so scope,
the audit of reads and the audited, guarded decision are the API's."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response

from darkroom.api import review as api_review
from darkroom.auth.principal import Permission
from darkroom.errors import InvalidRequest

from .render import page
from .session_auth import check_csrf, ui_principal

router = APIRouter(prefix="/ui/review", include_in_schema=False)
STATES = ("pending", "approved", "rejected", "any")


@router.get("")
async def queue(request: Request, state: str = "pending") -> Response:
    who = await ui_principal(request, Permission.review)
    if state not in STATES:
        raise InvalidRequest(f"state must be one of {', '.join(STATES)}", field="state")
    listing = await run_in_threadpool(api_review.list_review, request, state, None, 100, None, who)  # type: ignore[arg-type]
    return page(request, "review.html", items=listing.items, state=state, states=STATES)


@router.get("/images/{image_id}")
async def image(request: Request, image_id: str) -> Response:
    who = await ui_principal(request, Permission.review)
    return await run_in_threadpool(api_review.review_image, request, image_id, who)


@router.post("/images/{image_id}")
async def decide(request: Request, image_id: str) -> Response:
    who = await ui_principal(request, Permission.review)
    form = await request.form()
    check_csrf(request, str(form.get("csrf_token") or ""))
    decision = str(form.get("decision") or "")
    if decision not in ("approve", "reject"):
        raise InvalidRequest("decision must be approve or reject", field="decision")
    note = str(form.get("note") or "").strip() or None
    if decision == "reject" and note is None:
        raise InvalidRequest("say why the image is rejected", field="note")
    body = api_review.ReviewDecision(decision=decision, note=note)
    await run_in_threadpool(api_review.decide, request, image_id, body, who)
    return RedirectResponse("/ui/review", status_code=303)
