"""Idempotency-Key through the real API on SQLite and PostgreSQL: a key belongs to the API key that used it, a replay
is checked for visibility, and a key the database could choke on is the client's 4xx, naming the header."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from darkroom.api.app import create_app
from darkroom.auth.principal import Principal, Role
from darkroom.config import Settings
from darkroom.service import Services

BASE = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 2, "seed": 7}


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def services(db_url, tmp_path, models_dir):
    svc = Services.open(Settings(data_dir=tmp_path / "data", models_dir=models_dir, database_url=db_url))
    yield svc
    svc.close()


@pytest.fixture
def api(services):
    with TestClient(create_app(services, workers=0)) as client:
        yield client


def user(svc: Services, name: str) -> dict[str, str]:
    _, token = svc.keys.create(Principal.cli(), name=name, role=Role.user, tenant="acme")
    return {"Authorization": f"Bearer {token}"}


def test_another_user_of_the_tenant_never_gets_my_job_back(api, services):
    alice, bob = user(services, "alice"), user(services, "bob")
    first = api.post("/v1/jobs", json=BASE, headers={**alice, "Idempotency-Key": "order-1"})
    again = api.post("/v1/jobs", json=BASE, headers={**alice, "Idempotency-Key": "order-1"})
    assert first.status_code == 202 and again.status_code == 200 and again.json()["id"] == first.json()["id"]
    theirs = api.post("/v1/jobs", json=BASE, headers={**bob, "Idempotency-Key": "order-1"})
    assert theirs.status_code == 202, theirs.text  # a job of bob's own, not a replay of alice's
    assert theirs.json()["id"] != first.json()["id"]
    assert api.get(f"/v1/jobs/{first.json()['id']}", headers=bob).status_code == 404
    other_body = api.post("/v1/jobs", json={**BASE, "seed": 8}, headers={**bob, "Idempotency-Key": "order-1"})
    assert other_body.status_code == 409 and other_body.json()["error"]["field"] == "Idempotency-Key"


@pytest.mark.parametrize("bad", ["k" * 201, "tab\there", "bell\x07"])
def test_a_key_the_database_could_refuse_is_a_4xx_naming_the_header(api, bad):
    response = api.post("/v1/jobs", json=BASE, headers={"Idempotency-Key": bad})
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["error"]["field"] == "Idempotency-Key"


def test_a_nul_in_the_key_never_reaches_the_database(services):
    """HTTP clients refuse to send a NUL in a header, so this drives the same check the route runs."""
    from darkroom.api.v1 import check_idempotency_key
    from darkroom.errors import InvalidRequest
    from darkroom.schemas import GenerationRequest

    with pytest.raises(InvalidRequest) as err:
        check_idempotency_key("a\x00b")
    assert err.value.field == "Idempotency-Key"
    job, created = services.store.create(GenerationRequest(prompt="a cat", seed=1), idempotency_key="a\x00b")
    assert created and "\x00" not in job.idempotency_key  # the store keeps a digest, never the raw bytes
