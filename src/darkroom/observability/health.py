"""The fleet's health, checked and acted on: lost workers, jobs taken from them, stuck jobs, a filling data disk.

Workers already requeue each other's expired leases (`Worker._reap`), but when every worker is frozen or gone nobody
is left to do it, and a worker whose heartbeat thread lives on while its device hangs keeps its lease forever. So the
API process sweeps too (`Sweeper`, every `observability.health_sweep_seconds`), and `GET /v1/admin/health` sweeps
before it answers. Each finding is acted on through the job store's guarded moves (`requeue_expired`,
`requeue_stuck`), counted in metrics (`darkroom_jobs_stuck_total`, `darkroom_job_errors_total{kind="lease_lost"}`,
`darkroom_data_disk_*`, `darkroom_workers{state="lost"}`), and reported."""

from __future__ import annotations

import logging
import shutil
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from darkroom.config import Settings
from darkroom.jobs.store import JobStore
from darkroom.jobs.workers import WorkerRegistry, WorkerState, stale_after
from darkroom.observability import metrics

log = logging.getLogger("darkroom.health")


@dataclass(frozen=True)
class DiskReport:
    path: str
    free_bytes: int
    total_bytes: int
    low: bool


@dataclass(frozen=True)
class HealthReport:
    """What one sweep found and did."""

    status: str  # ok | degraded
    live_workers: int
    lost_workers: list[str]
    requeued_jobs: list[str]  # leases expired (their worker is gone or frozen): requeued, or ended
    stuck_jobs: list[str]  # past their time limit without a step: taken from their worker
    disk: DiskReport
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def disk_report(path: Path, low_bytes: int) -> DiskReport:
    """The data dir's file system (the nearest existing parent, before the first start creates the folder)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    return DiskReport(str(path), usage.free, usage.total, usage.free < low_bytes)


def sweep(settings: Settings, store: JobStore) -> HealthReport:
    """Find and act: silent workers become `lost`, their expired leases go back to the queue, stuck jobs are taken
    from their workers, and the data disk is measured."""
    obs = settings.observability
    registry = WorkerRegistry(store.engine)
    lost_now = registry.mark_lost(stale_after(settings.lease_seconds, settings.heartbeat_seconds))
    requeued = store.requeue_expired()
    stuck = store.requeue_stuck(obs.stuck_grace_seconds, settings.job_timeout_seconds)
    metrics.jobs_stuck(len(stuck))
    disk = disk_report(settings.data_dir, obs.disk_low_bytes)
    metrics.data_disk(disk.free_bytes, disk.low)
    workers = registry.list()
    live = [w for w in workers if w.state in (WorkerState.active, WorkerState.draining)]
    lost = [w.id for w in workers if w.state is WorkerState.lost]
    problems = []
    if lost:
        problems.append(f"{len(lost)} worker(s) lost: {', '.join(lost)}")
    if stuck:
        problems.append(f"{len(stuck)} stuck job(s) taken from their workers")
    if disk.low:
        problems.append(f"data disk low: {disk.free_bytes} bytes free under {disk.path}")
    if obs.expect_workers and not live:
        problems.append("no live worker")
    for job_id in stuck:
        log.warning("job %s was stuck past its time limit; taken from its worker", job_id, extra={"job_id": job_id})
    for worker_id in lost_now:
        log.warning("worker %s is lost (no heartbeat)", worker_id, extra={"worker_id": worker_id})
    return HealthReport(
        status="degraded" if problems else "ok",
        live_workers=len(live),
        lost_workers=lost,
        requeued_jobs=requeued,
        stuck_jobs=stuck,
        disk=disk,
        problems=problems,
    )


class Sweeper:
    """Runs `sweep` on a daemon thread every `observability.health_sweep_seconds` (first after one interval), for as
    long as the API process runs. A failing sweep (the database away) is logged and tried again next time."""

    def __init__(self, settings: Settings, store: JobStore) -> None:
        self.settings, self.store = settings, store
        self.last: HealthReport | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-sweeper", daemon=True)

    def start(self) -> Sweeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.observability.health_sweep_seconds):
            try:
                self.last = sweep(self.settings, self.store)
            except Exception:
                log.warning("health sweep failed; trying again next interval", exc_info=True)
