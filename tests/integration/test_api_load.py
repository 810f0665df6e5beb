"""The API edge as deployed: a real `darkroom serve` process over loopback, its memory read from /proc (psutil).

A chunked body with no key must be refused without the server buffering it; a crowd of clients far past the
in-flight limit must get fast 202s or immediate 429s with Retry-After, never a 5xx, while `/healthz` keeps answering."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from darkroom.auth.keys import new_token
from tests.support.raw_http import peak_rss_of, send_chunked

from .harness import Cluster

pytestmark = pytest.mark.integration

BODY = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 2}


@pytest.fixture
def admin_token() -> str:
    return new_token()[1]


@pytest.fixture
def cluster(tmp_path, models_dir, admin_token):
    c = Cluster(
        tmp_path,
        models_dir,
        env={
            "DARKROOM_SECURITY__BOOTSTRAP_ADMIN_KEY": admin_token,
            "DARKROOM_LIMITS__MAX_UPLOAD_BYTES": str(1024 * 1024),
            "DARKROOM_WEBHOOKS__ENABLED": "false",
        },
    )
    yield c
    c.close()


def test_a_200_mb_chunked_body_without_a_key_costs_the_server_no_memory(cluster, admin_token):
    server = cluster.start_server(workers=0)
    with peak_rss_of(psutil.Process(server.pid)) as rss:
        status, sent, _ = send_chunked(cluster.port, "", 200 * 1024 * 1024)
        status_keyed, sent_keyed, head = send_chunked(
            cluster.port, f"Authorization: Bearer {admin_token}\r\n", 200 * 1024 * 1024
        )
    assert status == 401 and sent < 200 * 1024 * 1024
    assert status_keyed == 413 and b'"field":"body"' in head and sent_keyed < 200 * 1024 * 1024
    assert rss["growth"] < 50 * 1024 * 1024, rss


def test_a_crowd_past_the_in_flight_limit_gets_202_or_an_immediate_429_never_a_5xx(cluster, admin_token):
    cluster.env["DARKROOM_SERVER__MAX_IN_FLIGHT"] = "8"
    cluster.env["DARKROOM_SERVER__REQUEST_THREADS"] = "4"
    cluster.start_server(workers=0)
    auth = {"Authorization": f"Bearer {admin_token}"}
    done = threading.Event()
    probes: list[int] = []

    def probe() -> None:
        with httpx.Client(base_url=cluster.url, timeout=30) as client:
            while not done.is_set():
                probes.append(client.get("/healthz").status_code)

    def submit(_: int) -> httpx.Response:
        return httpx.post(f"{cluster.url}/v1/jobs", json=BODY, headers=auth, timeout=60)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    try:
        with ThreadPoolExecutor(48) as pool:
            responses = list(pool.map(submit, range(480)))
    finally:
        done.set()
        prober.join(timeout=60)
    codes = [r.status_code for r in responses]
    assert set(codes) <= {202, 429}, {c: codes.count(c) for c in set(codes)}
    assert codes.count(202) > 0
    assert all(r.headers.get("Retry-After") for r in responses if r.status_code == 429)
    assert probes and set(probes) == {200}
