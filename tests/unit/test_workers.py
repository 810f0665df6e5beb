"""The worker registry on SQLite and PostgreSQL, the worker's presence thread, and GET /v1/workers."""

from __future__ import annotations

import datetime as dt
import time

import pytest
from fastapi.testclient import TestClient

from darkroom import clock
from darkroom.api.app import create_app
from darkroom.config import Settings
from darkroom.jobs.db import migrate
from darkroom.jobs.store import JobStore
from darkroom.jobs.workers import WorkerInfo, WorkerRegistry, WorkerState, stale_after
from darkroom.schemas import GenerationRequest, JobState
from darkroom.service import Services
from darkroom.worker.presence import Presence, describe_device


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def store(db_url, tmp_path):
    migrate(db_url, lock_dir=tmp_path)
    s = JobStore(db_url)
    yield s
    s.close()


@pytest.fixture
def registry(store) -> WorkerRegistry:
    return WorkerRegistry(store.engine)


class FakeClock:
    """Moves `clock.utcnow` forward on demand, so staleness needs no sleeping."""

    def __init__(self, monkeypatch) -> None:
        self.now = dt.datetime(2026, 11, 24, 12, 0, tzinfo=dt.UTC)
        monkeypatch.setattr(clock, "utcnow", lambda: self.now)

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


def info(worker_id: str = "gpu-0", **kw) -> WorkerInfo:
    return WorkerInfo(id=worker_id, host="node-a", pid=123, device="cuda:0 Test GPU", memory_bytes=80 << 30, **kw)


def test_register_heartbeat_and_list(registry):
    record = registry.register(info(models_available=["sd15", "sdxl"]))
    assert record.state is WorkerState.active and record.jobs_done == 0 and record.models_available == ["sd15", "sdxl"]
    assert registry.heartbeat("gpu-0", ["sd15"], jobs_done=7) is WorkerState.active
    [listed] = registry.list()
    assert (listed.host, listed.pid, listed.memory_bytes) == ("node-a", 123, 80 << 30)
    assert listed.loaded_models == ["sd15"] and listed.jobs_done == 7
    assert listed.last_heartbeat_at >= listed.started_at and listed.started_at.tzinfo is not None
    assert registry.heartbeat("nobody", [], 0) is None


def test_restarted_worker_with_the_same_id_starts_afresh(registry):
    registry.register(info())
    registry.heartbeat("gpu-0", ["sd15"], jobs_done=40)
    registry.mark_stopped("gpu-0")
    again = registry.register(info())
    assert again.state is WorkerState.active and again.jobs_done == 0 and len(registry.list()) == 1


def test_silent_workers_are_marked_lost_and_come_back_when_they_beat(registry, monkeypatch):
    fake = FakeClock(monkeypatch)
    registry.register(info("gpu-0"))
    registry.register(info("gpu-1"))
    registry.mark_draining("gpu-1")
    fake.advance(20)
    registry.heartbeat("gpu-0", [], 1)
    fake.advance(20)
    assert registry.mark_lost(30) == ["gpu-1"]  # draining workers can die too
    assert registry.mark_lost(30) == []
    assert {w.id: w.state for w in registry.list()} == {"gpu-0": WorkerState.active, "gpu-1": WorkerState.lost}
    assert registry.heartbeat("gpu-1", [], 0) is WorkerState.active
    assert [w.id for w in registry.list(WorkerState.active)] == ["gpu-0", "gpu-1"]


def test_stopped_workers_stay_stopped(registry, monkeypatch):
    fake = FakeClock(monkeypatch)
    registry.register(info())
    assert registry.mark_stopped("gpu-0") and not registry.mark_draining("gpu-0")
    fake.advance(3600)
    assert registry.mark_lost(30) == [] and registry.heartbeat("gpu-0", [], 0) is None


def test_a_lost_workers_job_goes_back_to_the_queue_through_its_lease(store, registry):
    registry.register(info("gone"))
    job, _ = store.create(GenerationRequest(prompt="a cat", seed=1))
    assert store.claim("gone", lease_seconds=0.3).id == job.id
    time.sleep(0.5)  # no heartbeats from "gone": neither for the worker nor for its lease
    assert registry.mark_lost(0.3) == ["gone"]
    assert store.requeue_expired() == [job.id]
    assert store.get(job.id).state is JobState.queued
    assert store.claim("rescuer", lease_seconds=30).id == job.id


def test_presence_registers_heartbeats_and_stops(registry, tmp_path):
    settings = Settings(data_dir=tmp_path, heartbeat_seconds=0.05, lease_seconds=1)
    held: list[tuple[str, str]] = []
    done = [0]
    presence = Presence(
        registry,
        "w-1",
        settings,
        loaded_models=lambda: list(held),
        jobs_done=lambda: done[0],
        models_available=lambda: ["tiny"],
        device=("cpu", 1 << 30),
    )
    presence.start()
    try:
        assert registry.get("w-1").state is WorkerState.active
        held.append(("tiny", "ab" * 32))
        done[0] = 3
        deadline = time.monotonic() + 10
        while registry.get("w-1").jobs_done != 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        record = registry.get("w-1")
        assert record.loaded_models == ["tiny"] and record.jobs_done == 3 and record.models_available == ["tiny"]
        presence.drain()
        assert registry.get("w-1").state is WorkerState.draining
    finally:
        presence.stop()
    assert registry.get("w-1").state is WorkerState.stopped


def test_presence_reports_a_drain_flag_from_its_own_thread(registry, tmp_path):
    settings = Settings(data_dir=tmp_path, heartbeat_seconds=0.05, lease_seconds=1)
    flag = {"draining": False}
    presence = Presence(registry, "w-2", settings, draining=lambda: flag["draining"], device=("cpu", None))
    presence.start()
    try:
        flag["draining"] = True  # what a SIGTERM handler does: no database write in the handler
        deadline = time.monotonic() + 10
        while registry.get("w-2").state is not WorkerState.draining and time.monotonic() < deadline:
            time.sleep(0.05)
        assert registry.get("w-2").state is WorkerState.draining
    finally:
        presence.stop()


def test_presence_marks_silent_peers_lost(registry, tmp_path, monkeypatch):
    settings = Settings(data_dir=tmp_path, heartbeat_seconds=0.05, lease_seconds=0.2)
    registry.register(info("dead-peer"))
    presence = Presence(registry, "alive", settings, device=("cpu", None))
    presence.start()
    try:
        deadline = time.monotonic() + 10
        while registry.get("dead-peer").state is not WorkerState.lost and time.monotonic() < deadline:
            time.sleep(0.05)
        assert registry.get("dead-peer").state is WorkerState.lost
        assert registry.get("alive").state is WorkerState.active
    finally:
        presence.stop()


def test_stale_after_covers_a_lease_and_three_heartbeats():
    assert stale_after(30, 5) == 30 and stale_after(3, 5) == 15


def test_describe_device_on_cpu():
    description, memory = describe_device("cpu")
    assert description == "cpu" and memory and memory > 0


def test_get_workers_lists_the_fleet_and_marks_the_silent_lost(tmp_path, monkeypatch):
    services = Services.open(Settings(data_dir=tmp_path / "data", lease_seconds=5, heartbeat_seconds=1))
    try:
        registry = WorkerRegistry(services.store.engine)
        fake = FakeClock(monkeypatch)
        registry.register(info("old"))
        fake.advance(60)
        registry.register(info("new", loaded_models=["sd15"]))
        with TestClient(create_app(services)) as api:
            workers = api.get("/v1/workers").json()
            assert [(w["id"], w["state"]) for w in workers] == [("old", "lost"), ("new", "active")]
            assert workers[1]["loaded_models"] == ["sd15"] and workers[1]["device"] == "cuda:0 Test GPU"
            assert [w["id"] for w in api.get("/v1/workers", params={"state": "active"}).json()] == ["new"]
            assert api.get("/v1/workers", params={"state": "bogus"}).status_code == 422
    finally:
        services.close()
