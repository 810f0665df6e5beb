"""Hot-path budgets, counted on the real thing: statements and transactions on the store's engine during real HTTP
requests (FastAPI's TestClient, the whole app) and real store calls, on SQLite and PostgreSQL; and the plans of the
hot queries, from the databases' own EXPLAIN at 100,000 queued jobs.

Authentication is not this file's subject (its key and tenant-policy reads are cached elsewhere): each request's
count is taken minus the count of an authenticated request that does nothing else (`GET /v1/samplers`), so the
budgets below are what the route itself costs, warm or cold caches alike."""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from darkroom import clock
from darkroom.api.app import create_app
from darkroom.auth.principal import Principal, Role
from darkroom.config import Limits, ServerSettings, Settings
from darkroom.jobs.db import migrate, write_tx
from darkroom.jobs.store import POSITION_CAP, JobStore, NewImage
from darkroom.jobs.tables import jobs, queue_counters, step_rates
from darkroom.schemas import GenerationRequest, JobState
from darkroom.service import Services

BASE = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 2}
DEPTH = 100_000
_IN_REQUEST: contextvars.ContextVar[bool] = contextvars.ContextVar("in_request", default=False)


@dataclass
class Tally:
    statements: list[str] = field(default_factory=list)
    transactions: int = 0

    def __sub__(self, other: Tally) -> tuple[int, int]:
        return len(self.statements) - len(other.statements), self.transactions - other.transactions


class Counter:
    """Counts statements (`before_cursor_execute`, BEGIN itself excluded) and transactions (`begin`) on an engine,
    only those run on behalf of an HTTP request (`_IN_REQUEST`) or inside `count()`: background loops sharing the
    engine do not add to a request's bill."""

    def __init__(self, engine: sa.Engine, requests_only: bool) -> None:
        self.engine, self.requests_only = engine, requests_only
        self.tally: Tally | None = None
        sa.event.listen(engine, "before_cursor_execute", self._statement)
        sa.event.listen(engine, "begin", self._begin)

    def close(self) -> None:
        sa.event.remove(self.engine, "before_cursor_execute", self._statement)
        sa.event.remove(self.engine, "begin", self._begin)

    def _counting(self) -> bool:
        return self.tally is not None and (_IN_REQUEST.get() or not self.requests_only)

    def _statement(self, conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
        if self._counting() and not statement.lstrip().upper().startswith("BEGIN"):
            self.tally.statements.append(statement)  # type: ignore[union-attr]

    def _begin(self, conn) -> None:  # noqa: ANN001
        if self._counting():
            self.tally.transactions += 1  # type: ignore[union-attr]

    @contextlib.contextmanager
    def count(self) -> Iterator[Tally]:
        self.tally = Tally()
        try:
            yield self.tally
        finally:
            self.tally = None


class MarkRequests:
    """ASGI wrapper: everything a request runs (its thread-pool calls inherit the context) is marked as its own."""

    def __init__(self, app) -> None:  # noqa: ANN001
        self.app = app

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        token = _IN_REQUEST.set(scope["type"] == "http")
        try:
            await self.app(scope, receive, send)
        finally:
            _IN_REQUEST.reset(token)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def services(db_url, tmp_path, models_dir):
    settings = Settings(
        data_dir=tmp_path / "data",
        models_dir=models_dir,
        database_url=db_url,
        limits=Limits(max_queue_depth=1000),
        # The budgets subtract an auth-only request's statements: a key cache that expires between the two (5 s by
        # default, a slow machine) would make that difference lie.
        server=ServerSettings(auth_cache_seconds=3600),
    )
    svc = Services.open(settings)
    yield svc
    svc.close()


def req(**kw) -> GenerationRequest:
    return GenerationRequest(prompt="a cat", seed=kw.pop("seed", 1), **kw)


IMAGE = NewImage(
    index=0, seed=1, width=64, height=64, sha256="0" * 64, blob_key="k", content_type="image/png", size_bytes=1
)


def _run_next(store: JobStore, worker: str = "w") -> str:
    """What a worker does with the head of the queue: claim, start, complete with one image."""
    job = store.claim(worker, 30)
    assert job is not None
    store.start(job.id, worker)
    assert store.complete(job.id, worker, [IMAGE], {"timings": {"worker_total_s": 0.5}})
    return job.id


def test_request_budgets_through_the_api(services):
    """POST /v1/jobs: one write transaction. GET /v1/jobs/{id}: one read transaction. GET /v1/jobs?limit=50 over
    50 jobs (queued, running and succeeded with images): one read transaction, a constant number of statements."""
    _, token = services.keys.create(Principal.cli(), name="svc", role=Role.service, tenant="acme")
    headers = {"Authorization": f"Bearer {token}"}
    counter = Counter(services.store.engine, requests_only=True)
    try:
        app = create_app(services, workers=0)
        with TestClient(MarkRequests(app)) as api:
            listener = app.state.cache_listener  # PostgreSQL: it empties the caches once it listens; wait for that
            assert listener is None or listener.listening.wait(10)

            def bill(method: str, url: str, **kw) -> tuple[Tally, object]:
                api.get("/v1/samplers", headers=headers)  # warm whatever auth caches
                with counter.count() as auth_only:
                    assert api.get("/v1/samplers", headers=headers).status_code == 200
                with counter.count() as total:
                    response = api.request(method, url, headers=headers, **kw)
                assert response.status_code < 300, response.text
                return (total, auth_only), response.json()

            (total, auth), first = bill("POST", "/v1/jobs", json=BASE)
            submit = total - auth
            assert submit[1] == 1, total.statements  # ONE transaction: depth, fair tag, quota, job, event, audit
            # depth + fair tag, quota charge, job, event, (NOTIFY on PostgreSQL), audit, queue counter, position + ETA,
            # and while the model-version cache is cold (the cache listener empties it when it connects) one read of
            # the model's approved version by primary key (models.approvals; none once remembered, checked below)
            assert submit[0] <= 9, total.statements
            assert sum("settings_kv" in st for st in total.statements) <= 1, total.statements
            assert first["queue_position"] == 1
            (again, auth), _ = bill("POST", "/v1/jobs", json=BASE)
            assert not [st for st in again.statements if "settings_kv" in st]  # the approved version is remembered

            for i in range(48):  # 50 jobs in all, with the two above
                api.post("/v1/jobs", json={**BASE, "seed": i}, headers=headers)
            done = [_run_next(services.store) for _ in range(10)]
            assert done[0] == first["id"]
            services.store.claim("w-busy", 30)

            (total, auth), viewed = bill("GET", f"/v1/jobs/{first['id']}")
            read = total - auth
            assert read[1] == 1 and read[0] <= 3, total.statements  # job, then images | position + ETA
            assert viewed["state"] == "succeeded" and len(viewed["images"]) == 1

            queued = services.store.list(tenant="acme", state=JobState.queued, limit=1)[0]
            (total, auth), viewed = bill("GET", f"/v1/jobs/{queued.id}")
            read = total - auth
            assert read[1] == 1 and read[0] <= 2, total.statements
            assert viewed["queue_position"] >= 1 and viewed["eta_seconds"] is not None

            (total, auth), listed = bill("GET", "/v1/jobs", params={"limit": 50})
            listing = total - auth
            states = {j["state"] for j in listed}
            assert len(listed) == 50 and {"queued", "running", "succeeded"} <= states
            # the list, images IN (…), step rates + workers, the queue's head for the positions
            assert listing[1] == 1 and listing[0] <= 4, total.statements
    finally:
        counter.close()


def test_worker_budgets(services):
    """Claim, start, heartbeat, progress and complete: one transaction each, no read-back. A claim: head, UPDATE …
    RETURNING, events, (NOTIFY), queue counter; a head that holds every ready job holds the batch-mates too."""
    store = services.store
    for i in range(3):
        store.create(req(seed=i, steps=4))
    counter = Counter(store.engine, requests_only=False)
    try:
        with counter.count() as claim:
            batch = store.claim_batch("w", 30, max_batch=3)
        assert len(batch) == 3 and claim.transactions == 1 and len(claim.statements) <= 5, claim.statements
        reads = [st for st in claim.statements if st.lstrip().upper().startswith("SELECT") and "FROM jobs" in st]
        assert len(reads) == 1, claim.statements
        job = batch[0]
        for name, call in [
            ("start", lambda: store.start(job.id, "w")),
            ("heartbeat", lambda: store.heartbeat(job.id, "w", 30)),
            ("progress", lambda: store.progress(job.id, "w", 1, 4, 30)),
            ("complete", lambda: store.complete(job.id, "w", [IMAGE], {"timings": {"worker_total_s": 0.5}})),
        ]:
            with counter.count() as tally:
                assert call()
            assert tally.transactions == 1, (name, tally.statements)
            assert len(tally.statements) <= {"start": 1, "heartbeat": 1, "progress": 3, "complete": 6}[name], (
                name,
                tally.statements,
            )
    finally:
        counter.close()


def test_job_moves_build_each_statement_once(services):
    """Every way a job moves (claim, start, progress, complete, fail with and without a retry, release, cancel while
    queued and while running, a lost lease) reuses one statement per shape: a second round of the same moves builds
    none (building and hashing a statement cost more than SQLite's work). A computed value built per call is refused,
    as it would defeat that (and its id could later name another)."""
    from darkroom.jobs import store as store_module

    store = services.store

    def every_move(seed: int) -> None:
        for i in range(4):
            store.create(req(seed=seed + i, steps=4))
        batch = store.claim_batch("w", 30, max_batch=4)
        assert len(batch) == 4
        done, retried, failed, released = batch
        store.start(done.id, "w")
        store.progress(done.id, "w", 1, 4, 30)
        assert store.complete(done.id, "w", [IMAGE], {"timings": {"worker_total_s": 0.5}})
        store.start(retried.id, "w")
        assert store.fail(retried.id, "w", {"code": "x"}, retry_in=0) is JobState.queued
        store.start(failed.id, "w")
        assert store.fail(failed.id, "w", {"code": "x"}) is JobState.failed
        assert store.release(released.id, "w")
        queued = store.claim("w", 30)  # one of the two back in the queue; the other is cancelled while queued
        assert queued is not None
        store.start(queued.id, "w")
        store.cancel(queued.id)
        assert store.finish_cancelled(queued.id, "w")
        other = store.claim("w2", -1)  # its lease already expired: the reaper takes it back
        assert other is not None
        store.start(other.id, "w2")
        assert store.requeue_expired() == [other.id]
        store.cancel(other.id)

    every_move(0)
    built = store_module._move_statement.cache_info().misses
    every_move(100)
    assert store_module._move_statement.cache_info().misses == built
    with pytest.raises(TypeError, match="built once"), write_tx(store.engine) as conn:
        store._move(conn, "job_x", JobState.running, JobState.running, clock.utcnow(), attempts=jobs.c.attempts + 2)


def test_a_quota_check_reads_a_counter_not_the_jobs(services):
    """The images-per-day check and charge is one upsert of `usage_counters`; no statement of the submit reads
    `jobs` for quota (a sum over a tenant's jobs grows with history)."""
    from darkroom.auth.tenants import TenantPolicy

    services.tenants.put("acme", TenantPolicy(images_per_day=1000, gpu_seconds_per_month=1e6), Principal.cli())
    _, token = services.keys.create(Principal.cli(), name="svc", role=Role.service, tenant="acme")
    headers = {"Authorization": f"Bearer {token}"}
    counter = Counter(services.store.engine, requests_only=True)
    try:
        with TestClient(MarkRequests(create_app(services, workers=0))) as api:
            api.post("/v1/jobs", json=BASE, headers=headers)
            with counter.count() as tally:
                assert api.post("/v1/jobs", json=BASE, headers=headers).status_code == 202
    finally:
        counter.close()
    sums = [s for s in tally.statements if re.search(r"sum\(jobs\.", s, re.I)]
    assert not sums, sums
    assert sum("usage_counters" in s for s in tally.statements) == 2  # charge images, read GPU-seconds


# --- plans at depth ------------------------------------------------------------------------------------------------


def fill(store: JobStore, depth: int) -> None:
    """`depth` queued jobs in bulk (one executemany), spread over tenants, priorities, models and batch keys."""
    now = clock.utcnow()
    request = req().model_dump(mode="json")
    rows = [
        {
            "id": f"job_bulk{i:08d}",
            "state": "queued",
            "tenant": f"t{i % 50}",
            "priority": (0, 1, 1, 1, 2)[i % 5],
            "model": f"m{i % 3}",
            "request": request,
            "request_hash": "0" * 64,
            "attempts": 0,
            "max_attempts": 3,
            "cancel_requested": False,
            "progress_step": 0,
            "progress_total": 20,
            "created_at": now - dt.timedelta(seconds=depth - i),
            "updated_at": now,
            "available_at": now - dt.timedelta(seconds=depth - i),
            "fair_tag": float(i // 50),
            "batch_key": f"b{i % 7}",
            "images_requested": 1,
        }
        for i in range(depth)
    ]
    with write_tx(store.engine) as conn:
        conn.execute(jobs.insert(), rows)
        shard = queue_counters.c.shard == 0  # what the store's own moves would have counted
        conn.execute(queue_counters.update().where(shard).values(queued=queue_counters.c.queued + depth))
        conn.execute(step_rates.insert().values(model="m0", seconds_per_step=0.05, samples=10, updated_at=now))
    with store.engine.connect() as conn:
        conn.execute(sa.text("ANALYZE"))
        conn.commit()


def captured(store: JobStore, action) -> list[tuple[str, object]]:  # noqa: ANN001
    """The statements (with their parameters) an action runs, to EXPLAIN them exactly as they ran."""
    seen: list[tuple[str, object]] = []

    def grab(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
        if statement.lstrip().upper().startswith("SELECT") and "pg_notify" not in statement:
            seen.append((statement, parameters))

    sa.event.listen(store.engine, "before_cursor_execute", grab)
    try:
        action()
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", grab)
    return seen


def plan(store: JobStore, statement: str, parameters: object) -> str:
    with store.engine.connect() as conn:
        raw = conn.connection.dbapi_connection
        cursor = raw.cursor()
        if conn.dialect.name == "sqlite":
            cursor.execute(f"EXPLAIN QUERY PLAN {statement}", parameters)
            text = "\n".join(str(row[-1]) for row in cursor.fetchall())
        else:
            cursor.execute("SET enable_seqscan = off")
            cursor.execute(f"EXPLAIN {statement}", parameters)
            text = "\n".join(row[0] for row in cursor.fetchall())
            cursor.execute("RESET enable_seqscan")
        cursor.close()
        raw.rollback()
    return text


def assert_indexed(store: JobStore, statements: list[tuple[str, object]]) -> None:
    assert statements
    for statement, parameters in statements:
        text = plan(store, statement, parameters)
        where = f"{statement}\n--- plan ---\n{text}"
        if store.engine.dialect.name == "sqlite":
            assert "TEMP B-TREE" not in text, where
            assert not re.search(r"\bSCAN (jobs|job_events|images)\b(?! USING)", text), where  # a full scan
        else:
            assert not re.search(r"\bSort\b", text), where
            assert not re.search(r"Seq Scan on (jobs|job_events|images)\b", text), where


def assert_positions_walk_the_claim_index(store: JobStore, statements: list[tuple[str, object]]) -> None:
    """Queue positions are counted on `ix_jobs_claim` (index-only range scans), not by filtering another index on
    `state`, which would read the whole queue for a job near its head."""
    counts = [
        (st, p)
        for st, p in statements
        if "jobs.state" in st and ("count(" in st.lower() or "ORDER BY jobs.priority DESC" in st)
    ]
    assert counts
    for statement, parameters in counts:
        text = plan(store, statement, parameters)
        on_jobs = [line for line in text.splitlines() if re.search(r"\bjobs\b( |_\d+ |$)", line) and "ix_" in line]
        assert on_jobs and all("ix_jobs_claim" in line for line in on_jobs), text


def test_hot_queries_use_indexes_at_100k_queued(db_url, tmp_path):
    migrate(db_url, lock_dir=tmp_path)
    store = JobStore(db_url, max_queue_depth=10 * DEPTH)
    try:
        fill(store, DEPTH)
        mine, _ = store.create(req(model="m0"), tenant="t1")
        done, _ = store.create(req(model="m0", steps=3), tenant="t1")  # a batch key of its own: claimed by it below
        assert store.claim("w", 30, batch_key=done.batch_key).id == done.id
        store.start(done.id, "w")
        assert store.complete(done.id, "w", [IMAGE], {})
        claim = captured(store, lambda: store.claim_batch("w", 30, max_batch=4))
        assert len(claim) == 2  # the head of the queue, then its batch-mates
        assert_indexed(store, claim)
        assert_indexed(store, captured(store, lambda: store.claim("w", 30, servable_models={"m1"})))
        assert_indexed(store, captured(store, lambda: store.claim("w", 30, batch_key="b3")))
        status = captured(store, lambda: store.status(mine.id))
        assert_indexed(store, status)  # the job by id; its position (bounded index counts), step rate, workers
        assert_positions_walk_the_claim_index(store, status)
        listing = captured(store, lambda: store.list_status(tenant="t1", limit=50))
        assert_indexed(store, listing)
        assert_positions_walk_the_claim_index(store, listing)
        assert any("images" in st for st, _ in listing)  # the finished job's images: one IN query, indexed
        assert_indexed(store, captured(store, lambda: store.events_since(mine.id)))
        submit = captured(store, lambda: store.create(req(), tenant="t2"))
        assert_indexed(store, submit)  # depth counts, fair tag seeks
        got = store.status(mine.id)
        assert got.queue_position == POSITION_CAP + 1 and got.eta_seconds is not None  # far back: "more than"
    finally:
        store.close()
