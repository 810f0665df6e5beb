"""The health alerts and the Grafana board: stuck jobs and a low data disk raise their alerts (`promtool test rules`,
Debian's `prometheus` package, installed by scripts/test-services.sh), every dashboard query names metrics darkroom
exports, and the compose stack provisions the board and its data source where Grafana reads them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from darkroom.observability import metrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
GRAFANA = DEPLOY / "monitoring" / "grafana"

ALERT_TESTS = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'darkroom_jobs_stuck_total'
        values: '0x10 1x20'
      - series: 'darkroom_data_disk_low{{instance="api:8000"}}'
        values: '0x10 1x20'
      - series: 'darkroom_data_disk_free_bytes{{instance="api:8000"}}'
        values: '5e9x10 5e8x20'
    alert_rule_test:
      - eval_time: 9m
        alertname: DarkroomJobsStuck
        exp_alerts: []
      - eval_time: 12m
        alertname: DarkroomJobsStuck
        exp_alerts:
          - exp_labels: {{severity: warning}}
            exp_annotations:
              summary: "1 job(s) ran past their time limit without a step and were taken back"
              description: >-
                A worker kept its lease while its device stopped stepping (a hung kernel or thread); the jobs were
                requeued or failed. GET /v1/admin/health and the worker's log (job_id) say which.
      - eval_time: 13m
        alertname: DarkroomDataDiskLow
        exp_alerts: []
      - eval_time: 16m
        alertname: DarkroomDataDiskLow
        exp_alerts:
          - exp_labels: {{severity: critical}}
            exp_annotations:
              summary: "The data dir's disk has less free space than observability.disk_low_bytes"
              description: >-
                Workers pause on a full disk (storage_unavailable). darkroom_data_disk_free_bytes says how much is
                left; free space, or shorten retention.
"""


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (scripts/test-services.sh)")
def test_stuck_jobs_and_a_low_disk_raise_their_alerts(tmp_path):
    spec = tmp_path / "health_rules_test.yml"
    spec.write_text(ALERT_TESTS.format(rules=DEPLOY / "monitoring" / "darkroom-rules.yml"))
    done = subprocess.run(["promtool", "test", "rules", str(spec)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}
SCRAPE_TIME = {  # read from the store and NVML when scraped (metrics.StoreCollector, metrics.GpuCollector)
    "darkroom_queue_depth",
    "darkroom_workers",
    "darkroom_gpu_memory_used_bytes",
    "darkroom_gpu_memory_total_bytes",
    "darkroom_gpu_utilization_ratio",
}


def exported_names() -> set[str]:
    """Every sample name darkroom's metrics module defines, and the ones read at scrape time."""
    defined = [m for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)]
    return SCRAPE_TIME | {f"{m._name}{suffix}" for m in defined for suffix in SUFFIXES[m._type]}


def test_every_dashboard_query_names_metrics_darkroom_exports():
    board = json.loads((GRAFANA / "dashboards" / "darkroom.json").read_text())
    exprs = [t["expr"] for panel in board["panels"] for t in panel["targets"]]
    assert len(exprs) >= 15
    used = {name for expr in exprs for name in re.findall(r"\bdarkroom_[a-z_]+", expr)}
    assert used - exported_names() == set()
    for needed in ("darkroom_job_queue_wait_seconds_bucket", "darkroom_jobs_total", "darkroom_data_disk_free_bytes"):
        assert needed in used
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])


def test_compose_provisions_the_board_and_prometheus_for_grafana():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    grafana = compose["services"]["grafana"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"])
    assert mounts["./monitoring/grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "darkroom.yml").read_text())
    board_dir = provider["providers"][0]["options"]["path"]
    assert mounts["./monitoring/grafana/dashboards"] == board_dir
    source = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert source["datasources"][0]["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"] and "9090:9090" in compose["services"]["prometheus"]["ports"]
