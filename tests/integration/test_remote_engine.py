"""Another darkroom as an engine (engines/remote_darkroom.py), with real servers on loopback.

The remote is a `darkroom serve` process with a worker thread serving the tiny model behind an admin key; the front
is a darkroom app in the test's process whose worker thread runs `engine = darkroom` against it, its key read from a
file. Both share one
models folder, so the front accepts the model it sends on. The tests run in order on one pair of processes.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from darkroom.api.app import create_app
from darkroom.auth.keys import new_token
from darkroom.config import RemoteEngineSettings, SecuritySettings, Settings, WebhookSettings
from darkroom.engines.remote_darkroom import RemoteDarkroomEngine
from darkroom.errors import EngineError, FatalEngineError, TransientEngineError
from darkroom.schemas import GenerationRequest
from darkroom.service import Services

from .harness import Cluster, free_port, wait_until

pytestmark = pytest.mark.integration

ONE_PROCESS = {"DARKROOM_WORKER_PROCESSES": "false", "DARKROOM_WEBHOOKS__ENABLED": "false"}


class Pair:
    """The remote as a real process; the front in this process (its app over TestClient, its worker a thread), which
    saves starting a second torch-importing server."""

    def __init__(self, tmp: Path, models_dir: Path) -> None:
        self.token = new_token()[1]
        self.remote = Cluster(
            tmp / "remote", models_dir, env={**ONE_PROCESS, "DARKROOM_SECURITY__BOOTSTRAP_ADMIN_KEY": self.token}
        )
        key_file = tmp / "remote.key"
        key_file.write_text(self.token + "\n")
        self.settings = Settings(
            data_dir=tmp / "front",
            models_dir=models_dir,
            engine="darkroom",
            remote=RemoteEngineSettings(url=self.remote.url, api_key_file=key_file, poll_seconds=0.2),
            progress_interval=0,
            security=SecuritySettings(watermark=False),  # the front's pixels are then the remote's, unchanged
            webhooks=WebhookSettings(enabled=False),
        )
        self.remote_http = httpx.Client(
            base_url=self.remote.url, timeout=60, headers={"Authorization": f"Bearer {self.token}"}
        )

    def wait(self, predicate, what: str, timeout: float = 60):  # type: ignore[no-untyped-def]
        try:
            return wait_until(predicate, timeout=timeout, interval=0.1, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.remote.logs()}") from None


@pytest.fixture(scope="module")
def pair(tmp_path_factory, models_dir):
    p = Pair(tmp_path_factory.mktemp("remote-engine"), models_dir)
    p.remote.tmp.mkdir(parents=True, exist_ok=True)
    try:
        p.remote.start_server(workers=1)
        services = Services.open(p.settings)
        with TestClient(create_app(services, workers=1)) as front:
            p.front = front
            yield p
        services.close()
    finally:
        p.remote_http.close()
        p.remote.close()


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_a_job_on_the_front_runs_on_the_remote_and_records_it(pair):
    front = pair.front
    body = {"prompt": "a lighthouse", "model": "tiny-diffusers", "width": 64, "height": 64, "steps": 2, "seed": 7}
    job_id = front.post("/v1/jobs", json=body).json()["id"]
    job = pair.wait(lambda: _ended(front, job_id), "the front's job to end")
    assert job["state"] == "succeeded", job
    prov = job["provenance"]
    assert prov["engine"] == "darkroom-remote"
    assert prov["remote"]["host"] == f"127.0.0.1:{pair.remote.port}"
    assert prov["model"]["id"] == "tiny-diffusers" and prov["seeds"] == [7]
    front_png = front.get(f"/v1/images/{job['images'][0]['id']}").content

    remote_job = pair.remote_http.get(f"/v1/jobs/{prov['remote']['job_id']}").json()
    assert remote_job["state"] == "succeeded" and remote_job["request"]["seed"] == 7
    remote_png = pair.remote_http.get(f"/v1/images/{remote_job['images'][0]['id']}").content
    assert np.array_equal(_pixels(front_png), _pixels(remote_png))  # the remote's pixels, not a local run's
    # The service key came from a file and is nowhere in the front's database.
    assert pair.token.encode() not in (pair.settings.data_dir / "darkroom.db").read_bytes()


def test_cancel_on_the_front_cancels_the_remote_job(pair):
    front = pair.front
    body = {"prompt": "a long one", "model": "tiny-diffusers", "width": 128, "height": 128, "steps": 150, "n": 4}
    job_id = front.post("/v1/jobs", json=body).json()["id"]
    pair.wait(lambda: front.get(f"/v1/jobs/{job_id}").json()["progress"]["step"] >= 1, "the remote's progress here")
    assert front.delete(f"/v1/jobs/{job_id}").status_code == 200
    assert pair.wait(lambda: _ended(front, job_id), "the front job to end")["state"] == "cancelled"

    def remote_job() -> dict | None:
        jobs = pair.remote_http.get("/v1/jobs").json()
        return next((j for j in jobs if j["request"]["prompt"] == "a long one"), None)

    pair.wait(lambda: (j := remote_job()) is not None and j["state"] == "cancelled", "the remote job cancelled")


def _ended(front: TestClient, job_id: str) -> dict | None:
    job = front.get(f"/v1/jobs/{job_id}").json()
    return job if job["state"] in {"succeeded", "failed", "dead", "cancelled"} else None


def test_remote_failures_are_classified_like_the_local_engines(pair):
    """A refused request fails for good naming its field; a rejected key is the engine's fault (the job goes back
    uncharged); a remote that does not answer is retried."""
    request = GenerationRequest(prompt="x", model="no-such-model", width=64, height=64, steps=1, seed=1)
    with contextlib.closing(RemoteDarkroomEngine(pair.remote.url, pair.token)) as engine:
        with pytest.raises(EngineError) as refused:
            engine.generate(request, None, lambda step, total: None)
        assert refused.value.permanent and refused.value.field == "model"
        assert engine.health().ok
    wrong_key = RemoteDarkroomEngine(pair.remote.url, "dk_wrong_key")
    with contextlib.closing(wrong_key), pytest.raises(FatalEngineError):
        wrong_key.generate(request.model_copy(update={"model": "tiny-diffusers"}), None, lambda s, t: None)
    with contextlib.closing(RemoteDarkroomEngine(f"http://127.0.0.1:{free_port()}", pair.token)) as engine:
        with pytest.raises(TransientEngineError):
            engine.generate(request, None, lambda step, total: None)
        assert not engine.health().ok


def test_engines_lists_the_configured_engine_with_capabilities_and_health(pair, tmp_path, models_dir):
    (remote,) = pair.front.get("/v1/engines").json()
    assert remote["name"] == "darkroom-remote" and remote["target"] == f"127.0.0.1:{pair.remote.port}"
    assert remote["health"]["ok"] is True and remote["capabilities"]["external"] is False
    assert "upscale" not in remote["capabilities"]["modes"]

    down = RemoteEngineSettings(url=f"http://127.0.0.1:{free_port()}", api_key_env="DARKROOM_TEST_UNSET_KEY")
    local = Settings(data_dir=tmp_path / "local", models_dir=models_dir, webhooks=WebhookSettings(enabled=False))
    for settings, ok, words in (
        (local, True, "workers of this process healthy"),
        (local.model_copy(update={"engine": "darkroom", "remote": down}), False, "DARKROOM_TEST_UNSET_KEY"),
    ):
        services = Services.open(settings)
        try:
            with TestClient(create_app(services, workers=0)) as client:
                (engine,) = client.get("/v1/engines").json()
            assert engine["health"]["ok"] is ok and words in engine["health"]["detail"], engine
        finally:
            services.close()
    assert engine["name"] == "darkroom-remote" and engine["capabilities"]["modes"] == []
