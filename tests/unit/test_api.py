"""The v1 API in-process (FastAPI TestClient) on a real SQLite store and the tiny real models."""

from __future__ import annotations

import base64
import io
import subprocess

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from darkroom.api.app import create_app
from darkroom.config import Limits, Settings
from darkroom.service import Services


@pytest.fixture
def services(tmp_path, models_dir):
    settings = Settings(
        data_dir=tmp_path / "data",
        models_dir=models_dir,
        poll_seconds=0.05,
        limits=Limits(max_queue_depth=20, max_upload_bytes=200_000),
    )
    svc = Services.open(settings)
    yield svc
    svc.close()


@pytest.fixture
def api(services):
    with TestClient(create_app(services, workers=0)) as client:
        yield client


@pytest.fixture
def api_with_worker(services):
    with TestClient(create_app(services, workers=1)) as client:
        yield client


def png_b64(size=(64, 64), color=(200, 30, 30), fmt="PNG") -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


BASE = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 2}


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"width": 65}, "width"),
        ({"height": 4096}, "height"),
        ({"steps": 1000}, "steps"),
        ({"steps": 0}, "steps"),
        ({"n": 99}, "n"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x" * 5000}, "prompt"),
        ({"guidance_scale": -1}, "guidance_scale"),
        ({"seed": 2**40}, "seed"),
        ({"model": "no-such-model"}, "model"),
        ({"sampler": "Nonexistent"}, "sampler"),
        ({"priority": "urgent"}, "priority"),
        ({"strength": 0}, "strength"),
        ({"init_image": "not base64!"}, "init_image"),
        ({"init_image": base64.b64encode(b"GIF89a not really").decode()}, "init_image"),
        ({"unknown_field": 1}, "unknown_field"),
    ],
)
def test_every_limit_is_a_422_naming_the_field(api, patch, field):
    response = api.post("/v1/jobs", json={**BASE, **patch})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field


def test_oversized_upload_is_413(api):
    big = base64.b64encode(b"\0" * 300_000).decode()
    response = api.post("/v1/jobs", json={**BASE, "init_image": big})
    assert response.status_code == 413
    assert response.json()["error"]["field"] == "init_image"


def test_upload_pixel_bomb_is_refused_before_decoding(api, services):
    services.settings.limits.max_upload_pixels = 100 * 100
    response = api.post("/v1/jobs", json={**BASE, "init_image": png_b64(size=(200, 200))})
    assert response.status_code == 422
    assert "pixels" in response.json()["error"]["message"]


def test_queue_depth_limit_is_429_with_retry_after(api):
    for _ in range(20):
        assert api.post("/v1/jobs", json=BASE).status_code == 202
    response = api.post("/v1/jobs", json=BASE)
    assert response.status_code == 429
    assert int(response.headers["Retry-After"]) > 0
    assert response.json()["error"]["field"] == "queue"


def test_submit_resolves_model_and_seed_and_reports_queue_position(api):
    first = api.post("/v1/jobs", json=BASE).json()
    second = api.post("/v1/jobs", json={**BASE, "seed": -1}).json()
    assert first["state"] == "queued" and first["queue_position"] == 1 and second["queue_position"] == 2
    assert isinstance(first["request"]["seed"], int) and first["request"]["model"]
    assert api.get(f"/v1/jobs/{first['id']}").json()["id"] == first["id"]
    assert api.get("/v1/jobs/job_missing").status_code == 404


def test_idempotency_key_returns_first_job_and_conflicts_on_other_body(api):
    headers = {"Idempotency-Key": "abc"}
    first = api.post("/v1/jobs", json=BASE, headers=headers)
    again = api.post("/v1/jobs", json=BASE, headers=headers)
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    other = api.post("/v1/jobs", json={**BASE, "prompt": "other"}, headers=headers)
    assert other.status_code == 409 and other.json()["error"]["field"] == "Idempotency-Key"


def test_cancel_queued_job_and_conflict_after(api):
    job = api.post("/v1/jobs", json=BASE).json()
    assert api.delete(f"/v1/jobs/{job['id']}").json()["state"] == "cancelled"
    assert api.delete(f"/v1/jobs/{job['id']}").status_code == 409


def test_models_and_samplers_and_health(api):
    listing = api.get("/v1/models").json()
    assert listing["object"] == "list"  # OpenAI's envelope; the items keep darkroom's fields
    models = listing["data"]
    assert all(m["object"] == "model" and m["owned_by"] == "darkroom" for m in models)
    assert {m["format"] for m in models} == {"diffusers", "single_file"}
    assert all(len(m["sha256"]) == 64 and "path" not in m for m in models)
    samplers = api.get("/v1/samplers").json()
    assert "Euler a" in [s["name"] for s in samplers]
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "models": "ok", "workers": "ok", "storage": "ok"}
    assert "darkroom_jobs" in api.get("/metrics").text


def test_readyz_goes_red_when_the_blob_disk_is_nearly_full(tmp_path, models_dir):
    """A real 8 MiB tmpfs as the data dir: under the free-space floor, so an orchestrator stops routing work here
    before writes fail."""
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        settings = Settings(data_dir=disk / "data", models_dir=models_dir, database_url=f"sqlite:///{tmp_path}/db")
        svc = Services.open(settings)
        try:
            with TestClient(create_app(svc, workers=0)) as client:
                ready = client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["checks"]["storage"].startswith("error: disk nearly full")
        finally:
            svc.close()
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_generate_waits_and_returns_images_with_provenance(api_with_worker):
    response = api_with_worker.post("/v1/generate", json={**BASE, "seed": 7, "n": 2, "sampler": "DPM++ 2M Karras"})
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["state"] == "succeeded"
    assert [i["seed"] for i in job["images"]] == [7, 8]
    png = api_with_worker.get(job["images"][0]["url"])
    assert png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == (64, 64)
    prov = job["provenance"]
    assert prov["model"]["sha256"] and prov["scheduler"] and prov["versions"]["diffusers"]


def test_generate_with_accept_png_answers_with_the_picture_itself(api_with_worker):
    """One round trip: the same bytes `GET /v1/images/{id}` serves, with the job and seed in headers."""
    png = {"Accept": "image/png"}
    response = api_with_worker.post("/v1/generate", json={**BASE, "seed": 11}, headers=png)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-seed"] == "11" and response.headers["location"].endswith(response.headers["x-job-id"])
    job = api_with_worker.get(response.headers["location"]).json()
    assert api_with_worker.get(job["images"][0]["url"]).content == response.content
    refused = api_with_worker.post("/v1/generate", json={**BASE, "n": 2}, headers=png)  # before any work
    assert refused.status_code == 406 and refused.json()["error"]["field"] == "Accept"
    jobs_before = len(api_with_worker.get("/v1/jobs").json())
    assert api_with_worker.post("/v1/generate", json={**BASE, "seed": 11}, headers={"Accept": "*/*"}).json()["id"]
    assert len(api_with_worker.get("/v1/jobs").json()) == jobs_before + 1  # the refused one made no job


def test_img2img_over_api(api_with_worker):
    body = {**BASE, "seed": 3, "init_image": png_b64(size=(100, 80)), "strength": 0.5, "steps": 4}
    job = api_with_worker.post("/v1/generate", json=body).json()
    assert job["state"] == "succeeded", job
    assert job["request"]["init_image"].startswith("blob:")
    assert (job["images"][0]["width"], job["images"][0]["height"]) == (64, 64)
