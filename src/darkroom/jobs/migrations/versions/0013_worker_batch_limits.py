"""workers.batch_limits: the batch limits a worker's engine has in force, per model and size, for the fleet view

A worker reports them with its heartbeat (`worker/presence.py`), as it reports its loaded models, so `/v1/workers` and
the UI show what each device can batch. Nullable: rows from before this revision, and workers that have not run a
batch yet, have none.

Revision ID: 0013_worker_batch_limits
Revises: 0012_job_tags
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013_worker_batch_limits"
down_revision = "0012_job_tags"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("batch_limits", sa.JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("batch_limits")
