"""The API's edge under abuse and load, against a real uvicorn server on loopback with a real SQLite (or PostgreSQL)
store: bodies counted as they stream and refused before they are read when the caller has no key, probes that answer
while every request thread is stuck, the in-flight limit's 429, the auth caches (statements counted with SQLAlchemy
engine events) and their invalidation across processes, and a database outage answered 503 on a kept connection."""

from __future__ import annotations

import base64
import http.client
import io
import socket
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from PIL import Image

from darkroom.api.app import create_app
from darkroom.api.edge import KEEP_ALIVE_BODY_BYTES
from darkroom.auth.keys import KeyStore
from darkroom.auth.principal import Principal, Role
from darkroom.auth.tenants import TenantPolicy, TenantStore
from darkroom.config import Limits, Settings
from darkroom.errors import Unauthorized
from darkroom.jobs.db import create_engine
from darkroom.service import Services
from tests.integration.harness import wait_until
from tests.support.live import LiveServer
from tests.support.raw_http import peak_rss_of, read_response, send_chunked

CLI = Principal.cli()
BASE = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 2}


def open_services(
    tmp_path: Path, database_url: str | None = None, models: Path | None = None, **server: object
) -> Services:
    settings = Settings(
        data_dir=tmp_path / "data",
        models_dir=models or tmp_path / "models",
        database_url=database_url,
        limits=Limits(max_upload_bytes=1024 * 1024),  # body cap ≈ 1.6 MB
        server=server,  # validated into ServerSettings
    )
    return Services.open(settings)


@contextmanager
def live(services: Services, workers: int = 0) -> Iterator[LiveServer]:
    try:
        with LiveServer(create_app(services, workers=workers)) as server:
            yield server
    finally:
        services.close()


def token_for(svc: Services, role: Role = Role.user, tenant: str = "acme") -> str:
    return svc.keys.create(CLI, name=f"{role}@{tenant}", role=role, tenant=tenant)[1]


# --- 1. bodies: counted as they stream, never read for a caller without a key -------------------------------------


def test_a_chunked_body_without_a_key_is_refused_before_it_is_read(tmp_path):
    services = open_services(tmp_path)
    token_for(services)  # keys exist: every request needs one
    with live(services) as server, peak_rss_of(psutil.Process()) as rss:
        status, sent, head = send_chunked(server.port, "", 200 * 1024 * 1024)
        status_bad, sent_bad, _ = send_chunked(
            server.port, "Authorization: Bearer dk_aaaaaaaaaaaa_" + "B" * 43 + "\r\n", 200 * 1024 * 1024
        )
    assert status == 401 and b"unauthorized" in head
    assert b"connection: close" in head.lower()  # the unread body ends the connection: keep-alive clients are told
    assert status_bad == 401
    assert sent < 200 * 1024 * 1024 and sent_bad < 200 * 1024 * 1024  # answered long before the body ended
    assert rss["growth"] < 50 * 1024 * 1024, rss


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_a_small_unread_body_keeps_the_connection_for_the_next_request(tmp_path, http):
    """A refusal answered before the body (here 401: keys exist, none sent) leaves a small body to the server, which
    drops it, and the same connection carries the next request; a larger one, or one announced with
    `Expect: 100-continue`, still ends the connection."""
    services = open_services(tmp_path)
    token_for(services)
    body = b'{"prompt": "' + b"x" * 1000 + b'"}'
    post = b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    try:
        with LiveServer(create_app(services), http=http) as server:
            with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
                for _ in range(3):  # refused, again and again, on one connection
                    sock.sendall(post + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                    head = read_response(sock)
                    assert head.startswith(b"HTTP/1.1 401") and b"connection: close" not in head.lower(), head
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                assert read_response(sock).startswith(b"HTTP/1.1 200")
            large = b"x" * (KEEP_ALIVE_BODY_BYTES + 1)
            with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
                sock.sendall(post + f"Content-Length: {len(large)}\r\n\r\n".encode() + large)
                head = read_response(sock)
                assert head.startswith(b"HTTP/1.1 401") and b"connection: close" in head.lower(), head
                assert sock.recv(1024) == b""  # closed by the server
            with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:  # the body may never come
                sock.sendall(post + f"Expect: 100-continue\r\nContent-Length: {len(body)}\r\n\r\n".encode())
                head = read_response(sock)
                assert head.startswith(b"HTTP/1.1 401") and b"connection: close" in head.lower(), head
    finally:
        services.close()


def test_a_chunked_body_past_the_cap_is_413_while_it_streams(tmp_path):
    services = open_services(tmp_path)
    token = token_for(services)
    with live(services) as server, peak_rss_of(psutil.Process()) as rss:
        status, sent, head = send_chunked(server.port, f"Authorization: Bearer {token}\r\n", 200 * 1024 * 1024)
    assert status == 413, head
    assert b'"payload_too_large"' in head and b'"field":"body"' in head
    assert sent < 200 * 1024 * 1024
    assert rss["growth"] < 50 * 1024 * 1024, rss


def test_a_declared_length_past_the_cap_is_413_and_openai_routes_keep_their_shape(tmp_path):
    services = open_services(tmp_path)
    token = token_for(services)
    with live(services) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        auth = {"Authorization": f"Bearer {token}"}
        response = client.post("/v1/jobs", content=b"x" * (3 * 1024 * 1024), headers=auth)
        assert response.status_code == 413 and response.json()["error"]["field"] == "body"
        response = client.post("/v1/images/generations", json={"prompt": "x"})  # no key, body withheld
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"


# --- 2. probes answer while every request thread is stuck -------------------------------------------------------


@contextmanager
def sqlite_write_lock(db: Path) -> Iterator[None]:
    """Another writer holds SQLite's write lock: every write transaction in the server waits on its busy timeout."""
    conn = sqlite3.connect(db, isolation_level=None, timeout=30)
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


def test_probes_answer_while_every_request_thread_is_stuck(tmp_path):
    services = open_services(tmp_path, request_threads=2)
    db = services.settings.data_dir / "darkroom.db"
    with live(services) as server, ThreadPoolExecutor(4) as pool:
        limiter = server.app.state.request_limiter
        assert limiter.total_tokens == 2
        with sqlite_write_lock(db):
            put = {"requests_per_minute": 60}
            stuck = [pool.submit(httpx.put, f"{server.url}/v1/tenants/t{i}", json=put, timeout=60) for i in range(4)]
            wait_until(lambda: limiter.borrowed_tokens == 2, timeout=30, what="both request threads to block")
            assert httpx.get(f"{server.url}/healthz", timeout=10).json() == {"status": "ok"}
            ready = httpx.get(f"{server.url}/readyz", timeout=10).json()
            assert ready["checks"]["database"] == "ok"
            assert limiter.borrowed_tokens == 2  # still stuck: the probes did not need a request thread
        assert [f.result().status_code for f in stuck] == [200] * 4


def test_submits_waiting_on_the_write_lock_hold_no_request_thread_and_leave_the_loop_serving(tmp_path, models_dir):
    """`POST /v1/jobs` joins its transaction from the event loop (`JobStore.enqueue_async`): while another writer
    holds SQLite's lock, six submits wait without a request thread between them, and the loop goes on answering
    probes and sync routes; once the lock is let go, every one of them is queued. An img2img submit's checks (image
    decoding) run in a request thread and let it go before they wait on the lock."""
    services = open_services(tmp_path, models=models_dir, request_threads=2)
    db = services.settings.data_dir / "darkroom.db"
    source = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(source, format="PNG")
    init = base64.b64encode(source.getvalue()).decode()
    with live(services) as server, ThreadPoolExecutor(7) as pool:
        limiter = server.app.state.request_limiter
        assert httpx.post(f"{server.url}/v1/jobs", json=BASE, timeout=30).status_code == 202  # the registry looked
        with sqlite_write_lock(db):
            posts = [pool.submit(httpx.post, f"{server.url}/v1/jobs", json=BASE, timeout=60) for _ in range(6)]
            image = {**BASE, "init_image": init, "strength": 0.5}
            posts.append(pool.submit(httpx.post, f"{server.url}/v1/jobs", json=image, timeout=60))
            wait_until(lambda: services.store._submits.depth == 7, timeout=30, what="the submits to queue")
            assert limiter.borrowed_tokens == 0
            assert httpx.get(f"{server.url}/healthz", timeout=10).json() == {"status": "ok"}
            assert httpx.get(f"{server.url}/v1/models", timeout=10).status_code == 200  # a request thread is free
        answers = [f.result(timeout=60) for f in posts]
    assert [a.status_code for a in answers] == [202] * 7, [a.text for a in answers]
    assert len({a.json()["id"] for a in answers}) == 7
    assert services.store.counts().get("queued") == 8


def test_only_quick_checks_run_on_the_loop(tmp_path, models_dir):
    """`checks_on_loop`: a plain txt2img submit is checked on the event loop once the registry has looked at the
    folder; an image to decode, a template, a LoRA, the prompt classifier or a long list of prompt rules sends the
    checks to a request thread."""
    from darkroom.api.v1 import LOOP_PROMPT_RULES, checks_on_loop
    from darkroom.auth.tenants import PromptRule
    from darkroom.schemas import GenerationRequest

    services = open_services(tmp_path, models=models_dir)
    plain = GenerationRequest(**BASE)
    policy = TenantPolicy()
    services.registry.rescan_seconds = 3600  # the API looks once a second; here the folder's mtime alone decides
    assert not checks_on_loop(services, plain, policy)  # not looked at yet: the first submit's checks hash the models
    services.registry.scan()
    assert checks_on_loop(services, plain, policy)
    rules = [PromptRule(pattern=f"word{i}", reason="no") for i in range(LOOP_PROMPT_RULES + 1)]
    assert checks_on_loop(services, plain, TenantPolicy(prompt_rules=rules[:LOOP_PROMPT_RULES]))
    assert not checks_on_loop(services, plain, TenantPolicy(prompt_rules=rules))
    for heavy in ({"init_image": "AAAA"}, {"template": "t"}, {"loras": [{"name": "x"}]}):
        assert not checks_on_loop(services, GenerationRequest(**BASE, **heavy), policy), heavy
    services.settings.security.prompt_classifier = "http://127.0.0.1:9/classify"
    assert not checks_on_loop(services, plain, policy)
    services.settings.security.prompt_classifier = None
    (services.settings.resolved_models_dir / "new-folder").mkdir()  # the folder moved: the next scan hashes
    assert not checks_on_loop(services, plain, policy)


# --- 3. backpressure ------------------------------------------------------------------------------------------


def open_slow_request(port: int, path: str, body: bytes) -> socket.socket:
    """A request whose body has not finished arriving: it holds its in-flight slot until the rest is sent."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(
        f"PUT {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body[:5]
    )
    return sock


def test_past_the_in_flight_limit_requests_get_an_immediate_429_and_probes_still_answer(tmp_path):
    services = open_services(tmp_path, max_in_flight=3, overloaded_retry_after=2)
    body = b'{"requests_per_minute": 60}'
    with live(services) as server:
        in_flight = server.app.state.in_flight
        slow = [open_slow_request(server.port, f"/v1/tenants/slow{i}", body) for i in range(3)]
        wait_until(lambda: in_flight.count == 3, timeout=30, what="three requests in flight")
        refused = httpx.get(f"{server.url}/v1/jobs", timeout=10)
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "2"
        assert refused.json()["error"]["code"] == "overloaded"
        assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
        assert httpx.get(f"{server.url}/readyz", timeout=10).status_code in (200, 503)  # answers (no models here)
        for sock in slow:
            sock.sendall(body[5:])
        heads = [read_response(sock) for sock in slow]
        for sock in slow:
            sock.close()
        assert all(head.startswith(b"HTTP/1.1 200") for head in heads), heads
        wait_until(lambda: in_flight.count == 0, timeout=30, what="the slots to free")

        # A burst far past the limit: only successes and immediate refusals, never a 5xx.
        with ThreadPoolExecutor(24) as pool:
            statuses = list(pool.map(lambda _: httpx.get(f"{server.url}/v1/jobs", timeout=60), range(96)))
    codes = {r.status_code for r in statuses}
    assert codes <= {200, 429}, codes
    assert all(r.headers.get("Retry-After") for r in statuses if r.status_code == 429)


# --- 4. auth caches ------------------------------------------------------------------------------------------


@contextmanager
def statements(engine: sa.Engine) -> Iterator[list[str]]:
    seen: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:  # type: ignore[no-untyped-def]
        seen.append(statement)

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)


def auth_statements(seen: list[str]) -> list[str]:
    return [s for s in seen if "api_keys" in s or "FROM tenants" in s or "tenants." in s]


@pytest.fixture
def services(tmp_path):
    svc = open_services(tmp_path)
    yield svc
    svc.close()


def test_a_clients_event_stream_neither_counts_toward_nor_is_refused_by_the_in_flight_limit(tmp_path):
    """Following a job over SSE is an async wait on the change feed: with it counted, as many clients following
    their jobs as `max_in_flight` locked every other caller out with 429s."""
    from darkroom.schemas import GenerationRequest

    services = open_services(tmp_path, max_in_flight=1)
    job, _ = services.store.create(GenerationRequest(prompt="x", width=64, height=64, seed=1))  # no worker: it waits
    with live(services) as server:
        in_flight = server.app.state.in_flight
        with (
            httpx.Client(base_url=server.url, timeout=30) as http,
            http.stream("GET", f"/v1/jobs/{job.id}/events") as first,
            http.stream("GET", f"/v1/jobs/{job.id}/events") as second,
        ):
            assert first.status_code == second.status_code == 200
            assert in_flight.count == 0
            assert http.get("/v1/jobs").status_code == 200  # the one slot is still free
            assert http.delete(f"/v1/jobs/{job.id}").status_code == 200
            assert any("cancelled" in line for line in first.iter_lines())  # and the stream still works


def test_a_sync_route_waiting_for_its_job_leaves_its_admission_slot(tmp_path, models_dir):
    """`POST /v1/generate` holds a slot while it validates and queues, not while it waits on the change feed: counted
    while waiting, as many clients waiting for their pictures as the limit locked everyone else out."""
    services = open_services(tmp_path, models=models_dir, max_in_flight=1)  # no worker: the job waits in the queue
    with live(services) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        in_flight = server.app.state.in_flight
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(http.post, "/v1/generate?timeout=20", json={"prompt": "x", "width": 64, "height": 64})
            wait_until(lambda: services.store.counts().get("queued") == 1, timeout=20, what="the job to be queued")
            wait_until(lambda: in_flight.count == 0, timeout=5, what="the waiting request to leave its slot")
            job = http.get("/v1/jobs").json()[0]
            assert http.delete(f"/v1/jobs/{job['id']}").status_code == 200  # the one slot is free for others
            assert waiting.result(timeout=30).json()["state"] == "cancelled"


def test_with_warm_caches_a_request_issues_no_key_or_policy_statements(tmp_path, models_dir):
    services = open_services(tmp_path, models=models_dir)
    token = token_for(services)
    services.tenants.put("acme", TenantPolicy(images_per_day=1000), CLI)
    auth = {"Authorization": f"Bearer {token}"}
    with TestClient(create_app(services)) as api:
        job = api.post("/v1/jobs", json=BASE, headers=auth)
        assert job.status_code == 202, job.text
        assert api.get(f"/v1/jobs/{job.json()['id']}", headers=auth).status_code == 200
        with statements(services.store.engine) as seen:
            assert api.get(f"/v1/jobs/{job.json()['id']}", headers=auth).status_code == 200
            assert api.get("/v1/jobs", headers=auth).status_code == 200
    services.close()
    assert seen and auth_statements(seen) == [], auth_statements(seen)


def test_once_keys_exist_requests_without_a_token_read_nothing_and_the_first_key_shuts_the_door_at_once(services):
    with TestClient(create_app(services)) as api:
        assert api.get("/v1/jobs").status_code == 200  # loopback, no keys: the local admin
        with statements(services.store.engine) as seen:  # and while none exists, asking costs one stat, no statement
            assert api.get("/v1/jobs").status_code == 200
        assert auth_statements(seen) == []
        elsewhere = KeyStore(create_engine(services.settings.resolved_database_url))  # `darkroom keys create`
        elsewhere.create(CLI, name="first", role=Role.user, tenant="acme")
        elsewhere.engine.dispose()
        assert api.get("/v1/jobs").status_code == 401  # no TTL to wait out
        with statements(services.store.engine) as seen:
            assert api.get("/v1/jobs").status_code == 401
        assert auth_statements(seen) == []


def test_a_key_revoked_over_the_api_is_refused_at_once_here_and_within_the_ttl_elsewhere(tmp_path):
    services = open_services(tmp_path, auth_cache_seconds=1.0)
    admin, user = token_for(services, Role.admin), token_for(services)
    user_id = user.split("_")[1]
    elsewhere = KeyStore(create_engine(services.settings.resolved_database_url), cache_seconds=1.0)
    try:
        assert elsewhere.authenticate(user).id == user_id  # now cached there
        with TestClient(create_app(services)) as api:
            assert api.get("/v1/jobs", headers={"Authorization": f"Bearer {user}"}).status_code == 200
            revoked = api.delete(f"/v1/keys/{user_id}", headers={"Authorization": f"Bearer {admin}"})
            assert revoked.status_code == 200 and revoked.json()["revoked_at"]
            assert api.get("/v1/jobs", headers={"Authorization": f"Bearer {user}"}).status_code == 401
        revoked_at = time.monotonic()

        def refused_elsewhere() -> bool:
            try:
                elsewhere.authenticate(user)
            except Unauthorized:
                return True
            return False

        wait_until(refused_elsewhere, timeout=10, what="the other process to refuse the key")
        assert time.monotonic() - revoked_at <= 1.0 + 0.5  # the TTL, and a margin for a loaded machine
    finally:
        elsewhere.engine.dispose()
        services.close()


def test_a_tenant_policy_put_applies_to_the_next_request(services):
    token = token_for(services)
    auth = {"Authorization": f"Bearer {token}"}
    with TestClient(create_app(services)) as api:
        assert api.get("/v1/usage", headers=auth).json()["requests_per_minute"] is None
        services.tenants.put("acme", TenantPolicy(requests_per_minute=7), CLI)
        assert api.get("/v1/usage", headers=auth).json()["requests_per_minute"] == 7


def test_on_postgresql_changes_reach_other_processes_by_notify(pg_url):
    from darkroom.auth.invalidation import Listener
    from darkroom.jobs.db import migrate

    migrate(pg_url)
    here, there = create_engine(pg_url), create_engine(pg_url)
    keys_here, keys_there = KeyStore(here), KeyStore(there, cache_seconds=3600)
    tenants_here, tenants_there = TenantStore(here), TenantStore(there, cache_seconds=3600)
    listener = Listener(pg_url, {"key": keys_there, "tenant": tenants_there}).start()
    try:
        wait_until(listener.listening.is_set, timeout=30, what="the LISTEN")
        record, token = keys_here.create(CLI, name="u", role=Role.user, tenant="acme")
        assert keys_there.authenticate(token).id == record.id
        assert tenants_there.get("acme").requests_per_minute is None
        keys_here.revoke(CLI, record.id)
        tenants_here.put("acme", TenantPolicy(requests_per_minute=9), CLI)

        def refused() -> bool:
            try:
                keys_there.authenticate(token)
            except Unauthorized:
                return True
            return False

        # The TTL there is an hour: only the notice can explain a prompt refusal.
        wait_until(refused, timeout=10, what="the revocation notice")
        wait_until(lambda: tenants_there.get("acme").requests_per_minute == 9, timeout=10, what="the policy notice")
    finally:
        listener.stop()
        here.dispose()
        there.dispose()


# --- 6. a database outage is 503 on a kept connection --------------------------------------------------------------


@pytest.mark.integration  # starts (and stops) its own PostgreSQL cluster
def test_a_database_outage_is_503_with_retry_after_and_the_connection_is_kept(tmp_path):
    from tests.conftest import require_service
    from tests.infra.postgres import PgCluster, find_bindir

    bindir = find_bindir()
    if bindir is None:
        require_service("PostgreSQL binaries not found")
    cluster = PgCluster(bindir).init()  # our own: this test stops it
    try:
        services = open_services(tmp_path, database_url=cluster.url, auth_cache_seconds=0, database_retry_after=7)
        with live(services) as server:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)

            def get() -> tuple[int, dict, http.client.HTTPResponse]:
                conn.request("GET", "/v1/jobs")
                response = conn.getresponse()
                body = response.read()
                return response.status, (httpx.Response(200, content=body).json()), response

            status, _, _ = get()
            assert status == 200
            sock = conn.sock
            cluster.stop()
            for _ in range(2):
                status, body, response = get()
                assert status == 503, body
                assert body["error"]["code"] == "database_unavailable"
                assert response.getheader("Retry-After") == "7"
                assert not response.will_close and conn.sock is sock  # the same keep-alive connection
            cluster.start()
            wait_until(lambda: get()[0] == 200, timeout=60, what="the database to be back")
            assert conn.sock is sock
            conn.close()
    finally:
        cluster.destroy()


def test_keys_made_before_the_keys_marker_existed_still_lock_the_service(services):
    """A database whose keys predate `<database>.keys`: the first question reads the table, not the missing marker."""
    services.keys.create(CLI, name="old", role=Role.user, tenant="acme")
    marker = Path(services.store.engine.url.database + ".keys")
    assert marker.exists()
    marker.unlink()
    assert KeyStore(services.store.engine).any_keys()


def test_a_submit_like_one_refused_queue_full_is_refused_at_the_edge_before_its_body_is_read(tmp_path, models_dir):
    """After the store refuses a tenant's submit `queue_full`, that tenant's next submits to the route get the same
    429 at the edge for a moment, their body unread (a malformed one would otherwise be a 422), in the route's own
    shape (OpenAI's too); another tenant, a submit with an Idempotency-Key (maybe a replay) and other routes still
    reach the store."""
    settings = Settings(
        data_dir=tmp_path / "data",
        models_dir=models_dir,
        limits=Limits(max_tenant_queue_depth=1),
        security={"approve_first_seen_models": True},
    )
    services = Services.open(settings)
    _, full = services.keys.create(CLI, name="a", role=Role.service, tenant="a")
    _, other = services.keys.create(CLI, name="b", role=Role.service, tenant="b")
    a, b = {"Authorization": f"Bearer {full}"}, {"Authorization": f"Bearer {other}"}
    malformed = b'{"prompt": '
    with live(services) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        queued = http.post("/v1/jobs", json=BASE, headers=a)
        assert queued.status_code == 202
        refused = http.post("/v1/jobs", json=BASE, headers=a)  # by the store, after the whole submit
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
        again = http.post("/v1/jobs", content=malformed, headers={**a, "Content-Type": "application/json"})
        assert again.status_code == 429 and again.json()["error"] == refused.json()["error"]
        assert again.headers["Retry-After"] == refused.headers["Retry-After"]
        openai = http.post("/v1/images/generations", json={"prompt": "x", "size": "256x256"}, headers=a)
        assert openai.status_code == 429  # by the store, in OpenAI's shape
        openai_again = http.post(
            "/v1/images/generations", content=malformed, headers={**a, "Content-Type": "application/json"}
        )
        assert (openai_again.status_code, openai_again.json()) == (429, openai.json())  # the edge: the same shape
        keyed = {**a, "Content-Type": "application/json", "Idempotency-Key": "k1"}
        assert http.post("/v1/jobs", content=malformed, headers=keyed).status_code == 422  # read: it went on
        assert http.post("/v1/jobs", json=BASE, headers=b).status_code == 202  # b's share is not full
        assert http.delete(f"/v1/jobs/{queued.json()['id']}", headers=a).status_code == 200  # not a submit
        # The queue has room again: within a second the store is asked again and the submit goes in.
        wait_until(
            lambda: http.post("/v1/jobs", json=BASE, headers=a).status_code == 202,
            timeout=10,
            what="the edge to ask the store again",
        )
