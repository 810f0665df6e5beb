"""Metrics move by the right amounts as things happen: real API (TestClient over the ASGI app), real SQLite store, a
real worker thread running the tiny diffusers model; `/metrics` is read back with prometheus-client's own text parser.

Metrics are process-wide (as in production), so each test compares a scrape after with a scrape before."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from darkroom.api.app import create_app
from darkroom.auth.principal import Principal, Role
from darkroom.config import Limits, Settings
from darkroom.observability import metrics
from darkroom.service import Services

BASE = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 2}


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a scrape, by (sample name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def local_scrape(svc: Services) -> dict:
    """What `/metrics` would answer now, read before the app starts (a scrape is itself a request that counts)."""
    return parse(metrics.exposition(metrics.scrape_registry(svc.store.engine)).decode())


@pytest.fixture
def services(tmp_path, models_dir):
    settings = Settings(
        data_dir=tmp_path / "data", models_dir=models_dir, poll_seconds=0.05, limits=Limits(max_queue_depth=50)
    )
    svc = Services.open(settings)
    yield svc
    svc.close()


@pytest.fixture
def api(services):
    with TestClient(create_app(services, workers=0)) as client:
        yield client


def test_a_job_run_by_a_worker_moves_every_job_metric_by_its_amount(services):
    before = local_scrape(services)  # before the worker starts: its model load counts too
    with TestClient(create_app(services, workers=1)) as api:
        job = api.post("/v1/generate", json={**BASE, "n": 2, "seed": 5}).json()
        assert job["state"] == "succeeded", job
        after = parse(api.get("/metrics").text)
    model, worker = job["provenance"]["model"]["id"], job["provenance"]["worker"]

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("darkroom_jobs_submitted_total", api="native", priority="normal") == 1
    assert moved("darkroom_jobs_total", state="succeeded", model=model) == 1
    assert moved("darkroom_images_total") == 2
    assert moved("darkroom_job_queue_wait_seconds_count", priority="normal") == 1
    assert moved("darkroom_job_run_seconds_count", model=model, mode="txt2img") == 1
    assert moved("darkroom_batch_size_count") == 1
    assert moved("darkroom_model_load_seconds_count", model=model) == 1
    assert moved("darkroom_model_cache_bytes") > 0
    worker_seconds = job["provenance"]["timings"]["worker_total_s"]
    assert moved("darkroom_device_seconds_total", tenant="default") == pytest.approx(worker_seconds, abs=1e-3)
    assert value(after, "darkroom_denoise_steps_per_second", worker=worker) > 0
    route = {"route": "/v1/generate", "method": "POST", "status": "2xx"}
    assert moved("darkroom_http_request_duration_seconds_count", **route) == 1
    assert value(after, "darkroom_queue_depth", priority="normal") == 0
    assert value(after, "darkroom_workers", state="active") == 1


def test_queue_depth_by_priority_and_a_cancel_are_counted_from_the_store(api, services):
    before = parse(api.get("/metrics").text)
    ids = [api.post("/v1/jobs", json={**BASE, "priority": p}).json()["id"] for p in ("normal", "normal", "high")]
    queued = parse(api.get("/metrics").text)
    assert [value(queued, "darkroom_queue_depth", priority=p) for p in ("high", "normal", "low")] == [1, 2, 0]
    submitted = value(queued, "darkroom_jobs_submitted_total", api="native", priority="normal")
    assert submitted - value(before, "darkroom_jobs_submitted_total", api="native", priority="normal") == 2
    assert api.delete(f"/v1/jobs/{ids[0]}").status_code == 200
    after = parse(api.get("/metrics").text)
    assert value(after, "darkroom_queue_depth", priority="normal") == 1
    model = services.store.require(ids[0]).model
    cancelled = {"state": "cancelled", "model": model}
    assert value(after, "darkroom_jobs_total", **cancelled) - value(before, "darkroom_jobs_total", **cancelled) == 1


def test_failed_attempts_are_counted_by_kind_and_final_state(services):
    """Through the store a worker uses: an out-of-memory failure with retries left, then a policy failure."""
    from darkroom.schemas import GenerationRequest

    before = local_scrape(services)
    job, _ = services.store.create(GenerationRequest(**BASE, model="tiny-sd", seed=1), max_attempts=2)
    for code in ("out_of_memory", "prompt_blocked"):
        claimed = services.store.claim("w-test", lease_seconds=30)
        assert claimed is not None and services.store.start(job.id, "w-test")
        services.store.fail(job.id, "w-test", {"code": code, "message": "x", "field": None}, retry_in=0)
    after = local_scrape(services)
    for kind in ("oom", "policy"):
        assert (
            value(after, "darkroom_job_errors_total", kind=kind) - value(before, "darkroom_job_errors_total", kind=kind)
            == 1
        )
    dead = {"state": "dead", "model": "tiny-sd"}
    assert value(after, "darkroom_jobs_total", **dead) - value(before, "darkroom_jobs_total", **dead) == 1


def test_http_metrics_use_the_route_template_and_status_class(api):
    before = parse(api.get("/metrics").text)
    assert api.get("/v1/jobs/job_missing").status_code == 404
    assert api.get("/no/such/path/123").status_code == 404
    after = parse(api.get("/metrics").text)
    count = "darkroom_http_request_duration_seconds_count"
    template = {"route": "/v1/jobs/{job_id}", "method": "GET", "status": "4xx"}
    unmatched = {"route": "unmatched", "method": "GET", "status": "4xx"}
    assert value(after, count, **template) - value(before, count, **template) == 1
    assert value(after, count, **unmatched) - value(before, count, **unmatched) == 1
    assert not any("job_missing" in str(labels) or "/no/such" in str(labels) for _, labels in after)


def test_metrics_access_by_role(services):
    with TestClient(create_app(services, workers=0)) as api:
        tokens = {
            role: services.keys.create(Principal.cli(), name=f"{role}", role=role, tenant="default")[1]
            for role in (Role.metrics, Role.operator, Role.user, Role.service)
        }

        def get(path: str, role: Role) -> int:
            return api.get(path, headers={"Authorization": f"Bearer {tokens[role]}"}).status_code

        assert get("/metrics", Role.metrics) == 200
        assert get("/metrics", Role.operator) == 200
        assert get("/metrics", Role.user) == 403
        assert get("/metrics", Role.service) == 403
        assert get("/v1/jobs", Role.metrics) == 403  # a scrape token reads metrics and nothing else
        assert api.get("/metrics").status_code == 401  # keys exist: no anonymous scrape
        assert (
            api.post("/v1/jobs", json=BASE, headers={"Authorization": f"Bearer {tokens[Role.metrics]}"}).status_code
            == 403
        )


def test_error_kinds_and_webhook_outcomes_stay_in_their_small_sets():
    assert {metrics.ERROR_KINDS.get(c, "engine") for c in ("out_of_memory", "timeout", "prompt_blocked", "x")} == {
        "oom",
        "timeout",
        "policy",
        "engine",
    }
    assert set(metrics.WEBHOOK_OUTCOMES.values()) == {"delivered", "retry", "failed"}
    assert metrics.api_of("/sdapi/v1/txt2img") == "a1111"
    assert metrics.api_of("/v1/images/generations") == "openai"
    assert metrics.api_of("/v1/generate") == "native"


def test_a_bootstrap_metrics_key_reads_metrics_only(services):
    """What the compose stack does: `security.bootstrap_metrics_key` becomes a `metrics` key, once."""
    from darkroom.auth.keys import new_token

    _, token = new_token()
    assert services.keys.bootstrap(token, Role.metrics).role is Role.metrics
    assert services.keys.bootstrap(token, Role.metrics) is None
    with TestClient(create_app(services, workers=0)) as api:
        headers = {"Authorization": f"Bearer {token}"}
        assert api.get("/metrics", headers=headers).status_code == 200
        assert api.get("/v1/keys", headers=headers).status_code == 403


def test_a_dead_process_live_gauges_are_dropped_its_counters_kept(tmp_path):
    """Multiprocess mode: a worker process that is gone (exited or killed) stops adding to `live*` gauges at the next
    scrape; what it counted stays. The writer is a real process."""
    code = (
        "from darkroom.observability import metrics as m; "
        "m.MODEL_CACHE_BYTES.inc(1000); m.IMAGES.inc(3); m.job_submitted('/v1/jobs', 'low')"
    )
    env = {**os.environ, metrics.MULTIPROC_ENV: str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    from prometheus_client import CollectorRegistry
    from prometheus_client import multiprocess as mp

    registry = CollectorRegistry()
    mp.MultiProcessCollector(registry, path=str(tmp_path))
    assert value(parse(metrics.exposition(registry).decode()), "darkroom_model_cache_bytes") == 1000
    metrics._forget_dead(tmp_path)
    samples = parse(metrics.exposition(registry).decode())
    assert value(samples, "darkroom_model_cache_bytes") == 0
    assert value(samples, "darkroom_images_total") == 3
    assert value(samples, "darkroom_jobs_submitted_total", api="native", priority="low") == 1


def test_gpu_metrics_come_from_nvml_only_where_there_is_a_gpu(api):
    samples = parse(api.get("/metrics").text)
    gpus = {labels for name, labels in samples if name == "darkroom_gpu_memory_total_bytes"}
    if metrics._nvml() is None:  # no driver or no GPU (CI): the family is left out, never a made-up zero
        assert gpus == set()
        return
    nvml = metrics._nvml()
    assert len(gpus) == nvml.nvmlDeviceGetCount() >= 1
    total = value(samples, "darkroom_gpu_memory_total_bytes", gpu="0")
    assert total == nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(0)).total
    assert 0 < value(samples, "darkroom_gpu_memory_used_bytes", gpu="0") <= total
    assert 0.0 <= value(samples, "darkroom_gpu_utilization_ratio", gpu="0") <= 1.0


def test_webhook_attempts_are_counted_by_outcome(tmp_path, models_dir):
    """A real receiver on loopback answers 500 then 200: one `retry`, one `delivered`."""
    from darkroom.webhooks.deliveries import DeliveryStore
    from darkroom.webhooks.dispatcher import WebhookDispatcher
    from tests.support.receiver import Answer, Receiver
    from tests.unit.test_webhooks import drive, make_settings, run_job

    svc = Services.open(make_settings(tmp_path, models_dir))
    try:
        before = local_scrape(svc)
        with Receiver(script=[Answer(500, b"boom"), Answer(200)]) as hook:
            job_id = run_job(svc, f"{hook.url}/hooks/darkroom")
            dispatcher = WebhookDispatcher(svc.settings, svc.store)
            try:
                drive(dispatcher, DeliveryStore(svc.store.engine), job_id, {"delivered"})
            finally:
                dispatcher.stop()
        after = local_scrape(svc)
    finally:
        svc.close()
    name = "darkroom_webhook_deliveries_total"
    outcomes = ("retry", "delivered", "failed")
    moved = {o: value(after, name, outcome=o) - value(before, name, outcome=o) for o in outcomes}
    assert moved == {"retry": 1, "delivered": 1, "failed": 0}


def test_a_job_over_its_time_limit_counts_as_a_timeout_error(services):
    """A real worker and the tiny model: the step callback ends the job at its limit (as in test_worker)."""
    from darkroom.schemas import GenerationRequest
    from darkroom.worker.loop import Worker

    worker = Worker(services.settings, services.store, services.blobs, services.make_engine, worker_id="w-timeout")
    body = {**BASE, "width": 256, "height": 256, "steps": 150, "seed": 1, "model": "tiny-diffusers"}
    job, _ = services.store.create(GenerationRequest(**body, timeout_seconds=0.2))
    before = local_scrape(services)
    try:
        worker.process_batch(worker.claim())
    finally:
        if worker._engine is not None:
            worker._engine.close()
    after = local_scrape(services)
    assert services.store.get(job.id).error["code"] == "timeout"
    kind, failed = {"kind": "timeout"}, {"state": "failed", "model": "tiny-diffusers"}
    assert value(after, "darkroom_job_errors_total", **kind) - value(before, "darkroom_job_errors_total", **kind) == 1
    assert value(after, "darkroom_jobs_total", **failed) - value(before, "darkroom_jobs_total", **failed) == 1
    assert value(after, "darkroom_batch_size_count") - value(before, "darkroom_batch_size_count") == 1
