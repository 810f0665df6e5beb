"""Usage counters: what quotas compare against, kept current by the transactions that create and finish jobs.

A quota check used to sum a tenant's jobs for the day (images) or the month (GPU-seconds): a scan that grows with
history, inside the submit's write lock. Here each is one row of `usage_counters` per tenant and period, changed in
the same transaction as the job it counts, so it can never disagree with the jobs:
- images: charged to the UTC day a job was created, given back when the job fails, dies or is cancelled;
- GPU-seconds: added to the UTC month in which a job succeeded.

The charge is an upsert that returns the new total. On PostgreSQL it also locks the tenant's row for the rest of the
transaction, so two submits of one tenant cannot both take the last image of the day (SQLite's write lock already
serialises them)."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from darkroom.auth.tables import usage_counters
from darkroom.jobs.prepared import Prepared


def day_period(at: dt.datetime) -> str:
    return f"d:{at:%Y-%m-%d}"


def month_period(at: dt.datetime) -> str:
    return f"m:{at:%Y-%m}"


def _add(conn: sa.Connection, tenant: str, period: str, *, images: int = 0, gpu_seconds: float = 0.0) -> sa.Row:
    params = {"b_tenant": tenant, "b_period": period, "b_images": images, "b_gpu_seconds": gpu_seconds}
    return _UPSERTS[conn.dialect.name == "postgresql"].execute(conn, params).one()


def _upsert(postgres: bool) -> sa.Insert:
    """Add to a counter row, creating it: built once per dialect and prepared (every submit runs it; building it
    per call was a measurable part of a submit's CPU)."""
    insert = postgresql.insert if postgres else sqlite.insert
    stmt = insert(usage_counters).values(
        tenant=sa.bindparam("b_tenant"),  # (a bind parameter may not share a column's name)
        period=sa.bindparam("b_period"),
        images=sa.bindparam("b_images"),
        gpu_seconds=sa.bindparam("b_gpu_seconds"),
    )
    return stmt.on_conflict_do_update(
        index_elements=["tenant", "period"],
        set_={
            "images": usage_counters.c.images + stmt.excluded.images,
            "gpu_seconds": usage_counters.c.gpu_seconds + stmt.excluded.gpu_seconds,
        },
    ).returning(usage_counters.c.images, usage_counters.c.gpu_seconds)


_UPSERTS = {False: Prepared(_upsert(False)), True: Prepared(_upsert(True))}  # by: PostgreSQL


def charge_images(conn: sa.Connection, tenant: str, created_at: dt.datetime, images: int) -> int:
    """Count a new job's images against its day; the day's total, this job included."""
    return int(_add(conn, tenant, day_period(created_at), images=images).images)


def give_back_images(conn: sa.Connection, tenant: str, created_at: dt.datetime, images: int) -> None:
    """A job that ends without images (failed, dead, cancelled) stops counting against the day it was created."""
    conn.execute(
        usage_counters.update()
        .where(usage_counters.c.tenant == tenant, usage_counters.c.period == day_period(created_at))
        .values(images=usage_counters.c.images - images)
    )


def add_gpu_seconds(conn: sa.Connection, tenant: str, finished_at: dt.datetime, seconds: float) -> None:
    _add(conn, tenant, month_period(finished_at), gpu_seconds=seconds)


def read(conn: sa.Connection, tenant: str, now: dt.datetime) -> tuple[int, float]:
    """(images today, GPU-seconds this month) in one statement."""
    rows = conn.execute(
        sa.select(usage_counters.c.period, usage_counters.c.images, usage_counters.c.gpu_seconds).where(
            usage_counters.c.tenant == tenant, usage_counters.c.period.in_((day_period(now), month_period(now)))
        )
    ).all()
    by_period = {r.period: r for r in rows}
    today, month = by_period.get(day_period(now)), by_period.get(month_period(now))
    return (int(today.images) if today else 0), (float(month.gpu_seconds) if month else 0.0)


def gpu_seconds_this_month(conn: sa.Connection, tenant: str, now: dt.datetime) -> float:
    return float(
        conn.execute(
            sa.select(usage_counters.c.gpu_seconds).where(
                usage_counters.c.tenant == tenant, usage_counters.c.period == month_period(now)
            )
        ).scalar()
        or 0.0
    )
