"""Upscalers and upscale jobs: Lanczos, Nearest and a tiny ESRGAN model (random weights, loaded by spandrel) through
A1111's extras endpoints and `POST /v1/upscale`, as real jobs on the queue with a real worker."""

from __future__ import annotations

import base64
import io
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from darkroom.api.app import create_app
from darkroom.config import Limits, Settings, WebhookSettings
from darkroom.engines import upscalers
from darkroom.errors import InvalidRequest
from darkroom.models.registry import ModelRegistry
from darkroom.service import Services
from tests.support.tiny_models import make_esrgan_upscaler

ESRGAN = "tiny-esrgan-2x"
LIMITS = Limits(max_width=400, max_height=400, max_pixels=400 * 300)


@pytest.fixture(scope="module")
def upscaler_models_dir(tmp_path_factory, tiny_diffusers_model) -> Path:
    root = tmp_path_factory.mktemp("upscaler-models")
    shutil.copytree(tiny_diffusers_model, root / tiny_diffusers_model.name)
    make_esrgan_upscaler(root / "upscalers", ESRGAN, scale=2)
    (root / "upscalers" / "old-model.pth").write_bytes(b"pickled: never listed")
    from safetensors.numpy import save_file

    not_an_upscaler = root / "upscalers" / "not-an-upscaler.safetensors"
    save_file({"foo.weight": np.ones((3, 3), dtype=np.float32)}, str(not_an_upscaler))
    return root


@pytest.fixture(scope="module")
def registry(upscaler_models_dir, tmp_path_factory) -> ModelRegistry:
    return ModelRegistry(upscaler_models_dir, tmp_path_factory.mktemp("hashes") / "model-hashes.json")


@pytest.fixture(scope="module")
def api(tmp_path_factory, upscaler_models_dir):
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("upscaler-data"),
        models_dir=upscaler_models_dir,
        poll_seconds=0.05,
        progress_interval=0,
        limits=LIMITS,
        webhooks=WebhookSettings(enabled=False),
    )
    svc = Services.open(settings)
    with TestClient(create_app(svc, workers=1)) as client:
        yield client
    svc.close()


def source(width: int = 37, height: int = 23) -> Image.Image:
    """A colourful ramp of an odd size: upscale jobs keep sizes that are no multiple of 8."""
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    pixels = np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], axis=2).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def b64png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def job_count(api: TestClient) -> int:
    return len(api.get("/v1/jobs").json())


# --- names and the engine part ------------------------------------------------------------------------------------


def test_a1111_lists_upscalers_in_its_shape(api):
    listed = api.get("/sdapi/v1/upscalers").json()
    assert [item["name"] for item in listed] == ["None", "Lanczos", "Nearest", "not-an-upscaler", ESRGAN]
    assert all(set(item) == {"name", "model_name", "model_path", "model_url", "scale"} for item in listed)
    model = listed[-1]
    assert model["model_path"] == f"{ESRGAN}.safetensors" and model["scale"] == 2 and model["model_name"] == "ESRGAN"


def test_resolve_refuses_unknown_and_latent_names_naming_them(registry):
    with pytest.raises(InvalidRequest, match="unknown upscaler '4x-Nope'") as caught:
        upscalers.resolve(registry, "4x-Nope", "upscaler_1", latent_ok=False)
    assert caught.value.field == "upscaler_1" and ESRGAN in str(caught.value)
    with pytest.raises(InvalidRequest, match="only hires fix"):
        upscalers.resolve(registry, "Latent", "upscaler_1", latent_ok=False)
    with pytest.raises(InvalidRequest, match="unknown upscaler 'old-model'"):  # pickled files are never loaded
        upscalers.resolve(registry, "old-model", "upscaler_1", latent_ok=False)
    assert upscalers.resolve(registry, "lanczos", "x", latent_ok=False).name == "Lanczos"


def test_the_esrgan_model_upscales_to_the_exact_size(registry):
    model = upscalers.resolve(registry, ESRGAN, "x", latent_ok=False)
    image = source()
    twice = upscalers.upscale_image(image, model, (74, 46), "cpu")
    thrice = upscalers.upscale_image(image, model, (111, 69), "cpu")  # two model passes, then Lanczos down
    assert twice.size == (74, 46) and thrice.size == (111, 69)
    plain = upscalers.resolve(registry, "Lanczos", "x", latent_ok=False)
    lanczos = upscalers.upscale_image(image, plain, (74, 46), "cpu")
    assert np.abs(np.asarray(twice).astype(int) - np.asarray(lanczos).astype(int)).mean() > 5  # the model ran
    assert "torchvision" not in sys.modules  # spandrel's stand-ins never outlive its import


# --- A1111 extras -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("upscaler", "factor"), [("Lanczos", 2), ("Nearest", 3), (ESRGAN, 2), (ESRGAN, 2.5)])
def test_extra_single_image_upscales_by_the_asked_factor(api, upscaler, factor):
    body = {"image": b64png(source()), "upscaler_1": upscaler, "upscaling_resize": factor}
    response = api.post("/sdapi/v1/extra-single-image", json=body)
    assert response.status_code == 200, response.text
    out = response.json()
    assert set(out) == {"html_info", "image"}
    assert decode(out["image"]).size == (round(37 * factor), round(23 * factor))
    assert f"Postprocess upscale by: {factor:g}" in out["html_info"]
    assert f"Postprocess upscaler: {upscaler}" in out["html_info"]


def test_nearest_keeps_the_source_pixels(api):
    body = {"image": b64png(source()), "upscaler_1": "Nearest", "upscaling_resize": 2}
    out = decode(api.post("/sdapi/v1/extra-single-image", json=body).json()["image"]).convert("RGB")
    # the invisible watermark moves pixels by a few levels, no more
    expected = source().resize((74, 46), Image.Resampling.NEAREST)
    assert np.abs(np.asarray(out).astype(int) - np.asarray(expected).astype(int)).max() <= 4


def test_extra_single_image_scale_to_crops_to_fit(api):
    body = {
        "image": b64png(source()),
        "upscaler_1": "Lanczos",
        "resize_mode": 1,
        "upscaling_resize_w": 100,
        "upscaling_resize_h": 100,
    }
    out = api.post("/sdapi/v1/extra-single-image", json=body).json()
    assert decode(out["image"]).size == (100, 100)
    assert "Postprocess upscale to: 100x100, Postprocess crop to fit: True" in out["html_info"]


def test_extra_batch_images_upscales_each_as_its_own_job(api):
    before = job_count(api)
    images = [{"data": b64png(source()), "name": "a.png"}, {"data": b64png(source(20, 30)), "name": "b.png"}]
    body = {"imageList": images, "upscaler_1": ESRGAN, "upscaling_resize": 2}
    response = api.post("/sdapi/v1/extra-batch-images", json=body)
    assert response.status_code == 200, response.text
    out = response.json()
    assert set(out) == {"html_info", "images"}
    assert [decode(image).size for image in out["images"]] == [(74, 46), (40, 60)]
    assert job_count(api) == before + 2


@pytest.mark.parametrize(
    ("patch", "field", "needle"),
    [
        ({"upscaler_1": "4x-Nope"}, "upscaler_1", "'4x-Nope'"),
        ({"upscaler_1": "Latent"}, "upscaler_1", "only hires fix"),
        ({"image": b64png(source(60, 40)), "upscaling_resize": 8}, "upscaling_resize", "480x320"),
        ({"resize_mode": 1, "upscaling_resize_w": 500}, "upscaling_resize_w", "500x512"),
        ({"gfpgan_visibility": 0.5}, "gfpgan_visibility", "face restoration"),
        ({"upscaler_2": "Lanczos", "extras_upscaler_2_visibility": 0.5}, "upscaler_2", "second upscaler"),
        ({"image": ""}, "image", "image"),
    ],
)
def test_extras_422_names_the_field_before_a_job_exists(api, patch, field, needle):
    before = job_count(api)
    body = {"image": b64png(source()), "upscaler_1": "Lanczos", **patch}
    response = api.post("/sdapi/v1/extra-single-image", json=body)
    assert response.status_code == 422, response.text[:400]
    error = response.json()["error"]
    assert error["field"] == field and needle in error["message"], error
    assert job_count(api) == before


def test_extra_batch_refuses_every_image_before_queueing_any(api):
    before = job_count(api)
    images = [{"data": b64png(source()), "name": "ok.png"}, {"data": b64png(source(300, 300)), "name": "big.png"}]
    response = api.post("/sdapi/v1/extra-batch-images", json={"imageList": images, "upscaling_resize": 2})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "upscaling_resize"
    assert job_count(api) == before


# --- native -----------------------------------------------------------------------------------------------------------


def test_native_upscale_is_a_job_with_provenance(api, registry):
    body = {"image": b64png(source()), "upscaler": ESRGAN, "scale": 2, "priority": "high"}
    response = api.post("/v1/upscale", json=body)
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["state"] == "succeeded" and job["priority"] == "high", job
    assert (job["images"][0]["width"], job["images"][0]["height"]) == (74, 46)
    sha = registry.file_sha256(registry.upscaler_files()[ESRGAN])
    assert job["request"]["upscale"]["sha256"] == sha
    assert (job["request"]["width"], job["request"]["height"]) == (37, 23)  # the source's size
    assert job["provenance"]["model"]["id"] == f"upscaler:{ESRGAN}" and job["provenance"]["engine"] == "upscale"
    image = Image.open(io.BytesIO(api.get(job["images"][0]["url"]).content))
    assert image.size == (74, 46) and f"Postprocess upscaler hash: {sha[:10]}" in image.text["parameters"]
    audit = api.get("/v1/audit", params={"action": "job.submit", "limit": 1000}).json()
    record = next(item for item in audit if item["target"] == job["id"])
    assert record["details"]["mode"] == "upscale" and record["details"]["size"] == "37x23"


def test_native_upscale_422s(api):
    before = job_count(api)
    unknown = api.post("/v1/upscale", json={"image": b64png(source()), "upscaler": "4x-Nope"})
    assert unknown.status_code == 422 and unknown.json()["error"]["field"] == "upscale.upscaler"
    assert "'4x-Nope'" in unknown.json()["error"]["message"]
    big = api.post("/v1/upscale", json={"image": b64png(source(60, 40)), "scale": 8})
    assert big.status_code == 422 and big.json()["error"]["field"] == "upscale.scale"
    half = api.post("/v1/upscale", json={"image": b64png(source()), "width": 100})
    assert half.status_code == 422 and half.json()["error"]["field"] == "height"
    assert job_count(api) == before


def test_a_file_that_is_no_upscaler_fails_the_job_once(api):
    response = api.post("/v1/upscale", json={"image": b64png(source()), "upscaler": "not-an-upscaler"})
    job = response.json()
    assert job["state"] == "failed" and job["attempts"] == 1, job
    assert job["error"]["code"] == "upscaler_failed" and "not-an-upscaler" in job["error"]["message"]
