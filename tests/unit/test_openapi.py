"""The OpenAPI document promises every error status a route can answer, with the body it answers with: darkroom's
problem shape, or OpenAI's on the OpenAI routes. Read from the app itself (`/openapi.json` over the ASGI app), so the
checks see what clients and the schema fuzz (tests/integration/test_fuzz_openapi.py) see."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from fastapi.testclient import TestClient
from openapi_spec_validator import validate

from darkroom.api.app import create_app
from darkroom.config import Settings
from darkroom.service import Services

PROBES = {"/healthz", "/readyz"}
# The compatibility routes wait for the job: 504 when it does not finish in time, its own error when it failed.
WAITS = {
    "/sdapi/v1/txt2img",
    "/sdapi/v1/img2img",
    "/sdapi/v1/extra-single-image",
    "/sdapi/v1/extra-batch-images",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/images/variations",
}
PROBLEM = "#/components/schemas/Problem"
OPENAI_ERROR = "#/components/schemas/OpenAIError"
COMFYUI_ERROR = "#/components/schemas/ComfyUIError"


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, models_dir):  # type: ignore[no-untyped-def]
    settings = Settings(data_dir=tmp_path_factory.mktemp("data"), models_dir=models_dir)
    svc = Services.open(settings)
    with TestClient(create_app(svc, workers=0)) as client:
        yield client
    svc.close()


@pytest.fixture(scope="module")
def spec(api: TestClient) -> dict[str, Any]:
    response = api.get("/openapi.json")
    assert response.status_code == 200
    return response.json()


def operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(method.upper(), path, op) for path, ops in spec["paths"].items() for method, op in ops.items()]


def is_openai(path: str) -> bool:
    return path.startswith("/v1/images/") and not path.startswith("/v1/images/{")


def test_the_document_is_valid_openapi_and_never_mentions_fastapis_error_shape(spec: dict[str, Any]) -> None:
    validate(spec)
    text = json.dumps(spec)
    assert "HTTPValidationError" not in text and '"detail"' not in text


def test_every_route_documents_its_error_statuses(spec: dict[str, Any]) -> None:
    """Invalid input (422; 400 on OpenAI and ComfyUI routes), and behind a key 401/403/429; the edge's 429 and the
    database's 503 everywhere but the probes; 404 where a path names something; 413 where there is a body; 500 and
    504 where the route waits for its job."""
    missing = []
    for method, path, op in operations(spec):
        documented = {int(status) for status in op["responses"]}
        expected: set[int] = set()
        if path not in PROBES:
            expected |= {429, 503}
            if op.get("parameters") or "requestBody" in op:
                expected.add(400 if is_openai(path) or "comfyui" in op.get("tags", ()) else 422)
            if op.get("security"):
                expected |= {401, 403, 429}
            if any(p["in"] == "path" for p in op.get("parameters", [])):
                expected.add(404)
            if "requestBody" in op:
                expected.add(413)
            if path in WAITS:
                expected |= {500, 504}
        if lacking := expected - documented:
            missing.append(f"{method} {path}: {sorted(lacking)}")
    assert not missing, "\n".join(missing)


def test_every_authenticated_route_is_behind_a_key(spec: dict[str, Any]) -> None:
    """Every route but the probes requires a key, so the 401/403/429 check above covers them all."""
    open_routes = [f"{m} {p}" for m, p, op in operations(spec) if not op.get("security") and p not in PROBES]
    assert not open_routes


def test_documented_error_bodies_reference_the_problem_schema(spec: dict[str, Any]) -> None:
    """darkroom's routes answer errors as Problem; OpenAI's as OpenAIError and ComfyUI's as ComfyUIError, or
    Problem where the edge or the database handler answered before the route (413, 429, 503)."""
    wrong = []
    for method, path, op in operations(spec):
        for status, response in op["responses"].items():
            if int(status) < 400 or path == "/readyz":  # /readyz's 503 is its own readiness report
                continue
            schema = response.get("content", {}).get("application/json", {}).get("schema", {})
            refs = {s["$ref"] for s in schema.get("anyOf", [schema]) if "$ref" in s}
            own = OPENAI_ERROR if is_openai(path) else COMFYUI_ERROR if "comfyui" in op.get("tags", ()) else None
            allowed = {own, PROBLEM} if own else {PROBLEM}
            if not refs or not refs <= allowed or (own and own not in refs):
                wrong.append(f"{method} {path} {status}: {schema}")
    assert not wrong, "\n".join(wrong)
    problem = spec["components"]["schemas"]["Problem"]["properties"]["error"]
    assert set(problem["required"]) == {"code", "message"} and "field" in problem["properties"]


def conforms(spec: dict[str, Any], body: dict[str, Any], ref: str) -> None:
    schema = {**spec["components"]["schemas"][ref.rsplit("/", 1)[1]], "components": spec["components"]}
    jsonschema.validate(body, schema)


def test_real_error_answers_match_their_documented_schema(api: TestClient, spec: dict[str, Any]) -> None:
    invalid = api.post("/v1/jobs", json={"prompt": "x", "steps": -1})
    assert invalid.status_code == 422 and invalid.json()["error"]["field"] == "steps"
    conforms(spec, invalid.json(), PROBLEM)
    missing = api.get("/v1/jobs/job_nope")
    assert missing.status_code == 404
    conforms(spec, missing.json(), PROBLEM)
    openai = api.post("/v1/images/generations", json={"prompt": ""})
    assert openai.status_code == 400 and openai.json()["error"]["param"] == "prompt"
    conforms(spec, openai.json(), OPENAI_ERROR)


def test_a_body_that_is_not_json_is_an_invalid_request_naming_the_body(api: TestClient) -> None:
    """FastAPI answers an unparseable body with a bare 400; darkroom's answer to bad input is 422 with the field."""
    response = api.post("/v1/jobs", content=b"\x80{", headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_request" and response.json()["error"]["field"] == "body"
