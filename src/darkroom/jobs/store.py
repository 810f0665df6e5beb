"""The job store: every state change of a job is one short transaction here.

Portable SQL only (SQLite and PostgreSQL): a claim selects the next job `FOR UPDATE SKIP LOCKED` (a no-op on SQLite,
where `BEGIN IMMEDIATE` already serialises writers) and then moves it with a guarded `UPDATE … WHERE state='queued'`.
Every transition is one UPDATE through `_move`, guarded by the state the job must be in and, for a worker, by
`lease_owner`, so a worker whose lease expired can never overwrite the job another worker now owns: a job succeeds
exactly once, and a stale worker's failure changes nothing.

Hot-path budgets (checked by tests/unit/test_hot_path_budget.py): a submit is one write transaction, a status read or
a listing one read transaction with a constant number of statements, a claim, a start, a heartbeat and a completion
one transaction each. Every ORDER BY here has an index with the same columns and directions (see `tables.py`), and
nothing on these paths reads a table whose size grows with the history: quotas read `usage_counters`, ETAs read
`step_rates`, queue positions count at most `POSITION_CAP` index entries.
"""

from __future__ import annotations

import builtins  # JobStore.list shadows the builtin in its own annotations
import datetime as dt
import functools
import hashlib
import json
import statistics
import zlib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict, Unpack

import anyio.to_thread
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from darkroom import clock
from darkroom.auth import usage
from darkroom.errors import Conflict, DarkroomError, NotFound
from darkroom.jobs import blob_refs, result_cache, tags
from darkroom.jobs.db import create_engine, read_tx, write_tx
from darkroom.jobs.group_commit import GroupCommit
from darkroom.jobs.notify import announce
from darkroom.jobs.prepared import Prepared, PreparedInsert
from darkroom.jobs.tables import CLAIM_ORDER, QUEUE_SHARDS, images, job_events, jobs, queue_counters, step_rates
from darkroom.jobs.workers_table import workers
from darkroom.observability import metrics
from darkroom.schemas import PRIORITY_NAME, PRIORITY_VALUE, GenerationRequest, JobEvent, JobState


class QueueFull(DarkroomError):
    status = 429
    code = "queue_full"

    def __init__(self, message: str, retry_after: int = 5, tenant: str | None = None) -> None:
        """`tenant`: whose share of the queue is full; None when the whole queue is."""
        super().__init__(message, field="queue")
        self.retry_after = retry_after
        self.tenant = tenant


@dataclass(frozen=True)
class JobRecord:
    id: str
    state: JobState
    tenant: str
    priority: int
    model: str | None
    request: dict[str, Any]
    request_id: str | None
    idempotency_key: str | None
    attempts: int
    max_attempts: int
    lease_owner: str | None
    lease_expires_at: dt.datetime | None
    cancel_requested: bool
    progress_step: int
    progress_total: int
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    created_at: dt.datetime
    updated_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    fair_tag: float = 0.0
    batch_key: str | None = None
    timeout_seconds: float | None = None
    key_id: str | None = None
    images_requested: int = 1
    prompt_redacted_at: dt.datetime | None = None
    gpu_seconds: float | None = None

    def generation_request(self) -> GenerationRequest:
        return GenerationRequest.model_validate(self.request)


@dataclass(frozen=True)
class NewImage:
    index: int
    seed: int
    width: int
    height: int
    sha256: str
    blob_key: str
    content_type: str
    size_bytes: int
    review_state: str = "none"  # none | pending | approved | rejected (see `ImageRecord.released`)
    review_reason: str | None = None


@dataclass(frozen=True)
class ImageRecord(NewImage):
    id: str = ""
    job_id: str = ""
    tenant: str = ""
    created_at: dt.datetime = dt.datetime.min
    reviewed_by: str | None = None
    reviewed_at: dt.datetime | None = None
    deleted_at: dt.datetime | None = None

    @property
    def released(self) -> bool:
        """The tenant may download it: not held for review (or approved), and not deleted by retention."""
        return self.review_state in ("none", "approved") and self.deleted_at is None


@dataclass(frozen=True)
class ClaimedBatch:
    """What a claim took, and whether it left no ready job behind (the worker then waits for a notice)."""

    jobs: list[JobRecord]
    drained: bool


@dataclass(frozen=True)
class LeaseAck:
    """Answer to a heartbeat or progress report: do we still own the job, and does its owner want it stopped?"""

    owned: bool
    cancel_requested: bool


@dataclass(frozen=True)
class JobStatus:
    """A job with what a status read shows beside it, all read in one transaction."""

    job: JobRecord
    images: list[ImageRecord] = field(default_factory=list)
    queue_position: int | None = None
    eta_seconds: float | None = None


def _started_metric(attempts: int, priority: int, created_at: dt.datetime, now: dt.datetime) -> None:
    """Submit to first start (a retry's wait is its backoff, not queueing)."""
    if attempts == 1:
        metrics.job_started(PRIORITY_NAME.get(priority, str(priority)), (now - clock.aware(created_at)).total_seconds())


def request_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def idempotency_digest(key_id: str | None, key: str) -> str:
    """What the store keeps of an Idempotency-Key: scoped to the API key that sent it (another user of the tenant
    neither replays nor collides with it), of fixed length, and never the client's raw bytes (a NUL in a key cannot
    reach PostgreSQL). Key ids never contain a newline, so the pair is unambiguous."""
    return hashlib.sha256(f"{key_id or ''}\n{key}".encode()).hexdigest()


def _aware(m: Mapping[Any, Any], *keys: str) -> dict[str, Any]:
    return {k: clock.aware(m[k]) for k in keys}


def _job(row: sa.Row | Mapping[str, Any]) -> JobRecord:
    m = row._mapping if isinstance(row, sa.Row) else row
    return JobRecord(
        **{k: m[k] for k in ("id", "tenant", "priority", "model", "request", "request_id", "idempotency_key")},
        state=JobState(m["state"]),
        attempts=m["attempts"],
        max_attempts=m["max_attempts"],
        lease_owner=m["lease_owner"],
        lease_expires_at=clock.aware(m["lease_expires_at"]),
        cancel_requested=bool(m["cancel_requested"]),
        progress_step=m["progress_step"],
        progress_total=m["progress_total"],
        result=m["result"],
        error=m["error"],
        **_aware(m, "created_at", "updated_at", "started_at", "finished_at"),
        fair_tag=m["fair_tag"],
        batch_key=m["batch_key"],
        timeout_seconds=m["timeout_seconds"],
        key_id=m["key_id"],
        images_requested=m["images_requested"],
        prompt_redacted_at=clock.aware(m["prompt_redacted_at"]),
        gpu_seconds=m["gpu_seconds"],
    )


def job_event(row: sa.Row) -> JobEvent:
    return JobEvent(id=row.id, job_id=row.job_id, type=row.type, data=row.data, created_at=clock.aware(row.created_at))


def image_record(row: sa.Row | sa.RowMapping) -> ImageRecord:
    """An `images` row (alone, or joined with other tables' columns) as an ImageRecord."""
    m = row._mapping if isinstance(row, sa.Row) else row
    values = {column.name: m[column.name] for column in images.c}
    for key in ("created_at", "reviewed_at", "deleted_at"):
        values[key] = clock.aware(values[key])
    return ImageRecord(**values)


POSITION_CAP = 1000
"""Queue positions are exact up to here; a job further back reads `POSITION_CAP + 1` ("more than this many ahead").
Counting is an index-only range scan, so the bound keeps a status read's cost flat at any depth."""

_EWMA = 0.2  # weight of the newest job in a model's seconds-per-step (after the first few, which average plainly)
_TERMINAL = tuple(s.value for s in JobState if s.terminal)
_GIVES_BACK = (JobState.failed, JobState.cancelled, JobState.dead)  # images that will never be made stop counting
_QUEUED = JobState.queued.value
_WORKER_FRESH_SECONDS = 60.0


class SubmitOptions(TypedDict, total=False):
    """`JobStore.enqueue`'s keywords (see its docstring)."""

    tenant: str
    idempotency_key: str | None
    request_id: str | None
    body_hash: str | None
    max_attempts: int
    key_id: str | None
    admit: Callable[[sa.Connection, int], None] | None
    record: Callable[[sa.Connection, str], None] | None
    with_status: bool
    cache_key: str | None


# A submit's transaction for `GroupCommit`, and what answers it when its Idempotency-Key raced another's.
_Submit = tuple[
    Callable[[sa.Connection], tuple[JobStatus, bool]],
    Callable[[sa.exc.IntegrityError], tuple[JobStatus, bool]],
]


class JobStore:
    """Jobs in SQL.

    Scheduling lives in the claim's ORDER BY: priority class first, then a fair-queue tag. Each job's tag is
    `max(V, tenant's last tag) + n / weight`, where V is the smallest tag still queued in its class (or the largest
    ever given, when none is queued). A tenant's jobs get increasing tags (FIFO within the tenant), and a tenant that
    queues 10,000 jobs only pushes its *own* tags far ahead: another tenant's new job lands next to V and is served
    after at most one job per other backlogged tenant (weighted round-robin, i.e. start-time fair queuing).
    """

    def __init__(
        self,
        url: str,
        *,
        max_queue_depth: int = 10_000,
        max_tenant_queue_depth: int | None = None,
        tenant_weights: dict[str, float] | None = None,
    ) -> None:
        self.url = url
        self.engine = create_engine(url)
        self._submits = GroupCommit(self.engine)  # SQLite: concurrent submits share one transaction
        self.max_queue_depth = max_queue_depth
        self.max_tenant_queue_depth = max_tenant_queue_depth
        self._admit_snapshots: dict[int | None, Prepared] = {}  # by tenant limit (`_admit_to_queue`)
        self.tenant_weights = tenant_weights or {}

    def close(self) -> None:
        self._submits.close()
        self.engine.dispose()

    # --- API side -------------------------------------------------------------------------------------------------

    def create(self, request: GenerationRequest, **options: Any) -> tuple[JobRecord, bool]:
        """Insert a queued job (see `enqueue`); the job alone, without its queue position."""
        status, created = self.enqueue(request, with_status=False, **options)
        return status.job, created

    def enqueue(self, request: GenerationRequest, **options: Unpack[SubmitOptions]) -> tuple[JobStatus, bool]:
        """Insert a queued job in ONE write transaction (on SQLite shared with concurrent submits, each in a
        savepoint of its own: `group_commit`) and answer from what was written (no read-back). With an
        Idempotency-Key this caller already used, return that job instead (created=False), or 409 if the key was
        used for a different request body; the lookup runs inside the same transaction.

        Inside the transaction the job's images are charged to the tenant's day (`darkroom.auth.usage`); then
        `admit(conn, images_today)` may refuse the job (quotas: raise, and the charge rolls back with it), and
        `record(conn, job_id)` writes what must commit with it (the audit record). With a `cache_key`
        (`darkroom.jobs.result_cache`) an earlier job's images answer the request when there are any: the job is
        inserted already succeeded, in the same transaction, and never queued."""
        insert, replay = self._submit(request, **options)
        try:
            return self._submits.run(insert)
        except sa.exc.IntegrityError as raced:
            return replay(raced)

    async def enqueue_async(
        self, request: GenerationRequest, **options: Unpack[SubmitOptions]
    ) -> tuple[JobStatus, bool]:
        """`enqueue` for a coroutine (the API's submit routes): the same transaction, while the event loop goes on
        serving (`GroupCommit.run_async`)."""
        insert, replay = self._submit(request, **options)
        try:
            return await self._submits.run_async(insert)
        except sa.exc.IntegrityError as raced:
            return await anyio.to_thread.run_sync(replay, raced)

    def _submit(
        self,
        request: GenerationRequest,
        *,
        tenant: str = "default",
        idempotency_key: str | None = None,
        request_id: str | None = None,
        body_hash: str | None = None,
        max_attempts: int = 3,
        key_id: str | None = None,
        admit: Callable[[sa.Connection, int], None] | None = None,
        record: Callable[[sa.Connection, str], None] | None = None,
        with_status: bool = True,
        cache_key: str | None = None,
    ) -> _Submit:
        """`enqueue`'s transaction as work for `GroupCommit`, and what answers a submit whose Idempotency-Key raced."""
        if request.seed is None:
            raise ValueError("resolve the seed before creating the job")
        body_hash = body_hash or request_hash(request.model_dump(mode="json"))
        scoped_key = idempotency_digest(key_id, idempotency_key) if idempotency_key else None
        now = clock.utcnow()
        priority = PRIORITY_VALUE[request.priority]
        row = self._new_row(request, tenant, priority, now, scoped_key, body_hash, request_id, max_attempts, key_id)

        def insert(conn: sa.Connection) -> tuple[JobStatus, bool]:
            if scoped_key and (existing := self._by_idempotency_key(conn, tenant, scoped_key)):
                job = self._same_request(existing, body_hash)
                return (self._statuses(conn, [job])[0] if with_status else JobStatus(job)), False
            if cache_key is not None:
                row["cache_key"] = cache_key
                if (hit := result_cache.lookup(conn, cache_key, request.n)) is not None:
                    return self._from_cache(conn, row, hit, now, admit, record, with_status), True
            row["fair_tag"] = self._admit_to_queue(conn, tenant, priority, request.n)
            images_today = usage.charge_images(conn, tenant, now, request.n)
            if admit is not None:
                admit(conn, images_today)
            _INSERT_JOB.execute(conn, row)
            blob_refs.insert_uploads(conn, row["id"], row["request"])  # only jobs with uploads: one INSERT
            tags.insert_tags(conn, row)  # only tagged jobs: one INSERT
            self._event(conn, row["id"], "queued", {"priority": request.priority}, now)
            if record is not None:
                record(conn, row["id"])
            _shift_queued(conn, 1, row["id"])
            job = _job(row)
            return (self._statuses(conn, [job])[0] if with_status else JobStatus(job)), True

        def replay(raced: sa.exc.IntegrityError) -> tuple[JobStatus, bool]:
            """Two submits with the same key raced (PostgreSQL; SQLite's write lock serialises them); the other won."""
            if scoped_key is None:
                raise raced
            with read_tx(self.engine) as conn:
                existing = self._by_idempotency_key(conn, tenant, scoped_key)
                if existing is None:
                    raise raced
                job = self._same_request(existing, body_hash)
                return (self._statuses(conn, [job])[0] if with_status else JobStatus(job)), False

        return insert, replay

    def _from_cache(
        self,
        conn: sa.Connection,
        row: dict[str, Any],
        hit: result_cache.Hit,
        now: dt.datetime,
        admit: Callable[[sa.Connection, int], None] | None,
        record: Callable[[sa.Connection, str], None] | None,
        with_status: bool,
    ) -> JobStatus:
        """A cache hit: quotas and checks as for any job (the images count toward the day), then the job inserted
        succeeded with the hit's images (`result_cache.answer`), audited like any submit."""
        images_today = usage.charge_images(conn, row["tenant"], now, row["images_requested"])
        if admit is not None:
            admit(conn, images_today)
        job = _job(result_cache.answer(conn, row, hit, now, self._event))
        tags.insert_tags(conn, row)
        if record is not None:
            record(conn, row["id"])
        metrics.result_cache_hit()
        return self._statuses(conn, [job])[0] if with_status else JobStatus(job)

    @staticmethod
    def _new_row(
        request: GenerationRequest,
        tenant: str,
        priority: int,
        now: dt.datetime,
        scoped_key: str | None,
        body_hash: str,
        request_id: str | None,
        max_attempts: int,
        key_id: str | None,
    ) -> dict[str, Any]:
        """Every column of the new job, so the JobRecord is built from what was inserted."""
        return {
            "id": clock.new_id("job"),
            "state": JobState.queued.value,
            "tenant": tenant,
            "priority": priority,
            "model": request.model,
            "request": request.model_dump(mode="json"),
            "request_id": request_id,
            "idempotency_key": scoped_key,
            "request_hash": body_hash,
            "attempts": 0,
            "max_attempts": max_attempts,
            "lease_owner": None,
            "lease_expires_at": None,
            "cancel_requested": False,
            "progress_step": 0,
            "progress_total": request.steps,
            "result": None,
            "error": None,
            "created_at": now,
            "updated_at": now,
            "available_at": now,
            "started_at": None,
            "finished_at": None,
            "batch_key": request.batch_key(),
            "timeout_seconds": request.timeout_seconds,
            "key_id": key_id,
            "images_requested": request.n,
            "prompt_redacted_at": None,
            "gpu_seconds": None,
            "data_label": request.data_label or "internal",  # the API resolves it with the tenant's (engines.routing)
        }

    def _admit_to_queue(self, conn: sa.Connection, tenant: str, priority: int, n: int) -> float:
        """Depth limits and the new job's fair tag, from one SELECT of index lookups.

        The service-wide depth is the sum of `queue_counters` (16 rows, kept by every move into or out of
        `queued`): O(1) at any depth, where even a bounded count would read up to the limit's worth of index
        entries on every submit, inside the write lock. The per-tenant limit (`limits.max_tenant_queue_depth`,
        2,000 by default) is a bounded count (`count(*)` over at most `limit` entries of `ix_jobs_tenant_state`, a
        quarter of a millisecond at 2,000), run only once the whole queue is that deep: a counter per tenant would
        be one more row to write on every transition.
        Two PostgreSQL submits racing at a limit may both get in: the limits guard against floods, not invariants."""
        tenant_limit = self.max_tenant_queue_depth
        statement = self._admit_snapshots.get(tenant_limit)
        if statement is None:  # built once per limit (it is part of the SQL), then run by every submit
            statement = self._admit_snapshots[tenant_limit] = Prepared(_admit_snapshot(tenant_limit))
        snapshot = statement.execute(conn, {"b_tenant": tenant, "b_priority": priority}).one()
        if snapshot.depth >= self.max_queue_depth:
            raise QueueFull(
                f"the queue holds {self.max_queue_depth} jobs, its limit; try again later", self._retry_after(conn)
            )
        if tenant_limit is not None and snapshot.mine >= tenant_limit:
            raise QueueFull(
                f"tenant {tenant!r} has {tenant_limit} queued jobs, its limit; try again later",
                self._retry_after(conn),
                tenant=tenant,
            )
        vtime = snapshot.head if snapshot.head is not None else (snapshot.newest or 0.0)
        return max(vtime, snapshot.last or 0.0) + n / self.tenant_weights.get(tenant, 1.0)

    def _retry_after(self, conn: sa.Connection) -> int:
        """Seconds until about one job will have left the queue: a typical job's time over the active workers."""
        rates = self._rates(conn)
        per_job = statistics.fmean(rates.values()) * 20 if rates else 5.0
        return max(1, min(300, round(per_job / max(1, self._active_workers(conn)))))

    @staticmethod
    def _by_idempotency_key(conn: sa.Connection, tenant: str, scoped_key: str) -> sa.Row | None:
        return conn.execute(
            sa.select(jobs).where(jobs.c.tenant == tenant, jobs.c.idempotency_key == scoped_key)
        ).first()

    @staticmethod
    def _same_request(existing: sa.Row, body_hash: str) -> JobRecord:
        if existing.request_hash != body_hash:
            raise Conflict("this Idempotency-Key was already used for a different request", field="Idempotency-Key")
        return _job(existing)

    def get(self, job_id: str) -> JobRecord | None:
        with read_tx(self.engine) as conn:
            row = conn.execute(_BY_ID, {"id": job_id}).first()
        return _job(row) if row else None

    def require(self, job_id: str) -> JobRecord:
        job = self.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}", field="job_id")
        return job

    def status(self, job_id: str) -> JobStatus | None:
        """A job with its images, queue position and ETA: one read transaction, at most three statements."""
        with read_tx(self.engine) as conn:
            row = conn.execute(_BY_ID, {"id": job_id}).first()
            return self._statuses(conn, [_job(row)])[0] if row else None

    def outcome(self, job_id: str) -> JobStatus:
        """The job with the images of a succeeded one, without queue position or ETA: what a waiting handler reads
        when its job's terminal event arrives, in one read transaction (at most two statements)."""
        with read_tx(self.engine) as conn:
            row = conn.execute(_BY_ID, {"id": job_id}).first()
            if row is None:
                raise NotFound(f"no job {job_id!r}", field="job_id")
            job = _job(row)
            if job.state is not JobState.succeeded:
                return JobStatus(job)
            return JobStatus(job, [image_record(r) for r in conn.execute(_IMAGES_OF, {"job_id": job_id})])

    def status_of(self, job: JobRecord) -> JobStatus:
        """The status of a job already read (one read transaction, at most two statements)."""
        with read_tx(self.engine) as conn:
            return self._statuses(conn, [job])[0]

    def list(
        self,
        *,
        state: JobState | None = None,
        limit: int = 50,
        tenant: str | None = None,
        key_id: str | None = None,
    ) -> list[JobRecord]:
        """Newest first; `tenant` and `key_id` scope the listing to what a caller may see."""
        with read_tx(self.engine) as conn:
            return [_job(r) for r in conn.execute(self._listing(state, limit, tenant, key_id))]

    def list_status(
        self,
        *,
        state: JobState | None = None,
        limit: int = 50,
        tenant: str | None = None,
        key_id: str | None = None,
        tag: str | None = None,
    ) -> builtins.list[JobStatus]:
        """`list` with each job's status: one read transaction of at most four statements, whatever `limit`.
        `tag` (with `tenant`): only the jobs carrying it (`jobs.tags`)."""
        with read_tx(self.engine) as conn:
            listed = [_job(r) for r in conn.execute(self._listing(state, limit, tenant, key_id, tag))]
            return self._statuses(conn, listed)

    @staticmethod
    def _listing(
        state: JobState | None, limit: int, tenant: str | None, key_id: str | None, tag: str | None = None
    ) -> sa.Select:
        """Walks `ix_jobs_listing` (tenant, created_at DESC, id DESC) backwards from the newest: no sort. A tag
        narrows it to the ids `ix_job_tags_tenant_tag_created_at` holds for the tenant."""
        query = sa.select(jobs).order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit)
        if tag is not None:
            query = query.where(jobs.c.id.in_(tags.tagged(tenant, tag)))
        if state is not None:
            query = query.where(jobs.c.state == state.value)
        if tenant is not None:
            query = query.where(jobs.c.tenant == tenant)
        if key_id is not None:
            query = query.where(jobs.c.key_id == key_id)
        return query

    def queue_status(self, limit: int = 200) -> builtins.list[JobStatus]:
        """Every tenant's running jobs, then the queue's head in claim order (`ix_jobs_claim`), with their statuses:
        the operators' view of the whole queue. One read transaction."""
        with read_tx(self.engine) as conn:
            listed = [
                _job(row)
                for state in (JobState.running.value, _QUEUED)
                for row in conn.execute(
                    sa.select(jobs).where(jobs.c.state == state).order_by(*CLAIM_ORDER).limit(limit)
                )
            ]
            return self._statuses(conn, listed)

    def queue_position(self, job: JobRecord) -> int | None:
        """1-based place in the claim order (see `claim_batch`), at most `POSITION_CAP + 1`; None once the job left
        the queue."""
        return self.status_of(job).queue_position

    def eta_seconds(self, job: JobRecord, position: int | None = None) -> float | None:
        """Rough time to finish (see `_eta`); `position` is read again, as of now."""
        return self.status_of(job).eta_seconds

    def _statuses(self, conn: sa.Connection, listed: Sequence[JobRecord]) -> builtins.list[JobStatus]:
        """Images, positions and ETAs of `listed` in at most three statements, however many jobs: one IN query for
        the images of the succeeded ones; one SELECT of scalar subqueries (index lookups, and for a single queued
        job the bounded counts ahead of it) for the step rates and the active workers; and for several queued
        jobs one read of the queue's head (`_places_at_head`)."""
        done = [j.id for j in listed if j.state is JobState.succeeded]
        found: dict[str, list[ImageRecord]] = {job_id: [] for job_id in done}
        if done:
            query = sa.select(images).where(images.c.job_id.in_(done)).order_by(images.c.job_id, images.c.index)
            for row in conn.execute(query):
                found[row.job_id].append(image_record(row))
        live = [j for j in listed if not j.state.terminal]
        if not live:
            return [JobStatus(j, found.get(j.id, [])) for j in listed]
        queued = [j for j in live if j.state is JobState.queued]
        counted = queued if len(queued) == 1 else []  # several: one read of the queue's head serves them all
        models = sorted({_rate_key(j.model) for j in live})
        if len(live) == 1:  # a submit's answer, a status read: the statement is built once (see `_ONE_LIVE`)
            stats = _ONE_LIVE[bool(counted)].execute(conn, _one_live_params(live[0])).one()._mapping
        else:
            columns = [_ahead().label("p0")] if counted else []  # `counted` holds one job at most
            columns += [_rate_of(m).label(f"r{i}") for i, m in enumerate(models)]
            columns += [_any_rate().label("any_rate"), _active_workers_query().label("workers")]
            params = {**_workers_params(), **(_ahead_params(counted[0]) if counted else {})}
            stats = conn.execute(sa.select(*columns), params).one()._mapping
        positions = {j.id: min(stats[f"p{i}"], POSITION_CAP) + 1 for i, j in enumerate(counted)}
        if len(queued) > 1:
            positions = self._places_at_head(conn, queued)
        rates = {m: stats[f"r{i}"] for i, m in enumerate(models)}
        out = []
        for job in listed:
            position = positions.get(job.id)
            per_step = rates.get(_rate_key(job.model)) or stats["any_rate"]
            eta = None if job.state.terminal else _eta(job, position, per_step, max(1, stats["workers"] or 0))
            out.append(JobStatus(job, found.get(job.id, []), position, eta))
        return out

    @staticmethod
    def _places_at_head(conn: sa.Connection, queued: Sequence[JobRecord]) -> dict[str, int]:
        """Positions of several queued jobs from one index-only read of the first `POSITION_CAP` ids in claim
        order: a listing costs that read at most, where counting ahead of each job would cost it per job."""
        head = conn.execute(
            sa.select(jobs.c.id).where(jobs.c.state == _QUEUED).order_by(*CLAIM_ORDER).limit(POSITION_CAP)
        ).scalars()
        place = {job_id: i for i, job_id in enumerate(head, start=1)}
        return {j.id: place.get(j.id, POSITION_CAP + 1) for j in queued}

    @staticmethod
    def _rates(conn: sa.Connection) -> dict[str, float]:
        return dict(conn.execute(sa.select(step_rates.c.model, step_rates.c.seconds_per_step)).all())

    @staticmethod
    def _active_workers(conn: sa.Connection) -> int:
        return conn.execute(sa.select(_active_workers_query()), _workers_params()).scalar_one() or 0

    def cancel(self, job_id: str, record: Callable[[sa.Connection, dict], None] | None = None) -> JobRecord:
        """Queued: cancelled at once. Running: flagged; its worker stops at the next step. Each is one guarded
        UPDATE (a job that moved in between is never overwritten). `record(conn, details)` writes the audit record
        in the same transaction."""
        now = clock.utcnow()
        with write_tx(self.engine) as conn:
            every = tuple(jobs.c)
            moved = self._move(conn, job_id, JobState.queued, JobState.cancelled, now, returning=every, finished_at=now)
            if moved:
                was, event = JobState.queued, ("cancelled", {"while": "queued"})
                self._ended(conn, moved, now)
                _shift_queued(conn, -1, job_id)
            else:
                moved = self._move(
                    conn, job_id, JobState.running, JobState.running, now, returning=every, cancel_requested=True
                )
                was, event = JobState.running, ("cancel_requested", {})
            if not moved:
                state = conn.execute(sa.select(jobs.c.state).where(jobs.c.id == job_id)).scalar()
                if state is None:
                    raise NotFound(f"no job {job_id!r}", field="job_id")
                raise Conflict(f"job {job_id} is already {state}", field="job_id")
            self._event(conn, job_id, *event, now)
            if record is not None:
                record(conn, {"while": was.value})
        if was is JobState.queued:
            metrics.job_ended(JobState.cancelled.value, moved.model)
        return _job(moved)

    def events_since(self, job_id: str, after: int = 0, limit: int = 500) -> builtins.list[JobEvent]:
        query = (
            sa.select(job_events)
            .where(job_events.c.job_id == job_id, job_events.c.id > after)
            .order_by(job_events.c.id)
            .limit(limit)
        )
        with read_tx(self.engine) as conn:
            rows = conn.execute(query).all()
        return [job_event(r) for r in rows]

    def images_for(self, job_id: str) -> builtins.list[ImageRecord]:
        with read_tx(self.engine) as conn:
            rows = conn.execute(sa.select(images).where(images.c.job_id == job_id).order_by(images.c.index)).all()
        return [image_record(r) for r in rows]

    def get_image(self, image_id: str) -> ImageRecord | None:
        with read_tx(self.engine) as conn:
            row = conn.execute(sa.select(images).where(images.c.id == image_id)).first()
        return image_record(row) if row else None

    def backlog(self) -> tuple[int, float]:
        """The local backlog the overflow rule reads (engines/routing.py): queued jobs (`queue_counters`) and how long
        the next job to be claimed has waited, in seconds. One read transaction of two index lookups."""
        head = sa.select(jobs.c.created_at).where(jobs.c.state == _QUEUED).order_by(*CLAIM_ORDER).limit(1)
        with read_tx(self.engine) as conn:
            depth, created = conn.execute(sa.select(_queued_total(), head.scalar_subquery())).one()
        wait = (clock.utcnow() - clock.aware(created)).total_seconds() if created is not None else 0.0
        return int(depth or 0), max(0.0, wait)

    def counts(self) -> dict[str, int]:
        with read_tx(self.engine) as conn:
            rows = conn.execute(sa.select(jobs.c.state, sa.func.count()).group_by(jobs.c.state)).all()
        return {state: n for state, n in rows}

    # --- worker side ----------------------------------------------------------------------------------------------

    def claim(self, worker_id: str, lease_seconds: float, **options: Any) -> JobRecord | None:
        """Take the next job (see `claim_batch`). None when the queue is empty."""
        claimed = self.claim_batch(worker_id, lease_seconds, max_batch=1, **options)
        return claimed[0] if claimed else None

    def claim_batch(self, worker_id: str, lease_seconds: float, **options: Any) -> builtins.list[JobRecord]:
        """The jobs of `claim_next` (same options)."""
        return self.claim_next(worker_id, lease_seconds, **options).jobs

    def claim_next(
        self,
        worker_id: str,
        lease_seconds: float,
        *,
        max_batch: int = 1,
        held_models: Collection[str] = (),
        servable_models: Collection[str] | None = None,
        batch_key: str | None = None,
        affinity_window: int = 8,
        start_head: bool = False,
        labels: Collection[str] | None = None,
    ) -> ClaimedBatch:
        """Claim the next job and up to `max_batch - 1` queued jobs compatible with it (same batch key), in one
        transaction: one or two indexed SELECTs (`ix_jobs_claim`, `ix_jobs_claim_batch`: no sort at any depth; the
        second only when more jobs are ready than the head read), one guarded UPDATE … RETURNING, one INSERT of the
        `started` events.

        Order: priority class, then fair tag (see the class docstring). Model affinity: among the next
        `affinity_window` jobs of the top class, the first one for a model this worker already holds wins, so a
        worker switches models only when the queue asks for it. `servable_models` limits claims to models this
        worker has (verified) on disk; `batch_key` limits them to one compatibility class (filling a batch);
        `labels` to the data labels an external engine may take (engines/routing.py: never `confidential`).

        Attempts are charged when a job starts, so a worker that dies holding a batch costs an attempt only to the job
        it was running. A worker that runs the head of its claim next asks the claim to start it (`start_head`: its
        attempt and `started_at` in the same UPDATE, one transaction fewer per job); the other jobs are started by
        `start` when their turn comes."""
        now = clock.utcnow()
        ready = [jobs.c.state == _QUEUED, jobs.c.available_at <= now]
        if servable_models is not None:
            ready.append(jobs.c.model.in_(list(servable_models)))
        if batch_key is not None:
            ready.append(jobs.c.batch_key == batch_key)
        if labels is not None:
            ready.append(jobs.c.data_label.in_(list(labels)))
        with write_tx(self.engine) as conn:
            head = conn.execute(
                sa.select(jobs.c.id, jobs.c.model, jobs.c.batch_key, jobs.c.priority)
                .where(*ready)
                .order_by(*CLAIM_ORDER)
                .limit(affinity_window)
                .with_for_update(skip_locked=True)
            ).all()
            if not head:
                return ClaimedBatch([], drained=True)
            first = self._with_affinity(head, held_models)
            head_id = first.id if start_head else None
            ids = [first.id]
            if max_batch > 1 and first.batch_key and len(head) < affinity_window:
                # The head holds every ready job, in claim order: the batch-mates are among them (the query below
                # would return the same rows); one SELECT fewer for a short queue, the common case.
                ids += [r.id for r in head if r.id != first.id and r.batch_key == first.batch_key][: max_batch - 1]
            elif max_batch > 1 and first.batch_key:
                ids += (
                    conn.execute(
                        sa.select(jobs.c.id)
                        .where(*ready, jobs.c.batch_key == first.batch_key, jobs.c.id != first.id)
                        .order_by(*CLAIM_ORDER)
                        .limit(max_batch - 1)
                        .with_for_update(skip_locked=True)
                    )
                    .scalars()
                    .all()
                )
            rows = self._move(
                conn,
                ids,
                JobState.queued,
                JobState.running,
                now,
                returning=tuple(jobs.c),
                lease_owner=worker_id,
                lease_expires_at=now + dt.timedelta(seconds=lease_seconds),
                # The head runs next, so the claim starts it (`start`'s attempt and started_at, in this statement);
                # the rest of a batch is started by `start` when its turn comes.
                attempts=_SQL.head_attempts,
                started_at=_SQL.head_started_at,
                params={"p_head": head_id, "p_now": now},
                progress_step=0,
            )
            claimed = sorted((_job(r) for r in rows), key=lambda j: ids.index(j.id))
            # Every ready job was in `head`, and the claim took them all: nothing is left for this worker until a
            # new notice (or a retry's backoff ending), so it need not claim again before one.
            drained = len(head) < affinity_window and {r.id for r in head} <= set(ids)
            events = [
                {"worker": worker_id, "attempt": job.attempts + (job.id != head_id), "batch": len(claimed)}
                for job in claimed
            ]
            self._events(conn, [(job.id, "started", data) for job, data in zip(claimed, events, strict=True)], now)
            _shift_queued(conn, -len(claimed), worker_id)
        for job in claimed:
            if job.id == head_id:
                _started_metric(job.attempts, job.priority, job.created_at, now)
        return ClaimedBatch(claimed, drained=drained)

    @staticmethod
    def _with_affinity(head: Sequence[sa.Row], held: Collection[str]) -> sa.Row:
        top = head[0].priority
        return next((r for r in head if r.priority == top and r.model in held), head[0])

    def start(self, job_id: str, worker_id: str) -> int | None:
        """The worker begins running a job it claimed: charge the attempt now (not at claim), so a crash costs an
        attempt only to the job that was running. The attempt number, or None if the lease is no longer ours."""
        now = clock.utcnow()
        with write_tx(self.engine) as conn:
            rows = self._move(
                conn,
                job_id,
                JobState.running,
                JobState.running,
                now,
                owner=worker_id,
                returning=(jobs.c.attempts, jobs.c.priority, jobs.c.created_at),
                attempts=_SQL.next_attempt,
                started_at=now,
            )
        if rows:
            _started_metric(rows.attempts, rows.priority, rows.created_at, now)
        return rows.attempts if rows else None

    def heartbeat(self, job_id: str, worker_id: str, lease_seconds: float) -> LeaseAck:
        return self._touch(job_id, worker_id, lease_seconds, {})

    def progress(
        self, job_id: str, worker_id: str, step: int, total: int, lease_seconds: float, preview: str | None = None
    ) -> LeaseAck:
        """Record a step (and an optional preview, a data URL, carried by the progress event)."""
        extra = {"preview": preview} if preview else {}
        return self._touch(
            job_id, worker_id, lease_seconds, {"progress_step": step, "progress_total": total}, event=extra
        )

    def _touch(
        self, job_id: str, worker_id: str, lease_seconds: float, values: dict[str, Any], event: dict | None = None
    ) -> LeaseAck:
        """One guarded UPDATE … RETURNING cancel_requested (plus the progress event): one transaction."""
        now = clock.utcnow()
        with write_tx(self.engine) as conn:
            moved = self._move(
                conn,
                job_id,
                JobState.running,
                JobState.running,
                now,
                owner=worker_id,
                returning=(jobs.c.cancel_requested,),
                lease_expires_at=now + dt.timedelta(seconds=lease_seconds),
                **values,
            )
            if not moved:
                return LeaseAck(owned=False, cancel_requested=False)
            if event is not None:
                data = {"step": values["progress_step"], "total": values["progress_total"], **event}
                self._event(conn, job_id, "progress", data, now)
        return LeaseAck(owned=True, cancel_requested=bool(moved.cancel_requested))

    def complete(
        self,
        job_id: str,
        worker_id: str,
        new_images: builtins.list[NewImage],
        result: dict[str, Any],
        cost: float | None = None,
    ) -> bool:
        """Record success, its images, its cost (`darkroom.observability.cost`), the tenant's GPU-seconds and the
        model's step rate in one transaction; False (and nothing written) if we lost the lease."""
        now = clock.utcnow()
        gpu_seconds = (result.get("timings") or {}).get("worker_total_s")
        with write_tx(self.engine) as conn:
            done = self._move(
                conn,
                job_id,
                JobState.running,
                JobState.succeeded,
                now,
                owner=worker_id,
                returning=(
                    jobs.c.tenant,
                    jobs.c.model,
                    jobs.c.started_at,
                    jobs.c.progress_total,
                    jobs.c.images_requested,
                ),
                lease_owner=None,
                lease_expires_at=None,
                result=result,
                gpu_seconds=gpu_seconds,
                cost=cost,
                finished_at=now,
                progress_step=jobs.c.progress_total,
                error=None,
            )
            if not done:
                return False
            ids = [clock.new_id("img") for _ in new_images]
            if new_images:
                rows = [
                    {"id": i, "job_id": job_id, "tenant": done.tenant, "created_at": now, **img.__dict__}
                    for i, img in zip(ids, new_images, strict=True)
                ]
                conn.execute(_INSERT_IMAGES, rows)
            held = [i for i, img in zip(ids, new_images, strict=True) if img.review_state == "pending"]
            self._event(conn, job_id, "succeeded", {"images": ids, **({"held_for_review": held} if held else {})}, now)
            if gpu_seconds:
                usage.add_gpu_seconds(conn, done.tenant, now, float(gpu_seconds))
            started = clock.aware(done.started_at)
            if started is not None:
                steps = max(1, done.progress_total) * max(1, done.images_requested)
                _record_step_rate(conn, _rate_key(done.model), (now - started).total_seconds() / steps, now)
        metrics.job_ended(JobState.succeeded.value, done.model)
        return True

    def fail(
        self, job_id: str, worker_id: str, error: dict[str, Any], *, retry_in: float | None = None
    ) -> JobState | None:
        """Fail the attempt. With `retry_in`, requeue after that delay while attempts remain, else `dead`.
        One guarded UPDATE decides and moves (the state it lands in is computed in SQL from the row it guards);
        returns the new state, or None if we no longer own the job."""
        now = clock.utcnow()
        if retry_in is None:
            target: JobState | sa.ColumnElement = JobState.failed
            timing: dict[str, Any] = {"finished_at": now}
        else:
            target = _SQL.retry_or_dead
            timing = {
                "available_at": _SQL.retry_available_at,
                "finished_at": _SQL.retry_finished_at,
                "started_at": _SQL.retry_started_at,  # queued again: not started
                "params": {"p_due": now + dt.timedelta(seconds=retry_in), "p_now": now},
            }
        with write_tx(self.engine) as conn:
            moved = self._move(
                conn,
                job_id,
                JobState.running,
                target,
                now,
                owner=worker_id,
                returning=_ENDING,
                error=error,
                lease_owner=None,
                lease_expires_at=None,
                **timing,
            )
            if not moved:
                return None
            state = JobState(moved.state)
            self._ended(conn, moved, now)
            kind = "retrying" if state is JobState.queued else state.value
            self._event(conn, job_id, kind, {"error": error, "attempt": moved.attempts}, now)
            if state is JobState.queued:
                _shift_queued(conn, 1, job_id)
        metrics.job_error(error.get("code"))
        if state is not JobState.queued:
            metrics.job_ended(state.value, moved.model)
        return state

    def finish_cancelled(self, job_id: str, worker_id: str) -> bool:
        now = clock.utcnow()
        with write_tx(self.engine) as conn:
            moved = self._move(
                conn,
                job_id,
                JobState.running,
                JobState.cancelled,
                now,
                owner=worker_id,
                returning=_ENDING,
                lease_owner=None,
                lease_expires_at=None,
                finished_at=now,
            )
            if moved:
                self._ended(conn, moved, now)
                self._event(conn, job_id, "cancelled", {"while": "running"}, now)
        if moved:
            metrics.job_ended(JobState.cancelled.value, moved.model)
        return moved is not None

    def release(self, job_id: str, worker_id: str, reason: str = "worker draining") -> bool:
        """Give a claimed job back untouched (graceful drain, a device or storage failure): queued again, and an
        attempt `start` charged is given back."""
        now = clock.utcnow()
        with write_tx(self.engine) as conn:
            moved = self._move(
                conn,
                job_id,
                JobState.running,
                JobState.queued,
                now,
                owner=worker_id,
                lease_owner=None,
                lease_expires_at=None,
                available_at=now,
                attempts=_SQL.attempt_given_back,
                started_at=None,
                progress_step=0,
            )
            if moved:
                self._event(conn, job_id, "requeued", {"reason": reason, "worker": worker_id}, now)
                _shift_queued(conn, 1, job_id)
        return moved is not None

    def requeue_expired(self) -> builtins.list[str]:
        """Jobs whose worker stopped heartbeating go back to the queue (or end, if out of attempts / cancelled).
        Only a job that had started was charged an attempt (by `start`); its batch-mates go back as they were."""
        now = clock.utcnow()
        expired = (
            sa.select(*_RECLAIM)
            .where(jobs.c.state == JobState.running.value, jobs.c.lease_expires_at < now)
            .with_for_update(skip_locked=True)
        )
        with write_tx(self.engine) as conn:
            moved = self._reclaim(conn, conn.execute(expired).all(), "lease expired", now)
        return self._reclaimed(moved, "lease_lost")

    def requeue_stuck(self, grace_seconds: float, default_timeout: float | None) -> builtins.list[str]:
        """Jobs whose worker still heartbeats but whose run is `grace_seconds` past its time limit: the step callback
        would have ended it at the next step, so no step has come (a hung kernel, a deadlocked thread). They go back
        to the queue like a lost worker's, or end when out of attempts, and the worker's lease is taken away (its
        late writes are refused). Reads the running jobs (one per busy worker slot, through the state index)."""
        now = clock.utcnow()
        running = (
            sa.select(*_RECLAIM, jobs.c.timeout_seconds)
            .where(jobs.c.state == JobState.running.value, jobs.c.started_at.is_not(None))
            .with_for_update(skip_locked=True)
        )
        with write_tx(self.engine) as conn:
            stuck = []
            for row in conn.execute(running).all():
                limit = row.timeout_seconds or default_timeout
                started = clock.aware(row.started_at)
                if limit is not None and (now - started).total_seconds() > limit + grace_seconds:
                    stuck.append(row)
            moved = self._reclaim(conn, stuck, "stuck", now) if stuck else []
        return self._reclaimed(moved, "stuck")

    def _reclaim(
        self, conn: sa.Connection, rows: Sequence[sa.Row], reason: str, now: dt.datetime
    ) -> builtins.list[tuple[str, str, str | None]]:
        """Take running jobs away from their worker, each by the one guarded move (state and lease owner as read):
        back to the queue while attempts remain, else `dead`; a job with a cancel request ends `cancelled`. Returns
        (job id, new state, model) of each job moved."""
        moved_jobs, requeued = [], 0
        for row in rows:
            lost = {"worker": row.lease_owner, "attempt": row.attempts, "started": row.started_at is not None}
            common = {"owner": row.lease_owner, "returning": _ENDING, "lease_owner": None, "lease_expires_at": None}
            values: dict[str, Any]
            if row.cancel_requested:
                to, values, kind = JobState.cancelled, {"finished_at": now}, "cancelled"
                data: dict[str, Any] = {"while": reason}
            elif row.attempts >= row.max_attempts:
                code, what = ("lease_expired", "worker lost") if reason == "lease expired" else ("stuck", "stuck")
                error = {"code": code, "message": f"{what} {row.attempts} times", "field": None}
                to, values, kind = JobState.dead, {"finished_at": now, "error": error}, "dead"
                data = {"error": error, **lost}
            else:
                to, values, kind = JobState.queued, {"available_at": now, "started_at": None}, "requeued"
                data = {"reason": reason, **lost}
            moved = self._move(conn, row.id, JobState.running, to, now, **common, **values)
            if moved is None:
                continue
            moved_jobs.append((row.id, to.value, moved.model))
            requeued += to is JobState.queued
            self._ended(conn, moved, now)
            self._event(conn, row.id, kind, data, now)
        if requeued:
            _shift_queued(conn, requeued, "requeue")
        return moved_jobs

    @staticmethod
    def _reclaimed(moved: Sequence[tuple[str, str, str | None]], kind: str) -> builtins.list[str]:
        """After the commit: each reclaimed job counts as a failed attempt of `kind`; those that ended, as ended."""
        for _, state, model in moved:
            metrics.job_error(kind)
            if state != JobState.queued.value:
                metrics.job_ended(state, model)
        return [job_id for job_id, _, _ in moved]

    # --- helpers --------------------------------------------------------------------------------------------------

    @staticmethod
    def _move(
        conn: sa.Connection,
        job_ids: str | Sequence[str],
        from_state: JobState,
        to_state: JobState | sa.ColumnElement,
        now: dt.datetime,
        *,
        owner: str | None = None,
        returning: Sequence[sa.ColumnElement] = (jobs.c.id,),
        params: Mapping[str, Any] | None = None,
        **values: Any,
    ) -> Any:
        """THE way a job changes: one UPDATE guarded by the state it must be in and, for a worker's write, the lease
        it must hold (`WHERE id=? AND state=? AND lease_owner=?`), RETURNING what the caller needs. Nothing is
        read first, so nothing can change between a check and the write. For one id: the returned row, or None if
        the guard failed (someone else moved the job first); for a list of ids: the rows that moved.

        `values` are plain values (bound as parameters) or SQL computed from the row, which must be one of the
        `_SQL` expressions built once below (`params` binds theirs): the statement of each shape is built once
        (`_move_statement`), because building and hashing it cost more than SQLite's work."""
        many = not isinstance(job_ids, str)
        plain = {k: v for k, v in values.items() if not isinstance(v, sa.ColumnElement)}
        shape = tuple(sorted((k, None if k in plain else _sql_ref(v)) for k, v in values.items()))
        to = None if isinstance(to_state, JobState) else _sql_ref(to_state)  # None: bound, whichever state
        stmt = _move_statement(many, owner is not None, to, tuple(c.key for c in returning), shape)
        bound = {f"v_{k}": v for k, v in plain.items()}
        bound.update(params or {}, m_from=from_state.value, m_now=now, m_owner=owner)
        bound["m_ids" if many else "m_id"] = list(job_ids) if many else job_ids
        if isinstance(to_state, JobState):
            bound["m_to"] = to_state.value
        rows = conn.execute(stmt, bound).all()
        return rows if many else (rows[0] if rows else None)

    @staticmethod
    def _ended(conn: sa.Connection, moved: sa.Row, now: dt.datetime) -> None:
        """A job that ended without images gives them back to its tenant's day; one that is queued again is news
        for idle workers."""
        state = JobState(moved.state)
        if state in _GIVES_BACK:
            usage.give_back_images(conn, moved.tenant, clock.aware(moved.created_at), moved.images_requested)
        elif state is JobState.queued:
            announce(conn)

    def _event(self, conn: sa.Connection, job_id: str, kind: str, data: dict[str, Any], now: dt.datetime) -> None:
        self._events(conn, [(job_id, kind, data)], now)

    @staticmethod
    def _events(conn: sa.Connection, events: Sequence[tuple[str, str, dict[str, Any]]], now: dt.datetime) -> None:
        """Insert events (one statement) and announce them: PostgreSQL wakes the change feed's listeners on commit."""
        rows = [{"job_id": job_id, "type": kind, "data": data, "created_at": now} for job_id, kind, data in events]
        _INSERT_EVENT.execute(conn, rows)
        announce(conn)


# What taking a job away from its worker reads of it (`_reclaim`).
_RECLAIM = (
    jobs.c.id,
    jobs.c.attempts,
    jobs.c.max_attempts,
    jobs.c.cancel_requested,
    jobs.c.lease_owner,
    jobs.c.started_at,
)
_ENDING = (jobs.c.state, jobs.c.attempts, jobs.c.tenant, jobs.c.created_at, jobs.c.images_requested, jobs.c.model)
_INSERT_EVENT = PreparedInsert(job_events)
_INSERT_JOB = PreparedInsert(jobs)  # every column of the new job (`_new_row`)
_INSERT_IMAGES = images.insert()


class _SQL:
    """The values computed from the row that job moves use, each built once so `_move` can reuse its statement.
    Their `p_…` parameters come with the move (`params`)."""

    _left = jobs.c.attempts < jobs.c.max_attempts
    _now = sa.bindparam("p_now", type_=jobs.c.started_at.type)
    next_attempt = jobs.c.attempts + 1
    # A claim starts its head job (`p_head`; None starts none).
    head_attempts = sa.case((jobs.c.id == sa.bindparam("p_head"), next_attempt), else_=jobs.c.attempts)
    head_started_at = sa.case((jobs.c.id == sa.bindparam("p_head"), _now), else_=sa.null())
    # A failed attempt: queued again after `p_due` while attempts remain, else dead.
    retry_or_dead = sa.case((_left, _QUEUED), else_=JobState.dead.value)
    retry_available_at = sa.case(
        (_left, sa.bindparam("p_due", type_=jobs.c.available_at.type)), else_=jobs.c.available_at
    )
    retry_finished_at = sa.case((_left, sa.null()), else_=_now)
    retry_started_at = sa.case((_left, sa.null()), else_=jobs.c.started_at)
    # A released job gives back the attempt `start` charged, if it had started.
    attempt_given_back = jobs.c.attempts - sa.case((jobs.c.started_at.is_not(None), 1), else_=0)


_STABLE: dict[int, sa.ColumnElement] = {
    id(v): v for v in (*vars(_SQL).values(), *jobs.c) if isinstance(v, sa.ColumnElement)
}


def _sql_ref(value: sa.ColumnElement) -> int:
    """The key of a computed value in `_move_statement`'s cache: only expressions built once may be passed (one built
    per call would build a statement per call, and its id could later name another)."""
    if id(value) not in _STABLE:
        raise TypeError(f"job moves take SQL values built once (JobStore's _SQL or a jobs column), not {value!r}")
    return id(value)


@functools.lru_cache(maxsize=128)
def _move_statement(
    many: bool, owned: bool, to: int | None, returning: tuple[str, ...], shape: tuple[tuple[str, int | None], ...]
) -> sa.Update:
    """`_move`'s guarded UPDATE for one shape: which guard, which target state (None: bound as `m_to`; else
    computed, an `_STABLE` id), which columns it sets (bound as `v_<column>`, or computed) and returns. Bound values
    carry their column's type, so JSON and timestamps are converted as with `.values()`."""
    target = jobs.c.id.in_(sa.bindparam("m_ids", expanding=True)) if many else jobs.c.id == sa.bindparam("m_id")
    guard = [target, jobs.c.state == sa.bindparam("m_from")]
    if owned:
        guard.append(jobs.c.lease_owner == sa.bindparam("m_owner"))
    state = sa.bindparam("m_to") if to is None else _STABLE[to]
    values = {
        column: sa.bindparam(f"v_{column}", type_=jobs.c[column].type) if ref is None else _STABLE[ref]
        for column, ref in shape
    }
    updated = sa.bindparam("m_now", type_=jobs.c.updated_at.type)
    return (
        jobs.update()
        .where(*guard)
        .values(state=state, updated_at=updated, **values)
        .returning(*(jobs.c[name] for name in returning))
    )


def _shift_queued(conn: sa.Connection, delta: int, spread_by: str) -> None:
    """Move the queue-depth counter by `delta` in the caller's transaction, always as its last write (one lock
    order for every transaction: job rows, usage counters, then this), on the shard `spread_by` hashes to."""
    if delta:
        _SHIFT_QUEUED.execute(conn, {"which_shard": zlib.crc32(spread_by.encode()) % QUEUE_SHARDS, "delta": delta})


# Built once, with bind parameters: SQLAlchemy's statement construction costs more than SQLite's work for a lookup
# by primary key, and these run on every status read and every woken waiter.
_BY_ID = sa.select(jobs).where(jobs.c.id == sa.bindparam("id"))
_IMAGES_OF = sa.select(images).where(images.c.job_id == sa.bindparam("job_id")).order_by(images.c.index)

_SHIFT_QUEUED = Prepared(  # every submit, claim and finish runs it
    queue_counters.update()
    .where(queue_counters.c.shard == sa.bindparam("which_shard"))
    .values(queued=queue_counters.c.queued + sa.bindparam("delta", type_=queue_counters.c.queued.type))
)


def _queued_total() -> sa.ScalarSelect:
    return sa.select(sa.func.coalesce(sa.func.sum(queue_counters.c.queued), 0)).scalar_subquery()


def _bounded_count(
    limit: int, *where: sa.ColumnElement[bool], order: Sequence[sa.ColumnElement] = ()
) -> sa.ScalarSelect:
    """`count(*)` of at most `limit` rows: reads no more index entries than that, however many match. `order`
    names the index to walk: with a LIMIT, a planner may otherwise pick any index on `state` and filter, which
    reads the whole queue when few rows match."""
    inner = sa.select(sa.literal(1).label("one")).select_from(jobs).where(*where).order_by(*order).limit(limit)
    return sa.select(sa.func.count()).select_from(inner.subquery()).scalar_subquery()


def _first(order: sa.ColumnElement, *where: sa.ColumnElement[bool]) -> sa.ScalarSelect:
    """The first `fair_tag` in index order (an index seek), instead of min()/max() that a planner may scan for."""
    return sa.select(jobs.c.fair_tag).where(*where).order_by(order).limit(1).scalar_subquery()


def _admit_snapshot(tenant_limit: int | None) -> sa.Select:
    """`_admit_to_queue`'s one SELECT, for a tenant and class given as bound parameters (`b_tenant`, `b_priority`)."""
    queued, in_class = (
        jobs.c.state == _QUEUED,
        jobs.c.priority == sa.bindparam("b_priority", type_=jobs.c.priority.type),
    )
    mine = jobs.c.tenant == sa.bindparam("b_tenant", type_=jobs.c.tenant.type)
    depth = _queued_total()
    # The tenant's own count only where the whole queue holds as many as its limit: below that the tenant cannot be
    # over it, and the count (up to `tenant_limit` index entries, a quarter of a millisecond at 2,000 and a
    # millisecond at 100,000, inside the write lock) is skipped. Both databases evaluate a CASE branch, and the
    # subquery in it, only when it is taken.
    mine_count = (
        sa.case((depth >= tenant_limit, _bounded_count(tenant_limit, queued, mine)), else_=0)
        if tenant_limit
        else sa.null()
    )
    return sa.select(
        depth.label("depth"),
        mine_count.label("mine"),
        _first(jobs.c.fair_tag, queued, in_class).label("head"),
        _first(jobs.c.fair_tag.desc(), in_class).label("newest"),
        _first(jobs.c.fair_tag.desc(), mine, in_class).label("last"),
    )


def _ahead() -> sa.ColumnElement:
    """Queued jobs the claim takes before a job given as bound parameters (`_ahead_params`), each part counted to at
    most `POSITION_CAP + 1`: higher classes, its own class with a smaller fair tag, and the (rare) ties on its tag
    that are older. Each part is one plain range of `ix_jobs_claim`, read index-only; a single row-value comparison
    over (fair_tag, created_at, id) would be just as exact, but planners estimate it poorly (PostgreSQL walked
    another index for it)."""
    queued = jobs.c.state == _QUEUED
    priority = sa.bindparam("priority", type_=jobs.c.priority.type)
    tag = sa.bindparam("tag", type_=jobs.c.fair_tag.type)
    created = sa.bindparam("created", type_=jobs.c.created_at.type)
    same_class = jobs.c.priority == priority
    older = sa.tuple_(jobs.c.created_at, jobs.c.id) < sa.tuple_(created, sa.bindparam("jid", type_=jobs.c.id.type))
    cap, order = POSITION_CAP + 1, CLAIM_ORDER
    higher = _bounded_count(cap, queued, jobs.c.priority > priority, order=order)
    lower_tag = _bounded_count(cap, queued, same_class, jobs.c.fair_tag < tag, order=order)
    tied = _bounded_count(cap, queued, same_class, jobs.c.fair_tag == tag, older, order=order)
    return higher + lower_tag + tied


def _ahead_params(job: JobRecord) -> dict[str, Any]:
    return {"priority": job.priority, "tag": job.fair_tag, "created": job.created_at, "jid": job.id}


def _one_live_statement(with_position: bool) -> sa.Select:
    """What `_statuses` reads for one unfinished job, with bound parameters (`_one_live_params`). Built once at
    import: constructing these nested selects (and their cache keys) per call cost about a sixth of a submit's CPU."""
    rate = sa.select(step_rates.c.seconds_per_step).where(step_rates.c.model == sa.bindparam("model"))
    columns = [_ahead().label("p0")] if with_position else []
    columns += [rate.scalar_subquery().label("r0"), _any_rate().label("any_rate")]
    return sa.select(*columns, _active_workers_query().label("workers"))


def _one_live_params(job: JobRecord) -> dict[str, Any]:
    params = {"model": _rate_key(job.model), **_workers_params()}
    return {**params, **_ahead_params(job)} if job.state is JobState.queued else params


def _rate_key(model: str | None) -> str:
    """`step_rates` is keyed by model id; jobs without one (the default model, resolved later) share a key."""
    return model or "-"


def _rate_of(model: str) -> sa.ScalarSelect:
    return sa.select(step_rates.c.seconds_per_step).where(step_rates.c.model == model).scalar_subquery()


def _any_rate() -> sa.ScalarSelect:
    return sa.select(sa.func.avg(step_rates.c.seconds_per_step)).scalar_subquery()


def _active_workers_query() -> sa.ScalarSelect:
    """Workers that reported in the last minute, from the worker registry (`ix_workers_state_last_heartbeat_at`, a
    table of one row per worker). Counting the distinct lease owners of running jobs instead would make planners
    scan `jobs`: they cannot tell from their statistics that few rows are running."""
    recent = sa.bindparam("recent", type_=workers.c.last_heartbeat_at.type)  # `_workers_params`
    alive = workers.c.state == "active", workers.c.last_heartbeat_at > recent
    return sa.select(sa.func.count()).select_from(workers).where(*alive).scalar_subquery()


def _workers_params() -> dict[str, Any]:
    return {"recent": clock.utcnow() - dt.timedelta(seconds=_WORKER_FRESH_SECONDS)}


def _eta(job: JobRecord, position: int | None, per_step: float | None, workers: int) -> float | None:
    """Rough time to finish: seconds per step of its model (else of any model), times its steps and images, plus
    the jobs ahead shared by the active workers."""
    if per_step is None:
        return None
    steps = job.progress_total or job.request.get("steps", 0)
    own = per_step * steps * job.request.get("n", 1)
    if job.state is JobState.running:
        return round(own * (1 - job.progress_step / max(1, steps)), 2)
    ahead = (position or 1) - 1
    return round(own + ahead * own / workers, 2)


def _record_step_rate(conn: sa.Connection, model: str, seconds_per_step: float, now: dt.datetime) -> None:
    """Fold one finished job into its model's seconds-per-step: a plain mean over the first samples, then an
    exponentially weighted one, so the ETA follows the device's current speed without reading old jobs."""
    params = {"r_model": model, "r_seconds": seconds_per_step, "r_now": now}
    conn.execute(_STEP_RATE_UPSERTS[conn.dialect.name == "postgresql"], params)


def _step_rate_upsert(postgres: bool) -> sa.Insert:
    """`_record_step_rate`'s upsert, built once per dialect (every completion runs it)."""
    insert = postgresql.insert if postgres else sqlite.insert
    now = sa.bindparam("r_now", type_=step_rates.c.updated_at.type)
    stmt = insert(step_rates).values(
        model=sa.bindparam("r_model"), seconds_per_step=sa.bindparam("r_seconds"), samples=1, updated_at=now
    )
    old, new, n = step_rates.c.seconds_per_step, stmt.excluded.seconds_per_step, step_rates.c.samples
    weight = sa.case((n < int(1 / _EWMA), 1.0 / (n + 1)), else_=_EWMA)
    return stmt.on_conflict_do_update(
        index_elements=["model"],
        set_={"seconds_per_step": old + (new - old) * weight, "samples": n + 1, "updated_at": now},
    )


_STEP_RATE_UPSERTS = {False: _step_rate_upsert(False), True: _step_rate_upsert(True)}  # by: PostgreSQL


_ONE_LIVE = {True: Prepared(_one_live_statement(True)), False: Prepared(_one_live_statement(False))}  # by: position
