"""The client commands against real processes: `darkroom generate` shows its place in the queue while it waits and
prints seed, model and path at the end; `darkroom jobs list|show|cancel` read and change jobs over HTTP. One server
and one worker process serve every step (each start costs seconds)."""

from __future__ import annotations

import re
import subprocess

import httpx
import pytest
from typer.testing import CliRunner

from darkroom.cli import app
from darkroom.safety.provenance import read_png

from .harness import DARKROOM, Cluster, wait_until

pytestmark = pytest.mark.integration

SMALL = {"width": 64, "height": 64, "steps": 3, "model": "tiny-diffusers"}


@pytest.fixture
def cluster(tmp_path, models_dir):
    c = Cluster(tmp_path, models_dir)
    yield c
    c.close()


def cli(*args: str) -> str:
    done = CliRunner().invoke(app, list(args))
    assert done.exit_code == 0, done.output
    return done.stdout


def test_generate_waits_in_the_queue_then_prints_seed_model_and_path(cluster, tmp_path):
    cluster.start_server(workers=0)  # no worker yet: everything stays queued
    with httpx.Client(base_url=cluster.url, timeout=30) as http:
        ahead = [http.post("/v1/jobs", json={"prompt": f"ahead {i}", **SMALL}).json()["id"] for i in range(2)]
    out = tmp_path / "out.png"
    log = tmp_path / "generate.log"
    with log.open("w") as fh:
        args = ["a lighthouse", "-o", str(out), "--url", cluster.url, "--seed", "7", "--steps", "3"]
        args += ["--width", "64", "--height", "64", "--model", "tiny-diffusers"]
        gen = subprocess.Popen([DARKROOM, "generate", *args], stdout=subprocess.PIPE, stderr=fh, text=True)
        try:
            wait_until(lambda: "#3 in queue, ETA" in log.read_text(), timeout=30, what=f"#3 in {log.read_text()}")
            mine = re.search(r"(job_\w+) queued", log.read_text()).group(1)

            listed = cli("jobs", "list", "--url", cluster.url, "--state", "queued")
            assert all(job_id in listed for job_id in [*ahead, mine]) and "#1 in queue" in listed
            assert cli("jobs", "cancel", ahead[1], "--url", cluster.url).strip() == f"{ahead[1]} cancelled"
            wait_until(lambda: "#2 in queue" in log.read_text(), timeout=30, what="the queue to move")

            cluster.start_worker("w1")
            stdout, _ = gen.communicate(timeout=180)
        finally:
            gen.kill()
    assert gen.returncode == 0, log.read_text() + cluster.logs()
    assert stdout.strip() == f"{out}  seed 7  model tiny-diffusers"
    assert read_png(out.read_bytes())["provenance"]["seed"] == 7
    assert f"{mine} running" in log.read_text() and f"{mine} succeeded" in log.read_text()

    shown = cli("jobs", "show", mine, "--url", cluster.url)
    assert "state    succeeded" in shown and "model    tiny-diffusers" in shown and "seed 7" in shown
    cancelled = cli("jobs", "show", ahead[1], "--url", cluster.url, "--json")
    assert '"state": "cancelled"' in cancelled

    missing = CliRunner().invoke(app, ["jobs", "show", "job_nope", "--url", cluster.url])
    assert missing.exit_code == 1 and "404 not_found: no job 'job_nope'" in missing.output
    down = CliRunner().invoke(app, ["jobs", "list", "--url", "http://127.0.0.1:9"])
    assert down.exit_code == 1 and "cannot reach http://127.0.0.1:9" in down.output
