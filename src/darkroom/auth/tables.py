"""Security and governance tables (migration 0005_security): API keys, tenants and their policies, the audit log,
and the rate-limit counters; usage counters for quotas (0006_hot_path).

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

usage_counters = sa.Table(
    "usage_counters",
    metadata,
    # Quotas read one row instead of summing a tenant's jobs (migration 0006_hot_path). `period` is a UTC day
    # (`d:2026-11-24`: images asked for by jobs created that day, given back when a job fails or is cancelled) or
    # a UTC month (`m:2026-11`: GPU-seconds of the jobs that finished in it). Updated in the transactions that
    # create and finish jobs, so a counter is exactly as current as the jobs it counts.
    sa.Column("tenant", sa.String(64), primary_key=True),
    sa.Column("period", sa.String(16), primary_key=True),
    sa.Column("images", sa.Integer, nullable=False, server_default="0"),
    sa.Column("gpu_seconds", sa.Float, nullable=False, server_default="0"),
)
