"""jobs.cache_key: the result cache's key (darkroom.jobs.result_cache), indexed for its lookup at submit

Revision ID: 0010_result_cache
Revises: 0009_job_cost
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010_result_cache"
down_revision = "0009_job_cost"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("cache_key", sa.String(64), nullable=True))
    op.create_index("ix_jobs_cache_key", "jobs", ["cache_key"])


def downgrade() -> None:
    op.drop_index("ix_jobs_cache_key", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("cache_key")
