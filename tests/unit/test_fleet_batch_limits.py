"""The batch limit per model and size in the fleet view: a real worker on the tiny model runs a batch, its heartbeat
carries the limit its engine derived, and an operator sees it in `GET /v1/workers` and on the UI's queue page."""

from __future__ import annotations

import re
import threading
import time

from fastapi.testclient import TestClient

from darkroom.api.app import create_app
from darkroom.auth.principal import Principal, Role
from darkroom.config import Settings
from darkroom.engines.batch_limits import BatchLimits
from darkroom.jobs.workers import WorkerRegistry
from darkroom.schemas import GenerationRequest, JobState
from darkroom.service import Services
from darkroom.worker.loop import Worker

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def test_batch_limit_rows_name_the_model_size_and_an_oom_halving() -> None:
    limits = BatchLimits("cpu", headroom=0.85)
    limits.limit(("sd15", 512, 512), None, dtype=None, free=None)  # nothing known yet: no limit in force
    assert limits.rows() == []
    limits.after_oom(("", 1024, 1024), images=8)
    assert limits.rows() == [{"model": "default", "width": 1024, "height": 1024, "images": 4, "oom": True}]


def until(predicate, timeout: float = 60):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "timed out"
        threading.Event().wait(0.02)
    return value


def test_operators_see_each_workers_batch_limits_in_the_api_and_the_ui(tmp_path, models_dir) -> None:
    settings = Settings(
        data_dir=tmp_path / "data",
        models_dir=models_dir,
        heartbeat_seconds=0.05,
        progress_interval=0,
        max_batch=2,
        batch_window_seconds=0,
        batch_invariant=False,
        preload_models=["tiny-diffusers"],  # loaded before the batch, so its limit is derived from the model's shapes
        security={"approve_first_seen_models": True},
    )
    services = Services.open(settings)
    registry = WorkerRegistry(services.store.engine)
    _, operator = services.keys.create(Principal.cli(), name="op", role=Role.operator, tenant="default")
    _, user = services.keys.create(Principal.cli(), name="u", role=Role.user, tenant="default")
    worker = Worker(settings, services.store, services.blobs, services.make_engine, "gpu-limits", services.registry)
    stop = threading.Event()
    loop = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    try:
        body = {"prompt": "a red cube", "width": 64, "height": 64, "steps": 2, "model": "tiny-diffusers"}
        jobs = [services.store.create(GenerationRequest(**body, seed=seed))[0] for seed in (1, 2)]
        loop.start()
        until(lambda: all(services.store.get(job.id).state is JobState.succeeded for job in jobs))
        limits = until(lambda: registry.get("gpu-limits").batch_limits)  # the next heartbeat carries them
        assert limits[0]["model"] == "tiny-diffusers" and (limits[0]["width"], limits[0]["height"]) == (64, 64)
        assert limits[0]["images"] >= 2 and limits[0]["oom"] is False  # from free memory: a 64² batch fits plenty

        with TestClient(create_app(services)) as api:
            listed = api.get("/v1/workers", headers={"Authorization": f"Bearer {operator}"})
            assert listed.status_code == 200, listed.text
            (mine,) = [w for w in listed.json() if w["id"] == "gpu-limits"]
            assert mine["batch_limits"] == limits
            assert api.get("/v1/workers", headers={"Authorization": f"Bearer {user}"}).status_code == 403

            page = api.get("/")
            login = {"api_key": operator, "csrf_token": CSRF.search(page.text).group(1)}
            assert api.post("/ui/login", data=login, follow_redirects=False).status_code == 303
            html = api.get("/ui/queue").text
            assert "Batch limits" in html and f"tiny-diffusers 64×64: {limits[0]['images']}" in html
    finally:
        stop.set()
        loop.join(30)
        services.close()
