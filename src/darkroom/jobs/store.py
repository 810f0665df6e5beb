"""The job store: every state change of a job is one short transaction here.

Portable SQL only (SQLite and PostgreSQL): a claim selects the next job `FOR UPDATE SKIP LOCKED` (a no-op on SQLite,
where `BEGIN IMMEDIATE` already serialises writers) and then moves it with a guarded `UPDATE … WHERE state='queued'`.
Every worker-side write is guarded by `lease_owner`, so a worker whose lease expired can never overwrite the job
another worker now owns: a job succeeds exactly once.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from darkroom import clock
from darkroom.errors import Conflict, DarkroomError, NotFound
from darkroom.jobs.db import create_engine, read_tx, write_tx
from darkroom.jobs.notify import announce
from darkroom.jobs.tables import images, job_events, jobs
from darkroom.schemas import PRIORITY_VALUE, GenerationRequest, JobEvent, JobState


class QueueFull(DarkroomError):
    status = 429
    code = "queue_full"

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message, field="queue")
        self.retry_after = retry_after


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
class LeaseAck:
    """Answer to a heartbeat or progress report: do we still own the job, and does its owner want it stopped?"""

    owned: bool
    cancel_requested: bool


def request_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _job(row: sa.Row) -> JobRecord:
    m = row._mapping
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
        **{k: clock.aware(m[k]) for k in ("created_at", "updated_at", "started_at", "finished_at")},
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
        self.max_queue_depth = max_queue_depth
        self.max_tenant_queue_depth = max_tenant_queue_depth
        self.tenant_weights = tenant_weights or {}

    def close(self) -> None:
        self.engine.dispose()

    # --- API side -------------------------------------------------------------------------------------------------

    def create(
        self,
        request: GenerationRequest,
        *,
        tenant: str = "default",
        idempotency_key: str | None = None,
        request_id: str | None = None,
        body_hash: str | None = None,
        max_attempts: int = 3,
        key_id: str | None = None,
        admit: Callable[[sa.Connection], None] | None = None,
        record: Callable[[sa.Connection, str], None] | None = None,
    ) -> tuple[JobRecord, bool]:
        """Insert a queued job. With an idempotency key already used by this tenant, return that job instead
        (created=False) — or 409 if the key was used for a different request body.

        Inside the inserting transaction, `admit(conn)` may refuse the job (quotas: raise), and `record(conn, job_id)`
        writes what must commit with it (the audit record)."""
        if request.seed is None:
            raise ValueError("resolve the seed before creating the job")
        body_hash = body_hash or request_hash(request.model_dump(mode="json"))
        if idempotency_key and (existing := self._by_idempotency_key(tenant, idempotency_key)):
            return self._same_request(existing, body_hash), False
        now = clock.utcnow()
        job_id = clock.new_id("job")
        try:
            with write_tx(self.engine) as conn:
                self._check_depth(conn, tenant)
                if admit is not None:
                    admit(conn)
                priority = PRIORITY_VALUE[request.priority]
                conn.execute(
                    jobs.insert().values(
                        id=job_id,
                        state=JobState.queued.value,
                        tenant=tenant,
                        priority=PRIORITY_VALUE[request.priority],
                        model=request.model,
                        request=request.model_dump(mode="json"),
                        request_id=request_id,
                        idempotency_key=idempotency_key,
                        request_hash=body_hash,
                        attempts=0,
                        max_attempts=max_attempts,
                        cancel_requested=False,
                        progress_step=0,
                        progress_total=request.steps,
                        created_at=now,
                        updated_at=now,
                        available_at=now,
                        fair_tag=self._fair_tag(conn, tenant, priority, request.n),
                        batch_key=request.batch_key(),
                        timeout_seconds=request.timeout_seconds,
                        key_id=key_id,
                        images_requested=request.n,
                    )
                )
                self._event(conn, job_id, "queued", {"priority": request.priority}, now)
                if record is not None:
                    record(conn, job_id)
                announce(conn)
        except sa.exc.IntegrityError:
            # Two submits with the same key raced; the other one won.
            existing = self._by_idempotency_key(tenant, idempotency_key or "")
            if existing is None:
                raise
            return self._same_request(existing, body_hash), False
        job = self.get(job_id)
        assert job is not None
        return job, True

    def _check_depth(self, conn: sa.Connection, tenant: str) -> None:
        queued = jobs.c.state == JobState.queued.value
        depth = conn.execute(sa.select(sa.func.count()).select_from(jobs).where(queued)).scalar_one()
        if depth >= self.max_queue_depth:
            raise QueueFull(f"the queue holds {depth} jobs, its limit; try again later", self._retry_after(conn, 1))
        if self.max_tenant_queue_depth is None:
            return
        mine = conn.execute(
            sa.select(sa.func.count()).select_from(jobs).where(queued, jobs.c.tenant == tenant)
        ).scalar_one()
        if mine >= self.max_tenant_queue_depth:
            raise QueueFull(
                f"tenant {tenant!r} has {mine} queued jobs, its limit; try again later", self._retry_after(conn, 1)
            )

    def _retry_after(self, conn: sa.Connection, jobs_to_drain: int) -> int:
        """Seconds until about `jobs_to_drain` jobs will have left the queue, from recent completions."""
        per_job = self._recent_job_seconds(conn)
        return max(1, min(300, round(per_job * jobs_to_drain / max(1, self._active_workers(conn)))))

    def _fair_tag(self, conn: sa.Connection, tenant: str, priority: int, n: int) -> float:
        in_class = jobs.c.priority == priority
        vtime = conn.execute(
            sa.select(sa.func.min(jobs.c.fair_tag)).where(jobs.c.state == JobState.queued.value, in_class)
        ).scalar()
        if vtime is None:
            vtime = conn.execute(sa.select(sa.func.max(jobs.c.fair_tag)).where(in_class)).scalar() or 0.0
        last = conn.execute(sa.select(sa.func.max(jobs.c.fair_tag)).where(jobs.c.tenant == tenant, in_class)).scalar()
        return max(vtime, last or 0.0) + n / self.tenant_weights.get(tenant, 1.0)

    def _by_idempotency_key(self, tenant: str, key: str) -> JobRecord | None:
        with read_tx(self.engine) as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.tenant == tenant, jobs.c.idempotency_key == key)).first()
        return _job(row) if row else None

    def _same_request(self, job: JobRecord, body_hash: str) -> JobRecord:
        with read_tx(self.engine) as conn:
            stored = conn.execute(sa.select(jobs.c.request_hash).where(jobs.c.id == job.id)).scalar_one()
        if stored != body_hash:
            raise Conflict("this Idempotency-Key was already used for a different request", field="Idempotency-Key")
        return job

    def get(self, job_id: str) -> JobRecord | None:
        with read_tx(self.engine) as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
        return _job(row) if row else None

    def require(self, job_id: str) -> JobRecord:
        job = self.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}", field="job_id")
        return job

    def list(
        self,
        *,
        state: JobState | None = None,
        limit: int = 50,
        tenant: str | None = None,
        key_id: str | None = None,
    ) -> list[JobRecord]:
        """Newest first; `tenant` and `key_id` scope the listing to what a caller may see."""
        query = sa.select(jobs).order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit)
        if state is not None:
            query = query.where(jobs.c.state == state.value)
        if tenant is not None:
            query = query.where(jobs.c.tenant == tenant)
        if key_id is not None:
            query = query.where(jobs.c.key_id == key_id)
        with read_tx(self.engine) as conn:
            return [_job(r) for r in conn.execute(query)]

    def queue_position(self, job: JobRecord) -> int | None:
        """1-based place in the claim order (see `claim_batch`); None once the job left the queue."""
        if job.state is not JobState.queued:
            return None
        key = sa.tuple_(jobs.c.fair_tag, jobs.c.created_at, jobs.c.id)
        ahead = sa.or_(
            jobs.c.priority > job.priority,
            sa.and_(jobs.c.priority == job.priority, key < sa.tuple_(job.fair_tag, job.created_at, job.id)),
        )
        query = sa.select(sa.func.count()).select_from(jobs).where(jobs.c.state == JobState.queued.value, ahead)
        with read_tx(self.engine) as conn:
            return conn.execute(query).scalar_one() + 1

    def eta_seconds(self, job: JobRecord, position: int | None) -> float | None:
        """Rough time to finish: recent seconds per job, times the jobs ahead shared by the active workers, plus
        what remains of this job's own steps."""
        if job.state.terminal:
            return None
        with read_tx(self.engine) as conn:
            per_step = self._recent_step_seconds(conn)
            workers = max(1, self._active_workers(conn))
        if per_step is None:
            return None
        steps = job.progress_total or job.request.get("steps", 0)
        own = per_step * steps * job.request.get("n", 1)
        if job.state is JobState.running:
            return round(own * (1 - job.progress_step / max(1, steps)), 2)
        ahead = (position or 1) - 1
        return round(own + ahead * own / workers, 2)

    def _recent_step_seconds(self, conn: sa.Connection, sample: int = 50) -> float | None:
        rows = conn.execute(
            sa.select(jobs.c.started_at, jobs.c.finished_at, jobs.c.progress_total, jobs.c.request)
            .where(jobs.c.state == JobState.succeeded.value)
            .order_by(jobs.c.finished_at.desc())
            .limit(sample)
        ).all()
        seconds = sum((clock.aware(r.finished_at) - clock.aware(r.started_at)).total_seconds() for r in rows)
        steps = sum(max(1, r.progress_total) * r.request.get("n", 1) for r in rows)
        return seconds / steps if rows and steps else None

    def _recent_job_seconds(self, conn: sa.Connection) -> float:
        per_step = self._recent_step_seconds(conn)
        return per_step * 20 if per_step is not None else 5.0

    @staticmethod
    def _active_workers(conn: sa.Connection) -> int:
        return conn.execute(
            sa.select(sa.func.count(sa.distinct(jobs.c.lease_owner))).where(jobs.c.state == JobState.running.value)
        ).scalar_one()

    def cancel(self, job_id: str, record: Callable[[sa.Connection, dict], None] | None = None) -> JobRecord:
        """Queued: cancelled at once. Running: flagged; its worker stops at the next step. `record(conn, details)`
        writes the audit record in the same transaction."""
        now = clock.utcnow()
        with write_tx(self.engine) as conn:
            row = conn.execute(sa.select(jobs.c.state).where(jobs.c.id == job_id)).first()
            if row is None:
                raise NotFound(f"no job {job_id!r}", field="job_id")
            state = JobState(row.state)
            if state is JobState.queued:
                self._set(conn, job_id, now, state=JobState.cancelled.value, finished_at=now)
                self._event(conn, job_id, "cancelled", {"while": "queued"}, now)
            elif state is JobState.running:
                self._set(conn, job_id, now, cancel_requested=True)
                self._event(conn, job_id, "cancel_requested", {}, now)
            else:
                raise Conflict(f"job {job_id} is already {state.value}", field="job_id")
            if record is not None:
                record(conn, {"while": state.value})
        return self.require(job_id)

    def events_since(self, job_id: str, after: int = 0, limit: int = 500) -> list[JobEvent]:
        query = (
            sa.select(job_events)
            .where(job_events.c.job_id == job_id, job_events.c.id > after)
            .order_by(job_events.c.id)
            .limit(limit)
        )
        with read_tx(self.engine) as conn:
            rows = conn.execute(query).all()
        return [job_event(r) for r in rows]

    def images_for(self, job_id: str) -> list[ImageRecord]:
        with read_tx(self.engine) as conn:
            rows = conn.execute(sa.select(images).where(images.c.job_id == job_id).order_by(images.c.index)).all()
        return [image_record(r) for r in rows]

    def get_image(self, image_id: str) -> ImageRecord | None:
        with read_tx(self.engine) as conn:
            row = conn.execute(sa.select(images).where(images.c.id == image_id)).first()
        return image_record(row) if row else None

    def counts(self) -> dict[str, int]:
        with read_tx(self.engine) as conn:
            rows = conn.execute(sa.select(jobs.c.state, sa.func.count()).group_by(jobs.c.state)).all()
        return {state: n for state, n in rows}

    # --- worker side ----------------------------------------------------------------------------------------------

    def claim(self, worker_id: str, lease_seconds: float, **options: Any) -> JobRecord | None:
        """Take the next job (see `claim_batch`). None when the queue is empty."""
        claimed = self.claim_batch(worker_id, lease_seconds, max_batch=1, **options)
        return claimed[0] if claimed else None

    def claim_batch(
        self,
        worker_id: str,
        lease_seconds: float,
        *,
        max_batch: int = 1,
        held_models: Collection[str] = (),
        servable_models: Collection[str] | None = None,
        batch_key: str | None = None,
        affinity_window: int = 8,
    ) -> list[JobRecord]:
        """Claim the next job and up to `max_batch - 1` queued jobs compatible with it (same batch key).

        Order: priority class, then fair tag (see the class docstring). Model affinity: among the next
        `affinity_window` jobs of the top class, the first one for a model this worker already holds wins, so a
        worker switches models only when the queue asks for it. `servable_models` limits claims to models this
        worker has (verified) on disk; `batch_key` limits them to one compatibility class (filling a batch).
        """
        now = clock.utcnow()
        ready = [jobs.c.state == JobState.queued.value, jobs.c.available_at <= now]
        if servable_models is not None:
            ready.append(jobs.c.model.in_(list(servable_models)))
        if batch_key is not None:
            ready.append(jobs.c.batch_key == batch_key)
        with write_tx(self.engine) as conn:
            head = conn.execute(
                sa.select(jobs.c.id, jobs.c.model, jobs.c.batch_key, jobs.c.priority)
                .where(*ready)
                .order_by(*self._queue_order())
                .limit(affinity_window)
                .with_for_update(skip_locked=True)
            ).all()
            if not head:
                return []
            first = self._with_affinity(head, held_models)
            ids = [first.id]
            if max_batch > 1 and first.batch_key:
                ids += (
                    conn.execute(
                        sa.select(jobs.c.id)
                        .where(*ready, jobs.c.batch_key == first.batch_key, jobs.c.id != first.id)
                        .order_by(*self._queue_order())
                        .limit(max_batch - 1)
                        .with_for_update(skip_locked=True)
                    )
                    .scalars()
                    .all()
                )
            conn.execute(
                jobs.update()
                .where(jobs.c.id.in_(ids), jobs.c.state == JobState.queued.value)
                .values(
                    state=JobState.running.value,
                    lease_owner=worker_id,
                    lease_expires_at=now + dt.timedelta(seconds=lease_seconds),
                    attempts=jobs.c.attempts + 1,
                    started_at=sa.func.coalesce(jobs.c.started_at, now),
                    updated_at=now,
                    progress_step=0,
                )
            )
            rows = conn.execute(sa.select(jobs).where(jobs.c.id.in_(ids), *self._owned_by(worker_id))).all()
            claimed = sorted((_job(r) for r in rows), key=lambda j: ids.index(j.id))
            for job in claimed:
                data = {"worker": worker_id, "attempt": job.attempts, "batch": len(claimed)}
                self._event(conn, job.id, "started", data, now)
        return claimed

    @staticmethod
    def _queue_order() -> tuple[sa.ColumnElement, ...]:
        return jobs.c.priority.desc(), jobs.c.fair_tag, jobs.c.created_at, jobs.c.id

    @staticmethod
    def _with_affinity(head: list[sa.Row], held: Collection[str]) -> sa.Row:
        top = head[0].priority
        return next((r for r in head if r.priority == top and r.model in held), head[0])

    @staticmethod
    def _owned_by(worker_id: str) -> tuple[sa.ColumnElement[bool], ...]:
        return jobs.c.lease_owner == worker_id, jobs.c.state == JobState.running.value

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
        now = clock.utcnow()
        with write_tx(self.engine) as conn:
            owned = conn.execute(
                jobs.update()
                .where(*self._owned(job_id, worker_id))
                .values(lease_expires_at=now + dt.timedelta(seconds=lease_seconds), updated_at=now, **values)
            ).rowcount
            if not owned:
                return LeaseAck(owned=False, cancel_requested=False)
            if event is not None:
                data = {"step": values["progress_step"], "total": values["progress_total"], **event}
                self._event(conn, job_id, "progress", data, now)
            cancel = conn.execute(sa.select(jobs.c.cancel_requested).where(jobs.c.id == job_id)).scalar_one()
        return LeaseAck(owned=True, cancel_requested=bool(cancel))

    def complete(self, job_id: str, worker_id: str, new_images: list[NewImage], result: dict[str, Any]) -> bool:
        """Record success and its images in one transaction; False (and nothing written) if we lost the lease."""
        now = clock.utcnow()
        with write_tx(self.engine) as conn:
            moved = self._leave(
                conn,
                job_id,
                worker_id,
                now,
                JobState.succeeded,
                result=result,
                gpu_seconds=(result.get("timings") or {}).get("worker_total_s"),
                finished_at=now,
                progress_step=jobs.c.progress_total,
                error=None,
            )
            if not moved:
                return False
            tenant = conn.execute(sa.select(jobs.c.tenant).where(jobs.c.id == job_id)).scalar_one()
            ids = []
            for img in new_images:
                image_id = clock.new_id("img")
                ids.append(image_id)
                conn.execute(
                    images.insert().values(id=image_id, job_id=job_id, tenant=tenant, created_at=now, **img.__dict__)
                )
            held = [i for i, img in zip(ids, new_images, strict=True) if img.review_state == "pending"]
            self._event(conn, job_id, "succeeded", {"images": ids, **({"held_for_review": held} if held else {})}, now)
        return True

    def fail(
        self, job_id: str, worker_id: str, error: dict[str, Any], *, retry_in: float | None = None
    ) -> JobState | None:
        """Fail the attempt. With `retry_in`, requeue after that delay while attempts remain, else `dead`.
        Returns the new state, or None if we no longer own the job."""
        now = clock.utcnow()
        with write_tx(self.engine) as conn:
            row = conn.execute(
                sa.select(jobs.c.attempts, jobs.c.max_attempts).where(*self._owned(job_id, worker_id))
            ).first()
            if row is None:
                return None
            if retry_in is not None and row.attempts < row.max_attempts:
                state, extra = JobState.queued, {"available_at": now + dt.timedelta(seconds=retry_in)}
            else:
                state = JobState.dead if retry_in is not None else JobState.failed
                extra = {"finished_at": now}
            self._set(
                conn, job_id, now, state=state.value, error=error, lease_owner=None, lease_expires_at=None, **extra
            )
            kind = "retrying" if state is JobState.queued else state.value
            self._event(conn, job_id, kind, {"error": error, "attempt": row.attempts}, now)
        return state

    def finish_cancelled(self, job_id: str, worker_id: str) -> bool:
        now = clock.utcnow()
        with write_tx(self.engine) as conn:
            moved = self._leave(conn, job_id, worker_id, now, JobState.cancelled, finished_at=now)
            if moved:
                self._event(conn, job_id, "cancelled", {"while": "running"}, now)
        return bool(moved)

    def release(self, job_id: str, worker_id: str, reason: str = "worker draining") -> bool:
        """Give a claimed job back untouched (graceful drain): queued again, and the attempt does not count."""
        now = clock.utcnow()
        with write_tx(self.engine) as conn:
            moved = self._leave(
                conn,
                job_id,
                worker_id,
                now,
                JobState.queued,
                available_at=now,
                attempts=jobs.c.attempts - 1,
                progress_step=0,
            )
            if moved:
                self._event(conn, job_id, "requeued", {"reason": reason, "worker": worker_id}, now)
                announce(conn)
        return bool(moved)

    def requeue_expired(self) -> list[str]:
        """Jobs whose worker stopped heartbeating go back to the queue (or end, if out of attempts / cancelled)."""
        now = clock.utcnow()
        touched = []
        expired = (
            sa.select(jobs.c.id, jobs.c.attempts, jobs.c.max_attempts, jobs.c.cancel_requested, jobs.c.lease_owner)
            .where(jobs.c.state == JobState.running.value, jobs.c.lease_expires_at < now)
            .with_for_update(skip_locked=True)
        )
        with write_tx(self.engine) as conn:
            for row in conn.execute(expired).all():
                touched.append(row.id)
                lost = {"worker": row.lease_owner, "attempt": row.attempts}
                common = {"lease_owner": None, "lease_expires_at": None}
                if row.cancel_requested:
                    self._set(conn, row.id, now, state=JobState.cancelled.value, finished_at=now, **common)
                    self._event(conn, row.id, "cancelled", {"while": "lease expired"}, now)
                elif row.attempts >= row.max_attempts:
                    error = {"code": "lease_expired", "message": f"worker lost {row.attempts} times", "field": None}
                    self._set(conn, row.id, now, state=JobState.dead.value, finished_at=now, error=error, **common)
                    self._event(conn, row.id, "dead", {"error": error, **lost}, now)
                else:
                    self._set(conn, row.id, now, state=JobState.queued.value, available_at=now, **common)
                    self._event(conn, row.id, "requeued", {"reason": "lease expired", **lost}, now)
                    announce(conn)
        return touched

    # --- helpers --------------------------------------------------------------------------------------------------

    def _leave(
        self, conn: sa.Connection, job_id: str, worker_id: str, now: dt.datetime, state: JobState, **values: Any
    ) -> bool:
        """Move a job we hold out of `running` and drop its lease; False if the lease is no longer ours."""
        return bool(
            conn.execute(
                jobs.update()
                .where(*self._owned(job_id, worker_id))
                .values(state=state.value, updated_at=now, lease_owner=None, lease_expires_at=None, **values)
            ).rowcount
        )

    @classmethod
    def _owned(cls, job_id: str, worker_id: str) -> tuple[sa.ColumnElement[bool], ...]:
        return jobs.c.id == job_id, *cls._owned_by(worker_id)

    @staticmethod
    def _set(conn: sa.Connection, job_id: str, now: dt.datetime, **values: Any) -> None:
        conn.execute(jobs.update().where(jobs.c.id == job_id).values(updated_at=now, **values))

    @staticmethod
    def _event(conn: sa.Connection, job_id: str, kind: str, data: dict[str, Any], now: dt.datetime) -> None:
        conn.execute(job_events.insert().values(job_id=job_id, type=kind, data=data, created_at=now))
        announce(conn)  # PostgreSQL: wakes every process's change feed on commit (once per transaction)
