"""A model's default parameters (its darkroom.json `defaults`) through the real app: shown in the listing, applied to
what a native request leaves out, never over what it sends; a bad `defaults` is ignored, not a hidden model."""

from __future__ import annotations

import json
import shutil

import pytest
from fastapi.testclient import TestClient

from darkroom.api.app import create_app
from darkroom.config import Settings
from darkroom.service import Services

DEFAULTS = {
    "width": 128,
    "height": 64,
    "steps": 3,
    "sampler": "Euler",
    "guidance_scale": 2.5,
    "negative_prompt": "dull",
}


@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_diffusers_model):
    root = tmp_path_factory.mktemp("defaults-models")
    shutil.copytree(tiny_diffusers_model, root / "tuned")
    (root / "tuned" / "darkroom.json").write_text(json.dumps({"defaults": DEFAULTS}))
    shutil.copytree(tiny_diffusers_model, root / "broken")
    (root / "broken" / "darkroom.json").write_text(json.dumps({"defaults": {"steps": "many"}}))
    data = tmp_path_factory.mktemp("defaults-data")
    svc = Services.open(Settings(data_dir=data, models_dir=root, sync_timeout_seconds=0.5))  # no worker: A1111 504s
    with TestClient(create_app(svc, workers=0)) as client:
        yield client
    svc.close()


def listed(api: TestClient) -> dict[str, dict]:
    body = api.get("/v1/models").json()
    return {m["id"]: m for m in (body["data"] if isinstance(body, dict) else body)}


def test_defaults_are_listed_and_fill_only_what_the_request_leaves_out(api):
    models = listed(api)
    assert {k: v for k, v in models["tuned"]["defaults"].items() if v is not None} == DEFAULTS
    assert not any(models["broken"]["defaults"].values())  # a bad `defaults` is ignored, the model still listed
    left_out = api.post("/v1/jobs", json={"prompt": "a cat", "model": "tuned"}).json()["request"]
    assert {k: left_out[k] for k in DEFAULTS} == DEFAULTS
    given = {"prompt": "a cat", "model": "tuned", "steps": 1, "width": 64, "negative_prompt": ""}
    sent = api.post("/v1/jobs", json=given).json()["request"]
    assert (sent["steps"], sent["width"], sent["height"], sent["negative_prompt"]) == (1, 64, 64, "")
    plain = api.post("/v1/jobs", json={"prompt": "a cat", "model": "broken", "width": 64, "height": 64}).json()
    assert plain["request"]["steps"] == 20  # the service-wide default


def test_an_a1111_request_gets_the_defaults_for_what_it_leaves_out(api):
    tuned = {"sd_model_checkpoint": "tuned"}
    for body in ({"prompt": "a dog"}, {"prompt": "a fox", "steps": 5, "cfg_scale": 7}):
        assert api.post("/sdapi/v1/txt2img", json={**body, "override_settings": tuned}).status_code == 504
    jobs = {j["request"]["prompt"]: j["request"] for j in api.get("/v1/jobs").json()}
    dog, fox = jobs["a dog"], jobs["a fox"]
    assert (dog["steps"], dog["width"], dog["guidance_scale"], dog["sampler"]) == (3, 128, 2.5, "Euler")
    assert (fox["steps"], fox["guidance_scale"], fox["width"]) == (5, 7.0, 128)  # sent fields win
