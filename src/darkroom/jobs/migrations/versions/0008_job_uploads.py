"""job_uploads: which uploads (`blob:<key>` init / mask images) each job references, indexed by blob key

Retention and pruning ask "does another job still use this blob?" through `ix_job_uploads_blob_key` instead of
reading every job's request JSON. The existing jobs are backfilled here: their requests are read in batches in primary
key order and parsed in Python (JSON path syntax differs between SQLite and PostgreSQL, and no index could serve it).

Revision ID: 0008_job_uploads
Revises: 0007_pruning
Create Date: 2026-12-01
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0008_job_uploads"
down_revision = "0007_pruning"
branch_labels = None
depends_on = None

# Frozen copies as of this revision (the application's `darkroom.jobs.uploads` may change later).
_UPLOAD_FIELDS = ("init_image", "mask_image")
_BATCH = 500


def upgrade() -> None:
    op.create_table(
        "job_uploads",
        sa.Column("job_id", sa.String(40), nullable=False),
        sa.Column("blob_key", sa.String(200), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_job_uploads_job_id_jobs", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "blob_key", name="pk_job_uploads"),
    )
    op.create_index("ix_job_uploads_blob_key", "job_uploads", ["blob_key"])
    _backfill()


def downgrade() -> None:
    op.drop_index("ix_job_uploads_blob_key", table_name="job_uploads")
    op.drop_table("job_uploads")


def _backfill() -> None:
    """One batch of jobs at a time, keyset-paginated on the primary key, so memory stays bounded on a big table."""
    conn = op.get_bind()
    jobs = sa.table("jobs", sa.column("id", sa.String), sa.column("request", sa.JSON))
    uploads = sa.table("job_uploads", sa.column("job_id", sa.String), sa.column("blob_key", sa.String))
    last = ""
    while True:
        batch = conn.execute(
            sa.select(jobs.c.id, jobs.c.request).where(jobs.c.id > last).order_by(jobs.c.id).limit(_BATCH)
        ).all()
        rows = [{"job_id": job_id, "blob_key": key} for job_id, request in batch for key in _keys(request)]
        if rows:
            conn.execute(uploads.insert(), rows)
        if len(batch) < _BATCH:
            return
        last = batch[-1].id


def _keys(request: Any) -> list[str]:
    if isinstance(request, str):  # a driver that hands JSON back as text
        request = json.loads(request)
    if not isinstance(request, dict):
        return []
    refs = {v for f in _UPLOAD_FIELDS if isinstance(v := request.get(f), str) and v.startswith("blob:")}
    return sorted(ref.removeprefix("blob:") for ref in refs)
