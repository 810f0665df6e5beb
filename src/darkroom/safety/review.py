"""The review queue: images held by the output checker or the tenant's `require_review`, and the operator's decision.

A decision and its audit record commit in one transaction, and the move is guarded by `review_state = 'pending'`, so
two operators deciding at once cannot both win: the second gets a 409.

Scope: admins review every tenant; operators only their own tenant's images (another tenant's image is a 404, as
everywhere else, so ids never leak across tenants). An admin's look at another tenant's held images and prompts is
the one place where images cross tenants, so each such read is audited (`review.read`, recorded under the tenant whose
images were read, with the image ids and never the prompt): the tenant can see who looked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import sqlalchemy as sa

from darkroom import clock
from darkroom.auth import audit
from darkroom.auth.principal import Permission, Principal
from darkroom.errors import Conflict, Forbidden, NotFound
from darkroom.jobs.db import read_tx, write_tx
from darkroom.jobs.store import ImageRecord, image_record
from darkroom.jobs.tables import images, jobs

ReviewState = Literal["pending", "approved", "rejected"]
Decision = Literal["approve", "reject"]
DECIDED: dict[str, ReviewState] = {"approve": "approved", "reject": "rejected"}


@dataclass(frozen=True)
class ReviewItem:
    """A held image with what an operator needs to judge it: the request it answered."""

    image: ImageRecord
    request: dict[str, Any]
    prompt_redacted: bool


def review_scope(who: Principal, tenant: str | None) -> str | None:
    """The tenant a caller's review listing covers: any (or the one asked for) for admins, their own for operators."""
    if who.can(Permission.admin):
        return tenant
    if tenant is not None and tenant != who.tenant:
        raise Forbidden(f"role {who.role.value!r} reviews only its own tenant's images", field="tenant")
    return who.tenant


class ReviewStore:
    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def queue(
        self,
        state: ReviewState | None = "pending",
        tenant: str | None = None,
        limit: int = 50,
        after: str | None = None,
    ) -> list[ReviewItem]:
        """Held images, oldest first (ids sort by creation); `after` is the last image id of the previous page.
        `state=None`: every image that was ever held, decided or not."""
        query = (
            sa.select(images, jobs.c.request, jobs.c.prompt_redacted_at)
            .join(jobs, jobs.c.id == images.c.job_id)
            .where(images.c.review_state == state if state else images.c.review_state != "none")
            .order_by(images.c.id)
            .limit(limit)
        )
        if tenant is not None:
            query = query.where(images.c.tenant == tenant)
        if after is not None:
            query = query.where(images.c.id > after)
        with read_tx(self.engine) as conn:
            rows = conn.execute(query).all()
        return [self._item(row._mapping) for row in rows]

    def get(self, who: Principal, image_id: str) -> ReviewItem:
        """One image in the caller's review scope, held or not (an operator may look at any of its tenant's)."""
        query = (
            sa.select(images, jobs.c.request, jobs.c.prompt_redacted_at)
            .join(jobs, jobs.c.id == images.c.job_id)
            .where(images.c.id == image_id)
        )
        with read_tx(self.engine) as conn:
            row = conn.execute(query).first()
        if row is None or not self._in_scope(who, row.tenant):
            raise NotFound(f"no image {image_id!r}", field="image_id")
        return self._item(row._mapping)

    def decide(self, who: Principal, image_id: str, decision: Decision, note: str | None = None) -> ImageRecord:
        """Approve (release to the tenant) or reject a pending image; 409 if it is not pending."""
        if not who.can(Permission.review):
            raise Forbidden(f"role {who.role.value!r} may not review images")
        new_state = DECIDED[decision]
        now = clock.utcnow()
        with write_tx(self.engine) as conn:
            row = conn.execute(
                sa.select(images.c.tenant, images.c.job_id, images.c.review_state, images.c.review_reason).where(
                    images.c.id == image_id
                )
            ).first()
            if row is None or not self._in_scope(who, row.tenant):
                raise NotFound(f"no image {image_id!r}", field="image_id")
            moved = conn.execute(
                images.update()
                .where(images.c.id == image_id, images.c.review_state == "pending")
                .values(review_state=new_state, reviewed_by=who.actor[:64], reviewed_at=now)
            ).rowcount
            if not moved:
                raise Conflict(f"image {image_id} is not pending review (it is {row.review_state})", field="image_id")
            details = {"job_id": row.job_id, "reason": row.review_reason, "note": note}
            audit.record(conn, who, f"review.{decision}", image_id, details, tenant=row.tenant)
            image = conn.execute(sa.select(images).where(images.c.id == image_id)).one()
        return image_record(image)

    def record_reads(self, who: Principal, items: list[ReviewItem], via: str) -> None:
        """One `review.read` audit record per other tenant whose images (and prompts) `who` was just shown."""
        foreign: dict[str, list[str]] = {}
        for item in items:
            if item.image.tenant != who.tenant:
                foreign.setdefault(item.image.tenant, []).append(item.image.id)
        if not foreign:
            return
        with write_tx(self.engine) as conn:
            for tenant, ids in sorted(foreign.items()):
                target = ids[0] if len(ids) == 1 else None
                audit.record(conn, who, "review.read", target, {"via": via, "images": ids}, tenant=tenant)

    @staticmethod
    def _in_scope(who: Principal, tenant: str) -> bool:
        return who.can(Permission.admin) or who.tenant == tenant

    @staticmethod
    def _item(mapping: Any) -> ReviewItem:
        return ReviewItem(
            image=image_record(mapping),
            request=dict(mapping["request"] or {}),
            prompt_redacted=mapping["prompt_redacted_at"] is not None,
        )
