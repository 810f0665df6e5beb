"""Routing (engines/routing.py) through real parts: a SQLite job store, in-process workers whose engine is the
OpenAI-compatible remote, and small OpenAI-compatible servers on loopback (tests/support/openai_images.py)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from darkroom.config import RecoverySettings, RemoteEngineSettings, RoutingSettings, Settings, WebhookSettings
from darkroom.engines import routing
from darkroom.jobs.store import JobRecord
from darkroom.schemas import GenerationRequest, JobState
from darkroom.service import Services
from darkroom.worker.failures import claim_gate
from darkroom.worker.loop import Worker
from tests.support.openai_images import OpenAIImagesServer

KEY = "sk-routing-test"


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DARKROOM_TEST_CLOUD_KEY", KEY)


@contextlib.contextmanager
def cloud_worker(tmp: Path, cloud: OpenAIImagesServer, name: str, data_dir: Path, **rules: object) -> Iterator[Worker]:
    """A worker whose engine is the cloud at `cloud`, on the job store in `data_dir` (shared by every worker)."""
    settings = Settings(
        data_dir=data_dir,
        models_dir=tmp / "models",
        engine="openai",
        remote=RemoteEngineSettings(url=cloud.url, api_key_env="DARKROOM_TEST_CLOUD_KEY", poll_seconds=0.02),
        routing=RoutingSettings(**rules),  # type: ignore[arg-type]
        retry_backoff_seconds=0.001,
        recovery=RecoverySettings(fatal_backoff_seconds=0.01, max_backoff_seconds=0.05),
        postprocess_workers=0,
        webhooks=WebhookSettings(enabled=False),
    )
    services = Services.open(settings)
    worker = Worker(
        settings, services.store, services.blobs, services.make_engine, worker_id=name, route=services.route
    )
    try:
        yield worker
    finally:
        if worker._engine is not None:
            worker._engine.close()
        services.close()


def submit(worker: Worker, label: str, prompt: str = "a field") -> JobRecord:
    request = GenerationRequest(prompt=prompt, model="cloud", width=64, height=64, steps=1, seed=1, data_label=label)
    return worker.store.create(request)[0]


def test_a_jobs_label_is_the_stricter_of_its_requests_and_its_tenants() -> None:
    assert routing.job_label(None, None, "internal") == "internal"
    assert routing.job_label("public", None, "internal") == "public"
    assert routing.job_label("public", "confidential", "internal") == "confidential"
    assert routing.job_label("confidential", "public", "public") == "confidential"
    assert routing.claimable_labels(False, RoutingSettings()) is None  # inside the deployment: anything
    rules = RoutingSettings(external_labels=["internal", "public"])
    assert routing.claimable_labels(True, rules) == ["internal", "public"]


def test_a_remote_overflows_only_past_the_threshold_and_never_takes_confidential_work(tmp_path: Path) -> None:
    with (
        OpenAIImagesServer(KEY) as cloud,
        cloud_worker(tmp_path, cloud, "cloud-1", tmp_path / "data", overflow_queue_depth=2) as worker,
    ):
        public = submit(worker, "public")
        assert not worker.run_once()  # one queued job: the local workers have it
        confidential = submit(worker, "confidential")
        assert worker.run_once()  # two queued: overflow, and the cloud takes the public one
        done = worker.store.require(public.id)
        assert done.state is JobState.succeeded and done.result["engine"] == "openai-remote"
        internal = submit(worker, "internal")
        for _ in range(3):
            submit(worker, "confidential")
        assert not worker.run_once()  # a long queue, but of work the cloud may not take
        for job in (confidential, internal):
            assert worker.store.require(job.id).state is JobState.queued
        assert [c.fields["prompt"] for c in cloud.calls] == ["a field"]  # the one public job reached the cloud


def test_a_failing_engine_opens_its_circuit_and_the_job_is_retried_by_another(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with (
        OpenAIImagesServer(KEY) as broken,
        OpenAIImagesServer(KEY) as healthy,
        cloud_worker(tmp_path, broken, "broken", data, circuit_failures=2, circuit_cooldown_seconds=60) as first,
        cloud_worker(tmp_path, healthy, "healthy", data) as second,
    ):
        broken.failing = True
        jobs = [submit(first, "public", prompt=f"job {i}") for i in range(3)]
        assert first.run_once()  # two failed runs in a row open the circuit; the batch's third job goes back
        assert first.route.circuit.state() == "open"
        assert not first.run_once()  # jobs are queued, but an open circuit claims nothing
        while second.run_once():
            pass
        for job in jobs:
            done = second.store.require(job.id)
            assert done.state is JobState.succeeded and done.result["worker"] == "healthy"
        retried = second.store.require(jobs[0].id)
        assert retried.attempts == 2  # the failed attempt on the broken engine counts, and says where it failed
        events = [e for e in second.store.events_since(jobs[0].id) if e.type in ("started", "retry", "failed")]
        assert [e.data.get("worker") for e in events if e.type == "started"] == ["broken", "healthy"]


def test_a_remote_that_stops_answering_costs_no_attempt_and_its_worker_resumes_when_it_is_back(tmp_path: Path) -> None:
    with OpenAIImagesServer(KEY) as gone:  # answered once; from here on nothing listens at its address
        port = gone.httpd.server_address[1]
    with cloud_worker(tmp_path, gone, "cloud", tmp_path / "data") as worker:
        job = submit(worker, "public")
        assert worker.run_once()  # connection refused: the engine's fault, the job goes back uncharged
        queued = worker.store.require(job.id)
        assert queued.state is JobState.queued and queued.attempts == 0
        stop = threading.Event()
        assert not any(claim_gate(worker, stop) for _ in range(3))  # the remote's check fails: no claims
        with OpenAIImagesServer(KEY, port=port):  # the remote is back at the same address
            while not claim_gate(worker, stop):  # the pause runs out and the check passes
                pass
            assert worker.run_once()
        done = worker.store.require(job.id)
        assert done.state is JobState.succeeded and done.attempts == 1


def test_concurrency_slots_bound_the_jobs_a_process_runs_at_once() -> None:
    slots = routing.Slots(1)
    assert slots.take() and not slots.take()
    slots.give()
    assert slots.take()
    assert all(routing.Slots(None).take() for _ in range(5))
