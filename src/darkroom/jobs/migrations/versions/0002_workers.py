"""workers: the registry of worker processes and what each holds

Revision ID: 0002_workers
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_workers"
down_revision = "0001"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "workers",
        sa.Column("id", sa.String(120), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("device", sa.String(200), nullable=False),
        sa.Column("memory_bytes", sa.BigInteger, nullable=True),
        sa.Column("loaded_models", sa.JSON, nullable=False),
        sa.Column("models_available", sa.JSON, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("last_heartbeat_at", TS, nullable=False),
        sa.Column("jobs_done", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_workers"),
    )
    op.create_index("ix_workers_state_last_heartbeat_at", "workers", ["state", "last_heartbeat_at"])


def downgrade() -> None:
    op.drop_table("workers")
