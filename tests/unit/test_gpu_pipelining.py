"""Device-side pipelining on the tiny real pipelines (CPU): a pass's prompts encoded and first latents drawn ahead
(`DiffusersEngine.prepare`, engines/prepare.py), and the worker's look-ahead (worker/lookahead.py) doing that for the
next job or batch while the current one decodes. What it must show: the pixels never change (against the pipeline's
own encoding, and against a worker that does not look ahead), and the next batch's encoding overlaps the current
batch's decode (timestamps from the real engine, with the first decode held until the look-ahead has begun, so the
order is forced rather than hoped for)."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from diffusers import AutoencoderKL
from PIL import Image

from darkroom.config import GpuSettings, Settings
from darkroom.engines import prepare as preparing
from darkroom.engines.acceleration import Acceleration
from darkroom.engines.base import BatchItem
from darkroom.engines.diffusers_engine import DiffusersEngine, Sources, pipeline_kwargs, step_callback
from darkroom.engines.samplers import make_scheduler, resolve_sampler
from darkroom.models.registry import ModelRegistry
from darkroom.schemas import GenerationRequest, JobState, LoraSpec
from darkroom.service import Services
from darkroom.worker.loop import Worker

MODEL = "tiny-diffusers"


def nop(done: int, total: int) -> None:
    pass


def req(**kw) -> GenerationRequest:
    base = {"prompt": "a red cat", "width": 64, "height": 64, "steps": 3, "seed": 11, "model": MODEL}
    return GenerationRequest(**{**base, **kw})


def arrays(result) -> list[np.ndarray]:
    return [np.asarray(item.image) for item in result.images]


def make_engine(models_dir: Path, tmp: Path) -> DiffusersEngine:
    registry = ModelRegistry(models_dir, tmp / "hashes.json")
    accel = Acceleration.from_settings(GpuSettings(), "cpu")
    return DiffusersEngine(registry, device="cpu", batch_invariant=False, acceleration=accel)


@pytest.fixture(scope="module")
def engine(models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    eng = make_engine(models_dir, tmp_path_factory.mktemp("prep"))
    eng.preload(MODEL)  # preparing ahead needs the model loaded (the look-ahead never loads one)
    yield eng
    eng.close()


def own_encoding(engine: DiffusersEngine, request: GenerationRequest) -> list[np.ndarray]:
    """The request through the pipeline with its prompts, as diffusers encodes them itself."""
    loaded, _ = engine._pipelines(engine.registry.get(request.model))
    kwargs = pipeline_kwargs(request, Sources(), request.seeds(), step_callback(nop, request.steps))
    scheduler = make_scheduler(resolve_sampler(request.sampler), loaded.scheduler_config)
    return [np.asarray(image) for image in engine._call(loaded.pipeline(request.mode), scheduler, kwargs)]


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m"])  # ancestral: the generators go on after the noise
def test_a_prepared_pass_has_the_pixels_of_the_pipelines_own_encoding(engine, sampler) -> None:
    request = req(n=2, sampler=sampler, negative_prompt="blurry")
    (prepared,) = engine.prepare([request])
    assert prepared is not None and set(prepared.noise) == set(request.seeds())
    ahead = arrays(engine.generate(request, None, nop, prepared=prepared))
    inline = arrays(engine.generate(request, None, nop))  # prepared in its pass
    reference = own_encoding(engine, request)
    for a, b, c in zip(ahead, inline, reference, strict=True):
        assert np.array_equal(a, b) and np.array_equal(a, c)


def test_sdxl_prepared_ahead_matches_its_own_encoding(tiny_sdxl_model: Path, tmp_path: Path) -> None:
    """SDXL's four embeddings (pooled ones too), and zeros for a missing negative prompt, as the pipeline makes them."""
    engine = make_engine(tiny_sdxl_model.parent, tmp_path)
    try:
        request = req(model=tiny_sdxl_model.name, n=2, sampler="euler_a")
        engine.preload(request.model)
        (prepared,) = engine.prepare([request])
        assert prepared is not None and "pooled_prompt_embeds" in prepared.embeds
        ahead = arrays(engine.generate(request, None, nop, prepared=prepared))
        for a, b in zip(ahead, own_encoding(engine, request), strict=True):
            assert np.array_equal(a, b)
    finally:
        engine.close()


def test_a_joint_batch_prepared_ahead_equals_the_same_batch_prepared_in_its_pass(engine) -> None:
    requests = [req(prompt="a red cat", seed=3, n=2), req(prompt="a blue dog", seed=9, negative_prompt="grey")]
    prepared = engine.prepare(requests)
    ahead = engine.generate_batch([BatchItem(r, nop, prepared=p) for r, p in zip(requests, prepared, strict=True)])
    inline = engine.generate_batch([BatchItem(r, nop) for r in requests])
    for a, b in zip(ahead, inline, strict=True):
        assert a.timings["batch_images"] == 3
        assert all(np.array_equal(x, y) for x, y in zip(arrays(a), arrays(b), strict=True))


def test_what_is_not_prepared_ahead(engine) -> None:
    """Adapters change the text encoders for their own pass; a preparation for another request is ignored."""
    lora, plain = req(loras=[LoraSpec(name="style")]), req()
    assert engine.prepare([lora, plain.model_copy(update={"model": "no-such-model"})]) == [None, None]
    (other,) = engine.prepare([req(prompt="something else")])
    assert not other.fits(plain, other.model)
    assert np.array_equal(  # given the wrong preparation, the pass prepares its own
        arrays(engine.generate(plain, None, nop, prepared=other))[0], arrays(engine.generate(plain, None, nop))[0]
    )


# --- the worker's look-ahead ------------------------------------------------------------------------------------------


def open_services(tmp: Path, models_dir: Path, **overrides) -> Services:
    settings = Settings(
        data_dir=tmp / "data",
        models_dir=models_dir,
        progress_interval=0,
        max_batch=2,
        batch_window_seconds=0,
        preload_default_model=False,
        security={"approve_first_seen_models": True},
        **overrides,
    )
    return Services.open(settings)


# (prompt, steps, seed): two batches of two, as the steps differ
JOBS = [("a red cat", 3, 5), ("a blue dog", 3, 6), ("a green cube", 4, 7), ("a grey sky", 4, 8)]


def run_jobs(services: Services) -> dict[str, list[np.ndarray]]:
    """Two claims (their steps differ, so they are two batches) run by one worker's loop; pixels by prompt."""
    worker = Worker(services.settings, services.store, services.blobs, services.make_engine, worker_id="w-ahead")
    jobs = [services.store.create(req(prompt=p, steps=s, seed=seed))[0] for p, s, seed in JOBS]
    stop = threading.Event()
    loop = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    loop.start()
    deadline = time.monotonic() + 60
    while not stop.wait(0.02):  # until every job is written (bounded)
        if all(services.store.get(job.id).state.terminal for job in jobs) or time.monotonic() > deadline:
            stop.set()
    loop.join(30)
    out = {}
    for job in jobs:
        assert services.store.get(job.id).state is JobState.succeeded
        blobs = [services.blobs.get(image.blob_key) for image in services.store.images_for(job.id)]
        out[job.request["prompt"]] = [np.asarray(Image.open(io.BytesIO(blob))) for blob in blobs]
    return out


@pytest.mark.parametrize("invariant", [False, True], ids=["joint-batches", "job-after-job"])
def test_the_next_batch_is_encoded_while_the_current_one_decodes(models_dir, tmp_path, monkeypatch, invariant) -> None:
    encodings: list[tuple[str, str, float, float]] = []  # (prompt, thread, started, ended)
    decodes: list[tuple[float, float]] = []
    looked_ahead = threading.Event()
    real_encode, real_decode = preparing.encode, AutoencoderKL.decode

    def encode(pipe, request, *args, **kwargs):
        prepared = real_encode(pipe, request, *args, **kwargs)
        thread = threading.current_thread().name
        encodings.append((request.prompt, thread, prepared.started, prepared.ended))
        if thread.startswith("lookahead"):
            looked_ahead.set()
        return prepared

    def decode(self, *args, **kwargs):
        started = time.perf_counter()
        if not decodes:  # hold the first batch's decode until the look-ahead has begun (or fail after 20 s)
            assert looked_ahead.wait(20), "nothing was prepared ahead while the first batch decoded"
        try:
            return real_decode(self, *args, **kwargs)
        finally:
            decodes.append((started, time.perf_counter()))

    monkeypatch.setattr(preparing, "encode", encode)
    monkeypatch.setattr(AutoencoderKL, "decode", decode)
    services = open_services(tmp_path / "ahead", models_dir, batch_invariant=invariant)
    try:
        pipelined = run_jobs(services)
    finally:
        services.close()
    ahead = {prompt: (started, ended) for prompt, thread, started, ended in encodings if thread.startswith("lookahead")}
    on_device = {prompt for prompt, thread, *_ in encodings if not thread.startswith("lookahead")}
    first_claim = {"a red cat"} if invariant else {"a red cat", "a blue dog"}  # claimed, then run at once
    assert on_device == first_claim  # every later pass found its prompts encoded
    assert set(ahead) == {p for p, *_ in JOBS} - first_claim
    first_decode_ended = decodes[0][1]
    assert min(started for started, _ in ahead.values()) < first_decode_ended  # overlapped the first batch's decode

    monkeypatch.setattr(AutoencoderKL, "decode", real_decode)
    services = open_services(tmp_path / "inline", models_dir, batch_invariant=invariant, gpu={"prepare_ahead": False})
    try:
        encodings.clear()
        unpipelined = run_jobs(services)
    finally:
        services.close()
    assert {thread.startswith("lookahead") for _, thread, *_ in encodings} == {False}
    for prompt, images in pipelined.items():
        assert all(np.array_equal(a, b) for a, b in zip(images, unpipelined[prompt], strict=True))


def test_a_batch_claimed_ahead_goes_back_uncharged_when_the_worker_stops(models_dir, tmp_path) -> None:
    services = open_services(tmp_path, models_dir)
    try:
        worker = Worker(services.settings, services.store, services.blobs, services.make_engine, worker_id="w-stop")
        worker.lookahead.claims = True  # as in `Worker.run`'s loop
        jobs = [services.store.create(req(prompt=p, steps=s, seed=seed))[0] for p, s, seed in JOBS]
        assert worker.run_once()  # the first batch ran; the second was claimed at its last step
        waiting = [services.store.get(job.id) for job in jobs[2:]]
        assert {job.state for job in waiting} == {JobState.running} and {job.attempts for job in waiting} == {0}
        worker.lookahead.give_back()
        for job in jobs[2:]:
            back = services.store.get(job.id)
            assert back.state is JobState.queued and back.attempts == 0
        if worker._engine is not None:
            worker._engine.close()
    finally:
        services.close()
