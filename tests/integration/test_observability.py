"""Observability across real processes: `darkroom serve` (no workers) and `darkroom worker` processes in JSON log
mode over one SQLite data dir.

- one job's JSON lines carry the same request id in the API's access line and in its worker's lines;
- a frozen worker (SIGSTOP mid-job) is found by the API's health sweep: marked lost, its job re-queued, both shown
  by `GET /v1/admin/health`."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Iterator

import httpx
import pytest
import sqlalchemy as sa

from .harness import Cluster, Proc, wait_until

pytestmark = pytest.mark.integration


def json_lines(proc: Proc) -> list[dict]:
    """The process's log lines that are JSON objects (the CLI's console notes are plain text by design)."""
    lines = []
    for line in proc.output().splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, models_dir) -> Iterator[tuple[Cluster, Proc]]:
    """The server and one worker on a slow device, shared by the module (a worker process start is the cost)."""
    env = {
        "DARKROOM_LOG_FORMAT": "json",
        "DARKROOM_OBSERVABILITY__HEALTH_SWEEP_SECONDS": "0.3",
        "DARKROOM_TEST_STEP_SECONDS": "0.2",
        "DARKROOM_SECURITY__WATERMARK": "false",
        "DARKROOM_SECURITY__C2PA": "false",
    }
    cluster = Cluster(tmp_path_factory.mktemp("observability"), models_dir, env=env)
    try:
        cluster.start_server(workers=0)
        yield cluster, start_slow_worker(cluster, "w1")
    finally:
        cluster.close()


def start_slow_worker(cluster: Cluster, name: str) -> Proc:
    proc = cluster._spawn([sys.executable, "-m", "tests.support.slow_worker", "worker", "--worker-id", name], name)
    wait_until(lambda: f"worker {name} started" in proc.output(), 180, what=f"{name} to start\n{cluster.logs()}")
    return proc


def job(http: httpx.Client, job_id: str) -> dict:
    return http.get(f"/v1/jobs/{job_id}").json()


def test_a_jobs_json_lines_carry_one_request_id_from_api_to_worker_process(cluster):
    cluster, worker = cluster
    with cluster.client() as http:
        body = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 1}
        answer = http.post("/v1/jobs", json=body, headers={"X-Request-ID": "req-across-processes"})
        assert answer.status_code == 202, answer.text
        job_id = answer.json()["id"]
        wait_until(lambda: job(http, job_id)["state"] == "succeeded", 120, what=f"the job\n{cluster.logs()}")
    assert cluster.server is not None
    access = [x for x in json_lines(cluster.server) if x["logger"] == "darkroom.access" and x.get("job_id") == job_id]
    assert [x["request_id"] for x in access] == ["req-across-processes"], cluster.logs()
    assert access[0]["method"] == "POST" and access[0]["status"] == 202 and access[0]["tenant"] == "default"
    worked = [x for x in json_lines(worker) if x.get("job_id") == job_id]
    assert any(x["msg"].startswith("worker w1 runs") for x in worked), cluster.logs()
    assert {x["request_id"] for x in worked} == {"req-across-processes"}
    assert {x["worker_id"] for x in worked} == {"w1"}


def test_a_frozen_worker_is_found_lost_and_its_job_requeued(cluster):
    cluster, worker = cluster
    with cluster.client() as http:
        body = {"prompt": "a frozen lake", "width": 64, "height": 64, "steps": 40}
        job_id = http.post("/v1/jobs", json=body).json()["id"]
        wait_until(lambda: job(http, job_id)["state"] == "running", 120, what=f"the job to run\n{cluster.logs()}")
        worker.kill(signal.SIGSTOP)  # heartbeats stop mid-job; the process neither exits nor gives the job back
        try:
            wait_until(lambda: job(http, job_id)["state"] == "queued", 60, what=f"the requeue\n{cluster.logs()}")
            report = http.get("/v1/admin/health").json()
        finally:
            worker.kill(signal.SIGKILL)
            worker.popen.wait(10)
    assert "w1" in report["lost_workers"], report
    assert report["status"] == "degraded"
    db = sa.create_engine(f"sqlite:///{cluster.data_dir / 'darkroom.db'}")
    with db.connect() as conn:
        requeued = conn.execute(
            sa.text("SELECT data FROM job_events WHERE job_id = :j AND type = 'requeued'"), {"j": job_id}
        ).all()
    db.dispose()
    assert [json.loads(r.data)["reason"] for r in requeued] == ["lease expired"]
    assert json.loads(requeued[0].data)["worker"] == "w1"
