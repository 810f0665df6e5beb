"""Prompt templates and asset types through the real app (TestClient, real SQLite store, real keys): rendering with
typed variables, each 422 naming what is wrong, versions, fixed parameters, per-tenant scope, and A1111's styles and
/sdapi/v1/prompt-styles mapped onto them. No worker runs: what is checked is the job the API queues."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from darkroom.api.app import create_app
from darkroom.auth.principal import Principal, Role
from darkroom.config import Settings
from darkroom.service import Services

CLI = Principal.cli()
PRODUCT = {
    "prompt": "a photo of {product} on {surface}, {count} items",
    "negative_prompt": "blurry {product}",
    "variables": {
        "product": {"type": "string"},
        "surface": {"type": "string", "choices": ["wood", "marble"], "default": "wood"},
        "count": {"type": "integer"},
    },
    "steps": 2,
    "width": 64,
    "height": 64,
}


@pytest.fixture(scope="module")
def api(tmp_path_factory, models_dir):
    settings = Settings(data_dir=tmp_path_factory.mktemp("tpl-data"), models_dir=models_dir, sync_timeout_seconds=0.5)
    svc = Services.open(settings)
    headers = {}
    for name, role, tenant in (("op", Role.operator, "a"), ("a", Role.user, "a"), ("b", Role.user, "b")):
        _, token = svc.keys.create(CLI, name=name, role=role, tenant=tenant)
        headers[name] = {"Authorization": f"Bearer {token}"}
    with TestClient(create_app(svc, workers=0)) as client:
        client.headers_for = headers  # type: ignore[attr-defined]
        saved = client.put("/v1/templates/product", json=PRODUCT, headers=headers["op"])
        assert saved.status_code == 200, saved.text
        yield client
    svc.close()


def submit(api, who: str, **body):
    return api.post("/v1/jobs", json=body, headers=api.headers_for[who])


def test_a_template_renders_its_typed_variables_and_fixed_parameters(api):
    job = submit(api, "a", template="product", variables={"product": "a teapot", "count": 3})
    assert job.status_code == 202, job.text
    request = job.json()["request"]
    assert request["prompt"] == "a photo of a teapot on wood, 3 items"
    assert request["negative_prompt"] == "blurry a teapot"
    assert request["template"] == "product@1" and request["steps"] == 2 and request["width"] == 64


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"template": "product", "variables": {"count": 3}}, "variables.product"),  # missing
        ({"template": "product", "variables": {"product": "x", "count": 3, "colour": "red"}}, "variables.colour"),
        ({"template": "product", "variables": {"product": "x", "count": "three"}}, "variables.count"),  # ill-typed
        ({"template": "product", "variables": {"product": "x", "count": True}}, "variables.count"),  # a bool is no int
        ({"template": "product", "variables": {"product": "x", "count": 1, "surface": "glass"}}, "variables.surface"),
        ({"template": "product", "variables": {"product": "x", "count": 1}, "steps": 9}, "steps"),  # fixed
        ({"template": "nope"}, "template"),
        ({"prompt": "x", "variables": {"product": "x"}}, "variables"),
    ],
)
def test_each_bad_template_request_is_a_422_naming_it(api, body, field):
    response = submit(api, "a", **body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field


def test_templates_are_versioned_and_per_tenant(api):
    headers = api.headers_for
    second = api.put("/v1/templates/product", json={**PRODUCT, "steps": 3}, headers=headers["op"]).json()
    assert [v["version"] for v in second["versions"]] == [1, 2]
    newest = submit(api, "a", template="product", variables={"product": "x", "count": 1}).json()["request"]
    pinned = submit(api, "a", template="product@1", variables={"product": "x", "count": 1}).json()["request"]
    assert (newest["template"], newest["steps"]) == ("product@2", 3) and (pinned["template"], pinned["steps"]) == (
        "product@1",
        2,
    )
    assert submit(api, "b", template="product", variables={"product": "x", "count": 1}).status_code == 422
    assert api.get("/v1/templates", headers=headers["b"]).json() == []
    assert api.put("/v1/templates/other", json=PRODUCT, headers=headers["a"]).status_code == 403  # users only read
    undeclared = api.put("/v1/templates/bad", json={"prompt": "a {thing}"}, headers=headers["op"])
    assert undeclared.status_code == 422 and "thing" in undeclared.text


def test_an_asset_type_fixes_size_and_n(api):
    saved = api.put("/v1/asset-types/banner", json={"width": 128, "height": 64, "n": 2}, headers=api.headers_for["op"])
    assert saved.status_code == 200, saved.text
    job = submit(api, "a", prompt="a sale", asset_type="banner", steps=1)
    assert job.status_code == 202, job.text
    request = job.json()["request"]
    assert (request["width"], request["height"], request["n"], request["asset_type"]) == (128, 64, 2, "banner@1")
    assert submit(api, "a", prompt="a sale", asset_type="banner", width=64).json()["error"]["field"] == "width"


def test_a1111_styles_are_templates(api):
    op = api.headers_for["op"]
    style = {"prompt": "{prompt}, studio lighting", "negative_prompt": "lowres", "variables": {"prompt": {}}}
    assert api.put("/v1/templates/studio", json=style, headers=op).status_code == 200
    styles = {s["name"]: s for s in api.get("/sdapi/v1/prompt-styles", headers=op).json()}
    assert styles["studio"] == {"name": "studio", **{k: style[k] for k in ("prompt", "negative_prompt")}}
    body = {"prompt": "a cat", "styles": ["studio"], "steps": 1, "width": 64, "height": 64}
    waited = api.post("/sdapi/v1/txt2img", json=body, headers=op)  # no worker: the sync wait ends, the job is queued
    assert waited.status_code == 504, waited.text
    [queued] = [j for j in api.get("/v1/jobs", headers=op).json() if j["request"]["prompt"].startswith("a cat")]
    assert queued["request"]["prompt"] == "a cat, studio lighting" and queued["request"]["negative_prompt"] == "lowres"
    unknown = api.post("/sdapi/v1/txt2img", json={**body, "styles": ["nope"]}, headers=op)
    assert unknown.status_code == 422 and unknown.json()["error"]["field"] == "styles"
