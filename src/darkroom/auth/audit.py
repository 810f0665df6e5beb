"""The audit log: who did what, when, from where, under which request id. Append-only (the database refuses UPDATE
and DELETE on the table, see migration 0005), and written in the same transaction as the change it records wherever
the change is a database write, so a change without its record cannot exist."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import sqlalchemy as sa

from darkroom import clock
from darkroom.auth.principal import Principal
from darkroom.auth.tables import audit_log
from darkroom.jobs.db import read_tx, write_tx
from darkroom.jobs.prepared import PreparedInsert


@dataclass(frozen=True)
class AuditRecord:
    id: int
    at: dt.datetime
    actor: str
    role: str | None
    tenant: str | None
    action: str
    target: str | None
    outcome: str
    ip: str | None
    request_id: str | None
    details: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["at"] = self.at.isoformat()
        return out


_INSERT = PreparedInsert(audit_log)


def record(
    conn: sa.Connection,
    who: Principal,
    action: str,
    target: str | None = None,
    details: dict[str, Any] | None = None,
    *,
    outcome: str = "ok",
    tenant: str | None = None,
) -> None:
    """Append one record inside the caller's transaction. `tenant`: the tenant acted on, when not the caller's."""
    _INSERT.execute(  # prepared: every submit writes one
        conn,
        {
            "at": clock.utcnow(),
            "actor": who.actor,
            "role": who.role.value,
            "tenant": tenant or who.tenant,
            "action": action,
            "target": target,
            "outcome": outcome,
            "ip": who.ip,
            "request_id": who.request_id,
            "details": details or {},
        },
    )


class AuditLog:
    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def denied_login(self, key_id: str | None, ip: str | None, request_id: str | None, reason: str) -> None:
        """A failed authentication: the key id it claimed (ids are not secret), where from, and why."""
        with write_tx(self.engine) as conn:
            conn.execute(
                audit_log.insert().values(
                    at=clock.utcnow(),
                    actor=(key_id or "anonymous")[:64],
                    role=None,
                    tenant=None,
                    action="auth.login",
                    target=key_id,
                    outcome="denied",
                    ip=ip,
                    request_id=request_id,
                    details={"reason": reason},
                )
            )

    def denied_logins_summary(self, ip: str | None, details: dict[str, Any]) -> None:
        """Failed logins from one address that were counted, not recorded one by one (auth/failures.py)."""
        with write_tx(self.engine) as conn:
            conn.execute(
                audit_log.insert().values(
                    at=clock.utcnow(),
                    actor="anonymous",
                    role=None,
                    tenant=None,
                    action="auth.login",
                    target=None,
                    outcome="denied",
                    ip=ip,
                    request_id=None,
                    details={"summary": True, **details},
                )
            )

    def record(self, who: Principal, action: str, target: str | None = None, details: dict | None = None, **kw: Any):
        """Append one record in its own transaction (for changes that are not a database write of ours)."""
        with write_tx(self.engine) as conn:
            record(conn, who, action, target, details, **kw)

    def list(
        self,
        *,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        action: str | None = None,
        tenant: str | None = None,
        actor: str | None = None,
        after_id: int = 0,
        limit: int = 100,
    ) -> list[AuditRecord]:
        """Oldest first from `after_id`, so a client pages with the last id it saw."""
        query = sa.select(audit_log).where(audit_log.c.id > after_id).order_by(audit_log.c.id).limit(limit)
        if since is not None:
            query = query.where(audit_log.c.at >= since)
        if until is not None:
            query = query.where(audit_log.c.at < until)
        if action is not None:
            # `job.` matches every job action; `job.submit` only that one.
            query = query.where(
                audit_log.c.action.startswith(action) if action.endswith(".") else audit_log.c.action == action
            )
        if tenant is not None:
            query = query.where(audit_log.c.tenant == tenant)
        if actor is not None:
            query = query.where(audit_log.c.actor == actor)
        with read_tx(self.engine) as conn:
            return [_record(r) for r in conn.execute(query)]

    def export(self, **filters: Any) -> Iterator[AuditRecord]:
        """Every matching record, in pages."""
        after = 0
        while True:
            page = self.list(after_id=after, limit=1000, **filters)
            yield from page
            if len(page) < 1000:
                return
            after = page[-1].id


def _record(row: sa.Row) -> AuditRecord:
    m = dict(row._mapping)
    m["at"] = clock.aware(m["at"])
    return AuditRecord(**m)
