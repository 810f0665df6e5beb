"""The result cache through the real app (TestClient, real SQLite store) and a real worker with the tiny model: an
identical seeded request is answered from the first job's images while no worker runs; random seeds, other
parameters, other tenants and tenants without the policy are never answered from it."""

from __future__ import annotations

import shutil

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from darkroom.api.app import create_app
from darkroom.auth.principal import Principal, Role
from darkroom.auth.tenants import TenantPolicy
from darkroom.config import Settings
from darkroom.service import Services
from darkroom.worker.loop import Worker

CLI = Principal.cli()
SEEDED = {"prompt": "a red cube", "width": 64, "height": 64, "steps": 1, "seed": 42, "model": "tiny-single"}
HITS = "darkroom_result_cache_hits_total"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, models_dir):
    root = tmp_path_factory.mktemp("cache-models")
    shutil.copytree(models_dir, root, dirs_exist_ok=True)  # the single file brings its config sidecar
    svc = Services.open(Settings(data_dir=tmp_path_factory.mktemp("cache-data"), models_dir=root))
    for tenant, cached in (("a", True), ("b", True), ("plain", False)):
        svc.tenants.put(tenant, TenantPolicy(result_cache=cached), CLI)
    headers = {}
    for tenant in ("a", "b", "plain"):
        _, token = svc.keys.create(CLI, name=tenant, role=Role.user, tenant=tenant)
        headers[tenant] = {"Authorization": f"Bearer {token}"}
    with TestClient(create_app(svc, workers=0)) as client:  # no worker runs unless a test runs one
        yield client, svc, headers
    svc.close()


def run_queued(svc: Services) -> None:
    """A real worker, in this thread, until the queue is empty; then it is gone again."""
    worker = Worker(svc.settings, svc.store, svc.blobs, svc.make_engine, "w-cache", registry=svc.registry)
    try:
        while worker.run_once():
            pass
    finally:
        worker.engine.close()


def test_an_identical_seeded_request_is_answered_without_the_worker_and_never_across_tenants(setup):
    api, svc, headers = setup
    first = api.post("/v1/jobs", json=SEEDED, headers=headers["a"]).json()
    assert first["state"] == "queued" and first["cache_hit"] is False
    run_queued(svc)
    done = api.get(f"/v1/jobs/{first['id']}", headers=headers["a"]).json()
    assert done["state"] == "succeeded", done["error"]
    hits = REGISTRY.get_sample_value(HITS) or 0.0

    again = api.post("/v1/jobs", json={**SEEDED, "priority": "high"}, headers=headers["a"])  # delivery differs only
    assert again.status_code == 202, again.text
    cached = again.json()
    assert cached["state"] == "succeeded" and cached["cache_hit"] is True and cached["id"] != first["id"]
    assert cached["provenance"]["cached_from"] == first["id"]
    assert [i["sha256"] for i in cached["images"]] == [i["sha256"] for i in done["images"]]
    image = api.get(cached["images"][0]["url"], headers=headers["a"])
    assert image.status_code == 200 and image.content == api.get(done["images"][0]["url"], headers=headers["a"]).content
    assert REGISTRY.get_sample_value(HITS) == hits + 1

    # Never for another tenant, a tenant without the policy, a random seed, or a request that differs in pixels.
    for who, body in (
        ("b", SEEDED),
        ("plain", SEEDED),
        ("a", {**SEEDED, "seed": -1}),
        ("a", {k: v for k, v in SEEDED.items() if k != "seed"}),
        ("a", {**SEEDED, "steps": 2}),
    ):
        response = api.post("/v1/jobs", json=body, headers=headers[who]).json()
        assert response["state"] == "queued" and response["cache_hit"] is False, (who, body)
    assert REGISTRY.get_sample_value(HITS) == hits + 1


def test_a_hit_on_postgresql_in_the_submit_transaction(pg_url, tmp_path, models_dir):
    """The lookup and the copied job on PostgreSQL; the first job is completed by the store as a worker would."""
    from darkroom.jobs.store import NewImage

    svc = Services.open(Settings(data_dir=tmp_path / "data", models_dir=models_dir, database_url=pg_url))
    svc.tenants.put("default", TenantPolicy(result_cache=True), CLI)
    try:
        with TestClient(create_app(svc, workers=0)) as api:
            first = api.post("/v1/jobs", json=SEEDED).json()
            job = svc.store.claim("w", 30)
            assert job is not None and job.id == first["id"]
            svc.store.start(job.id, "w")
            image = NewImage(0, 42, 64, 64, "ab" * 32, "k", "image/png", 1)
            assert svc.store.complete(job.id, "w", [image], {"timings": {}})
            hit = api.post("/v1/jobs", json=SEEDED).json()
            assert hit["state"] == "succeeded" and hit["cache_hit"] is True
            assert [i["sha256"] for i in hit["images"]] == ["ab" * 32]
    finally:
        svc.close()
