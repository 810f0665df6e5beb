"""The worker registry: which worker processes exist, where they run, what they hold, and whether they are alive.

Each worker registers at start and heartbeats every few seconds (see `darkroom.worker.presence`). A worker whose
heartbeats stop is marked `lost` by whoever looks next (its peers on every beat, the admin listing on every read), so
an operator sees a dead GPU node without any process watching. Marking a worker lost does not touch its jobs: their
leases run out on their own and the reaper (`JobStore.requeue_expired`) puts them back in the queue, which is what
keeps a job safe whether its worker died, hung, or was cut off from the database.

States: `active` (claims jobs) → `draining` (finishing its job, claims no more) → `stopped` (exited cleanly);
`lost` when the heartbeats stopped; `unhealthy` while it is alive but paused by a device failure, a storage outage or
a crash of its thread (see `darkroom.worker.health`), and `active` again once it recovers. A lost worker that
heartbeats again (a paused VM, a network partition) is active again: whatever leases it lost meanwhile, the job
store already refuses its writes to them.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

import sqlalchemy as sa

from darkroom import clock
from darkroom.jobs.db import read_tx, write_tx
from darkroom.jobs.workers_table import workers


class WorkerState(enum.StrEnum):
    active = "active"
    draining = "draining"
    lost = "lost"
    stopped = "stopped"
    unhealthy = "unhealthy"


LIVE = (WorkerState.active.value, WorkerState.draining.value, WorkerState.unhealthy.value)


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker says about itself when it registers."""

    id: str
    host: str
    pid: int
    device: str
    memory_bytes: int | None = None
    loaded_models: list[str] = field(default_factory=list)
    models_available: list[str] = field(default_factory=list)
    batch_limits: list[dict[str, object]] = field(default_factory=list)  # {model, width, height, images} in force


@dataclass(frozen=True)
class WorkerRecord(WorkerInfo):
    state: WorkerState = WorkerState.active
    started_at: dt.datetime | None = None
    last_heartbeat_at: dt.datetime | None = None
    jobs_done: int = 0


def _record(row: sa.Row) -> WorkerRecord:
    m = dict(row._mapping)
    m["state"] = WorkerState(m["state"])
    m["started_at"] = clock.aware(m["started_at"])
    m["last_heartbeat_at"] = clock.aware(m["last_heartbeat_at"])
    m["batch_limits"] = m["batch_limits"] or []
    return WorkerRecord(**m)


class WorkerRegistry:
    """The `workers` table behind a small interface. Shares the job store's engine (`WorkerRegistry(store.engine)`)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def register(self, info: WorkerInfo) -> WorkerRecord:
        """Insert, or reset the row of a restarted worker that reuses its id (`--worker-id gpu0`)."""
        now = clock.utcnow()
        values = {
            "host": info.host,
            "pid": info.pid,
            "device": info.device,
            "memory_bytes": info.memory_bytes,
            "loaded_models": list(info.loaded_models),
            "models_available": list(info.models_available),
            "batch_limits": list(info.batch_limits),
            "state": WorkerState.active.value,
            "started_at": now,
            "last_heartbeat_at": now,
            "jobs_done": 0,
        }
        try:
            with write_tx(self.engine) as conn:
                if not conn.execute(workers.update().where(workers.c.id == info.id).values(**values)).rowcount:
                    conn.execute(workers.insert().values(id=info.id, **values))
        except sa.exc.IntegrityError:  # the same id registered from two places at once: the later write wins
            with write_tx(self.engine) as conn:
                conn.execute(workers.update().where(workers.c.id == info.id).values(**values))
        record = self.get(info.id)
        assert record is not None
        return record

    def heartbeat(
        self,
        worker_id: str,
        loaded_models: Iterable[str],
        jobs_done: int,
        models_available: Iterable[str] | None = None,
        healthy: bool = True,
        batch_limits: Iterable[dict[str, object]] | None = None,
    ) -> WorkerState | None:
        """Record that the worker is alive and what it holds. Returns its state (a worker told to drain learns it
        here), or None when there is no row to update (deleted, or stopped): the caller registers again.
        `healthy=False` shows an active worker as `unhealthy`; `True` brings it (or a lost one) back to `active`.
        `batch_limits`: the ones its engine has in force now (None: leave them as they were)."""
        back = (WorkerState.lost.value, WorkerState.unhealthy.value)
        if healthy:
            state = sa.case((workers.c.state.in_(back), WorkerState.active.value), else_=workers.c.state)
        else:
            sick = (WorkerState.active.value, WorkerState.lost.value)
            state = sa.case((workers.c.state.in_(sick), WorkerState.unhealthy.value), else_=workers.c.state)
        values: dict[str, object] = {
            "last_heartbeat_at": clock.utcnow(),
            "loaded_models": list(loaded_models),
            "jobs_done": jobs_done,
            "state": state,
        }
        if models_available is not None:
            values["models_available"] = list(models_available)
        if batch_limits is not None:
            values["batch_limits"] = list(batch_limits)
        with write_tx(self.engine) as conn:
            alive = workers.c.id == worker_id, workers.c.state != WorkerState.stopped.value
            if not conn.execute(workers.update().where(*alive).values(**values)).rowcount:
                return None
            state = conn.execute(sa.select(workers.c.state).where(workers.c.id == worker_id)).scalar_one()
        return WorkerState(state)

    def mark_unhealthy(self, worker_id: str) -> bool:
        """A worker's thread crashed (its supervisor restarts it): show it until it registers again. From `stopped`
        too: the crashing worker's own cleanup records a stop on its way out."""
        gone = (WorkerState.lost.value, WorkerState.stopped.value)
        return self._move(worker_id, WorkerState.unhealthy, from_states=(*LIVE, *gone))

    def mark_draining(self, worker_id: str) -> bool:
        return self._move(worker_id, WorkerState.draining, from_states=LIVE)

    def mark_stopped(self, worker_id: str) -> bool:
        return self._move(worker_id, WorkerState.stopped, from_states=(*LIVE, WorkerState.lost.value))

    def mark_lost(self, stale_after_seconds: float) -> list[str]:
        """Workers whose last heartbeat is older than `stale_after_seconds` become `lost`; returns their ids."""
        cutoff = clock.utcnow() - dt.timedelta(seconds=stale_after_seconds)
        stale = workers.c.state.in_(LIVE), workers.c.last_heartbeat_at < cutoff
        with write_tx(self.engine) as conn:
            ids = list(conn.execute(sa.select(workers.c.id).where(*stale)).scalars())
            if ids:
                conn.execute(workers.update().where(workers.c.id.in_(ids), *stale).values(state=WorkerState.lost.value))
        return ids

    def get(self, worker_id: str) -> WorkerRecord | None:
        with read_tx(self.engine) as conn:
            row = conn.execute(sa.select(workers).where(workers.c.id == worker_id)).first()
        return _record(row) if row else None

    def list(self, state: WorkerState | None = None) -> list[WorkerRecord]:
        query = sa.select(workers).order_by(workers.c.started_at, workers.c.id)
        if state is not None:
            query = query.where(workers.c.state == state.value)
        with read_tx(self.engine) as conn:
            return [_record(r) for r in conn.execute(query)]

    def _move(self, worker_id: str, state: WorkerState, from_states: Iterable[str]) -> bool:
        with write_tx(self.engine) as conn:
            moved = conn.execute(
                workers.update()
                .where(workers.c.id == worker_id, workers.c.state.in_(list(from_states)))
                .values(state=state.value)
            ).rowcount
        return bool(moved)


def stale_after(lease_seconds: float, heartbeat_seconds: float) -> float:
    """How long a silent worker counts as alive: at least one lease (its jobs are still safely its own until then)
    and at least three missed heartbeats (one slow write must not flap a healthy worker to lost)."""
    return max(lease_seconds, 3 * heartbeat_seconds)
