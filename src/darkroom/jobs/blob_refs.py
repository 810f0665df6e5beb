"""Who still references a blob: image rows (`images.blob_key`) and job uploads (`job_uploads`), each asked through
an index, so retention and pruning never read every job's request JSON to decide whether bytes may go.

Blobs are content-addressed, so one blob may back several image rows and job uploads, across tenants.

An upload (init or mask image) lives in the blob store and the job's request holds it as `blob:<key>`. The store
writes one `job_uploads` row per distinct key in the submit transaction; retention deletes a job's rows when it
rewrites the references to `[deleted]`, and deleting the job takes them with it (cascade). So a row exists exactly
while a job's request still points at the blob.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import sqlalchemy as sa

from darkroom.jobs.tables import images, job_uploads

UPLOAD_FIELDS = ("init_image", "mask_image")
BLOB_PREFIX = "blob:"


def upload_refs(request: Mapping[str, Any]) -> list[str]:
    """The `blob:<key>` references among the request's upload fields (data URLs and `[deleted]` are not blobs)."""
    return [v for f in UPLOAD_FIELDS if isinstance(v := request.get(f), str) and v.startswith(BLOB_PREFIX)]


def upload_keys(request: Mapping[str, Any]) -> set[str]:
    """The distinct blob keys the request's uploads reference (init and mask may be the same bytes)."""
    return {ref.removeprefix(BLOB_PREFIX) for ref in upload_refs(request)}


def insert_uploads(conn: sa.Connection, job_id: str, request: Mapping[str, Any]) -> None:
    """Record the job's uploads in the caller's (submit) transaction: one INSERT, and none without uploads."""
    if keys := upload_keys(request):
        conn.execute(job_uploads.insert().values([{"job_id": job_id, "blob_key": key} for key in sorted(keys)]))


def referenced_query(keys: Collection[str], skip_jobs: Collection[str]) -> sa.Select:
    """Which of `keys` a job outside `skip_jobs` still references: a range of `ix_job_uploads_blob_key`."""
    return (
        sa.select(job_uploads.c.blob_key)
        .where(job_uploads.c.blob_key.in_(list(keys)), job_uploads.c.job_id.not_in(list(skip_jobs)))
        .distinct()
    )


def keys_of_query(job_ids: Collection[str]) -> sa.Select:
    """The upload keys of `job_ids`, on the primary key (job_id, blob_key)."""
    return sa.select(job_uploads.c.job_id, job_uploads.c.blob_key).where(job_uploads.c.job_id.in_(list(job_ids)))


def live_images_query(keys: Collection[str], skip_images: Collection[str]) -> sa.Select:
    """Which of `keys` an image row outside `skip_images` still uses (not deleted): `ix_images_blob_key`."""
    return sa.select(images.c.blob_key).where(
        images.c.blob_key.in_(list(keys)), images.c.deleted_at.is_(None), images.c.id.not_in(list(skip_images))
    )


def live_keys(
    conn: sa.Connection, keys: Collection[str], skip_images: Collection[str] = (), skip_jobs: Collection[str] = ()
) -> set[str]:
    """Which of `keys` an image row or a job's upload still references, outside the rows being expired (`skip_*`)."""
    if not keys:
        return set()
    live = set(conn.execute(live_images_query(keys, skip_images)).scalars())
    return live | set(conn.execute(referenced_query(keys, skip_jobs)).scalars())
