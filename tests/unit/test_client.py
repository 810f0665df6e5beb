"""The Python SDK against real HTTP: scripted loopback servers for retries, and the real app (uvicorn in a thread,
tiny models, one worker) for submit, wait, stream, download and idempotency."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from email.utils import format_datetime

import httpx
import pytest

from darkroom.api.app import create_app
from darkroom.client import ApiError, AsyncClient, Client, JobFailed, RetryPolicy, retry_after_seconds
from darkroom.config import Settings, WebhookSettings
from darkroom.safety.provenance import read_png
from darkroom.service import Services
from tests.integration.harness import free_port
from tests.support.live import LiveServer
from tests.support.receiver import Answer, Receiver

JOB = {"id": "job_1", "state": "queued", "progress": {"step": 0, "total": 2}, "images": []}
SMALL = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2}
FAST_RETRY = RetryPolicy(backoff=0.01, max_backoff=0.05)


def answer(status: int, body: dict | None = None, **headers: str) -> Answer:
    return Answer(status, json.dumps(body or {}).encode(), {"Content-Type": "application/json", **headers})


# --- retries against a scripted server ------------------------------------------------------------------------------


def test_submit_retries_a_429_after_retry_after_with_the_same_idempotency_key():
    busy = answer(429, {"error": {"code": "queue_full", "message": "busy", "field": "queue"}}, **{"Retry-After": "1"})
    with Receiver(script=[busy, answer(202, JOB)]) as server, Client(server.url, retry=FAST_RETRY) as client:
        started = time.monotonic()
        job = client.submit(SMALL)
        elapsed = time.monotonic() - started
        first, second = server.received
    assert job == JOB
    assert elapsed >= 1.0, "Retry-After: 1 was honoured"
    assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"] != ""
    assert json.loads(first.body) == json.loads(second.body) == SMALL


def test_503_then_success_and_other_errors_raise_at_once():
    with (
        Receiver(script=[answer(503), answer(503), answer(200, JOB)]) as server,
        Client(server.url, retry=FAST_RETRY) as c,
    ):
        assert c.job("job_1") == JOB and len(server.received) == 3
    bad = answer(422, {"error": {"code": "invalid_request", "message": "width", "field": "width"}})
    with Receiver(script=[bad]) as server, Client(server.url, retry=FAST_RETRY) as client:
        with pytest.raises(ApiError) as err:
            client.submit(SMALL)
        assert err.value.status == 422 and err.value.error["field"] == "width" and len(server.received) == 1


def test_gives_up_after_max_attempts():
    policy = RetryPolicy(max_attempts=3, backoff=0.01)
    with Receiver(script=[answer(503)]) as server, Client(server.url, retry=policy) as client:
        with pytest.raises(ApiError) as err:
            client.models()
        assert err.value.status == 503 and len(server.received) == 3


def test_connection_errors_are_retried_then_raised():
    port = free_port()  # nothing listens there
    attempts = []
    policy = RetryPolicy(max_attempts=3, backoff=0.01, rand=lambda: attempts.append(1) or 1.0)
    with Client(f"http://127.0.0.1:{port}", retry=policy) as client, pytest.raises(httpx.ConnectError):
        client.models()
    assert len(attempts) == 2  # a delay before each of the 2 retries


def test_a_retry_after_longer_than_the_policy_allows_is_not_waited_out():
    policy = RetryPolicy(max_retry_after=5)
    with Receiver(script=[answer(429, **{"Retry-After": "3600"})]) as server, Client(server.url, retry=policy) as c:
        with pytest.raises(ApiError):
            c.models()
        assert len(server.received) == 1


def test_backoff_is_exponential_with_full_jitter():
    top = RetryPolicy(max_attempts=10, backoff=1, max_backoff=10, rand=lambda: 0.999)
    assert [round(top.delay(n), 1) for n in (1, 2, 3, 4, 5)] == [1.0, 2.0, 4.0, 8.0, 10.0]
    assert RetryPolicy(rand=lambda: 0.0).delay(1) == 0.0
    assert retry_after_seconds("2") == 2.0 and retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=60)
    assert 55 <= retry_after_seconds(format_datetime(later, usegmt=True)) <= 61


def test_async_client_honours_retry_after_too():
    busy = answer(503, **{"Retry-After": "1"})

    async def go(url: str) -> tuple[dict, float]:
        async with AsyncClient(url, retry=FAST_RETRY) as client:
            started = time.monotonic()
            job = await client.submit(prompt="x")
            return job, time.monotonic() - started

    with Receiver(script=[busy, answer(202, JOB)]) as server:
        job, elapsed = asyncio.run(go(server.url))
        keys = {r.headers["Idempotency-Key"] for r in server.received}
    assert job == JOB and elapsed >= 1.0 and len(keys) == 1


# --- against the real app -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory, models_dir):
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("sdk") / "data",
        models_dir=models_dir,
        poll_seconds=0.05,
        progress_interval=0,
        webhooks=WebhookSettings(enabled=False),
    )
    svc = Services.open(settings)
    with LiveServer(create_app(svc, workers=1)) as server:
        yield server
    svc.close()


def test_generate_streams_progress_and_downloads(live, tmp_path):
    seen: list[dict] = []
    with Client(live.url) as client:
        job = client.generate(SMALL, seed=5, n=2, on_event=seen.append, timeout=120)
        paths = client.download(job, tmp_path / "out")
        single = client.download(job["id"], tmp_path / "one.png")
        assert [m["id"] for m in client.models()] == ["tiny-diffusers", "tiny-single"]
    assert job["state"] == "succeeded" and len(job["images"]) == 2
    kinds = [e["type"] for e in seen]
    assert "progress" in kinds and kinds[-1] == "succeeded"
    assert [p.name for p in paths] == [f"{job['id']}-0.png", f"{job['id']}-1.png"]
    assert [p.name for p in single] == ["one-1.png", "one-2.png"]
    assert read_png(paths[1].read_bytes())["provenance"]["seed"] == 6


def test_a_repeated_idempotency_key_returns_the_first_job(live):
    with Client(live.url) as client:
        first = client.submit(SMALL, idempotency_key="order-42")
        again = client.submit(SMALL, idempotency_key="order-42")
        other = client.submit(SMALL)
        with pytest.raises(ApiError) as err:
            client.submit({**SMALL, "prompt": "something else"}, idempotency_key="order-42")
        client.wait(first["id"], timeout=120)
        client.wait(other["id"], timeout=120)
    assert again["id"] == first["id"] != other["id"]
    assert err.value.status == 409


def test_wait_raises_job_failed_and_times_out(live):
    with Client(live.url) as client:
        job = client.submit({**SMALL, "steps": 150, "width": 256, "height": 256})
        with pytest.raises(TimeoutError):
            client.wait(job["id"], timeout=0.3)
        client.cancel(job["id"])
        with pytest.raises(JobFailed) as err:
            client.wait(job["id"], timeout=120)
        assert err.value.job["state"] == "cancelled"
        assert client.wait(job["id"], raise_on_failure=False)["state"] == "cancelled"


def test_events_resume_from_an_id(live):
    with Client(live.url) as client:
        job = client.generate(SMALL)
        everything = list(client.events(job["id"]))
        assert everything[0]["type"] == "queued" and everything[-1]["type"] == "succeeded"
        with client.http.stream("GET", f"/v1/jobs/{job['id']}/events") as resp:
            ids = [int(line[3:]) for line in resp.iter_lines() if line.startswith("id:")]
        tail = list(client.events(job["id"], after=ids[-2]))
    assert [e["type"] for e in tail] == ["succeeded"]


def test_async_client_end_to_end(live, tmp_path):
    async def go() -> tuple[dict, list]:
        async with AsyncClient(live.url) as client:
            seen: list[dict] = []
            job = await client.generate(SMALL, seed=3, on_event=seen.append, timeout=120)
            paths = await client.download(job, tmp_path)
            assert len(await client.models()) == 2
            return job, [seen, paths]

    job, (seen, paths) = asyncio.run(go())
    assert job["state"] == "succeeded" and seen[-1]["type"] == "succeeded" and paths[0].exists()
