"""Per-tenant model access through the real app (TestClient, real SQLite store, real keys and tenant policies): a
tenant lists only what its allow-lists let it use, and a request for anything else is a 403 naming the model on the
native, A1111 and OpenAI APIs; policies with unknown fields are refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from safetensors.numpy import save_file

from darkroom.api.app import create_app
from darkroom.auth.principal import Principal, Role
from darkroom.auth.tenants import TenantPolicy
from darkroom.config import Settings
from darkroom.service import Services

CLI = Principal.cli()
SINGLE = {"sd_model_checkpoint": "tiny-single"}
BASE = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 1}


@pytest.fixture(scope="module")
def api(tmp_path_factory, models_dir):
    root = tmp_path_factory.mktemp("access-models")
    for entry in models_dir.iterdir():
        (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, root / entry.name)
    for name in ("brand-a-style", "shared-style"):  # the registry reads a LoRA's header and hash only
        (root / "loras").mkdir(exist_ok=True)
        save_file({"w": np.full((2, 2), len(name), dtype=np.float32)}, str(root / "loras" / f"{name}.safetensors"))
    (root / "embeddings").mkdir()
    save_file({"emb_params": np.ones((1, 32), dtype=np.float32)}, str(root / "embeddings" / "brandtoken.safetensors"))
    svc = Services.open(Settings(data_dir=tmp_path_factory.mktemp("access-data"), models_dir=root))
    svc.tenants.put("a", TenantPolicy(), CLI)
    svc.tenants.put("b", TenantPolicy(allowed_models=["checkpoint:tiny-single", "lora:shared-*"]), CLI)
    headers = {}
    for tenant in ("a", "b"):
        _, token = svc.keys.create(CLI, name=tenant, role=Role.user, tenant=tenant)
        headers[tenant] = {"Authorization": f"Bearer {token}"}
    _, admin = svc.keys.create(CLI, name="admin", role=Role.admin, tenant="default")
    headers["admin"] = {"Authorization": f"Bearer {admin}"}
    with TestClient(create_app(svc, workers=0)) as client:
        client.headers_for = headers  # type: ignore[attr-defined]
        yield client
    svc.close()


def test_listings_show_a_tenant_only_what_it_may_use(api):
    a, b = api.headers_for["a"], api.headers_for["b"]
    assert {m["id"] for m in api.get("/v1/models", headers=a).json()["data"]} == {"tiny-diffusers", "tiny-single"}
    assert [m["id"] for m in api.get("/v1/models", headers=b).json()["data"]] == ["tiny-single"]
    assert [m["model_name"] for m in api.get("/sdapi/v1/sd-models", headers=b).json()] == ["tiny-single"]
    assert {x["name"] for x in api.get("/sdapi/v1/loras", headers=a).json()} == {"brand-a-style", "shared-style"}
    assert [x["name"] for x in api.get("/sdapi/v1/loras", headers=b).json()] == ["shared-style"]
    # The ComfyUI API's folders and node options follow the same rules.
    assert api.get("/models/checkpoints", headers=b).json() == ["tiny-single"]
    assert [Path(x).stem for x in api.get("/models/loras", headers=b).json()] == ["shared-style"]
    assert len(api.get("/models/loras", headers=a).json()) == 2
    options = api.get("/object_info/CheckpointLoaderSimple", headers=b).json()["CheckpointLoaderSimple"]
    assert options["input"]["required"]["ckpt_name"][0] == ["tiny-single"]


def test_using_a_model_the_tenant_may_not_use_is_a_403_naming_it_on_every_api(api):
    b = api.headers_for["b"]
    native = api.post("/v1/jobs", json={**BASE, "loras": [{"name": "brand-a-style"}]}, headers=b)
    assert native.status_code == 403, native.text
    assert native.json()["error"]["code"] == "model_forbidden" and "brand-a-style" in native.json()["error"]["message"]
    a1111 = api.post(
        "/sdapi/v1/txt2img",
        json={"prompt": "x <lora:brand-a-style:0.5>", "steps": 1, "override_settings": SINGLE},
        headers=b,
    )
    assert a1111.status_code == 403 and "brand-a-style" in a1111.text
    checkpoint = api.post("/v1/jobs", json={**BASE, "model": "tiny-diffusers"}, headers=b)
    assert checkpoint.status_code == 403 and checkpoint.json()["error"]["field"] == "model"
    openai = api.post("/v1/images/generations", json={"prompt": "x", "model": "tiny-diffusers"}, headers=b)
    assert openai.status_code == 403 and "tiny-diffusers" in openai.json()["error"]["message"], openai.text
    # What the tenant may use still goes through; tenant A, without allow-lists, may use the LoRA.
    assert api.post("/v1/jobs", json={**BASE, "loras": [{"name": "shared-style"}]}, headers=b).status_code == 202
    assert (
        api.post(
            "/v1/jobs", json={**BASE, "loras": [{"name": "brand-a-style"}]}, headers=api.headers_for["a"]
        ).status_code
        == 202
    )


def test_an_unknown_model_name_lists_only_what_the_tenant_may_use(api):
    response = api.post("/v1/jobs", json={**BASE, "model": "nope"}, headers=api.headers_for["b"])
    assert response.status_code == 422 and "tiny-diffusers" not in response.json()["error"]["message"]


def test_a_policy_with_unknown_fields_or_a_bad_kind_is_refused(api):
    admin = api.headers_for["admin"]
    typo = api.put("/v1/tenants/c", json={"alowed_models": ["x"]}, headers=admin)
    assert typo.status_code == 422 and "alowed_models" in typo.text
    kind = api.put("/v1/tenants/c", json={"allowed_models": ["lorra:x"]}, headers=admin)
    assert kind.status_code == 422 and "lorra:x" in kind.text
    kinds = api.put("/v1/tenants/c", json={"allowed_kinds": ["checkpoint"]}, headers=admin)
    assert kinds.status_code == 200 and kinds.json()["allowed_kinds"] == ["checkpoint"]


def test_an_embedding_the_tenant_may_not_use_is_neither_listed_nor_applied(api):
    a, b = api.headers_for["a"], api.headers_for["b"]
    assert "brandtoken" in api.get("/sdapi/v1/embeddings", headers=a).json()["loaded"]
    assert api.get("/sdapi/v1/embeddings", headers=b).json()["loaded"] == {}
    body = {**BASE, "prompt": "a brandtoken mug", "model": "tiny-single"}
    mine = api.post("/v1/jobs", json=body, headers=a).json()["request"]["embeddings"]
    theirs = api.post("/v1/jobs", json=body, headers=b).json()["request"]["embeddings"]
    assert [e["name"] for e in mine] == ["brandtoken"] and theirs == []  # a plain word for b, and no 403 to leak it


def test_may_use_reads_kinds_then_patterns():
    from darkroom.models.access import may_use

    kinds = TenantPolicy(allowed_kinds=["checkpoint", "lora"])
    assert may_use(kinds, "lora", "x") and not may_use(kinds, "embedding", "x")
    patterns = TenantPolicy(allowed_models=["brand-?", "lora:acme-*"])
    assert may_use(patterns, "checkpoint", "brand-1") and may_use(patterns, "embedding", "brand-2")
    assert may_use(patterns, "lora", "acme-style") and not may_use(patterns, "checkpoint", "acme-style")
    assert not may_use(patterns, "lora", "Brand-1")  # case-sensitive, as ids are
    both = TenantPolicy(allowed_kinds=["checkpoint"], allowed_models=["lora:*", "*"])
    assert may_use(both, "checkpoint", "any") and not may_use(both, "lora", "any")
