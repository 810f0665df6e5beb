"""The device path of the diffusers engine on the tiny real pipeline (CPU): the `gpu` settings and what each switch
does where a CPU can show it (bf16 weights, channels-last, VAE tiling, the compiled-module toggle), batch limits from
a memory figure, and img2img/inpainting jobs run as one tensor batch. torch.compile itself runs only on CUDA here."""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client import REGISTRY
from pydantic import ValidationError

from darkroom.config import GpuSettings, Settings
from darkroom.engines.acceleration import (
    Acceleration,
    Compiled,
    HostImages,
    HostTransfer,
    pass_size,
    pin_execution_device,
    presign_attention,
)
from darkroom.engines.base import BatchItem
from darkroom.engines.batch_limits import BatchLimits, estimate, limit_for
from darkroom.engines.diffusers_engine import DiffusersEngine, LoadedModel
from darkroom.models.registry import ModelRegistry
from darkroom.schemas import GenerationRequest, JobState, LoraSpec
from darkroom.service import Services
from darkroom.worker.loop import Worker

MODEL = "tiny-diffusers"
CUDA = torch.cuda.is_available()


def nop(done: int, total: int) -> None:
    pass


def req(**kw) -> GenerationRequest:
    base = {"prompt": "a red cat", "width": 64, "height": 64, "steps": 4, "seed": 1234, "model": MODEL}
    return GenerationRequest(**{**base, **kw})


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(int)


def make_engine(models_dir: Path, tmp: Path, device: str = "cpu", dtype: str = "auto", **gpu) -> DiffusersEngine:
    accel = Acceleration.from_settings(GpuSettings(**gpu), device, tmp / "inductor")
    registry = ModelRegistry(models_dir, tmp / "hashes.json")
    return DiffusersEngine(registry, device=device, dtype=dtype, batch_invariant=False, acceleration=accel)


@pytest.fixture(scope="module")
def engine(models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    eng = make_engine(models_dir, tmp_path_factory.mktemp("accel"))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def sources() -> list[Image.Image]:
    """Two different source images: a horizontal and a vertical ramp."""
    ramp = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1))
    return [Image.fromarray(np.stack([a] * 3, axis=-1)) for a in (ramp, ramp.T.copy())]


@pytest.fixture(scope="module")
def mask() -> Image.Image:
    m = np.zeros((64, 64), dtype=np.uint8)
    m[16:48, 16:48] = 255
    return Image.fromarray(m, mode="L")


# --- settings ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "named"),
    [
        ({"dtype": "float8"}, "dtype"),
        ({"gpu": {"compile_mode": "fastest"}}, "gpu.compile_mode"),
        ({"gpu": {"channels_last": "maybe"}}, "gpu.channels_last"),
        ({"gpu": {"compile_sizes": ["512x500"]}}, "gpu.compile_sizes"),
        ({"gpu": {"vae_tiling_pixels": 0}}, "gpu.vae_tiling_pixels"),
        ({"gpu": {"memory_headroom": 1.5}}, "gpu.memory_headroom"),
        ({"gpu": {"cuda_graphs": True}}, "gpu.cuda_graphs"),
    ],
)
def test_bad_gpu_settings_name_the_setting(given: dict, named: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(**given)
    assert named in str(caught.value)


def test_bad_gpu_setting_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DARKROOM_GPU__COMPILE_MODE", "fastest")
    with pytest.raises(ValidationError, match=r"gpu\.compile_mode"):
        Settings()


def test_auto_switches_resolve_per_device(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, dtype="BF16", gpu={"compile": True, "cuda_graphs": True})
    assert settings.dtype == "bf16"
    assert settings.inductor_cache_dir == tmp_path / "inductor"
    cpu = Acceleration.from_settings(settings.gpu, "cpu")
    cuda = Acceleration.from_settings(settings.gpu, "cuda:1", settings.inductor_cache_dir)
    mps = Acceleration.from_settings(settings.gpu, "mps")
    assert (cpu.channels_last, cpu.pinned_transfers) == (True, False)
    assert (cuda.channels_last, cuda.pinned_transfers) == (True, True)
    assert (mps.channels_last, mps.pinned_transfers) == (False, False)
    assert cuda.compile_mode == "reduce-overhead"  # CUDA graphs
    assert cuda.compile_sizes == {(512, 512), (1024, 1024)}
    assert cuda.cache_dir == tmp_path / "inductor"


# --- what runs on a CPU -----------------------------------------------------------------------------------------------


def test_bf16_channels_last_engine_generates_in_bf16(models_dir: Path, tmp_path: Path) -> None:
    eng = make_engine(models_dir, tmp_path, dtype="bfloat16", channels_last="on")
    try:
        result = eng.generate(req(steps=2), None, nop)
        loaded = eng._cache.get(eng.loaded_models()[0])
        unet = loaded.txt2img.unet
        assert result.dtype == "bfloat16" and unet.dtype == torch.bfloat16
        assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        assert np.asarray(result.images[0].image).std() > 0  # a picture, not NaNs rounded to black
    finally:
        eng.close()


def test_vae_decodes_in_tiles_above_the_threshold_only(models_dir: Path, tmp_path: Path) -> None:
    eng = make_engine(models_dir, tmp_path, vae_tiling_pixels=64 * 64 - 1)
    try:
        eng.generate(req(steps=1, width=56, height=56), None, nop)  # loads; below the threshold
        vae = eng._cache.get(eng.loaded_models()[0]).txt2img.vae
        vae.tile_sample_min_size, vae.tile_latent_min_size = 32, 4  # tiles smaller than a 64² image's 8² latents
        tiled: list[tuple[int, ...]] = []
        original = vae.tiled_decode
        vae.tiled_decode = lambda z, **kw: tiled.append(tuple(z.shape)) or original(z, **kw)
        small = eng.generate(req(steps=1, width=56, height=56), None, nop)
        assert tiled == [] and small.images[0].image.size == (56, 56)
        large = eng.generate(req(steps=1), None, nop)
        assert tiled == [(1, 4, 8, 8)] and large.images[0].image.size == (64, 64)
        assert vae.use_tiling is False  # on for that pass only
    finally:
        eng.close()


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch's own
def test_compiled_modules_on_only_at_a_compiled_size_and_attention_as_set(tiny_diffusers_model: Path) -> None:
    """`nn.Module.compile` is lazy: nothing is compiled until a call, so the toggle can be checked on a CPU."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_diffusers_model, local_files_only=True)
    accel = Acceleration.from_settings(GpuSettings(compile=True, compile_sizes=["64x64"]), "cpu")
    compiled = accel.apply(pipe)
    assert compiled is not None and len(compiled.calls) == 2  # the UNet and the VAE decoder
    modules = [module for module, _ in compiled.calls]
    assert all(m._compiled_call_impl is None for m in modules)
    with accel.pass_context(pipe, compiled, (64, 64)):
        assert all(m._compiled_call_impl is call for m, call in compiled.calls)
    with accel.pass_context(pipe, compiled, (64, 72)):
        assert all(m._compiled_call_impl is None for m in modules)
    assert all(m._compiled_call_impl is None for m in modules)
    assert torch._dynamo.config.recompile_limit == 8
    loaded = LoadedModel(info=None, txt2img=pipe, scheduler_config=None, load_s=0.0, compiled=compiled)  # type: ignore[arg-type]
    assert loaded.compiled_for([req()]) is compiled
    assert loaded.compiled_for([req(), req(loras=[LoraSpec(name="style")])]) is None  # LoRA layers: eager
    processors = {type(p).__name__ for p in (*pipe.unet.attn_processors.values(), *pipe.vae.attn_processors.values())}
    assert processors == {"AttnProcessor2_0"}  # SDPA
    # Compiled modules keep their processors' signatures on the class only: dynamo traces the UNet whole.
    assert not any("__call__" in vars(p) for p in pipe.unet.attn_processors.values())
    sample = torch.randn(2, 4, 8, 8), torch.tensor(10), torch.randn(2, 77, pipe.text_encoder.config.hidden_size)
    explained = torch._dynamo.explain(pipe.unet.forward)(sample[0], sample[1], encoder_hidden_states=sample[2])
    assert explained.graph_break_count == 0, explained.break_reasons
    Acceleration(sdpa=False).apply(pipe)
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"AttnProcessor"}


def test_warm_up_runs_short_passes_at_each_compiled_size(engine, monkeypatch) -> None:
    """What compiling at load runs (torch.compile itself is left to CUDA): each size, one image and then two."""
    engine.generate(req(steps=1), None, nop)
    loaded = engine._cache.get(engine.loaded_models()[0])
    passes: list[tuple[int, int, int]] = []
    call = engine._call

    def recording(pipe, scheduler, kwargs, compiled=None):
        images = call(pipe, scheduler, kwargs, compiled)
        passes.append((kwargs["width"], kwargs["height"], len(images)))
        return images

    monkeypatch.setattr(engine, "_call", recording)
    compiled = Compiled(sizes=frozenset({(64, 64), (48, 56)}))
    engine.acceleration.warm_up(compiled, lambda w, h: engine._warm(loaded, w, h))
    assert passes == [(48, 56, 1), (48, 56, 2), (64, 64, 1), (64, 64, 2)]


def test_host_images_match_the_pipelines_own_pil(tiny_diffusers_model: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_diffusers_model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    run = {"prompt": "x", "num_inference_steps": 1, "width": 64, "height": 64}
    own = pipe(**run, generator=torch.Generator().manual_seed(3), output_type="pil").images
    tensors = pipe(**run, generator=torch.Generator().manual_seed(3), output_type="pt").images
    assert np.array_equal(np.asarray(HostImages(pinned=False).to_pil(tensors)[0]), np.asarray(own[0]))
    assert pass_size({"image": [own[0]]}) == (64, 64)
    assert pass_size({"image": torch.zeros(1, 4, 9, 8)}) == (64, 72)


def test_attention_processors_are_signed_once_and_run_the_same(tiny_diffusers_model: Path, monkeypatch) -> None:
    """diffusers' `Attention.forward` asks `inspect.signature(processor.__call__)` on every call; after `apply`
    (and `presign_attention`) it gets the one signature computed at load, the same one it computed itself, and the
    pixels do not change."""
    import inspect

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_diffusers_model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    run = {"prompt": "x", "num_inference_steps": 2, "width": 64, "height": 64, "output_type": "np"}
    Acceleration(sdpa=True).apply(pipe)
    processors = [*pipe.unet.attn_processors.values(), *pipe.vae.attn_processors.values()]
    assert "__signature__" in vars(type(processors[0]).__call__)  # the class layer
    stock = type(processors[0])()  # a processor of the same class as diffusers makes them, signed by class only
    assert all(inspect.signature(p.__call__) == inspect.signature(stock.__call__) for p in processors)
    assert all(inspect.signature(p.__call__) is inspect.signature(p.__call__) for p in processors)  # not recomputed
    assert presign_attention(pipe.unet, pipe.vae) == 0  # already signed: nothing to do
    signed = pipe(**run, generator=torch.Generator().manual_seed(5)).images

    computed: list[object] = []
    real = inspect._signature_from_function  # type: ignore[attr-defined]
    monkeypatch.setattr(inspect, "_signature_from_function", lambda *a, **k: computed.append(a) or real(*a, **k))
    pipe(**{**run, "num_inference_steps": 1}, generator=torch.Generator().manual_seed(5))
    assert len(computed) < len(processors)  # the pipeline's own few calls, none per attention call

    for p in processors:
        p.__dict__.pop("__call__", None)  # one processor object may serve many layers
    monkeypatch.delattr(type(processors[0]).__call__, "__signature__")  # stock diffusers, for the rest of this test
    assert np.array_equal(signed, pipe(**run, generator=torch.Generator().manual_seed(5)).images)
    computed.clear()
    pipe(**{**run, "num_inference_steps": 1}, generator=torch.Generator().manual_seed(5))
    assert len(computed) >= len(processors)  # stock diffusers: one per attention call (the test sees the cost)


def test_a_loaded_pipeline_knows_its_device_without_walking_its_modules(engine, monkeypatch) -> None:
    """diffusers' `_execution_device` (asked at the start of every pipeline call) and a model's `device` look for
    offloading hooks in every submodule; a pipeline darkroom loaded (and its twins) answers from its weights."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    engine.generate(req(steps=1), None, nop)
    loaded = engine._cache.get(engine.loaded_models()[0])
    pipe, twin = loaded.txt2img, loaded.pipeline("img2img")
    assert type(pipe).__name__ == "StableDiffusionPipeline" and isinstance(pipe, StableDiffusionPipeline)
    assert isinstance(twin, StableDiffusionImg2ImgPipeline) and type(twin) is not StableDiffusionImg2ImgPipeline
    walks: list[object] = []
    real = torch.nn.Module.modules
    monkeypatch.setattr(torch.nn.Module, "modules", lambda self: walks.append(self) or real(self))
    assert pipe._execution_device == twin._execution_device == torch.device("cpu")
    assert walks == []
    assert StableDiffusionPipeline._execution_device.fget(pipe) == torch.device("cpu")  # diffusers' own answer
    assert walks  # ... which walks
    assert pin_execution_device(pipe) is pipe and type(pin_execution_device(pipe)) is type(pipe)  # pinned once


# --- batch limits -----------------------------------------------------------------------------------------------------


def test_batch_limit_from_a_memory_figure_with_the_real_model(engine) -> None:
    engine.generate(req(steps=1), None, nop)  # loaded
    pipe = engine._cache.get(engine.loaded_models()[0]).txt2img
    fp32 = estimate(pipe, 512, 512, torch.float32)
    fp16 = estimate(pipe, 512, 512, torch.float16)
    # tiny model: UNet's first level 32 channels, VAE's 8; 64x64 latents; guidance doubles the UNet's batch
    assert fp32.per_image == 2 * 64 * 64 * 32 * 4 * 64 and fp32.fixed == 512 * 512 * 8 * 4 * 8
    assert fp16.per_image * 2 == fp32.per_image
    free = fp32.fixed + 10 * fp32.per_image
    assert limit_for(fp32, free, headroom=1.0) == 10
    assert limit_for(fp32, free, headroom=0.5) == (free // 2 - fp32.fixed) // fp32.per_image
    assert limit_for(fp32, 1, headroom=1.0) == 1  # one image is always tried

    limits = BatchLimits("cpu", headroom=1.0)
    key = (MODEL, 512, 512)
    assert limits.limit(key, pipe, torch.float32, free=free) == 10
    limits.measured(key, images=4, peak_extra_bytes=4 * fp32.per_image * 2)  # twice the guess, measured
    assert limits.limit(key, None, torch.float32, free=free) == free // (2 * fp32.per_image)
    assert limits.after_oom(key, 6) == 3
    assert limits.limit(key, pipe, torch.float32, free=10 * free) == 3  # an OOM's limit holds whatever memory says
    assert limits.current() == {key: 3}
    shown = REGISTRY.get_sample_value(
        "darkroom_batch_limit_images", {"device": "cpu", "model": MODEL, "size": "512x512"}
    )
    assert shown == 3
    assert BatchLimits("cpu", 1.0).limit(key, None, torch.float32, free=free) is None  # nothing to estimate from


def test_a_batch_runs_in_chunks_of_the_memory_limit(models_dir: Path, tmp_path: Path) -> None:
    eng = make_engine(models_dir, tmp_path, memory_headroom=1e-12)  # no memory to spare: one image at a time
    try:
        eng.generate(req(steps=1), None, nop)
        outcomes = eng.generate_batch([BatchItem(request=req(steps=1, seed=s), progress=nop) for s in (1, 2)])
        assert all("batch_images" not in o.timings for o in outcomes)  # each ran alone
        assert eng.batch_limits.current() == {(MODEL, 64, 64): 1}
    finally:
        eng.close()


def test_a_batch_lets_go_of_the_device_before_its_images_reach_the_host(engine, monkeypatch) -> None:
    """Another worker sharing the engine can start its pass while this batch's images are copied and converted."""
    device_free: list[bool] = []
    to_pil = HostTransfer.to_pil

    def probing(self: HostTransfer) -> list[Image.Image]:
        def probe() -> None:
            taken = engine._run_lock.acquire(blocking=False)
            device_free.append(taken)
            if taken:
                engine._run_lock.release()

        other = threading.Thread(target=probe)
        other.start()
        other.join()
        return to_pil(self)

    monkeypatch.setattr(HostTransfer, "to_pil", probing)
    outcomes = engine.generate_batch([BatchItem(request=req(steps=1, seed=s), progress=nop) for s in (1, 2)])
    assert [o.timings["batch_images"] for o in outcomes] == [2, 2]
    assert device_free == [True]


# --- img2img and inpainting batches -----------------------------------------------------------------------------------


def assert_close(batched: Image.Image, alone: Image.Image) -> None:
    """The documented tolerance of a batched image against its solo run (docs/architecture.md)."""
    diff = np.abs(pixels(batched) - pixels(alone))
    assert diff.max() <= 6 and diff.mean() < 1.0


def test_img2img_jobs_run_as_one_batch_each_within_tolerance_of_its_solo_run(engine, sources) -> None:
    requests = [
        req(init_image="blob:a", strength=0.6, seed=5, n=2),
        req(prompt="blue", init_image="blob:b", strength=0.6, seed=9),
    ]
    items = [BatchItem(request=r, progress=nop, init_image=img) for r, img in zip(requests, sources, strict=True)]
    assert engine.batchable(requests)
    outcomes = engine.generate_batch(items)
    assert [o.timings["batch_images"] for o in outcomes] == [3, 3]
    solo = [engine.generate(r, img, nop) for r, img in zip(requests, sources, strict=True)]
    for outcome, alone in zip(outcomes, solo, strict=True):
        assert [i.seed for i in outcome.images] == [i.seed for i in alone.images]
        for batched, single in zip(outcome.images, alone.images, strict=True):
            assert_close(batched.image, single.image)
    assert np.abs(pixels(outcomes[0].images[0].image) - pixels(outcomes[1].images[0].image)).max() > 10


def test_inpaint_jobs_run_as_one_batch_and_keep_their_sources_outside_the_mask(engine, sources, mask) -> None:
    requests = [req(init_image="blob:a", mask_image="blob:m", strength=1.0, seed=s) for s in (11, 12)]
    items = [
        BatchItem(request=r, progress=nop, init_image=img, mask_image=mask)
        for r, img in zip(requests, sources, strict=True)
    ]
    outcomes = engine.generate_batch(items)
    assert [o.timings["batch_images"] for o in outcomes] == [2, 2]
    keep = np.asarray(mask) == 0
    for outcome, request, source in zip(outcomes, requests, sources, strict=True):
        image = outcome.images[0].image
        assert np.array_equal(np.asarray(image)[keep], np.asarray(source)[keep])  # pasted back exactly
        assert_close(image, engine.generate(request, source, nop, mask_image=mask).images[0].image)


def test_the_worker_runs_img2img_jobs_as_one_tensor_batch(tmp_path: Path, models_dir: Path, sources) -> None:
    """Through the worker loop: jobs with their own stored source images, claimed together, one pipeline call."""
    settings = Settings(
        data_dir=tmp_path / "data",
        models_dir=models_dir,
        progress_interval=0,
        max_batch=4,
        batch_window_seconds=0,
        security={"approve_first_seen_models": True},  # the test's own model, served as written
    )
    services = Services.open(settings)
    worker = Worker(settings, services.store, services.blobs, services.make_engine, worker_id="w-img2img")
    try:
        refs = []
        for image in sources:
            png = io.BytesIO()
            image.save(png, "PNG")
            refs.append("blob:" + services.blobs.put(png.getvalue(), "image/png")[1])
        jobs = [
            services.store.create(req(init_image=ref, strength=0.6, seed=seed, steps=3))[0]
            for ref, seed in zip(refs, (21, 22), strict=True)
        ]
        batch = worker.claim()
        assert [job.id for job in batch] == [job.id for job in jobs]
        worker.process_batch(batch)
        for job in jobs:
            final = services.store.get(job.id)
            assert final.state is JobState.succeeded and final.result["timings"]["batch_images"] == 2
    finally:
        if worker._engine is not None:
            worker._engine.close()
        services.close()


def test_sdxl_batches_split_by_whether_jobs_have_a_negative_prompt(tiny_sdxl_model: Path, tmp_path: Path) -> None:
    """SDXL guides an image without a negative prompt with zeros, which one call cannot mix with encoded prompts."""
    eng = make_engine(tiny_sdxl_model.parent, tmp_path)
    try:
        requests = [
            req(model="tiny-xl", steps=2, seed=1),
            req(model="tiny-xl", steps=2, seed=2, negative_prompt="blurry"),
            req(model="tiny-xl", steps=2, seed=3, prompt="a blue cat"),
        ]
        outcomes = eng.generate_batch([BatchItem(request=r, progress=nop) for r in requests])
        assert [o.timings.get("batch_images") for o in outcomes] == [2, None, 2]  # the odd one out ran alone
        for outcome, request in zip(outcomes, requests, strict=True):
            assert_close(outcome.images[0].image, eng.generate(request, None, nop).images[0].image)
    finally:
        eng.close()


def test_what_may_not_share_a_batch(engine) -> None:
    inpaint = {"init_image": "blob:a", "mask_image": "blob:m"}
    assert not engine.batchable([req(**inpaint, n=2), req(**inpaint)])  # one source encoded for n images
    assert not engine.batchable([req(**inpaint, mask_crop_padding=8), req(**inpaint)])
    assert not engine.batchable([req(init_image="blob:a"), req()])  # modes differ
    assert not engine.batchable([req(init_image="blob:a", strength=0.5), req(init_image="blob:a")])
    assert engine.batchable([req(**inpaint), req(**inpaint, seed=1)])
    # a crop job is claimed apart, so it never turns a batch of plain inpainting jobs into single runs
    assert req(**inpaint, mask_crop_padding=8).batch_key() != req(**inpaint).batch_key()
    assert req(**inpaint, seed=1).batch_key() == req(**inpaint).batch_key()


# --- CUDA only --------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_compiled_engine_matches_eager_within_tolerance(models_dir: Path, tmp_path: Path) -> None:
    eager = make_engine(models_dir, tmp_path / "eager", device="cuda")
    compiled = make_engine(models_dir, tmp_path / "compiled", device="cuda", compile=True, compile_sizes=["64x64"])
    try:
        items = [BatchItem(request=req(seed=s), progress=nop) for s in (1, 2)]
        want = [o.images[0].image for o in eager.generate_batch(items)]
        got = [o.images[0].image for o in compiled.generate_batch(items)]  # warmed up at load
        for a, b in zip(got, want, strict=True):
            assert_close(a, b)
        assert any(Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]).iterdir())  # artefacts cached on disk
        assert compiled.batch_limits.current()[(MODEL, 64, 64)] >= 2
    finally:
        eager.close()
        compiled.close()


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_pinned_side_stream_copy_gives_the_same_pixels() -> None:
    images = torch.rand(3, 3, 64, 48, device="cuda", dtype=torch.float16)
    pinned = HostImages(pinned=True).to_pil(images)
    plain = HostImages(pinned=False).to_pil(images)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(pinned, plain, strict=True))
