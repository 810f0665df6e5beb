"""Job tags: the labels a request carries (`GenerationRequest.tags`), kept as rows of `job_tags` so a tenant's tagged
jobs are found through an index (the gallery, `GET /v1/jobs?tag=`) rather than by reading every request's JSON.

The rows are written in the submit's own transaction, one INSERT and none for an untagged job, so the hot path of the
common submit is unchanged; deleting a job deletes its tags (cascade)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa

from darkroom.jobs.tables import job_tags


def insert_tags(conn: sa.Connection, row: Mapping[str, Any]) -> None:
    """Record the tags of a job row being inserted (its request, tenant and creation time)."""
    tags = row["request"].get("tags") or []
    if tags:
        base = {"job_id": row["id"], "tenant": row["tenant"], "created_at": row["created_at"]}
        conn.execute(job_tags.insert().values([{**base, "tag": tag} for tag in tags]))


def tagged(tenant: str | None, tag: str) -> sa.Select:
    """The ids of the tenant's jobs carrying `tag`: a range of `ix_job_tags_tenant_tag_created_at` (no tenant: every
    tenant's, which no caller's listing asks for but a service-wide one may)."""
    query = sa.select(job_tags.c.job_id).where(job_tags.c.tag == tag)
    return query if tenant is None else query.where(job_tags.c.tenant == tenant)
