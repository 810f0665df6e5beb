"""Worker threads that die say so, and come back: `darkroom serve --workers N` supervises its N worker threads.

Each thread runs one slot: build a `Worker`, run it, and when it raises (or its loop ends without being asked to stop)
log the error with its traceback, show the worker as `unhealthy` in the fleet view, wait a backoff that doubles per
crash in a row (`recovery.restart_backoff_seconds` … `max_backoff_seconds`) and start a new `Worker` under the same
id. `health()` is what `/readyz` and metrics read: how many slots run a healthy worker, and each slot's last error.
A slot that ran for a while before crashing starts its backoff from the beginning again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from darkroom.config import RecoverySettings
from darkroom.jobs.workers import WorkerRegistry
from darkroom.worker.loop import Worker

log = logging.getLogger("darkroom.worker")

STABLE_SECONDS = 60.0  # a worker that ran this long before crashing was not crash-looping


@dataclass
class Slot:
    index: int
    worker_id: str
    worker: Worker | None = None
    state: str = "starting"  # starting | running | restarting | stopped
    crashes: int = 0
    last_error: str | None = None

    @property
    def healthy(self) -> bool:
        return self.state == "running" and self.worker is not None and self.worker.health.healthy


class Supervisor:
    def __init__(
        self,
        make_worker: Callable[[str], Worker],
        registry: WorkerRegistry,
        recovery: RecoverySettings,
        stop: threading.Event,
        workers: list[Worker],
    ) -> None:
        """`workers`: the caller's list of current `Worker`s, kept up to date in place (drain reaches the live
        ones)."""
        self.make_worker = make_worker
        self.registry = registry
        self.recovery = recovery
        self.stop = stop
        self.workers = workers
        self.slots: list[Slot] = []
        self._lock = threading.Lock()

    def add(self, worker_id: str) -> Slot:
        """A new slot with its first `Worker` built now, so `workers` lists it before its thread starts."""
        worker = self.make_worker(worker_id)
        with self._lock:
            slot = Slot(index=len(self.slots), worker_id=worker_id, worker=worker)
            self.slots.append(slot)
            self.workers.append(worker)
        return slot

    def run(self, slot: Slot) -> None:
        """A worker thread's body: run, and restart after a crash until `stop`."""
        streak = 0
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                self._run_once(slot)
                if self.stop.is_set():
                    break
                raise RuntimeError("the worker loop ended without being asked to stop")
            except Exception as exc:
                streak, delay = restart_backoff(self.recovery, streak, started)
                self._crashed(slot, exc, delay)
                self.stop.wait(delay)
        slot.state = "stopped"

    def _run_once(self, slot: Slot) -> None:
        worker = slot.worker if slot.state == "starting" and slot.worker else self.make_worker(slot.worker_id)
        with self._lock:
            if slot.worker in self.workers:
                self.workers[self.workers.index(slot.worker)] = worker
            else:
                self.workers.append(worker)
            slot.worker, slot.state = worker, "running"
        worker.run(self.stop)

    def _crashed(self, slot: Slot, exc: Exception, delay: float) -> None:
        slot.state, slot.crashes = "restarting", slot.crashes + 1
        slot.last_error = f"{type(exc).__name__}: {exc}"
        log.error(
            "worker thread %s crashed (%d so far); restarting in %.1f s",
            slot.worker_id,
            slot.crashes,
            delay,
            exc_info=exc,
        )
        try:
            self.registry.mark_unhealthy(slot.worker_id)
        except Exception:  # the database may be what failed; the log line above is the record then
            log.warning("could not mark worker %s unhealthy", slot.worker_id, exc_info=True)

    def health(self) -> dict[str, object]:
        """{"status": "ok" | "error: …", "workers": N, "healthy": n, "slots": [...]}; ok while one worker is healthy
        (or none was asked for)."""
        with self._lock:
            slots = list(self.slots)
        views: list[dict[str, object]] = [
            {
                "id": s.worker_id,
                "state": s.state,
                "condition": s.worker.health.condition.value if s.worker else None,
                "crashes": s.crashes,
                "last_error": s.last_error,
            }
            for s in slots
        ]
        return fleet_health(views, healthy=sum(s.healthy for s in slots))


def restart_backoff(recovery: RecoverySettings, streak: int, started: float) -> tuple[int, float]:
    """After a crash of something started at `started` (monotonic): the crashes in a row, counting this one (a run
    of `STABLE_SECONDS` starts the count again), and how long to wait before the next start, doubling per crash in a
    row from `restart_backoff_seconds` up to `max_backoff_seconds`. Worker threads, worker processes and extra API
    processes all restart this way."""
    streak = 1 if time.monotonic() - started >= STABLE_SECONDS else streak + 1
    return streak, min(recovery.max_backoff_seconds, recovery.restart_backoff_seconds * 2 ** (streak - 1))


def fleet_health(slots: list[dict[str, object]], healthy: int) -> dict[str, object]:
    """What `/readyz` reads of a node's workers (threads or processes): ok while one is healthy, or none was asked
    for."""
    status = "ok" if healthy or not slots else f"error: no healthy worker ({len(slots)} unhealthy)"
    return {"status": status, "workers": len(slots), "healthy": healthy, "slots": slots}
