"""The shipped Prometheus config authenticates to `/metrics` with the token the compose stack registers as a
`metrics` key, loads the alert rules in deploy/monitoring/, and passes `promtool check config` and `promtool check
rules` (Debian's `prometheus` package; scripts/test-services.sh)."""

from __future__ import annotations

import re
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


def test_compose_mounts_the_rules_where_the_config_loads_them():
    [rules] = load("prometheus.yml")["rule_files"]
    mounts = dict(
        v.rsplit(":", 1)[0].split(":", 1) for v in load("docker-compose.yml")["services"]["prometheus"]["volumes"]
    )
    assert mounts["./monitoring"] == str(Path(rules).parent)
    assert list((DEPLOY / "monitoring").glob(Path(rules).name))


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (scripts/test-services.sh)")
def test_promtool_accepts_the_config(tmp_path):
    """promtool also checks that the token file exists and every rule file parses: here the token is a file of the
    test's and the rules are read from deploy/monitoring/, where compose mounts them from."""
    config = load("prometheus.yml")
    key = tmp_path / "darkroom-metrics-key"
    key.write_text("dk_example_token\n")
    for job in config["scrape_configs"]:
        if "authorization" in job:
            job["authorization"]["credentials_file"] = str(key)
    config["rule_files"] = [str(DEPLOY / "monitoring" / Path(f).name) for f in config["rule_files"]]
    checked = tmp_path / "prometheus.yml"
    checked.write_text(yaml.safe_dump(config))
    done = subprocess.run(["promtool", "check", "config", str(checked)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"SUCCESS: [1-9]\d* rules found", done.stdout + done.stderr), "the rules were not loaded"
    rules = sorted(str(p) for p in (DEPLOY / "monitoring").glob("*.yml"))
    done = subprocess.run(["promtool", "check", "rules", *rules], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


PROMTOOL_TESTS = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'darkroom_queue_depth{{priority="normal"}}'
        values: '3x40'
      - series: 'darkroom_workers{{state="active"}}'
        values: '0x40'
      - series: 'darkroom_jobs_total{{state="succeeded",model="m"}}'
        values: '0+10x40'
      - series: 'darkroom_jobs_total{{state="failed",model="m"}}'
        values: '0+2x40'
      - series: 'up{{job="darkroom-api"}}'
        values: '1x40'
    alert_rule_test:
      - eval_time: 10m
        alertname: DarkroomNoActiveWorker
        exp_alerts:
          - exp_labels: {{severity: critical}}
            exp_annotations: {{summary: Jobs are queued and no worker is active}}
      - eval_time: 35m
        alertname: DarkroomJobErrorRateHigh
        exp_alerts:
          - exp_labels: {{severity: warning}}
            exp_annotations:
              summary: 16.67% of finished jobs failed
              description: See darkroom_job_errors_total by kind (oom, timeout, policy, engine, lease_lost).
      - eval_time: 35m
        alertname: DarkroomMetricsDown
        exp_alerts: []
"""


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (scripts/test-services.sh)")
def test_the_alerts_fire_on_the_series_they_watch(tmp_path):
    """`promtool test rules`: queued jobs with no active worker, and 2 of 12 finished jobs failing, raise their
    alerts; a scrape that works raises none."""
    spec = tmp_path / "rules_test.yml"
    spec.write_text(PROMTOOL_TESTS.format(rules=DEPLOY / "monitoring" / "darkroom-rules.yml"))
    done = subprocess.run(["promtool", "test", "rules", str(spec)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
