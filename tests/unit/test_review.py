"""Output safety end to end: a real worker on the tiny model runs the checker hook, held images wait in the review
queue, an operator decides over the real API, and every decision lands in the audit log."""

from __future__ import annotations

import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from darkroom.api.app import create_app
from darkroom.auth.principal import Principal, Role
from darkroom.auth.tenants import TenantPolicy
from darkroom.config import SecuritySettings, Settings
from darkroom.errors import Conflict, Forbidden, NotFound
from darkroom.safety.checker import blank_image, review_decision
from darkroom.safety.review import ReviewStore
from darkroom.schemas import GenerationRequest, JobState
from darkroom.service import Services
from darkroom.worker.loop import Worker

SEEN: list[tuple[tuple[int, int], str, str]] = []


def flag_everything(image: Image.Image, request: dict, tenant: str) -> str | None:
    """A test checker: holds every image, remembering what it was shown."""
    SEEN.append((image.size, request["prompt"], tenant))
    return "looks suspicious"


def crash(image: Image.Image, request: dict, tenant: str) -> str | None:
    raise RuntimeError("classifier weights missing")


@pytest.fixture
def make_services(tmp_path, models_dir):
    opened: list[Services] = []

    def make(output_checker: str | None = None) -> Services:
        settings = Settings(
            data_dir=tmp_path / f"data{len(opened)}",
            models_dir=models_dir,
            heartbeat_seconds=0.05,
            batch_window_seconds=0,
            security=SecuritySettings(output_checker=output_checker, approve_first_seen_models=True),
        )
        opened.append(Services.open(settings))
        return opened[-1]

    yield make
    for svc in opened:
        svc.close()


def generate(svc: Services, tenant: str = "acme", n: int = 1, prompt: str = "a red cube") -> str:
    """Run one job through a real worker and the tiny model; the job id."""
    body = {"prompt": prompt, "width": 64, "height": 64, "steps": 2, "seed": 7, "n": n, "model": "tiny-diffusers"}
    job, _ = svc.store.create(GenerationRequest(**body), tenant=tenant)
    worker = Worker(svc.settings, svc.store, svc.blobs, svc.make_engine, worker_id="w1")
    try:
        worker.process_batch(worker.claim())
    finally:
        if worker._engine is not None:
            worker._engine.close()
    assert svc.store.get(job.id).state is JobState.succeeded
    return job.id


def succeeded_event(svc: Services, job_id: str) -> dict:
    return next(e.data for e in svc.store.events_since(job_id) if e.type == "succeeded")


def operator(tenant: str = "acme") -> Principal:
    return Principal(actor=f"op-{tenant}", role=Role.operator, tenant=tenant)


# --- the worker holds what the checker flags -------------------------------------------------------------------------


def test_flagged_images_are_stored_pending_and_the_job_still_succeeds(make_services):
    svc = make_services(f"{__name__}:flag_everything")
    SEEN.clear()
    job_id = generate(svc, n=2)
    images = svc.store.images_for(job_id)
    assert {(i.review_state, i.review_reason, i.released) for i in images} == {("pending", "looks suspicious", False)}
    assert len(images) == 2
    assert SEEN == [((64, 64), "a red cube", "acme")] * 2
    assert succeeded_event(svc, job_id)["held_for_review"] == [i.id for i in images]


def test_without_checker_or_policy_images_are_released(make_services):
    svc = make_services()
    job_id = generate(svc)
    [image] = svc.store.images_for(job_id)
    assert image.review_state == "none" and image.released
    assert "held_for_review" not in succeeded_event(svc, job_id)


def test_a_tenant_that_requires_review_gets_every_output_held(make_services):
    svc = make_services()
    svc.tenants.put("acme", TenantPolicy(require_review=True), Principal.cli())
    held = svc.store.images_for(generate(svc, tenant="acme"))
    other = svc.store.images_for(generate(svc, tenant="globex"))
    assert [(i.review_state, i.review_reason) for i in held] == [("pending", "require_review")]
    assert [i.review_state for i in other] == ["none"]


def test_a_checker_that_raises_holds_the_image_instead_of_crashing_the_worker(make_services):
    svc = make_services(f"{__name__}:crash")
    [image] = svc.store.images_for(generate(svc))
    assert image.review_state == "pending"
    assert image.review_reason == "checker error: RuntimeError: classifier weights missing"


def test_blank_image_flags_black_outputs_only(make_services):
    svc = make_services("darkroom.safety.checker:blank_image")
    [image] = svc.store.images_for(generate(svc))  # the tiny random model draws noise, not black
    assert image.review_state == "none"
    assert "all black" in blank_image(Image.new("RGB", (64, 64)), {}, "acme")
    assert blank_image(Image.new("RGB", (64, 64), (0, 0, 40)), {}, "acme") is None
    black = Image.new("RGB", (8, 8))
    state, reason = review_decision(blank_image, TenantPolicy(require_review=True), black, {}, "acme")
    assert state == "pending" and "all black" in reason  # the checker's reason beats the policy's


# --- the review store ----------------------------------------------------------------------------------------------


@pytest.fixture
def held(make_services):
    """Services with two held images of tenant acme and one of globex."""
    svc = make_services(f"{__name__}:flag_everything")
    generate(svc, tenant="acme", n=2, prompt="a blue sphere")
    generate(svc, tenant="globex")
    return svc


def test_queue_lists_held_images_with_their_request_and_pages(held):
    reviews = ReviewStore(held.store.engine)
    everything = reviews.queue()
    assert [i.image.tenant for i in everything] == ["acme", "acme", "globex"]
    assert everything[0].request["prompt"] == "a blue sphere" and everything[0].image.review_reason
    first = reviews.queue(tenant="acme", limit=1)
    second = reviews.queue(tenant="acme", limit=1, after=first[0].image.id)
    assert [i.image.id for i in first + second] == [i.image.id for i in everything[:2]]
    assert reviews.queue(tenant="acme", after=second[0].image.id) == []
    assert reviews.queue(state="approved") == []


def test_approve_releases_the_image_and_audits_it_in_the_same_transaction(held):
    reviews = ReviewStore(held.store.engine)
    image = reviews.queue(tenant="acme")[0].image
    decided = reviews.decide(operator(), image.id, "approve", "a harmless sphere")
    assert decided.review_state == "approved" and decided.released
    assert decided.reviewed_by == "op-acme" and decided.reviewed_at is not None
    assert held.store.get_image(image.id).released
    [record] = held.audit.list(action="review.approve")
    assert (record.actor, record.role, record.tenant, record.target) == ("op-acme", "operator", "acme", image.id)
    assert record.details == {"job_id": image.job_id, "reason": "looks suspicious", "note": "a harmless sphere"}
    assert [i.image.id for i in reviews.queue(state="approved")] == [image.id]


def test_reject_keeps_it_held_and_a_second_decision_conflicts(held):
    reviews = ReviewStore(held.store.engine)
    image = reviews.queue(tenant="acme")[0].image
    assert not reviews.decide(operator(), image.id, "reject", None).released
    with pytest.raises(Conflict):
        reviews.decide(operator(), image.id, "approve")
    with pytest.raises(NotFound):
        reviews.decide(operator(), "img_missing", "approve")
    assert [r.action for r in held.audit.list(action="review.")] == ["review.reject"]


def test_operators_decide_only_for_their_tenant_and_users_not_at_all(held):
    reviews = ReviewStore(held.store.engine)
    globex = reviews.queue(tenant="globex")[0].image
    with pytest.raises(NotFound):
        reviews.decide(operator("acme"), globex.id, "approve")
    with pytest.raises(Forbidden):
        reviews.decide(Principal(actor="u", role=Role.user, tenant="globex"), globex.id, "approve")
    assert reviews.decide(Principal.cli(), globex.id, "approve").released  # admins review every tenant


# --- the review API ------------------------------------------------------------------------------------------------


def bearer(svc: Services, role: Role, tenant: str = "acme") -> dict[str, str]:
    _, token = svc.keys.create(Principal.cli(), name=f"{role.value}-{tenant}", role=role, tenant=tenant)
    return {"Authorization": f"Bearer {token}"}


def test_operator_lists_looks_and_approves_over_http(held):
    op = bearer(held, Role.operator)
    with TestClient(create_app(held, workers=0)) as api:
        page = api.get("/v1/review", headers=op)
        assert page.status_code == 200, page.text
        items = page.json()["items"]
        assert [i["tenant"] for i in items] == ["acme", "acme"]  # an operator sees its own tenant only
        assert items[0]["prompt"] == "a blue sphere" and items[0]["review_state"] == "pending"
        assert page.json()["next_after"] is None
        assert api.get("/v1/review", params={"limit": 1}, headers=op).json()["next_after"] == items[0]["image_id"]

        png = api.get(f"/v1/review/images/{items[0]['image_id']}", headers=op)
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(png.content)).size == (64, 64)

        decided = api.post(f"/v1/review/images/{items[0]['image_id']}", json={"decision": "approve"}, headers=op)
        assert decided.status_code == 200, decided.text
        assert decided.json()["review_state"] == "approved" and decided.json()["reviewed_by"]
        again = api.post(f"/v1/review/images/{items[0]['image_id']}", json={"decision": "reject"}, headers=op)
        assert again.status_code == 409 and again.json()["error"]["code"] == "conflict"
        assert len(api.get("/v1/review", headers=op).json()["items"]) == 1
        decided_too = api.get("/v1/review", params={"state": "any"}, headers=op).json()["items"]
        assert [i["review_state"] for i in decided_too] == ["approved", "pending"]


def test_users_get_403_and_other_tenants_images_stay_hidden(held):
    user, op = bearer(held, Role.user), bearer(held, Role.operator)
    admin = bearer(held, Role.admin, tenant="default")
    globex = ReviewStore(held.store.engine).queue(tenant="globex")[0].image.id
    with TestClient(create_app(held, workers=0)) as api:
        assert api.get("/v1/review", headers=user).status_code == 403
        assert api.get(f"/v1/review/images/{globex}", headers=user).status_code == 403
        assert api.post(f"/v1/review/images/{globex}", json={"decision": "approve"}, headers=user).status_code == 403
        assert api.get(f"/v1/review/images/{globex}", headers=op).status_code == 404
        assert api.post(f"/v1/review/images/{globex}", json={"decision": "approve"}, headers=op).status_code == 404
        assert api.get("/v1/review", params={"tenant": "globex"}, headers=op).status_code == 403
        assert api.get("/v1/review", headers=user | {"Authorization": "Bearer nope"}).status_code == 401
        everyone = api.get("/v1/review", headers=admin).json()["items"]
        assert sorted({i["tenant"] for i in everyone}) == ["acme", "globex"]
        bad = api.post(f"/v1/review/images/{globex}", json={"decision": "maybe"}, headers=admin)
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "decision"


def test_openapi_describes_the_review_routes(held):
    with TestClient(create_app(held, workers=0)) as api:
        schema = api.get("/openapi.json").json()
    assert {"/v1/review", "/v1/review/images/{image_id}"} <= set(schema["paths"])
    assert {"ReviewView", "ReviewPage", "ReviewDecision"} <= set(schema["components"]["schemas"])


def test_an_admins_reads_of_other_tenants_images_are_audited_and_an_operators_own_are_not(held):
    admin, op = bearer(held, Role.admin, tenant="default"), bearer(held, Role.operator)
    globex = ReviewStore(held.store.engine).queue(tenant="globex")[0].image.id
    acme = [i.image.id for i in ReviewStore(held.store.engine).queue(tenant="acme")]
    with TestClient(create_app(held, workers=0)) as api:
        assert len(api.get("/v1/review", headers=op).json()["items"]) == 2
        assert api.get(f"/v1/review/images/{acme[0]}", headers=op).status_code == 200
        assert held.audit.list(action="review.read") == []  # an operator reading its own tenant: nothing to record

        assert len(api.get("/v1/review", headers=admin).json()["items"]) == 3
        assert api.get(f"/v1/review/images/{globex}", headers=admin).status_code == 200
    records = held.audit.list(action="review.read")
    listed = {r.tenant: r.details for r in records if r.details["via"] == "list"}
    assert listed == {"acme": {"via": "list", "images": acme}, "globex": {"via": "list", "images": [globex]}}
    [looked] = [r for r in records if r.details["via"] == "image"]
    assert (looked.tenant, looked.target, looked.role) == ("globex", globex, "admin")
    assert all("prompt" not in repr(r.details) for r in records)
