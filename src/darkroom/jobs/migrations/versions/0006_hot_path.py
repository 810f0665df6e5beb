"""hot path: indexes that match each hot ORDER BY, queue and usage counters, step rates, caller-scoped idempotency keys

No table is rebuilt: on SQLite a rebuild of `jobs` would cascade-delete its images and events.

Revision ID: 0006_hot_path
Revises: 0005_security
Create Date: 2026-12-01
"""

from __future__ import annotations

import datetime as dt
import hashlib

import sqlalchemy as sa
from alembic import op

revision = "0006_hot_path"
down_revision = "0005_security"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
_CLAIM_ORDER: list[str | sa.TextClause] = [sa.text("priority DESC"), "fair_tag", "created_at", "id"]
_DROPPED = {  # replaced by the indexes below, which serve the same filters and the queries' sort orders too
    "ix_jobs_state_priority_created_at": ["state", "priority", "created_at"],
    "ix_jobs_state_priority_fair_tag": ["state", "priority", "fair_tag"],
    "ix_jobs_state_batch_key": ["state", "batch_key"],
    "ix_jobs_tenant_created_at": ["tenant", "created_at"],
}


def upgrade() -> None:
    op.create_table(
        "usage_counters",
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("period", sa.String(16), nullable=False),
        sa.Column("images", sa.Integer, nullable=False, server_default="0"),
        sa.Column("gpu_seconds", sa.Float, nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("tenant", "period", name="pk_usage_counters"),
    )
    op.create_table(
        "queue_counters",
        sa.Column("shard", sa.Integer, autoincrement=False, nullable=False),
        sa.Column("queued", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("shard", name="pk_queue_counters"),
    )
    _count_queued()
    op.create_table(
        "step_rates",
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("seconds_per_step", sa.Float, nullable=False),
        sa.Column("samples", sa.Integer, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("model", name="pk_step_rates"),
    )
    for name in _DROPPED:
        op.drop_index(name, table_name="jobs")
    _scope_idempotency_keys()
    op.create_index("ix_jobs_claim", "jobs", ["state", *_CLAIM_ORDER])
    op.create_index("ix_jobs_claim_batch", "jobs", ["state", "batch_key", *_CLAIM_ORDER])
    op.create_index("ix_jobs_listing", "jobs", ["tenant", sa.text("created_at DESC"), sa.text("id DESC")])
    op.create_index("ix_jobs_priority_fair_tag", "jobs", ["priority", "fair_tag"])
    _count_current_usage()


def _count_queued() -> None:
    """16 shards (`QUEUE_SHARDS` as of this revision); the jobs queued now are counted in shard 0."""
    jobs = sa.table("jobs", sa.column("state"))
    queued = op.get_bind().execute(sa.select(sa.func.count()).select_from(jobs).where(jobs.c.state == "queued"))
    first = int(queued.scalar_one())
    counters = sa.table("queue_counters", sa.column("shard"), sa.column("queued"))
    op.bulk_insert(counters, [{"shard": i, "queued": first if i == 0 else 0} for i in range(16)])


def _scope_idempotency_keys() -> None:
    """Keys were stored as sent, per tenant; from now on the store keeps a digest of (key id, key): rewrite the
    stored ones so a retry that spans the upgrade still finds its job."""
    jobs = sa.table("jobs", sa.column("id"), sa.column("key_id"), sa.column("idempotency_key"))
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(jobs.c.id, jobs.c.key_id, jobs.c.idempotency_key).where(jobs.c.idempotency_key.is_not(None))
    )
    for row in rows.all():
        digest = _digest(row.key_id, row.idempotency_key)
        bind.execute(jobs.update().where(jobs.c.id == row.id).values(idempotency_key=digest))


def _digest(key_id: str | None, key: str) -> str:
    """A frozen copy of `darkroom.jobs.store.idempotency_digest` as of this revision."""
    return hashlib.sha256(f"{key_id or ''}\n{key}".encode()).hexdigest()


def _count_current_usage() -> None:
    """Start the counters from the jobs already there: today's images and this month's GPU-seconds per tenant
    (earlier periods can no longer be charged, so they need no counter)."""
    now = dt.datetime.now(dt.UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    month = day.replace(day=1)
    jobs = sa.table(
        "jobs",
        sa.column("tenant"),
        sa.column("state"),
        sa.column("images_requested"),
        sa.column("gpu_seconds"),
        sa.column("created_at", TS),
        sa.column("finished_at", TS),
    )
    bind = op.get_bind()
    counted = jobs.c.state.in_(("queued", "running", "succeeded"))
    images = bind.execute(
        sa.select(jobs.c.tenant, sa.func.sum(jobs.c.images_requested))
        .where(counted, jobs.c.created_at >= day)
        .group_by(jobs.c.tenant)
    ).all()
    seconds = bind.execute(
        sa.select(jobs.c.tenant, sa.func.sum(jobs.c.gpu_seconds))
        .where(jobs.c.finished_at >= month, jobs.c.gpu_seconds.is_not(None))
        .group_by(jobs.c.tenant)
    ).all()
    rows = [{"tenant": t, "period": f"d:{day:%Y-%m-%d}", "images": int(n or 0), "gpu_seconds": 0.0} for t, n in images]
    rows += [{"tenant": t, "period": f"m:{month:%Y-%m}", "images": 0, "gpu_seconds": float(s or 0)} for t, s in seconds]
    if rows:
        counters = sa.table(
            "usage_counters", sa.column("tenant"), sa.column("period"), sa.column("images"), sa.column("gpu_seconds")
        )
        op.bulk_insert(counters, rows)


def downgrade() -> None:
    for name in ("ix_jobs_priority_fair_tag", "ix_jobs_listing", "ix_jobs_claim_batch", "ix_jobs_claim"):
        op.drop_index(name, table_name="jobs")
    for name, columns in _DROPPED.items():
        op.create_index(name, "jobs", columns)
    op.drop_table("step_rates")
    op.drop_table("queue_counters")
    op.drop_table("usage_counters")
