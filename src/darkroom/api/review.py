"""Review of held outputs (operators and admins): list the queue, look at an image, approve or reject it.

Held images are never served by `GET /v1/images/{id}`; here an operator fetches the bytes of any image in its scope,
pending and rejected ones included, so it can look before deciding. Scope, and the audit of an admin's reads of other
tenants' images: see `darkroom.safety.review`.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from darkroom.auth.principal import Permission, Principal
from darkroom.errors import NotFound
from darkroom.safety.review import Decision, ReviewItem, ReviewStore, review_scope
from darkroom.service import Services

from .auth import require
from .v1 import public_url

router = APIRouter(prefix="/v1/review", tags=["review"])
Reviewer = Depends(require(Permission.review))
StateFilter = Literal["pending", "approved", "rejected", "any"]


class ReviewView(BaseModel):
    image_id: str
    job_id: str
    tenant: str
    index: int
    seed: int
    width: int
    height: int
    sha256: str
    created_at: dt.datetime
    review_state: Literal["none", "pending", "approved", "rejected"]
    review_reason: str | None = Field(description="why it was held: the checker's reason, or `require_review`")
    reviewed_by: str | None = Field(description="the actor (key id) that decided")
    reviewed_at: dt.datetime | None
    prompt: str | None = Field(description="null once the tenant's retention redacted it")
    negative_prompt: str | None
    model: str | None
    url: str = Field(description="the PNG, for reviewers (GET /v1/review/images/{image_id})")


class ReviewPage(BaseModel):
    items: list[ReviewView]
    next_after: str | None = Field(description="pass as `after` for the next page; null on the last page")


class ReviewDecision(BaseModel):
    model_config = {"extra": "forbid"}

    decision: Decision
    note: str | None = Field(None, max_length=2000, description="kept in the audit log")


def _store(request: Request) -> tuple[ReviewStore, Services]:
    svc: Services = request.app.state.services
    return ReviewStore(svc.store.engine), svc


def _view(request: Request, item: ReviewItem) -> ReviewView:
    image, req = item.image, item.request
    return ReviewView(
        image_id=image.id,
        **{k: getattr(image, k) for k in ("job_id", "tenant", "index", "seed", "width", "height", "sha256")},
        **{k: getattr(image, k) for k in ("created_at", "review_state", "review_reason", "reviewed_by", "reviewed_at")},
        prompt=None if item.prompt_redacted else req.get("prompt"),
        negative_prompt=None if item.prompt_redacted else req.get("negative_prompt"),
        model=req.get("model"),
        url=public_url(request, f"/v1/review/images/{image.id}"),
    )


@router.get("", response_model=ReviewPage, summary="Held images: the review queue, oldest first")
def list_review(
    request: Request,
    state: StateFilter = Query("pending", description="`any`: every image ever held, decided or not"),
    tenant: str | None = Query(None, description="admins: one tenant; operators always see only their own"),
    limit: int = Query(50, ge=1, le=500),
    after: str | None = Query(None, description="the `next_after` of the previous page"),
    who: Principal = Reviewer,
) -> ReviewPage:
    store, _ = _store(request)
    scope = review_scope(who, tenant)
    items = store.queue(None if state == "any" else state, tenant=scope, limit=limit, after=after)
    store.record_reads(who, items, "list")
    views = [_view(request, item) for item in items]
    return ReviewPage(items=views, next_after=views[-1].image_id if len(views) == limit else None)


@router.get(
    "/images/{image_id}",
    summary="An image's PNG, whatever its review state",
    responses={200: {"content": {"image/png": {}}}},
)
def review_image(request: Request, image_id: str, who: Principal = Reviewer) -> Response:
    store, svc = _store(request)
    item = store.get(who, image_id)
    image = item.image
    if image.deleted_at is not None:
        raise NotFound(f"image {image_id!r} was deleted by retention", field="image_id")
    store.record_reads(who, [item], "image")
    # Not cached by the browser: the decision changes who may see it.
    return Response(svc.blobs.get(image.blob_key), media_type=image.content_type, headers={"Cache-Control": "no-store"})


@router.post("/images/{image_id}", response_model=ReviewView, summary="Approve (release) or reject a held image")
def decide(request: Request, image_id: str, body: ReviewDecision, who: Principal = Reviewer) -> ReviewView:
    store, _ = _store(request)
    store.decide(who, image_id, body.decision, body.note)
    return _view(request, store.get(who, image_id))
