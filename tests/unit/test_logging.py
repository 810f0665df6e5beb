"""Structured logs: one job's lines carry its request id from the API's edge to the worker that ran it.

Real app (TestClient over the ASGI app), real SQLite store, a real worker thread with the tiny diffusers model; the
lines are read back as JSON from a handler built the way `--log-format json` builds it."""

from __future__ import annotations

import io
import json
import logging

import pytest
from fastapi.testclient import TestClient

from darkroom.api.app import create_app
from darkroom.config import Settings
from darkroom.observability import logging as obs_logging
from darkroom.service import Services

BASE = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 1}


@pytest.fixture
def json_lines():
    """darkroom's loggers write JSON lines into a buffer (context filter and formatter of `setup(fmt="json")`)."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.addFilter(obs_logging.ContextFilter())
    handler.setFormatter(obs_logging.JsonFormatter("test"))
    root = logging.getLogger("darkroom")
    access = logging.getLogger(obs_logging.ACCESS_LOGGER)
    levels = root.level, access.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    access.setLevel(logging.INFO)
    try:
        yield lambda: [json.loads(line) for line in buffer.getvalue().splitlines()]
    finally:
        root.removeHandler(handler)
        root.setLevel(levels[0])
        access.setLevel(levels[1])


def test_a_jobs_lines_from_api_to_worker_carry_its_request_id(tmp_path, models_dir, json_lines):
    settings = Settings(data_dir=tmp_path / "data", models_dir=models_dir, poll_seconds=0.05)
    svc = Services.open(settings)
    try:
        with TestClient(create_app(svc, workers=1)) as api:
            answer = api.post("/v1/generate", json=BASE, headers={"X-Request-ID": "req-trail-1"})
    finally:
        svc.close()
    assert answer.status_code == 200, answer.text
    assert answer.headers["X-Request-ID"] == "req-trail-1"
    job_id = answer.json()["id"]
    lines = json_lines()
    access = [x for x in lines if x["logger"] == obs_logging.ACCESS_LOGGER and x.get("path") == "/v1/generate"]
    assert len(access) == 1, lines
    assert access[0]["request_id"] == "req-trail-1"
    assert access[0]["job_id"] == job_id
    assert access[0]["tenant"] == "default"
    assert access[0]["status"] == 200 and access[0]["method"] == "POST"
    worker_lines = [x for x in lines if x["logger"] == "darkroom.worker" and x.get("job_id") == job_id]
    assert worker_lines, lines
    for line in worker_lines:
        assert line["request_id"] == "req-trail-1"
        assert line["tenant"] == "default"
        assert line["worker_id"]
    assert all(x.get("job_id") in (None, job_id) for x in lines)


def test_json_lines_hold_exceptions_extras_and_no_foreign_context(json_lines):
    log = logging.getLogger("darkroom.test")
    with obs_logging.context(request_id="r1", job_id=None):
        obs_logging.bind(tenant="acme")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("it broke", extra={"kind": "engine"})
    log.info("outside")
    inside, outside = json_lines()
    assert inside["request_id"] == "r1" and inside["tenant"] == "acme" and "job_id" not in inside
    assert inside["kind"] == "engine" and "ValueError: boom" in inside["exc"] and inside["level"] == "error"
    assert "request_id" not in outside and outside["msg"] == "outside"


def test_the_format_is_checked_and_left_for_child_processes(monkeypatch):
    monkeypatch.delenv(obs_logging.FORMAT_ENV, raising=False)
    assert obs_logging.resolve_format(None) == "text"
    monkeypatch.setenv(obs_logging.FORMAT_ENV, "JSON")
    assert obs_logging.resolve_format(None) == "json"
    assert obs_logging.resolve_format("text") == "text"
    with pytest.raises(ValueError, match="text or json"):
        obs_logging.resolve_format("xml")
