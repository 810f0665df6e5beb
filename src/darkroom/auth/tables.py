"""Security and governance tables (migration 0005_security): API keys, tenants and their policies, the audit log,
and the rate-limit counters.

Imported at the bottom of `darkroom.jobs.tables`, so the one `metadata` (and the test that migrations rebuild it)
covers them too."""

from __future__ import annotations

import sqlalchemy as sa

from darkroom.jobs.tables import TS, metadata

api_keys = sa.Table(
    "api_keys",
    metadata,
    # The public part of the key (`dk_<id>_<secret>`): looked up by id, then the whole key is compared by hash.
    sa.Column("id", sa.String(32), primary_key=True),
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
    sa.Index(None, "tenant"),
)

tenants = sa.Table(
    "tenants",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    # `darkroom.auth.tenants.TenantPolicy` as JSON: quotas, prompt rules, review and retention settings.
    sa.Column("policy", sa.JSON, nullable=False),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("updated_at", TS, nullable=False),
)

audit_log = sa.Table(
    "audit_log",
    metadata,
    # Append-only: the migration installs triggers that refuse UPDATE and DELETE on both databases.
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", TS, nullable=False),
    sa.Column("actor", sa.String(64), nullable=False),  # key id, "local" (loopback, no keys) or "cli:<user>"
    sa.Column("role", sa.String(16), nullable=True),
    sa.Column("tenant", sa.String(64), nullable=True),
    sa.Column("action", sa.String(64), nullable=False),  # job.submit, key.create, review.approve, …
    sa.Column("target", sa.String(200), nullable=True),
    sa.Column("outcome", sa.String(16), nullable=False),  # ok | denied
    sa.Column("ip", sa.String(64), nullable=True),
    sa.Column("request_id", sa.String(64), nullable=True),
    sa.Column("details", sa.JSON, nullable=False),
    sa.Index(None, "at"),
    sa.Index(None, "tenant", "at"),
    sa.Index(None, "action", "at"),
)

rate_counters = sa.Table(
    "rate_counters",
    metadata,
    # Fixed windows shared by every API node: scope is `key:<id>` or `tenant:<id>`, window the minute's start.
    sa.Column("scope", sa.String(120), primary_key=True),
    sa.Column("window", sa.BigInteger, primary_key=True),
    sa.Column("count", sa.Integer, nullable=False),
)
