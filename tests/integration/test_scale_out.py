"""Scale-out as it is deployed: one API-only `darkroom serve`, three `darkroom worker` processes, PostgreSQL for jobs
and an S3-compatible server (moto, a real process over HTTP) for images. Nothing is shared but those two services.

The tests run in order on one cluster (starting four processes that import torch takes a while on two cores):
60 mixed jobs spread over the workers; a worker SIGKILLed mid-job; PostgreSQL restarted mid-run.
"""

from __future__ import annotations

import contextlib
import itertools
import signal
from collections import Counter

import httpx
import pytest
import sqlalchemy as sa

from darkroom.jobs.db import create_engine
from tests.infra.postgres import fresh_database

from .harness import Cluster, wait_until

pytestmark = pytest.mark.integration

WORKERS = ("w1", "w2", "w3")
PREFIX = "it/images"
TERMINAL = {"succeeded", "failed", "cancelled", "dead"}


class ScaleOut:
    def __init__(self, cluster: Cluster, db_url: str, s3, bucket: str) -> None:  # type: ignore[no-untyped-def]
        self.cluster, self.s3, self.bucket = cluster, s3, bucket
        self.db = create_engine(db_url)
        self.http = cluster.client()
        self.workers = {name: cluster.start_worker(name) for name in WORKERS}
        self.killed: set[str] = set()

    def kill(self, name: str) -> None:
        self.killed.add(name)
        self.workers[name].kill(signal.SIGKILL)
        self.workers[name].popen.wait(10)

    def alive(self) -> set[str]:
        return {name for name, proc in self.workers.items() if proc.alive()}

    def wait(self, predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
        """`wait_until`, with the processes' logs as they are when it gives up."""
        try:
            return wait_until(predicate, timeout=timeout, interval=0.25, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.cluster.logs()}") from None

    def submit(self, body: dict) -> str:
        response = self.http.post("/v1/jobs", json=body)
        assert response.status_code == 202, response.text
        return response.json()["id"]

    def states(self, ids: list[str]) -> Counter[str]:
        with self.db.connect() as conn:
            rows = conn.execute(sa.text("SELECT state FROM jobs WHERE id = ANY(:ids)"), {"ids": ids}).scalars()
            return Counter(rows)

    def wait_finished(self, ids: list[str], timeout: float = 240) -> None:
        def finished() -> bool:
            with contextlib.suppress(sa.exc.OperationalError):  # PostgreSQL may be restarting
                states = self.states(ids)
                return sum(n for s, n in states.items() if s in TERMINAL) == len(ids)
            return False

        self.wait(finished, timeout, f"{len(ids)} jobs to finish")

    def mid_job(self) -> dict[str, list[str]]:
        """Jobs each worker is in the middle of (2 to 20 of 40 steps done: far from finishing), by worker."""
        query = "SELECT id, lease_owner FROM jobs WHERE state = 'running' AND progress_step BETWEEN 2 AND 20"
        with self.db.connect() as conn:
            found: dict[str, list[str]] = {}
            for job_id, owner in conn.execute(sa.text(query)):
                found.setdefault(owner, []).append(job_id)
            return found

    def check_exactly_once(self, expected: dict[str, int]) -> dict[str, dict]:
        """Every job succeeded once, with exactly its n images, each in the bucket. Returns the job views by id."""
        views = {job_id: self.http.get(f"/v1/jobs/{job_id}").json() for job_id in expected}
        bad = {i: (v["state"], v.get("error")) for i, v in views.items() if v["state"] != "succeeded"}
        assert not bad, f"{bad}\n{self.cluster.logs()}"
        for job_id, n in expected.items():
            assert [img["index"] for img in views[job_id]["images"]] == list(range(n)), views[job_id]
        with self.db.connect() as conn:
            succeeded = Counter(
                conn.execute(
                    sa.text("SELECT job_id FROM job_events WHERE type = 'succeeded' AND job_id = ANY(:ids)"),
                    {"ids": list(expected)},
                ).scalars()
            )
            keys = set(
                conn.execute(
                    sa.text("SELECT blob_key FROM images WHERE job_id = ANY(:ids)"), {"ids": list(expected)}
                ).scalars()
            )
        assert set(succeeded.values()) == {1} and set(succeeded) == set(expected)
        assert keys <= self.bucket_keys(), "an image row points at a blob that is not in the bucket"
        return views

    def bucket_keys(self) -> set[str]:
        pages = self.s3.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=PREFIX + "/")
        return {o["Key"].removeprefix(PREFIX + "/") for page in pages for o in page.get("Contents", [])}

    def close(self) -> None:
        self.http.close()
        self.db.dispose()
        self.cluster.close()


@pytest.fixture(scope="module")
def scale_out(tmp_path_factory, pg_cluster, s3_server, models_dir):
    # The cluster fixture itself (not DARKROOM_TEST_PG_URL): the last test restarts the server.
    db_url = fresh_database(pg_cluster.url)
    bucket = s3_server.new_bucket()
    env = {"DARKROOM_DATABASE_URL": db_url, **s3_server.env(bucket, prefix=PREFIX)}
    cluster = Cluster(tmp_path_factory.mktemp("scale-out"), models_dir, env=env)
    try:
        cluster.start_server(workers=0)
        setup = ScaleOut(cluster, db_url, s3_server, bucket)
    except BaseException:
        cluster.close()
        raise
    try:
        for name, proc in setup.workers.items():
            setup.wait(lambda p=proc, n=name: f"worker {n} started" in p.output(), 180, f"{name} to start")
        yield setup
    finally:
        setup.close()


def test_sixty_mixed_jobs_succeed_exactly_once_spread_over_the_workers(scale_out):
    priorities = itertools.cycle(["high", "normal", "low", "normal"])
    expected: dict[str, int] = {}
    for i in range(60):
        n = 2 if i % 5 == 0 else 1
        body = {"prompt": f"job {i}", "width": 64, "height": 64, "steps": 2, "n": n, "priority": next(priorities)}
        expected[scale_out.submit(body)] = n
    scale_out.wait_finished(list(expected))
    views = scale_out.check_exactly_once(expected)

    by_worker = Counter(v["provenance"]["worker"] for v in views.values())
    assert set(by_worker) == set(WORKERS) and all(n >= 1 for n in by_worker.values()), by_worker
    assert not (scale_out.cluster.data_dir / "blobs").exists(), "images went to the local folder, not to S3"
    one = next(iter(views.values()))["images"][0]
    png = scale_out.http.get(f"/v1/images/{one['id']}")
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")


def test_sigkilled_worker_jobs_finish_on_the_others(scale_out):
    expected = {}
    for i in range(9):
        expected[scale_out.submit({"prompt": f"long {i}", "width": 64, "height": 64, "steps": 40, "seed": i})] = 1
    busy = scale_out.wait(scale_out.mid_job, 120, "a worker mid-job")
    victim, running = next(iter(busy.items()))
    listed = {w["id"]: w["state"] for w in scale_out.http.get("/v1/workers").json()}
    assert all(listed.get(name) == "active" for name in WORKERS), listed
    scale_out.kill(victim)
    scale_out.wait(
        lambda: {w["id"]: w["state"] for w in scale_out.http.get("/v1/workers").json()}.get(victim) == "lost",
        30,
        f"{victim} marked lost",
    )

    scale_out.wait_finished(list(expected))
    views = scale_out.check_exactly_once(expected)
    for job_id in running:
        assert views[job_id]["attempts"] == 2 and views[job_id]["provenance"]["worker"] != victim
    assert all(v["provenance"]["worker"] != victim for v in views.values() if v["attempts"] == 2)


def test_postgres_restart_mid_run_loses_no_job(scale_out, pg_cluster):
    # 48 jobs: the three workers claim up to 8 each as one tensor batch, so the restart finds jobs still queued
    before = {scale_out.submit({"prompt": f"r {i}", "width": 64, "height": 64, "steps": 6}): 1 for i in range(48)}
    scale_out.wait(lambda: scale_out.states(list(before))["succeeded"] >= 3, 120, "a few jobs done")
    states = scale_out.states(list(before))
    assert states["queued"] + states["running"] > 0, "the run ended before the restart; make the jobs longer"

    pg_cluster.restart()

    def api_answers() -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return scale_out.http.get("/readyz").status_code == 200
        return False

    scale_out.wait(api_answers, 60, "the API to answer after the restart")
    after = {scale_out.submit({"prompt": f"after {i}", "width": 64, "height": 64, "steps": 2}): 1 for i in range(6)}
    expected = before | after
    scale_out.wait_finished(list(expected))
    views = scale_out.check_exactly_once(expected)
    alive = scale_out.alive()
    assert alive == set(WORKERS) - scale_out.killed, f"a worker died with the database\n{scale_out.cluster.logs()}"
    assert {v["provenance"]["worker"] for job, v in views.items() if job in after} <= alive
