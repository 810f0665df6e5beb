"""security and governance: API keys, tenants, audit log, rate counters, review and retention columns

Merges the three branches that grew from 0001 (workers, webhooks, scheduling) into one head.

Revision ID: 0005_security
Revises: 0002_workers, 0003_webhooks, 0004_scheduling
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_security"
down_revision = ("0002_workers", "0003_webhooks", "0004_scheduling")
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)

_PG_GUARD = """
CREATE OR REPLACE FUNCTION darkroom_audit_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only';
END;
$$ LANGUAGE plpgsql
"""


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("requests_per_minute", sa.Integer, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("created_by", sa.String(64), nullable=True),
        sa.Column("expires_at", TS, nullable=True),
        sa.Column("revoked_at", TS, nullable=True),
        sa.Column("last_used_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
    )
    op.create_index("ix_api_keys_tenant", "api_keys", ["tenant"])
    op.create_table(
        "tenants",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("policy", sa.JSON, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_tenants"),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=True),
        sa.Column("tenant", sa.String(64), nullable=True),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(200), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("ip", sa.String(64), nullable=True),
        sa.Column("request_id", sa.String(64), nullable=True),
        sa.Column("details", sa.JSON, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
    )
    op.create_index("ix_audit_log_at", "audit_log", ["at"])
    op.create_index("ix_audit_log_tenant_at", "audit_log", ["tenant", "at"])
    op.create_index("ix_audit_log_action_at", "audit_log", ["action", "at"])
    op.create_table(
        "rate_counters",
        sa.Column("scope", sa.String(120), nullable=False),
        sa.Column("window", sa.BigInteger, nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("scope", "window", name="pk_rate_counters"),
    )
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("key_id", sa.String(32), nullable=True))
        batch.add_column(sa.Column("images_requested", sa.Integer, nullable=False, server_default="1"))
        batch.add_column(sa.Column("prompt_redacted_at", TS, nullable=True))
        batch.add_column(sa.Column("gpu_seconds", sa.Float, nullable=True))
    op.create_index("ix_jobs_tenant_created_at", "jobs", ["tenant", "created_at"])
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("review_state", sa.String(16), nullable=False, server_default="none"))
        batch.add_column(sa.Column("review_reason", sa.String(500), nullable=True))
        batch.add_column(sa.Column("reviewed_by", sa.String(64), nullable=True))
        batch.add_column(sa.Column("reviewed_at", TS, nullable=True))
        batch.add_column(sa.Column("deleted_at", TS, nullable=True))
    op.create_index("ix_images_review_state", "images", ["review_state"])
    op.create_index("ix_images_tenant_created_at", "images", ["tenant", "created_at"])
    _append_only("audit_log")


def _append_only(table: str) -> None:
    """The database itself refuses to change or remove an audit record, whoever holds the connection."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_PG_GUARD)
        op.execute(
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION darkroom_audit_append_only()"
        )
        return
    for verb in ("UPDATE", "DELETE"):
        op.execute(
            f"CREATE TRIGGER {table}_no_{verb.lower()} BEFORE {verb} ON {table} "
            f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_log_append_only ON audit_log")
        op.execute("DROP FUNCTION IF EXISTS darkroom_audit_append_only()")
    op.drop_index("ix_images_tenant_created_at", table_name="images")
    op.drop_index("ix_images_review_state", table_name="images")
    with op.batch_alter_table("images") as batch:
        for column in ("deleted_at", "reviewed_at", "reviewed_by", "review_reason", "review_state"):
            batch.drop_column(column)
    op.drop_index("ix_jobs_tenant_created_at", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        for column in ("gpu_seconds", "prompt_redacted_at", "images_requested", "key_id"):
            batch.drop_column(column)
    for table in ("rate_counters", "audit_log", "tenants", "api_keys"):
        op.drop_table(table)
