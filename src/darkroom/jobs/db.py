"""Database engine and schema migrations.

SQLite is the embedded default, PostgreSQL the multi-node one; the difference stays in this file. On SQLite every
write transaction starts with `BEGIN IMMEDIATE`, so concurrent writers (API and worker processes) queue on the
busy timeout instead of failing with "database is locked" when a read lock cannot be upgraded.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext

log = logging.getLogger(__name__)
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_WRITE = "darkroom_write"


def create_engine(url: str) -> sa.Engine:
    if url.startswith("sqlite"):
        return _sqlite_engine(url)
    return sa.create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def _sqlite_engine(url: str) -> sa.Engine:
    # Request threads (40 by default) each hold a connection while they work. SQLAlchemy's default pool keeps 5 and
    # closes what it lent beyond them, so under load most requests opened a fresh connection and ran the pragmas
    # below again (measured: 2% of an API process's CPU at 16 clients). Idle SQLite connections cost a file handle.
    database = sa.engine.make_url(url).database
    pool = {"pool_size": 48, "max_overflow": 16} if database and database != ":memory:" else {}  # a file, pooled
    engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, **pool)

    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.info.pop(_WRITE, False) else "BEGIN")

    _checkin_hooks(engine)  # its one pool listener, added before any thread uses the engine
    return engine


CheckinHook = Callable[[Any, Any], None]


class _CheckinHooks:
    """One `checkin` pool listener per engine, calling whoever subscribed.

    SQLAlchemy keeps an event's listeners in a deque that it iterates on every checkin. Adding or removing a listener
    while another thread checks a connection in fails that thread with "deque mutated during iteration", so feeds
    that start and stop while workers run must not touch the engine's listeners. They change this tuple instead,
    which is replaced whole (under a lock) and read without one."""

    def __init__(self) -> None:
        self.hooks: tuple[CheckinHook, ...] = ()
        self.lock = threading.Lock()

    def __call__(self, dbapi_conn: Any, record: Any) -> None:
        for hook in self.hooks:
            hook(dbapi_conn, record)


_checkins: weakref.WeakKeyDictionary[sa.Engine, _CheckinHooks] = weakref.WeakKeyDictionary()
_checkins_lock = threading.Lock()


def _checkin_hooks(engine: sa.Engine) -> _CheckinHooks:
    with _checkins_lock:
        hooks = _checkins.get(engine)
        if hooks is None:  # an engine made elsewhere: its listener is added now, once
            hooks = _checkins[engine] = _CheckinHooks()
            sa.event.listen(engine, "checkin", hooks)
        return hooks


def on_checkin(engine: sa.Engine, hook: CheckinHook) -> Callable[[], None]:
    """Call `hook(dbapi_connection, record)` whenever a connection goes back to the engine's pool (its transaction
    over, its rows visible). Returns the function that unsubscribes. Safe while other threads use the engine."""
    hooks = _checkin_hooks(engine)
    with hooks.lock:
        hooks.hooks = (*hooks.hooks, hook)

    def cancel() -> None:
        with hooks.lock:
            hooks.hooks = tuple(h for h in hooks.hooks if h is not hook)

    return cancel


@contextlib.contextmanager
def write_tx(engine: sa.Engine) -> Iterator[sa.Connection]:
    """A transaction that will write: on SQLite it takes the write lock up front, after queueing for it
    (`_WriterQueue`)."""
    queue = _writer_queue(engine) if engine.dialect.name == "sqlite" else None
    with queue or contextlib.nullcontext(), engine.connect() as conn:
        conn.info[_WRITE] = True
        with conn.begin():
            yield conn


class _WriterQueue:
    """Where SQLite writers wait their turn: this process's threads on a lock, then the processes on a file lock.

    SQLite lets one writer in at a time, and a writer that finds the database locked sleeps in its busy handler (1,
    2, 5 … up to 100 ms between tries), so under load most of a write's latency was that sleeping, not work:
    measured with 16 clients on one API process, p99 2.3 s, and with two API processes on one database, p99
    0.4-0.6 s against 0.1 s queued here. Queued on a lock, the next writer starts the moment the last one commits.
    The threads of a process queue on a thread lock, so only one of them waits on the file lock (`flock` beside the
    database); the kernel wakes the next process as soon as the lock is let go, and lets it go when a holder dies.
    A process stopped inside a write transaction (a debugger) keeps the others waiting until it goes on or exits,
    as SQLite's own lock does for its busy timeout."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.lock = threading.RLock()
        self.depth = 0  # re-entrant, as the thread lock was: the file lock is taken on the way in, once
        self.fd: int | None = None
        self.pid = 0

    def __enter__(self) -> None:
        self.lock.acquire()
        self.depth += 1
        if self.depth == 1 and self.path is not None:
            fcntl.flock(self._file(), fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        self.depth -= 1
        try:
            if self.depth == 0 and self.fd is not None:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            self.lock.release()

    def __del__(self) -> None:  # the engine is gone (the queues are kept by weak reference to it)
        if self.fd is not None and self.pid == os.getpid():
            os.close(self.fd)

    def _file(self) -> int:
        """The lock file, opened by this process: a forked child shares its parent's open file, and with it the
        parent's lock, so it opens its own."""
        if self.fd is None or self.pid != os.getpid():
            assert self.path is not None
            self.fd, self.pid = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600), os.getpid()
        return self.fd


def _writer_queue(engine: sa.Engine) -> _WriterQueue:
    queue = _writer_queues.get(engine)
    if queue is None:
        with _checkins_lock:
            if (queue := _writer_queues.get(engine)) is None:
                database = engine.url.database
                on_disk = bool(database) and database != ":memory:" and not str(database).startswith("file:")
                queue = _writer_queues[engine] = _WriterQueue(Path(f"{database}-writer.lock") if on_disk else None)
    return queue


_writer_queues: weakref.WeakKeyDictionary[sa.Engine, _WriterQueue] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def read_tx(engine: sa.Engine) -> Iterator[sa.Connection]:
    with engine.connect() as conn, conn.begin():
        yield conn


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(url: str, lock_dir: Path | None = None) -> None:
    """Bring the schema to head. Processes starting together serialise so one migrates and the rest find the schema
    current: on a file lock (SQLite: one machine), and on PostgreSQL on an advisory lock too, since API and worker
    nodes share no folder."""
    with _file_lock(lock_dir / ".migrate.lock" if lock_dir else None), _advisory_lock(url):
        before = schema_revisions(url)
        command.upgrade(alembic_config(url), "heads")
        after = schema_revisions(url)
    if before != after:  # Alembic's own step-by-step lines are turned down (observability.logging): say it once
        log.info("database schema migrated from %s to %s", ", ".join(before) or "empty", ", ".join(after))


def schema_revisions(url: str) -> list[str]:
    """The Alembic revisions the database is at (empty for a new database), sorted."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return sorted(MigrationContext.configure(conn).get_current_heads())
    finally:
        engine.dispose()


_MIGRATE_LOCK = 0x6461726B  # "dark": advisory locks are per database, so one key serves every deployment


@contextlib.contextmanager
def _advisory_lock(url: str) -> Iterator[None]:
    """A session-level lock on its own connection: held across Alembic's transactions, freed if the process dies."""
    if not url.startswith("postgresql"):
        yield
        return
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": _MIGRATE_LOCK})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": _MIGRATE_LOCK})
                conn.commit()
    finally:
        engine.dispose()


@contextlib.contextmanager
def _file_lock(path: Path | None) -> Iterator[None]:
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
