"""Rate limits and quotas, shared by every API node through the database.

- requests/minute, per key and per tenant: fixed one-minute windows counted in `rate_counters` with one upsert per
  request (only for callers that have a limit).
- images/day and GPU-seconds/month, per tenant: one row each in `usage_counters` (see `darkroom.auth.usage`), charged
  and checked inside the transaction that inserts the job, so two submits cannot both take the last image of the day
  and a check costs the same with a million jobs as with ten.

Every refusal is a `RateLimited` (429) naming the limit, its scope and when it frees up (`Retry-After`)."""

from __future__ import annotations

import datetime as dt
import random

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from darkroom import clock
from darkroom.auth import usage as counters
from darkroom.auth.principal import Principal
from darkroom.auth.tables import rate_counters
from darkroom.auth.tenants import TenantPolicy
from darkroom.config import SecuritySettings
from darkroom.errors import RateLimited
from darkroom.jobs.db import read_tx, write_tx


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
        upsert = stmt.on_conflict_do_update(
            index_elements=["scope", "window"], set_={"count": rate_counters.c.count + 1}
        ).returning(rate_counters.c.count)
        return conn.execute(upsert).scalar_one()


def _day_start(now: dt.datetime) -> dt.datetime:
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


def _month_start(now: dt.datetime) -> dt.datetime:
    return _day_start(now).replace(day=1)


def usage(engine: sa.Engine, tenant: str, policy: TenantPolicy) -> dict:
    """A tenant's use against its limits, for `GET /v1/usage`."""
    with read_tx(engine) as conn:
        images, seconds = counters.read(conn, tenant, clock.utcnow())
    return {
        "images_today": images,
        "images_per_day": policy.images_per_day,
        "gpu_seconds_this_month": round(seconds, 3),
        "gpu_seconds_per_month": policy.gpu_seconds_per_month,
        "requests_per_minute": policy.requests_per_minute,
    }


def check_quotas(conn: sa.Connection, tenant: str, policy: TenantPolicy, images: int, images_today: int) -> None:
    """Inside the submit transaction, after the store charged the job's `images` (`images_today` is the day's total
    with them): refuse the job if that breaks the daily images or the month's GPU time is spent. Raising rolls the
    charge back with the job."""
    now = clock.utcnow()
    if policy.images_per_day and images_today > policy.images_per_day:
        used = images_today - images
        tomorrow = _day_start(now) + dt.timedelta(days=1)
        raise RateLimited(
            f"quota: {policy.images_per_day} images per day for tenant {tenant!r} "
            f"({used} used, {images} asked for); it resets at 00:00 UTC",
            limit=_limit("images_per_day", tenant, policy.images_per_day, used),
            retry_after=int((tomorrow - now).total_seconds()) + 1,
            code="quota_exceeded",
        )
    if policy.gpu_seconds_per_month:
        used_s = counters.gpu_seconds_this_month(conn, tenant, now)
        if used_s >= policy.gpu_seconds_per_month:
            following = (_month_start(now) + dt.timedelta(days=32)).replace(day=1)
            raise RateLimited(
                f"quota: {policy.gpu_seconds_per_month:g} GPU-seconds per month for tenant {tenant!r} "
                f"({used_s:.1f} used); it resets on the 1st, 00:00 UTC",
                limit=_limit("gpu_seconds_per_month", tenant, policy.gpu_seconds_per_month, round(used_s, 3)),
                retry_after=int((following - now).total_seconds()) + 1,
                code="quota_exceeded",
            )


def _limit(name: str, tenant: str, limit: float, used: float) -> dict:
    return {"name": name, "scope": f"tenant:{tenant}", "limit": limit, "used": used}
