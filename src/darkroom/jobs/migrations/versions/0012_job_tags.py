"""job_tags: the tags each job's request carries, one row each, indexed by tenant and tag

The gallery and `GET /v1/jobs?tag=` find a tenant's tagged jobs through `ix_job_tags_tenant_tag_created_at` instead
of reading every job's request JSON. Jobs from before this revision carry no tags (the field is new), so there is
nothing to backfill.

Revision ID: 0012_job_tags
Revises: 0011_routing
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012_job_tags"
down_revision = "0011_routing"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_tags",
        sa.Column("job_id", sa.String(40), nullable=False),
        sa.Column("tag", sa.String(32), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_job_tags_job_id_jobs", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "tag", name="pk_job_tags"),
    )
    op.create_index("ix_job_tags_tenant_tag_created_at", "job_tags", ["tenant", "tag", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_job_tags_tenant_tag_created_at", table_name="job_tags")
    op.drop_table("job_tags")
