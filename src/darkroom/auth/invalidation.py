"""Cross-process invalidation of the auth caches (API keys, tenant policies).

Each process caches keys and policies for a few seconds, so a request costs no key or policy statements. A change
must still reach every process: on PostgreSQL the transaction that changes a key or a policy sends
`NOTIFY darkroom_cache, '<kind>:<id>'` (delivered on commit, never for a rolled-back change), and one thread per API
process LISTENs and drops the entry. When the LISTEN connection is lost, notices may have been missed, so every cache
is cleared on reconnect. SQLite has no notifications and one machine: there the caches' TTL is the bound.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

import sqlalchemy as sa

log = logging.getLogger("darkroom.auth")

CHANNEL = "darkroom_cache"


def announce(conn: sa.Connection, kind: str, ident: str) -> None:
    """Call inside the transaction that changed the `kind` (`key`, `tenant`) entry `ident`."""
    if conn.dialect.name == "postgresql":
        conn.execute(
            sa.text("SELECT pg_notify(:channel, :payload)"), {"channel": CHANNEL, "payload": f"{kind}:{ident}"}
        )


class Forgetful(Protocol):
    """What a cache offers the listener: drop one entry, or everything."""

    def forget(self, ident: str) -> None: ...

    def forget_all(self) -> None: ...


class Listener:
    """A daemon thread that LISTENs on its own connection and forwards each notice to the cache of its kind."""

    def __init__(self, url: str, caches: dict[str, Forgetful], *, reconnect_seconds: float = 1.0) -> None:
        self.url = sa.engine.make_url(url)
        self.caches = caches
        self.reconnect_seconds = reconnect_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="auth-cache-listener", daemon=True)
        self.listening = threading.Event()  # set while the LISTEN is in place (tests wait on it)

    def start(self) -> Listener:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        import psycopg

        dsn = self.url.set(drivername="postgresql").render_as_string(hide_password=False)
        while not self._stop.is_set():
            try:
                with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._forget_all()  # whatever changed while nobody listened
                    self.listening.set()
                    while not self._stop.is_set():
                        for notice in conn.notifies(timeout=0.5):
                            self._dispatch(notice.payload)
            except Exception as exc:  # the server went away: caches fall back to their TTL until it is back
                log.warning("auth cache LISTEN lost (%s); retrying", type(exc).__name__)
            finally:
                self.listening.clear()
            self._stop.wait(self.reconnect_seconds)

    def _dispatch(self, payload: str) -> None:
        kind, _, ident = payload.partition(":")
        cache = self.caches.get(kind)
        if cache is not None:
            cache.forget(ident)

    def _forget_all(self) -> None:
        for cache in self.caches.values():
            cache.forget_all()


def listen(url: str, caches: dict[str, Forgetful]) -> Listener | None:
    """Start a listener when the database can notify (PostgreSQL); None otherwise."""
    if sa.engine.make_url(url).get_backend_name() != "postgresql":
        return None
    return Listener(url, caches).start()
