"""Retention: each tenant's time-to-live for images (with the source images it uploaded) and for prompt text.

A sweep, per tenant with a TTL (`TenantPolicy.image_ttl_days`, `prompt_ttl_days`):
1. *images* older than the image TTL lose their bytes; the row stays as the record, with `deleted_at` set (the API
   answers 404 for it); the job's progress events go with them, since their previews show the image;
2. *uploads*: the init and mask images of finished jobs older than the image TTL are deleted, and the job's
   `blob:<key>` references (in `request` and in the provenance copy `result["request"]`) become `[deleted]`;
3. *prompts*: finished jobs older than the prompt TTL get `prompt` and `negative_prompt` replaced by `[redacted]`, in
   `request` and in `result["request"]`, and `prompt_redacted_at` set. Queued and running jobs are never touched.

Blobs are content-addressed, so one blob may back several image rows and job uploads, across tenants. A blob is
deleted only when nothing outside the batch being expired still references it: the last reference to expire takes
the bytes with it. Whether anything does is an index lookup (`darkroom.jobs.blob_refs`: `images.blob_key`, and the
`job_uploads` rows the store writes at submit), never a read of every job's request; a job's `job_uploads` rows go
in the same transaction that rewrites its references to `[deleted]`. Bytes are deleted *before* their rows are
marked, so a crash in between leaves rows that the next sweep marks (deleting again is a no-op), never marked rows
whose bytes linger. One residual race is accepted: a new job that uploads the very same bytes while the sweep deletes
them finds its source gone and fails with a clear error.

Work goes in batches (`batch_size` rows per transaction), so a large backlog never holds SQLite's write lock for long.
Each tenant a sweep changed gets one audit record (`retention.sweep`, by `system:retention`) with the counts and TTLs
applied; a sweep with nothing to do writes nothing, so a second sweep is a no-op. Every API process runs a sweeper
(`start_for`); a lease in `settings_kv` lets one sweep at a time across all of them.

After each sweep the thread also prunes (`darkroom.jobs.prune`): finished jobs' progress events, and finished jobs,
webhook deliveries and worker rows past their ages, whether or not any tenant has a TTL.

Not covered here: the PNG bytes of a still-live image carry the prompt in their metadata, so a prompt TTL shorter
than the image TTL leaves that copy until the image itself expires.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from darkroom import clock
from darkroom.auth import audit
from darkroom.auth.principal import Principal, Role
from darkroom.auth.tenants import TenantPolicy, TenantStore
from darkroom.jobs import blob_refs
from darkroom.jobs.db import read_tx, write_tx
from darkroom.jobs.prune import Pruner, drop_previews
from darkroom.jobs.tables import images, job_uploads, jobs
from darkroom.schemas import TERMINAL_STATES
from darkroom.storage.base import BlobStore
from darkroom.webhooks.tables import settings_kv

if TYPE_CHECKING:
    from darkroom.config import Settings
    from darkroom.service import Services

log = logging.getLogger("darkroom.retention")

ACTOR = "system:retention"
REDACTED = "[redacted]"
DELETED = "[deleted]"
UPLOAD_FIELDS = blob_refs.UPLOAD_FIELDS
PROMPT_FIELDS = ("prompt", "negative_prompt")
BATCH_SIZE = 500
LEASE_KEY = "retention.lease"
LEASE_SECONDS = 900.0
FIRST_SWEEP_MAX_DELAY = 30.0
_TERMINAL = [state.value for state in TERMINAL_STATES]


@dataclass
class TenantCounts:
    images_deleted: int = 0
    uploads_deleted: int = 0  # jobs whose init/mask images were removed
    blobs_deleted: int = 0
    prompts_redacted: int = 0

    def changed(self) -> bool:
        return any(asdict(self).values())


class RetentionSweeper:
    """One sweep applies every tenant's TTLs (see the module docstring); the API's lifespan runs it periodically
    (`start_for`) and `darkroom retention sweep` runs it once."""

    def __init__(
        self, engine: sa.Engine, blobs: BlobStore, settings: Settings, *, batch_size: int = BATCH_SIZE
    ) -> None:
        self.engine = engine
        self.blobs = blobs
        self.settings = settings
        self.batch_size = batch_size
        self.id = clock.new_id("retention")

    def sweep(self, now: dt.datetime | None = None) -> dict[str, dict[str, int]]:
        """Apply every tenant's TTLs as of `now`; returns counts per tenant that has a TTL. Empty when no tenant has
        one, or while another process holds the sweep lease."""
        now = now or clock.utcnow()
        policies = {t: p for t, p in TenantStore(self.engine).all().items() if _has_ttl(p)}
        if not policies:
            return {}
        if not self._take_lease():
            log.info("retention sweep skipped: another process is sweeping")
            return {}
        try:
            return {tenant: asdict(self._sweep_tenant(tenant, policy, now)) for tenant, policy in policies.items()}
        finally:
            self._release_lease()

    def _sweep_tenant(self, tenant: str, policy: TenantPolicy, now: dt.datetime) -> TenantCounts:
        counts = TenantCounts()
        if policy.image_ttl_days is not None:
            cutoff = now - dt.timedelta(days=policy.image_ttl_days)
            self._expire_images(tenant, cutoff, now, counts)
            self._expire_uploads(tenant, cutoff, counts)
        if policy.prompt_ttl_days is not None:
            self._redact_prompts(tenant, now - dt.timedelta(days=policy.prompt_ttl_days), now, counts)
        if counts.changed():
            self._audit(tenant, policy, counts)
            log.info("retention: tenant %s: %s", tenant, asdict(counts))
        return counts

    # --- images ----------------------------------------------------------------------------------------------------

    def queries(self, tenant: str, now: dt.datetime, ttl_days: float = 0) -> dict[str, sa.Select]:
        """Each step's batch query for `tenant` with a TTL of `ttl_days` (what the index tests explain)."""
        cutoff = now - dt.timedelta(days=ttl_days)
        return {
            "images": _images_query(tenant, cutoff).limit(self.batch_size),
            "uploads": _uploads_query(tenant, cutoff).limit(self.batch_size),
            "prompts": _prompts_query(tenant, cutoff).limit(self.batch_size),
        }

    def _expire_images(self, tenant: str, cutoff: dt.datetime, now: dt.datetime, counts: TenantCounts) -> None:
        for rows in self._batches(_images_query(tenant, cutoff).limit(self.batch_size)):
            ids = [r.id for r in rows]
            counts.blobs_deleted += self._delete_unreferenced({r.blob_key for r in rows}, skip_images=ids)
            with write_tx(self.engine) as conn:
                counts.images_deleted += conn.execute(
                    images.update().where(images.c.id.in_(ids), images.c.deleted_at.is_(None)).values(deleted_at=now)
                ).rowcount
                drop_previews(conn, {r.job_id for r in rows})

    def _batches(self, query: sa.Select) -> Iterator[list[sa.Row]]:
        """Rows of `query`, a batch at a time; the caller's work on a batch takes its rows out of the query."""
        while True:
            with read_tx(self.engine) as conn:
                rows = list(conn.execute(query).all())
            if rows:
                yield rows
            if len(rows) < self.batch_size:
                return

    # --- uploads ---------------------------------------------------------------------------------------------------

    def _expire_uploads(self, tenant: str, cutoff: dt.datetime, counts: TenantCounts) -> None:
        """Finished jobs that still have `job_uploads` rows; their rows go with the rewrite, which takes each batch
        out of the query."""
        for rows in self._batches(_uploads_query(tenant, cutoff).limit(self.batch_size)):
            ids = [r.id for r in rows]
            with read_tx(self.engine) as conn:
                keys = {r.blob_key for r in conn.execute(blob_refs.keys_of_query(ids))}
            counts.blobs_deleted += self._delete_unreferenced(keys, skip_jobs=ids)
            with write_tx(self.engine) as conn:
                counts.uploads_deleted += self._rewrite(conn, ids, _drop_uploads)
                conn.execute(job_uploads.delete().where(job_uploads.c.job_id.in_(ids)))

    # --- prompts ---------------------------------------------------------------------------------------------------

    def _redact_prompts(self, tenant: str, cutoff: dt.datetime, now: dt.datetime, counts: TenantCounts) -> None:
        query = _prompts_query(tenant, cutoff).limit(self.batch_size)
        while True:
            with write_tx(self.engine) as conn:
                ids = list(conn.execute(query).scalars())
                counts.prompts_redacted += self._rewrite(conn, ids, _redact, prompt_redacted_at=now)
            if len(ids) < self.batch_size:
                return

    # --- shared ----------------------------------------------------------------------------------------------------

    def _rewrite(self, conn: sa.Connection, ids: list[str], change: Any, **values: Any) -> int:
        """Apply `change` to the request and its provenance copy of each finished job; returns how many changed."""
        if not ids:
            return 0
        rows = conn.execute(
            sa.select(jobs.c.id, jobs.c.request, jobs.c.result).where(jobs.c.id.in_(ids), jobs.c.state.in_(_TERMINAL))
        ).all()
        for row in rows:
            result = row.result
            if isinstance(result, dict) and isinstance(result.get("request"), dict):
                result = {**result, "request": change(result["request"])}
            conn.execute(
                jobs.update().where(jobs.c.id == row.id).values(request=change(row.request), result=result, **values)
            )
        return len(rows)

    def _delete_unreferenced(
        self, keys: set[str], *, skip_images: list[str] | None = None, skip_jobs: list[str] | None = None
    ) -> int:
        """Delete the blobs that nothing but the rows being expired (`skip_*`) references; returns how many."""
        if not keys:
            return 0
        with read_tx(self.engine) as conn:
            doomed = keys - blob_refs.live_keys(conn, keys, skip_images or [], skip_jobs or [])
        for key in sorted(doomed):
            self.blobs.delete(key)
        return len(doomed)

    def _audit(self, tenant: str, policy: TenantPolicy, counts: TenantCounts) -> None:
        who = Principal(actor=ACTOR, role=Role.admin, tenant=tenant)
        details = {
            **asdict(counts),
            "image_ttl_days": policy.image_ttl_days,
            "prompt_ttl_days": policy.prompt_ttl_days,
        }
        with write_tx(self.engine) as conn:
            audit.record(conn, who, "retention.sweep", tenant, details, tenant=tenant)

    # --- one sweeper at a time ---------------------------------------------------------------------------------------

    def _take_lease(self) -> bool:
        """Compare-and-set on a `settings_kv` row. Another process's unexpired lease means it is sweeping now."""
        now = clock.utcnow()
        lease = {"owner": self.id, "until": (now + dt.timedelta(seconds=LEASE_SECONDS)).isoformat()}
        mine = settings_kv.c.key == LEASE_KEY
        try:
            with write_tx(self.engine) as conn:
                row = conn.execute(sa.select(settings_kv.c.value).where(mine).with_for_update()).first()
                if row is None:
                    conn.execute(settings_kv.insert().values(key=LEASE_KEY, value=lease, updated_at=now))
                    return True
                if _lease_held(row.value, self.id, now):
                    return False
                conn.execute(settings_kv.update().where(mine).values(value=lease, updated_at=now))
                return True
        except sa.exc.IntegrityError:  # another process inserted the row first (PostgreSQL)
            return False

    def _release_lease(self) -> None:
        with write_tx(self.engine) as conn:
            row = conn.execute(sa.select(settings_kv.c.value).where(settings_kv.c.key == LEASE_KEY)).first()
            if row is not None and row.value.get("owner") == self.id:
                conn.execute(settings_kv.delete().where(settings_kv.c.key == LEASE_KEY))


def _has_ttl(policy: TenantPolicy) -> bool:
    return policy.image_ttl_days is not None or policy.prompt_ttl_days is not None


def _lease_held(value: Any, owner: str, now: dt.datetime) -> bool:
    if not isinstance(value, dict) or value.get("owner") == owner:
        return False
    try:
        return dt.datetime.fromisoformat(str(value.get("until"))) > now
    except ValueError:
        return False


def _drop_uploads(request: dict[str, Any]) -> dict[str, Any]:
    gone = set(UPLOAD_FIELDS) & {k for k, v in request.items() if isinstance(v, str) and v.startswith("blob:")}
    return {k: DELETED if k in gone else v for k, v in request.items()}


def _redact(request: dict[str, Any]) -> dict[str, Any]:
    """Text goes; an empty negative prompt stays empty (there was nothing to hide)."""
    return {k: REDACTED if k in PROMPT_FIELDS and v else v for k, v in request.items()}


def _images_query(tenant: str, cutoff: dt.datetime) -> sa.Select:
    """The tenant's live images older than `cutoff`, oldest first: `ix_images_tenant_created_at`."""
    expired = sa.and_(images.c.tenant == tenant, images.c.deleted_at.is_(None), images.c.created_at < cutoff)
    return (
        sa.select(images.c.id, images.c.blob_key, images.c.job_id)
        .where(expired)
        .order_by(images.c.created_at, images.c.id)
    )


def _uploads_query(tenant: str, cutoff: dt.datetime) -> sa.Select:
    """The tenant's finished jobs older than `cutoff` that still reference uploads. Only jobs with `job_uploads` rows
    qualify, so the jobs whose uploads are already gone cost an index probe each, never a read of their request."""
    has_uploads = sa.exists().where(job_uploads.c.job_id == jobs.c.id)
    return (
        sa.select(jobs.c.id)
        .where(jobs.c.tenant == tenant, jobs.c.state.in_(_TERMINAL), jobs.c.created_at < cutoff, has_uploads)
        .order_by(jobs.c.created_at, jobs.c.id)
    )


def _prompts_query(tenant: str, cutoff: dt.datetime) -> sa.Select:
    return (
        sa.select(jobs.c.id)
        .where(
            jobs.c.tenant == tenant,
            jobs.c.state.in_(_TERMINAL),
            jobs.c.created_at < cutoff,
            jobs.c.prompt_redacted_at.is_(None),
        )
        .order_by(jobs.c.created_at, jobs.c.id)
    )


# --- the background sweeper ------------------------------------------------------------------------------------------


class RetentionThread:
    """Sweeps (then prunes) every `retention_sweep_seconds` in a daemon thread; an error is logged and the next
    sweep goes on."""

    def __init__(self, sweeper: RetentionSweeper, interval: float, pruner: Pruner | None = None) -> None:
        self.sweeper = sweeper
        self.interval = interval
        self.pruner = pruner
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="retention-sweeper", daemon=True)

    def start(self) -> RetentionThread:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _loop(self) -> None:
        # The first sweep comes soon after start (a process restarted often still sweeps), not at once (startup).
        delay = min(self.interval, FIRST_SWEEP_MAX_DELAY)
        while not self._stop.wait(delay):
            try:
                self.sweeper.sweep()
            except Exception:
                log.exception("retention sweep failed; retrying in %.0f s", self.interval)
            try:
                if self.pruner is not None:
                    self.pruner.run()
            except Exception:
                log.exception("pruning failed; retrying in %.0f s", self.interval)
            delay = self.interval


def start_for(settings: Settings, services: Services) -> RetentionThread:
    """What the app's lifespan calls: a running background sweeper."""
    sweeper = RetentionSweeper(services.store.engine, services.blobs, settings)
    pruner = Pruner(services.store.engine, services.blobs, settings.prune)
    return RetentionThread(sweeper, settings.security.retention_sweep_seconds, pruner).start()
