"""Event-driven waiting: the change feed, waiting clients that cost O(1) statements, idle workers that start at once.

Real SQLite, the real API over TestClient, real worker threads on the tiny diffusers model.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import statistics
import threading
import time
from collections import Counter

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from darkroom.api.app import create_app
from darkroom.config import Settings, WebhookSettings
from darkroom.jobs.db import migrate
from darkroom.jobs.notify import ChangeFeed
from darkroom.jobs.store import JobStore
from darkroom.schemas import GenerationRequest, JobState
from darkroom.service import Services
from darkroom.worker.loop import Worker

BODY = {"prompt": "a red cube", "width": 64, "height": 64, "seed": 1, "model": "tiny-diffusers"}
API_SIDE_EXCLUDED = ("worker-", "leases-", "post-", "presence-", "darkroom-feed", "retention-", "webhook-", "auth-")


def wait_until(predicate, timeout: float = 60.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def store_pair(tmp_path):
    """Two stores on one SQLite file: two connection pools, as two processes would have."""
    url = f"sqlite:///{tmp_path / 'feed.db'}"
    migrate(url)
    here, there = JobStore(url), JobStore(url)
    yield here, there
    here.close()
    there.close()


def request(**kw) -> GenerationRequest:
    return GenerationRequest(**{**BODY, **kw})


def test_feed_wakes_work_listeners_and_job_subscribers_from_any_connection(store_pair):
    here, there = store_pair
    feed = ChangeFeed(here.url, here.engine, check_seconds=0.015).start()  # `there` rings no bell: the tick sees it
    try:
        work = threading.Event()
        feed.on_work(work.set)
        started = time.monotonic()
        job, _ = here.create(request())  # in-process commit: the pool check-in pokes the feed
        assert work.wait(5), "no wake-up for a queued job"
        in_process = time.monotonic() - started

        with feed.subscribe(job.id) as inbox:
            started = time.monotonic()
            there.cancel(job.id)  # another pool: seen through PRAGMA data_version
            events = inbox.next_sync(5)
            across = time.monotonic() - started
        assert [e.type for e in events] == ["cancelled"] and events[0].job_id == job.id
        assert in_process < 0.5 and across < 0.5, (in_process, across)

        work.clear()
        claimed, _ = there.create(request(seed=2))
        assert work.wait(5)
        taken = there.claim("w", 30)
        assert taken is not None and taken.id == claimed.id
        work.clear()
        there.release(claimed.id, "w")  # a lease given back makes the job claimable again
        assert work.wait(5), "no wake-up for a released job"
    finally:
        feed.close()


def test_a_write_in_this_process_pokes_the_feed_without_waiting_for_its_tick(store_pair):
    here, _ = store_pair
    feed = ChangeFeed(here.url, here.engine, check_seconds=30).start()  # the tick alone would take 30 s
    try:
        work = threading.Event()
        feed.on_work(work.set)
        for seed in range(3):
            work.clear()
            here.create(request(seed=seed))
            started = time.monotonic()
            assert work.wait(5), "the commit did not poke the feed"
            assert time.monotonic() - started < 1.0
        reads = feed.reads
        for _ in range(20):
            here.get("job_none")  # read-only transactions do not poke
        assert feed.reads == reads
    finally:
        feed.close()


def test_feeds_start_and_stop_while_other_threads_use_the_engine(store_pair):
    """Feeds come and go (a worker built without one starts its own) while request and worker threads check
    connections into the same pool: none of those threads may fail, and a stopped feed is poked no more."""
    here, _ = store_pair
    errors: list[BaseException] = []
    stop = threading.Event()

    def use_the_pool() -> None:
        while not stop.is_set():
            try:
                here.get("job_none")
            except BaseException as exc:  # noqa: BLE001 - the race this test looks for fails here
                errors.append(exc)
                return

    threads = [threading.Thread(target=use_the_pool) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(30):
            ChangeFeed(here.url, here.engine, check_seconds=30).start().close()
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert errors == []
    stale = ChangeFeed(here.url, here.engine, check_seconds=30).start()
    stale.close()
    live = ChangeFeed(here.url, here.engine, check_seconds=30).start()
    try:
        work = threading.Event()
        live.on_work(work.set)
        here.create(request(seed=9))
        assert work.wait(5), "the live feed missed a commit"
        assert stale.reads == 0 or not stale.running
    finally:
        live.close()


_WRITER = """
import sys
from darkroom.jobs.notify import ChangeFeed
from darkroom.jobs.store import JobStore
from darkroom.schemas import GenerationRequest

store = JobStore(sys.argv[1])
feed = ChangeFeed(store.url, store.engine, check_seconds=30).start()  # its commits ring the other processes
for seed in range(3):
    store.create(GenerationRequest(prompt="x", width=64, height=64, seed=seed))
    sys.stdin.readline()  # the test says when to write the next one
feed.close()
store.close()
"""


def test_another_process_commit_rings_the_feed_without_waiting_for_its_tick(store_pair):
    """SQLite has no NOTIFY: a worker process and the API process ring each other's doorbell after each commit,
    so a job crosses between them at once, not at the next `data_version` tick (30 s here)."""
    import subprocess
    import sys

    here, _ = store_pair
    feed = ChangeFeed(here.url, here.engine, check_seconds=30).start()
    work = threading.Event()
    feed.on_work(work.set)
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, here.url], stdin=subprocess.PIPE, text=True)
    try:
        for _ in range(3):
            assert work.wait(20), "another process's commit did not ring the feed"
            work.clear()
            writer.stdin.write("next\n")  # type: ignore[union-attr]
            writer.stdin.flush()  # type: ignore[union-attr]
        assert writer.wait(30) == 0
        assert here.counts().get("queued") == 3
    finally:
        if writer.poll() is None:
            writer.kill()
        feed.close()


def test_async_subscription_wakes_the_event_loop(store_pair):
    here, there = store_pair
    feed = ChangeFeed(here.url, here.engine).start()
    job, _ = here.create(request())

    async def wait_for_cancel() -> tuple[list[str], float]:
        with feed.subscribe(job.id, types={"cancelled"}) as inbox:
            loop = asyncio.get_running_loop()
            started = time.monotonic()
            loop.call_later(0.05, there.cancel, job.id)
            events = await inbox.next(10)
            return [e.type for e in events], time.monotonic() - started

    try:
        types, waited = asyncio.run(wait_for_cancel())
    finally:
        feed.close()
    assert types == ["cancelled"]
    assert waited < 1.0


def test_feed_reads_nothing_while_the_database_is_idle(store_pair):
    """Idle, the feed only checks SQLite's change counter: no SELECT of events until something commits."""
    here, _ = store_pair
    feed = ChangeFeed(here.url, here.engine, check_seconds=0.005).start()
    try:
        ticks = wait_until(lambda: feed.checks >= 20 and feed.checks, 10, "the feed to tick")
        assert feed.reads == 0 and ticks >= 20
        here.create(request())
        wait_until(lambda: feed.reads >= 1, 5, "a read after a commit")
    finally:
        feed.close()


@pytest.fixture
def settings(tmp_path, models_dir) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        models_dir=models_dir,
        progress_interval=0,
        heartbeat_seconds=0.2,
        webhooks=WebhookSettings(enabled=False),
        preload_models=["tiny-diffusers"],
    )


@pytest.fixture
def served(settings):
    """The API with one in-process worker whose model is loaded before the first job."""
    services = Services.open(settings)
    with TestClient(create_app(services, workers=1)) as client:
        wait_until(lambda: services.workers and services.workers[0].held_models(), 120, "the model preload")
        yield client, services
    services.close()


def test_a_waiting_generate_costs_the_same_statements_for_a_long_job_as_a_short_one(served):
    client, services = served
    counts: Counter[str] = Counter()
    per_thread: Counter[str] = Counter()

    def count(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
        name = threading.current_thread().name
        if not name.startswith(API_SIDE_EXCLUDED):
            counts["api"] += 1
            counts["transactions"] += statement.startswith("BEGIN")
            per_thread[name] += 1

    sa.event.listen(services.store.engine, "before_cursor_execute", count)
    try:
        client.post("/v1/generate", json={**BODY, "steps": 2})  # warm-up: first request paths
        results = {}
        for steps in (2, 100):  # the long one: about a second on a 2-core machine
            counts.clear()
            started = time.monotonic()
            response = client.post("/v1/generate", json={**BODY, "steps": steps, "width": 128, "height": 128})
            assert response.status_code == 200 and response.json()["state"] == "succeeded"
            results[steps] = (counts["api"], time.monotonic() - started)
            # The submit's write transaction (7 statements: its BEGIN, the depth check, usage, job, event, audit,
            # queue counter) and two reads: the job after subscribing, and the job with its images once woken.
            assert counts["transactions"] <= 3 and counts["api"] <= 12, (steps, dict(counts))
    finally:
        sa.event.remove(services.store.engine, "before_cursor_execute", count)
    (short, _), (long, long_took) = results[2], results[100]
    assert long_took > 0.5, f"the long job took {long_took:.2f} s: too short to tell polling apart"
    # Polling every 0.1 s would add ~10 statements a second; the feed adds none.
    assert long == short, f"{results}; statements by thread: {dict(per_thread)}"


def test_an_idle_worker_starts_a_lone_job_at_once(served):
    client, services = served
    waits = []
    for seed in range(5):
        response = client.post("/v1/generate", json={**BODY, "seed": seed, "steps": 2})
        assert response.status_code == 200
        waits.append(response.json()["provenance"]["timings"]["queue_wait_s"])
    # The old loop polled every 0.5 s and then held a lone job 50 ms to fill a batch: ~0.3 s on average.
    assert statistics.median(waits) < 0.05, waits
    assert max(waits) < 0.25, waits


def test_the_default_model_is_loaded_before_the_first_job(settings):
    settings.preload_models = []
    services = Services.open(settings)
    try:
        default = services.registry.default().id
        worker = Worker(settings, services.store, services.blobs, services.make_engine, "w-pre", services.registry)
        assert worker.preload_list() == [default]
        worker._preload()
        assert worker.held_models() == {default}
        worker.engine.close()
        settings.preload_default_model = False
        assert (
            Worker(
                settings, services.store, services.blobs, services.make_engine, "w2", services.registry
            ).preload_list()
            == []
        )
    finally:
        services.close()


def test_the_reaper_runs_at_most_every_half_lease(settings):
    settings.lease_seconds = 60
    services = Services.open(settings)
    calls = Counter()
    original = services.store.requeue_expired

    def requeue_expired():  # type: ignore[no-untyped-def]
        calls["n"] += 1
        return original()

    services.store.requeue_expired = requeue_expired
    try:
        worker = Worker(settings, services.store, services.blobs, services.make_engine, "w-reap")
        for _ in range(5):
            worker._step()
        assert calls["n"] == 1
        worker._next_reap = 0  # half a lease later
        worker._step()
        assert calls["n"] == 2
    finally:
        services.close()


def test_sse_stream_follows_a_job_to_its_end_from_the_feed(served):
    client, services = served
    job = client.post("/v1/jobs", json={**BODY, "steps": 5}).json()
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
        types = [line.split(":", 1)[1].strip() for line in stream.iter_lines() if line.startswith("event:")]
    assert types[0] == "queued" and types[-1] == "succeeded"
    assert types.count("progress") == 5
    assert services.store.get(job["id"]).state is JobState.succeeded


def test_feed_on_postgres_wakes_on_notify_not_on_its_fallback_read(pg_url):
    migrate(pg_url)
    here, there = JobStore(pg_url), JobStore(pg_url)
    feed = ChangeFeed(pg_url, here.engine, fallback_seconds=60).start()
    try:
        job, _ = here.create(request())
        work = threading.Event()
        feed.on_work(work.set)
        with feed.subscribe(job.id, types={"cancelled"}) as inbox:
            started = time.monotonic()
            there.cancel(job.id)  # another pool, as another process: only its NOTIFY can wake the feed
            events = inbox.next_sync(10)
            waited = time.monotonic() - started
        assert [e.type for e in events] == ["cancelled"] and waited < 1.0, waited
        there.create(request(seed=2))
        assert work.wait(10)
    finally:
        feed.close()
        here.close()
        there.close()


def test_a_waiter_whose_client_hangs_up_stops_waiting(settings):
    """Real HTTP over loopback (uvicorn in a thread, no worker: the job stays queued). The client gives up; within a
    tick the handler notices and drops its subscription."""
    import socket

    import httpx
    import uvicorn

    services = Services.open(settings)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(services, workers=0), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 30, "the server")
        subscribed = threading.Event()
        watcher = threading.Thread(target=lambda: wait_until(lambda: services.feed._subs, 30) and subscribed.set())
        watcher.start()
        with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            client.post("/v1/generate", json={**BODY, "steps": 2}, timeout=httpx.Timeout(5, read=2.0))
        watcher.join(30)
        assert subscribed.is_set() and services.store.list()[0].state is JobState.queued
        wait_until(lambda: not services.feed._subs, 10, "the handler to notice the hang-up")
    finally:
        server.should_exit = True
        thread.join(10)
        services.close()


def test_a_lone_job_costs_its_worker_a_claim_and_a_completion_and_no_claim_after(settings):
    """The claim starts the job it runs next (no `start` transaction), a job shorter than `progress_interval` writes
    no progress, and a claim that emptied the queue is not repeated until a notice comes: one transaction on the
    device thread and one on post-processing per lone job, none while the queue stays empty."""
    settings.progress_interval, settings.heartbeat_seconds, settings.idle_poll_seconds = 3600, 3600, 3600
    services = Services.open(settings)
    per_thread: Counter[str] = Counter()

    def begin(conn) -> None:  # type: ignore[no-untyped-def]
        name = threading.current_thread().name
        if name.startswith(("worker-", "post-")):
            per_thread[name.split("-")[0]] += 1

    try:
        with TestClient(create_app(services, workers=1)) as client:
            wait_until(lambda: services.workers[0].held_models(), 120, "the model preload")
            assert client.post("/v1/generate", json={**BODY, "steps": 2}).status_code == 200  # warm-up (and reaper)
            time.sleep(0.2)  # let the warm-up's own loop settle before counting
            sa.event.listen(services.store.engine, "begin", begin)
            try:
                response = client.post("/v1/generate", json={**BODY, "seed": 2, "steps": 2})
                assert response.status_code == 200 and response.json()["state"] == "succeeded"
                wait_until(lambda: per_thread["post"] == 1, 10, "the completion")
                time.sleep(0.3)  # long enough for the loop to come round: it must not claim an empty queue again
                assert dict(per_thread) == {"worker": 1, "post": 1}, dict(per_thread)
                again = client.post("/v1/generate", json={**BODY, "seed": 3, "steps": 2})  # a notice wakes it
                assert again.status_code == 200 and again.json()["state"] == "succeeded"
            finally:
                sa.event.remove(services.store.engine, "begin", begin)
    finally:
        services.close()


def _delivered_equals_stored(here: JobStore, there: JobStore, feed: ChangeFeed) -> None:
    """The events a subscriber gets are the events the store reads back, field for field."""
    job, _ = there.create(request(prompt="ünïcode ✓"))
    got: list = []
    with feed.subscribe(job.id) as inbox:
        there.cancel(job.id)
        wait_until(lambda: got.extend(inbox.next_sync(0.2)) or any(e.type == "cancelled" for e in got), timeout=10)
    stored = {e.id: e for e in here.events_since(job.id)}
    assert got and all(e.model_dump() == stored[e.id].model_dump() for e in got)
    assert got[-1].created_at.utcoffset() == dt.timedelta(0) and got[-1].data == stored[got[-1].id].data


def test_the_feed_delivers_the_events_the_store_reads_back_on_sqlite(store_pair):
    """On SQLite the feed reads through a plain cursor on its own connection, decoding JSON and timestamps itself."""
    here, there = store_pair
    feed = ChangeFeed(here.url, here.engine, check_seconds=0.015).start()
    try:
        _delivered_equals_stored(here, there, feed)
    finally:
        feed.close()


def test_the_feed_delivers_the_events_the_store_reads_back_on_postgres(pg_url):
    migrate(pg_url)
    here, there = JobStore(pg_url), JobStore(pg_url)
    feed = ChangeFeed(pg_url, here.engine, fallback_seconds=60).start()
    try:
        _delivered_equals_stored(here, there, feed)
    finally:
        feed.close()
        here.close()
        there.close()
