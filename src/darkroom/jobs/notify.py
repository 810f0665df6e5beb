"""Wake whoever waits on the job store, without a polling loop per waiter.

A process holds one `ChangeFeed`. Its single thread tails `job_events` by id (one SELECT for all new events, whoever
they are for) and hands each event to the subscriptions for its job (a `/v1/generate` call, an SSE stream, a compat
route) and, for events that make work claimable, to the idle workers' wake-ups. Waiters therefore cost nothing while
nothing happens, and one read serves all of them.

What makes the feed read:
- PostgreSQL: `NOTIFY darkroom_jobs` in every transaction that writes an event (`announce`), heard on a LISTEN
  connection of the feed's own (this process's commits included), plus a slow fallback read in case a notice was lost
  while reconnecting;
- SQLite, a write committed in this process: when a connection goes back to the store's pool (after its commit, so
  the rows are visible) and SQLite's `total_changes` counter for it moved, a pool listener pokes the feed. Read-only
  transactions never poke;
- SQLite, written by other processes: their doorbell (`darkroom.jobs.doorbell`: a datagram each process on the
  database sends after it commits a write), and as a fallback `PRAGMA data_version` on a dedicated connection,
  checked every `check_seconds`. It changes only when another connection commits, so an idle database costs one tiny
  pragma per tick. The tick only catches what rang no bell (a peer that started less than a second ago, a command
  line tool's write), so it is slow by default (0.25 s); where there is no doorbell it runs every
  `UNBELLED_CHECK_SECONDS`. (At 15 ms the tick cost each process about 1.5 % of a core, idle or not: a tenth of the
  service's CPU per image in the sequential benchmark.)

Event ids are handed out at insert and become visible at commit, which on PostgreSQL can happen out of id order. The
feed therefore keeps reading from the lowest id it has not seen yet and gives a gap up only after `gap_seconds` (a
rolled-back insert never fills it). On SQLite, where writers are serialised, ids commit in order and no gap waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import select
import threading
from collections import deque
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite

from darkroom import clock
from darkroom.jobs.db import create_engine, on_checkin
from darkroom.jobs.doorbell import Doorbell
from darkroom.jobs.tables import job_events
from darkroom.schemas import JobEvent

log = logging.getLogger("darkroom.jobs")

CHANNEL = "darkroom_jobs"
WORK_EVENTS = frozenset({"queued", "requeued", "retrying"})  # a job became (or will become) claimable
TERMINAL_EVENTS = frozenset({"succeeded", "failed", "cancelled", "dead"})
_ANNOUNCED = "darkroom_announced"
_CHANGES = "darkroom_total_changes"
_READ_LIMIT = 1000
UNBELLED_CHECK_SECONDS = 0.015  # SQLite without a doorbell: the tick is the only word of other processes' commits
# The feed's one read, built once: it runs after every commit anywhere on the database.
_NEWER_EVENTS = (
    sa.select(job_events.c.id, job_events.c.job_id, job_events.c.type, job_events.c.data, job_events.c.created_at)
    .where(job_events.c.id > sa.bindparam("low"))
    .order_by(job_events.c.id)
    .limit(_READ_LIMIT)
)
# ... and as SQLite's text with its positional parameters, for the feed's raw cursor (`_new_rows`).
_NEWER_EVENTS_SQLITE = _NEWER_EVENTS.compile(dialect=sqlite.dialect())
_NEWER_EVENTS_SQLITE_TEXT = str(_NEWER_EVENTS_SQLITE)


def _newer_events_args(low: int) -> tuple[Any, ...]:
    params = {**_NEWER_EVENTS_SQLITE.params, "low": low}
    return tuple(params[name] for name in _NEWER_EVENTS_SQLITE.positiontup or ())


def announce(conn: sa.Connection) -> None:
    """Call inside a transaction that wrote an event or made a job claimable: PostgreSQL delivers the notice on
    commit (never for a rollback). Sent once per transaction; SQLite needs nothing (see `ChangeFeed`)."""
    if conn.dialect.name != "postgresql":
        return
    transaction = conn.get_transaction()
    if transaction is not None and conn.info.get(_ANNOUNCED) is transaction:
        return
    conn.execute(sa.text("SELECT pg_notify(:channel, '')"), {"channel": CHANNEL})
    conn.info[_ANNOUNCED] = transaction


class Subscription:
    """One waiter's inbox for one job's events, filled by the feed thread.

    Subscribe *before* reading the job's current state or past events: whatever commits after that read reaches the
    inbox, and whatever committed before it the read shows. Works from a thread (`next_sync`) and from asyncio
    (`next`: the feed wakes the loop with `call_soon_threadsafe`)."""

    def __init__(self, feed: ChangeFeed, job_id: str, types: Collection[str] | None) -> None:
        self.feed, self.job_id = feed, job_id
        self.types = frozenset(types) if types is not None else None
        self._events: deque[JobEvent] = deque()
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._async_ready: asyncio.Event | None = None

    def deliver(self, event: JobEvent) -> None:
        """Feed thread: queue the event and wake the waiter."""
        if self.types is not None and event.type not in self.types:
            return
        with self._lock:
            self._events.append(event)
            loop, ready = self._loop, self._async_ready
        self._ready.set()
        if loop is not None and ready is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting any more
                loop.call_soon_threadsafe(ready.set)

    def take(self) -> list[JobEvent]:
        with self._lock:
            events = list(self._events)
            self._events.clear()
        return events

    async def next(self, timeout: float) -> list[JobEvent]:
        """The events that arrived, waiting up to `timeout` seconds for one; [] on timeout."""
        with self._lock:
            if self._async_ready is None:
                self._loop, self._async_ready = asyncio.get_running_loop(), asyncio.Event()
            ready = self._async_ready
            ready.clear()
            pending = bool(self._events)
        if not pending:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ready.wait(), timeout)
        return self.take()

    def next_sync(self, timeout: float) -> list[JobEvent]:
        self._ready.clear()
        if not self._events:
            self._ready.wait(timeout)
        return self.take()

    def close(self) -> None:
        self.feed.unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ChangeFeed:
    """The process's one reader of `job_events` (see the module docstring). Starts on first use; `close` stops it."""

    def __init__(
        self,
        url: str,
        engine: sa.Engine | None = None,
        *,
        check_seconds: float = 0.25,
        fallback_seconds: float = 1.0,
        gap_seconds: float = 5.0,
    ) -> None:
        """`engine`: the store's engine, whose commits poke the feed (it reads through an engine of its own)."""
        self.url = url
        self.postgres = sa.engine.make_url(url).get_backend_name() == "postgresql"
        self.check_seconds = check_seconds
        self.fallback_seconds = fallback_seconds
        self.gap_seconds = gap_seconds if self.postgres else 0.0
        self._watched = engine
        self._unwatch: Callable[[], None] | None = None
        self._engine = create_engine(url)
        self._subs: dict[str, set[Subscription]] = {}
        self._listeners: list[tuple[frozenset[str], Callable[[], None]]] = []
        self._lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._poke_pending = False
        self._low = 0  # every id up to here was dispatched (or given up as a gap)
        self._seen: set[int] = set()  # ids above `_low` already dispatched
        self._gaps: dict[int, float] = {}  # ids above `_low` not seen yet → when first missed
        self._version: int | None = None
        self._sqlite: Any = None  # the dedicated DBAPI connection that reads data_version
        self._listen: Any = None  # the psycopg LISTEN connection
        self._bell: Doorbell | None = None  # SQLite: rung by, and ringing, the other processes on the database
        self.reads = 0  # SELECTs of new events so far (tests and metrics)
        self.checks = 0  # SQLite: data_version checks so far

    # --- subscribing ------------------------------------------------------------------------------------------------

    def subscribe(self, job_id: str, types: Collection[str] | None = None) -> Subscription:
        """An inbox for `job_id`'s events (only `types`, when given). Close it when done (or use `with`)."""
        self.start()
        sub = Subscription(self, job_id, types)
        with self._lock:
            self._subs.setdefault(job_id, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            subs = self._subs.get(sub.job_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs[sub.job_id]

    def on_work(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` (from the feed thread; keep it short) whenever a job becomes claimable. Returns the
        function that stops it."""
        return self.on_events(WORK_EVENTS, callback)

    def on_events(self, types: Collection[str], callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` (from the feed thread; keep it short) when any job gets an event of one of `types`: how a
        background loop (workers, the webhook dispatcher) sleeps until it has something to do. Returns the function
        that stops it."""
        self.start()
        entry = (frozenset(types), callback)
        with self._lock:
            self._listeners.append(entry)

        def cancel() -> None:
            with self._lock, contextlib.suppress(ValueError):
                self._listeners.remove(entry)

        return cancel

    def poke(self) -> None:
        """Something committed in this process: read now rather than at the next tick."""
        if not self._poke_pending:
            self._poke_pending = True
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")

    # --- life cycle -------------------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> ChangeFeed:
        """Idempotent. The starting point (the newest event id) and the LISTEN are set up here, before returning,
        so a subscription made right after misses nothing."""
        if self._thread is not None:
            return self
        with self._start_lock:
            if self._thread is not None:
                return self
            if self.postgres:
                self._connect_listen()
            else:
                self._version = self._data_version()
                self._bell = _doorbell(self.url)
            with self._engine.connect() as conn:
                self._low = conn.execute(sa.select(sa.func.max(job_events.c.id))).scalar() or 0
            if self._watched is not None and not self.postgres:
                self._unwatch = on_checkin(self._watched, self._on_checkin)
            self._thread = threading.Thread(target=self._run, name="darkroom-feed", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self.poke()
        self._poke_pending = True  # from now on a poke writes nothing: the pipe is about to close
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._unwatch is not None:
            self._unwatch()
        for conn in (self._sqlite, self._listen):
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
        self._sqlite = self._listen = None
        if self._bell is not None:
            self._bell.close()
        self._engine.dispose()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _on_checkin(self, dbapi_conn: Any, record: Any) -> None:
        """A connection is back in the pool, its transaction over: poke if it wrote anything since last time.
        (SQLAlchemy's `commit` event would be too early: it fires before the commit makes the rows visible.)"""
        changes = getattr(dbapi_conn, "total_changes", None)
        if changes is None or record is None:
            return
        if record.info.get(_CHANGES) != changes:
            record.info[_CHANGES] = changes
            self.poke()
            if self._bell is not None:
                self._bell.ring()

    # --- the feed thread --------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self._changed():
                    self._read()
            except Exception:  # the database went away for a moment: waiters time out and retry; we carry on
                log.exception("change feed: read failed")
                self._drop_connections()
                self._stop.wait(min(1.0, self.fallback_seconds))

    def _changed(self) -> bool:
        """Wait for the next reason to read; False when nothing can have changed."""
        watch = [self._wake_r]
        if self._listen is not None:
            watch.append(self._listen.pgconn.socket)
        if self._bell is not None:
            watch.append(self._bell.fileno())
        if self.postgres:
            timeout = self.fallback_seconds
        else:
            timeout = self.check_seconds if self._bell is not None else min(self.check_seconds, UNBELLED_CHECK_SECONDS)
        readable, _, _ = select.select(watch, [], [], timeout)
        poked = self._wake_r in readable
        if poked:
            self._poke_pending = False
            with contextlib.suppress(BlockingIOError, OSError):
                os.read(self._wake_r, 4096)
        if self._bell is not None and self._bell.fileno() in readable:
            self._bell.drain()
        if self.postgres:
            if self._listen is None:
                self._connect_listen()
            elif len(readable) > int(poked):
                for _ in self._listen.notifies(timeout=0):
                    pass
            return True  # a notice, a poke or the fallback tick: one cheap read either way
        version = self._data_version()
        changed = version != self._version
        self._version = version
        return changed

    def _data_version(self) -> int:
        self.checks += 1
        cur = self._raw().cursor()
        try:
            cur.execute("PRAGMA data_version")
            return int(cur.fetchone()[0])
        finally:
            cur.close()

    def _raw(self) -> Any:
        """SQLite: the feed's own DBAPI connection (autocommit), for `data_version` and the read of new events."""
        if self._sqlite is None:
            self._sqlite = self._engine.raw_connection()
        return self._sqlite

    def _connect_listen(self) -> None:
        import psycopg

        dsn = sa.engine.make_url(self.url).set(drivername="postgresql").render_as_string(hide_password=False)
        try:
            conn = psycopg.connect(dsn, autocommit=True, connect_timeout=5)
            conn.execute(f"LISTEN {CHANNEL}")
            self._listen = conn
        except Exception as exc:  # the fallback read every `fallback_seconds` covers the time without it
            log.warning("change feed: LISTEN unavailable (%s); reading every %g s", exc, self.fallback_seconds)

    def _drop_connections(self) -> None:
        for name in ("_sqlite", "_listen"):
            conn = getattr(self, name)
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
                setattr(self, name, None)

    def _read(self) -> None:
        rows = self._new_rows()
        self.reads += 1
        for event_id, job_id, type_, data, created_at in rows:
            if event_id in self._seen:
                continue
            self._seen.add(event_id)
            # Rows the store wrote, read back as they were written: built without validating them again.
            event = JobEvent.model_construct(
                id=event_id, job_id=job_id, type=type_, data=data, created_at=clock.aware(created_at)
            )
            self._dispatch(event)
        self._advance()
        if len(rows) == _READ_LIMIT:
            self.poke()  # more to read: go round again at once

    def _new_rows(self) -> list[tuple[int, str, str, dict[str, Any], dt.datetime]]:
        """The events after `_low`, oldest first. On SQLite they are read on the feed's own connection (the one that
        checks `data_version`), through a plain cursor: every feed reads after every commit on the database, and
        SQLAlchemy's checkout, result processing and rollback were most of such a read's CPU (measured per thread over
        40 sequential jobs: the two processes' feeds took 7.75 ms of CPU per job through SQLAlchemy, 3.5 ms so)."""
        if not self.postgres:
            cur = self._raw().cursor()
            try:
                cur.execute(_NEWER_EVENTS_SQLITE_TEXT, _newer_events_args(self._low))
                found = cur.fetchall()
            finally:
                cur.close()
            # As SQLAlchemy's JSON and DateTime types store them on SQLite: JSON text, ISO text in UTC.
            return [(i, j, t, json.loads(d), dt.datetime.fromisoformat(c)) for i, j, t, d, c in found]
        with self._engine.connect() as conn:
            rows = conn.execute(_NEWER_EVENTS, {"low": self._low}).all()
            conn.rollback()
        return [(r.id, r.job_id, r.type, r.data, r.created_at) for r in rows]

    def _advance(self) -> None:
        """Move `_low` over every id seen, and over gaps older than `gap_seconds`."""
        top = max(self._seen, default=self._low)
        now = clock.monotonic()
        if top - self._low > 100_000:  # ids jumped (a sequence reset): nothing in between is coming
            self._low, self._seen, self._gaps = top, set(), {}
            return
        for missing in range(self._low + 1, top):
            if missing not in self._seen:
                self._gaps.setdefault(missing, now)
        while self._low < top:
            nxt = self._low + 1
            if nxt in self._seen:
                self._seen.discard(nxt)
            elif now - self._gaps.get(nxt, now) >= self.gap_seconds:
                self._gaps.pop(nxt, None)
            else:
                break
            self._low = nxt

    def _dispatch(self, event: JobEvent) -> None:
        with self._lock:
            subs = list(self._subs.get(event.job_id, ()))
            listeners = [callback for types, callback in self._listeners if event.type in types]
        for sub in subs:
            sub.deliver(event)
        for callback in listeners:
            try:
                callback()
            except Exception:
                log.exception("change feed: listener failed")


class Waiter:
    """Sleeps until work may be there: a NOTIFY (PostgreSQL), the timeout, or `stop`. A single-purpose listener for
    tools that run without a `ChangeFeed`; workers use the feed."""

    def __init__(self, url: str, stop: threading.Event) -> None:
        self.url = sa.engine.make_url(url)
        self.stop = stop
        self._conn: Any = None  # psycopg.Connection, made on first use

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

    def _listen(self) -> Any:
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


def _doorbell(url: str) -> Doorbell | None:
    """The doorbell of a SQLite file database (none in memory, none where the platform has no abstract sockets)."""
    database = sa.engine.make_url(url).database
    if not Doorbell.available() or not database or database == ":memory:" or database.startswith("file:"):
        return None
    try:
        return Doorbell(Path(database))
    except OSError as exc:  # a read-only folder, say: the data_version tick still works
        log.warning("change feed: no doorbell for %s (%s); other processes' commits are seen on the tick", url, exc)
        return None
