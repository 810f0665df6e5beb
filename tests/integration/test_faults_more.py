"""More faults against real processes over loopback, each checked for 0 lost and 0 duplicated jobs:

- the API SIGKILLed between a submit's commit and its reply (found by freezing the server with SIGSTOP until, frozen,
  it holds a committed job whose client has no answer; no hook in the server): clients retry with their
  Idempotency-Key against the restarted server and get exactly one job per key;
- another process holding SQLite's write lock (BEGIN IMMEDIATE) while clients submit and a worker runs: requests wait
  out the lock (or get the documented 503 `database_unavailable` with Retry-After), never a 500; the worker carries on;
  past the busy timeout the answer is that 503;
- the S3 server stopped while a worker stores results and restarted later: jobs are released uncharged, not burned,
  and all succeed exactly once after the restart; an upload during the outage is a 503, not a 500, and so is one to a
  server that came back without the bucket;
- the wall clock jumping forward by more than the lease while a job runs (in-process: `darkroom.clock` is where every
  lease and expiry reads the time): the job may be requeued, and it finishes exactly once.

Each test prints its figures (`-s` shows them); docs/reliability.md quotes them.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import itertools
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
import sqlalchemy as sa
from PIL import Image

from darkroom import clock
from darkroom.config import RecoverySettings, Settings
from darkroom.jobs.store import idempotency_digest
from darkroom.schemas import GenerationRequest
from darkroom.service import Services
from darkroom.worker.loop import Worker

from .harness import Cluster, wait_until
from .test_faults import TERMINAL, Faults

pytestmark = pytest.mark.integration

QUIET = {"DARKROOM_SECURITY__WATERMARK": "false", "DARKROOM_SECURITY__C2PA": "false"}
BODY = {"width": 64, "height": 64, "prompt": "a cube", "steps": 2, "seed": 1}


@pytest.fixture
def faults_env(tmp_path, models_dir) -> Iterator[Faults]:
    """An API-only server (started by each test, with its own settings) and the `Faults` helpers of test_faults."""
    cluster = Cluster(tmp_path, models_dir, env=dict(QUIET))
    setup: Faults | None = None
    try:
        setup = Faults(cluster)
        yield setup
    finally:
        if setup is not None:
            setup.close()
        else:
            cluster.close()


def jobs_per_key(faults: Faults, keys: list[str]) -> Counter[str]:
    """How many job rows hold each Idempotency-Key (the store keeps a digest scoped to the caller; no auth: None)."""
    digests = {idempotency_digest(None, key): key for key in keys}
    rows = faults.rows("SELECT idempotency_key FROM jobs WHERE idempotency_key IS NOT NULL")
    return Counter(digests[r.idempotency_key] for r in rows if r.idempotency_key in digests)


def freeze_between_commit_and_reply(
    faults: Faults, attempted: list[str], answered: dict[str, str], lock: threading.Lock, tries: int = 300
) -> tuple[set[str], int]:
    """SIGSTOP the server at moments of the clients' choosing until, frozen, it holds a committed job whose reply never
    left it: the row is in the database, and the client still has no answer once replies already on the wire have had
    time to arrive. Returns those keys (the server is left stopped) and how many freezes it took; the window is a few
    milliseconds of every submit, so a few dozen freezes usually find one."""
    server = faults.cluster.server
    assert server is not None

    def pending() -> set[str]:
        with lock:
            keys, done = list(attempted), set(answered)
        return {k for k, n in jobs_per_key(faults, keys).items() if n and k not in done}

    for sample in range(1, tries + 1):
        server.popen.send_signal(signal.SIGSTOP)
        if pending():
            try:
                wait_until(lambda: not pending(), timeout=0.5, interval=0.02)
            except AssertionError:
                return pending(), sample
        server.popen.send_signal(signal.SIGCONT)
        with lock:
            seen = len(answered)
        wait_until(lambda seen=seen: len(answered) > seen, timeout=30, interval=0.005, what="submits to go on")
    return set(), tries


# --- 1. the API SIGKILLed between commit and reply --------------------------------------------------------------------


def test_api_sigkilled_with_submits_in_flight_then_retried_by_key_gives_one_job_per_key(faults_env):
    faults, cluster = faults_env, faults_env.cluster
    cluster.start_server(workers=0)
    answered: dict[str, str] = {}  # key -> job id, for every submit that got its 2xx before the kill
    attempted: list[str] = []
    keys = (f"key-{i:04d}" for i in itertools.count())
    lock, killed = threading.Lock(), threading.Event()

    def client() -> None:
        with httpx.Client(base_url=cluster.url, timeout=30) as http:
            while not killed.is_set():
                with lock:
                    key = next(keys)
                    attempted.append(key)
                try:
                    response = http.post("/v1/jobs", json=BODY, headers={"Idempotency-Key": key})
                except httpx.HTTPError:
                    continue  # the server died under this request: retried below
                if response.status_code in (200, 202):
                    with lock:
                        answered[key] = response.json()["id"]

    threads = [threading.Thread(target=client, daemon=True) for _ in range(8)]
    for thread in threads:
        thread.start()
    faults.wait(lambda: len(answered) >= 20, 60, "20 answered submits")
    caught, samples = freeze_between_commit_and_reply(faults, attempted, answered, lock)
    killed.set()
    cluster.server.kill(signal.SIGKILL)  # a stopped process dies of SIGKILL as it stands
    cluster.server.popen.wait(10)
    for thread in threads:
        thread.join(40)
    started = time.monotonic()
    cluster.start_server(workers=0)
    restart_s = time.monotonic() - started

    replayed, created = 0, 0
    with cluster.client() as http:
        for key in attempted:
            response = http.post("/v1/jobs", json=BODY, headers={"Idempotency-Key": key})
            assert response.status_code in (200, 202), (key, response.status_code, response.text)
            if key in answered:
                assert response.status_code == 200 and response.json()["id"] == answered[key], key
            elif response.status_code == 200:
                replayed += 1  # committed before the kill, its reply never sent: the retry finds the same job
            else:
                created += 1
    per_key = jobs_per_key(faults, attempted)
    lost = [k for k in answered if per_key[k] == 0]
    duplicated = [k for k, n in per_key.items() if n > 1]
    print(
        f"\nAPI SIGKILL: {len(attempted)} keys, {len(answered)} answered before the kill, {replayed} committed but "
        f"unanswered (caught frozen after {samples} freezes: {len(caught)}), {created} never committed; "
        f"lost {len(lost)}, duplicated {len(duplicated)}; restart {restart_s:.1f}s"
    )
    assert not lost and not duplicated
    assert caught, "no submit was caught between its commit and its reply"
    assert replayed >= len(caught), "every key committed without a reply is found again by its retry"
    assert set(per_key) == set(attempted) and len(faults.rows("SELECT id FROM jobs")) == len(attempted)


# --- 2. SQLite's write lock held by another process -------------------------------------------------------------------

LOCK_SECONDS = 4.0


def test_sqlite_write_lock_held_elsewhere_gives_no_500_and_loses_no_job(faults_env):
    faults, cluster = faults_env, faults_env.cluster
    cluster.env.update({"DARKROOM_MAX_BATCH": "1"})
    cluster.start_server(workers=1)
    first = [faults.submit(**{**BODY, "steps": 12, "seed": s}) for s in range(3)]
    faults.wait(lambda: faults.running(min_step=1), 120, "a job running")

    statuses: Counter[int] = Counter()
    bad: list[str] = []
    ids: dict[str, str] = {}
    slowest = [0.0]
    lock = threading.Lock()

    def client(n: int) -> None:
        key = f"locked-{n}"
        with httpx.Client(base_url=cluster.url, timeout=60) as http:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                sent = time.monotonic()
                response = http.post("/v1/jobs", json={**BODY, "seed": 100 + n}, headers={"Idempotency-Key": key})
                with lock:
                    statuses[response.status_code] += 1
                    slowest[0] = max(slowest[0], time.monotonic() - sent)
                if response.status_code in (200, 202):
                    ids[key] = response.json()["id"]
                    return
                error = response.json().get("error", {})
                if response.status_code != 503 or error.get("code") != "database_unavailable":
                    bad.append(f"{response.status_code} {response.text}")
                    return
                if "Retry-After" not in response.headers:
                    bad.append(f"503 without Retry-After: {response.text}")
                time.sleep(min(float(response.headers.get("Retry-After", 1)), 1.0))  # honour it, capped for the test

    holder = sqlite3.connect(cluster.data_dir / "darkroom.db", isolation_level=None, timeout=30)
    try:
        holder.execute("BEGIN IMMEDIATE")
        held_from = time.monotonic()
        threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(6)]
        for thread in threads:
            thread.start()
        threading.Event().wait(LOCK_SECONDS)  # the fault lasts this long: the lock is held, nothing is awaited
        holder.execute("ROLLBACK")
        held_s = time.monotonic() - held_from
    finally:
        holder.close()
    for thread in threads:
        thread.join(90)
    assert not bad, bad
    assert len(ids) == 6, (ids, statuses)
    every = first + list(ids.values())
    started = time.monotonic()
    faults.wait_finished(every, 180)
    faults.check_exactly_once(every)
    per_key = jobs_per_key(faults, list(ids))
    requeued = sum(r.job_id in every for r in faults.rows("SELECT job_id FROM job_events WHERE type = 'requeued'"))
    print(
        f"\nSQLite locked {held_s:.1f}s: submit statuses {dict(statuses)}, slowest submit {slowest[0]:.1f}s, "
        f"{requeued} requeues, {len(every)} jobs finished {time.monotonic() - started:.1f}s after; lost 0, "
        f"duplicated {sum(n > 1 for n in per_key.values())}"
    )
    assert set(statuses) <= {200, 202, 503}


def test_busy_timeout_exceeded_is_503_database_unavailable_with_retry_after(tmp_path, models_dir):
    """Past SQLite's busy timeout the driver raises 'database is locked': the API must say 503, not 500. The server's
    timeout (30 s) is shortened here on the real engine, so the test does not wait it out."""
    from fastapi.testclient import TestClient

    from darkroom.api.app import create_app

    settings = Settings(data_dir=tmp_path / "data", models_dir=models_dir)
    svc = Services.open(settings)
    try:
        sa.event.listen(svc.store.engine, "connect", lambda conn, _: conn.execute("PRAGMA busy_timeout=200"))
        svc.store.engine.dispose()
        holder = sqlite3.connect(settings.data_dir / "darkroom.db", isolation_level=None)
        try:
            with TestClient(create_app(svc)) as http:
                holder.execute("BEGIN IMMEDIATE")
                response = http.post("/v1/jobs", json=BODY, headers={"Idempotency-Key": "busy-1"})
                holder.execute("ROLLBACK")
                assert response.status_code == 503, response.text
                assert response.json()["error"]["code"] == "database_unavailable"
                assert response.headers["Retry-After"]
                again = http.post("/v1/jobs", json=BODY, headers={"Idempotency-Key": "busy-1"})
                assert again.status_code == 202, again.text
        finally:
            holder.close()
    finally:
        svc.close()


# --- 3. the S3 server stopped and restarted ---------------------------------------------------------------------------


class RestartableS3:
    """moto's server on a fixed port that can be stopped and started again (its state is in memory: a restart comes
    back empty, so the bucket is made again, as an operator restoring the store would)."""

    def __init__(self) -> None:
        from tests.infra.s3 import S3Server

        self.server = S3Server()
        self.server.wait_ready()

    def stop(self) -> None:
        self.server.proc.kill()
        self.server.proc.wait(10)

    def start(self, bucket: str) -> None:
        server = self.server
        server.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(server.port)],
            stdout=server._fh,
            stderr=subprocess.STDOUT,
        )
        server.wait_ready()
        server.client().create_bucket(Bucket=bucket)

    def close(self) -> None:
        self.server.stop()


def png_b64(size: int = 64) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_s3_stopped_then_restarted_burns_no_job_and_uploads_get_503(faults_env):
    from tests.infra.s3 import moto_available

    if not moto_available():
        pytest.skip("moto[server] is not installed")
    faults, cluster = faults_env, faults_env.cluster
    s3 = RestartableS3()
    try:
        bucket = s3.server.new_bucket()
        cluster.env.update(
            {
                **s3.server.env(bucket),
                "DARKROOM_STORAGE__S3_MAX_ATTEMPTS": "2",
                "DARKROOM_MAX_ATTEMPTS": "2",
                "DARKROOM_MAX_BATCH": "1",
                "DARKROOM_RECOVERY__STORAGE_BACKOFF_SECONDS": "0.5",
                "DARKROOM_RECOVERY__MAX_BACKOFF_SECONDS": "2",
            }
        )
        cluster.start_server(workers=1)
        ids = [faults.submit(**{**BODY, "steps": 10, "seed": s}) for s in range(5)]
        faults.wait(lambda: faults.running(min_step=1), 120, "a job running")
        s3.stop()
        stopped = time.monotonic()
        upload = faults.http.post("/v1/jobs", json={**BODY, "init_image": png_b64(), "strength": 0.5})
        assert upload.status_code == 503, upload.text
        assert upload.json()["error"]["code"] == "storage_unavailable", upload.text

        def released() -> list[sa.Row]:
            return faults.rows("SELECT job_id FROM job_events WHERE type = 'requeued' AND data LIKE '%storage%'")

        faults.wait(lambda: len(released()) >= 2, 120, "jobs released by the storage outage")
        outage_s = time.monotonic() - stopped
        assert not {"dead", "failed"} & set(faults.states(ids).values()), faults.states(ids)
        s3.start(bucket)
        restarted = time.monotonic()
        states = faults.wait_finished(ids, 180)
        recovery_s = time.monotonic() - restarted
        faults.check_exactly_once(ids)
        started = Counter(r.job_id for r in faults.rows("SELECT job_id FROM job_events WHERE type = 'started'"))
        attempts = {r.id: r.attempts for r in faults.rows("SELECT id, attempts FROM jobs") if r.id in ids}
        stored = s3.server.client().list_objects_v2(Bucket=bucket).get("KeyCount", 0)
        print(
            f"\nS3 stopped {outage_s:.1f}s: {len(released())} storage releases, starts per job "
            f"{sorted(started[i] for i in ids)}, attempts charged {sorted(attempts.values())}, all {len(states)} "
            f"succeeded {recovery_s:.1f}s after the restart; {stored} objects stored; lost 0, duplicated 0"
        )
        assert all(n <= 1 for n in attempts.values()), f"storage failures were charged: {attempts}"
    finally:
        s3.close()


def test_a_bucket_gone_from_a_restarted_s3_server_is_a_503_not_a_500(tmp_path, models_dir, s3_server, monkeypatch):
    """A restarted (or wiped) server comes back without the bucket: NoSuchBucket is the store's outage, so an upload is
    a 503 `storage_unavailable` and a worker releases its job uncharged, instead of a 500 and a charged attempt."""
    from fastapi.testclient import TestClient

    from darkroom.api.app import create_app

    bucket = s3_server.new_bucket()
    for name, value in s3_server.env(bucket).items():
        monkeypatch.setenv(name, value)
    svc = Services.open(Settings(data_dir=tmp_path / "data", models_dir=models_dir))
    try:
        s3_server.client().delete_bucket(Bucket=bucket)
        with TestClient(create_app(svc)) as http:
            response = http.post("/v1/jobs", json={**BODY, "init_image": png_b64(), "strength": 0.5})
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "storage_unavailable"
        assert response.headers["Retry-After"]
    finally:
        svc.close()


# --- 4. the wall clock jumps forward past the lease -------------------------------------------------------------------


def test_clock_jump_past_the_lease_neither_loses_nor_duplicates_a_running_job(tmp_path, models_dir, monkeypatch):
    settings = Settings(
        data_dir=tmp_path / "data",
        models_dir=models_dir,
        lease_seconds=3,
        heartbeat_seconds=1.0,
        progress_interval=0,
        max_batch=1,
        batch_window_seconds=0,
        retry_backoff_seconds=0,
        poll_seconds=0.05,
        recovery=RecoverySettings(max_backoff_seconds=2.0),
    )
    svc = Services.open(settings)
    offset = [dt.timedelta(0)]
    real_utcnow = clock.utcnow
    monkeypatch.setattr(clock, "utcnow", lambda: real_utcnow() + offset[0])
    stop = threading.Event()
    workers = [Worker(settings, svc.store, svc.blobs, svc.make_engine, worker_id=f"w{i}") for i in (1, 2)]
    threads = [threading.Thread(target=w.run, args=(stop,), daemon=True) for w in workers]
    db = svc.store.engine

    def rows(sql: str) -> list[sa.Row]:
        with db.connect() as conn:
            return conn.execute(sa.text(sql)).all()

    try:
        request = {**BODY, "model": "tiny-diffusers"}
        ids = [svc.store.create(GenerationRequest(**{**request, "steps": 30, "seed": s}))[0].id for s in range(3)]
        for thread in threads:
            thread.start()
        running = wait_until(
            lambda: rows("SELECT id FROM jobs WHERE state = 'running' AND progress_step >= 2"), 120, what="running"
        )[0].id
        jumped_at = time.monotonic()
        reaped: list[str] = []
        for _ in range(3):  # a heartbeat landing between the jump and the reap renews the lease: jump again
            offset[0] += dt.timedelta(hours=1)  # far past every lease, at once, for every thread of the process
            reaped = svc.store.requeue_expired()  # the reaper any node runs, run now rather than at its next tick
            if running in reaped:
                break
        assert running in reaped, "the jump did not expire the running job's lease"

        def states() -> dict[str, str]:
            return {r.id: r.state for r in rows("SELECT id, state FROM jobs") if r.id in ids}

        wait_until(lambda: set(states().values()) <= TERMINAL, 180, what="jobs finished after the jump")
        finished_s = time.monotonic() - jumped_at
        assert set(states().values()) == {"succeeded"}, states()
        succeeded = Counter(r.job_id for r in rows("SELECT job_id FROM job_events WHERE type = 'succeeded'"))
        images = Counter(r.job_id for r in rows("SELECT job_id FROM images"))
        requeued = Counter(r.job_id for r in rows("SELECT job_id FROM job_events WHERE type = 'requeued'"))
        print(
            f"\nclock jump +{offset[0]}: {sum(requeued[i] for i in ids)} requeues, all {len(ids)} succeeded "
            f"{finished_s:.1f}s after the jump; duplicated {sum(succeeded[i] > 1 or images[i] > 1 for i in ids)}"
        )
        assert all(succeeded[i] == 1 and images[i] == 1 for i in ids), (succeeded, images)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        svc.close()
