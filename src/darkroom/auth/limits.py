"""Rate limits and quotas, shared by every API node through the database.

- requests/minute, per key and per tenant: fixed one-minute windows counted in `rate_counters` with one upsert per
  request (only for callers that have a limit).
- images/day and GPU-seconds/month, per tenant: read from the jobs themselves when a job is submitted, inside the
  transaction that inserts it, so two submits cannot both take the last image of the day.

Every refusal is a `RateLimited` (429) naming the limit, its scope and when it frees up (`Retry-After`)."""

from __future__ import annotations

import datetime as dt
import random

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from darkroom import clock
from darkroom.auth.principal import Principal
from darkroom.auth.tables import rate_counters
from darkroom.auth.tenants import TenantPolicy
from darkroom.config import SecuritySettings
from darkroom.errors import RateLimited
from darkroom.jobs.db import write_tx
from darkroom.jobs.tables import jobs

COUNTED_STATES = ("queued", "running", "succeeded")  # failed, cancelled and dead jobs give their images back


def effective(policy: TenantPolicy, defaults: SecuritySettings) -> TenantPolicy:
    """The tenant's limits, with the service-wide defaults where the tenant sets none."""
    return policy.model_copy(
        update={
            "requests_per_minute": policy.requests_per_minute or defaults.default_requests_per_minute,
            "images_per_day": policy.images_per_day or defaults.default_images_per_day,
            "gpu_seconds_per_month": policy.gpu_seconds_per_month or defaults.default_gpu_seconds_per_month,
        }
    )


class RateLimiter:
    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def hit(self, who: Principal, tenant_limit: int | None) -> None:
        """Count one request against the key's and the tenant's per-minute limits; 429 when either is used up."""
        scopes = []
        if who.key_id and who.requests_per_minute:
            scopes.append((f"key:{who.key_id}", who.requests_per_minute, "key"))
        if tenant_limit:
            scopes.append((f"tenant:{who.tenant}", tenant_limit, "tenant"))
        if not scopes:
            return
        now = clock.utcnow().timestamp()
        window = int(now // 60)
        with write_tx(self.engine) as conn:
            counts = [(self._bump(conn, scope, window), scope, limit, kind) for scope, limit, kind in scopes]
            if random.random() < 0.01:
                conn.execute(rate_counters.delete().where(rate_counters.c.window < window - 1))
        for count, scope, limit, kind in counts:
            if count > limit:
                raise RateLimited(
                    f"rate limit: {limit} requests per minute for this {kind}",
                    limit={"name": "requests_per_minute", "scope": scope, "limit": limit, "used": count},
                    retry_after=int((window + 1) * 60 - now) + 1,
                )

    @staticmethod
    def _bump(conn: sa.Connection, scope: str, window: int) -> int:
        insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
        stmt = insert(rate_counters).values(scope=scope, window=window, count=1)
        stmt = stmt.on_conflict_do_update(
            index_elements=["scope", "window"], set_={"count": rate_counters.c.count + 1}
        ).returning(rate_counters.c.count)
        return conn.execute(stmt).scalar_one()


def check_quotas(conn: sa.Connection, tenant: str, policy: TenantPolicy, images: int) -> None:
    """Inside the submit transaction: would `images` more break the tenant's daily images or monthly GPU time?"""
    if conn.dialect.name == "postgresql":
        # Serialise this tenant's submits (SQLite's write lock already does), so the count below stays true.
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:t))"), {"t": f"quota:{tenant}"})
    now = clock.utcnow()
    if policy.images_per_day:
        day = now.replace(hour=0, minute=0, second=0, microsecond=0)
        used = conn.execute(
            sa.select(sa.func.coalesce(sa.func.sum(jobs.c.images_requested), 0)).where(
                jobs.c.tenant == tenant, jobs.c.created_at >= day, jobs.c.state.in_(COUNTED_STATES)
            )
        ).scalar_one()
        if used + images > policy.images_per_day:
            raise RateLimited(
                f"quota: {policy.images_per_day} images per day for tenant {tenant!r} "
                f"({used} used, {images} asked for); it resets at 00:00 UTC",
                limit={
                    "name": "images_per_day",
                    "scope": f"tenant:{tenant}",
                    "limit": policy.images_per_day,
                    "used": used,
                },
                retry_after=int((day + dt.timedelta(days=1) - now).total_seconds()) + 1,
                code="quota_exceeded",
            )
    if policy.gpu_seconds_per_month:
        month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        used = conn.execute(
            sa.select(sa.func.coalesce(sa.func.sum(jobs.c.gpu_seconds), 0.0)).where(
                jobs.c.tenant == tenant, jobs.c.finished_at >= month
            )
        ).scalar_one()
        if used >= policy.gpu_seconds_per_month:
            following = (month + dt.timedelta(days=32)).replace(day=1)
            raise RateLimited(
                f"quota: {policy.gpu_seconds_per_month:g} GPU-seconds per month for tenant {tenant!r} "
                f"({used:.1f} used); it resets on the 1st, 00:00 UTC",
                limit={
                    "name": "gpu_seconds_per_month",
                    "scope": f"tenant:{tenant}",
                    "limit": policy.gpu_seconds_per_month,
                    "used": round(float(used), 3),
                },
                retry_after=int((following - now).total_seconds()) + 1,
                code="quota_exceeded",
            )
