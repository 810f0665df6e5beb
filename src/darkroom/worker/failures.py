"""What a worker does with a job when the failure is the worker's, not the job's (see `darkroom.worker.health`).

`settle_fatal` and `settle_storage` are called where a job's run ends in `FatalEngineError` or `StorageUnavailable`
(the device thread, or the post-processing that uploads images): the job goes back to the queue without being charged
an attempt and the worker pauses. `claim_gate` sits in front of every claim: it sleeps out the pause, and after a
device failure it rebuilds the engine and runs its self-check before any job is touched again.

Poison jobs: a job that breaks the device every time it runs would otherwise be released uncharged forever, taking
a worker down each time. Each uncharged release after a device failure is a `requeued` event with reason
`engine_fatal`; the `recovery.poison_after`-th such failure fails the job for good (`poison_job`), while the workers
recover and go on with the other jobs. A broken device cannot dead-letter innocent jobs this way, because after its
first failure it must pass `Engine.check` before claiming again.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

import sqlalchemy as sa

from darkroom.errors import FatalEngineError, StorageUnavailable
from darkroom.jobs.db import read_tx
from darkroom.jobs.tables import job_events
from darkroom.observability import metrics
from darkroom.worker.health import Condition

if TYPE_CHECKING:
    from darkroom.jobs.store import JobRecord
    from darkroom.worker.loop import Worker

log = logging.getLogger("darkroom.worker")

FATAL_REASON = "engine_fatal"
STORAGE_REASON = "storage_unavailable"
POISON_CODE = "poison_job"


def settle_fatal(worker: Worker, job: JobRecord, exc: FatalEngineError) -> None:
    """The device failed while running `job`: release it uncharged (or give it up as poison), drop the engine,
    pause the worker."""
    starts = fatal_failures(worker.store.engine, job.id) + 1
    if starts >= worker.settings.recovery.poison_after:
        message = f"the job made the device fail {starts} times; last: {exc.message}"
        worker.store.fail(job.id, worker.id, {"code": POISON_CODE, "message": message, "field": None})
        log.error("worker %s: job %s given up as poison after %d device failures", worker.id, job.id, starts)
    else:
        worker.store.release(job.id, worker.id, reason=f"{FATAL_REASON}: {exc.message}"[:1000])
        metrics.job_error(exc.code)  # released uncharged, but the attempt failed on the device: an `engine` error
    pause = worker.health.trip(Condition.engine_fatal, exc.message, jobs_done=worker.jobs_done)
    drop_engine(worker)
    log.error("worker %s: device failure (%s); engine dropped, claiming again in %.1f s", worker.id, exc, pause)


def settle_storage(worker: Worker, job: JobRecord, exc: StorageUnavailable) -> None:
    """The blob store failed while storing `job`'s images: release it uncharged and pause the worker for minutes."""
    worker.store.release(job.id, worker.id, reason=f"{STORAGE_REASON}: {exc.message}"[:1000])
    pause = worker.health.trip(Condition.storage_unavailable, exc.message, jobs_done=worker.jobs_done)
    log.error(
        "worker %s: blob store failed (%s); job %s released, claiming again in %.1f s", worker.id, exc, job.id, pause
    )


def claim_gate(worker: Worker, stop: threading.Event) -> bool:
    """True when the worker may claim now. Sleeps out a pause (returning False so the loop re-checks `stop`)."""
    health = worker.health
    if health.healthy:
        return True
    if worker.jobs_done > health.jobs_done_at_trip:  # a job went through since: whatever it was is fixed
        health.recovered()
        return True
    if health.paused():
        health.wait(stop)
        return False
    return health.condition is not Condition.engine_fatal or _engine_passes_check(worker)


def _engine_passes_check(worker: Worker) -> bool:
    try:
        check = getattr(worker.engine, "check", None)  # rebuilds the engine that `settle_fatal` dropped
        if check is not None:
            check()
    except Exception as exc:
        pause = worker.health.trip(Condition.engine_fatal, f"self-check failed: {exc}", jobs_done=worker.jobs_done)
        drop_engine(worker)
        log.error("worker %s: engine self-check failed (%s); next try in %.1f s", worker.id, exc, pause)
        return False
    return True


def drop_engine(worker: Worker) -> None:
    """Close the engine and let the next use build a fresh one (a new CUDA context, reloaded pipelines)."""
    engine, worker._engine = worker._engine, None
    if engine is not None:
        try:
            engine.close()
        except Exception:  # a broken device may fail to free memory too; the new engine does not depend on it
            log.warning("worker %s: closing the failed engine failed", worker.id, exc_info=True)


def fatal_failures(engine: sa.Engine, job_id: str) -> int:
    """How many times `job_id` was released after a device failure (its `requeued` events with that reason)."""
    query = sa.select(job_events.c.data).where(job_events.c.job_id == job_id, job_events.c.type == "requeued")
    with read_tx(engine) as conn:
        rows = conn.execute(query).scalars().all()
    return sum(1 for data in rows if str((data or {}).get("reason", "")).startswith(FATAL_REASON))
