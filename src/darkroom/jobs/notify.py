"""Wake idle workers when work arrives.

On PostgreSQL a new job is announced with `NOTIFY darkroom_jobs` inside the transaction that creates it (delivered
on commit), and idle workers `LISTEN` on a connection of their own, so a worker wakes within milliseconds without
polling. A slow fallback poll remains for work that becomes due without an insert (a retry's backoff ends, a lease
expires). On SQLite, which has no notifications, idle workers poll every `poll_seconds`.
"""

from __future__ import annotations

import logging
import threading

import sqlalchemy as sa

log = logging.getLogger("darkroom.jobs")

CHANNEL = "darkroom_jobs"


def announce(conn: sa.Connection) -> None:
    """Call inside the transaction that made a job claimable."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_notify(:channel, '')"), {"channel": CHANNEL})


class Waiter:
    """Sleeps until work may be there: a NOTIFY (PostgreSQL), the timeout, or `stop`."""

    def __init__(self, url: str, stop: threading.Event) -> None:
        self.url = sa.engine.make_url(url)
        self.stop = stop
        self._conn = None

    @property
    def listens(self) -> bool:
        return self.url.get_backend_name() == "postgresql"

    def wait(self, timeout: float) -> None:
        if not self.listens:
            self.stop.wait(timeout)
            return
        try:
            conn = self._listen()
            for _ in conn.notifies(timeout=timeout, stop_after=1):
                pass
        except Exception as exc:  # the server restarted: reconnect on the next wait, poll meanwhile
            log.warning("LISTEN connection lost (%s); polling until it is back", type(exc).__name__)
            self.close()
            self.stop.wait(min(timeout, 1.0))

    def _listen(self):  # type: ignore[no-untyped-def]
        if self._conn is None:
            import psycopg

            dsn = self.url.set(drivername="postgresql").render_as_string(hide_password=False)
            self._conn = psycopg.connect(dsn, autocommit=True)
            self._conn.execute(f"LISTEN {CHANNEL}")
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None
