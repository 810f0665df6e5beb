"""Fleet health: stuck jobs are taken from their worker through the store's guarded moves, lost workers and a low
data disk are reported by `GET /v1/admin/health` and in metrics, and `/readyz` wants a live worker when told to.

Real SQLite store and app (TestClient); time is moved with `clock.frozen`, never slept. The frozen *process* (a real
worker under SIGSTOP) is in tests/integration/test_observability.py."""

from __future__ import annotations

import datetime as dt

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from darkroom import clock
from darkroom.api.app import create_app
from darkroom.config import ObservabilitySettings, Settings
from darkroom.jobs.db import migrate
from darkroom.jobs.store import JobStore
from darkroom.jobs.workers import WorkerInfo, WorkerRegistry
from darkroom.observability.health import sweep
from darkroom.schemas import GenerationRequest
from darkroom.service import Services


def settings_for(tmp_path, **observability) -> Settings:
    obs = ObservabilitySettings(stuck_grace_seconds=2.0, health_sweep_seconds=3600, **observability)
    return Settings(data_dir=tmp_path / "data", lease_seconds=30, job_timeout_seconds=None, observability=obs)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    settings = settings_for(tmp_path)
    settings.data_dir.mkdir(parents=True)
    url = settings.resolved_database_url if request.param == "sqlite" else request.getfixturevalue("pg_url")
    migrate(url, lock_dir=tmp_path)
    s = JobStore(url)
    yield s
    s.close()


def running_job(store: JobStore, worker: str, timeout: float, max_attempts: int = 3) -> str:
    request = GenerationRequest(prompt="a harbour", seed=1, width=64, height=64, steps=1, timeout_seconds=timeout)
    job, _ = store.create(request, max_attempts=max_attempts)
    (claimed,) = store.claim_batch(worker, 30.0)
    assert claimed.id == job.id and store.start(job.id, worker) == 1
    return job.id


def later(seconds: float):
    return clock.frozen(clock.utcnow() + dt.timedelta(seconds=seconds))


def test_a_job_past_its_time_limit_is_taken_from_its_worker_and_requeued(tmp_path, store):
    settings = settings_for(tmp_path)
    stuck = running_job(store, "w-hung", timeout=5)
    with later(5 + 2 - 1):  # within limit and grace: left alone, though its worker has not stepped
        assert sweep(settings, store).stuck_jobs == []
    with later(5 + 2 + 1):
        report = sweep(settings, store)
        assert store.heartbeat(stuck, "w-hung", 30).owned is False  # the hung worker's lease is gone
    assert report.stuck_jobs == [stuck] and report.status == "degraded"
    job = store.require(stuck)
    assert job.state.value == "queued" and job.lease_owner is None
    assert store.events_since(stuck)[-1].type == "requeued"
    assert store.events_since(stuck)[-1].data["reason"] == "stuck"
    assert store.complete(stuck, "w-hung", [], {"timings": {}}) is False  # its late result is refused


def test_a_stuck_job_out_of_attempts_is_dead_with_a_stuck_error(tmp_path, store):
    settings = settings_for(tmp_path)
    job_id = running_job(store, "w-hung", timeout=1, max_attempts=1)
    with later(10):
        assert sweep(settings, store).stuck_jobs == [job_id]
    job = store.require(job_id)
    assert job.state.value == "dead" and job.error is not None and job.error["code"] == "stuck"


def samples(text: str) -> dict[str, float]:
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def test_admin_health_reports_lost_workers_and_low_disk_and_readyz_wants_a_live_worker(tmp_path):
    settings = settings_for(tmp_path, disk_low_bytes=1 << 62, expect_workers=True)
    svc = Services.open(settings)
    try:
        registry = WorkerRegistry(svc.store.engine)
        with TestClient(create_app(svc, workers=0)) as api:
            assert api.get("/readyz").json()["checks"]["fleet"] == "error: no live worker"
            registry.register(WorkerInfo(id="gpu-a", host="h", pid=1, device="cpu"))
            fresh = api.get("/v1/admin/health").json()
            assert fresh["live_workers"] == 1 and fresh["lost_workers"] == []
            with later(31):  # past a lease with no heartbeat
                report = api.get("/v1/admin/health").json()
            scraped = samples(api.get("/metrics").text)
    finally:
        svc.close()
    assert report["lost_workers"] == ["gpu-a"] and report["live_workers"] == 0
    assert report["disk"]["low"] is True and report["disk"]["free_bytes"] > 0
    assert report["status"] == "degraded"
    assert any("no live worker" in p for p in report["problems"])
    assert report["checks"]["fleet"] == "error: no live worker"
    assert scraped["darkroom_data_disk_low"] == 1
    assert scraped["darkroom_data_disk_free_bytes"] == pytest.approx(report["disk"]["free_bytes"], rel=0.01)
