"""Cross-process wake-ups: a `darkroom worker` process starts a job submitted by another process at once, on SQLite
(its change feed sees the commit through `PRAGMA data_version`) and on PostgreSQL (LISTEN/NOTIFY). The worker's
fallback tick is set to a minute, so only a wake-up can explain a start within milliseconds."""

from __future__ import annotations

import json

import pytest

from darkroom.config import Settings, WebhookSettings
from darkroom.schemas import GenerationRequest, JobState
from darkroom.service import Services

from .harness import DARKROOM, Proc, wait_until

pytestmark = pytest.mark.integration

BODY = {"prompt": "a red cube", "width": 64, "height": 64, "steps": 2, "model": "tiny-diffusers"}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_worker_process_starts_a_job_from_another_process_without_poll_delay(backend, tmp_path, models_dir, request):
    data_dir = tmp_path / "data"
    url = request.getfixturevalue("pg_url") if backend == "postgresql" else None
    settings = Settings(data_dir=data_dir, models_dir=models_dir, database_url=url, webhooks=WebhookSettings())
    services = Services.open(settings)
    services.approve_models()
    env = {
        "DARKROOM_DATA_DIR": str(data_dir),
        "DARKROOM_MODELS_DIR": str(models_dir),
        "DARKROOM_IDLE_POLL_SECONDS": "60",
        "DARKROOM_POLL_SECONDS": "60",
        "DARKROOM_LEASE_SECONDS": "300",
        "DARKROOM_PRELOAD_MODELS": json.dumps(["tiny-diffusers"]),
        **({"DARKROOM_DATABASE_URL": url} if url else {}),
    }
    worker = Proc([DARKROOM, "worker", "--worker-id", "remote"], tmp_path / "worker.log", env)

    def finished(job_id: str) -> bool:
        if not worker.alive():
            raise AssertionError(f"the worker exited:\n{worker.output()}")
        return services.store.get(job_id).state is JobState.succeeded

    try:
        warm_up, _ = services.store.create(GenerationRequest(**BODY, seed=1))
        wait_until(lambda: finished(warm_up.id), timeout=240, what=f"the warm-up job\n{worker.output()}")
        waits = []
        for seed in (2, 3, 4):
            job, _ = services.store.create(GenerationRequest(**BODY, seed=seed))
            wait_until(lambda job=job: finished(job.id), timeout=30, interval=0.01, what="the job")
            waits.append(services.store.get(job.id).result["timings"]["queue_wait_s"])
    finally:
        worker.stop()
        services.close()
    assert max(waits) < 0.3, waits  # measured ~10-30 ms; the fallback tick is 60 s
