"""Tracing: one request's spans, from the API's `request` to the worker's `store`, form one trace derived from its
request id, with the job's stages under its `job` span; with tracing off nothing is recorded.

Real app (TestClient), real SQLite store, a real worker thread with the tiny model; spans are read back from the
OpenTelemetry SDK's in-memory exporter (the `tracing` extra, installed by the test extra)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from darkroom.api.app import create_app
from darkroom.config import Settings
from darkroom.observability import tracing
from darkroom.service import Services

sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
in_memory = pytest.importorskip("opentelemetry.sdk.trace.export.in_memory_span_exporter")
export = pytest.importorskip("opentelemetry.sdk.trace.export")

BASE = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 2}


@pytest.fixture
def spans():
    exporter = in_memory.InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(export.SimpleSpanProcessor(exporter))
    tracing.use_provider(provider)
    try:
        yield exporter
    finally:
        tracing.use_provider(None)
        provider.shutdown()


def test_a_jobs_spans_from_request_to_store_share_the_request_ids_trace(tmp_path, models_dir, spans):
    settings = Settings(data_dir=tmp_path / "data", models_dir=models_dir, poll_seconds=0.05, preload_models=[])
    settings.preload_default_model = False  # the job loads its model: a `load` span
    svc = Services.open(settings)
    try:
        with TestClient(create_app(svc, workers=1)) as api:
            done = api.post("/v1/generate", json=BASE, headers={"X-Request-ID": "req-traced"})
    finally:
        svc.close()
    assert done.status_code == 200 and done.json()["state"] == "succeeded", done.text
    trace_id = tracing.trace_id_for("req-traced")
    mine = [s for s in spans.get_finished_spans() if s.context.trace_id == trace_id]
    by_name = {s.name: s for s in mine}
    assert {"request", "claim", "job", "load", "denoise", "encode", "store"} <= set(by_name), sorted(by_name)
    root = by_name["request"].parent
    assert root is not None and root.is_remote  # the request id's stand-in, shared with the worker process
    assert by_name["claim"].parent.span_id == root.span_id == by_name["job"].parent.span_id
    job = by_name["job"].context.span_id
    for stage in ("load", "denoise", "encode", "store"):
        assert all(s.parent.span_id == job for s in mine if s.name == stage), stage
    assert by_name["job"].attributes["darkroom.job_id"] == done.json()["id"]
    assert by_name["request"].attributes["darkroom.route"] == "/v1/generate"
    assert by_name["request"].attributes["darkroom.status"] == 200
    assert by_name["load"].end_time - by_name["load"].start_time > 0


def test_tracing_off_records_nothing_and_costs_no_context():
    assert not tracing.enabled()
    assert tracing.request_context("req-x") is None
    with tracing.span("job") as current:
        assert current is None
    tracing.record("claim", 1, 2)
    assert tracing.configure(Settings(), "api") is False  # no endpoint configured


def test_jobs_run_as_one_tensor_batch_each_get_their_job_and_denoise_spans(tmp_path, models_dir, spans):
    """The batch path: every job of one pipeline call has its own `job` span in its own request's trace, a `denoise`
    span for the pass they shared (with the batch's size), and its post-processing under its `job`."""
    import time

    from darkroom.schemas import GenerationRequest, JobState

    settings = Settings(data_dir=tmp_path / "data", models_dir=models_dir, max_batch=4, batch_window_seconds=0)
    svc = Services.open(settings)
    svc.approve_models()  # as `serve` does at start: workers serve approved model versions only
    try:
        made = [GenerationRequest(**BASE, model="tiny-diffusers", seed=i) for i in range(3)]
        ids = [svc.store.create(r, request_id=f"req-batch-{i}")[0].id for i, r in enumerate(made)]
        svc.start_workers(1)
        deadline = time.monotonic() + 120
        while not all(svc.store.get(i).state is JobState.succeeded for i in ids):
            assert time.monotonic() < deadline, [(j.state, j.error) for j in map(svc.store.get, ids)]
            time.sleep(0.05)
    finally:
        svc.close()
    for i, job_id in enumerate(ids):
        mine = [s for s in spans.get_finished_spans() if s.context.trace_id == tracing.trace_id_for(f"req-batch-{i}")]
        [job] = [s for s in mine if s.name == "job"]
        assert job.attributes["darkroom.job_id"] == job_id and job.attributes["darkroom.batch_size"] == 3
        for stage in ("denoise", "encode", "store"):
            assert any(s.parent.span_id == job.context.span_id for s in mine if s.name == stage), stage
