"""The shipped Prometheus config authenticates to `/metrics` with the token the compose stack registers as a
`metrics` key, and passes `promtool check config` (Debian's `prometheus` package; scripts/test-services.sh)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def test_prometheus_scrapes_the_api_with_the_metrics_key_compose_hands_it():
    [api_job] = [job for job in load("prometheus.yml")["scrape_configs"] if job["job_name"] == "darkroom-api"]
    auth = api_job["authorization"]
    assert auth["type"] == "Bearer"
    compose = load("docker-compose.yml")
    [mounted] = compose["services"]["prometheus"]["configs"]
    assert mounted["target"] == auth["credentials_file"]
    token = compose["configs"][mounted["source"]]["content"]
    api_env = compose["services"]["api"]["environment"]
    assert api_env["DARKROOM_SECURITY__BOOTSTRAP_METRICS_KEY"] == token == "${DARKROOM_METRICS_KEY:-}"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (scripts/test-services.sh)")
def test_promtool_accepts_the_config(tmp_path):
    """promtool also checks that the token file exists: here it is a file of the test's, at the same place in the
    config as the one compose mounts."""
    config = load("prometheus.yml")
    key = tmp_path / "darkroom-metrics-key"
    key.write_text("dk_example_token\n")
    for job in config["scrape_configs"]:
        if "authorization" in job:
            job["authorization"]["credentials_file"] = str(key)
    checked = tmp_path / "prometheus.yml"
    checked.write_text(yaml.safe_dump(config))
    done = subprocess.run(["promtool", "check", "config", str(checked)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
