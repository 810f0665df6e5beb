"""`darkroom serve --api-processes 2` as deployed: real processes on one port, one SQLite store, one worker.

Which process accepts a connection is the kernel's choice, so the test makes it deterministic: with the primary
stopped (SIGSTOP), whatever answers is the replica."""

from __future__ import annotations

import signal

import httpx
import psutil
import pytest

from .harness import Cluster, wait_until

pytestmark = pytest.mark.integration

BODY = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 2}


def replicas(primary: int) -> list[psutil.Process]:
    try:
        children = psutil.Process(primary).children()
    except psutil.NoSuchProcess:
        return []
    return [c for c in children if "--listen-fd" in c.cmdline()]


def test_a_replica_answers_on_the_same_port_and_is_kept_alive_until_the_server_stops(tmp_path, models_dir):
    cluster = Cluster(
        tmp_path, models_dir, env={"DARKROOM_SERVER__API_PROCESSES": "2", "DARKROOM_CPU_WORKER_NICE": "10"}
    )
    try:
        server = cluster.start_server(workers=1)
        (replica,) = wait_until(lambda: replicas(server.pid), timeout=60, what="the second API process")
        assert "--workers" in replica.cmdline() and replica.cmdline()[replica.cmdline().index("--workers") + 1] == "0"
        server.kill(signal.SIGSTOP)  # a replica still starting takes the queued connection once it is up
        try:
            with httpx.Client(base_url=cluster.url, timeout=60) as http:
                job = wait_until(lambda: _submit(http), timeout=60, what="the replica to answer")
                # It cannot see the primary's worker processes: it is ready while a worker of the fleet is live.
                ready = wait_until(lambda: (r := http.get("/readyz")).status_code == 200 and r.json(), timeout=60)
                assert ready["checks"]["fleet"] == "ok"
        finally:
            server.kill(signal.SIGCONT)
        with httpx.Client(base_url=cluster.url, timeout=60) as http:  # the primary's worker ran it, either answers
            done = wait_until(
                lambda: (j := http.get(f"/v1/jobs/{job['id']}").json())["state"] == "succeeded" and j,
                timeout=120,
                what=f"the job to finish\n{cluster.logs()}",
            )
            assert done["images"] and done["images"][0]["url"]
        # The worker denoises on the CPU, on the cores the API answers on: it runs 10 nicer (`cpu_worker_nice`).
        (worker,) = [c for c in psutil.Process(server.pid).children() if "--worker-id" in c.cmdline()]
        assert worker.nice() == psutil.Process(server.pid).nice() + 10 == replica.nice() + 10

        replica.kill()  # a replica that dies is started again; the primary answers meanwhile
        with httpx.Client(base_url=cluster.url, timeout=60) as http:
            assert http.get("/healthz").status_code == 200
        (again,) = wait_until(lambda: [r for r in replicas(server.pid) if r.pid != replica.pid], timeout=60)
        server.stop()
        wait_until(lambda: not again.is_running() or again.status() == psutil.STATUS_ZOMBIE, timeout=30)
    finally:
        cluster.close()


def _submit(http: httpx.Client) -> dict | None:
    try:
        response = http.post("/v1/jobs", json=BODY)
    except httpx.TransportError:
        return None
    assert response.status_code == 202, response.text
    return response.json()
