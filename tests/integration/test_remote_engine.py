"""Remote engines (engines/remote_*.py), with real servers on loopback.

The remote is a `darkroom serve` process with a worker thread serving the tiny model behind an admin key; the front
is a darkroom app in the test's process whose worker thread runs `engine = darkroom` against it, its key read from a
file. Both share one models folder, so the front accepts the model it sends on. The same remote process stands in
for an A1111 and a ComfyUI server (darkroom's compatible APIs); a small OpenAI-compatible server in this process
(tests/support/openai_images.py) stands in for a cloud. The tests run in order on one pair of processes; the last one
kills the remote mid-job.
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
from darkroom.config import (
    RecoverySettings,
    RemoteEngineSettings,
    RoutingSettings,
    SecuritySettings,
    Settings,
    WebhookSettings,
)
from darkroom.engines.remote_a1111 import A1111Engine
from darkroom.engines.remote_comfyui import ComfyUIEngine
from darkroom.engines.remote_darkroom import RemoteDarkroomEngine
from darkroom.engines.remote_openai import OpenAIImagesEngine
from darkroom.errors import EngineError, FatalEngineError, JobCancelled
from darkroom.schemas import GenerationRequest
from darkroom.service import Services
from darkroom.worker.loop import Worker
from tests.support.openai_images import COLOUR, OpenAIImagesServer

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
            security=SecuritySettings(watermark=False, approve_first_seen_models=True),  # the front's pixels: remote's
            webhooks=WebhookSettings(enabled=False),
            recovery=RecoverySettings(fatal_backoff_seconds=0.2, max_backoff_seconds=1.0),  # a dead remote: re-check
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
        p.services = services
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
    """A refused request fails for good naming its field; a rejected key or a remote that does not answer is the
    engine's fault (the job goes back uncharged and the worker re-checks the remote before it claims again)."""
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
        with pytest.raises(FatalEngineError):  # nobody answers: the engine's fault, the job goes back uncharged
            engine.generate(request, None, lambda step, total: None)
        assert not engine.health().ok


def test_engines_lists_the_configured_engine_with_capabilities_and_health(pair, tmp_path, models_dir):
    (remote,) = pair.front.get("/v1/engines").json()
    assert remote["name"] == "darkroom-remote" and remote["target"] == f"127.0.0.1:{pair.remote.port}"
    assert remote["health"]["ok"] is True and remote["capabilities"]["external"] is False
    assert remote["health"]["latency_ms"] > 0 and remote["capacity"]["circuit"] == "closed"
    assert remote["capacity"]["labels"] == ["confidential", "internal", "public"]  # inside the deployment: any
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


TINY = {"model": "tiny-diffusers", "width": 64, "height": 64, "steps": 2, "seed": 7}
LONG = {"model": "tiny-diffusers", "width": 128, "height": 128, "steps": 150, "n": 2, "seed": 1}


class Steps:
    """A progress callback that records the steps it saw and, once `cancel_at` is reached, cancels the run."""

    def __init__(self, cancel_at: int | None = None) -> None:
        self.seen: list[tuple[int, int]] = []
        self.cancel_at = cancel_at

    def __call__(self, step: int, total: int) -> None:
        self.seen.append((step, total))
        if self.cancel_at is not None and step >= self.cancel_at:
            raise JobCancelled("cancelled by request")


def _remote_job(pair: Pair, prompt: str) -> dict | None:
    jobs = pair.remote_http.get("/v1/jobs").json()
    return next((j for j in jobs if j["request"]["prompt"] == prompt), None)


def _cancels_the_remote_job(pair: Pair, engine: A1111Engine | ComfyUIEngine, prompt: str) -> None:
    request = GenerationRequest(prompt=prompt, **LONG)
    with pytest.raises(JobCancelled):
        engine.generate(request, None, Steps(cancel_at=1))
    pair.wait(lambda: (j := _remote_job(pair, prompt)) is not None and j["state"] == "cancelled", "remote cancelled")


@pytest.mark.parametrize("kind", [A1111Engine, ComfyUIEngine])
def test_a1111_and_comfyui_engines_run_jobs_on_those_apis_relay_progress_and_cancel(pair, kind):
    """darkroom's own A1111 and ComfyUI APIs stand in for those servers (Basic auth: any user, the key)."""
    with contextlib.closing(kind(pair.remote.url, pair.token, username="ops", poll_seconds=0.2)) as engine:
        prompt = f"a harbour via {engine.kind}"
        result = engine.generate(GenerationRequest(prompt=prompt, n=2, **TINY), None, Steps())
        assert [i.seed for i in result.images] == [7, 8] and result.images[0].image.size == (64, 64)
        assert result.engine == f"{engine.kind}-remote" and result.remote["host"] == f"127.0.0.1:{pair.remote.port}"
        remote = _remote_job(pair, prompt)
        assert remote is not None and remote["state"] == "succeeded" and remote["request"]["seed"] == 7

        source = result.images[0].image
        again = engine.generate(GenerationRequest(prompt=f"{prompt} again", strength=0.5, **TINY), source, Steps())
        assert len(again.images) == 1
        assert _remote_job(pair, f"{prompt} again")["request"]["init_image"]  # type: ignore[index]

        with pytest.raises(EngineError) as refused:  # the server refuses the request: fails for good
            engine.generate(GenerationRequest(prompt="x", **{**TINY, "model": "no-such-model"}), None, Steps())
        assert refused.value.permanent
        _cancels_the_remote_job(pair, engine, f"a long one via {engine.kind}")  # after its progress reached us
    wrong = kind(pair.remote.url, "dk_wrong_key", poll_seconds=0.2)
    with contextlib.closing(wrong), pytest.raises(FatalEngineError):
        wrong.generate(GenerationRequest(prompt="x", **TINY), None, Steps())


def test_openai_engine_generates_and_edits_with_a_key_from_the_environment(pair, tmp_path, models_dir, monkeypatch):
    """Through a front worker: the secret comes from the environment and never reaches the database, and the
    cloud (external) never takes confidential work, however it was asked for."""
    secret = "sk-test-" + new_token()[1]
    monkeypatch.setenv("DARKROOM_TEST_OPENAI_KEY", secret)
    with OpenAIImagesServer(secret) as cloud:
        key_env = "DARKROOM_TEST_OPENAI_KEY"
        remote = RemoteEngineSettings(url=cloud.url, api_key_env=key_env, model="tiny-cloud", price_per_image=0.04)
        settings = pair.settings.model_copy(update={"data_dir": tmp_path / "cloud-front", "engine": "openai"})
        services = Services.open(settings.model_copy(update={"remote": remote}))
        try:
            with TestClient(create_app(services, workers=1)) as front:
                (listed,) = front.get("/v1/engines").json()
                assert listed["name"] == "openai-remote" and listed["capabilities"]["external"] is True
                assert listed["health"]["ok"] is True
                # The tenant's label is the floor: its public request is confidential, and stays off the cloud.
                assert front.put("/v1/tenants/default", json={"data_label": "confidential"}).status_code == 200
                body = {"prompt": "a cloud", "n": 2, "data_label": "public", **TINY}
                kept = front.post("/v1/jobs", json={**body, "prompt": "kept home"}).json()
                assert kept["request"]["data_label"] == "confidential"
                assert front.put("/v1/tenants/default", json={}).status_code == 200
                job_id = front.post("/v1/jobs", json=body).json()["id"]
                job = pair.wait(lambda: _ended(front, job_id), "the cloud job to end")
                assert job["state"] == "succeeded", job
                # The older job was first in line, yet the cloud's worker passed it over.
                assert front.get(f"/v1/jobs/{kept['id']}").json()["state"] == "queued"
                report = front.get("/v1/usage", params={"from": "2000-01-01", "group_by": "tenant"}).json()
                assert report["total"]["cost"] == pytest.approx(0.08)  # the cloud's spend: 2 images at its price
                assert job["provenance"]["engine"] == "openai-remote" and len(job["images"]) == 2
                png = front.get(f"/v1/images/{job['images'][0]['id']}").content
                assert tuple(_pixels(png)[0, 0]) == COLOUR
        finally:
            services.close()
        assert secret.encode() not in (settings.data_dir / "darkroom.db").read_bytes()
        (call,) = [c for c in cloud.calls if c.path == "/v1/images/generations"]
        assert call.fields == {
            "prompt": "a cloud",
            "n": 2,
            "size": "64x64",
            "model": "tiny-cloud",
            "response_format": "b64_json",
        }

        engine = OpenAIImagesEngine(cloud.url, secret, poll_seconds=0.05)
        with contextlib.closing(engine):
            source = Image.new("RGB", (64, 64), (0, 0, 0))
            mask = Image.new("L", (64, 64), 0)
            mask.paste(255, (0, 0, 32, 64))  # repaint the left half
            request = GenerationRequest(prompt="an edit", mask_image="blob:x", init_image="blob:y", **TINY)
            assert len(engine.generate(request, source, Steps(), mask_image=mask).images) == 1
            alpha = Image.open(io.BytesIO(cloud.calls[-1].files["mask"])).getchannel("A")
            assert (alpha.getpixel((0, 0)), alpha.getpixel((63, 0))) == (0, 255)  # transparent: repainted
            with pytest.raises(EngineError) as refused:
                engine.generate(GenerationRequest(prompt="please refuse", **TINY), None, Steps())
            assert refused.value.permanent and refused.value.field == "prompt"
        with contextlib.closing(OpenAIImagesEngine(cloud.url, "sk-wrong")) as wrong, pytest.raises(FatalEngineError):
            wrong.generate(GenerationRequest(prompt="x", **TINY), None, Steps())


def test_overflow_goes_to_the_remote_darkroom_and_confidential_work_stays_local(pair, tmp_path):
    """One queue, two workers: a remote darkroom (marked external) that takes overflow past three queued jobs, and a
    local diffusers worker. However long the local wait, the confidential job is left for the local worker."""
    rules = RoutingSettings(overflow_queue_depth=3)
    local = pair.settings.model_copy(
        update={"data_dir": tmp_path / "node", "engine": "diffusers", "postprocess_workers": 0}
    )
    remote = pair.settings.remote.model_copy(update={"external": True})
    overflow = local.model_copy(update={"engine": "darkroom", "remote": remote, "routing": rules})
    services = Services.open(local)
    store = services.store
    away = Worker(overflow, store, services.blobs, lambda: RemoteDarkroomEngine.from_settings(remote), "overflow")
    try:

        def submit(label: str, prompt: str) -> str:
            request = GenerationRequest(prompt=prompt, data_label=label, **TINY)
            return store.create(request)[0].id

        first = submit("public", "overflow 1")
        assert not away.run_once()  # one queued job: the local workers' to take
        secret, second = submit("confidential", "kept home"), submit("public", "overflow 2")
        assert away.run_once()  # three queued: the remote pool takes the public jobs (one claim, as a batch)
        assert [store.require(job).result["engine"] for job in (first, second)] == ["darkroom-remote"] * 2
        secrets = [secret, submit("confidential", "kept home"), submit("confidential", "kept home")]
        assert not away.run_once()  # three waiting again, but confidential: never the remote's
        assert {store.require(job).state.value for job in secrets} == {"queued"}
        home = Worker(local, store, services.blobs, services.make_engine, "local", registry=services.registry)
        assert home.run_once()  # the local worker takes them (one batch)
        for job in secrets:
            done = store.require(job)
            assert done.state.value == "succeeded" and done.result["engine"] != "darkroom-remote", done.result
        assert _remote_job(pair, "kept home") is None  # none reached the remote
    finally:
        if away._engine is not None:
            away._engine.close()
        services.close()


def test_a_remote_that_dies_mid_job_loses_no_job(pair, tmp_path):
    """The remote process is killed while it runs the front's job: the job goes back to the front's queue uncharged
    (the remote's fault, not the job's), the front's remote worker stops claiming while the remote is gone, and a
    local worker on the same queue runs the job instead. Runs last: the module's remote stays dead."""
    front = pair.front
    body = {**TINY, "prompt": "through a crash", "steps": 60, "width": 128, "height": 128}
    job_id = front.post("/v1/jobs", json=body).json()["id"]
    pair.wait(lambda: front.get(f"/v1/jobs/{job_id}").json()["progress"]["step"] >= 1, "the remote's progress here")
    pair.remote.server.kill()  # SIGKILL: no drain, no goodbye
    pair.remote.server.popen.wait(10)
    store = pair.services.store
    pair.wait(lambda: store.require(job_id).state.value == "queued", "the job back in the queue")
    local = Services.open(pair.settings.model_copy(update={"engine": "diffusers", "postprocess_workers": 0}))
    try:
        home = Worker(local.settings, store, pair.services.blobs, local.make_engine, "local", registry=local.registry)
        assert home.run_once()
    finally:
        local.close()
    job = front.get(f"/v1/jobs/{job_id}").json()
    assert job["state"] == "succeeded" and job["provenance"]["engine"] == "diffusers", job
    assert job["attempts"] == 1  # the crash charged no attempt: the remote's fault, not the job's
    assert [e.type for e in store.events_since(job_id)].count("requeued") == 1
