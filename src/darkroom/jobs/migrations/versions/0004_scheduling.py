"""scheduling: fair-queue tags, batch keys, per-job timeouts

Revision ID: 0004_scheduling
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_scheduling"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("fair_tag", sa.Float, nullable=False, server_default="0"))
        batch.add_column(sa.Column("batch_key", sa.String(64), nullable=True))
        batch.add_column(sa.Column("timeout_seconds", sa.Float, nullable=True))
    op.create_index("ix_jobs_state_priority_fair_tag", "jobs", ["state", "priority", "fair_tag"])
    op.create_index("ix_jobs_tenant_priority_fair_tag", "jobs", ["tenant", "priority", "fair_tag"])
    op.create_index("ix_jobs_tenant_state", "jobs", ["tenant", "state"])
    op.create_index("ix_jobs_state_batch_key", "jobs", ["state", "batch_key"])


def downgrade() -> None:
    for name in ("state_batch_key", "tenant_state", "tenant_priority_fair_tag", "state_priority_fair_tag"):
        op.drop_index(f"ix_jobs_{name}", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("timeout_seconds")
        batch.drop_column("batch_key")
        batch.drop_column("fair_tag")
