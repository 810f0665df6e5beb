"""Server-side UI sessions, kept in the shared `settings_kv` table (see `darkroom.kv`).

A session is a random id in an HttpOnly cookie; the row is keyed by the id's SHA-256, so a database dump does not hand
out live cookies. The row names the API key the user signed in with and the session's CSRF token. It lives in the
database, not in process memory, so every API process behind a load balancer sees it, and logout (or expiry) ends it
everywhere at once. The key itself is re-checked on every request: revoking it ends its sessions too.

Expiry is absolute (from sign-in), measured on the row's `updated_at`: expired rows are deleted when someone signs in,
which keeps the table to about the sessions of one lifetime without a sweeper thread.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from dataclasses import dataclass

import sqlalchemy as sa

from darkroom import clock
from darkroom.jobs.db import read_tx, write_tx
from darkroom.webhooks.tables import settings_kv

PREFIX = "ui_session:"


@dataclass(frozen=True)
class Session:
    key_id: str | None  # None: the keyless local owner (no keys exist and the service is on loopback)
    csrf: str
    started_at: dt.datetime

    def csrf_ok(self, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf, token or "")


def _row_key(session_id: str) -> str:
    return PREFIX + hashlib.sha256(session_id.encode()).hexdigest()


class SessionStore:
    def __init__(self, engine: sa.Engine, lifetime: dt.timedelta) -> None:
        self.engine = engine
        self.lifetime = lifetime

    def create(self, key_id: str | None) -> tuple[str, Session]:
        """A new session (and the cookie value that names it); drops every expired one on the way."""
        session_id = secrets.token_urlsafe(32)
        now = clock.utcnow()
        session = Session(key_id=key_id, csrf=secrets.token_urlsafe(32), started_at=now)
        value = {"key_id": key_id, "csrf": session.csrf}
        with write_tx(self.engine) as conn:
            conn.execute(
                settings_kv.delete().where(
                    settings_kv.c.key.startswith(PREFIX), settings_kv.c.updated_at < now - self.lifetime
                )
            )
            conn.execute(settings_kv.insert().values(key=_row_key(session_id), value=value, updated_at=now))
        return session_id, session

    def get(self, session_id: str | None) -> Session | None:
        """The live session the cookie names, or None (unknown, malformed or expired)."""
        if not session_id or len(session_id) > 100:
            return None
        with read_tx(self.engine) as conn:
            row = conn.execute(
                sa.select(settings_kv.c.value, settings_kv.c.updated_at).where(
                    settings_kv.c.key == _row_key(session_id)
                )
            ).first()
        if row is None:
            return None
        started = clock.aware(row.updated_at)
        if started is None or started + self.lifetime <= clock.utcnow():
            return None
        return Session(key_id=row.value.get("key_id"), csrf=row.value["csrf"], started_at=started)

    def delete(self, session_id: str | None) -> None:
        if session_id:
            with write_tx(self.engine) as conn:
                conn.execute(settings_kv.delete().where(settings_kv.c.key == _row_key(session_id)))
