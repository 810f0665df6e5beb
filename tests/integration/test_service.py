"""The service as users run it: real `darkroom serve` / `darkroom worker` processes over loopback HTTP."""

from __future__ import annotations

import io
import json
import signal
import subprocess

import numpy as np
import pytest
from PIL import Image

from darkroom.client import Client
from darkroom.safety.provenance import read_png

from .harness import DARKROOM, Cluster, wait_until

pytestmark = pytest.mark.integration

SMALL = {"width": 64, "height": 64, "steps": 3}


@pytest.fixture
def cluster(tmp_path, models_dir):
    c = Cluster(tmp_path, models_dir)
    yield c
    c.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory, models_dir):
    """One `darkroom serve` with its worker process for the tests that only use it: starting a server and a worker
    (torch, the model) per test cost several seconds each."""
    c = Cluster(tmp_path_factory.mktemp("served"), models_dir)
    c.start_server(workers=1)
    yield c
    c.close()


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_cli_generate_writes_png_with_provenance(served, tmp_path):
    out = tmp_path / "out.png"
    done = subprocess.run(
        [
            DARKROOM,
            "generate",
            "a lighthouse at dusk",
            "-o",
            str(out),
            "--url",
            served.url,
            "--seed",
            "42",
            "--steps",
            "3",
            "--width",
            "64",
            "--height",
            "64",
            "--sampler",
            "DPM++ 2M",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr + served.logs()
    meta = read_png(out.read_bytes())
    prov = meta["provenance"]
    models = {m["id"]: m for m in Client(served.url).models()}
    assert prov["model"]["sha256"] == models[prov["model"]["id"]]["sha256"]
    assert prov["seed"] == 42 and prov["request"]["steps"] == 3 and prov["request"]["sampler"] == "DPM++ 2M"
    assert {"darkroom", "diffusers", "torch"} <= set(prov["versions"])
    assert "inference_s" in prov["timings"]
    params = meta["parameters"]
    assert params.startswith("a lighthouse at dusk\n")
    for part in (
        "Steps: 3",
        "Sampler: DPM++ 2M",
        "Seed: 42",
        "Size: 64x64",
        f"Model hash: {prov['model']['sha256'][:10]}",
    ):
        assert part in params


@pytest.mark.parametrize("fmt", ["diffusers", "single_file"])
def test_same_seed_same_pixels_different_seed_differs(served, fmt):
    with Client(served.url) as client:
        model = next(m["id"] for m in client.models() if m["format"] == fmt)
        http = client.http

        def run(seed: int) -> np.ndarray:
            job = http.post("/v1/generate", json={"prompt": "a red cube", "seed": seed, "model": model, **SMALL}).json()
            assert job["state"] == "succeeded", job
            return pixels(client.image(job["images"][0]["id"]))

        a, b, c = run(11), run(11), run(12)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_sse_stream_reports_queued_started_progress_succeeded(served):
    with Client(served.url) as client:
        job = client.submit({"prompt": "stream me", **SMALL, "steps": 4})
        events = list(client.events(job["id"]))
    kinds = [e["type"] for e in events]
    assert kinds[0] == "queued" and "started" in kinds and kinds[-1] == "succeeded", kinds
    steps = [e["step"] for e in events if e["type"] == "progress"]
    assert (
        steps == sorted(steps)
        and steps[-1] == 4
        and all(e.get("total") == 4 for e in events if e["type"] == "progress")
    )


def test_cancel_running_job_stops_at_next_step(served):
    with Client(served.url) as client:
        job = client.submit({"prompt": "long", "width": 256, "height": 256, "steps": 150})
        wait_until(lambda: client.job(job["id"])["progress"]["step"] >= 1, timeout=60, what="first step")
        client.cancel(job["id"])
        final = wait_until(
            lambda: (j := client.job(job["id"]))["state"] in ("cancelled", "succeeded") and j, timeout=30, what="cancel"
        )
        assert final["state"] == "cancelled"
        assert final["progress"]["step"] < 150
        # The worker goes on serving after a cancel.
        after = client.http.post("/v1/generate", json={"prompt": "next", **SMALL}).json()
        assert after["state"] == "succeeded"


def test_sigkilled_worker_job_finishes_exactly_once_on_another(cluster):
    cluster.start_server(workers=0)
    victim = cluster.start_worker("victim")
    with Client(cluster.url) as client:
        job = client.submit({"prompt": "survive", "width": 128, "height": 128, "steps": 100, "n": 2, "seed": 5})
        wait_until(
            lambda: client.job(job["id"])["progress"]["step"] >= 2,
            timeout=90,
            what="victim running the job\n" + cluster.logs(),
        )
        victim.kill(signal.SIGKILL)
        victim.popen.wait(10)
        cluster.start_worker("rescuer")
        final = wait_until(
            lambda: (j := client.job(job["id"]))["state"] not in ("queued", "running") and j,
            timeout=180,
            what="rescue\n" + cluster.logs(),
        )
        assert final["state"] == "succeeded", final
        assert final["attempts"] == 2
        assert [(i["index"], i["seed"]) for i in final["images"]] == [(0, 5), (1, 6)]
        assert final["provenance"]["worker"] == "rescuer"
        kinds = [e["type"] for e in client.events(job["id"])]
    assert kinds.count("succeeded") == 1 and kinds.count("started") == 2 and "requeued" in kinds
    pngs = list((cluster.data_dir / "blobs").rglob("*"))
    assert len([p for p in pngs if p.is_file()]) == 2


def test_sigterm_drain_loses_no_job(tmp_path, models_dir):
    cluster = Cluster(tmp_path, models_dir, env={"DARKROOM_DRAIN_SECONDS": "0.3"})
    try:
        cluster.start_server(workers=0)
        with Client(cluster.url) as client:
            body = {"prompt": "drain", "width": 192, "height": 192, "steps": 40}
            jobs = [client.submit({**body, "seed": s}) for s in range(3)]
            draining = cluster.start_worker("draining")
            wait_until(
                lambda: client.job(jobs[0]["id"])["progress"]["step"] >= 1,
                timeout=90,
                what="first job running\n" + cluster.logs(),
            )
            assert all(client.job(j["id"])["state"] == "running" for j in jobs)  # one claim took the batch
            draining.kill(signal.SIGTERM)
            assert draining.popen.wait(30) == 0, cluster.logs()
            states = [client.job(j["id"]) for j in jobs]
            assert [(s["state"], s["attempts"]) for s in states] == [("queued", 0)] * 3, states
            cluster.start_worker("successor")
            for job in jobs:
                final = wait_until(
                    lambda j=job: (v := client.job(j["id"]))["state"] == "succeeded" and v,
                    timeout=180,
                    what="successor\n" + cluster.logs(),
                )
                assert final["attempts"] == 1 and len(final["images"]) == 1
    finally:
        cluster.close()


def test_websocket_streams_progress_until_the_end(served):
    from websockets.sync.client import connect

    with Client(served.url) as client:
        job = client.submit({"prompt": "ws", **SMALL, "steps": 4})
        ws_url = served.url.replace("http://", "ws://") + f"/v1/jobs/{job['id']}/ws"
        with connect(ws_url, open_timeout=10) as ws:
            messages = []
            while True:
                try:
                    messages.append(json.loads(ws.recv(timeout=60)))
                except Exception:  # the server closes after the terminal event
                    break
    kinds = [m["type"] for m in messages]
    assert kinds[0] == "queued" and kinds[-1] == "succeeded", kinds
    assert [m["step"] for m in messages if m["type"] == "progress"][-1] == 4
