"""Model versions through the real app and CLI functions on a real SQLite store: a changed model file is refused
until an operator approves it, then served; rollback restores the old version's bytes and makes it the one used;
disable stops a model; a job records the version it was admitted with."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from fastapi.testclient import TestClient

from darkroom.api.app import create_app
from darkroom.auth.principal import Principal
from darkroom.config import Settings
from darkroom.models import lifecycle
from darkroom.service import Services

BASE = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 1, "model": "tiny-single"}
CLI = Principal.cli()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, models_dir):
    root = tmp_path_factory.mktemp("versioned-models")
    shutil.copy2(models_dir / "tiny-single.safetensors", root / "tiny-single.safetensors")
    svc = Services.open(Settings(data_dir=tmp_path_factory.mktemp("versions-data"), models_dir=root))
    with TestClient(create_app(svc, workers=0)) as client:
        yield client, svc, root / "tiny-single.safetensors"
    svc.close()


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_changed_file_is_refused_until_approved_then_served_and_rollback_restores_the_old(setup):
    api, svc, weights = setup
    first = sha(weights)
    job = api.post("/v1/jobs", json=BASE)
    assert job.status_code == 202 and job.json()["request"]["model_sha256"] == first  # first seen: approved
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, other weights: what a botched copy or a silent update looks like
    weights.write_bytes(bytes(data))
    second = sha(weights)
    svc.registry.rescan()
    refused = api.post("/v1/jobs", json=BASE)
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["code"] == "model_not_approved" and second[:12] in refused.json()["error"]["message"]

    approved = api.post("/v1/models/tiny-single/approve")
    assert approved.status_code == 200 and approved.json()["current"] == second
    served = api.post("/v1/jobs", json=BASE)
    assert served.status_code == 202 and served.json()["request"]["model_sha256"] == second

    listed = api.get("/v1/models/tiny-single/versions").json()
    assert [v["sha256"] for v in listed["versions"]] == [first, second] and listed["on_disk"] == second
    assert listed["versions"][0]["added_by"] == "system:first-seen" and listed["versions"][1]["approved_by"]

    record = lifecycle.act(svc, CLI, "rollback", "tiny-single", first[:12])  # what `darkroom models rollback` runs
    assert record.current == first and sha(weights) == first  # the kept copy is back in the models folder
    svc.registry.rescan()
    again = api.post("/v1/jobs", json=BASE)
    assert again.status_code == 202 and again.json()["request"]["model_sha256"] == first


def test_disable_refuses_the_model_and_enable_serves_it_again(setup):
    api, svc, _ = setup
    assert api.post("/v1/models/tiny-single/disable").json()["disabled"] is True
    refused = api.post("/v1/jobs", json=BASE)
    assert refused.status_code == 409 and "disabled" in refused.json()["error"]["message"]
    assert api.post("/v1/models/tiny-single/enable").json()["disabled"] is False
    assert api.post("/v1/jobs", json=BASE).status_code == 202


def test_the_engine_fails_a_job_whose_model_changed_since_submit(setup):
    from darkroom.errors import ModelLoadError
    from darkroom.models.verify import check_pinned_version
    from darkroom.schemas import GenerationRequest

    _, svc, _ = setup
    info = svc.registry.get("tiny-single")
    stale = GenerationRequest(prompt="x", model="tiny-single", model_sha256="0" * 64)
    with pytest.raises(ModelLoadError, match="changed since the job was queued"):
        check_pinned_version(info, stale)
    check_pinned_version(info, stale.model_copy(update={"model_sha256": info.sha256}))


def test_a_changed_file_waits_for_approval_on_postgresql(pg_url, tmp_path, models_dir):
    """The same rules on PostgreSQL: records written inside the submit transaction, a racing first insert tolerated."""
    root = tmp_path / "models"
    root.mkdir()
    weights = root / "tiny-single.safetensors"
    shutil.copy2(models_dir / "tiny-single.safetensors", weights)
    svc = Services.open(Settings(data_dir=tmp_path / "data", models_dir=root, database_url=pg_url))
    try:
        with TestClient(create_app(svc, workers=0)) as api:
            assert api.post("/v1/jobs", json=BASE).status_code == 202
            data = bytearray(weights.read_bytes())
            data[-1] ^= 0xFF
            weights.write_bytes(bytes(data))
            svc.registry.rescan()
            assert api.post("/v1/jobs", json=BASE).json()["error"]["code"] == "model_not_approved"
            assert api.post("/v1/models/tiny-single/approve").json()["current"] == sha(weights)
            assert api.post("/v1/jobs", json=BASE).status_code == 202
    finally:
        svc.close()


def test_the_cli_lists_disables_and_enables(setup):
    from typer.testing import CliRunner

    from darkroom.cli import app

    api, svc, weights = setup
    where = ["--data-dir", str(svc.settings.data_dir), "--models-dir", str(weights.parent)]
    runner = CliRunner()
    listed = runner.invoke(app, ["models", "versions", "tiny-single", *where])
    assert listed.exit_code == 0 and sha(weights)[:12] in listed.output and "current" in listed.output, listed.output
    off = runner.invoke(app, ["models", "disable", "tiny-single", "--data-dir", str(svc.settings.data_dir)])
    assert off.exit_code == 0 and "disabled" in off.output, off.output
    assert api.post("/v1/jobs", json=BASE).status_code == 409  # the same process forgot what it remembered
    assert (
        runner.invoke(app, ["models", "enable", "tiny-single", "--data-dir", str(svc.settings.data_dir)]).exit_code == 0
    )
    unknown = runner.invoke(app, ["models", "rollback", "tiny-single", "deadbeef", *where])
    assert unknown.exit_code == 1 and "no version" in unknown.output


# --- the default: a file that appears while the service runs waits for an operator ------------------------------------

HELD = {"approve_first_seen_models": False}  # the default, stated: the suite's conftest turns it on for other modules


@pytest.fixture(scope="module")
def held(tmp_path_factory):
    root = tmp_path_factory.mktemp("held-models")
    svc = Services.open(Settings(data_dir=tmp_path_factory.mktemp("held-data"), models_dir=root, security=HELD))
    assert svc.settings.security.approve_first_seen_models is False
    with TestClient(create_app(svc, workers=0)) as client:
        yield client, svc, root
    svc.close()


def listed(api) -> tuple[set[str], set[str]]:
    """The checkpoint ids the native (and OpenAI) list and A1111's list offer."""
    native = {m["id"] for m in api.get("/v1/models").json()["data"]}
    return native, {m["model_name"] for m in api.get("/sdapi/v1/sd-models").json()}


def test_a_new_file_is_refused_and_not_listed_until_approved_then_served(held, models_dir):
    api, svc, root = held
    shutil.copy2(models_dir / "tiny-single.safetensors", root / "dropped.safetensors")
    shutil.copytree(models_dir / "tiny-single.config", root / "dropped.config")
    svc.registry.rescan()
    assert listed(api) == (set(), set())
    refused = api.post("/v1/jobs", json={**BASE, "model": "dropped"})
    assert refused.status_code == 409, refused.text
    error = refused.json()["error"]
    assert error["code"] == "model_not_approved" and error["field"] == "model"
    assert "not approved yet" in error["message"] and "darkroom models approve dropped" in error["message"]
    assert listed(api) == (set(), set())
    assert api.get("/v1/models/dropped/versions").status_code == 404  # a refused submit writes nothing

    assert api.post("/v1/models/dropped/approve").status_code == 200
    assert listed(api) == ({"dropped"}, {"dropped"})
    assert api.post("/v1/jobs", json={**BASE, "model": "dropped"}).status_code == 202


def test_darkroom_s_own_default_model_is_approved_as_written_but_a_lookalike_is_held(held, tmp_path, models_dir):
    from darkroom.demo.install import DEMO_MODEL_DIRNAME
    from darkroom.models.approvals import OWN
    from darkroom.models.smoke import SMOKE_LABEL, SMOKE_MODEL_DIRNAME

    api, svc, root = held
    lookalike = root / SMOKE_MODEL_DIRNAME  # its name and label, not written by darkroom: held like any file
    shutil.copytree(models_dir / "tiny-diffusers", lookalike)
    (lookalike / "darkroom.json").write_text(json.dumps(SMOKE_LABEL))
    svc.registry.rescan()
    assert SMOKE_MODEL_DIRNAME not in listed(api)[0]
    assert api.post("/v1/jobs", json={**BASE, "model": SMOKE_MODEL_DIRNAME}).status_code == 409

    fresh = Services.open(Settings(data_dir=tmp_path / "data", models_dir=tmp_path / "models", security=HELD))
    try:
        fresh.ensure_default_model()  # what `make run` does on a fresh data dir: installs the demo model, approved
        with TestClient(create_app(fresh, workers=0)) as own:
            assert listed(own)[0] == {DEMO_MODEL_DIRNAME}
            assert own.post("/v1/jobs", json={**BASE, "model": DEMO_MODEL_DIRNAME}).status_code == 202
            versions = own.get(f"/v1/models/{DEMO_MODEL_DIRNAME}/versions").json()
            assert versions["versions"][-1]["approved_by"] == OWN
        assert [r.action for r in fresh.audit.export(action="model.approve")] == ["model.approve"]
    finally:
        fresh.close()


def test_an_operator_approves_and_rolls_back_on_the_ui_models_page(held):
    """Last in the module: it creates the first API key, after which the loopback API above would need one."""
    from darkroom.auth.principal import Role
    from tests.unit.test_web import sign_in

    api, svc, root = held
    weights = root / "dropped.safetensors"
    first = sha(weights)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    second = sha(weights)
    svc.registry.rescan()
    key, token = svc.keys.create(CLI, name="op", role=Role.operator, tenant="default")
    csrf = sign_in(api, token)
    page = api.get("/ui/models").text
    assert page.count('"badge pending">pending approval') == 2  # the changed file and the lookalike, for operators only
    assert api.post("/ui/models/dropped/approve", data={"csrf_token": csrf}, follow_redirects=False).status_code == 303
    page = api.get("/ui/models").text
    assert f'name="version" value="{first}"' in page and f'name="version" value="{second}"' not in page  # current

    assert api.post("/ui/models/dropped/rollback", data={"version": first}).status_code == 403  # CSRF first
    bad = api.post("/ui/models/dropped/rollback", data={"csrf_token": csrf, "version": "zz"})
    assert bad.status_code == 422 and "version" in bad.text
    done = api.post("/ui/models/dropped/rollback", data={"csrf_token": csrf, "version": first}, follow_redirects=False)
    assert done.status_code == 303
    assert sha(weights) == first and lifecycle.versions(svc, "dropped")["current"] == first
    record = next(r for r in svc.audit.list(action="model.rollback") if r.target == "dropped")
    assert record.actor == key.id and record.details["current"] == first
