"""The delivery log in the database: which events are owed to which URL, claims with a lease, and every attempt.

A delivery row is created once per (job, event) — the unique constraint makes that true even with several API
processes scanning the same events — and is claimed with a lease before it is sent, so one dispatcher sends it.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from darkroom import clock
from darkroom.jobs.db import read_tx, write_tx
from darkroom.jobs.store import job_event
from darkroom.jobs.tables import job_events, jobs
from darkroom.schemas import JobEvent
from darkroom.webhooks.tables import webhook_deliveries as wd

log = logging.getLogger("darkroom.webhooks")

COMPLETED = frozenset({"succeeded", "failed", "cancelled", "dead"})
PENDING, DELIVERING, DELIVERED, FAILED, REFUSED = "pending", "delivering", "delivered", "failed", "refused"


_UNPRINTABLE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def printable(text: str) -> str:
    """`text` with control characters (NUL first of all, which PostgreSQL text cannot hold) written as `\\xNN`."""
    return _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def wanted_events(names: Iterable[str]) -> set[str]:
    """`completed` stands for every way a job ends."""
    out: set[str] = set()
    for name in names:
        out |= COMPLETED if name == "completed" else {name}
    return out


@dataclass(frozen=True)
class Delivery:
    id: str
    job_id: str
    event_id: int
    event: str
    url: str
    state: str
    attempts: int
    payload: dict[str, Any]
    log: list[dict[str, Any]]
    last_status: int | None
    last_error: str | None
    next_attempt_at: dt.datetime
    created_at: dt.datetime
    updated_at: dt.datetime
    delivered_at: dt.datetime | None

    @classmethod
    def from_row(cls, row: sa.Row) -> Delivery:
        m = row._mapping
        stamps = ("next_attempt_at", "created_at", "updated_at", "delivered_at")
        times: dict[str, Any] = {k: clock.aware(m[k]) for k in stamps}
        plain = ("id", "job_id", "event_id", "event", "url", "state", "attempts", "payload", "log")
        return cls(**{k: m[k] for k in plain}, last_status=m["last_status"], last_error=m["last_error"], **times)

    def public(self) -> dict[str, Any]:
        """What `GET /v1/jobs/{id}/webhooks` shows: everything but the payload (the job itself is one GET away)."""
        return {
            "id": self.id,
            "event": self.event,
            "event_id": self.event_id,
            "url": self.url,
            "state": self.state,
            "attempts": self.attempts,
            "last_status": self.last_status,
            "last_error": self.last_error,
            "next_attempt_at": self.next_attempt_at.isoformat() if self.state == PENDING else None,
            "created_at": self.created_at.isoformat(),
            "delivered_at": self.delivered_at.isoformat() if self.delivered_at else None,
            "log": [{k: v for k, v in entry.items() if k != "address"} for entry in self.log],  # older rows had it
        }


@dataclass(frozen=True)
class Outcome:
    """How one attempt went, and what the row becomes."""

    state: str
    status: int | None = None
    error: str | None = None
    duration_ms: float = 0.0
    address: str | None = None
    retry_at: dt.datetime | None = None


class DeliveryStore:
    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    # --- finding what is owed -------------------------------------------------------------------------------------

    def events_after(self, after: int, limit: int = 1000) -> list[JobEvent]:
        """Events of every job with a global id above `after`, oldest first (the dispatcher's scan)."""
        query = sa.select(job_events).where(job_events.c.id > after).order_by(job_events.c.id).limit(limit)
        with read_tx(self.engine) as conn:
            rows = conn.execute(query).all()
        return [job_event(r) for r in rows]

    def jobs_with_webhooks(self, job_ids: set[str]) -> dict[str, sa.RowMapping]:
        if not job_ids:
            return {}
        query = sa.select(
            jobs.c.id, jobs.c.request, jobs.c.request_id, jobs.c.state, jobs.c.progress_step, jobs.c.progress_total,
            jobs.c.error,
        ).where(jobs.c.id.in_(job_ids))  # fmt: skip
        with read_tx(self.engine) as conn:
            rows = conn.execute(query).all()
        return {r.id: r._mapping for r in rows if (r.request or {}).get("webhook_url")}

    def known(self, job_ids: set[str]) -> set[tuple[str, int]]:
        if not job_ids:
            return set()
        query = sa.select(wd.c.job_id, wd.c.event_id).where(wd.c.job_id.in_(job_ids))
        with read_tx(self.engine) as conn:
            return {(r.job_id, r.event_id) for r in conn.execute(query)}

    def enqueue(self, rows: list[dict[str, Any]]) -> int:
        """Insert new deliveries in one transaction. If that fails — another dispatcher inserted one of them first,
        or the database refuses a row's content — fall back to one row at a time: rows another dispatcher has are
        skipped, and a row the database refuses is isolated (`isolate`), so one bad row never stops the scan."""
        if not rows:
            return 0
        now = clock.utcnow()
        common = {"state": PENDING, "attempts": 0, "log": [], "next_attempt_at": now, "created_at": now}
        full = [{**common, "updated_at": now, **row} for row in rows]
        try:
            with write_tx(self.engine) as conn:
                conn.execute(wd.insert(), full)
            return len(full)
        except (sa.exc.IntegrityError, sa.exc.DataError, sa.exc.StatementError):
            pass
        added = 0
        for values in full:
            try:
                with write_tx(self.engine) as conn:
                    conn.execute(wd.insert().values(**values))
                added += 1
            except sa.exc.IntegrityError:
                continue
            except (sa.exc.DataError, sa.exc.StatementError) as exc:
                added += self.isolate(values, exc)
        return added

    def isolate(self, values: dict[str, Any], exc: Exception) -> int:
        """Record a delivery the database would not store as `failed`, with printable stand-ins for what it refused
        (PostgreSQL stores no NUL in text) and the reason. It is never sent. 0 if even that cannot be stored."""
        reason = f"not deliverable: the database refused the delivery row ({type(getattr(exc, 'orig', exc)).__name__})"
        log.error("webhook delivery for job %s event %s isolated: %s", values["job_id"], values["event_id"], exc)
        stand_in = {
            **values,
            "url": printable(values["url"])[:2000],
            "payload": {"job_id": values["job_id"], "event_id": values["event_id"]},
            "state": FAILED,
            "last_error": reason,
            "log": [{"attempt": 0, "at": values["created_at"].isoformat(), "status": None, "error": reason}],
        }
        try:
            with write_tx(self.engine) as conn:
                conn.execute(wd.insert().values(**stand_in))
            return 1
        except sa.exc.DBAPIError:
            log.exception("webhook delivery for job %s could not be isolated either; skipped", values["job_id"])
            return 0

    # --- sending --------------------------------------------------------------------------------------------------

    def claim_due(self, owner: str, lease_seconds: float, limit: int) -> list[Delivery]:
        now = clock.utcnow()
        due = sa.or_(
            sa.and_(wd.c.state == PENDING, wd.c.next_attempt_at <= now),
            sa.and_(wd.c.state == DELIVERING, wd.c.lease_expires_at < now),  # its dispatcher died mid-attempt
        )
        pick = sa.select(wd.c.id).where(due).order_by(wd.c.next_attempt_at).limit(limit)
        pick = pick.with_for_update(skip_locked=True)
        lease = {"state": DELIVERING, "lease_owner": owner, "updated_at": now}
        with write_tx(self.engine) as conn:
            ids = [r.id for r in conn.execute(pick)]
            claimed = [
                i
                for i in ids
                if conn.execute(
                    wd.update()
                    .where(wd.c.id == i, due)
                    .values(**lease, lease_expires_at=now + dt.timedelta(seconds=lease_seconds))
                ).rowcount
            ]
            rows = conn.execute(sa.select(wd).where(wd.c.id.in_(claimed))).all() if claimed else []
        return [Delivery.from_row(r) for r in rows]

    def record(self, delivery: Delivery, owner: str, outcome: Outcome) -> bool:
        """Write one attempt's result; False if our lease was taken over (then the other dispatcher owns the row)."""
        now = clock.utcnow()
        error = printable(outcome.error) if outcome.error is not None else None  # a receiver's body may hold NUL
        entry = {
            "attempt": delivery.attempts + 1,
            "at": now.isoformat(),
            "status": outcome.status,
            "error": error,
            "duration_ms": round(outcome.duration_ms, 1),
        }
        values: dict[str, Any] = {
            "state": outcome.state,
            "attempts": delivery.attempts + 1,
            "log": [*delivery.log, entry][-50:],
            "last_status": outcome.status,
            "last_error": error,
            "lease_owner": None,
            "lease_expires_at": None,
            "updated_at": now,
        }
        if outcome.state == DELIVERED:
            values["delivered_at"] = now
        if outcome.retry_at is not None:
            values["next_attempt_at"] = outcome.retry_at
        guard = (wd.c.id == delivery.id, wd.c.lease_owner == owner, wd.c.state == DELIVERING)
        with write_tx(self.engine) as conn:
            return bool(conn.execute(wd.update().where(*guard).values(**values)).rowcount)

    # --- reading --------------------------------------------------------------------------------------------------

    def for_job(self, job_id: str) -> list[Delivery]:
        query = sa.select(wd).where(wd.c.job_id == job_id).order_by(wd.c.event_id)
        with read_tx(self.engine) as conn:
            return [Delivery.from_row(r) for r in conn.execute(query)]
