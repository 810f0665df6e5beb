"""Unchanged third-party clients against one live darkroom (uvicorn on loopback in a thread, one worker, tiny real
models, API keys): `comfy-api-simplified` (ComfyUI), `webuiapi` (A1111, with HTTP Basic credentials) and the
official `openai` package (models, variations, jpeg output)."""

from __future__ import annotations

import base64
import io
import json

import openai
import pytest
import webuiapi
from comfy_api_simplified import ComfyApiWrapper, ComfyWorkflowWrapper
from PIL import Image

from darkroom.api.app import create_app
from darkroom.auth.principal import Principal, Role
from darkroom.config import Limits, Settings, WebhookSettings
from darkroom.service import Services
from tests.support.live import LiveServer
from tests.unit.test_comfyui import source_image, txt2img

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def live(tmp_path_factory, models_dir):
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("clients-data"),
        models_dir=models_dir,
        poll_seconds=0.05,
        progress_interval=0,
        limits=Limits(max_upload_bytes=400_000),
        webhooks=WebhookSettings(enabled=False),
    )
    svc = Services.open(settings)
    _, token = svc.keys.create(Principal.cli(), name="clients", role=Role.user, tenant="acme")
    with LiveServer(create_app(svc, workers=1)) as server:
        server.token = token  # type: ignore[attr-defined]
        yield server
    svc.close()


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_comfy_api_simplified_runs_a_workflow_over_ws_and_history(live, tmp_path):
    comfy = ComfyApiWrapper(live.url, user="anyone", password=live.token)
    source = tmp_path / "source.png"
    source.write_bytes(png(source_image()))
    uploaded = comfy.upload_image(source)
    assert uploaded["name"] == "source.png" and uploaded["type"] == "input"

    workflow = ComfyWorkflowWrapper(txt2img())
    workflow.set_node_param("Save Image", "filename_prefix", "clients")
    workflow.set_node_param("KSampler", "seed", 1234)
    images = comfy.queue_and_wait_images(workflow, "Save Image")
    [data] = images.values()
    image = Image.open(io.BytesIO(data))
    assert image.size == (64, 64)
    assert json.loads(image.text["prompt"])["3"]["inputs"]["seed"] == 1234

    assert "KSampler" in comfy.get_object_info("KSampler")
    assert comfy.get_queue() == {"queue_running": [], "queue_pending": []}
    assert comfy.get_system_stats()["system"]["comfyui_version"].startswith("darkroom")


def test_webuiapi_authenticates_with_basic_credentials(live):
    api = webuiapi.WebUIApi(baseurl=f"{live.url}/sdapi/v1", username="anyone", password=live.token, steps=2)
    result = api.txt2img(prompt="a lighthouse at dusk", width=64, height=64, seed=5)
    assert result.image.size == (64, 64) and result.info["all_seeds"] == [5]
    assert api.get_scripts() == {"txt2img": [], "img2img": []}
    assert api.get_hypernetworks() == [] and api.get_face_restorers() == []
    assert api.get_memory()["ram"]["total"] > 0
    with pytest.raises(RuntimeError) as refused:
        api.interrogate(source_image().convert("RGB"))
    assert refused.value.args[0] == 501

    stranger = webuiapi.WebUIApi(baseurl=f"{live.url}/sdapi/v1", username="anyone", password="dk_wrong_key")
    with pytest.raises(RuntimeError) as denied:
        stranger.txt2img(prompt="a lighthouse", width=64, height=64)
    assert denied.value.args[0] == 401


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the package marks dall-e-2 variations so
def test_openai_models_variations_and_jpeg_output(live):
    with openai.OpenAI(base_url=f"{live.url}/v1", api_key=live.token, max_retries=0, timeout=120) as client:
        ids = [model.id for model in client.models.list()]
        assert set(ids) == {"tiny-diffusers", "tiny-single"}

        varied = client.images.create_variation(
            image=("source.png", png(source_image().convert("RGB")), "image/png"),
            n=1,
            response_format="b64_json",
            extra_body={"steps": 2},
        )
        image = Image.open(io.BytesIO(base64.b64decode(varied.data[0].b64_json or "")))
        assert image.size == (64, 64)

        made = client.images.generate(
            prompt="a lighthouse at dusk",
            size="64x64",
            output_format="jpeg",
            output_compression=80,
            extra_body={"steps": 2},
        )
        raw = base64.b64decode(made.data[0].b64_json or "")
        assert raw[:3] == b"\xff\xd8\xff" and Image.open(io.BytesIO(raw)).format == "JPEG"
        assert made.output_format == "jpeg"
