"""The diffusers engine on real tiny pipelines (CPU): both model formats, reproducibility, progress, cancellation."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from darkroom.engines.diffusers_engine import (
    BUNDLED_CONFIGS,
    DiffusersEngine,
    load_single_file,
    resolve_dtype,
    step_callback,
)
from darkroom.errors import EngineError, InvalidRequest, JobCancelled, LeaseLost, ModelLoadError
from darkroom.models.registry import ModelRegistry
from darkroom.schemas import GenerationRequest
from darkroom.worker.cache import LRUCache

DIFFUSERS_ID = "tiny-diffusers"
SINGLE_ID = "tiny-single"


def nop(done: int, total: int) -> None:
    pass


def req(**kw) -> GenerationRequest:
    base = {"prompt": "a red cat", "width": 64, "height": 64, "steps": 4, "seed": 1234, "model": DIFFUSERS_ID}
    return GenerationRequest(**{**base, **kw})


def pixels(result) -> list[np.ndarray]:
    return [np.asarray(img.image) for img in result.images]


@pytest.fixture(scope="module")
def engine(models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    registry = ModelRegistry(models_dir, tmp_path_factory.mktemp("engine") / "hashes.json")
    eng = DiffusersEngine(registry, device="cpu")
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def init_image() -> Image.Image:
    ramp = np.linspace(0, 255, 64, dtype=np.uint8)
    return Image.fromarray(np.stack([np.tile(ramp, (64, 1))] * 3, axis=-1))


# --- txt2img ----------------------------------------------------------------------------------------------------------


def test_txt2img_result_records_what_ran(engine) -> None:
    result = engine.generate(req(n=2, width=72, height=48), None, nop)
    assert [img.seed for img in result.images] == [1234, 1235]
    assert all(img.image.size == (72, 48) for img in result.images)
    assert result.model.id == DIFFUSERS_ID
    assert result.engine == "diffusers"
    assert result.scheduler == "EulerAncestralDiscreteScheduler"
    assert (result.device, result.dtype) == ("cpu", "float32")
    assert {"load_s", "inference_s", "total_s"} <= result.timings.keys()
    assert {"darkroom", "diffusers", "torch", "transformers"} <= result.versions.keys()


def test_same_seed_same_pixels_different_seed_different_pixels(engine) -> None:
    first = pixels(engine.generate(req(), None, nop))
    again = pixels(engine.generate(req(), None, nop))
    other = pixels(engine.generate(req(seed=999), None, nop))
    assert np.array_equal(first[0], again[0])
    assert not np.array_equal(first[0], other[0])


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M Karras"])
def test_a_batch_equals_its_images_run_alone(engine, sampler: str) -> None:
    batch = pixels(engine.generate(req(n=2, seed=40, sampler=sampler), None, nop))
    alone = [pixels(engine.generate(req(seed=s, sampler=sampler), None, nop))[0] for s in (40, 41)]
    assert np.array_equal(batch[0], alone[0])
    assert np.array_equal(batch[1], alone[1])


def test_default_model_is_used_when_the_request_names_none(engine) -> None:
    result = engine.generate(req(model=None), None, nop)
    assert result.model.id == engine.registry.default().id


def test_an_unresolved_seed_is_picked_and_reported(engine) -> None:
    result = engine.generate(req(seed=None, n=2, steps=1), None, nop)
    first = result.images[0].seed
    assert [img.seed for img in result.images] == [first, (first + 1) % 2**32]
    assert np.array_equal(pixels(result)[0], pixels(engine.generate(req(seed=first, steps=1), None, nop))[0])


def test_single_file_gives_the_same_pixels_as_the_diffusers_folder(engine) -> None:
    """The single file was converted to the LDM layout by tests/support; equal pixels prove both conversions."""
    from_folder = engine.generate(req(n=2), None, nop)
    from_file = engine.generate(req(n=2, model=SINGLE_ID), None, nop)
    assert from_file.model.format == "single_file"
    for a, b in zip(pixels(from_folder), pixels(from_file), strict=True):
        assert np.array_equal(a, b)


def test_loading_both_formats_warns_of_no_deprecated_dtype_keyword(models_dir: Path, tmp_path: Path) -> None:
    """The loaders pass the dtype by the name this diffusers release wants (`engines/dtype_arg.py`): no FutureWarning
    for `torch_dtype` on any load, with no process-wide warning filter to hide it."""
    fresh = DiffusersEngine(ModelRegistry(models_dir, tmp_path / "hashes.json"), device="cpu")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for model in (DIFFUSERS_ID, SINGLE_ID):
                fresh.generate(req(model=model, steps=1), None, nop)
    finally:
        fresh.close()
    assert not [w for w in caught if "torch_dtype" in str(w.message)], [str(w.message) for w in caught]


# --- img2img ----------------------------------------------------------------------------------------------------------


def test_img2img_reproduces_shares_weights_and_counts_strength_steps(engine, init_image) -> None:
    calls: list[tuple[int, int]] = []
    request = req(init_image="blob:x", steps=10, strength=0.5)
    first = engine.generate(request, init_image, lambda d, t: calls.append((d, t)))
    again = engine.generate(request, init_image, nop)
    assert calls == [(i, 5) for i in range(1, 6)]
    assert np.array_equal(pixels(first)[0], pixels(again)[0])
    assert not np.array_equal(pixels(first)[0], pixels(engine.generate(req(steps=10), None, nop))[0])
    loaded = engine._pipelines(engine.registry.get(DIFFUSERS_ID))[0]
    assert loaded.img2img.unet is loaded.txt2img.unet


def test_img2img_resizes_the_init_image_to_the_requested_size(engine, init_image) -> None:
    result = engine.generate(req(init_image="blob:x", width=96, height=64, steps=2), init_image, nop)
    assert result.images[0].image.size == (96, 64)


def test_img2img_batch_equals_single_runs(engine, init_image) -> None:
    batch = pixels(engine.generate(req(init_image="blob:x", n=2, seed=7), init_image, nop))
    second = pixels(engine.generate(req(init_image="blob:x", seed=8), init_image, nop))
    assert np.array_equal(batch[1], second[0])


@pytest.mark.parametrize(
    ("request_kw", "with_image", "field"),
    [
        ({"init_image": "blob:x"}, False, "init_image"),
        ({}, True, "init_image"),
        ({"init_image": "blob:x", "steps": 3, "strength": 0.2}, True, "strength"),
        ({"width": 68}, False, "width"),
        ({"model": "no-such-model"}, False, "model"),
        ({"sampler": "Euler z"}, False, "sampler"),
    ],
)
def test_invalid_requests_name_the_field(engine, init_image, request_kw, with_image, field) -> None:
    with pytest.raises(InvalidRequest) as info:
        engine.generate(req(**request_kw), init_image if with_image else None, nop)
    assert info.value.field == field


# --- progress and cancellation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sampler", "steps"), [("Euler", 4), ("Heun", 3), ("PLMS", 3), ("DPM++ SDE", 2)])
def test_progress_counts_user_steps_once_each(engine, sampler: str, steps: int) -> None:
    calls: list[tuple[int, int]] = []
    engine.generate(req(sampler=sampler, steps=steps), None, lambda d, t: calls.append((d, t)))
    assert calls == [(i, steps) for i in range(1, steps + 1)]


def test_progress_runs_across_the_images_of_a_request(engine) -> None:
    calls: list[tuple[int, int]] = []
    engine.generate(req(n=2, steps=3), None, lambda d, t: calls.append((d, t)))
    assert calls == [(i, 6) for i in range(1, 7)]


def test_step_callback_scales_second_order_calls() -> None:
    class Pipe:
        _num_timesteps = 5  # Heun with 3 steps calls the model 2 * 3 - 1 times

    seen: list[tuple[int, int]] = []
    callback = step_callback(lambda d, t: seen.append((d, t)), total=3)
    for i in range(5):
        callback(Pipe(), i, None, {})
    assert seen == [(1, 3), (2, 3), (3, 3)]


@pytest.mark.parametrize("error", [JobCancelled("cancelled by request"), LeaseLost("lease lost")])
def test_an_exception_from_progress_stops_the_run_and_the_next_run_is_unharmed(engine, error) -> None:
    reference = pixels(engine.generate(req(steps=6, sampler="DPM++ 2M"), None, nop))
    loaded = engine._pipelines(engine.registry.get(DIFFUSERS_ID))[0]
    scheduler = loaded.txt2img.scheduler
    calls: list[int] = []

    def cancel_at_two(done: int, total: int) -> None:
        calls.append(done)
        if done == 2:
            raise error

    with pytest.raises(type(error)):
        engine.generate(req(steps=6, sampler="DPM++ 2M"), None, cancel_at_two)
    assert calls == [1, 2]  # stopped at the step that raised
    assert loaded.txt2img.scheduler is scheduler  # the borrowed scheduler was given back
    assert np.array_equal(pixels(engine.generate(req(steps=6, sampler="DPM++ 2M"), None, nop))[0], reference[0])


def test_a_failure_inside_the_pipeline_is_an_engine_error(engine, monkeypatch) -> None:
    loaded = engine._pipelines(engine.registry.get(DIFFUSERS_ID))[0]
    scheduler = loaded.txt2img.scheduler

    def broken(*args, **kwargs):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(loaded.txt2img.unet, "forward", broken)
    with pytest.raises(EngineError, match="kaboom"):
        engine.generate(req(), None, nop)
    monkeypatch.undo()
    assert loaded.txt2img.scheduler is scheduler
    engine.generate(req(steps=1), None, nop)


# --- SDXL -------------------------------------------------------------------------------------------------------------


def test_sdxl_folder_runs_txt2img_and_img2img(tiny_sdxl_model: Path, tmp_path: Path, init_image) -> None:
    eng = DiffusersEngine(ModelRegistry(tiny_sdxl_model.parent, tmp_path / "hashes.json"), device="cpu")
    batch = eng.generate(req(model="tiny-xl", n=2, steps=2), None, nop)
    second = eng.generate(req(model="tiny-xl", seed=1235, steps=2), None, nop)
    assert batch.model.arch == "sdxl"
    assert np.array_equal(pixels(batch)[1], pixels(second)[0])
    edited = eng.generate(req(model="tiny-xl", init_image="blob:x", steps=4, strength=0.5), init_image, nop)
    assert edited.images[0].image.size == (64, 64)
    eng.close()


# --- loading and the cache --------------------------------------------------------------------------------------------


def test_lru_cache_evicts_least_recently_used_and_releases_after_dropping_it() -> None:
    import gc
    import weakref

    class Blob:
        pass

    events: list[str] = []
    refs: list[weakref.ref] = []

    def release() -> None:
        gc.collect()
        events.append("release:" + ",".join("alive" if r() else "gone" for r in refs))

    cache: LRUCache[str, Blob] = LRUCache(2, on_evict=lambda k, v: events.append(f"evict:{k}"), release=release)
    for key in ("a", "b"):
        blob = Blob()
        refs.append(weakref.ref(blob))
        cache.put(key, blob)
    del blob
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", Blob())
    assert cache.keys() == ["a", "c"]
    assert events == ["evict:b", "release:alive,gone"]  # b's memory was free by the time release ran
    cache.make_room()
    assert cache.keys() == ["c"]
    assert cache.evict("c") and not cache.evict("c")
    assert len(cache) == 0


def test_lru_keeps_at_most_cache_size_models(models_dir: Path, tmp_path: Path) -> None:
    registry = ModelRegistry(models_dir, tmp_path / "hashes.json")
    eng = DiffusersEngine(registry, device="cpu", cache_size=1)
    eng.generate(req(steps=1), None, nop)
    eng.generate(req(steps=1, model=SINGLE_ID), None, nop)
    assert [key[0] for key in eng.loaded_models()] == [SINGLE_ID]
    again = eng.generate(req(steps=1, model=SINGLE_ID), None, nop)
    assert again.timings["load_s"] == 0.0
    eng.close()
    assert eng.loaded_models() == []


def test_broken_model_is_a_model_load_error(tmp_path: Path, tiny_diffusers_model: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(tiny_diffusers_model, models / "broken")
    (models / "broken" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    eng = DiffusersEngine(ModelRegistry(models, tmp_path / "hashes.json"), device="cpu")
    with pytest.raises(ModelLoadError, match="broken"):
        eng.generate(req(model="broken"), None, nop)


def test_single_file_without_sidecar_or_donor_asks_for_a_tokenizer(tmp_path: Path, tiny_single_file_model) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy2(tiny_single_file_model, models / "lonely.safetensors")
    eng = DiffusersEngine(ModelRegistry(models, tmp_path / "hashes.json"), device="cpu")
    with pytest.raises(ModelLoadError) as info:
        eng.generate(req(model="lonely"), None, nop)
    assert "lonely.config/tokenizer/" in info.value.message
    assert "diffusers-format sd1 model" in info.value.message


def test_bundled_config_borrows_the_tokenizer_of_a_same_arch_model(
    tiny_single_file_model: Path, tiny_diffusers_model: Path, monkeypatch
) -> None:
    """With no sidecar, the bundled SD 1.5 config is used and the tokenizer comes from a diffusers model."""
    import diffusers

    seen: dict = {}

    def fake_from_single_file(path, **kwargs):
        seen.update(kwargs, path=path)
        return "pipeline"

    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "from_single_file", fake_from_single_file)
    lonely = tiny_single_file_model.with_name("no-sidecar.safetensors")
    assert load_single_file(lonely, "sd1", resolve_dtype("auto", "cpu"), [tiny_diffusers_model]) == "pipeline"
    assert seen["config"] == str(BUNDLED_CONFIGS / "sd1")
    assert seen["local_files_only"] is True
    assert type(seen["tokenizer"]).__name__ == "CLIPTokenizer"


@pytest.mark.parametrize(
    ("arch", "expected"),
    [
        ("sd1", {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}),
        ("sd2", {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840}),
        (
            "sdxl",
            {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
        ),
    ],
)
def test_bundled_configs_describe_the_real_architectures(arch: str, expected: dict[str, int]) -> None:
    """Parameter counts of the published SD 1.5 / SD 2.1 / SDXL base models, built on the meta device (no memory)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = BUNDLED_CONFIGS / arch
    index = json.loads((folder / "model_index.json").read_text())
    builders = {
        "unet": lambda p: UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(p)),
        "vae": lambda p: AutoencoderKL.from_config(AutoencoderKL.load_config(p)),
        "text_encoder": lambda p: CLIPTextModel(CLIPTextConfig.from_pretrained(p)),
        "text_encoder_2": lambda p: CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(p)),
    }
    with init_empty_weights():
        counts = {name: sum(t.numel() for t in builders[name](folder / name).parameters()) for name in expected}
    assert counts == expected
    assert index["_class_name"] == ("StableDiffusionXLPipeline" if arch == "sdxl" else "StableDiffusionPipeline")
    assert (folder / "scheduler" / "scheduler_config.json").is_file()


def test_device_and_dtype_resolution() -> None:
    import torch

    from darkroom.engines.diffusers_engine import resolve_device

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in ("cpu", "cuda", "mps")
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.float16
    assert resolve_dtype("bf16", "cuda") == torch.bfloat16
    with pytest.raises(ValueError):
        resolve_device("tpu")
    with pytest.raises(ValueError):
        resolve_dtype("float8", "cpu")


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs CUDA")
def test_cuda_half_precision_run(models_dir: Path, tmp_path: Path) -> None:
    eng = DiffusersEngine(ModelRegistry(models_dir, tmp_path / "hashes.json"), device="cuda")
    first = eng.generate(req(), None, nop)
    again = eng.generate(req(), None, nop)
    assert (first.device, first.dtype) == ("cuda", "float16")
    assert np.array_equal(pixels(first)[0], pixels(again)[0])
