"""Inpainting in the diffusers engine on the tiny real pipeline (CPU): a regular 4-channel UNet, shared weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from darkroom.engines.diffusers_engine import DiffusersEngine
from darkroom.errors import InvalidRequest, JobCancelled
from darkroom.models.registry import ModelRegistry
from darkroom.schemas import GenerationRequest


def nop(done: int, total: int) -> None:
    pass


def req(**kw) -> GenerationRequest:
    base = {
        "prompt": "a red cat",
        "width": 64,
        "height": 64,
        "steps": 4,
        "seed": 1234,
        "model": "tiny-diffusers",
        "init_image": "blob:x",
        "mask_image": "blob:m",
        "strength": 1.0,
    }
    return GenerationRequest(**{**base, **kw})


@pytest.fixture(scope="module")
def engine(models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    registry = ModelRegistry(models_dir, tmp_path_factory.mktemp("inpaint") / "hashes.json")
    eng = DiffusersEngine(registry, device="cpu")
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def source() -> Image.Image:
    ramp = np.linspace(0, 255, 64, dtype=np.uint8)
    return Image.fromarray(np.stack([np.tile(ramp, (64, 1))] * 3, axis=-1))


@pytest.fixture(scope="module")
def mask() -> Image.Image:
    """White (repaint) in the centre square, black (keep) around it."""
    m = np.zeros((64, 64), dtype=np.uint8)
    m[16:48, 16:48] = 255
    return Image.fromarray(m, mode="L")


def test_inpaint_changes_only_the_masked_area_and_shares_weights(engine, source, mask) -> None:
    calls: list[tuple[int, int]] = []
    result = engine.generate(req(), source, lambda d, t: calls.append((d, t)), mask_image=mask)
    out = np.asarray(result.images[0].image).astype(int)
    src = np.asarray(source).astype(int)
    keep = np.asarray(mask) == 0
    assert np.array_equal(out[keep], src[keep]), "pixels outside the mask are the source's, exactly"
    assert np.abs(out[~keep] - src[~keep]).mean() > 1, "the masked area was repainted"
    assert calls[-1] == (4, 4)
    loaded = engine._pipelines(engine.registry.get("tiny-diffusers"))[0]
    assert loaded.inpaint.unet is loaded.txt2img.unet


def test_inpaint_is_reproducible_per_image_seed(engine, source, mask) -> None:
    pair = engine.generate(req(n=2, seed=7, strength=0.75), source, nop, mask_image=mask)
    alone = engine.generate(req(seed=8, strength=0.75), source, nop, mask_image=mask)
    assert [i.seed for i in pair.images] == [7, 8]
    assert np.array_equal(np.asarray(pair.images[1].image), np.asarray(alone.images[0].image))


def test_inpaint_counts_strength_steps_and_stops_on_cancel(engine, source, mask) -> None:
    seen: list[tuple[int, int]] = []

    def cancel_at_two(done: int, total: int) -> None:
        seen.append((done, total))
        if done == 2:
            raise JobCancelled("cancelled by request")

    with pytest.raises(JobCancelled):
        engine.generate(req(steps=8, strength=0.5), source, cancel_at_two, mask_image=mask)
    assert seen == [(1, 4), (2, 4)]


def test_inpaint_with_a_crop_around_the_mask(engine, source, mask) -> None:
    result = engine.generate(req(mask_crop_padding=8, steps=2), source, nop, mask_image=mask)
    image = result.images[0].image
    assert image.size == (64, 64)
    out, src = np.asarray(image).astype(int), np.asarray(source).astype(int)
    assert np.abs(out[:4, :4] - src[:4, :4]).max() <= 2, "far from the mask the source is kept"


@pytest.mark.parametrize(
    ("kw", "give_mask", "field"),
    [
        ({}, False, "mask_image"),
        ({"mask_image": None}, True, "mask_image"),
        ({"init_image": None, "strength": 0.75}, True, "mask_image"),
    ],
)
def test_inpaint_input_errors_name_the_field(engine, source, mask, kw, give_mask, field) -> None:
    request = req(**kw)
    init = source if request.init_image else None
    with pytest.raises(InvalidRequest) as err:
        engine.generate(request, init, nop, mask_image=mask if give_mask else None)
    assert err.value.field == field


def test_sdxl_inpaints_through_its_own_twin(tiny_sdxl_model: Path, tmp_path: Path, source, mask) -> None:
    eng = DiffusersEngine(ModelRegistry(tiny_sdxl_model.parent, tmp_path / "hashes.json"), device="cpu")
    try:
        result = eng.generate(req(model="tiny-xl", steps=2), source, nop, mask_image=mask)
        keep = np.asarray(mask) == 0
        assert np.array_equal(np.asarray(result.images[0].image)[keep], np.asarray(source)[keep])
        loaded = eng._pipelines(eng.registry.get("tiny-xl"))[0]
        assert type(loaded.inpaint).__name__ == "StableDiffusionXLInpaintPipeline"
        assert loaded.inpaint.unet is loaded.txt2img.unet
    finally:
        eng.close()
