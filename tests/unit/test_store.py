"""The job store on a real SQLite file: claims, leases, idempotency, cancel, exactly-once completion."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from darkroom.errors import Conflict
from darkroom.jobs.db import migrate
from darkroom.jobs.store import JobStore, NewImage, QueueFull
from darkroom.jobs.tables import metadata
from darkroom.schemas import GenerationRequest, JobState


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def store(db_url, tmp_path):
    url = db_url
    migrate(url, lock_dir=tmp_path)
    s = JobStore(url, max_queue_depth=50)
    yield s
    s.close()


def req(**kw) -> GenerationRequest:
    return GenerationRequest(prompt=kw.pop("prompt", "a cat"), seed=kw.pop("seed", 1), **kw)


def image(i: int = 0) -> NewImage:
    return NewImage(
        index=i, seed=1 + i, width=64, height=64, sha256="0" * 64, blob_key="k", content_type="image/png", size_bytes=10
    )


def test_migrations_build_exactly_the_declared_schema(db_url):
    url = db_url
    migrate(url)
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    engine.dispose()
    assert diff == []


def test_any_table_module_imported_first_declares_the_whole_schema() -> None:
    """Each module that declares tables or indexes, imported first in a fresh interpreter, brings all of `metadata`
    (a circular import once broke `from darkroom.models import approvals` as a process's first import)."""
    src = Path(__file__).resolve().parents[2] / "src"
    modules = sorted(
        ".".join(path.relative_to(src).with_suffix("").parts)
        for path in (src / "darkroom").rglob("*.py")
        if "sa.Table(" in (text := path.read_text()) or "sa.Index(" in text
    )
    assert "darkroom.jobs.sweep_indexes" in modules
    expected = sorted(f"{table.name}.{index.name}" for table in metadata.tables.values() for index in table.indexes)
    show = (
        "from darkroom.jobs.tables import metadata as m; "
        "print(sorted(f'{t.name}.{i.name}' for t in m.tables.values() for i in t.indexes))"
    )
    first_imports = [*modules, "darkroom.models.approvals"]
    children = [
        subprocess.Popen(
            [sys.executable, "-c", f"import {module}; {show}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for module in first_imports
    ]
    for module, child in zip(first_imports, children, strict=True):
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, f"{module}: {err}"
        assert out.strip() == str(expected), module


def test_claim_takes_highest_priority_then_oldest(store):
    low, _ = store.create(req(priority="low"))
    first, _ = store.create(req())
    second, _ = store.create(req())
    high, _ = store.create(req(priority="high"))
    order = [store.claim("w", 30).id for _ in range(4)]
    assert order == [high.id, first.id, second.id, low.id]
    assert store.claim("w", 30) is None


def test_queue_position_follows_claim_order(store):
    a, _ = store.create(req())
    b, _ = store.create(req(priority="high"))
    assert store.queue_position(store.get(b.id)) == 1
    assert store.queue_position(store.get(a.id)) == 2
    store.claim("w", 30)
    assert store.queue_position(store.get(a.id)) == 1
    assert store.queue_position(store.get(b.id)) is None


def test_complete_writes_images_once_and_only_for_the_lease_owner(store):
    job, _ = store.create(req(n=2))
    claimed = store.claim("w1", 30)
    assert claimed.state is JobState.running and claimed.attempts == 0  # charged when it starts, not at claim
    assert store.start(job.id, "w1") == 1
    assert not store.complete(job.id, "someone-else", [image(0), image(1)], {})
    assert store.complete(job.id, "w1", [image(0), image(1)], {"ok": True})
    assert not store.complete(job.id, "w1", [image(0), image(1)], {"ok": True})
    assert [i.index for i in store.images_for(job.id)] == [0, 1]
    assert store.get(job.id).state is JobState.succeeded
    types = [e.type for e in store.events_since(job.id)]
    assert types == ["queued", "started", "succeeded"]


def test_expired_lease_requeues_and_old_owner_cannot_finish(store):
    job, _ = store.create(req())
    store.claim("w1", lease_seconds=-1)  # a lease that has already run out
    store.start(job.id, "w1")
    assert store.requeue_expired() == [job.id]
    assert store.get(job.id).state is JobState.queued
    assert store.claim("w2", 30).id == job.id
    assert store.start(job.id, "w1") is None
    assert store.start(job.id, "w2") == 2
    assert not store.heartbeat(job.id, "w1", 30).owned
    assert not store.complete(job.id, "w1", [image()], {})
    assert store.complete(job.id, "w2", [image()], {})
    assert store.get(job.id).attempts == 2
    assert len(store.images_for(job.id)) == 1


def test_job_is_dead_after_its_last_attempt(store):
    job, _ = store.create(req(), max_attempts=2)
    for _ in range(2):
        store.claim("w", lease_seconds=-1)
        store.start(job.id, "w")
        store.requeue_expired()
    final = store.get(job.id)
    assert final.state is JobState.dead
    assert final.error["code"] == "lease_expired"


def test_transient_failure_retries_then_dies(store):
    job, _ = store.create(req(), max_attempts=2)
    store.claim("w", 30)
    store.start(job.id, "w")
    assert store.fail(job.id, "w", {"code": "x", "message": "boom"}, retry_in=0) is JobState.queued
    store.claim("w", 30)
    store.start(job.id, "w")
    assert store.fail(job.id, "w", {"code": "x", "message": "boom"}, retry_in=0) is JobState.dead
    assert store.get(job.id).error["message"] == "boom"


def test_permanent_failure_fails_at_once(store):
    job, _ = store.create(req())
    store.claim("w", 30)
    assert store.fail(job.id, "w", {"code": "model_load_failed", "message": "bad file"}) is JobState.failed


def test_cancel_queued_and_running(store):
    queued, _ = store.create(req())
    running, _ = store.create(req(priority="high"))
    store.claim("w", 30)
    assert store.cancel(queued.id).state is JobState.cancelled
    assert store.cancel(running.id).cancel_requested
    ack = store.progress(running.id, "w", 1, 20, 30)
    assert ack.owned and ack.cancel_requested
    assert store.finish_cancelled(running.id, "w")
    assert store.get(running.id).state is JobState.cancelled
    with pytest.raises(Conflict):
        store.cancel(running.id)


def test_idempotency_key_returns_the_first_job(store):
    first, created = store.create(req(), idempotency_key="k1", body_hash="h1")
    again, created_again = store.create(req(seed=99), idempotency_key="k1", body_hash="h1")
    assert created and not created_again and again.id == first.id
    with pytest.raises(Conflict) as err:
        store.create(req(prompt="other"), idempotency_key="k1", body_hash="h2")
    assert err.value.field == "Idempotency-Key"
    other_tenant, created = store.create(req(), tenant="t2", idempotency_key="k1", body_hash="h1")
    assert created and other_tenant.id != first.id


def test_queue_depth_limit(store):
    for _ in range(50):
        store.create(req())
    with pytest.raises(QueueFull) as err:
        store.create(req())
    assert err.value.status == 429 and err.value.retry_after > 0


def test_concurrent_claimers_never_share_a_job(db_url):
    url = db_url
    migrate(url)
    stores = [JobStore(url) for _ in range(4)]
    ids = {stores[0].create(req())[0].id for _ in range(40)}
    claimed: list[str] = []
    lock = threading.Lock()

    def claimer(s: JobStore, name: str) -> None:
        while (job := s.claim(name, 30)) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=claimer, args=(s, f"w{i}")) for i, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(ids)
    for s in stores:
        s.close()


def test_a_flooding_tenant_does_not_starve_another(store):
    store.max_queue_depth = 10_000
    flood = [store.create(req(), tenant="flood")[0].id for _ in range(200)]
    store.claim("w", 30)  # the flood is already being served
    late, _ = store.create(req(), tenant="late")
    assert store.queue_position(store.get(late.id)) <= 3  # behind at most the flood's next two, not its 199
    served = [store.claim("w", 30).id for _ in range(3)]
    assert late.id in served
    assert [j for j in served if j != late.id] == flood[1 : len(served)]  # FIFO within the flooding tenant


def test_fair_share_round_robins_backlogged_tenants_and_honours_weights(store):
    store.max_queue_depth = 10_000
    store.tenant_weights = {"big": 2.0}
    for _ in range(30):
        for tenant in ("a", "b", "big"):
            store.create(req(), tenant=tenant)
    order = [store.get(store.claim("w", 30).id).tenant for _ in range(24)]
    assert abs(order.count("big") - 12) <= 1
    assert abs(order.count("a") - 6) <= 1 and abs(order.count("b") - 6) <= 1


def test_priority_class_beats_fairness(store):
    for _ in range(3):
        store.create(req(), tenant="a")
    urgent, _ = store.create(req(priority="high"), tenant="a")
    assert store.claim("w", 30).id == urgent.id


def test_claim_batch_gathers_only_compatible_jobs(store):
    a1, _ = store.create(req(steps=4))
    other, _ = store.create(req(steps=5))
    a2, _ = store.create(req(steps=4, prompt="a dog", seed=9))
    a3, _ = store.create(req(steps=4, prompt="a bird"))
    batch = store.claim_batch("w", 30, max_batch=2)
    assert [j.id for j in batch] == [a1.id, a2.id]
    assert all(j.state is JobState.running and j.lease_owner == "w" for j in batch)
    rest = store.claim_batch("w2", 30, max_batch=4)
    assert [j.id for j in rest] == [other.id]
    assert [j.id for j in store.claim_batch("w3", 30, max_batch=4, batch_key=a3.batch_key)] == [a3.id]


@pytest.mark.parametrize("window", [2, 8], ids=["batch-mates-queried", "batch-mates-from-the-head"])
def test_batch_mates_come_in_claim_order_whether_or_not_the_head_holds_every_ready_job(store, window):
    """A head shorter than its window holds every ready job, so the claim takes the batch-mates from it; a full one
    sends the claim to its second SELECT. Both give the same jobs in the same order (priority, then the queue)."""
    head, _ = store.create(req(steps=4))
    store.create(req(steps=5))
    late, _ = store.create(req(steps=4, prompt="late", priority="high"))
    store.create(req(steps=5, prompt="other"))
    mate, _ = store.create(req(steps=4, prompt="mate"))
    store.create(req(steps=4, prompt="left for the next batch"))
    claimed = store.claim_next("w", 30, max_batch=3, affinity_window=window, start_head=True).jobs
    assert [j.id for j in claimed] == [late.id, head.id, mate.id]
    assert [j.attempts for j in claimed] == [1, 0, 0]  # only the head is started by its claim


def test_model_affinity_prefers_held_model_within_the_top_class(store):
    store.create(req(model="m1"))
    held, _ = store.create(req(model="m2"))
    assert store.claim("w", 30, held_models={"m2"}).id == held.id
    assert store.claim("w", 30, servable_models={"m9"}) is None
    assert store.claim("w", 30, servable_models={"m1"}).request["model"] == "m1"


def test_release_requeues_without_spending_an_attempt(store):
    job, _ = store.create(req())
    store.claim("w", 30)
    assert store.release(job.id, "w")
    again = store.get(job.id)
    assert again.state is JobState.queued and again.attempts == 0 and again.lease_owner is None
    assert "requeued" in [e.type for e in store.events_since(job.id)]


def test_per_tenant_queue_limit(store):
    store.max_tenant_queue_depth = 3
    for _ in range(3):
        store.create(req(), tenant="a")
    with pytest.raises(QueueFull) as err:
        store.create(req(), tenant="a")
    assert "tenant 'a'" in err.value.message
    store.create(req(), tenant="b")


def test_eta_from_recent_step_rates(store):
    done, _ = store.create(req(steps=10))
    store.claim("w", 30)
    store.start(done.id, "w")
    store.complete(done.id, "w", [image()], {})
    waiting = [store.create(req(steps=10))[0] for _ in range(3)]
    last = store.get(waiting[-1].id)
    eta = store.eta_seconds(last, store.queue_position(last))
    assert eta is not None and eta >= 0
    first = store.get(waiting[0].id)
    assert store.eta_seconds(first, 1) <= eta


def test_postgres_wakes_idle_workers_with_notify_instead_of_polling(pg_url, tmp_path):
    import threading

    from darkroom.jobs.notify import Waiter

    migrate(pg_url)
    store = JobStore(pg_url)
    waiter = Waiter(pg_url, threading.Event())
    assert waiter.listens
    waiter.wait(0.01)  # LISTEN is now in place
    woke = threading.Event()

    def idle_worker() -> None:
        waiter.wait(30)
        woke.set()

    thread = threading.Thread(target=idle_worker)
    started = time.monotonic()
    thread.start()
    time.sleep(0.2)
    assert not woke.is_set()
    store.create(req())
    assert woke.wait(10), "no wake-up"
    assert time.monotonic() - started < 10  # far sooner than the 30 s fallback poll
    thread.join()
    waiter.close()
    store.close()
    assert not Waiter(f"sqlite:///{tmp_path / 'x.db'}", threading.Event()).listens


# --- hardening: attempts, guarded transitions, caller-scoped keys, usage counters ----------------------------------


def test_a_crash_charges_an_attempt_only_to_the_job_that_had_started(store):
    """A worker that dies holding a batch: the job it was running is charged, its batch-mates go back as they were."""
    batch = [store.create(req(steps=4, seed=i))[0] for i in range(3)]
    claimed = store.claim_batch("w1", lease_seconds=-1, max_batch=3)  # a lease that has already run out
    assert [j.id for j in claimed] == [j.id for j in batch] and all(j.attempts == 0 for j in claimed)
    assert store.start(batch[0].id, "w1") == 1
    assert sorted(store.requeue_expired()) == sorted(j.id for j in batch)
    after = {j.id: store.get(j.id) for j in batch}
    assert [after[j.id].attempts for j in batch] == [1, 0, 0]
    assert all(a.state is JobState.queued and a.started_at is None for a in after.values())


def test_a_poison_job_dies_after_its_attempts_while_its_batch_mates_live(store):
    poison, _ = store.create(req(steps=4), max_attempts=2)
    mate, _ = store.create(req(steps=4, seed=2), max_attempts=2)
    for _ in range(3):
        store.claim_batch("w", lease_seconds=-1, max_batch=2)
        store.start(poison.id, "w")  # the poison job runs first and kills the worker every time
        store.requeue_expired()
    assert store.get(poison.id).state is JobState.dead
    assert store.get(mate.id).state is JobState.queued and store.get(mate.id).attempts == 0


def test_release_gives_back_an_attempt_only_if_the_job_had_started(store):
    job, _ = store.create(req())
    store.claim("w", 30)
    store.start(job.id, "w")
    assert store.release(job.id, "w", reason="device failed")
    assert store.get(job.id).attempts == 0
    store.claim("w", 30)
    assert store.release(job.id, "w")
    assert store.get(job.id).attempts == 0


def test_a_stale_workers_fail_cannot_touch_a_job_another_worker_reclaimed(pg_url):
    """Interleaving on PostgreSQL: worker 1's `fail` is paused right before its write while worker 2 (another store,
    another connection pool) requeues the expired job and claims it. The write must then change nothing."""
    migrate(pg_url)
    first, second = JobStore(pg_url), JobStore(pg_url)
    try:
        job, _ = first.create(req())
        first.claim("w1", lease_seconds=-1)
        first.start(job.id, "w1")

        def reclaim_first(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
            if statement.lstrip().upper().startswith("UPDATE JOBS") and not reclaimed.is_set():
                reclaimed.set()
                thread = threading.Thread(target=lambda: (second.requeue_expired(), second.claim("w2", 30)))
                thread.start()
                thread.join(30)
                assert not thread.is_alive(), "the other worker was blocked"

        reclaimed = threading.Event()
        sa.event.listen(first.engine, "before_cursor_execute", reclaim_first)
        assert first.fail(job.id, "w1", {"code": "x", "message": "stale"}, retry_in=None) is None
        sa.event.remove(first.engine, "before_cursor_execute", reclaim_first)
        assert reclaimed.is_set()
        now = second.get(job.id)
        assert now.state is JobState.running and now.lease_owner == "w2" and now.error is None
        assert first.cancel(job.id).cancel_requested  # the API's cancel of a running job only flags it
        assert second.heartbeat(job.id, "w2", 30).cancel_requested
        assert second.finish_cancelled(job.id, "w2")
    finally:
        first.close()
        second.close()


def test_an_idempotency_key_belongs_to_the_api_key_that_used_it(store):
    mine, created = store.create(req(), key_id="key_a", idempotency_key="k1", body_hash="h1")
    again, created_again = store.create(req(), key_id="key_a", idempotency_key="k1", body_hash="h1")
    theirs, created_theirs = store.create(req(), key_id="key_b", idempotency_key="k1", body_hash="h1")
    assert created and not created_again and again.id == mine.id
    assert created_theirs and theirs.id != mine.id and theirs.key_id == "key_b"
    assert "k1" not in (mine.idempotency_key or "")  # stored as a digest, never the client's raw bytes


def test_usage_counters_follow_the_jobs(store):
    from darkroom import clock
    from darkroom.auth import usage
    from darkroom.jobs.db import read_tx

    def used() -> tuple[int, float]:
        with read_tx(store.engine) as conn:
            return usage.read(conn, "acme", clock.utcnow())

    kept, _ = store.create(req(n=2), tenant="acme")
    cancelled, _ = store.create(req(n=3), tenant="acme")
    failed, _ = store.create(req(n=4, priority="high"), tenant="acme")
    assert used() == (9, 0.0)
    store.cancel(cancelled.id)
    store.claim("w", 30)
    store.start(failed.id, "w")
    store.fail(failed.id, "w", {"code": "x", "message": "bad input"})
    assert used() == (2, 0.0)
    store.claim("w", 30)
    store.start(kept.id, "w")
    store.complete(kept.id, "w", [image(0), image(1)], {"timings": {"worker_total_s": 1.5}})
    assert used() == (2, 1.5)


def test_the_queue_depth_counter_matches_the_queue_through_every_move(store):
    from darkroom.jobs.db import read_tx
    from darkroom.jobs.tables import jobs, queue_counters

    def depth() -> tuple[int, int]:
        with read_tx(store.engine) as conn:
            counted = conn.execute(sa.select(sa.func.sum(queue_counters.c.queued))).scalar_one()
            actual = conn.execute(sa.select(sa.func.count()).where(jobs.c.state == "queued")).scalar_one()
        return counted, actual

    made = [store.create(req(steps=4, seed=i))[0] for i in range(6)]
    store.cancel(made[5].id)
    batch = store.claim_batch("w1", lease_seconds=-1, max_batch=3)
    store.start(batch[0].id, "w1")
    assert depth() == (2, 2)
    assert store.release(batch[1].id, "w1")
    assert store.fail(batch[0].id, "w1", {"code": "x", "message": "again"}, retry_in=0) is JobState.queued
    assert store.requeue_expired() == [batch[2].id]
    assert depth() == (5, 5)
    store.max_queue_depth = 5
    with pytest.raises(QueueFull):
        store.create(req())


def test_a_listing_reports_the_same_positions_as_each_jobs_own_status(store):
    store.max_queue_depth = 10_000
    for i in range(12):
        store.create(req(seed=i, priority=("low", "normal", "high")[i % 3]), tenant=("a", "b")[i % 2])
    listed = store.list_status(limit=50)
    assert sorted(s.queue_position for s in listed) == list(range(1, 13))
    assert all(s.queue_position == store.status(s.job.id).queue_position for s in listed)


def test_tenant_queue_limit_counts_only_once_the_queue_is_as_deep_as_it(store):
    """The tenant's own count (up to its limit's worth of index entries, inside the write lock) runs only where the
    whole queue holds at least that many jobs; below that the tenant cannot be over its limit."""
    store.max_tenant_queue_depth = 4
    for _ in range(3):
        store.create(req(), tenant="a")
    store.create(req(), tenant="b")  # the queue now holds 4: a's count matters again
    store.create(req(), tenant="a")
    with pytest.raises(QueueFull):
        store.create(req(), tenant="a")
    store.create(req(), tenant="b")


def test_postgres_skips_the_tenant_count_while_the_queue_is_shallower_than_the_limit(pg_url, tmp_path):
    """From PostgreSQL's own EXPLAIN ANALYZE of the admission snapshot: the tenant count's plan never runs while the
    queue is shallower than the tenant limit, and runs once it is not."""
    from darkroom.jobs.store import _admit_snapshot

    migrate(pg_url, lock_dir=tmp_path)
    store = JobStore(pg_url, max_queue_depth=100)
    try:
        for _ in range(5):
            store.create(req(), tenant="a")

        def count_ran(limit: int) -> bool:
            compiled = _admit_snapshot(limit).compile(dialect=store.engine.dialect)
            params = {**compiled.params, "b_tenant": "a", "b_priority": 1}
            with store.engine.connect() as conn:
                cursor = conn.connection.dbapi_connection.cursor()
                cursor.execute(f"EXPLAIN (ANALYZE, FORMAT JSON, TIMING OFF) {compiled}", params)
                plan = cursor.fetchone()[0][0]["Plan"]
            (count,) = [p for p in plan["Plans"] if p["Node Type"] == "Aggregate" and _scans(p, "jobs")]
            return count["Actual Loops"] > 0

        assert not count_ran(100)
        assert count_ran(5)
    finally:
        store.close()


def _scans(plan: dict, table: str) -> bool:
    return plan.get("Relation Name") == table or any(_scans(p, table) for p in plan.get("Plans", []))
