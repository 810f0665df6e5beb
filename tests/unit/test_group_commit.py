"""Group commit on SQLite (`jobs.group_commit`), through the real store: submits that arrive while a transaction is
under way share the next one; a refused submit rolls back alone; an Idempotency-Key used twice in one group makes
one job."""

from __future__ import annotations

import asyncio
import contextvars
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

from darkroom.errors import DarkroomError
from darkroom.jobs import db
from darkroom.jobs.db import migrate
from darkroom.jobs.group_commit import WRITER_THREAD
from darkroom.jobs.store import JobStore
from darkroom.jobs.tables import jobs
from darkroom.schemas import GenerationRequest
from tests.integration.harness import wait_until


class Refused(DarkroomError):
    status = 429
    code = "quota_exceeded"


@pytest.fixture
def store(tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    migrate(url, lock_dir=tmp_path)
    s = JobStore(url, max_queue_depth=1000)
    yield s
    s.close()


def queued(store: JobStore) -> int:
    """The maintained queue counter, checked against the rows themselves."""
    with store.engine.connect() as conn:
        counted = conn.execute(sa.text("SELECT coalesce(sum(queued), 0) FROM queue_counters")).scalar()
    assert counted == store.counts().get("queued", 0)
    return int(counted)


def req(i: int) -> GenerationRequest:
    return GenerationRequest(prompt=f"p{i}", width=64, height=64, steps=2, seed=i)


def grouped(store: JobStore, submits: list[Callable[[], Any]]) -> tuple[list[Any], int]:
    """Run the submits in threads while this thread holds the process's SQLite writer lock, so the first submit
    leads a group of itself and blocks, and the others all wait for the next group. Returns each submit's outcome
    (result or exception) and the number of write transactions the store began."""
    began: list[int] = []
    sa.event.listen(store.engine, "begin", lambda conn: began.append(1))
    outcomes: list[Any] = [None] * len(submits)

    def run(i: int) -> None:
        try:
            outcomes[i] = submits[i]()
        except Exception as exc:
            outcomes[i] = exc

    with db._writer_queue(store.engine):
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(submits))]
        for t in threads:
            t.start()
        wait_until(lambda: len(store._submits._waiting) == len(submits) - 1, timeout=10, what="the submits to queue")
    for t in threads:
        t.join(timeout=30)
    return outcomes, len(began)


def test_submits_that_arrive_during_a_transaction_share_the_next_one(store):
    outcomes, transactions = grouped(store, [lambda i=i: store.create(req(i), tenant="t") for i in range(24)])
    assert all(not isinstance(o, Exception) for o in outcomes), outcomes
    ids = {job.id for job, created in outcomes}
    assert len(ids) == 24
    assert transactions == 2  # the leader alone, then the 23 that queued behind it
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(jobs)).scalar() == 24
    assert queued(store) == 24


def test_a_refused_submit_rolls_back_alone_and_raises_in_its_own_thread(store):
    def admit_even(i: int) -> Callable[[sa.Connection, int], None]:
        def admit(conn: sa.Connection, images_today: int) -> None:
            if i % 2:
                raise Refused(f"no {i}")

        return admit

    outcomes, _ = grouped(store, [lambda i=i: store.create(req(i), tenant="t", admit=admit_even(i)) for i in range(10)])
    refused = [i for i, o in enumerate(outcomes) if isinstance(o, Refused)]
    assert refused == [1, 3, 5, 7, 9]
    with store.engine.connect() as conn:
        prompts = sorted(r.request["prompt"] for r in conn.execute(sa.select(jobs.c.request)))
        images = conn.execute(sa.text("SELECT sum(images) FROM usage_counters WHERE tenant = 't'")).scalar()
    assert prompts == ["p0", "p2", "p4", "p6", "p8"]
    assert images == 5  # the refused submits' image charges rolled back with them
    assert queued(store) == 5


def test_a_statement_the_database_refuses_rolls_back_its_submit_alone(store):
    """A submit whose own statement fails in SQLite (here its audit record breaks a constraint) leaves the database
    where its savepoint began: the group's other submits commit, and the error reaches that submit's thread."""

    def record_badly(i: int) -> Callable[[sa.Connection, str], None]:
        def record(conn: sa.Connection, job_id: str) -> None:
            if i == 2:
                conn.execute(sa.text("INSERT INTO queue_counters (shard, queued) VALUES (0, 0)"))  # shard 0 exists

        return record

    outcomes, transactions = grouped(
        store, [lambda i=i: store.create(req(i), tenant="t", record=record_badly(i)) for i in range(5)]
    )
    assert isinstance(outcomes[2], sa.exc.IntegrityError), outcomes
    assert all(not isinstance(o, Exception) for i, o in enumerate(outcomes) if i != 2), outcomes
    assert transactions == 2
    with store.engine.connect() as conn:
        prompts = sorted(r.request["prompt"] for r in conn.execute(sa.select(jobs.c.request)))
        events = conn.execute(sa.text("SELECT count(*) FROM job_events")).scalar()
    assert prompts == ["p0", "p1", "p3", "p4"]
    assert events == 4
    assert queued(store) == 4


def test_one_idempotency_key_twice_in_a_group_makes_one_job(store):
    submit = lambda: store.create(req(1), tenant="t", idempotency_key="k", key_id="key1")  # noqa: E731
    outcomes, _ = grouped(store, [lambda i=i: store.create(req(10 + i), tenant="t") for i in range(3)] + [submit] * 2)
    (first, created_first), (second, created_second) = outcomes[3], outcomes[4]
    assert first.id == second.id and sorted([created_first, created_second]) == [False, True]
    assert queued(store) == 4


PROBE = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    print("held")
else:
    print("free")
"""


def probe(path: str) -> str:
    """Whether another process could take the writers' file lock now."""
    done = subprocess.run([sys.executable, "-c", PROBE, path], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_processes_queue_for_the_write_lock_on_a_file_beside_the_database(store, tmp_path):
    """Another process's writer waits on the file lock, which the kernel hands over the moment it is let go, rather
    than sleeping in SQLite's busy handler; a read takes no part in it."""
    lock_file = str(tmp_path / "jobs.db-writer.lock")
    store.create(req(0), tenant="t")  # any write: the lock file is made on first use
    assert probe(lock_file) == "free"
    with db.write_tx(store.engine) as conn:
        conn.execute(sa.text("UPDATE queue_counters SET queued = queued"))
        assert probe(lock_file) == "held"
    assert probe(lock_file) == "free"
    with db.read_tx(store.engine):
        assert probe(lock_file) == "free"


def test_a_refused_submit_leaves_no_event_and_no_audit_record_in_its_group(store):
    """Each admitted submit of a group writes its 'queued' event and its audit record, in the group's order; the one
    refused in its savepoint leaves neither."""
    from darkroom.auth import audit
    from darkroom.auth.principal import Principal, Role
    from darkroom.auth.tables import audit_log
    from darkroom.jobs.tables import job_events

    who = Principal(actor="key:k1", role=Role.service, tenant="t", key_id="k1")

    def submit(i: int) -> Callable[[], Any]:
        def admit(conn: sa.Connection, images_today: int) -> None:
            if i == 3:
                raise Refused("no 3")

        record = lambda conn, job_id: audit.record(conn, who, "job.submit", job_id, {"i": i})  # noqa: E731
        return lambda: store.create(req(i), tenant="t", admit=admit, record=record)

    outcomes, transactions = grouped(store, [submit(i) for i in range(8)])
    assert isinstance(outcomes[3], Refused) and transactions == 2
    created = {o[0].id: i for i, o in enumerate(outcomes) if i != 3}
    with store.engine.connect() as conn:
        events = conn.execute(sa.select(job_events.c.job_id, job_events.c.type).order_by(job_events.c.id)).all()
        records = conn.execute(sa.select(audit_log.c.target, audit_log.c.details).order_by(audit_log.c.id)).all()
    assert {e.type for e in events} == {"queued"} and sorted(e.job_id for e in events) == sorted(created)
    assert {r.target: r.details["i"] for r in records} == created and len(records) == len(created)
    assert [e.job_id for e in events] == [r.target for r in records]  # both in the group's (arrival) order
    assert queued(store) == 7


def test_a_group_counts_its_own_submits_against_the_queue_limit(tmp_path):
    """Each submit's depth check sees what the submits before it in its group queued: a limit of 5 admits exactly
    5 of 8, though all 8 share one transaction."""
    from darkroom.jobs.store import QueueFull

    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    migrate(url, lock_dir=tmp_path)
    small = JobStore(url, max_queue_depth=5)
    try:
        outcomes, _ = grouped(small, [lambda i=i: small.create(req(i), tenant="t") for i in range(8)])
        full = [i for i, o in enumerate(outcomes) if isinstance(o, QueueFull)]
        assert full == [5, 6, 7]
        assert queued(small) == 5
    finally:
        small.engine.dispose()


# --- coroutines (`run_async`, `JobStore.enqueue_async`): the API's submit routes --------------------------------------

SUBMITTER: contextvars.ContextVar[str] = contextvars.ContextVar("submitter", default="nobody")


def grouped_async(
    store: JobStore, submits: int, threads: int = 0, cancel: int | None = None, refuse: int | None = None
) -> tuple[list[Any], list[Any], list[tuple[str, str, str]], int]:
    """`submits` coroutines on one event loop (in a thread of its own) and `threads` plain threads submit while this
    thread holds the process's SQLite writer lock. The loop must go on running meanwhile (a ticker counts its turns).
    Coroutine `cancel` is cancelled while it waits; coroutine `refuse` is refused by its admission check. Returns the
    coroutines' and the threads' outcomes, (submitter, thread name, prompt) for each admitted submit's audit record,
    and the number of write transactions."""
    began: list[int] = []
    sa.event.listen(store.engine, "begin", lambda conn: began.append(1))
    recorded: list[tuple[str, str, str]] = []
    ticks: list[int] = []
    lock_held = threading.Event()
    outcomes: list[Any] = []
    thread_outcomes: list[Any] = [None] * threads

    def options(i: int) -> dict[str, Any]:
        def admit(conn: sa.Connection, images_today: int) -> None:
            if i == refuse:
                raise Refused(f"no {i}")

        def record(conn: sa.Connection, job_id: str) -> None:
            recorded.append((SUBMITTER.get(), threading.current_thread().name, f"p{i}"))

        return {"tenant": "t", "admit": admit, "record": record, "with_status": False}

    async def coroutine(i: int) -> Any:
        SUBMITTER.set(f"coroutine {i}")
        return await store.enqueue_async(req(i), **options(i))

    async def main() -> None:
        async def tick() -> None:
            while True:
                ticks.append(1)
                await asyncio.sleep(0.01)

        ticker = asyncio.create_task(tick())
        tasks = [asyncio.create_task(coroutine(i)) for i in range(submits)]
        while not lock_held.is_set() or store._submits.depth < submits + threads:
            await asyncio.sleep(0.01)
        before = len(ticks)
        await asyncio.sleep(0.1)
        assert len(ticks) > before, "the loop stopped while its submits waited on the write lock"
        if cancel is not None:
            tasks[cancel].cancel()
        lock_held.clear()  # tell the test thread to let the lock go
        outcomes.extend(await asyncio.gather(*tasks, return_exceptions=True))
        ticker.cancel()

    def run_thread(i: int) -> None:
        SUBMITTER.set(f"thread {i}")
        try:
            thread_outcomes[i] = store.enqueue(req(100 + i), **options(100 + i))
        except Exception as exc:
            thread_outcomes[i] = exc

    loop_thread = threading.Thread(target=asyncio.run, args=(main(),))
    with db._writer_queue(store.engine):
        workers = [threading.Thread(target=run_thread, args=(i,)) for i in range(threads)]
        for t in workers:
            t.start()
        loop_thread.start()
        lock_held.set()
        wait_until(lambda: not lock_held.is_set(), timeout=30, what="the submits to queue and the loop to tick")
    loop_thread.join(timeout=30)
    for t in workers:
        t.join(timeout=30)
    assert not loop_thread.is_alive()
    return outcomes, thread_outcomes, recorded, len(began)


def test_coroutine_submits_share_groups_led_by_the_writer_thread_while_their_loop_runs(store):
    outcomes, _, recorded, transactions = grouped_async(store, 12)
    assert all(created for _, created in outcomes), outcomes
    assert len({status.job.id for status, _ in outcomes}) == 12
    assert transactions <= 2  # the group under way when the lock was let go, and everything behind it
    assert {name for _, name, _ in recorded} == {f"{WRITER_THREAD}_0"}
    assert sorted(recorded) == sorted((f"coroutine {i}", f"{WRITER_THREAD}_0", f"p{i}") for i in range(12))
    assert queued(store) == 12


def test_a_refused_coroutine_gets_its_own_error_and_a_cancelled_one_still_commits(store):
    outcomes, _, recorded, _ = grouped_async(store, 6, cancel=2, refuse=4)
    assert isinstance(outcomes[2], asyncio.CancelledError) and isinstance(outcomes[4], Refused), outcomes
    assert all(o[1] for i, o in enumerate(outcomes) if i not in (2, 4)), outcomes
    with store.engine.connect() as conn:
        prompts = sorted(r.request["prompt"] for r in conn.execute(sa.select(jobs.c.request)))
    assert prompts == ["p0", "p1", "p2", "p3", "p5"]  # cancelling stops the waiting, not the submit
    assert sorted(p for _, _, p in recorded) == prompts
    assert queued(store) == 5


def test_threads_and_coroutines_queue_together_and_each_work_runs_as_its_submitter(store):
    outcomes, thread_outcomes, recorded, _ = grouped_async(store, 5, threads=5)
    assert all(created for _, created in outcomes + thread_outcomes), (outcomes, thread_outcomes)
    submitters = {prompt: who for who, _, prompt in recorded}
    assert submitters == {
        **{f"p{i}": f"coroutine {i}" for i in range(5)},
        **{f"p{100 + i}": f"thread {i}" for i in range(5)},
    }
    assert queued(store) == 10


def test_closing_the_store_lets_its_writer_thread_go(store):
    """The writer thread a coroutine's submit started ends with the store (after any group it is committing)."""
    seen: list[threading.Thread] = []

    def record(conn: sa.Connection, job_id: str) -> None:
        seen.append(threading.current_thread())

    async def submit() -> Any:
        return await store.enqueue_async(req(0), tenant="t", record=record, with_status=False)

    _, created = asyncio.run(submit())
    (writer,) = seen
    assert created and writer.name.startswith(WRITER_THREAD) and writer.is_alive()
    store.close()
    assert not writer.is_alive()
    assert queued(store) == 1
