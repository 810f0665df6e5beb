"""The OpenAI-compatible Images API: error shape and validation in-process, and the official `openai` package over
real HTTP (uvicorn on loopback in a thread) against tiny real models."""

from __future__ import annotations

import base64
import gc
import io
import time
import warnings

import httpx
import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from darkroom.api.app import create_app
from darkroom.config import Limits, Settings, WebhookSettings
from darkroom.service import Services
from tests.support.live import LiveServer

FAST = {"steps": 2}  # darkroom extension, sent with extra_body

# Kept pixels stay within the invisible watermark's change (luma, a few levels), which marks every output.
WATERMARK_DELTA = 4


@pytest.fixture
def services(tmp_path, models_dir):
    settings = Settings(
        data_dir=tmp_path / "data",
        models_dir=models_dir,
        poll_seconds=0.05,
        limits=Limits(max_upload_bytes=400_000, max_n=4),
        webhooks=WebhookSettings(enabled=False),
    )
    svc = Services.open(settings)
    yield svc
    svc.close()


@pytest.fixture
def api(services):
    with TestClient(create_app(services, workers=0)) as client:
        yield client


@pytest.fixture
def live(services):
    with LiveServer(create_app(services, workers=1)) as server:
        yield server


@pytest.fixture
def oai(live):
    with openai.OpenAI(base_url=f"{live.url}/v1", api_key="sk-anything", max_retries=0, timeout=120) as client:
        yield client


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def ramp() -> Image.Image:
    line = np.linspace(0, 255, 64, dtype=np.uint8)
    return Image.fromarray(np.stack([np.tile(line, (64, 1))] * 3, axis=-1))


def openai_mask() -> Image.Image:
    """OpenAI's convention: transparent pixels are edited, opaque ones kept."""
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))
    return mask


# --- errors in OpenAI's shape ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param", "status"),
    [
        ({"prompt": "x", "size": "huge"}, "size", 400),
        ({"prompt": "x", "size": "65x64"}, "size", 400),
        ({"prompt": "x", "n": 99}, "n", 400),
        ({"prompt": "x", "model": "no-such-model"}, "model", 400),
        ({"prompt": "x", "quality": "ultra"}, "quality", 400),
        ({"prompt": "x", "stream": True}, "stream", 400),
        ({"prompt": "x", "output_format": "gif"}, "output_format", 400),
        ({"prompt": "x", "output_compression": 50}, "output_compression", 400),
        ({"prompt": ""}, "prompt", 400),
        ({"size": "64x64"}, "prompt", 400),
    ],
)
def test_errors_use_openais_shape(api, body, param, status):
    response = api.post("/v1/images/generations", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def test_other_routes_keep_darkrooms_error_shape(api):
    response = api.post("/v1/jobs", json={"prompt": "x", "width": 65})
    assert set(response.json()["error"]) == {"code", "message", "field"}


def test_edits_need_multipart_and_an_image(api):
    response = api.post("/v1/images/edits", data={"prompt": "x"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "image"
    bad = api.post("/v1/images/edits", data={"prompt": "x"}, files={"image": ("a.png", b"not an image", "image/png")})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "image"
    no_prompt = api.post("/v1/images/edits", files={"image": ("a.png", png(ramp()), "image/png")})
    assert no_prompt.status_code == 400 and no_prompt.json()["error"]["param"] == "prompt"


def test_without_keys_a_loopback_service_ignores_the_token_openai_clients_always_send(api):
    response = api.post(
        "/v1/images/generations", json={"prompt": "x", "size": "65x64"}, headers={"Authorization": "Bearer whatever"}
    )
    assert response.status_code == 400  # reached validation: not an auth failure


# --- the official openai package ------------------------------------------------------------------------------------


def test_generations_b64_json_with_the_openai_package(oai):
    result = oai.images.generate(
        model="dall-e-3", prompt="a lighthouse", n=2, size="64x64", response_format="b64_json", extra_body=FAST
    )
    assert len(result.data) == 2 and result.created > 0
    image = pixels(base64.b64decode(result.data[0].b64_json))
    assert image.shape == (64, 64, 3)
    assert result.size == "64x64"


def test_generations_url_and_quality_style_user_accepted(oai, live):
    result = oai.images.generate(
        prompt="a lighthouse",
        size="64x64",
        response_format="url",
        quality="low",
        style="natural",
        user="someone",
        extra_body={"seed": 9},
    )
    url = result.data[0].url
    assert url.startswith(live.url + "/v1/images/")
    assert pixels(httpx.get(url).content).shape == (64, 64, 3)


def test_a_darkroom_model_id_and_extensions_pick_what_runs(oai, live):
    result = oai.images.generate(
        model="tiny-single", prompt="a lighthouse", size="64x64", extra_body={"seed": 4, "steps": 2}
    )
    assert result.data[0].b64_json  # darkroom model names answer base64, like GPT image models
    jobs = httpx.get(f"{live.url}/v1/jobs").json()
    assert jobs[0]["request"]["model"] == "tiny-single" and jobs[0]["request"]["seed"] == 4


def test_errors_reach_the_openai_package_as_its_exceptions(oai):
    with pytest.raises(openai.BadRequestError) as err:
        oai.images.generate(prompt="x", size="65x64")
    assert err.value.status_code == 400
    assert err.value.body["param"] == "size" and err.value.body["type"] == "invalid_request_error"


def test_edits_with_a_mask_repaint_only_the_transparent_area(oai):
    source = ramp()
    result = oai.images.edit(
        image=("source.png", png(source), "image/png"),
        mask=("mask.png", png(openai_mask()), "image/png"),
        prompt="a red door",
        size="64x64",
        response_format="b64_json",
        extra_body=FAST,
    )
    out = pixels(base64.b64decode(result.data[0].b64_json))
    alpha = np.asarray(openai_mask().getchannel("A"))
    keep = alpha == 255
    assert np.abs(out[keep] - np.asarray(source).astype(int)[keep]).max() <= WATERMARK_DELTA
    assert np.abs(out[~keep] - np.asarray(source).astype(int)[~keep]).mean() > 1


def test_edits_without_a_mask_use_the_images_transparency(oai):
    source = ramp().convert("RGBA")
    source.paste((0, 0, 0, 0), (0, 0, 32, 64))  # left half transparent: repaint it
    result = oai.images.edit(image=("s.png", png(source), "image/png"), prompt="sky", extra_body=FAST)
    out = pixels(base64.b64decode(result.data[0].b64_json))
    assert out.shape == (64, 64, 3)  # size: the source's
    assert np.abs(out[:, 40:] - np.asarray(source.convert("RGB")).astype(int)[:, 40:]).max() <= WATERMARK_DELTA


def test_edits_of_an_opaque_image_without_mask_reimagine_it(oai, live):
    result = oai.images.edit(
        image=[("s.png", png(ramp()), "image/png")], prompt="sky", extra_body={**FAST, "strength": 0.5}
    )
    assert len(result.data) == 1
    job = httpx.get(f"{live.url}/v1/jobs").json()[0]
    assert job["request"]["mask_image"] is None and job["request"]["strength"] == 0.5


# --- limits before work ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"size": "0x0"}, "size"),
        ({"size": "8192x8192"}, "size"),
        ({"size": "20000x20000"}, "size"),
        ({"size": "64x0"}, "size"),
        ({"n": "100"}, "n"),
        ({"steps": "1000000"}, "quality"),
        ({"prompt": "x" * 100_000}, "prompt"),
    ],
)
def test_edit_limits_are_checked_before_the_mask_is_resized(api, services, fields, param):
    """`size=0x0` with a mask was a 500, and 8192² with a small mask seconds of CPU resizing it first."""
    files = {"image": ("a.png", png(ramp()), "image/png"), "mask": ("m.png", png(openai_mask()), "image/png")}
    started = time.monotonic()
    response = api.post("/v1/images/edits", data={"prompt": "x", **fields}, files=files)
    assert time.monotonic() - started < 2
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert [p for p in services.blobs.root.rglob("*") if p.is_file()] == [] and services.store.list() == []


def test_a_refused_edit_closes_the_forms_spooled_files(api):
    """Each multipart file is spooled to a temporary file by Starlette; the route closes the form whatever it refuses,
    so no file is left for the garbage collector (which warned, `ResourceWarning: Unclosed file`)."""
    files = {"image": ("a.png", png(ramp()), "image/png"), "mask": ("m.png", png(openai_mask()), "image/png")}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        for fields in ({}, {"prompt": "x", "size": "64x0"}):  # refused without a prompt; by its size
            assert api.post("/v1/images/edits", data=fields, files=files).status_code == 400
        gc.collect()
    unclosed = [str(w.message) for w in caught if "SpooledTemporaryFile" in str(w.message)]
    assert unclosed == []


def test_an_upload_over_the_byte_limit_is_refused_by_its_size(api, services):
    files = {"image": ("a.png", b"\x89PNG" + b"\0" * 500_000, "image/png")}
    response = api.post("/v1/images/edits", data={"prompt": "x"}, files=files)
    assert response.status_code == 413 and response.json()["error"]["param"] == "image"
