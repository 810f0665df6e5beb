"""The web UI over the real app (TestClient), real SQLite and real keys: sign-in into a server-side session, CSRF on
every form, what each role and tenant sees, and that each page acts through the API's own checks and audit."""

from __future__ import annotations

import base64
import datetime as dt
import io
import re

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from darkroom import clock
from darkroom.api.app import create_app
from darkroom.auth.principal import Principal, Role
from darkroom.auth.tenants import TenantPolicy
from darkroom.config import Settings
from darkroom.jobs.workers import WorkerInfo, WorkerRegistry
from darkroom.schemas import GenerationRequest, JobState
from darkroom.service import Services
from darkroom.worker.loop import Worker

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
SMALL = {"prompt": "a red cube", "width": "64", "height": "64", "steps": "1", "seed": "7", "model": "tiny-diffusers"}


def csrf_of(html: str) -> str:
    match = CSRF.search(html)
    assert match, "no CSRF token on the page"
    return match.group(1)


def sign_in(client: TestClient, token: str) -> str:
    """Sign in as a browser does; the session's CSRF token, from the page the sign-in lands on."""
    page = client.get("/")
    assert page.status_code == 200, page.text
    r = client.post("/ui/login", data={"api_key": token, "csrf_token": csrf_of(page.text)}, follow_redirects=False)
    assert r.status_code == 303, r.text
    return csrf_of(client.get(r.headers["location"]).text)


@pytest.fixture(scope="module")
def ui(tmp_path_factory, models_dir):
    tmp = tmp_path_factory.mktemp("web")
    settings = Settings(data_dir=tmp / "data", models_dir=models_dir, heartbeat_seconds=0.05, batch_window_seconds=0)
    svc = Services.open(settings)
    cli = Principal.cli()
    tokens = {}
    for name, role, tenant in (
        ("user", Role.user, "acme"),
        ("user2", Role.user, "acme"),
        ("other", Role.user, "globex"),
        ("operator", Role.operator, "acme"),
        ("admin", Role.admin, "default"),
        ("metrics", Role.metrics, "acme"),
    ):
        _, tokens[name] = svc.keys.create(cli, name=name, role=role, tenant=tenant)
    app = create_app(svc, workers=0)
    with TestClient(app) as first:
        yield svc, app, tokens, first
    svc.close()


def client_for(ui, who: str) -> tuple[TestClient, str]:
    svc, app, tokens, _ = ui
    client = TestClient(app)
    return client, sign_in(client, tokens[who])


def run_jobs(svc: Services) -> None:
    """What a worker does, in this thread: claim and run every queued job on the tiny model."""
    worker = Worker(svc.settings, svc.store, svc.blobs, svc.make_engine, worker_id="w-ui")
    try:
        while batch := worker.claim():
            worker.process_batch(batch)
    finally:
        if worker._engine is not None:
            worker._engine.close()


def submit(client: TestClient, csrf: str, **fields: str) -> str:
    r = client.post("/ui/generate", data={**SMALL, **fields, "csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303, r.text
    return r.headers["location"].rsplit("/", 1)[1]


# --- sign-in, session, CSRF ------------------------------------------------------------------------------------------


def test_signed_out_root_is_the_sign_in_page_and_pages_send_you_there(ui):
    client = TestClient(ui[1])
    r = client.get("/")
    assert r.status_code == 200 and 'action="/ui/login"' in r.text
    assert "darkroom_login_csrf" in r.headers["set-cookie"] and "httponly" in r.headers["set-cookie"].lower()
    assert not re.search(r"(src|href)=\"https?://", r.text)  # nothing loads from elsewhere
    r = client.get("/ui/queue", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/?next=/ui/queue"


def test_sign_in_sets_an_httponly_lax_session_and_lands_on_next(ui):
    client = TestClient(ui[1])
    page = client.get("/?next=/ui/queue")
    r = client.post(
        "/ui/login",
        data={"api_key": ui[2]["user"], "csrf_token": csrf_of(page.text), "next": "/ui/queue"},
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == "/ui/queue"
    cookie = next(c for c in r.headers.get_list("set-cookie") if c.startswith("darkroom_session="))
    assert "httponly" in cookie.lower() and "samesite=lax" in cookie.lower() and "secure" not in cookie.lower()
    assert client.get("/", follow_redirects=False).headers["location"] == "/ui/generate"


def test_cookies_are_secure_when_the_public_url_is_https(ui):
    svc, app, tokens, _ = ui
    svc.settings.public_url = "https://darkroom.example"
    try:
        client = TestClient(app)
        page = client.get("/")
        assert "secure" in page.headers["set-cookie"].lower()
        client.cookies.set("darkroom_login_csrf", page.cookies.get("darkroom_login_csrf") or "", path="/ui/login")
        r = client.post(
            "/ui/login", data={"api_key": tokens["user"], "csrf_token": csrf_of(page.text)}, follow_redirects=False
        )
        cookie = next(c for c in r.headers.get_list("set-cookie") if c.startswith("darkroom_session="))
        assert "secure" in cookie.lower()
    finally:
        svc.settings.public_url = None


def test_sign_in_refuses_a_missing_csrf_token_a_bad_key_and_machine_keys(ui):
    client = TestClient(ui[1])
    client.get("/")
    r = client.post("/ui/login", data={"api_key": ui[2]["user"]}, follow_redirects=False)
    assert r.status_code == 403 and "CSRF" in r.text
    token = csrf_of(client.get("/").text)
    r = client.post("/ui/login", data={"api_key": "dk_aaaaaaaaaaaa_" + "b" * 40, "csrf_token": token})
    assert r.status_code == 401 and "invalid API key" in r.text and "darkroom_session" not in client.cookies
    r = client.post("/ui/login", data={"api_key": ui[2]["metrics"], "csrf_token": token})
    assert r.status_code == 403 and "darkroom_session" not in client.cookies


def test_session_is_shared_by_api_processes_and_ends_on_logout(ui, tmp_path):
    svc, app, tokens, _ = ui
    client, csrf = client_for(ui, "user")
    # A second API process on the same database (its own Services, engine and caches) honours the same cookie.
    other = Services.open(svc.settings)
    try:
        second = TestClient(create_app(other, workers=0), cookies=dict(client.cookies))
        assert second.get("/ui/queue").status_code == 200
        r = client.post("/ui/logout", data={"csrf_token": csrf}, follow_redirects=False)
        assert r.status_code == 303
        second.cookies.set("darkroom_session", second.cookies["darkroom_session"])
        assert second.get("/ui/queue", follow_redirects=False).status_code == 303  # gone everywhere
    finally:
        other.close()


def test_sessions_expire_and_end_with_their_key(ui):
    svc, _, _, _ = ui
    client, _ = client_for(ui, "user2")
    with clock.frozen(clock.utcnow() + dt.timedelta(hours=svc.settings.server.ui_session_hours, minutes=1)):
        assert client.get("/ui/queue", follow_redirects=False).status_code == 303
    assert client.get("/ui/queue").status_code == 200
    key, temp = svc.keys.create(Principal.cli(), name="temp", role=Role.user, tenant="acme")
    temp_client = TestClient(ui[1])
    sign_in(temp_client, temp)
    assert temp_client.get("/ui/queue").status_code == 200
    svc.keys.revoke(Principal.cli(), key.id)
    assert temp_client.get("/ui/queue", follow_redirects=False).status_code == 303


def test_the_cookie_never_authenticates_the_json_api(ui):
    client, _ = client_for(ui, "user")
    assert client.get("/v1/jobs").status_code == 401


def test_every_form_post_without_the_csrf_token_is_refused_before_any_work(ui):
    svc, _, _, _ = ui
    client, csrf = client_for(ui, "admin")
    before = svc.store.counts()
    posts = ["/ui/generate", "/ui/logout", "/ui/keys", "/ui/tenants", "/ui/jobs/x/cancel", "/ui/review/images/x"]
    for path in posts:
        r = client.post(path, data={**SMALL, "name": "k", "tenant": "acme", "decision": "approve"})
        assert r.status_code == 403, path
        assert "CSRF" in r.text
        r = client.post(path, data={"csrf_token": "forged"})
        assert r.status_code == 403, path
    assert svc.store.counts() == before
    assert client.get("/ui/queue").status_code == 200  # still signed in: the refused logout did nothing


# --- generate, job page, cancel --------------------------------------------------------------------------------------


def test_generate_queues_through_the_api_and_the_job_page_shows_it(ui):
    svc, _, _, _ = ui
    client, csrf = client_for(ui, "user")
    job_id = submit(client, csrf, negative_prompt="blurry", priority="high", preview="on", n="2")
    job = svc.store.get(job_id)
    assert job is not None and job.tenant == "acme" and job.request["negative_prompt"] == "blurry"
    assert job.request["n"] == 2 and job.request["preview"] is True and job.priority == 2
    assert [r.action for r in svc.audit.list(action="job.submit") if r.target == job_id] == ["job.submit"]
    page = client.get(f"/ui/jobs/{job_id}")
    assert page.status_code == 200 and 'data-job="' + job_id in page.text and "queued" in page.text
    reuse = client.get(f"/ui/generate?from={job_id}").text
    assert ">a red cube</textarea>" in reuse and 'value="7"' in reuse and ">blurry</textarea>" in reuse


def test_bad_field_answers_the_form_again_naming_it(ui):
    svc, _, _, _ = ui
    client, csrf = client_for(ui, "user")
    before = svc.store.counts()
    r = client.post("/ui/generate", data={**SMALL, "width": "65", "csrf_token": csrf})
    assert r.status_code == 422 and "<code>width</code>" in r.text and ">a red cube</textarea>" in r.text
    r = client.post("/ui/generate", data={**SMALL, "steps": "many", "csrf_token": csrf})
    assert r.status_code == 422 and "<code>steps</code>" in r.text
    assert svc.store.counts() == before


def test_queue_lists_own_jobs_and_cancel_goes_through_the_api(ui):
    svc, _, _, _ = ui
    client, csrf = client_for(ui, "user2")
    job_id = submit(client, csrf)
    queue = client.get("/ui/queue").text
    assert f'id="job-{job_id}"' in queue and "Workers" not in queue  # the fleet is for operators
    r = client.post(f"/ui/jobs/{job_id}/cancel", data={"csrf_token": csrf, "back": "/ui/queue"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/ui/queue"
    assert svc.store.get(job_id).state is JobState.cancelled
    assert any(r.target == job_id for r in svc.audit.list(action="job.cancel"))
    assert f'id="job-{job_id}"' not in client.get("/ui/queue").text


# --- roles and tenants -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/ui/review", "/ui/keys", "/ui/tenants", "/ui/audit", "/ui/audit.csv"])
def test_a_user_is_refused_operator_and_admin_pages(ui, path):
    client, _ = client_for(ui, "user")
    r = client.get(path)
    assert r.status_code == 403
    nav = client.get("/ui/generate").text
    assert 'href="/ui/review"' not in nav and 'href="/ui/keys"' not in nav


def test_tenants_and_users_see_only_their_own_jobs_and_images(ui):
    svc, _, _, _ = ui
    alice, csrf = client_for(ui, "user")
    job_id = submit(alice, csrf, prompt="alice's secret lighthouse")
    run_jobs(svc)
    image_id = svc.store.images_for(job_id)[0].id
    assert alice.get(f"/ui/images/{image_id}").headers["content-type"] == "image/png"
    assert "alice&#39;s secret lighthouse" in alice.get("/ui/gallery?q=lighthouse").text
    detail = alice.get(f"/ui/gallery/{image_id}")
    assert detail.status_code == 200 and 'id="verify-badge"' in detail.text
    for who in ("other", "user2"):  # another tenant, and another user of the same tenant
        client, _ = client_for(ui, who)
        for path in (f"/ui/jobs/{job_id}", f"/ui/images/{image_id}", f"/ui/gallery/{image_id}"):
            assert client.get(path).status_code == 404, (who, path)
        assert "lighthouse" not in client.get("/ui/gallery").text
    operator, _ = client_for(ui, "operator")  # operators see their tenant's jobs, as on the API
    assert operator.get(f"/ui/jobs/{job_id}").status_code == 200


def test_operator_approves_a_held_image_through_the_review_service(ui):
    svc, _, _, _ = ui
    svc.tenants.put("acme", TenantPolicy(require_review=True), Principal.cli())
    try:
        job, _ = svc.store.create(GenerationRequest(**{**SMALL, "prompt": "held one"}), tenant="acme")
        run_jobs(svc)
    finally:
        svc.tenants.put("acme", TenantPolicy(), Principal.cli())
    image_id = svc.store.images_for(job.id)[0].id
    op, csrf = client_for(ui, "operator")
    page = op.get("/ui/review").text
    assert f'id="review-{image_id}"' in page and "held one" in page
    assert op.get(f"/ui/review/images/{image_id}").status_code == 200
    r = op.post(f"/ui/review/images/{image_id}", data={"csrf_token": csrf, "decision": "reject"})
    assert r.status_code == 422 and "<code>note</code>" in r.text  # a rejection needs a reason
    r = op.post(
        f"/ui/review/images/{image_id}",
        data={"csrf_token": csrf, "decision": "approve", "note": "fine"},
        follow_redirects=False,
    )
    assert r.status_code == 303
    assert svc.store.get_image(image_id).review_state == "approved"
    record = next(r for r in svc.audit.list(action="review.approve") if r.target == image_id)
    operator_key = next(k for k in svc.keys.list(tenant="acme") if k.name == "operator")
    assert record.details["note"] == "fine" and record.actor == operator_key.id
    other, _ = client_for(ui, "other")
    assert other.get("/ui/review").status_code == 403


# --- admin pages -----------------------------------------------------------------------------------------------------


def test_admin_makes_and_revokes_a_key_and_exports_the_audit_log(ui):
    svc, _, _, _ = ui
    admin, csrf = client_for(ui, "admin")
    r = admin.post("/ui/keys", data={"csrf_token": csrf, "name": "made in ui", "role": "user", "tenant": "acme"})
    assert r.status_code == 201
    token = re.search(r'<pre id="new-token">([^<]+)</pre>', r.text).group(1)
    key = next(k for k in svc.keys.list() if k.name == "made in ui")
    assert svc.keys.authenticate(token).id == key.id
    r = admin.post(f"/ui/keys/{key.id}/revoke", data={"csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303 and svc.keys.get(key.id).revoked_at is not None
    page = admin.get("/ui/audit?action=key.").text
    assert "key.create" in page and "key.revoke" in page and "job.submit" not in page
    csv = admin.get("/ui/audit.csv?action=key.")
    assert csv.headers["content-type"].startswith("text/csv")
    lines = csv.text.strip().splitlines()
    assert lines[0].startswith("id,at,actor") and all(",key." in line for line in lines[1:]) and len(lines) >= 3
    assert admin.get("/ui/audit?since=yesterday").status_code == 422
    usage = admin.get("/ui/usage").text
    assert "<td>acme</td>" in usage and "<td>globex</td>" in usage  # admins: every tenant
    r = admin.post("/ui/tenants", data={"csrf_token": csrf, "tenant": "globex", "policy": '{"images_per_day": 5}'})
    assert r.status_code == 200 and svc.tenants.get("globex").images_per_day == 5  # followed the 303
    assert admin.post("/ui/tenants", data={"csrf_token": csrf, "tenant": "x", "policy": "{"}).status_code == 422


def test_a_user_sees_only_its_tenant_usage_and_the_models(ui):
    client, _ = client_for(ui, "other")
    usage = client.get("/ui/usage").text
    assert "<td>globex</td>" in usage and "<td>acme</td>" not in usage
    assert "tiny-diffusers" in client.get("/ui/models").text


# --- API docs offline ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_api_docs_load_only_vendored_assets(ui, path):
    client = ui[3]
    html = client.get(path).text
    assets = re.findall(r'(?:src|href)="([^"]+)"', html) + re.findall(r"url: '([^']+)'", html)
    assert assets and not [a for a in assets if a.startswith("http")], assets
    for asset in assets:
        assert client.get(asset).status_code == 200, asset


def test_sign_in_goes_only_to_this_servers_ui_pages(ui):
    for target in ("https://evil.example/", "//evil.example/ui/x", "/ui/..//evil", "/v1/jobs"):
        client = TestClient(ui[1])
        token = csrf_of(client.get("/").text)
        r = client.post(
            "/ui/login",
            data={"api_key": ui[2]["user"], "csrf_token": token, "next": target},
            follow_redirects=False,
        )
        assert r.status_code == 303 and r.headers["location"] == "/ui/generate", target


def test_without_any_key_a_loopback_server_lets_its_owner_in_with_an_empty_key(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", models_dir=tmp_path / "models", create_default_model=False)
    svc = Services.open(settings)
    try:
        client = TestClient(create_app(svc, workers=0))
        page = client.get("/")
        assert "not needed: no keys exist yet" in page.text
        r = client.post("/ui/login", data={"api_key": "", "csrf_token": csrf_of(page.text)}, follow_redirects=False)
        assert r.status_code == 303
        assert "default · admin" in client.get("/ui/keys").text  # the machine's owner, an admin, as on the API
        svc.keys.create(Principal.cli(), name="first", role=Role.user, tenant="acme")
        assert client.get("/ui/keys", follow_redirects=False).status_code == 303  # keys exist now: sign in with one
    finally:
        svc.close()


def test_operator_disables_and_enables_a_model_and_reads_the_cost_report(ui):
    svc, _, _, _ = ui
    user, _ = client_for(ui, "user")
    assert "Disable" not in user.get("/ui/models").text  # users see the models, not the controls
    assert 'id="cost"' in user.get("/ui/usage").text
    op, csrf = client_for(ui, "operator")
    assert op.post("/ui/models/tiny-diffusers/disable", data={}).status_code == 403  # CSRF first
    r = op.post("/ui/models/tiny-diffusers/disable", data={"csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303
    page = op.get("/ui/models").text
    assert "disabled" in page and 'action="/ui/models/tiny-diffusers/enable"' in page
    assert any(r.target == "tiny-diffusers" for r in svc.audit.list(action="model.disable"))
    op.post("/ui/models/tiny-diffusers/enable", data={"csrf_token": csrf})
    assert 'action="/ui/models/tiny-diffusers/disable"' in op.get("/ui/models").text
    assert op.post("/ui/models/tiny-diffusers/explode", data={"csrf_token": csrf}).status_code == 422
    report = op.get("/ui/usage?days=7").text
    assert "Cost, the last 7 days" in report and "<th>Day</th>" in report.replace(' scope="col"', "")


def test_the_forms_offer_only_the_models_the_tenant_may_use(ui):
    svc, _, _, _ = ui
    svc.tenants.put("globex", TenantPolicy(allowed_models=["tiny-single"]), Principal.cli())
    try:
        client, _ = client_for(ui, "other")
        for path in ("/ui/generate", "/ui/gallery", "/ui/models"):
            text = client.get(path).text
            assert "tiny-single" in text and "tiny-diffusers" not in text, path
    finally:
        svc.tenants.put("globex", TenantPolicy(), Principal.cli())


def test_operators_see_the_fleet_with_each_workers_current_job(ui):
    svc, _, _, _ = ui
    WorkerRegistry(svc.store.engine).register(WorkerInfo(id="w-fleet", host="gpu-7", pid=42, device="cuda:0"))
    job, _ = svc.store.create(GenerationRequest(**{**SMALL, "prompt": "on the fleet"}), tenant="acme")
    claimed = svc.store.claim("w-fleet", 60)
    assert claimed is not None and claimed.id == job.id
    try:
        op, _ = client_for(ui, "operator")
        page = op.get("/ui/queue").text
        assert "gpu-7" in page and "cuda:0" in page and f'href="/ui/jobs/{job.id}"' in page
        user, _ = client_for(ui, "user")
        assert "gpu-7" not in user.get("/ui/queue").text  # the fleet is for operators
    finally:
        svc.store.release(job.id, "w-fleet")
        svc.store.cancel(job.id)


def test_img2img_source_and_painted_mask_become_an_inpainting_job(ui):
    svc, _, _, _ = ui
    client, csrf = client_for(ui, "user")

    def png(color: str) -> bytes:
        out = io.BytesIO()
        Image.new("RGB", (64, 64), color).save(out, "PNG")
        return out.getvalue()

    mask = "data:image/png;base64," + base64.b64encode(png("white")).decode()  # what the painter's canvas sends
    r = client.post(
        "/ui/generate",
        data={**SMALL, "csrf_token": csrf, "strength": "0.5", "mask_image": mask},
        files={"init_image": ("source.png", png("red"), "image/png")},
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text
    job = svc.store.require(r.headers["location"].rsplit("/", 1)[1])
    assert job.request["init_image"].startswith("blob:") and job.request["mask_image"].startswith("blob:")
    assert job.request["strength"] == 0.5
    r = client.post(
        "/ui/generate",
        data={**SMALL, "csrf_token": csrf},
        files={"init_image": ("source.png", b"not an image", "image/png")},
    )
    assert r.status_code == 422 and "<code>init_image</code>" in r.text
    svc.store.cancel(job.id)


def test_operators_see_every_tenants_queue_in_claim_order_users_only_their_own(ui):
    svc, _, tokens, _ = ui
    alice, alice_csrf = client_for(ui, "user")
    bob, bob_csrf = client_for(ui, "other")
    low = submit(alice, alice_csrf, prompt="acme low", priority="low")
    high = submit(bob, bob_csrf, prompt="globex urgent secret", priority="high")
    try:
        op, _ = client_for(ui, "operator")
        page = op.get("/ui/queue").text
        everyone = page[page.index("Every tenant") :]
        assert "globex" in everyone and "acme low" in everyone
        assert "globex urgent secret" not in page and high not in page  # another tenant's job: no prompt, no id
        assert everyone.index("another tenant's job") < everyone.index("acme low")  # high priority first
        assert "Every tenant" not in alice.get("/ui/queue").text

        listed = op.get("/v1/queue", headers={"Authorization": f"Bearer {tokens['operator']}"})
        assert listed.status_code == 200, listed.text
        mine = [e for e in listed.json() if e["id"] == low or e["tenant"] == "globex"]
        assert [(e["tenant"], e["priority"], e["prompt"]) for e in mine] == [
            ("globex", "high", None),
            ("acme", "low", "acme low"),
        ]
        assert mine[0]["id"] is None and mine[0]["queue_position"] < mine[1]["queue_position"]
        admin = op.get("/v1/queue", headers={"Authorization": f"Bearer {tokens['admin']}"}).json()
        assert any(e["id"] == high and e["prompt"] == "globex urgent secret" for e in admin)
        refused = op.get("/v1/queue", headers={"Authorization": f"Bearer {tokens['user']}"})
        assert refused.status_code == 403
    finally:
        for job_id in (low, high):
            svc.store.cancel(job_id)


def test_tags_are_validated_stored_returned_and_searched_in_the_gallery(ui):
    svc, _, tokens, _ = ui
    alice, csrf = client_for(ui, "user")
    bearer = {"Authorization": f"Bearer {tokens['user']}"}
    for tags, field in ((["x" * 33], "tags.0"), ([f"t{i}" for i in range(17)], "tags"), ([""], "tags.0")):
        r = alice.post("/v1/jobs", json={**SMALL, "steps": 1, "tags": tags}, headers=bearer)
        assert r.status_code == 422 and r.json()["error"]["field"] == field, (tags, r.text)
    r = alice.post("/ui/generate", data={**SMALL, "tags": "a, " + "b" * 40, "csrf_token": csrf})
    assert r.status_code == 422 and "tags.1" in r.text  # the form names the field too, before any work
    api_job = alice.post("/v1/jobs", json={**SMALL, "tags": [" Spring ", "spring", "catalog"]}, headers=bearer)
    assert api_job.status_code == 202 and api_job.json()["request"]["tags"] == ["spring", "catalog"]
    ui_job = submit(alice, csrf, prompt="tagged teapot", tags="spring, teapots")
    untagged = submit(alice, csrf, prompt="untagged teapot")
    run_jobs(svc)
    found = alice.get("/v1/jobs?tag=SPRING", headers=bearer).json()
    assert {j["id"] for j in found} == {api_job.json()["id"], ui_job}
    gallery = alice.get("/ui/gallery?tag=teapots").text
    assert "tagged teapot" in gallery and "untagged teapot" not in gallery
    assert 'href="/ui/gallery?tag=spring"' in gallery  # each tile links its tags
    assert "untagged teapot" in alice.get("/ui/gallery?q=teapot").text
    assert 'value="spring, teapots"' in alice.get(f"/ui/generate?from={ui_job}").text  # reuse keeps the tags
    other, _ = client_for(ui, "other")  # another tenant's tags find nothing of alice's
    assert "tagged teapot" not in other.get("/ui/gallery?tag=teapots").text
    assert untagged
