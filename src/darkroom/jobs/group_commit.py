"""Group commit: concurrent submits on SQLite share one write transaction.

SQLite lets one writer in at a time, so an API process's submits queue on its writer lock (`db.write_tx`) anyway. Each
took the lock for a whole transaction of its own: BEGIN IMMEDIATE, its statements, COMMIT, and every statement let go
of the GIL, which a thread only gets back after the others' 5 ms switch interval. Under load the lock was held far
longer than the work inside it (measured with 16 clients: the submits spent most of their time queued there).

Here the first submitter that finds no transaction under way leads: it opens one, runs the pending submits' work in
it one after another, commits once and hands each submitter its own outcome. Submits that arrive meanwhile wait for
the next group, led by the first of them. A group of one runs exactly as before (no savepoint: one transaction, as
the statement budgets count it); in a larger group each submit runs inside a SAVEPOINT, so one that is refused
(quota, conflict) rolls back alone and raises in its own thread, while the others commit. A failed COMMIT fails every
submit of the group, none of which was then written. PostgreSQL runs concurrent writers side by side, so there each
submit keeps its own transaction.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import sqlalchemy as sa

from .db import write_tx

T = TypeVar("T")

MAX_GROUP = 64  # submits in one transaction; bounds how long a group holds SQLite's write lock
_SAVEPOINT = "darkroom_submit"  # one at a time: each submit's is released before the next one's is taken


@dataclass(eq=False)
class _Pending(Generic[T]):
    work: Callable[[sa.Connection], T]
    done: threading.Event = field(default_factory=threading.Event)
    lead: bool = False  # set before `done` when this waiter is to lead the next group
    result: Any = None
    error: BaseException | None = None

    def outcome(self) -> T:
        if self.error is not None:
            raise self.error
        return self.result


class GroupCommit:
    """Runs `work(conn)` in a write transaction shared with whatever other submits are waiting (SQLite)."""

    def __init__(self, engine: sa.Engine, max_group: int = MAX_GROUP) -> None:
        self.engine = engine
        self.max_group = max_group
        self.grouped = engine.dialect.name == "sqlite"
        self._mutex = threading.Lock()
        self._waiting: list[_Pending[Any]] = []
        self._leading = False

    def run(self, work: Callable[[sa.Connection], T]) -> T:
        if not self.grouped:
            with write_tx(self.engine) as conn:
                return work(conn)
        me: _Pending[T] = _Pending(work)
        with self._mutex:
            self._waiting.append(me)
            lead = not self._leading
            self._leading = True
        if not lead:
            me.done.wait()
            if not me.lead:
                return me.outcome()
            me.done.clear()
        self._lead()
        return me.outcome()

    def _lead(self) -> None:
        with self._mutex:
            group, self._waiting = self._waiting[: self.max_group], self._waiting[self.max_group :]
        try:
            self._commit(group)
        finally:
            with self._mutex:
                if self._waiting:  # the first who came meanwhile leads the next group
                    self._waiting[0].lead = True
                    self._waiting[0].done.set()
                else:
                    self._leading = False
            for pending in group:
                pending.lead = False
                pending.done.set()

    @staticmethod
    def _in_savepoint(conn: sa.Connection, pending: _Pending[Any]) -> None:
        """One submit of a larger group: a failure rolls back its own writes and is kept for its thread.

        The savepoint is SQL given to the driver as it is: `Connection.begin_nested()` compiles a new SAVEPOINT
        clause on every use (measured at 156 µs a submit on the 2-core machine, against 33 µs for these)."""
        conn.exec_driver_sql(f"SAVEPOINT {_SAVEPOINT}")
        try:
            pending.result = pending.work(conn)
        except Exception as exc:
            pending.error = exc
            conn.exec_driver_sql(f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}")
        conn.exec_driver_sql(f"RELEASE SAVEPOINT {_SAVEPOINT}")

    def _commit(self, group: list[_Pending[Any]]) -> None:
        if len(group) == 1:
            pending = group[0]
            try:
                with write_tx(self.engine) as conn:
                    pending.result = pending.work(conn)
            except Exception as exc:
                pending.error = exc
            return
        try:
            with write_tx(self.engine) as conn:
                for pending in group:
                    self._in_savepoint(conn, pending)
        except Exception as exc:  # the COMMIT (or BEGIN) failed: nothing of the group was written
            for pending in group:
                if pending.error is None:
                    pending.result, pending.error = None, exc
