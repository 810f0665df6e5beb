"""The ComfyUI-compatible API in-process (TestClient, real SQLite, one worker thread, tiny real models): API-format
workflows compiled into jobs, followed over /ws, read back through /history and /view; refusals in node_errors;
tenant isolation."""

from __future__ import annotations

import base64
import copy
import io
import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from darkroom.api.app import create_app
from darkroom.auth.principal import Principal, Role
from darkroom.config import Limits, Settings, WebhookSettings
from darkroom.service import Services
from tests.support.tiny_models import build_tiny_pipeline, make_controlnet, make_esrgan_upscaler, make_lora

CLI = Principal.cli()
ESRGAN = "tiny-esrgan-2x"
LORA = "tiny-style"
CONTROLNET = "edges"


@pytest.fixture(scope="module")
def comfy_models(tmp_path_factory, tiny_diffusers_model) -> Path:
    root = tmp_path_factory.mktemp("comfy-models")
    shutil.copytree(tiny_diffusers_model, root / tiny_diffusers_model.name)
    make_esrgan_upscaler(root / "upscalers", ESRGAN, scale=2)
    from safetensors.numpy import save_file

    save_file(
        {"foo.weight": np.ones((3, 3), dtype=np.float32)}, str(root / "upscalers" / "not-an-upscaler.safetensors")
    )
    pipe = build_tiny_pipeline(seed=0)
    make_controlnet(root / "controlnet", CONTROLNET, pipe=pipe)
    make_lora(root / "loras", LORA, pipe=pipe)  # last: it puts adapters into `pipe`
    return root


@pytest.fixture(scope="module")
def svc(tmp_path_factory, comfy_models):
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("comfy-data"),
        models_dir=comfy_models,
        poll_seconds=0.05,
        progress_interval=0,
        preview_every_seconds=0,
        limits=Limits(max_upload_bytes=400_000),
        webhooks=WebhookSettings(enabled=False),
    )
    services = Services.open(settings)
    yield services
    services.close()


@pytest.fixture(scope="module")
def keys(svc) -> dict[str, dict[str, str]]:
    made = {}
    for tenant in ("acme", "globex"):
        _, token = svc.keys.create(CLI, name=f"admin@{tenant}", role=Role.admin, tenant=tenant)
        made[tenant] = {"Authorization": f"Bearer {token}"}
    return made


@pytest.fixture(scope="module")
def api(svc, keys):
    with TestClient(create_app(svc, workers=1)) as client:
        client.headers.update(keys["acme"])
        yield client


# --- workflows, as ComfyUI's "Save (API format)" writes them ----------------------------------------------------


def titled(workflow: dict[str, Any]) -> dict[str, Any]:
    """Every node with its `_meta.title`, as ComfyUI's export writes it (clients find nodes by title)."""
    for node in workflow.values():
        node.setdefault("_meta", {"title": node["class_type"]})
    return workflow


def txt2img(seed: int = 7) -> dict[str, Any]:
    return titled(
        {
            "3": {
                "class_type": "KSampler",
                "inputs": {
                    "seed": seed,
                    "steps": 2,
                    "cfg": 7.0,
                    "sampler_name": "euler",
                    "scheduler": "normal",
                    "denoise": 1.0,
                    "model": ["4", 0],
                    "positive": ["6", 0],
                    "negative": ["7", 0],
                    "latent_image": ["5", 0],
                },
                "_meta": {"title": "KSampler"},
            },
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-diffusers"}},
            "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dusk", "clip": ["4", 1]}},
            "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
            "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
            "9": {
                "class_type": "SaveImage",
                "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]},
                "_meta": {"title": "Save Image"},
            },
        }
    )


def img2img(name: str, denoise: float = 0.6) -> dict[str, Any]:
    wf = txt2img()
    del wf["5"]
    wf["10"] = {"class_type": "LoadImage", "inputs": {"image": name}}
    wf["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    wf["3"]["inputs"].update(latent_image=["11", 0], denoise=denoise)
    return wf


def inpaint(name: str) -> dict[str, Any]:
    wf = img2img(name, denoise=1.0)
    wf["11"] = {
        "class_type": "VAEEncodeForInpaint",
        "inputs": {"pixels": ["10", 0], "vae": ["4", 2], "mask": ["10", 1], "grow_mask_by": 0},
    }
    return wf


def with_lora(weight: float = 0.8) -> dict[str, Any]:
    wf = txt2img()
    wf["12"] = {
        "class_type": "LoraLoader",
        "inputs": {
            "lora_name": f"{LORA}.safetensors",
            "strength_model": weight,
            "strength_clip": weight,
            "model": ["4", 0],
            "clip": ["4", 1],
        },
    }
    wf["3"]["inputs"]["model"] = ["12", 0]
    for node in ("6", "7"):
        wf[node]["inputs"]["clip"] = ["12", 1]
    return wf


def hires() -> dict[str, Any]:
    wf = txt2img()
    wf["13"] = {
        "class_type": "LatentUpscaleBy",
        "inputs": {"upscale_method": "nearest-exact", "scale_by": 2.0, "samples": ["3", 0]},
    }
    second = copy.deepcopy(wf["3"])
    second["inputs"].update(latent_image=["13", 0], denoise=0.5, seed=99)
    wf["14"] = second
    wf["8"]["inputs"]["samples"] = ["14", 0]
    return wf


def controlnet(name: str) -> dict[str, Any]:
    wf = txt2img()
    wf["15"] = {"class_type": "LoadImage", "inputs": {"image": name}}
    wf["16"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": CONTROLNET}}
    wf["17"] = {
        "class_type": "ControlNetApplyAdvanced",
        "inputs": {
            "positive": ["6", 0],
            "negative": ["7", 0],
            "control_net": ["16", 0],
            "image": ["15", 0],
            "strength": 0.8,
            "start_percent": 0.0,
            "end_percent": 0.5,
        },
    }
    wf["3"]["inputs"].update(positive=["17", 0], negative=["17", 1])
    return titled(wf)


def upscale(name: str, model: str = ESRGAN) -> dict[str, Any]:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": f"{model}.safetensors"}},
        "3": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"filename_prefix": "up", "images": ["3", 0]}},
    }


# --- helpers ---------------------------------------------------------------------------------------------------------


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def source_image() -> Image.Image:
    line = np.linspace(0, 255, 64, dtype=np.uint8)
    rgb = np.stack([np.tile(line, (64, 1))] * 3, axis=-1)
    alpha = np.full((64, 64), 255, dtype=np.uint8)
    alpha[16:48, 16:48] = 0  # ComfyUI: transparent pixels are the mask
    return Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA")


def upload(api: TestClient, name: str = "source.png", headers: dict | None = None) -> str:
    files = {"image": (name, png(source_image()), "image/png")}
    r = api.post("/upload/image", files=files, data={"overwrite": "true"}, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["type"] == "input"
    return r.json()["name"]


def run(api: TestClient, workflow: dict, **body: Any) -> tuple[str, list[dict | bytes]]:
    """Queue `workflow` and follow it over /ws until ComfyUI's end-of-prompt (`executing` with node null)."""
    client_id = uuid.uuid4().hex
    token = api.headers["Authorization"].split(" ", 1)[1]
    with api.websocket_connect(f"/ws?clientId={client_id}&api_key={token}") as ws:
        first = ws.receive_json()
        assert first["type"] == "status" and first["data"]["sid"] == client_id
        r = api.post("/prompt", json={"prompt": workflow, "client_id": client_id, **body})
        assert r.status_code == 200, r.text
        assert r.json()["node_errors"] == {}
        prompt_id = r.json()["prompt_id"]
        messages: list[dict | bytes] = []
        while True:
            raw = ws.receive()
            message = json.loads(raw["text"]) if raw.get("text") else raw.get("bytes")
            messages.append(message)
            if isinstance(message, dict) and message["type"] == "executing":
                data = message["data"]
                if data["node"] is None and data["prompt_id"] == prompt_id:
                    return prompt_id, messages


def types(messages: list) -> list[str]:
    return [m["type"] for m in messages if isinstance(m, dict)]


def output_image(api: TestClient, prompt_id: str, node: str = "9") -> tuple[Image.Image, bytes]:
    history = api.get(f"/history/{prompt_id}").json()[prompt_id]
    assert history["status"]["status_str"] == "success"
    [ref] = history["outputs"][node]["images"]
    r = api.get("/view", params=ref)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(r.content)), r.content


def job(api: TestClient, prompt_id: str) -> dict:
    return api.get(f"/v1/jobs/{prompt_id}").json()


# --- the workflows --------------------------------------------------------------------------------------------------


def test_txt2img_runs_as_a_job_followed_over_ws_with_the_workflow_in_the_png(api):
    workflow = txt2img()
    prompt_id, messages = run(api, workflow)
    seen = types(messages)
    for kind in ("execution_start", "executing", "progress", "executed", "execution_success"):
        assert kind in seen, seen
    assert seen.index("execution_start") < seen.index("progress") < seen.index("executed")
    executed = next(m for m in messages if isinstance(m, dict) and m["type"] == "executed")
    assert executed["data"]["node"] == "9" and executed["data"]["prompt_id"] == prompt_id
    progress = [m["data"] for m in messages if isinstance(m, dict) and m["type"] == "progress"]
    assert progress[-1]["value"] == progress[-1]["max"] == 2 and progress[-1]["node"] == "3"

    image, raw = output_image(api, prompt_id)
    assert image.size == (64, 64)
    assert json.loads(image.text["prompt"]) == workflow  # as ComfyUI's own PNGs carry it
    request = job(api, prompt_id)["request"]
    assert request["workflow"]["prompt"] == workflow  # provenance keeps the submitted workflow
    assert not request.get("init_image") and not request.get("hires")  # txt2img
    assert request["sampler"] == "Euler" and request["steps"] == 2 and request["seed"] == 7
    assert request["prompt"] == "a lighthouse at dusk" and request["negative_prompt"] == "blurry"
    assert api.get("/api/history").json()[prompt_id]["prompt"][1] == prompt_id  # the /api/ prefix too
    scraped = api.get("/metrics").text
    assert any(
        line.startswith("darkroom_jobs_submitted_total{") and 'api="comfyui"' in line for line in scraped.split("\n")
    )


def test_previews_come_as_binary_frames_when_asked_for_and_prompt_id_is_idempotent(api):
    prompt_id, messages = run(api, txt2img(seed=11), extra_data={"preview_method": "auto"})
    frames = [m for m in messages if isinstance(m, bytes)]
    assert frames and all(f[:4] == (1).to_bytes(4, "big") for f in frames)  # ComfyUI's PREVIEW_IMAGE event
    assert Image.open(io.BytesIO(frames[-1][8:])).size[0] > 0
    assert job(api, prompt_id)["request"]["preview"] is True

    body = {"prompt": txt2img(seed=12), "prompt_id": "client-chosen-1"}
    first = api.post("/prompt", json=body).json()["prompt_id"]
    assert api.post("/prompt", json=body).json()["prompt_id"] == first  # the same job, queued once


def test_upload_mask_puts_the_masks_alpha_into_the_original(api):
    name = upload(api, "to-mask.png")
    mask = np.zeros((64, 64, 4), dtype=np.uint8)
    mask[..., 3] = 255
    mask[:32, :, 3] = 0  # the top half: transparent, so masked
    files = {"image": ("to-mask.png", png(Image.fromarray(mask, mode="RGBA")), "image/png")}
    ref = json.dumps({"filename": name, "subfolder": "", "type": "input"})
    r = api.post("/upload/mask", files=files, data={"original_ref": ref, "overwrite": "true"})
    assert r.status_code == 200, r.text
    merged = Image.open(io.BytesIO(api.get("/view", params={"filename": r.json()["name"], "type": "input"}).content))
    alpha = np.asarray(merged.getchannel("A"))
    assert alpha[:32].max() == 0 and alpha[32:].min() == 255
    bad = api.post("/upload/mask", files=files, data={"original_ref": '{"filename": "missing.png"}'})
    assert bad.status_code == 400 and bad.json()["error"]["details"] == "original_ref"


def test_img2img_and_inpaint_use_the_uploaded_image_and_its_alpha_mask(api):
    name = upload(api)
    prompt_id, _ = run(api, img2img(name, denoise=0.6))
    request = job(api, prompt_id)["request"]
    assert request["strength"] == pytest.approx(0.6)
    assert request["init_image"].startswith("blob:") and not request.get("mask_image")
    output_image(api, prompt_id)

    prompt_id, _ = run(api, inpaint(name))
    done = job(api, prompt_id)
    assert done["state"] == "succeeded" and done["request"]["mask_image"].startswith("blob:")
    out = np.asarray(output_image(api, prompt_id)[0].convert("RGB")).astype(int)
    kept = np.asarray(source_image().convert("RGB")).astype(int)
    assert np.abs(out[:8, :8] - kept[:8, :8]).max() <= 8  # outside the mask the source stays (watermark aside)
    assert np.abs(out[24:40, 24:40] - kept[24:40, 24:40]).mean() > 8  # inside it is repainted


def test_lora_hires_controlnet_and_upscale_workflows(api):
    prompt_id, _ = run(api, with_lora(0.8))
    assert job(api, prompt_id)["request"]["loras"][0]["name"] == LORA
    assert job(api, prompt_id)["request"]["loras"][0]["weight"] == pytest.approx(0.8)

    prompt_id, _ = run(api, hires())
    hires_spec = job(api, prompt_id)["request"]["hires"]
    assert hires_spec["upscaler"] == "Latent (nearest-exact)" and hires_spec["denoising_strength"] == 0.5
    assert output_image(api, prompt_id)[0].size == (128, 128)

    name = upload(api, "small.png")
    prompt_id, _ = run(api, controlnet(name))
    [unit] = job(api, prompt_id)["request"]["controlnet"]
    assert (unit["model"], unit["weight"], unit["guidance_end"]) == (CONTROLNET, 0.8, 0.5)
    assert unit["sha256"] and output_image(api, prompt_id)[0].size == (64, 64)

    prompt_id, _ = run(api, upscale(name))
    assert job(api, prompt_id)["request"]["upscale"]["upscaler"] == ESRGAN
    assert output_image(api, prompt_id, node="4")[0].size == (128, 128)


def test_interrupt_stops_the_running_prompt_and_ws_says_execution_interrupted(api):
    """`POST /interrupt` with the prompt's id: the job is cancelled at its next step, and the socket hears
    `execution_interrupted` naming the sampler node, then the end of the prompt."""
    workflow = txt2img(seed=13)
    workflow["3"]["inputs"]["steps"] = 150  # the most allowed: long enough to be caught running
    client_id = uuid.uuid4().hex
    token = api.headers["Authorization"].split(" ", 1)[1]
    with api.websocket_connect(f"/ws?clientId={client_id}&api_key={token}") as ws:
        assert ws.receive_json()["type"] == "status"
        prompt_id = api.post("/prompt", json={"prompt": workflow, "client_id": client_id}).json()["prompt_id"]
        seen: list[dict] = []
        while not any(m["type"] == "progress" for m in seen):  # running now
            seen.append(ws.receive_json())
        assert api.post("/interrupt", json={"prompt_id": prompt_id}).status_code == 200
        while not (seen[-1]["type"] == "executing" and seen[-1]["data"]["node"] is None):
            message = ws.receive()
            if message.get("text"):
                seen.append(json.loads(message["text"]))
    [interrupted] = [m["data"] for m in seen if m["type"] == "execution_interrupted"]
    assert interrupted["prompt_id"] == prompt_id and interrupted["node_type"] == "KSampler"
    assert "execution_success" not in types(seen) and "execution_error" not in types(seen)
    assert job(api, prompt_id)["state"] == "cancelled"


# --- refusals --------------------------------------------------------------------------------------------------------


def test_a_job_that_fails_on_the_worker_reports_execution_error(api):
    prompt_id, messages = run(api, upscale(upload(api, "fails.png"), model="not-an-upscaler"))
    [error] = [m["data"] for m in messages if isinstance(m, dict) and m["type"] == "execution_error"]
    assert error["prompt_id"] == prompt_id and error["node_id"] == "4" and error["exception_message"]
    status = api.get(f"/history/{prompt_id}").json()[prompt_id]["status"]
    assert status["status_str"] == "error" and not status["completed"]


def test_an_unsupported_node_is_a_400_naming_it_and_nothing_runs(api):
    before = len(api.get("/v1/jobs").json())
    wf = txt2img()
    wf["20"] = {"class_type": "FreeU_V2", "inputs": {"model": ["4", 0], "b1": 1.3}}
    wf["3"]["inputs"]["model"] = ["20", 0]
    r = api.post("/prompt", json={"prompt": wf})
    assert r.status_code == 400
    body = r.json()
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert body["node_errors"]["20"]["class_type"] == "FreeU_V2"
    assert body["node_errors"]["20"]["errors"][0]["type"] == "node_not_supported"
    assert len(api.get("/v1/jobs").json()) == before


@pytest.mark.parametrize(
    ("patch", "node", "needle"),
    [
        ({"3": {"sampler_name": "dpmpp_3m_sde"}}, "3", "sampler_name"),
        ({"5": {"width": 100000}}, "5", "width"),
        ({"4": {"ckpt_name": "nope.safetensors"}}, "4", "unknown model"),
        ({"6": {"text": ""}}, "6", "prompt"),
    ],
)
def test_bad_values_name_their_node(api, patch, node, needle):
    wf = txt2img()
    for node_id, inputs in patch.items():
        wf[node_id]["inputs"].update(inputs)
    r = api.post("/prompt", json={"prompt": wf})
    assert r.status_code == 400, r.text
    assert needle in json.dumps(r.json()["node_errors"][node])


def test_cycles_and_malformed_nodes_are_400s(api):
    wf = txt2img()
    wf["3"]["inputs"]["latent_image"] = ["3", 0]
    r = api.post("/prompt", json={"prompt": wf})
    assert r.status_code == 400 and "cycle" in r.json()["error"]["message"]
    wf = txt2img()
    wf["5"]["inputs"] = ["not", "an", "object"]
    assert api.post("/prompt", json={"prompt": wf}).json()["error"]["type"] == "invalid_prompt"


def test_malformed_json_and_missing_prompt(api):
    r = api.post("/prompt", content=b'{"prompt": {\n  "3": }', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "line 2 column" in r.json()["error"]["message"]
    r = api.post("/prompt", json={"client_id": "x"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "no_prompt"
    r = api.post("/prompt", json={"prompt": txt2img(), "extra_data": {"priority": "urgent"}})
    assert r.status_code == 400 and r.json()["error"]["details"] == "priority" and r.json()["node_errors"] == {}


# --- the catalogue ----------------------------------------------------------------------------------------------------


def test_object_info_models_and_system_stats(api):
    info = api.get("/object_info").json()
    assert "KSampler" in info and "FreeU_V2" not in info
    assert "tiny-diffusers" in info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert "euler_ancestral" in info["KSampler"]["input"]["required"]["sampler_name"][0]
    assert list(api.get("/object_info/LoraLoader").json()) == ["LoraLoader"]
    assert api.get("/models/loras").json() == [f"{LORA}.safetensors"]
    assert api.get("/models/upscale_models").json() == ["not-an-upscaler.safetensors", f"{ESRGAN}.safetensors"]
    assert api.get("/models/controlnet").json() == [CONTROLNET]
    assert api.get("/models/nope").status_code == 404
    assert api.get("/system_stats").json()["system"]["comfyui_version"].startswith("darkroom")
    assert api.get("/api/embeddings").status_code == 200


# --- tenants, auth ---------------------------------------------------------------------------------------------------


def test_a_tenant_sees_only_its_own_queue_history_and_files(api, keys):
    prompt_id, _ = run(api, txt2img(seed=3))
    _, _ = output_image(api, prompt_id)
    ref = api.get(f"/history/{prompt_id}").json()[prompt_id]["outputs"]["9"]["images"][0]
    other = keys["globex"]
    assert api.get("/view", params=ref, headers=other).status_code == 404
    assert api.get(f"/history/{prompt_id}", headers=other).json() == {}
    assert prompt_id not in api.get("/history", headers=other).json()
    assert api.get("/view", params={"filename": "source.png", "type": "input"}, headers=other).status_code == 404
    assert api.get("/view", params={"filename": "nope.png"}).status_code == 404
    assert api.get("/queue", headers={"Authorization": "Bearer dk_nope_nope"}).status_code == 401
    basic = base64.b64encode(f"anyone:{keys['acme']['Authorization'].split()[1]}".encode()).decode()
    assert api.get("/queue", headers={"Authorization": f"Basic {basic}"}).status_code == 200
    r = api.post("/history", json={"clear": True})
    assert r.status_code == 200 and prompt_id not in api.get("/history").json()
    assert api.get("/prompt").json() == {"exec_info": {"queue_remaining": 0}}


# --- the A1111 and OpenAI gaps on the same app -------------------------------------------------------------------


def test_a1111_informational_routes_answer_in_a1111_shapes(api):
    for path, expected in (
        ("/sdapi/v1/hypernetworks", []),
        ("/sdapi/v1/face-restorers", []),
        ("/sdapi/v1/scripts", {"txt2img": [], "img2img": []}),
        ("/sdapi/v1/script-info", []),
        ("/sdapi/v1/extensions", []),
    ):
        assert api.get(path).json() == expected, path
    memory = api.get("/sdapi/v1/memory").json()
    assert memory["ram"]["total"] >= memory["ram"]["free"] > 0 and "error" in memory["cuda"]
    flags = api.get("/sdapi/v1/cmd-flags").json()
    assert flags["api"] is True and flags["api_auth"] is True and flags["data_dir"] is None
    r = api.post("/sdapi/v1/interrogate", json={"image": "", "model": "clip"})
    assert r.status_code == 501 and r.json()["error"]["code"] == "not_implemented"


def test_v1_models_is_openais_list_with_darkrooms_fields(api):
    listing = api.get("/v1/models").json()
    assert listing["object"] == "list"
    [model] = listing["data"]
    assert model["id"] == "tiny-diffusers" and model["object"] == "model" and model["created"] > 0
    assert model["sha256"] and "path" not in model
