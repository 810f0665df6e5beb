"""The result cache: an identical seeded request answered from the images an earlier job already made, without GPU work.

Which requests are identical is decided by `cache_key`: a digest of the tenant and everything that decides the pixels
(the model and its approved version, adapters with their versions, every parameter, the explicit seed, the source
images' content hashes), and nothing that only decides delivery (priority, webhooks, time limit, previews). The tenant
is part of the key, so a hit never crosses tenants. A request without an explicit seed gets a random one and is never
cached: asking again means asking for a new picture.

The key is stored on the job (`jobs.cache_key`, indexed; migration 0010) when the job is created. A later submit with
the same key, when the tenant's policy has `result_cache` on, looks it up inside its own write transaction: one
indexed SELECT joining the newest succeeded job with that key to its images. A hit inserts the new job already
succeeded, its image rows pointing at the same stored bytes (content-addressed; retention deletes bytes only when no
row references them any more), with `cache_hit: true` in its provenance; no worker ever sees it. A source whose images
are held for review, rejected or deleted is no hit: the request runs again.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from darkroom import clock
from darkroom.jobs.tables import images, jobs
from darkroom.schemas import GenerationRequest, JobState

# Fields that decide how a result is delivered or labelled, not what it is.
DELIVERY_FIELDS = frozenset(
    {"priority", "webhook_url", "webhook_events", "timeout_seconds", "preview", "tags", "data_label"}
)
_COPIED = ("index", "seed", "width", "height", "sha256", "blob_key", "content_type", "size_bytes", "review_state")


def cache_key(tenant: str, request: GenerationRequest) -> str:
    """The key of a resolved request: its seed, model version, adapter pins and stored sources filled in. Only for
    requests whose client gave the seed (the caller decides)."""
    body = {k: v for k, v in request.model_dump(mode="json").items() if k not in DELIVERY_FIELDS}
    text = json.dumps({"tenant": tenant, "request": body}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Hit:
    job_id: str
    result: dict[str, Any]
    images: list[dict[str, Any]]


def lookup(conn: sa.Connection, key: str, n: int) -> Hit | None:
    """The newest succeeded job with this key and all `n` of its images downloadable, else None."""
    newest = (
        sa.select(jobs.c.id)
        .where(jobs.c.cache_key == key, jobs.c.state == JobState.succeeded.value)
        .order_by(jobs.c.finished_at.desc())
        .limit(1)
        .scalar_subquery()
    )
    rows = conn.execute(
        sa.select(jobs.c.id, jobs.c.result, *(images.c[c] for c in _COPIED), images.c.deleted_at)
        .join(images, images.c.job_id == jobs.c.id)
        .where(jobs.c.id == newest)
        .order_by(images.c.index)
    ).all()
    if len(rows) != n or any(r.deleted_at is not None or r.review_state not in ("none", "approved") for r in rows):
        return None
    return Hit(rows[0].id, dict(rows[0].result or {}), [{c: getattr(r, c) for c in _COPIED} for r in rows])


def answer(
    conn: sa.Connection,
    row: dict[str, Any],
    hit: Hit,
    now: dt.datetime,
    event: Callable[[sa.Connection, str, str, dict[str, Any], dt.datetime], None],
) -> dict[str, Any]:
    """Insert the new job as succeeded with copies of the hit's image rows; returns the row as inserted."""
    row.update(
        state=JobState.succeeded.value,
        started_at=now,
        finished_at=now,
        progress_step=row["progress_total"],
        fair_tag=0.0,
        result={**hit.result, "cache_hit": True, "cached_from": hit.job_id},
    )
    conn.execute(jobs.insert().values(**row))
    ids = [clock.new_id("img") for _ in hit.images]
    copies = [
        {**image, "id": image_id, "job_id": row["id"], "tenant": row["tenant"], "created_at": now}
        for image_id, image in zip(ids, hit.images, strict=True)
    ]
    conn.execute(images.insert(), copies)
    event(conn, row["id"], "succeeded", {"images": ids, "cache_hit": True}, now)
    return row
