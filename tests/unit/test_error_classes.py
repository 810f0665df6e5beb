"""Error classes end to end: the real diffusers engine raising inside its UNet, the real worker loop, a real full disk.

Faults are injected where the hardware would raise them: a forward hook on the tiny pipeline's UNet raises the
RuntimeError torch raises for a CUDA fault (or a shape error, or something unknown), and blobs go to a real tmpfs
that is filled up, so `write` itself fails with ENOSPC.
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from darkroom.api.app import create_app
from darkroom.config import RecoverySettings, Settings
from darkroom.engines.classify import classify
from darkroom.engines.diffusers_engine import DiffusersEngine, LoadedModel
from darkroom.errors import (
    EngineError,
    FatalEngineError,
    InvalidRequest,
    StorageFull,
    StorageUnavailable,
    TransientEngineError,
)
from darkroom.jobs.workers import WorkerRegistry, WorkerState
from darkroom.schemas import GenerationRequest, JobState
from darkroom.service import Services
from darkroom.storage import storage_health
from darkroom.storage.local import LocalBlobStore
from darkroom.worker.failures import fatal_failures
from darkroom.worker.loop import Worker

CUDA_FAULT = "CUDA error: an illegal memory access was encountered"
SHAPE_FAULT = "The size of tensor a (8) must match the size of tensor b (16) at non-singleton dimension 3"


class FaultyEngine(DiffusersEngine):
    """The real engine; the models named in `faults` get a UNet forward hook that raises `message`."""

    def __init__(self, *args: Any, faults: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.faults = faults

    def _load(self, info: Any) -> LoadedModel:
        loaded = super()._load(info)
        if message := self.faults.get(info.id):

            def fail(module: Any, inputs: Any, output: Any) -> None:
                raise RuntimeError(message)

            loaded.txt2img.unet.register_forward_hook(fail)
        return loaded


def wait_for(condition: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def services(tmp_path, models_dir) -> Iterator[Services]:
    settings = Settings(
        data_dir=tmp_path / "data",
        models_dir=models_dir,
        heartbeat_seconds=0.05,
        progress_interval=0,
        max_batch=1,
        batch_window_seconds=0,
        retry_backoff_seconds=0,
        poll_seconds=0.02,
        recovery=RecoverySettings(
            fatal_backoff_seconds=0.2, storage_backoff_seconds=0.3, max_backoff_seconds=2.0, poison_after=3
        ),
    )
    svc = Services.open(settings)
    yield svc
    svc.close()


def faulty_factory(services: Services, faults: dict[str, str]) -> Callable[[], DiffusersEngine]:
    return lambda: FaultyEngine(services.registry, device="cpu", faults=faults)


def submit(services: Services, **kw: Any):
    body = {"prompt": "a red cube", "width": 64, "height": 64, "steps": 2, "seed": 1, "model": "tiny-diffusers", **kw}
    return services.store.create(GenerationRequest(**body))[0]


def request(**kw: Any) -> GenerationRequest:
    body = {"prompt": "a cube", "width": 64, "height": 64, "steps": 2, "seed": 1, "model": "tiny-diffusers", **kw}
    return GenerationRequest(**body)


def run_worker(worker: Worker) -> tuple[threading.Event, threading.Thread]:
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    return stop, thread


# --- the engine classifies what its pipeline raises ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "expected", "permanent"),
    [
        (CUDA_FAULT, FatalEngineError, None),
        ("CUDA error: device-side assert triggered", FatalEngineError, None),
        ("NVML_SUCCESS == r INTERNAL ASSERT FAILED at CUDACachingAllocator.cpp", FatalEngineError, None),
        (SHAPE_FAULT, EngineError, True),
        ("something nobody planned for", TransientEngineError, False),
    ],
)
def test_the_engine_classifies_a_failure_inside_the_unet(services, message, expected, permanent):
    engine = FaultyEngine(services.registry, device="cpu", faults={"tiny-diffusers": message})
    try:
        with pytest.raises(expected) as caught:
            engine.generate(request(), None, lambda step, total: None)
    finally:
        engine.close()
    assert message in caught.value.message
    if permanent is not None:
        assert caught.value.permanent is permanent


def test_value_errors_are_the_request_and_device_errors_are_fatal_whatever_their_wording():
    assert isinstance(classify(ValueError("height must be divisible by 8")), InvalidRequest)
    accelerator = getattr(__import__("torch"), "AcceleratorError", None)
    if accelerator is not None:
        assert isinstance(classify(accelerator("unspecified")), FatalEngineError)


# --- the worker: a device failure is the worker's, not the job's ----------------------------------------------------


def test_a_device_failure_releases_the_job_uncharged_pauses_the_worker_and_it_recovers(services):
    faults = {"tiny-diffusers": CUDA_FAULT}
    engines: list[DiffusersEngine] = []

    def factory() -> DiffusersEngine:  # the first engine's device "breaks"; the rebuilt one works
        engine = FaultyEngine(services.registry, device="cpu", faults=faults if not engines else {})
        engines.append(engine)
        return engine

    worker = Worker(services.settings, services.store, services.blobs, factory, worker_id="gpu-1")
    job = submit(services)
    states: list[WorkerState] = []
    registry = WorkerRegistry(services.store.engine)
    stop, thread = run_worker(worker)
    try:
        wait_for(lambda: not worker.health.healthy, what="the worker to trip")
        released = services.store.get(job.id)
        assert fatal_failures(services.store.engine, job.id) == 1
        wait_for(
            lambda: (r := registry.get("gpu-1")) is not None and r.state is WorkerState.unhealthy, 10, "fleet view"
        )
        states.append(registry.get("gpu-1").state)
        wait_for(lambda: services.store.get(job.id).state is JobState.succeeded, what="the job to succeed")
        wait_for(lambda: worker.health.healthy, 10, "the worker to recover")
    finally:
        stop.set()
        thread.join(30)
    done = services.store.get(job.id)
    assert released.attempts == 0 or released.state is JobState.running  # released uncharged (or re-claimed already)
    assert done.attempts <= 1, "the device failure must not cost the job an attempt"
    assert len(engines) == 2, "the engine is rebuilt after a device failure"
    assert states == [WorkerState.unhealthy]


def test_a_poison_job_is_given_up_after_n_device_failures_while_other_jobs_go_on(services):
    # The single-file model "breaks the device" every time it runs; the other model is fine.
    factory = faulty_factory(services, {"tiny-single": CUDA_FAULT})
    worker = Worker(services.settings, services.store, services.blobs, factory, worker_id="gpu-1")
    poison = submit(services, model="tiny-single", priority="high")
    others = [submit(services, seed=s) for s in (2, 3)]
    stop, thread = run_worker(worker)
    try:
        terminal = lambda j: services.store.get(j.id).state.terminal  # noqa: E731
        wait_for(lambda: all(terminal(j) for j in (poison, *others)), 90, "every job to end")
    finally:
        stop.set()
        thread.join(30)
    given_up = services.store.get(poison.id)
    assert given_up.state is JobState.failed and given_up.error["code"] == "poison_job"
    assert fatal_failures(services.store.engine, poison.id) == services.settings.recovery.poison_after - 1
    assert all(services.store.get(j.id).state is JobState.succeeded for j in others)


# --- storage: a full disk backs off instead of burning attempts ----------------------------------------------------


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A real 256 KiB tmpfs (mounting needs root; elsewhere the test is skipped)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:  # ENOSPC: the disk is full
        pass
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_is_a_typed_507_and_readiness_says_so(small_disk):
    store = LocalBlobStore(small_disk / "blobs")
    assert store.health(min_free_bytes=16 * 1024) == "ok"
    fill(small_disk)
    with pytest.raises(StorageFull) as caught:
        store.put(os.urandom(64 * 1024), "image/png")
    assert caught.value.status == 507 and caught.value.code == "storage_full"
    assert storage_health(store).startswith("error: disk nearly full")


def test_an_unreachable_s3_store_is_a_503_not_a_500():
    import socket

    from darkroom.config import StorageSettings
    from darkroom.storage.s3 import S3BlobStore, make_client

    with socket.socket() as s:  # a port nobody listens on: connection refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = StorageSettings(
        blob_backend="s3",
        s3_bucket="b",
        s3_endpoint_url=f"http://127.0.0.1:{port}",
        s3_region="us-east-1",
        s3_access_key_id="k",
        s3_secret_access_key="s",
        s3_max_attempts=1,
    )
    store = S3BlobStore(make_client(settings), "b")
    with pytest.raises(StorageUnavailable) as caught:
        store.put(b"bytes", "image/png")
    assert caught.value.status == 503 and caught.value.code == "storage_unavailable"


def test_a_worker_rides_out_a_full_disk_without_burning_attempts(services, small_disk):
    blobs = LocalBlobStore(small_disk / "blobs")
    filler = fill(small_disk)
    worker = Worker(services.settings, services.store, blobs, services.make_engine, worker_id="w-disk")
    job = submit(services)
    stop, thread = run_worker(worker)
    try:
        wait_for(lambda: worker.health.view().condition.value == "storage_unavailable", what="a storage pause")
        assert services.store.get(job.id).state in (JobState.queued, JobState.running)
        wait_for(lambda: worker.health.view().failures >= 2, what="a second, longer pause")
        filler.unlink()  # an operator frees space
        wait_for(lambda: services.store.get(job.id).state is JobState.succeeded, what="the job after space is freed")
    finally:
        stop.set()
        thread.join(30)
    done = services.store.get(job.id)
    assert done.attempts <= 1, "storage outages must not cost attempts"
    events = services.store.events_since(job.id)
    released = [e for e in events if e.type == "requeued" and "storage_unavailable" in str(e.data.get("reason"))]
    assert 2 <= len(released) <= 4, "pauses double: a few retries, not a tight loop"


def test_an_upload_to_a_full_disk_answers_507(services, small_disk):
    services.blobs = LocalBlobStore(small_disk / "blobs")
    fill(small_disk)
    buf = io.BytesIO()
    Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3)).save(buf, format="PNG")
    body = {
        "prompt": "a cube",
        "width": 64,
        "height": 64,
        "steps": 2,
        "model": "tiny-diffusers",
        "init_image": base64.b64encode(buf.getvalue()).decode(),
    }
    with TestClient(create_app(services, workers=0)) as client:
        response = client.post("/v1/jobs", json=body)
    assert response.status_code == 507, response.text
    assert response.json()["error"]["code"] == "storage_full"
    assert services.store.counts().get("queued", 0) == 0
