"""A body that is not JSON is named by line and column, never by a character offset posing as a field name, on all
three APIs (one handler for native and A1111, OpenAI's shape on its own routes)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from darkroom.api.app import create_app
from darkroom.config import Settings
from darkroom.service import Services

BROKEN = b'{\n  "prompt": "a lighthouse",\n  "steps": ,\n  "seed": 42\n}'  # line 3, column 12: the missing value
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("json-errors")
    (tmp / "models").mkdir()
    services = Services.open(Settings(data_dir=tmp / "data", models_dir=tmp / "models", create_default_model=False))
    with TestClient(create_app(services, workers=0)) as client:
        yield client
    services.close()


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/generate", "/sdapi/v1/txt2img", "/sdapi/v1/img2img"])
def test_malformed_json_names_line_and_column_and_no_field(api, path):
    r = api.post(path, content=BROKEN, headers=JSON)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["message"] == "invalid JSON at line 3 column 12: Expecting value"
    assert error["field"] is None


def test_malformed_json_on_the_first_line(api):
    r = api.post("/v1/jobs", content=b'{"prompt": "x",}', headers=JSON)
    assert r.json()["error"]["message"].startswith("invalid JSON at line 1 column 16: ")
    assert r.json()["error"]["field"] is None


def test_malformed_json_in_openai_shape(api):
    r = api.post("/v1/images/generations", content=BROKEN, headers=JSON)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == {
        "message": "invalid JSON at line 3 column 12: Expecting value",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_json",
    }


def test_a_valid_body_with_a_bad_field_still_names_the_field(api):
    r = api.post("/v1/jobs", json={"prompt": "x", "steps": "many"})
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "steps"
