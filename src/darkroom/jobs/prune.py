"""Pruning: what keeps the database from growing without bound, run by the retention sweeper after each sweep.

1. *Compaction*: once a job is finished its `progress` events are noise, and they carry preview images (data URLs)
   that would outlive the images themselves: they are deleted. Retention deletes them at once for the jobs whose
   images it expires (`drop_previews`), so no preview survives its image.
2. *Finished jobs* older than `prune.finished_jobs_days` go, with their events, image rows and webhook deliveries;
   their image and upload bytes go too unless another row still references the same content address.
3. *Webhook deliveries* that ended (delivered, failed, refused) older than `prune.deliveries_days`.
4. *Worker rows* that stopped or were lost longer than `prune.workers_days` ago.

Every step works in batches of `prune.batch_size` rows: a SELECT … LIMIT of ids on an index (see
`darkroom.jobs.sweep_indexes`), then one short write transaction deleting those ids, so the API never waits behind a
long delete and a sweep interrupted halfway just continues next time.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import sqlalchemy as sa

from darkroom import clock
from darkroom.jobs import blob_refs
from darkroom.jobs.db import read_tx, write_tx
from darkroom.jobs.tables import images, job_events, job_uploads, jobs
from darkroom.jobs.workers_table import workers
from darkroom.schemas import TERMINAL_STATES
from darkroom.storage.base import BlobStore
from darkroom.webhooks.tables import webhook_deliveries

if TYPE_CHECKING:
    from darkroom.config import PruneSettings

log = logging.getLogger("darkroom.prune")

TERMINAL = sorted(state.value for state in TERMINAL_STATES)
ENDED_DELIVERIES = ("delivered", "failed", "refused", "dead")
GONE_WORKERS = ("stopped", "lost")
COMPACTED_EVENTS = ("progress",)


@dataclass
class PruneCounts:
    events_compacted: int = 0
    jobs_deleted: int = 0
    blobs_deleted: int = 0
    deliveries_deleted: int = 0
    workers_deleted: int = 0


def drop_previews(conn: sa.Connection, job_ids: Iterable[str]) -> int:
    """Delete the progress events (and with them the previews) of `job_ids`, in the caller's transaction."""
    ids = list(job_ids)
    if not ids:
        return 0
    where = job_events.c.job_id.in_(ids), job_events.c.type.in_(COMPACTED_EVENTS)
    return conn.execute(job_events.delete().where(*where)).rowcount


class Pruner:
    def __init__(self, engine: sa.Engine, blobs: BlobStore, settings: PruneSettings) -> None:
        self.engine = engine
        self.blobs = blobs
        self.settings = settings

    def run(self, now: dt.datetime | None = None) -> PruneCounts:
        now = now or clock.utcnow()
        counts = PruneCounts(events_compacted=self.compact_events())
        if (days := self.settings.finished_jobs_days) is not None:
            counts.jobs_deleted, counts.blobs_deleted = self.prune_jobs(now - dt.timedelta(days=days))
        if (days := self.settings.deliveries_days) is not None:
            counts.deliveries_deleted = self.prune_deliveries(now - dt.timedelta(days=days))
        if (days := self.settings.workers_days) is not None:
            counts.workers_deleted = self.prune_workers(now - dt.timedelta(days=days))
        if any(asdict(counts).values()):
            log.info("pruned: %s", asdict(counts))
        return counts

    # --- the steps -------------------------------------------------------------------------------------------------

    def queries(self, now: dt.datetime) -> dict[str, sa.Select]:
        """Each step's batch query (what the index test explains)."""
        age = lambda days: now - dt.timedelta(days=days or 0)  # noqa: E731
        return {
            "events": _events_query().limit(self.settings.batch_size),
            "jobs": _jobs_query(age(self.settings.finished_jobs_days)).limit(self.settings.batch_size),
            "deliveries": sa.select(webhook_deliveries.c.id)
            .where(*_ended_deliveries(age(self.settings.deliveries_days)))
            .limit(self.settings.batch_size),
            "workers": sa.select(workers.c.id)
            .where(*_gone_workers(age(self.settings.workers_days)))
            .limit(self.settings.batch_size),
        }

    def compact_events(self) -> int:
        """Progress events of finished jobs, found through `ix_job_events_type_id` and each job's primary key."""
        return self._delete_in_batches(
            _events_query(), lambda conn, ids: job_events.delete().where(job_events.c.id.in_(ids))
        )

    def prune_jobs(self, cutoff: dt.datetime) -> tuple[int, int]:
        """Finished jobs older than `cutoff` with everything that hangs off them; returns (jobs, blobs) deleted."""
        query = _jobs_query(cutoff).limit(self.settings.batch_size)
        deleted = blobs = 0
        while True:
            with read_tx(self.engine) as conn:
                ids = list(conn.execute(query).scalars())
            if ids:
                blobs += self._delete_bytes(ids)
                with write_tx(self.engine) as conn:
                    for table in (job_events, images, job_uploads, webhook_deliveries):
                        conn.execute(table.delete().where(table.c.job_id.in_(ids)))
                    gone = jobs.c.id.in_(ids), jobs.c.state.in_(TERMINAL)
                    deleted += conn.execute(jobs.delete().where(*gone)).rowcount
            if len(ids) < self.settings.batch_size:
                return deleted, blobs

    def prune_deliveries(self, cutoff: dt.datetime) -> int:
        ended = _ended_deliveries(cutoff)
        query = sa.select(webhook_deliveries.c.id).where(*ended)
        table = webhook_deliveries
        return self._delete_in_batches(query, lambda conn, ids: table.delete().where(table.c.id.in_(ids), *ended))

    def prune_workers(self, cutoff: dt.datetime) -> int:
        gone = _gone_workers(cutoff)
        query = sa.select(workers.c.id).where(*gone)
        return self._delete_in_batches(query, lambda conn, ids: workers.delete().where(workers.c.id.in_(ids), *gone))

    # --- helpers ---------------------------------------------------------------------------------------------------

    def _delete_in_batches(self, query: sa.Select, delete: Callable[[sa.Connection, list], sa.Delete]) -> int:
        """Select up to `batch_size` ids and delete them, one short write transaction per batch, until done."""
        total = 0
        while True:
            with write_tx(self.engine) as conn:
                ids = list(conn.execute(query.limit(self.settings.batch_size)).scalars())
                if ids:
                    total += conn.execute(delete(conn, ids)).rowcount
            if len(ids) < self.settings.batch_size:
                return total

    def _delete_bytes(self, job_ids: list[str]) -> int:
        """Bytes of these jobs' images and uploads that no other row references; deleted before the rows, so a crash
        in between leaves rows the next run deletes again, never orphaned bytes. Every lookup is on an index: the
        jobs' images and `job_uploads` rows by job id, other references by blob key (`darkroom.jobs.blob_refs`)."""
        with read_tx(self.engine) as conn:
            rows = conn.execute(
                sa.select(images.c.id, images.c.blob_key).where(
                    images.c.job_id.in_(job_ids), images.c.deleted_at.is_(None)
                )
            ).all()
            keys = {r.blob_key for r in rows} | {r.blob_key for r in conn.execute(blob_refs.keys_of_query(job_ids))}
            doomed = keys - blob_refs.live_keys(conn, keys, [r.id for r in rows], job_ids)
        for key in sorted(doomed):
            self.blobs.delete(key)
        return len(doomed)


def _events_query() -> sa.Select:
    return (
        sa.select(job_events.c.id)
        .join(jobs, jobs.c.id == job_events.c.job_id)
        .where(job_events.c.type.in_(COMPACTED_EVENTS), jobs.c.state.in_(TERMINAL))
        .order_by(job_events.c.id)
    )


def _jobs_query(cutoff: dt.datetime) -> sa.Select:
    return sa.select(jobs.c.id).where(jobs.c.state.in_(TERMINAL), jobs.c.finished_at < cutoff)


def _ended_deliveries(cutoff: dt.datetime) -> tuple[sa.ColumnElement[bool], ...]:
    return webhook_deliveries.c.state.in_(ENDED_DELIVERIES), webhook_deliveries.c.updated_at < cutoff


def _gone_workers(cutoff: dt.datetime) -> tuple[sa.ColumnElement[bool], ...]:
    return workers.c.state.in_(GONE_WORKERS), workers.c.last_heartbeat_at < cutoff
