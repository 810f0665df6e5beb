"""Schema of the job store (SQLAlchemy Core). Migrations in `migrations/` rebuild exactly this; a test checks it."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

TS = sa.DateTime(timezone=True)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("model", sa.String(200), nullable=True),
    sa.Column("request", sa.JSON, nullable=False),
    sa.Column("request_id", sa.String(64), nullable=True),
    sa.Column("idempotency_key", sa.String(200), nullable=True),
    sa.Column("request_hash", sa.String(64), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("lease_owner", sa.String(120), nullable=True),
    sa.Column("lease_expires_at", TS, nullable=True),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("progress_step", sa.Integer, nullable=False, default=0),
    sa.Column("progress_total", sa.Integer, nullable=False, default=0),
    sa.Column("result", sa.JSON, nullable=True),
    sa.Column("error", sa.JSON, nullable=True),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("updated_at", TS, nullable=False),
    sa.Column("available_at", TS, nullable=False),
    sa.Column("started_at", TS, nullable=True),
    sa.Column("finished_at", TS, nullable=True),
    # Scheduling (migration 0004): fair-queue tag within a priority class, batch compatibility key, time limit.
    sa.Column("fair_tag", sa.Float, nullable=False, server_default="0"),
    sa.Column("batch_key", sa.String(64), nullable=True),
    sa.Column("timeout_seconds", sa.Float, nullable=True),
    # Security (migration 0005): the key that submitted it, images it asks for (quotas), prompt redaction time.
    sa.Column("key_id", sa.String(32), nullable=True),
    sa.Column("images_requested", sa.Integer, nullable=False, server_default="1"),
    sa.Column("prompt_redacted_at", TS, nullable=True),
    sa.Column("gpu_seconds", sa.Float, nullable=True),  # worker time the job took (GPU-seconds quota)
    sa.Column("cost", sa.Float, nullable=True),  # gpu_seconds at its worker class's device-hour price (0009)
    # Result cache (migration 0010): digest of the tenant and everything that decides the pixels (jobs.result_cache).
    sa.Column("cache_key", sa.String(64), nullable=True),
    # Routing (migration 0011): confidential | internal | public; an external engine's claim filters on it.
    sa.Column("data_label", sa.String(16), nullable=False, server_default="internal"),
    # `idempotency_key` holds a digest of the caller's key id and the Idempotency-Key (since migration 0006), so a
    # key is scoped to the API key that used it: another user of the tenant can neither replay nor probe it.
    sa.UniqueConstraint("tenant", "idempotency_key"),
    sa.Index(None, "state", "lease_expires_at"),
    sa.Index(None, "tenant", "priority", "fair_tag"),
    sa.Index(None, "tenant", "state"),
    sa.Index(None, "priority", "fair_tag"),
)

# Indexes whose column order and directions match a hot query's ORDER BY exactly, so neither database sorts (or
# SQLite builds a temp B-tree) while holding a lock. Named by hand: the naming convention cannot spell DESC.
CLAIM_ORDER = (jobs.c.priority.desc(), jobs.c.fair_tag, jobs.c.created_at, jobs.c.id)
sa.Index("ix_jobs_claim", jobs.c.state, *CLAIM_ORDER)  # claim, queue position, queue-head fair tag
sa.Index("ix_jobs_claim_batch", jobs.c.state, jobs.c.batch_key, *CLAIM_ORDER)  # filling a batch of one kind
sa.Index("ix_jobs_listing", jobs.c.tenant, jobs.c.created_at.desc(), jobs.c.id.desc())  # GET /v1/jobs, newest first
sa.Index("ix_jobs_cache_key", jobs.c.cache_key)  # the result cache's lookup (jobs.result_cache)
sa.Index("ix_jobs_claim_label", jobs.c.state, jobs.c.data_label, *CLAIM_ORDER)  # an external engine's claim

# The number of queued jobs, kept in QUEUE_SHARDS rows that add up to it (migration 0006). Every move into or out of
# `queued` shifts one row in its own transaction, so the depth limit reads 16 rows instead of counting the queue;
# spreading the writes over shards keeps concurrent submits and SKIP LOCKED claimers on PostgreSQL from queueing on
# one row lock.
QUEUE_SHARDS = 16
queue_counters = sa.Table(
    "queue_counters",
    metadata,
    sa.Column("shard", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("queued", sa.BigInteger, nullable=False),
)

# Seconds per denoising step per model, an exponentially weighted average updated by each completion (migration
# 0006): what an ETA needs, without reading finished jobs back.
step_rates = sa.Table(
    "step_rates",
    metadata,
    sa.Column("model", sa.String(200), primary_key=True),
    sa.Column("seconds_per_step", sa.Float, nullable=False),
    sa.Column("samples", sa.Integer, nullable=False),
    sa.Column("updated_at", TS, nullable=False),
)

images = sa.Table(
    "images",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("job_id", sa.String(40), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("index", sa.Integer, nullable=False),
    sa.Column("seed", sa.BigInteger, nullable=False),
    sa.Column("width", sa.Integer, nullable=False),
    sa.Column("height", sa.Integer, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("blob_key", sa.String(200), nullable=False),
    sa.Column("content_type", sa.String(64), nullable=False),
    sa.Column("size_bytes", sa.Integer, nullable=False),
    sa.Column("created_at", TS, nullable=False),
    # Output safety (migration 0005): none (released) | pending | approved | rejected. Only none and approved are
    # downloadable by the tenant.
    sa.Column("review_state", sa.String(16), nullable=False, server_default="none"),
    sa.Column("review_reason", sa.String(500), nullable=True),
    sa.Column("reviewed_by", sa.String(64), nullable=True),
    sa.Column("reviewed_at", TS, nullable=True),
    # Retention (migration 0005): when the sweeper deleted the bytes; the row stays as the record.
    sa.Column("deleted_at", TS, nullable=True),
    sa.UniqueConstraint("job_id", "index"),
    sa.Index(None, "review_state"),
    sa.Index(None, "tenant", "created_at"),
)

job_events = sa.Table(
    "job_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(40), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("type", sa.String(32), nullable=False),
    sa.Column("data", sa.JSON, nullable=False),
    sa.Column("created_at", TS, nullable=False),
    sa.Index(None, "job_id", "id"),
)

# The uploads (init / mask images, `blob:<key>` in the request) each job still references (migration 0008): retention
# and pruning find whether another job uses a blob through `blob_key`'s index, not by reading requests. See
# `darkroom.jobs.blob_refs`.
job_uploads = sa.Table(
    "job_uploads",
    metadata,
    sa.Column("job_id", sa.String(40), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("blob_key", sa.String(200), primary_key=True),
    sa.Index(None, "blob_key"),
)

# The tags a job's request carries (migration 0012), one row each, so the gallery and `GET /v1/jobs?tag=` find a
# tenant's tagged jobs through an index instead of reading every request. Written in the submit transaction
# (`darkroom.jobs.tags`); deleting the job takes them with it.
job_tags = sa.Table(
    "job_tags",
    metadata,
    sa.Column("job_id", sa.String(40), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("tag", sa.String(32), primary_key=True),
    sa.Column("tenant", sa.String(64), nullable=False),
    sa.Column("created_at", TS, nullable=False),
    sa.Index(None, "tenant", "tag", "created_at"),
)

# The other modules' tables join `metadata` whichever module is imported first (the sweeps' indexes come with the
# webhook tables: see `darkroom.jobs.sweep_indexes`).
from darkroom.auth import tables as auth_tables  # noqa: E402,F401
from darkroom.jobs import workers_table  # noqa: E402,F401
from darkroom.webhooks import tables as webhook_tables  # noqa: E402,F401
