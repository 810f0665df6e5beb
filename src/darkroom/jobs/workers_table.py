"""The `workers` table: one row per worker process that ever registered (migration 0002_workers rebuilds it).

It lives in its own module so the worker registry can grow without touching the jobs schema; `tables.py` imports it
at the bottom so `metadata` (and with it the migration check) always holds every table.
"""

from __future__ import annotations

import sqlalchemy as sa

from darkroom.jobs.tables import TS, metadata

WORKER_STATES = ("active", "draining", "lost", "stopped", "unhealthy")

workers = sa.Table(
    "workers",
    metadata,
    sa.Column("id", sa.String(120), primary_key=True),  # the worker id that job rows carry in `lease_owner`
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
    sa.Column("batch_limits", sa.JSON, nullable=True),  # [{model, width, height, images}] (migration 0013)
    sa.Index(None, "state", "last_heartbeat_at"),
)
