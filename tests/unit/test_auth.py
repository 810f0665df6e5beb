"""Authentication, roles, tenant isolation, rate limits, quotas and the audit log, through the real API (FastAPI's
TestClient over the ASGI app) on a real SQLite store, with real keys made by the key store."""

from __future__ import annotations

import datetime as dt
import time

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from darkroom import clock
from darkroom.api.app import create_app
from darkroom.auth.audit import AuditLog
from darkroom.auth.keys import KeyStore
from darkroom.auth.principal import Principal, Role
from darkroom.auth.tables import api_keys, audit_log
from darkroom.auth.tenants import TenantPolicy
from darkroom.config import Limits, SecuritySettings, Settings
from darkroom.jobs.db import migrate
from darkroom.service import Services

BASE = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 2}
CLI = Principal.cli()


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


def key(svc: Services, role: Role = Role.user, tenant: str = "acme", **kw) -> dict[str, str]:
    _, token = svc.keys.create(CLI, name=f"{role}@{tenant}", role=role, tenant=tenant, **kw)
    return {"Authorization": f"Bearer {token}"}


def submit(api: TestClient, headers: dict, **patch) -> dict:
    response = api.post("/v1/jobs", json={**BASE, **patch}, headers=headers)
    assert response.status_code == 202, response.text
    return response.json()


# --- authentication ---------------------------------------------------------------------------------------------


def test_without_keys_a_loopback_service_is_open_and_the_caller_is_the_local_admin(api, services):
    assert api.post("/v1/jobs", json=BASE).status_code == 202
    assert api.get("/v1/audit").status_code == 200
    [rec] = services.audit.list(action="job.submit")
    assert rec.actor == "local" and rec.role == "admin"


def test_once_a_key_exists_every_request_needs_one(api, services):
    key(services)
    for method, path in [
        ("get", "/v1/jobs"),
        ("post", "/v1/jobs"),
        ("get", "/v1/models"),
        ("get", "/sdapi/v1/options"),
    ]:
        response = api.request(method, path, json=BASE if method == "post" else None)
        assert response.status_code == 401, (path, response.text)
        assert response.json()["error"]["code"] == "unauthorized"
        assert response.headers["WWW-Authenticate"] == "Bearer"
    # OpenAI-shaped routes answer 401 in OpenAI's shape.
    response = api.post("/v1/images/generations", json={"prompt": "x"})
    assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    # Probes and the API description stay open.
    assert api.get("/healthz").status_code == 200
    assert api.get("/openapi.json").status_code == 200


@pytest.mark.parametrize(
    "token",
    ["", "nonsense", "dk_abcdefghijkl_" + "A" * 43, "Basic dXNlcjpwYXNz"],
)
def test_malformed_and_unknown_keys_are_401(api, services, token):
    key(services)
    assert api.get("/v1/jobs", headers={"Authorization": f"Bearer {token}"}).status_code == 401


def test_a_key_with_a_wrong_secret_is_401(api, services):
    headers = key(services)
    token = headers["Authorization"].removeprefix("Bearer ")
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    assert api.get("/v1/jobs", headers={"Authorization": f"Bearer {forged}"}).status_code == 401
    assert api.get("/v1/jobs", headers=headers).status_code == 200


def test_revoked_and_expired_keys_are_401_and_the_failed_login_is_audited(api, services):
    headers = key(services)
    record = services.keys.list()[0]
    assert api.get("/v1/jobs", headers=headers).status_code == 200
    services.keys.revoke(CLI, record.id)
    assert api.get("/v1/jobs", headers=headers).status_code == 401
    [denied] = services.audit.list(action="auth.login")
    assert (denied.actor, denied.outcome, denied.details["reason"]) == (
        record.id,
        "denied",
        "invalid API key (expired or revoked)",
    )
    assert denied.ip and denied.request_id

    soon = key(services, expires_in=dt.timedelta(seconds=1))
    assert api.get("/v1/jobs", headers=soon).status_code == 200
    with clock.frozen(clock.utcnow() + dt.timedelta(seconds=5)):
        assert api.get("/v1/jobs", headers=soon).status_code == 401


def test_a_flood_of_bad_keys_is_braked_by_address_and_audited_in_aggregate(services):
    key(services)
    limits = services.settings.server  # 20 failures a minute per address, the first 5 audited one by one
    with clock.frozen(dt.datetime(2026, 11, 24, 12, 0, 10, tzinfo=dt.UTC)), TestClient(create_app(services)) as api:
        responses = [
            api.get("/v1/jobs", headers={"Authorization": f"Bearer dk_{i:012d}_{'A' * 43}"}) for i in range(300)
        ]
        one_by_one = services.audit.list(action="auth.login")
    statuses = [r.status_code for r in responses]
    assert statuses[: limits.auth_failures_per_minute] == [401] * limits.auth_failures_per_minute
    assert set(statuses[limits.auth_failures_per_minute :]) == {429}
    braked = responses[-1]
    assert braked.json()["error"]["code"] == "too_many_failures" and 1 <= int(braked.headers["Retry-After"]) <= 51
    assert len(one_by_one) == limits.audited_failures_per_minute
    # The rest of the minute is one summary row, written when the window ended (here: at shutdown).
    rows = services.audit.list(action="auth.login")
    assert len(rows) == limits.audited_failures_per_minute + 1
    summary = rows[-1].details
    assert summary["summary"] and (summary["failures"], summary["recorded"], summary["refused"]) == (20, 5, 280)
    assert rows[-1].ip == "testclient" and summary["window_start"].startswith("2026-11-24T12:00:00")


def test_a_braked_address_is_refused_even_with_a_valid_key_the_process_has_cached(services):
    """A valid key that was just used is answered from the process's caches without the database (on the event
    loop); that shortcut must not skip the brake on an address that keeps sending bad keys, nor a revocation."""
    headers = key(services)
    record = services.keys.list()[0]
    with clock.frozen(dt.datetime(2026, 11, 24, 12, 0, 10, tzinfo=dt.UTC)), TestClient(create_app(services)) as api:
        assert api.get("/v1/jobs", headers=headers).status_code == 200  # the key and its tenant's policy cached
        assert api.get("/v1/jobs", headers=headers).status_code == 200
        for i in range(services.settings.server.auth_failures_per_minute):
            api.get("/v1/jobs", headers={"Authorization": f"Bearer dk_{i:012d}_{'A' * 43}"})
        braked = api.get("/v1/jobs", headers=headers)
        assert braked.status_code == 429 and braked.json()["error"]["code"] == "too_many_failures"
    with TestClient(create_app(services)) as api:
        assert api.get("/v1/jobs", headers=headers).status_code == 200
        services.keys.revoke(CLI, record.id)
        assert api.get("/v1/jobs", headers=headers).status_code == 401


def test_keys_are_stored_hashed(services):
    _, token = services.keys.create(CLI, name="x", role=Role.user, tenant="acme")
    with services.store.engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(sa.select(api_keys))]
    assert token not in repr(rows)
    assert token.split("_", 2)[2] not in repr(rows)  # the secret may itself contain "_"
    assert rows[0]["hash"] != token and len(rows[0]["hash"]) == 64


# --- roles ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "method", "path", "body"),
    [
        (Role.user, "get", "/v1/keys", None),
        (Role.user, "post", "/v1/keys", {"name": "x", "role": "admin"}),
        (Role.user, "get", "/v1/audit", None),
        (Role.user, "put", "/v1/tenants/acme", {"images_per_day": 1000}),
        (Role.user, "get", "/v1/workers", None),
        (Role.user, "get", "/metrics", None),
        (Role.user, "post", "/sdapi/v1/options", {"sd_model_checkpoint": "x"}),
        (Role.user, "post", "/v1/models/tiny-sd/approve", None),
        (Role.service, "get", "/v1/keys", None),
        (Role.service, "get", "/v1/workers", None),
        (Role.operator, "get", "/v1/audit", None),
        (Role.operator, "post", "/v1/keys", {"name": "x", "role": "admin"}),
        (Role.operator, "put", "/v1/tenants/acme", {"images_per_day": 1000}),
    ],
)
def test_a_role_without_the_permission_gets_403(api, services, role, method, path, body):
    response = api.request(method, path, json=body, headers=key(services, role))
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "forbidden"


def test_operators_see_workers_and_metrics_admins_everything(api, services):
    operator = key(services, Role.operator)
    assert api.get("/v1/workers", headers=operator).status_code == 200
    assert api.get("/metrics", headers=operator).status_code == 200
    admin = key(services, Role.admin, tenant="default")
    for path in ("/v1/keys", "/v1/audit", "/v1/tenants", "/v1/workers", "/v1/jobs"):
        assert api.get(path, headers=admin).status_code == 200, path


def test_an_admin_key_made_over_the_api_works_and_is_shown_once(api, services):
    admin = key(services, Role.admin, tenant="default")
    response = api.post("/v1/keys", json={"name": "ci", "role": "service", "tenant": "acme"}, headers=admin)
    assert response.status_code == 201, response.text
    made = response.json()
    assert made["token"].startswith(f"dk_{made['id']}_")
    listed = api.get("/v1/keys", headers=admin).json()
    assert all("token" not in k and "hash" not in k for k in listed)
    service = {"Authorization": f"Bearer {made['token']}"}
    assert api.post("/v1/jobs", json=BASE, headers=service).status_code == 202
    assert api.delete(f"/v1/keys/{made['id']}", headers=admin).json()["revoked_at"]
    assert api.post("/v1/jobs", json=BASE, headers=service).status_code == 401


# --- tenant isolation -------------------------------------------------------------------------------------------


def test_another_tenants_jobs_answer_404_like_missing_ones(api, services):
    alice = key(services, Role.service, tenant="a")
    bob = key(services, Role.admin, tenant="b")  # even an admin of tenant b
    job = submit(api, alice)
    for method, path in [
        ("get", f"/v1/jobs/{job['id']}"),
        ("delete", f"/v1/jobs/{job['id']}"),
        ("get", f"/v1/jobs/{job['id']}/events"),
        ("get", f"/v1/jobs/{job['id']}/webhooks"),
    ]:
        theirs = api.request(method, path, headers=bob)
        missing = api.request(method, path.replace(job["id"], "job_doesnotexist"), headers=bob)
        assert theirs.status_code == missing.status_code == 404, path
        assert theirs.json()["error"]["code"] == missing.json()["error"]["code"]
    assert api.get("/v1/jobs", headers=bob).json() == []
    assert [j["id"] for j in api.get("/v1/jobs", headers=alice).json()] == [job["id"]]
    assert api.get(f"/v1/jobs/{job['id']}", headers=alice).json()["state"] == "queued"


def test_the_job_stream_websocket_refuses_other_tenants(api, services):
    alice = key(services, Role.service, tenant="a")
    bob_token = key(services, Role.service, tenant="b")["Authorization"].removeprefix("Bearer ")
    job = submit(api, alice)
    theirs = f"/v1/jobs/{job['id']}/ws?api_key={bob_token}"
    with pytest.raises(WebSocketDisconnect) as closed, api.websocket_connect(theirs):
        pass
    assert closed.value.code == 4404
    with pytest.raises(WebSocketDisconnect) as closed, api.websocket_connect(f"/v1/jobs/{job['id']}/ws"):
        pass
    assert closed.value.code == 4401
    alice_token = alice["Authorization"].removeprefix("Bearer ")
    with api.websocket_connect(f"/v1/jobs/{job['id']}/ws?api_key={alice_token}") as ws:
        assert ws.receive_json()["type"] == "queued"


def test_users_see_their_own_jobs_services_the_tenants(api, services):
    first, second = key(services, Role.user, tenant="a"), key(services, Role.user, tenant="a")
    service = key(services, Role.service, tenant="a")
    mine = submit(api, first)
    assert api.get(f"/v1/jobs/{mine['id']}", headers=second).status_code == 404
    assert api.delete(f"/v1/jobs/{mine['id']}", headers=second).status_code == 404
    assert api.get("/v1/jobs", headers=second).json() == []
    assert api.get(f"/v1/jobs/{mine['id']}", headers=service).status_code == 200
    assert len(api.get("/v1/jobs", headers=service).json()) == 1


def test_another_tenants_images_are_404_and_their_jobs_invisible_to_compat_apis(services, tmp_path):
    """End to end with a worker: tenant a's image downloads for a, and is a 404 for b on every API."""
    alice = key(services, Role.service, tenant="a")
    bob = key(services, Role.service, tenant="b")
    with TestClient(create_app(services, workers=1)) as api:
        response = api.post("/v1/generate", json=BASE, headers=alice)
        assert response.status_code == 200, response.text
        image = response.json()["images"][0]
        assert api.get(f"/v1/images/{image['id']}", headers=alice).status_code == 200
        theirs = api.get(f"/v1/images/{image['id']}", headers=bob)
        missing = api.get("/v1/images/img_doesnotexist", headers=bob)
        assert theirs.status_code == missing.status_code == 404
        assert theirs.json()["error"]["code"] == missing.json()["error"]["code"]
        assert api.get("/sdapi/v1/progress", headers=bob).json()["state"]["job"] == ""


# --- rate limits and quotas --------------------------------------------------------------------------------------


def test_a_keys_rate_limit_answers_429_with_retry_after_and_the_limit(api, services):
    headers = key(services, requests_per_minute=3)
    other = key(services)
    with clock.frozen(dt.datetime(2026, 11, 24, 12, 0, 10, tzinfo=dt.UTC)):
        for _ in range(3):
            assert api.get("/v1/jobs", headers=headers).status_code == 200
        response = api.get("/v1/jobs", headers=headers)
        assert api.get("/v1/jobs", headers=other).status_code == 200  # the limit is the key's, not the tenant's
    assert response.status_code == 429
    assert 1 <= int(response.headers["Retry-After"]) <= 51
    error = response.json()["error"]
    assert error["code"] == "rate_limited" and error["field"] == "requests_per_minute"
    assert error["limit"]["limit"] == 3 and error["limit"]["scope"].startswith("key:")
    with clock.frozen(dt.datetime(2026, 11, 24, 12, 1, 1, tzinfo=dt.UTC)):
        assert api.get("/v1/jobs", headers=headers).status_code == 200  # the next minute


def test_a_tenants_rate_limit_covers_all_its_keys(api, services):
    services.tenants.put("acme", TenantPolicy(requests_per_minute=2), CLI)
    one, two = key(services), key(services)
    outsider = key(services, tenant="other")
    with clock.frozen(dt.datetime(2026, 11, 24, 12, 0, 30, tzinfo=dt.UTC)):
        assert api.get("/v1/jobs", headers=one).status_code == 200
        assert api.get("/v1/jobs", headers=two).status_code == 200
        response = api.get("/v1/jobs", headers=one)
        assert api.get("/v1/jobs", headers=outsider).status_code == 200
    assert response.status_code == 429
    assert response.json()["error"]["limit"]["scope"] == "tenant:acme"


def test_images_per_day_quota_is_429_until_midnight(api, services):
    services.tenants.put("acme", TenantPolicy(images_per_day=3), CLI)
    headers = key(services, Role.service)
    noon = dt.datetime(2026, 11, 24, 12, 0, tzinfo=dt.UTC)
    with clock.frozen(noon):
        first = submit(api, headers, n=2)
        response = api.post("/v1/jobs", json={**BASE, "n": 2}, headers=headers)
        assert response.status_code == 429
        assert int(response.headers["Retry-After"]) == 12 * 3600 + 1
        error = response.json()["error"]
        assert error["code"] == "quota_exceeded" and error["field"] == "images_per_day"
        assert error["limit"] == {"name": "images_per_day", "scope": "tenant:acme", "limit": 3, "used": 2}
        assert submit(api, headers, n=1)  # exactly up to the quota
        assert api.delete(f"/v1/jobs/{first['id']}", headers=headers).status_code == 200
        assert submit(api, headers, n=2)  # a cancelled job gives its images back
        usage = api.get("/v1/usage", headers=headers).json()
        assert usage["images_today"] == 3 and usage["images_per_day"] == 3
    with clock.frozen(noon + dt.timedelta(days=1)):
        assert submit(api, headers, n=3)


def test_gpu_seconds_quota_counts_finished_jobs_this_month(api, services):
    services.tenants.put("acme", TenantPolicy(gpu_seconds_per_month=10), CLI)
    headers = key(services, Role.service)
    job = submit(api, headers)
    assert services.store.claim("w", 30).id == job["id"]  # a worker runs it for 12.5 s: the month's counter says so
    services.store.start(job["id"], "w")
    assert services.store.complete(job["id"], "w", [], {"timings": {"worker_total_s": 12.5}})
    response = api.post("/v1/jobs", json=BASE, headers=headers)
    assert response.status_code == 429
    assert response.json()["error"]["field"] == "gpu_seconds_per_month"
    assert int(response.headers["Retry-After"]) > 0


def test_service_wide_default_quota_applies_to_tenants_without_one(tmp_path, models_dir):
    settings = Settings(
        data_dir=tmp_path / "d",
        models_dir=models_dir,
        security=SecuritySettings(default_images_per_day=1, approve_first_seen_models=True),
    )
    svc = Services.open(settings)
    try:
        with TestClient(create_app(svc, workers=0)) as api:
            headers = key(svc, Role.service)
            submit(api, headers)
            assert api.post("/v1/jobs", json=BASE, headers=headers).status_code == 429
    finally:
        svc.close()


# --- audit --------------------------------------------------------------------------------------------------------


def test_every_admin_action_is_in_the_audit_log(api, services):
    admin = key(services, Role.admin, tenant="default")
    made = api.post("/v1/keys", json={"name": "svc", "role": "service", "tenant": "acme"}, headers=admin).json()
    api.delete(f"/v1/keys/{made['id']}", headers=admin)
    api.put("/v1/tenants/acme", json={"images_per_day": 100, "require_review": True}, headers=admin)
    model = api.get("/v1/models", headers=admin).json()["data"][0]["id"]
    assert api.post(f"/v1/models/{model}/approve", headers=admin).status_code == 200
    assert api.post("/sdapi/v1/options", json={"sd_model_checkpoint": model}, headers=admin).status_code == 200
    job = submit(api, admin)
    api.delete(f"/v1/jobs/{job['id']}", headers=admin)

    records = api.get("/v1/audit", headers=admin, params={"limit": 1000}).json()
    actions = [r["action"] for r in records]
    for action in (
        "key.create",
        "key.revoke",
        "tenant.update",
        "model.approve",
        "settings.update",
        "job.submit",
        "job.cancel",
    ):
        assert action in actions, action
    admin_id = services.keys.list(tenant="default")[0].id
    mine = [r for r in records if r["actor"] == admin_id]
    assert {r["action"] for r in mine} >= {"key.revoke", "tenant.update", "model.approve", "settings.update"}
    assert all(r["request_id"] and r["ip"] and r["at"] for r in mine)
    update = next(r for r in records if r["action"] == "tenant.update")
    assert update["tenant"] == "acme" and update["details"]["after"]["images_per_day"] == 100
    submitted = next(r for r in records if r["action"] == "job.submit")
    assert submitted["target"] == job["id"] and BASE["prompt"] not in str(submitted["details"])
    assert [r["action"] for r in api.get("/v1/audit", headers=admin, params={"action": "key."}).json()] == [
        "key.create",
        "key.create",
        "key.revoke",
    ]


def test_the_audit_log_pages_forward(api, services):
    admin = key(services, Role.admin, tenant="default")
    for _ in range(5):
        submit(api, admin)
    first = api.get("/v1/audit", headers=admin, params={"limit": 2}).json()
    after = api.get("/v1/audit", headers=admin, params={"limit": 100, "after": first[-1]["id"]}).json()
    assert [r["id"] for r in first + after] == sorted({r["id"] for r in first + after})
    assert len(first) + len(after) == 6  # one key.create, five job.submit


def test_submit_and_its_audit_record_commit_together(api, services):
    """A job refused by its quota leaves neither a job nor an audit record behind."""
    services.tenants.put("acme", TenantPolicy(images_per_day=1), CLI)
    headers = key(services, Role.service)
    submit(api, headers)
    assert api.post("/v1/jobs", json=BASE, headers=headers).status_code == 429
    assert len(services.audit.list(action="job.submit")) == 1
    assert len(services.store.list(tenant="acme")) == 1


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'audit.db'}"
    return request.getfixturevalue("pg_url")


def test_the_audit_log_is_append_only_in_the_database(db_url, tmp_path):
    migrate(db_url, lock_dir=tmp_path)
    engine = sa.create_engine(db_url)
    log = AuditLog(engine)
    log.record(CLI, "key.create", "k1")
    for statement in (audit_log.update().values(actor="someone else"), audit_log.delete()):
        with pytest.raises(sa.exc.DatabaseError, match="append-only"), engine.begin() as conn:
            conn.execute(statement)
    assert [r.actor for r in log.list()] == [CLI.actor]
    engine.dispose()


def test_rate_counters_are_shared_through_the_database(db_url, tmp_path):
    """Two key stores/limiters (two API nodes) count into the same window."""
    from darkroom.auth.limits import RateLimiter
    from darkroom.errors import RateLimited

    migrate(db_url, lock_dir=tmp_path)
    nodes = [sa.create_engine(db_url), sa.create_engine(db_url)]
    record, _ = KeyStore(nodes[0]).create(CLI, name="k", role=Role.user, tenant="acme", requests_per_minute=4)
    who = Principal(actor=record.id, role=Role.user, tenant="acme", key_id=record.id, requests_per_minute=4)
    with clock.frozen(dt.datetime(2026, 11, 24, 8, 30, 0, tzinfo=dt.UTC)):
        for i in range(4):
            RateLimiter(nodes[i % 2]).hit(who, None)
        with pytest.raises(RateLimited):
            RateLimiter(nodes[0]).hit(who, None)
    for engine in nodes:
        engine.dispose()


def test_audit_export_cli_writes_json_lines(services, tmp_path):
    from typer.testing import CliRunner

    from darkroom.cli import app

    key(services, Role.admin, tenant="default")
    out = tmp_path / "audit.jsonl"
    data_dir = str(services.settings.data_dir)
    runner = CliRunner()
    made = runner.invoke(app, ["keys", "create", "--role", "service", "--tenant", "acme", "--data-dir", data_dir])
    assert made.exit_code == 0, made.output
    token = made.stdout.strip().splitlines()[-1]
    assert token.startswith("dk_")
    key_id = token.split("_")[1]
    assert runner.invoke(app, ["keys", "revoke", key_id, "--data-dir", data_dir]).exit_code == 0
    listed = runner.invoke(app, ["keys", "list", "--all", "--json", "--data-dir", data_dir])
    assert key_id in listed.stdout
    result = runner.invoke(
        app,
        [
            "tenants",
            "set",
            "acme",
            "--images-per-day",
            "5",
            "--block-term",
            "forbidden=not here",
            "--data-dir",
            data_dir,
        ],
    )
    assert result.exit_code == 0, result.output
    assert services.tenants.get("acme").images_per_day == 5
    result = runner.invoke(app, ["audit", "export", "-o", str(out), "--data-dir", data_dir])
    assert result.exit_code == 0, result.output
    import json

    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["action"] for line in lines] == ["key.create", "key.create", "key.revoke", "tenant.update"]
    assert all(line["actor"].startswith("cli:") for line in lines)


def test_a_blocked_prompt_is_a_422_with_the_rules_reason(api, services):
    services.tenants.put(
        "acme", TenantPolicy.model_validate({"prompt_rules": [{"pattern": "lighthouse", "reason": "no coasts"}]}), CLI
    )
    response = api.post("/v1/jobs", json=BASE, headers=key(services, Role.service))
    assert response.status_code == 422
    assert response.json()["error"] == {"code": "prompt_blocked", "message": "no coasts", "field": "prompt"}
    assert submit(api, key(services, Role.service, tenant="other"))  # other tenants have their own rules
    assert not services.store.list(tenant="acme")


def _wait(predicate, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_dangerous_regex_rule_is_refused_when_stored(api, services):
    admin = key(services, Role.admin, tenant="default")
    rule = {"pattern": "(a)\\1", "kind": "regex", "reason": "x"}  # a backreference: RE2 has none
    response = api.put("/v1/tenants/acme", json={"prompt_rules": [rule]}, headers=admin)
    assert response.status_code == 422 and response.json()["error"]["field"].startswith("prompt_rules")
    assert not services.tenants.all()


def test_held_outputs_are_not_downloadable_until_an_operator_approves(services):
    """A tenant that requires review: the image exists, but no API hands it out until an operator says so."""
    services.tenants.put("acme", TenantPolicy(require_review=True), CLI)
    client = key(services, Role.service)
    operator = key(services, Role.operator)
    with TestClient(create_app(services, workers=1)) as api:
        job = api.post("/v1/generate", json=BASE, headers=client).json()
        assert job["state"] == "succeeded"
        [image] = job["images"]
        assert image["review_state"] == "pending" and image["url"] is None
        held = api.get(f"/v1/images/{image['id']}", headers=client)
        assert held.status_code == 403 and held.json()["error"]["code"] == "held_for_review"
        a1111 = api.post(
            "/sdapi/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64, "steps": 2}, headers=client
        )
        assert a1111.status_code == 403 and a1111.json()["error"]["code"] == "held_for_review"
        openai = api.post("/v1/images/generations", json={"prompt": "x", "size": "64x64"}, headers=client)
        assert openai.status_code == 403 and openai.json()["error"]["type"] == "permission_error"

        assert api.get(f"/v1/review/images/{image['id']}", headers=operator).status_code == 200
        decided = api.post(f"/v1/review/images/{image['id']}", json={"decision": "approve"}, headers=operator)
        assert decided.status_code == 200, decided.text
        assert api.get(f"/v1/images/{image['id']}", headers=client).status_code == 200
        assert api.get(f"/v1/jobs/{job['id']}", headers=client).json()["images"][0]["url"]
    [approved] = services.audit.list(action="review.approve")
    assert approved.target == image["id"] and approved.tenant == "acme"


def test_an_open_keyless_service_admits_on_the_event_loop_until_a_key_exists(services):
    """With no keys on loopback the caller is the machine's owner: answered from the caches (no thread hand-off,
    no database) whatever token comes, and no longer once another process makes the first key."""
    from darkroom.api.auth import admit_cached

    with TestClient(create_app(services)) as api:
        assert api.get("/v1/jobs").status_code == 200  # reads the table once and caches the tenant's policy
        for token in (None, "sk-anything"):
            who, _ = admit_cached(services, None, token, "127.0.0.1", "req_1") or (None, None)
            assert who is not None and who.actor == "local" and who.tenant == "default"
        other_process = KeyStore(services.store.engine)
        _, token = other_process.create(CLI, name="first", role=Role.user, tenant="acme")
        assert admit_cached(services, None, None, "127.0.0.1", "req_2") is None
        assert api.get("/v1/jobs").status_code == 401
        assert api.get("/v1/jobs", headers={"Authorization": f"Bearer {token}"}).status_code == 200
