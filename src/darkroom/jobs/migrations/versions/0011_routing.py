"""jobs.data_label (confidential | internal | public) and the index an external engine's claim reads it by

Revision ID: 0011_routing
Revises: 0010_result_cache
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011_routing"
down_revision = "0010_result_cache"
branch_labels = None
depends_on = None

_CLAIM_ORDER: list[str | sa.TextClause] = [sa.text("priority DESC"), "fair_tag", "created_at", "id"]


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("data_label", sa.String(16), nullable=False, server_default="internal"))
    op.create_index("ix_jobs_claim_label", "jobs", ["state", "data_label", *_CLAIM_ORDER])


def downgrade() -> None:
    op.drop_index("ix_jobs_claim_label", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("data_label")
