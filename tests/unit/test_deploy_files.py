"""The deployment files parse, name the parts operations.md promises, and set only settings that exist.

Settings ignore unknown `DARKROOM_*` variables, so a typo in a manifest would silently fall back to a default; this
test resolves every such variable against `Settings` instead.
"""

from __future__ import annotations

import configparser
import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from darkroom.config import Settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = DEPLOY / "k8s"
PYPROJECT = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())


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


def dockerfile_stages() -> dict[str, dict[str, str]]:
    """Stage name → {"from": its base, "text": its own lines plus those of the stages it builds on}."""
    stages: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        match = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if match:
            base, name = match.groups()
            inherited = stages[base]["text"] if base in stages else ""
            current = stages[name or f"stage{len(stages)}"] = {"from": base, "text": inherited}
        elif current is not None and not line.lstrip().startswith("#"):
            current["text"] += line + "\n"
    return stages


def pip_installs(text: str) -> list[str]:
    return re.findall(r"pip install ([^\n&]+)", text)


def test_dockerfile_has_one_target_per_role():
    text = (DEPLOY / "Dockerfile").read_text()
    assert "ARG PYTHON_VERSION=3.11" in text
    stages = dockerfile_stages()
    assert {"api", "worker-cpu", "worker-cuda"} <= set(stages)
    pin = next(r for r in PYPROJECT["project"]["optional-dependencies"]["worker"] if r.startswith("torch=="))
    for name, stage in stages.items():
        if name in ("api", "worker-cpu", "worker-cuda"):
            assert 'ENTRYPOINT ["darkroom"]' in stage["text"], name

    api = stages["api"]
    assert stages[api["from"]]["from"] == "python:${PYTHON_VERSION}-slim"
    assert all("torch" not in line and "worker" not in line for line in pip_installs(api["text"]))
    assert '! python -c "import torch"' in api["text"]  # the build fails if anything pulls torch in
    assert 'CMD ["serve", "--workers", "0"]' in api["text"] and "HEALTHCHECK" in api["text"]

    for name in ("worker-cpu", "worker-cuda"):
        stage = stages[name]
        installs = pip_installs(stage["text"])
        assert any("'.[worker," in line and "c2pa" in line for line in installs), name  # workers sign
        assert any('"torch==${TORCH_VERSION}"' in line for line in installs), name
        assert f"ARG TORCH_VERSION={pin.removeprefix('torch==')}" in stage["text"], name
        assert 'CMD ["worker"]' in stage["text"] and "HEALTHCHECK" not in stage["text"], name
    cuda_image = re.search(r"ARG CUDA_IMAGE=(\S+)", text).group(1)  # type: ignore[union-attr]
    assert stages["worker-cuda"]["from"] == "${CUDA_IMAGE}" and cuda_image.startswith("nvidia/cuda:")
    assert re.search(r"ARG TORCH_CUDA_INDEX_URL=\S+/cu\d+", stages["worker-cuda"]["text"])
    assert re.search(r"ARG TORCH_INDEX_URL=\S+/cpu", stages["worker-cpu"]["text"])


def test_compose_and_k8s_use_the_role_images():
    stages = dockerfile_stages()
    services = load_yaml(DEPLOY / "docker-compose.yml")[0]["services"]
    assert services["api"]["build"]["target"] == "api"
    assert services["worker"]["build"]["target"] == "worker-cuda"  # it reserves a GPU
    assert {services[s]["build"]["target"] for s in ("api", "worker")} <= set(stages)
    images = {
        d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]["image"]
        for d in k8s_objects()
        if d["kind"] == "Deployment"
    }
    assert images["darkroom-api"] == "darkroom:api"
    assert images["darkroom-worker"].removeprefix("darkroom:") in ("worker-cuda", "worker-cpu")


def test_k8s_workers_mount_one_persistent_c2pa_identity_where_darkroom_reads_it(tmp_path):
    """The signing identity lives at <data dir>/c2pa (the worker's c2pa_dir); a pod's data dir is an emptyDir, so
    without the Secret each pod would make, and sign with, a certificate of its own that dies with it."""
    objects = k8s_objects()
    [config] = [o for o in objects if o["kind"] == "ConfigMap"]
    [worker] = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "darkroom-worker"]
    pod = worker["spec"]["template"]["spec"]
    [container] = pod["containers"]
    key_dir = f"{config['data']['DARKROOM_DATA_DIR']}/c2pa"
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == key_dir]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert mount.get("readOnly") is True and "secret" in volume and not volume["secret"].get("optional")
    files = {item["path"] for item in volume["secret"]["items"]}
    assert files == {"chain.pem", "key.pem", "ca.pem"}

    from darkroom.safety.c2pa_manifest import load_identity

    for name in files:  # the names darkroom reads: an identity already there is used as it is, never remade
        (tmp_path / name).write_bytes(name.encode())
    identity = load_identity(tmp_path)
    assert (identity.chain_pem, identity.key_pem, identity.ca_pem) == (b"chain.pem", b"key.pem", b"ca.pem")


def test_setting_lookup_rejects_typos():
    assert setting_exists("DARKROOM_STORAGE__S3_BUCKET") and setting_exists("DARKROOM_LIMITS__MAX_STEPS")
    assert not setting_exists("DARKROOM_STORAGE__S3_BUKET") and not setting_exists("DARKROOM_DATABASE")
