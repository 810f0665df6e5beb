"""jobs.cost: what a succeeded job's device time cost, at its worker class's price per device-hour

Written by the completion's own UPDATE (no statement of its own); usage reports sum it with `gpu_seconds`.

Revision ID: 0009_job_cost
Revises: 0008_job_uploads
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_job_cost"
down_revision = "0008_job_uploads"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("cost", sa.Float, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("cost")
