"""The worker loop in-process: real SQLite store, real blob folder, the real diffusers engine on the tiny model."""

from __future__ import annotations

import base64
import gc
import io
import sys
import threading
import time
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

from darkroom.config import Settings
from darkroom.engines.diffusers_engine import DiffusersEngine
from darkroom.errors import EngineError
from darkroom.schemas import GenerationRequest, JobState
from darkroom.service import Services
from darkroom.storage.local import LocalBlobStore
from darkroom.worker.loop import Worker


@pytest.fixture
def services(tmp_path, models_dir):
    settings = Settings(
        data_dir=tmp_path / "data",
        models_dir=models_dir,
        heartbeat_seconds=0.05,
        progress_interval=0,
        max_batch=4,
        batch_window_seconds=0,
        retry_backoff_seconds=0,
    )
    svc = Services.open(settings)
    yield svc
    svc.close()


@pytest.fixture
def worker(services):
    w = Worker(services.settings, services.store, services.blobs, services.make_engine, worker_id="w1")
    yield w
    if w._engine is not None:
        w._engine.close()


def submit(services, **kw):
    body = {"prompt": "a red cube", "width": 64, "height": 64, "steps": 3, "seed": 1, "model": "tiny-diffusers", **kw}
    return services.store.create(GenerationRequest(**body))[0]


def pixels(services, job_id) -> list[np.ndarray]:
    return [
        np.asarray(Image.open(io.BytesIO(services.blobs.get(i.blob_key))).convert("RGB"))
        for i in services.store.images_for(job_id)
    ]


def test_priorities_are_served_in_order(services, worker):
    low = submit(services, priority="low")
    normal = submit(services, steps=4)
    high = submit(services, priority="high", steps=5)
    order = []
    while batch := worker.claim():
        order += [j.id for j in batch]
        worker.process_batch(batch)
    assert order == [high.id, normal.id, low.id]


def test_a_batch_invariant_job_is_pixel_identical_to_the_same_job_alone(services, worker):
    services.settings.batch_invariant = True  # bit-exact: each image its own pass, however jobs are batched
    batched = [submit(services, seed=s, prompt=p) for s, p in ((5, "a cat"), (6, "a dog"), (7, "a cat"))]
    batch = worker.claim()
    assert [j.id for j in batch] == [j.id for j in batched]  # one claim took all three
    worker.process_batch(batch)
    for job in batched:
        alone = submit(services, seed=job.request["seed"], prompt=job.request["prompt"])
        worker.process_batch(worker.claim())
        assert services.store.get(alone.id).state is JobState.succeeded
        assert all(
            np.array_equal(a, b) for a, b in zip(pixels(services, job.id), pixels(services, alone.id), strict=True)
        )


def test_cancel_stops_a_running_job_within_one_step(services, worker):
    job = submit(services, steps=40)
    seen = []
    original = services.store.progress

    def progress(job_id, worker_id, step, total, lease, **kw):
        seen.append(step)
        if step == 3:
            services.store.cancel(job_id)
        return original(job_id, worker_id, step, total, lease, **kw)

    services.store.progress = progress
    worker.process_batch(worker.claim())
    final = services.store.get(job.id)
    assert final.state is JobState.cancelled
    assert max(seen) == 3  # the step that saw the cancel request was the last one run


def test_a_job_over_its_time_limit_fails_with_timeout(services, worker):
    job = submit(services, steps=150, width=256, height=256, timeout_seconds=0.2)
    worker.process_batch(worker.claim())
    final = services.store.get(job.id)
    assert final.state is JobState.failed and final.error["code"] == "timeout"


def test_transient_errors_retry_then_dead_letter_and_permanent_fail_at_once(services, worker, monkeypatch):
    flaky = submit(services)
    calls = {"n": 0}

    def boom(*a, **k):
        calls["n"] += 1
        raise RuntimeError("driver hiccup")

    monkeypatch.setattr(worker.engine, "generate", boom)
    for _ in range(3):
        worker.run_once()
    dead = services.store.get(flaky.id)
    assert dead.state is JobState.dead and calls["n"] == 3 and "driver hiccup" in dead.error["message"]

    permanent = submit(services)

    def bad_file(*a, **k):
        raise EngineError("unreadable model file")

    monkeypatch.setattr(worker.engine, "generate", bad_file)
    worker.run_once()
    assert services.store.get(permanent.id).state is JobState.failed
    assert services.store.get(permanent.id).attempts == 1


def test_drain_gives_unstarted_and_unfinishable_jobs_back(services, worker):
    long_job = submit(services, steps=150, width=256, height=256)
    waiting = submit(services, steps=150, width=256, height=256, seed=2)
    services.settings.drain_seconds = 0.2
    batch = worker.claim()
    assert len(batch) == 2
    started = threading.Event()
    original = services.store.progress

    def progress(*args, **kw):
        started.set()
        return original(*args, **kw)

    services.store.progress = progress
    runner = threading.Thread(target=worker.process_batch, args=(batch,))
    runner.start()
    started.wait(30)
    worker.begin_drain()
    runner.join(30)
    for job in (long_job, waiting):
        back = services.store.get(job.id)
        assert back.state is JobState.queued and back.attempts == 0 and back.lease_owner is None


def test_worker_survives_a_job_that_fails_and_serves_the_next(services, worker):
    broken = submit(services, model="no-such-model")
    fine = submit(services, seed=3)
    worker.run_once()
    worker.run_once()
    assert services.store.get(broken.id).state is JobState.failed
    assert services.store.get(fine.id).state is JobState.succeeded


def test_memory_returns_to_baseline_after_load_unload_cycles(services):
    import psutil

    engine = DiffusersEngine(services.registry, cache_size=1)
    request = GenerationRequest(prompt="x", width=64, height=64, steps=1, seed=1, model="tiny-diffusers")
    other = request.model_copy(update={"model": "tiny-single"})
    proc = psutil.Process()

    def cycle() -> weakref.ref:
        engine.generate(request, None, lambda s, t: None)
        unet = weakref.ref(
            engine._cache.get(("tiny-diffusers", services.registry.get("tiny-diffusers").sha256)).txt2img.unet
        )
        engine.generate(other, None, lambda s, t: None)  # evicts tiny-diffusers (cache of one)
        return unet

    cycle()
    gc.collect()
    baseline = proc.memory_info().rss
    refs = [cycle() for _ in range(5)]
    gc.collect()
    assert all(r() is None for r in refs), "an unloaded pipeline is still referenced"
    growth = proc.memory_info().rss - baseline
    assert growth < 40 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB over 5 load/unload cycles"
    engine.close()


@pytest.fixture
def inject_oom(monkeypatch):
    """A real torch.OutOfMemoryError from the pipeline whenever it is asked for more than `limit` images at once."""
    from diffusers import StableDiffusionPipeline

    original = StableDiffusionPipeline.__call__
    state = {"limit": 1, "raised": 0}

    def call(self, *args, **kwargs):
        if kwargs.get("num_images_per_prompt", 1) > state["limit"]:
            state["raised"] += 1
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", call)
    return state


def test_oom_splits_the_batch_and_every_image_still_matches(services, worker, inject_oom):
    services.settings.batch_invariant = False  # one tensor batch per request: the case that can run out of memory
    job = submit(services, n=4, seed=20)
    worker.process_batch(worker.claim())
    final = services.store.get(job.id)
    assert final.state is JobState.succeeded and final.attempts == 1
    assert inject_oom["raised"] >= 2  # 4 → 2 + 2 → 1 + 1 + 1 + 1
    assert [i.seed for i in services.store.images_for(job.id)] == [20, 21, 22, 23]
    services.settings.batch_invariant = True
    invariant = Worker(services.settings, services.store, services.blobs, services.make_engine, worker_id="w2")
    alone = submit(services, n=4, seed=20)
    invariant.process_batch(invariant.claim())
    assert all(np.array_equal(a, b) for a, b in zip(pixels(services, job.id), pixels(services, alone.id), strict=True))


def test_a_single_image_too_big_fails_clearly_and_the_worker_goes_on(services, worker, inject_oom):
    inject_oom["limit"] = 0  # nothing fits
    job = submit(services)
    worker.run_once()
    final = services.store.get(job.id)
    assert final.state is JobState.failed and final.attempts == 1
    assert final.error["code"] == "out_of_memory" and "smaller size" in final.error["message"]
    inject_oom["limit"] = 1
    fine = submit(services, seed=9)
    worker.run_once()
    assert services.store.get(fine.id).state is JobState.succeeded


def test_previews_ride_on_progress_events_when_asked(services, worker):
    services.settings.preview_every_seconds = 0
    job = submit(services, steps=3, preview=True, width=128, height=128)
    plain = submit(services, steps=3, seed=2)
    worker.process_batch(worker.claim())
    previews = [e.data["preview"] for e in services.store.events_since(job.id) if "preview" in e.data]
    assert len(previews) == 3 and previews[0].startswith("data:image/jpeg;base64,")
    jpeg = Image.open(io.BytesIO(base64.b64decode(previews[-1].split(",", 1)[1])))
    assert jpeg.size == (16, 16)  # latents: an eighth of the image side
    assert not [e for e in services.store.events_since(plain.id) if "preview" in e.data]


def test_worker_claims_only_models_it_holds_in_the_approved_version(services):
    from darkroom.models.approvals import Approvals

    assert set(services.approve_models()) == {"tiny-diffusers", "tiny-single"}
    Approvals.for_services(services).approve("tiny-diffusers", "0" * 64, "", "test")  # approved bytes differ from ours
    worker = Worker(
        services.settings, services.store, services.blobs, services.make_engine, "w9", registry=services.registry
    )
    tampered = submit(services, model="tiny-diffusers")
    lacking = submit(services, model="not-on-this-node")
    fine = submit(services, model="tiny-single")
    assert worker.servable_models() == {"tiny-single"}
    while worker.run_once():
        pass
    assert services.store.get(fine.id).state is JobState.succeeded
    assert services.store.get(tampered.id).state is JobState.queued
    assert services.store.get(lacking.id).state is JobState.queued
    worker.engine.close()


def test_pipeline_cache_keeps_within_its_memory_budget(services):
    from darkroom.engines.diffusers_engine import pipeline_bytes
    from darkroom.worker.cache import LRUCache

    cache: LRUCache[str, str] = LRUCache(capacity=10, budget_bytes=100, release=lambda: None)
    cache.put("a", "A", size_bytes=60)
    cache.put("b", "B", size_bytes=30)
    cache.make_room(incoming_bytes=30)  # 60 + 30 + 30 > 100: the oldest goes
    assert cache.keys() == ["b"]
    cache.put("huge", "H", size_bytes=500)  # larger than the budget: kept, alone
    assert cache.keys() == ["huge"] and cache.used_bytes == 500

    engine = DiffusersEngine(services.registry, cache_size=4, cache_bytes=1)
    request = GenerationRequest(prompt="x", width=64, height=64, steps=1, seed=1, model="tiny-diffusers")
    engine.generate(request, None, lambda s, t: None)
    loaded = engine._cache.get(engine.loaded_models()[0])
    assert pipeline_bytes(loaded.txt2img) > 100_000
    engine.generate(request.model_copy(update={"model": "tiny-single"}), None, lambda s, t: None)
    assert [m for m, _ in engine.loaded_models()] == ["tiny-single"]  # the budget, not the count, evicted
    engine.close()


def test_preload_list_loads_models_before_the_first_job(services):
    services.settings.preload_models = ["tiny-single", "not-there"]
    worker = Worker(services.settings, services.store, services.blobs, services.make_engine, "w-pre")
    worker._preload()  # a missing model is logged, not fatal
    assert worker.held_models() == {"tiny-single"}
    worker.engine.close()


def test_two_worker_threads_both_register_and_claim_and_a_crashed_one_restarts(services, monkeypatch, caplog):
    """`serve --workers 2`: both threads run. The first start of one thread crashes where the torch import race
    crashed it (describing the device); the supervisor logs it, shows it and restarts it."""
    import time

    from darkroom.jobs.workers import WorkerRegistry
    from darkroom.worker import presence

    services.settings.max_batch = 1
    services.settings.recovery.restart_backoff_seconds = 0.05
    real, crashed = presence.describe_device, []

    def describe_device(device):
        if threading.current_thread().name == "worker-1" and not crashed:
            crashed.append(True)
            raise AttributeError("partially initialized module 'torch' has no attribute 'cuda'")
        return real(device)

    monkeypatch.setattr(presence, "describe_device", describe_device)
    jobs = [submit(services, seed=s, steps=8) for s in range(8)]
    services.start_workers(2)
    deadline = time.monotonic() + 120
    while not all(services.store.get(j.id).state is JobState.succeeded for j in jobs):
        assert time.monotonic() < deadline, "jobs did not finish"
        time.sleep(0.05)
    ran_on = {services.store.get(j.id).result["worker"] for j in jobs}
    health = services.worker_health()
    registered = {w.id for w in WorkerRegistry(services.store.engine).list()}
    assert len(ran_on) == 2 and ran_on <= registered and len(registered) == 2
    assert health["status"] == "ok" and health["workers"] == 2
    assert [s["crashes"] for s in health["slots"]] == [0, 1] and "torch" in health["slots"][1]["last_error"]
    assert "crashed" in caplog.text
    # One engine for the device (engines.shared): both threads ran on it, and it holds the model once.
    shared = {id(w.engine.shared) for w in services.workers}
    assert len(shared) == 1
    assert [m for m, _ in services.workers[0].engine.loaded_models()] == ["tiny-diffusers"]


def test_an_engine_share_closes_only_its_own_and_the_last_one_closes_the_engine(services):
    first, second = services.make_engine(), services.make_engine()
    assert first.shared is second.shared and services._engines.shares == 2
    first.close()
    first.close()  # once
    assert services._engines.shares == 1
    second.preload("tiny-diffusers")  # the engine is still open for the other share
    assert second.loaded_models()
    second.close()
    third = services.make_engine()
    assert third.shared is not second.shared and third.loaded_models() == []  # a fresh engine after the last close
    third.close()


class GatedBlobs(LocalBlobStore):
    """A slow storage layer: each upload waits until the test opens the gate. Everything else is the real thing."""

    def __init__(self, root) -> None:  # type: ignore[no-untyped-def]
        super().__init__(root)
        self.gate = threading.Event()
        self.uploading: list[str] = []  # one entry per upload that has started
        self.uploaded: list[str] = []

    def put(self, data: bytes, content_type: str) -> tuple[str, str]:
        self.uploading.append(content_type)
        assert self.gate.wait(120), "the test never opened the gate"
        result = super().put(data, content_type)
        self.uploaded.append(result[1])
        return result


def wait_until(predicate, timeout: float = 60.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_post_processing_overlaps_the_next_jobs_denoising_and_keeps_leases(services, tmp_path):
    services.settings.lease_seconds = 1.0  # heartbeats every 0.05 s keep it
    services.settings.batch_invariant = True  # the two jobs denoise one after the other, not as one tensor batch
    blobs = GatedBlobs(tmp_path / "slow-blobs")
    worker = Worker(services.settings, services.store, blobs, services.make_engine, worker_id="w-pipe")
    first, second = submit(services, seed=1, steps=4), submit(services, seed=2, steps=4)
    batch = worker.claim()
    assert [j.id for j in batch] == [first.id, second.id]
    runner = threading.Thread(target=worker.process_batch, args=(batch,))
    runner.start()
    try:
        wait_until(lambda: blobs.uploading, what="the first upload")
        # The device goes on with the second job while the first one's upload is held.
        wait_until(lambda: [e for e in services.store.events_since(second.id) if e.type == "progress"], what="job 2")
        assert not blobs.uploaded, "job 2 started only after job 1's upload"
        wait_until(lambda: len(blobs.uploading) == 2, what="the second upload")  # the device loop is over
        held = services.store.get(second.id).lease_expires_at
        wait_until(lambda: services.store.get(second.id).lease_expires_at > held, 10, "a heartbeat after denoising")
        assert services.store.requeue_expired() == []
    finally:
        blobs.gate.set()
        runner.join(60)
    for job in (first, second):
        final = services.store.get(job.id)
        assert final.state is JobState.succeeded and final.attempts == 1
    assert len(blobs.uploaded) == 2


class FailingBlobs(LocalBlobStore):
    def put(self, data: bytes, content_type: str) -> tuple[str, str]:
        raise RuntimeError("bucket hiccup")


def test_a_post_processing_error_retries_the_job_like_any_other(services, tmp_path):
    worker = Worker(services.settings, services.store, FailingBlobs(tmp_path / "b"), services.make_engine, "w-f")
    job = submit(services)
    worker.process_batch(worker.claim())
    final = services.store.get(job.id)
    assert final.state is JobState.queued and final.error["code"] == "internal_error"
    assert "bucket hiccup" in final.error["message"]
    assert [e.type for e in services.store.events_since(job.id)][-1] == "retrying"


def test_drain_waits_for_images_in_post_processing(services, tmp_path):
    blobs = GatedBlobs(tmp_path / "slow-blobs")
    worker = Worker(services.settings, services.store, blobs, services.make_engine, worker_id="w-drain")
    stop = threading.Event()
    seen_at_exit = []

    def run() -> None:
        worker.run(stop)
        seen_at_exit.append(services.store.get(job.id).state)

    job = submit(services)
    runner = threading.Thread(target=run)
    runner.start()
    try:
        wait_until(lambda: blobs.uploading, what="the upload")
        worker.begin_drain()
    finally:
        blobs.gate.set()
        runner.join(60)
    assert seen_at_exit == [JobState.succeeded]


def test_an_idle_worker_loop_wakes_on_submit(services):
    """The worker thread sleeps on the change feed (fallback tick far away) and still starts each job at once."""
    services.settings.idle_poll_seconds = 60
    worker = Worker(services.settings, services.store, services.blobs, services.make_engine, "w-idle")
    stop = threading.Event()
    runner = threading.Thread(target=worker.run, args=(stop,))
    runner.start()
    try:
        first = submit(services, seed=1)
        wait_until(lambda: services.store.get(first.id).state is JobState.succeeded, what="the warm-up job")
        waits = []
        for seed in (2, 3, 4):
            job = submit(services, seed=seed)
            wait_until(lambda job=job: services.store.get(job.id).state is JobState.succeeded, 30, "the job")
            waits.append(services.store.get(job.id).result["timings"]["queue_wait_s"])
    finally:
        worker.begin_drain()
        stop.set()
        runner.join(60)
    assert max(waits) < 0.25, waits


def test_a_worker_thread_that_crashes_after_registering_shows_unhealthy_then_comes_back(services, monkeypatch):
    import time

    from darkroom.jobs.workers import WorkerRegistry, WorkerState

    services.settings.recovery.restart_backoff_seconds = 1.0
    real, crashed = Worker._loop, threading.Event()

    def _loop(self, stop):  # the first run dies after its worker registered (an unexpected error in the loop)
        if not crashed.is_set():
            crashed.set()
            raise RuntimeError("the loop blew up")
        return real(self, stop)

    monkeypatch.setattr(Worker, "_loop", _loop)
    services.start_workers(1)
    registry, worker_id = WorkerRegistry(services.store.engine), services.workers[0].id
    seen, deadline = [], time.monotonic() + 60
    while (state := getattr(registry.get(worker_id), "state", None)) is not WorkerState.active or not seen:
        assert time.monotonic() < deadline, f"states seen: {seen}"
        if state is WorkerState.unhealthy and not seen:
            seen.append(state)
            assert services.worker_health()["status"].startswith("error")
        time.sleep(0.02)
    assert seen == [WorkerState.unhealthy] and services.worker_health()["slots"][0]["crashes"] == 1
    job = submit(services)
    deadline = time.monotonic() + 60
    while services.store.get(job.id).state is not JobState.succeeded:
        assert time.monotonic() < deadline, "the restarted worker did not run the job"
        time.sleep(0.05)


def test_a_full_post_processing_pool_holds_the_device_back(services, tmp_path):
    """One post-processing thread: job 1 uploads (held), job 2 denoises and waits for the pool, and job 3 starts
    only once job 1 is written: finished images never pile up."""
    services.settings.postprocess_workers = 1
    services.settings.batch_invariant = True  # job after job, so the device meets the full pool between jobs
    blobs = GatedBlobs(tmp_path / "slow-blobs")
    worker = Worker(services.settings, services.store, blobs, services.make_engine, worker_id="w-full")
    jobs = [submit(services, seed=s, steps=3) for s in (1, 2, 3)]
    batch = worker.claim()
    assert len(batch) == 3
    runner = threading.Thread(target=worker.process_batch, args=(batch,))
    runner.start()

    def denoised(job) -> bool:  # type: ignore[no-untyped-def]
        return any(e.type == "progress" and e.data["step"] == 3 for e in services.store.events_since(job.id))

    def device_waits_for_the_pool() -> bool:
        frame, names = sys._current_frames().get(runner.ident), []
        while frame is not None:
            names.append(frame.f_code.co_name)
            frame = frame.f_back
        return bool(names) and names[0] == "wait" and "_hand_off" in names

    def third_started() -> bool:
        return any(e.type == "progress" for e in services.store.events_since(jobs[2].id))

    try:
        wait_until(lambda: blobs.uploading and denoised(jobs[1]), what="job 1 uploading and job 2 denoised")
        # Either the device thread blocks handing job 2 over (backpressure), or job 3 starts (images pile up).
        wait_until(lambda: device_waits_for_the_pool() or third_started(), what="the device to wait or go on")
    finally:
        blobs.gate.set()
        runner.join(60)
    events = {j.id: services.store.events_since(j.id) for j in jobs}
    first_written = next(e.id for e in events[jobs[0].id] if e.type == "succeeded")
    third_first_step = next(e.id for e in events[jobs[2].id] if e.type == "progress")
    assert third_first_step > first_written
    assert all(services.store.get(j.id).state is JobState.succeeded for j in jobs)


def test_a_batch_cut_short_by_a_database_error_stops_renewing_its_leases(services):
    """The store fails as the batch begins (the database restarting): nothing of the batch may stay leased, or its
    jobs would never run. Their leases run out and the reaper puts them back."""
    services.settings.lease_seconds = 0.5
    worker = Worker(services.settings, services.store, services.blobs, services.make_engine, worker_id="w-cut")
    jobs = [submit(services, seed=s) for s in (1, 2)]
    batch = worker.claim()
    assert len(batch) == 2
    original = services.store.start

    def start(job_id, worker_id):  # type: ignore[no-untyped-def]
        services.store.start = original
        raise RuntimeError("server closed the connection unexpectedly")

    services.store.start = start
    with pytest.raises(RuntimeError):
        worker.process_batch(batch)
    requeued: set[str] = set()
    wait_until(lambda: requeued.update(services.store.requeue_expired()) or len(requeued) == 2, 10, "the reaper")
    assert requeued == {j.id for j in jobs}
    assert all(services.store.get(j.id).state is JobState.queued for j in jobs)


def _call_counter(monkeypatch, fail_when=None):  # type: ignore[no-untyped-def]
    """Counts the real pipeline's calls and the images each asked for; `fail_when(prompts)` may return an exception
    for the real pipeline to raise, as a device or a bad request would."""
    from diffusers import StableDiffusionPipeline

    from darkroom.engines import prepare as preparing

    original, real_encode = StableDiffusionPipeline.__call__, preparing.encode
    calls: list[int] = []
    encoded: list[tuple[torch.Tensor, str]] = []  # a pass gets its prompts encoded ahead: each embedding's prompt

    def encode(pipe, request, *args, **kwargs):  # type: ignore[no-untyped-def]
        prepared = real_encode(pipe, request, *args, **kwargs)
        encoded.append((prepared.embeds["prompt_embeds"][0], request.prompt))
        return prepared

    def prompts_of(kwargs):  # type: ignore[no-untyped-def]
        if "prompt_embeds" in kwargs:
            return [next(p for e, p in encoded if torch.equal(e, row)) for row in kwargs["prompt_embeds"]]
        return kwargs["prompt"] if isinstance(kwargs["prompt"], list) else [kwargs["prompt"]]

    def call(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        prompts = prompts_of(kwargs)
        calls.append(len(prompts) * kwargs.get("num_images_per_prompt", 1))
        if fail_when is not None and (exc := fail_when(prompts)) is not None:
            raise exc
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", call)
    monkeypatch.setattr(preparing, "encode", encode)
    return calls


def test_compatible_jobs_run_as_one_tensor_batch_within_rounding_of_their_solo_runs(services, worker, monkeypatch):
    calls = _call_counter(monkeypatch)
    jobs = [submit(services, seed=5, prompt="a cat"), submit(services, seed=6, prompt="a dog", n=2)]
    jobs.append(submit(services, seed=7, prompt="a cat", negative_prompt="blurry"))
    worker.process_batch(worker.claim())
    assert calls == [4]  # every image of the three jobs in one pipeline call
    for job in jobs:
        final = services.store.get(job.id)
        assert final.state is JobState.succeeded and final.attempts == 1
        assert final.result["timings"]["batch_images"] == 4
    batched = {job.id: pixels(services, job.id) for job in jobs}
    for job in jobs:  # each alone, for its reference pixels
        alone = submit(services, **{k: job.request[k] for k in ("seed", "prompt", "negative_prompt", "n")})
        worker.process_batch(worker.claim())
        for a, b in zip(batched[job.id], pixels(services, alone.id), strict=True):
            diff = np.abs(a.astype(int) - b.astype(int))  # batch kernels round differently: a few levels at most
            assert diff.max() <= 6 and diff.mean() < 1.0, f"{job.request['prompt']}: {diff.max()}, {diff.mean():.2f}"
    assert calls[1:] == [1, 2, 1]


def test_a_job_cancelled_inside_a_batch_ends_alone_and_its_partners_finish(services, worker):
    jobs = [submit(services, seed=s, steps=12) for s in (1, 2, 3)]
    original = services.store.progress

    def progress(job_id, worker_id, step, total, lease, **kw):  # type: ignore[no-untyped-def]
        if job_id == jobs[1].id and step == 3:
            services.store.cancel(job_id)
        return original(job_id, worker_id, step, total, lease, **kw)

    services.store.progress = progress
    worker.process_batch(worker.claim())
    states = [services.store.get(j.id).state for j in jobs]
    assert states == [JobState.succeeded, JobState.cancelled, JobState.succeeded]
    assert [len(services.store.images_for(j.id)) for j in jobs] == [1, 0, 1]


def test_a_batch_the_pipeline_refuses_is_retried_job_by_job_so_only_the_bad_one_fails(services, worker, monkeypatch):
    def refuse(prompts):  # type: ignore[no-untyped-def]
        if "poison" in prompts:  # the pipeline's own check of one request's input, as diffusers raises it
            return ValueError("`prompt` cannot be used here")
        return None

    calls = _call_counter(monkeypatch, refuse)
    jobs = [submit(services, seed=1), submit(services, seed=2, prompt="poison"), submit(services, seed=3)]
    worker.process_batch(worker.claim())
    assert calls == [3, 1, 1, 1]
    assert [services.store.get(j.id).state for j in jobs] == [JobState.succeeded, JobState.failed, JobState.succeeded]
    assert all(services.store.get(j.id).attempts == 1 for j in jobs)


def test_a_device_failure_in_a_batch_releases_all_and_the_worker_goes_solo(services, worker, monkeypatch):
    def lose_device(prompts):  # type: ignore[no-untyped-def]
        return RuntimeError("CUDA error: an illegal memory access was encountered") if len(prompts) > 1 else None

    calls = _call_counter(monkeypatch, lose_device)
    services.settings.recovery.fatal_backoff_seconds = 0.001  # the pause ends before the next claim
    jobs = [submit(services, seed=s) for s in (1, 2)]
    worker.process_batch(worker.claim())
    assert [services.store.get(j.id).state for j in jobs] == [JobState.queued, JobState.queued]
    assert all(services.store.get(j.id).attempts == 0 for j in jobs)  # the device's fault: uncharged
    assert worker._solo
    worker.process_batch(worker.claim())  # one at a time now: the device copes
    assert calls[1:] == [1, 1]
    assert all(services.store.get(j.id).state is JobState.succeeded for j in jobs)
    assert not worker._solo


def test_out_of_memory_in_a_batch_halves_the_remembered_batch_limit(services, worker, monkeypatch):
    def oom(prompts):  # type: ignore[no-untyped-def]
        return torch.OutOfMemoryError("CUDA out of memory (more than 2 images)") if len(prompts) > 2 else None

    calls = _call_counter(monkeypatch, oom)
    first = [submit(services, seed=s) for s in (1, 2, 3, 4)]
    worker.process_batch(worker.claim())
    assert calls == [4, 2, 2]
    second = [submit(services, seed=s) for s in (5, 6, 7, 8)]
    worker.process_batch(worker.claim())
    assert calls[3:] == [2, 2]  # the limit is remembered: no second failure
    assert all(services.store.get(j.id).state is JobState.succeeded for j in first + second)
    assert all(services.store.get(j.id).attempts == 1 for j in first + second)
