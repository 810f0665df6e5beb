"""The A1111-compatible API in-process (FastAPI TestClient) on a real SQLite store, tiny real models, one worker."""

from __future__ import annotations

import base64
import io
import json
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from darkroom.api import a1111
from darkroom.api.app import create_app
from darkroom.config import Limits, Settings, WebhookSettings
from darkroom.jobs.store import JobStore
from darkroom.schemas import GenerationRequest
from darkroom.service import Services

SMALL = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 2}

# Kept pixels stay within the invisible watermark's change (luma, a few levels), which marks every output.
WATERMARK_DELTA = 4


@pytest.fixture
def settings(tmp_path, models_dir) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        models_dir=models_dir,
        poll_seconds=0.05,
        progress_interval=0,
        limits=Limits(max_upload_bytes=400_000),
        webhooks=WebhookSettings(enabled=False),
    )


@pytest.fixture
def services(settings):
    svc = Services.open(settings)
    yield svc
    svc.close()


@pytest.fixture
def api(services):
    with TestClient(create_app(services, workers=1)) as client:
        yield client


@pytest.fixture
def api_no_worker(services):
    with TestClient(create_app(services, workers=0)) as client:
        yield client


def b64png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(int)


def ramp() -> Image.Image:
    line = np.linspace(0, 255, 64, dtype=np.uint8)
    return Image.fromarray(np.stack([np.tile(line, (64, 1))] * 3, axis=-1))


def centre_mask(value: int = 255) -> Image.Image:
    m = np.zeros((64, 64), dtype=np.uint8)
    m[16:48, 16:48] = value
    return Image.fromarray(m, mode="L")


# --- txt2img ----------------------------------------------------------------------------------------------------------


def test_txt2img_answers_like_a1111(api):
    response = api.post("/sdapi/v1/txt2img", json={**SMALL, "seed": 42, "batch_size": 2, "sampler_name": "Euler a"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"images", "parameters", "info"}
    assert len(body["images"]) == 2
    assert decode(body["images"][0]).shape == (64, 64, 3)
    assert body["parameters"]["seed"] == 42 and body["parameters"]["sampler_index"] == "Euler"
    assert body["parameters"]["cfg_scale"] == 7.0 and body["parameters"]["n_iter"] == 1  # A1111's defaults
    info = json.loads(body["info"])
    assert info["all_seeds"] == [42, 43] and info["seed"] == 42
    assert info["sampler_name"] == "Euler a" and info["steps"] == 2
    assert info["infotexts"][0].startswith("a lighthouse at dusk\n") and "Seed: 42" in info["infotexts"][0]
    job = api.get(f"/v1/jobs/{info['job_id']}").json()
    assert job["state"] == "succeeded" and len(job["images"]) == 2


def test_txt2img_same_seed_same_pixels_and_scheduler_field(api):
    body = {**SMALL, "seed": 7, "sampler_name": "DPM++ 2M", "scheduler": "Karras"}
    first = api.post("/sdapi/v1/txt2img", json=body).json()
    again = api.post("/sdapi/v1/txt2img", json={**body, "sampler_name": "DPM++ 2M Karras", "scheduler": None}).json()
    assert json.loads(first["info"])["sampler_name"] == "DPM++ 2M Karras"
    assert np.array_equal(decode(first["images"][0]), decode(again["images"][0]))


def test_send_images_false_returns_no_images(api):
    body = api.post("/sdapi/v1/txt2img", json={**SMALL, "send_images": False}).json()
    assert body["images"] == [] and json.loads(body["info"])["state"] == "succeeded"


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"width": 65}, "width"),
        ({"steps": 1000}, "steps"),
        ({"cfg_scale": 100}, "cfg_scale"),
        ({"sampler_name": "Nonexistent"}, "sampler_name"),
        ({"scheduler": "exponential"}, "scheduler"),
        ({"sampler_name": "DDIM", "scheduler": "karras"}, "scheduler"),
        ({"prompt": ""}, "prompt"),
        ({"seed": 2**40}, "seed"),
        ({"batch_size": 99}, "batch_size"),
        ({"override_settings": {"sd_model_checkpoint": "nope"}}, "override_settings.sd_model_checkpoint"),
    ],
)
def test_bad_requests_are_422_naming_the_a1111_field(api_no_worker, patch, field):
    response = api_no_worker.post("/sdapi/v1/txt2img", json={**SMALL, **patch})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field


def test_unknown_fields_are_ignored_like_a1111(api):
    response = api.post("/sdapi/v1/txt2img", json={**SMALL, "enable_hr": True, "some_extension_field": 3})
    assert response.status_code == 200, response.text


# --- img2img and inpainting -------------------------------------------------------------------------------------------


def test_img2img_uses_the_source_and_denoising_strength(api):
    src = ramp()
    body = {**SMALL, "init_images": [b64png(src)], "denoising_strength": 0.5, "steps": 4, "seed": 3}
    response = api.post("/sdapi/v1/img2img", json=body)
    assert response.status_code == 200, response.text
    out = response.json()
    info = json.loads(out["info"])
    assert info["denoising_strength"] == 0.5
    assert out["parameters"]["init_images"] is None  # include_init_images is False
    job = api.get(f"/v1/jobs/{info['job_id']}").json()
    assert job["request"]["init_image"].startswith("blob:") and job["request"]["mask_image"] is None


def test_inpainting_keeps_pixels_outside_the_mask(api):
    src = ramp()
    body = {
        **SMALL,
        "init_images": [b64png(src)],
        "mask": b64png(centre_mask()),
        "mask_blur": 0,
        "inpainting_fill": 1,
        "inpaint_full_res": False,
        "denoising_strength": 1.0,
        "seed": 5,
    }
    response = api.post("/sdapi/v1/img2img", json=body)
    assert response.status_code == 200, response.text
    out = decode(response.json()["images"][0])
    keep = np.asarray(centre_mask()) == 0
    source = np.asarray(src).astype(int)
    assert np.abs(out[keep] - source[keep]).max() <= WATERMARK_DELTA
    assert np.abs(out[~keep] - source[~keep]).mean() > 1
    job_id = json.loads(response.json()["info"])["job_id"]
    request = api.get(f"/v1/jobs/{job_id}").json()["request"]
    assert request["mask_image"].startswith("blob:") and request["mask_crop_padding"] is None


def test_inverted_mask_keeps_the_centre(api):
    src = ramp()
    body = {
        **SMALL,
        "init_images": [b64png(src)],
        "mask": b64png(centre_mask()),
        "mask_blur": 0,
        "inpainting_fill": 1,
        "inpainting_mask_invert": 1,
        "inpaint_full_res": False,
    }
    out = decode(api.post("/sdapi/v1/img2img", json=body).json()["images"][0])
    centre = np.asarray(centre_mask()) == 255
    assert np.abs(out[centre] - np.asarray(src).astype(int)[centre]).max() <= WATERMARK_DELTA


def test_inpaint_full_res_is_a_crop_around_the_mask(api):
    body = {**SMALL, "init_images": [b64png(ramp())], "mask": b64png(centre_mask()), "inpaint_full_res_padding": 8}
    response = api.post("/sdapi/v1/img2img", json=body)
    assert response.status_code == 200, response.text
    job_id = json.loads(response.json()["info"])["job_id"]
    assert api.get(f"/v1/jobs/{job_id}").json()["request"]["mask_crop_padding"] == 8


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"init_images": []}, "init_images"),
        ({"init_images": ["not base64!"]}, "init_images"),
        ({"mask": "not base64!"}, "mask"),
        ({"mask": "BLACK"}, "mask"),
        ({"denoising_strength": 0}, "denoising_strength"),
    ],
)
def test_img2img_errors_name_the_field(api_no_worker, patch, field):
    black = b64png(Image.new("L", (64, 64), 0))
    body = {**SMALL, "init_images": [b64png(ramp())], **patch}
    if body.get("mask") == "BLACK":
        body["mask"] = black
    response = api_no_worker.post("/sdapi/v1/img2img", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field


@pytest.mark.parametrize("mode", [0, 2, 3])
def test_inpainting_fill_replaces_the_masked_area_before_denoising(mode):
    src = Image.new("RGB", (64, 64), (200, 20, 20))
    src.paste((20, 200, 20), (16, 16, 48, 48))  # a green square the mask covers
    buf = io.BytesIO()
    src.save(buf, format="PNG")
    mask = io.BytesIO()
    centre_mask().save(mask, format="PNG")
    filled = np.asarray(Image.open(io.BytesIO(a1111.fill_masked(buf.getvalue(), mask.getvalue(), mode))))
    inside, outside = filled[20:44, 20:44].astype(int), filled[:8, :8].astype(int)
    assert (outside == (200, 20, 20)).all()
    assert not (inside == (20, 200, 20)).all(axis=-1).any(), "no original pixel survives in the hole"
    if mode == 0:
        assert inside[..., 0].mean() > 150, "colour flows in from around the hole"
    if mode == 3:
        assert (inside == 127).all()


# --- options and models -------------------------------------------------------------------------------------------


def test_options_choose_the_default_model_durably(api, services, settings):
    models = api.get("/sdapi/v1/sd-models").json()
    assert {m["model_name"] for m in models} == {"tiny-diffusers", "tiny-single"}
    single = next(m for m in models if m["model_name"] == "tiny-single")
    assert single["title"] == f"tiny-single [{single['sha256'][:10]}]" and single["hash"] == single["sha256"][:10]
    assert api.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("tiny-diffusers [")

    chosen = {"sd_model_checkpoint": single["title"], "samples_format": "png"}
    assert api.post("/sdapi/v1/options", json=chosen).status_code == 200
    options = api.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == single["title"] and options["sd_checkpoint_hash"] == single["sha256"]
    info = json.loads(api.post("/sdapi/v1/txt2img", json=SMALL).json()["info"])
    assert info["sd_model_name"] == "tiny-single" and info["sd_model_hash"] == single["hash"]

    override = {**SMALL, "override_settings": {"sd_model_checkpoint": "tiny-diffusers"}}
    assert json.loads(api.post("/sdapi/v1/txt2img", json=override).json()["info"])["sd_model_name"] == "tiny-diffusers"

    reopened = Services.open(settings)  # another process on the same database sees the choice
    try:
        with TestClient(create_app(reopened)) as other:
            assert other.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == single["title"]
    finally:
        reopened.close()


def test_options_refuse_an_unknown_checkpoint(api_no_worker):
    response = api_no_worker.post("/sdapi/v1/options", json={"sd_model_checkpoint": "missing.safetensors [0000]"})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "sd_model_checkpoint"


def test_lists(api_no_worker):
    samplers = api_no_worker.get("/sdapi/v1/samplers").json()
    euler_a = next(s for s in samplers if s["name"] == "Euler a")
    assert euler_a == {
        "name": "Euler a",
        "aliases": ["k_euler_a", "k_euler_ancestral", "euler_ancestral"],
        "options": {},
    }
    assert [s["name"] for s in api_no_worker.get("/sdapi/v1/schedulers").json()] == ["automatic", "uniform", "karras"]
    assert api_no_worker.get("/sdapi/v1/loras").json() == []
    assert api_no_worker.get("/sdapi/v1/sd-vae").json() == []
    assert api_no_worker.post("/sdapi/v1/refresh-checkpoints").status_code == 200


def test_png_info_reads_the_parameters_back(api):
    image = api.post("/sdapi/v1/txt2img", json={**SMALL, "seed": 11}).json()["images"][0]
    info = api.post("/sdapi/v1/png-info", json={"image": image}).json()
    assert "Seed: 11" in info["info"] and info["items"]["darkroom"]["seed"] == 11


# --- progress, interrupt, skip ------------------------------------------------------------------------------------


def running_job(store: JobStore, steps: int = 10, preview: bool = False) -> str:
    req = GenerationRequest(prompt="p", width=64, height=64, steps=steps, seed=1, model="tiny-diffusers")
    req = req.model_copy(update={"preview": preview})
    job, _ = store.create(req)
    claimed = store.claim("w1", 30)
    assert claimed is not None and claimed.id == job.id
    return job.id


def test_progress_idle_then_during_a_run_then_interrupt(api_no_worker, services):
    idle = api_no_worker.get("/sdapi/v1/progress").json()
    assert idle["state"]["job"] == "" and idle["progress"] == 0 and idle["current_image"] is None

    job_id = running_job(services.store)
    services.store.progress(job_id, "w1", 4, 10, 30)
    now = api_no_worker.get("/sdapi/v1/progress").json()
    assert now["state"]["job"] == job_id and now["progress"] == 0.4
    assert now["state"]["sampling_step"] == 4 and now["state"]["sampling_steps"] == 10
    assert now["state"]["job_count"] == 1 and now["eta_relative"] >= 0

    assert api_no_worker.post("/sdapi/v1/interrupt").json() == {}
    assert services.store.get(job_id).cancel_requested
    assert api_no_worker.get("/sdapi/v1/progress").json()["state"]["interrupted"] is True


def test_skip_stops_the_current_job_and_is_a_no_op_when_idle(api_no_worker, services):
    assert api_no_worker.post("/sdapi/v1/skip").json() == {}
    job_id = running_job(services.store)
    api_no_worker.post("/sdapi/v1/skip")
    assert services.store.get(job_id).cancel_requested


def test_progress_shows_a_preview_the_worker_recorded(api_no_worker, services):
    job_id = running_job(services.store, preview=True)
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(jpeg, format="JPEG")
    recorded = base64.b64encode(jpeg.getvalue()).decode()
    services.store.progress(job_id, "w1", 1, 10, 30, preview=f"data:image/jpeg;base64,{recorded}")  # as a worker does
    shown = api_no_worker.get("/sdapi/v1/progress").json()["current_image"]
    image = Image.open(io.BytesIO(base64.b64decode(shown)))
    assert image.format == "PNG" and image.size == (8, 8)  # A1111 documents a PNG
    assert api_no_worker.get("/sdapi/v1/progress?skip_current_image=true").json()["current_image"] is None


def test_progress_shows_no_preview_for_a_job_that_did_not_ask(api_no_worker, services):
    job_id = running_job(services.store)
    recorded = b64png(Image.new("RGB", (8, 8)))
    services.store.progress(job_id, "w1", 1, 10, 30, preview=f"data:image/png;base64,{recorded}")
    assert api_no_worker.get("/sdapi/v1/progress").json()["current_image"] is None


def test_a1111_jobs_ask_for_previews_as_the_live_preview_options_say(api_no_worker, services):
    assert a1111.live_previews(services)  # A1111's defaults
    api_no_worker.post("/sdapi/v1/options", json={"show_progress_every_n_steps": -1})
    assert not a1111.live_previews(services)
    api_no_worker.post("/sdapi/v1/options", json={"show_progress_every_n_steps": 5, "live_previews_enable": False})
    assert not a1111.live_previews(services)


# --- limits before work ---------------------------------------------------------------------------------------------


def stored_blobs(services) -> list:
    return [p for p in services.blobs.root.rglob("*") if p.is_file()]


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"width": 0}, "width"),
        ({"width": -64}, "width"),
        ({"height": -64}, "height"),
        ({"width": 20000, "height": 20000}, "width"),
        ({"width": 8192, "height": 8192}, "width"),
        ({"width": 2048, "height": 2048, "steps": 10**9}, "steps"),
        ({"batch_size": 1000}, "batch_size"),
        ({"n_iter": 10**6}, "batch_size"),
        ({"prompt": "x" * 100_000}, "prompt"),
        ({"mask_blur": 10**6}, "mask_blur"),
        ({"mask_blur_x": -1}, "mask_blur_x"),
    ],
)
def test_inpainting_limits_are_checked_before_the_mask_is_decoded(api_no_worker, services, patch, field):
    """8192² with a 64² mask was 64 s of CPU resizing the mask before the size limit said no; width 0 or -64 and
    20000² were 500s. Now each is a 422 naming the field, at once, with nothing stored."""
    body = {**SMALL, "init_images": [b64png(ramp())], "mask": b64png(centre_mask()), **patch}
    started = time.monotonic()
    response = api_no_worker.post("/sdapi/v1/img2img", json=body)
    assert time.monotonic() - started < 2
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field
    assert stored_blobs(services) == [] and services.store.list() == []


def test_a_source_over_the_upload_pixel_limit_is_refused_before_the_mask_is_made(api_no_worker, services):
    wide = b64png(Image.new("RGB", (1, 100_000)))  # 100,000 px, within bytes; over a 4096-pixel limit below
    services.settings.limits.max_upload_pixels = 4096
    body = {**SMALL, "init_images": [wide], "mask": b64png(centre_mask())}
    response = api_no_worker.post("/sdapi/v1/img2img", json=body)
    assert response.status_code == 422 and response.json()["error"]["field"] == "init_images"
    assert stored_blobs(services) == []


# --- progress is the caller's tenant's --------------------------------------------------------------------------------


def test_progress_counts_only_the_callers_tenants_jobs(api_no_worker, services):
    req = GenerationRequest(prompt="p", width=64, height=64, steps=2, seed=1, model="tiny-diffusers")
    for _ in range(3):
        services.store.create(req, tenant="other-tenant")
    assert api_no_worker.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0
    services.store.create(req)
    assert api_no_worker.get("/sdapi/v1/progress").json()["state"]["job_count"] == 1
