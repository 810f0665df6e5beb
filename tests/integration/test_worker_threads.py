"""`darkroom worker --threads N --device D`: the loops `serve --devices` starts in each device's process. Both threads
claim and run jobs through the process's one engine, and SIGTERM drains them and ends the process cleanly."""

from __future__ import annotations

import signal

import pytest

from darkroom.worker.processes import ProcessSlot, WorkerProcesses, placement
from tests.integration.harness import DARKROOM, Cluster, wait_until

pytestmark = pytest.mark.integration


def test_devices_get_a_process_each_and_extra_workers_become_their_threads():
    assert placement(2, []) == [(None, 1), (None, 1)]  # no devices: a process per worker (CPU parallelism)
    assert placement(2, ["cuda:0", "cuda:1"]) == [("cuda:0", 1), ("cuda:1", 1)]
    assert placement(5, ["cuda:0", "cuda:1"]) == [("cuda:0", 3), ("cuda:1", 2)]
    assert placement(1, ["cuda:0", "cuda:1"]) == [("cuda:0", 1)]
    assert placement(0, ["cuda:0"]) == []


def test_a_worker_process_runs_its_threads_on_one_device_and_drains_on_sigterm(tmp_path, models_dir):
    cluster = Cluster(tmp_path, models_dir, env={"DARKROOM_MAX_BATCH": "1"})
    try:
        cluster.start_server(workers=0)
        command = [DARKROOM, "worker", "--worker-id", "wt", "--threads", "2", "--device", "cpu"]
        worker = cluster._spawn(command, "wt")
        body = {"prompt": "two threads", "width": 64, "height": 64, "steps": 2, "model": "tiny-diffusers"}
        with cluster.client() as http:
            ids = [http.post("/v1/jobs", json={**body, "seed": i}).json()["id"] for i in range(6)]

            def done() -> bool:
                return all(http.get(f"/v1/jobs/{i}").json()["state"] == "succeeded" for i in ids)

            wait_until(done, timeout=120, what=f"the jobs to succeed\n{cluster.logs()}")
            jobs = [http.get(f"/v1/jobs/{i}").json() for i in ids]
        assert {job["provenance"]["worker"] for job in jobs} == {"wt-0", "wt-1"}
        assert {job["provenance"]["device"] for job in jobs} == {"cpu"}
        worker.kill(signal.SIGTERM)
        assert worker.stop(timeout=60) == 0, cluster.logs()
    finally:
        cluster.close()


def test_serve_passes_each_process_its_device_and_threads(tmp_path):
    from darkroom.config import Settings

    settings = Settings(data_dir=tmp_path, devices=["cuda:0", "cuda:1"], workers=3)
    processes = WorkerProcesses(settings, registry=None)  # type: ignore[arg-type]  # only builds command lines
    slots = [ProcessSlot(i, f"w-{i}", device=d, threads=t) for i, (d, t) in enumerate(placement(3, settings.devices))]
    first, second = (processes.command(slot) for slot in slots)
    assert first[-4:] == ["--device", "cuda:0", "--threads", "2"]
    assert second[-2:] == ["--device", "cuda:1"]
