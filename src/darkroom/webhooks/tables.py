"""Webhook delivery log and the small shared settings table (migration 0003_webhooks).

Imported at the bottom of `darkroom.jobs.tables`, so the one `metadata` (and the test that migrations rebuild it)
covers these tables too. `settings_kv` sits here because the dispatcher's cursor was its first user; `darkroom.kv`
is its interface."""

from __future__ import annotations

import sqlalchemy as sa

from darkroom.jobs.tables import TS, metadata

webhook_deliveries = sa.Table(
    "webhook_deliveries",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("job_id", sa.String(40), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("event_id", sa.Integer, nullable=False),
    sa.Column("event", sa.String(32), nullable=False),
    sa.Column("url", sa.String(2000), nullable=False),
    # pending → delivering → delivered | pending (retry) | failed; refused: the SSRF guard said no, never sent
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("payload", sa.JSON, nullable=False),
    sa.Column("log", sa.JSON, nullable=False),
    sa.Column("last_status", sa.Integer, nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("lease_owner", sa.String(120), nullable=True),
    sa.Column("lease_expires_at", TS, nullable=True),
    sa.Column("next_attempt_at", TS, nullable=False),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("updated_at", TS, nullable=False),
    sa.Column("delivered_at", TS, nullable=True),
    sa.UniqueConstraint("job_id", "event_id"),
    sa.Index(None, "state", "next_attempt_at"),
)

settings_kv = sa.Table(
    "settings_kv",
    metadata,
    sa.Column("key", sa.String(200), primary_key=True),
    sa.Column("value", sa.JSON, nullable=False),
    sa.Column("updated_at", TS, nullable=False),
)

# Last of the tables the sweeps' indexes need, so they are declared here (`darkroom.jobs.sweep_indexes`).
from darkroom.jobs import sweep_indexes  # noqa: E402,F401
