"""Metrics across real processes: one scrape of `darkroom serve`'s `/metrics` covers the jobs its worker *process*
ran (prometheus-client's multiprocess files), and a `darkroom worker --metrics-port` serves its own endpoint.
Scrapes are read with prometheus-client's text parser; both servers start fresh, so values are exact."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .harness import DARKROOM, Cluster, free_port, wait_until

pytestmark = pytest.mark.integration

BODY = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 2, "n": 2, "seed": 3}


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, response.text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def cluster(tmp_path, models_dir):
    c = Cluster(tmp_path, models_dir)
    yield c
    c.close()


def test_one_scrape_of_serve_covers_its_worker_process(cluster):
    pytest.importorskip("darkroom.worker.processes", reason="serve's workers run as processes from that module on")
    server = cluster.start_server(workers=1)
    with cluster.client() as http:
        job = http.post("/v1/generate", json=BODY).json()
    assert job["state"] == "succeeded", cluster.logs()
    model, worker = job["provenance"]["model"]["id"], job["provenance"]["worker"]
    samples = scrape(f"{cluster.url}/metrics")

    assert value(samples, "darkroom_jobs_submitted_total", api="native", priority="normal") == 1
    assert value(samples, "darkroom_jobs_total", state="succeeded", model=model) == 1
    assert value(samples, "darkroom_images_total") == 2
    assert value(samples, "darkroom_job_queue_wait_seconds_count", priority="normal") == 1
    assert value(samples, "darkroom_job_run_seconds_count", model=model, mode="txt2img") == 1
    assert value(samples, "darkroom_batch_size_count") == 1
    assert value(samples, "darkroom_model_load_seconds_count", model=model) == 1
    assert value(samples, "darkroom_model_cache_bytes") > 0
    assert value(samples, "darkroom_denoise_steps_per_second", worker=worker) > 0
    assert value(samples, "darkroom_device_seconds_total", tenant="default") > 0
    assert value(samples, "darkroom_workers", state="active") == 1
    # The job ran in another process: the worker's values come from files its own pid wrote.
    [folder] = (cluster.data_dir / "metrics").glob(f"serve-*-{server.pid}")
    writers = {int(f.stem.rsplit("_", 1)[1]) for f in folder.glob("counter_*.db")}
    assert server.pid in writers and len(writers) == 2, writers


def test_a_worker_elsewhere_serves_its_own_metrics_endpoint(cluster):
    cluster.start_server(workers=0)
    port = free_port()
    cluster._spawn([DARKROOM, "worker", "--worker-id", "w-remote", "--metrics-port", str(port)], "w-remote")
    with cluster.client() as http:
        job = http.post("/v1/generate", json=BODY).json()
    assert job["state"] == "succeeded", cluster.logs()
    model = job["provenance"]["model"]["id"]
    own = wait_until(lambda: _try_scrape(f"http://127.0.0.1:{port}/metrics"), timeout=30, what="worker endpoint")
    assert value(own, "darkroom_jobs_total", state="succeeded", model=model) == 1
    assert value(own, "darkroom_images_total") == 2
    assert value(own, "darkroom_denoise_steps_per_second", worker="w-remote") > 0
    api = scrape(f"{cluster.url}/metrics")  # the API's process: the submit, not the worker's run
    assert value(api, "darkroom_jobs_submitted_total", api="native", priority="normal") == 1
    assert value(api, "darkroom_jobs_total", state="succeeded", model=model) == 0
    assert value(api, "darkroom_workers", state="active") == 1


def _try_scrape(url: str) -> dict | None:
    try:
        return scrape(url)
    except httpx.HTTPError:
        return None
