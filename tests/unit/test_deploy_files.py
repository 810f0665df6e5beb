"""The deployment files parse, name the parts operations.md promises, and set only settings that exist.

Settings ignore unknown `DARKROOM_*` variables, so a typo in a manifest would silently fall back to a default; this
test resolves every such variable against `Settings` instead.
"""

from __future__ import annotations

import configparser
import json
from pathlib import Path

import pytest
import yaml

from darkroom.config import Settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = DEPLOY / "k8s"


def load_yaml(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def setting_exists(name: str) -> bool:
    """`DARKROOM_STORAGE__S3_BUCKET` → Settings.storage.s3_bucket."""
    model: type = Settings
    for part in name.removeprefix("DARKROOM_").lower().split("__"):
        field = model.model_fields.get(part)
        if field is None:
            return False
        model = field.annotation if isinstance(field.annotation, type) else object
    return True


def check_env(names: list[str]) -> None:
    unknown = [n for n in names if n.startswith("DARKROOM_") and not setting_exists(n)]
    assert unknown == []


def test_every_yaml_and_json_file_parses():
    files = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml", ".json"))
    assert len(files) >= 9
    for path in files:
        docs = [json.loads(path.read_text())] if path.suffix == ".json" else load_yaml(path)
        assert docs and all(isinstance(d, dict) for d in docs), path


def test_compose_has_the_stack_and_reserves_a_gpu_for_the_worker():
    compose = load_yaml(DEPLOY / "docker-compose.yml")[0]
    services = compose["services"]
    assert {"api", "worker", "postgres", "minio", "prometheus"} <= set(services)
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert services["api"]["command"][:1] == ["serve"] and "--workers" in services["api"]["command"]
    assert services["worker"]["command"] == ["worker"]
    for name in ("api", "worker"):
        env = services[name]["environment"]
        check_env(list(env))
        assert env["DARKROOM_STORAGE__BLOB_BACKEND"] == "s3" and env["DARKROOM_DATABASE_URL"].startswith("postgresql+")
        assert (DEPLOY / services[name]["build"]["context"] / services[name]["build"]["dockerfile"]).is_file()
    volume = services["prometheus"]["volumes"][0].split(":")[0]
    assert (DEPLOY / volume).is_file()


def test_prometheus_scrapes_the_api():
    config = load_yaml(DEPLOY / "prometheus.yml")[0]
    targets = [t for job in config["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    assert "api:8000" in targets


def k8s_objects() -> list[dict]:
    kustomization = load_yaml(K8S / "kustomization.yaml")[0]
    return [doc for name in kustomization["resources"] for doc in load_yaml(K8S / name)]


def test_k8s_manifests_hold_every_kind_and_request_a_gpu():
    objects = k8s_objects()
    by_kind: dict[str, list[dict]] = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], []).append(obj)
    assert {"Deployment", "Service", "ConfigMap", "Secret", "PersistentVolumeClaim"} <= set(by_kind)
    deployments = {d["metadata"]["name"]: d for d in by_kind["Deployment"]}
    assert set(deployments) == {"darkroom-api", "darkroom-worker"}
    [worker] = deployments["darkroom-worker"]["spec"]["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    api_labels = deployments["darkroom-api"]["spec"]["template"]["metadata"]["labels"]
    [service] = by_kind["Service"]
    assert service["spec"]["selector"].items() <= api_labels.items()
    pvc = by_kind["PersistentVolumeClaim"][0]["metadata"]["name"]
    for deployment in deployments.values():
        volumes = deployment["spec"]["template"]["spec"]["volumes"]
        assert pvc in [v.get("persistentVolumeClaim", {}).get("claimName") for v in volumes]


def test_k8s_settings_exist():
    names: list[str] = []
    for obj in k8s_objects():
        if obj["kind"] == "ConfigMap":
            names += list(obj["data"])
        elif obj["kind"] == "Secret":
            names += list(obj["stringData"])
        elif obj["kind"] == "Deployment":
            names += [e["name"] for c in obj["spec"]["template"]["spec"]["containers"] for e in c.get("env", [])]
    assert "DARKROOM_DATABASE_URL" in names
    check_env(names)


@pytest.mark.parametrize(
    ("unit", "command"), [("darkroom-api.service", "darkroom serve"), ("darkroom-worker@.service", "darkroom worker")]
)
def test_systemd_units(unit, command):
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((DEPLOY / "systemd" / unit).read_text())
    service = parser["Service"]
    assert command in service["ExecStart"] and service["EnvironmentFile"] == "/etc/darkroom/darkroom.env"
    assert parser["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_env_example_names_real_settings():
    lines = (DEPLOY / "systemd" / "darkroom.env.example").read_text().splitlines()
    names = [line.split("=", 1)[0] for line in lines if line and not line.startswith("#")]
    assert "DARKROOM_DATABASE_URL" in names
    check_env(names)


def test_dockerfile_builds_on_python_311_slim_with_a_torch_index_arg():
    text = (DEPLOY / "Dockerfile").read_text()
    assert "ARG PYTHON_VERSION=3.11" in text and "FROM python:${PYTHON_VERSION}-slim" in text
    assert "ARG TORCH_INDEX_URL=" in text and 'ENTRYPOINT ["darkroom"]' in text


def test_setting_lookup_rejects_typos():
    assert setting_exists("DARKROOM_STORAGE__S3_BUCKET") and setting_exists("DARKROOM_LIMITS__MAX_STEPS")
    assert not setting_exists("DARKROOM_STORAGE__S3_BUKET") and not setting_exists("DARKROOM_DATABASE")
