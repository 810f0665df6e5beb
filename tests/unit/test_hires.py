"""Hires fix: the real engine on the tiny SD 1.x pipeline (first pass, upscale, img2img second pass), and through the
native and A1111 APIs with a real worker, with a tiny ESRGAN model from random weights as one of the upscalers."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from darkroom.api.app import create_app
from darkroom.config import Limits, Settings, WebhookSettings
from darkroom.engines.diffusers_engine import DiffusersEngine
from darkroom.engines.hires import infotext_fields, passes
from darkroom.errors import InvalidRequest
from darkroom.models.registry import ModelRegistry
from darkroom.schemas import GenerationRequest, HiresSpec, check_limits
from darkroom.service import Services
from tests.support.tiny_models import make_esrgan_upscaler

MODEL = "tiny-diffusers"
SMALL = {"width": 64, "height": 64, "steps": 2, "seed": 3}
ESRGAN = "tiny-esrgan-2x"
LIMITS = Limits(max_width=256, max_height=256, max_pixels=256 * 192)


@pytest.fixture(scope="module")
def hires_models_dir(tmp_path_factory, tiny_diffusers_model) -> Path:
    root = tmp_path_factory.mktemp("hires-models")
    shutil.copytree(tiny_diffusers_model, root / tiny_diffusers_model.name)
    make_esrgan_upscaler(root / "upscalers", ESRGAN, scale=2)
    return root


@pytest.fixture(scope="module")
def registry(hires_models_dir, tmp_path_factory) -> ModelRegistry:
    return ModelRegistry(hires_models_dir, tmp_path_factory.mktemp("hashes") / "model-hashes.json")


@pytest.fixture(scope="module")
def engine(registry):
    engine = DiffusersEngine(registry, device="cpu")
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def api(tmp_path_factory, hires_models_dir):
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("hires-data"),
        models_dir=hires_models_dir,
        poll_seconds=0.05,
        progress_interval=0,
        limits=LIMITS,
        webhooks=WebhookSettings(enabled=False),
    )
    svc = Services.open(settings)
    with TestClient(create_app(svc, workers=1)) as client:
        yield client
    svc.close()


def png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def job_count(api: TestClient) -> int:
    return len(api.get("/v1/jobs").json())


# --- the request ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "size"),
    [
        ({"scale": 2}, (128, 96)),
        ({"scale": 1.5}, (96, 72)),
        ({"resize_x": 200}, (200, 144)),  # height follows the aspect ratio, both rounded down to a multiple of 8
        ({"resize_y": 120}, (160, 120)),
        ({"resize_x": 100, "resize_y": 300}, (96, 296)),
    ],
)
def test_target_size_as_a1111_computes_it(spec, size):
    assert HiresSpec(**spec).target_size(64, 48) == size


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"scale": 5}, "hires.scale"),  # 320 wide > 256
        ({"resize_x": 256, "resize_y": 256}, "hires.resize_x"),  # each side fits, the pixel count does not
        ({"resize_y": 512}, "hires.resize_y"),
        ({"second_pass_steps": 151}, "hires.second_pass_steps"),
        ({"second_pass_steps": 1, "denoising_strength": 0.5}, "hires.denoising_strength"),
    ],
)
def test_limits_apply_to_the_second_pass_naming_the_field(spec, field):
    request = GenerationRequest(prompt="x", hires=HiresSpec(**spec), **SMALL)
    with pytest.raises(InvalidRequest) as caught:
        check_limits(request, LIMITS.model_copy(update={"max_steps": 150}))
    assert caught.value.field == field


def test_hires_is_part_of_the_batch_key_and_never_joint_batched(engine):
    plain = GenerationRequest(prompt="x", **SMALL)
    hires = plain.model_copy(update={"hires": HiresSpec()})
    other = plain.model_copy(update={"hires": HiresSpec(denoising_strength=0.5)})
    assert len({plain.batch_key(), hires.batch_key(), other.batch_key()}) == 3
    assert hires.batch_key() == plain.model_copy(update={"hires": HiresSpec()}).batch_key()
    joint = DiffusersEngine.__new__(DiffusersEngine)
    joint.batch_invariant = False
    assert joint.batchable([plain, plain]) and not joint.batchable([hires, hires])


def test_infotext_and_provenance_describe_both_passes():
    request = GenerationRequest(
        prompt="x", hires=HiresSpec(scale=2, upscaler="Lanczos", second_pass_steps=4, denoising_strength=0.5), **SMALL
    ).model_dump()
    assert infotext_fields(request) == [
        ("Denoising strength", "0.5"),
        ("Hires upscale", "2"),
        ("Hires steps", 4),
        ("Hires upscaler", "Lanczos"),
    ]
    first, second = passes(request)
    assert (first["width"], first["steps"], second["width"], second["steps"]) == (64, 2, 128, 4)
    assert second["denoised_steps"] == 2 and second["upscaler"] == "Lanczos"


# --- the engine -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos", ESRGAN])
def test_hires_doubles_the_size_with_progress_over_both_passes(engine, registry, upscaler):
    spec = HiresSpec(upscaler=upscaler, second_pass_steps=3, denoising_strength=0.7)
    request = GenerationRequest(prompt="a cat", model=MODEL, hires=spec, **{**SMALL, "n": 2})
    seen: list[tuple[int, int]] = []
    result = engine.generate(request, None, lambda step, total: seen.append((step, total)))
    assert [img.image.size for img in result.images] == [(128, 128), (128, 128)]
    per_image = 2 + int(3 * 0.7)  # first pass steps + the second pass's denoised steps
    assert {total for _, total in seen} == {2 * per_image}
    steps = [step for step, _ in seen]
    assert steps == sorted(set(steps)) and steps[-1] == 2 * per_image


def test_hires_second_pass_changes_the_upscaled_first_pass(engine):
    """The second pass really runs: with a tiny strength it stays near the plain upscale, with a large one it
    moves away from it."""
    import numpy as np

    base = GenerationRequest(prompt="a cat", model=MODEL, **{**SMALL, "steps": 4})
    first = engine.generate(base, None, lambda s, t: None).images[0].image.resize((128, 128), Image.Resampling.LANCZOS)

    def hires(strength: float) -> np.ndarray:
        spec = HiresSpec(upscaler="Lanczos", denoising_strength=strength)
        out = engine.generate(base.model_copy(update={"hires": spec}), None, lambda s, t: None)
        return np.asarray(out.images[0].image).astype(int)

    near, far = (np.abs(hires(s) - np.asarray(first).astype(int)).mean() for s in (0.25, 1.0))
    assert far > near


def test_latent_hires_on_sdxl(tiny_sdxl_model, tmp_path):
    registry = ModelRegistry(tiny_sdxl_model.parent, tmp_path / "hashes.json")
    engine = DiffusersEngine(registry, device="cpu")
    try:
        request = GenerationRequest(prompt="a cat", model=tiny_sdxl_model.name, hires=HiresSpec(), **SMALL)
        assert engine.generate(request, None, lambda s, t: None).images[0].image.size == (128, 128)
    finally:
        engine.close()


# --- the APIs -------------------------------------------------------------------------------------------------------


def test_native_hires_job_records_both_passes(api, registry):
    body = {"prompt": "a cat", "hires": {"upscaler": ESRGAN.upper(), "second_pass_steps": 2}, **SMALL}
    job = api.post("/v1/generate", json=body).json()
    assert job["state"] == "succeeded", job
    assert (job["images"][0]["width"], job["images"][0]["height"]) == (128, 128)
    sha = registry.file_sha256(registry.upscaler_files()[ESRGAN])
    assert job["request"]["hires"]["upscaler"] == ESRGAN and job["request"]["hires"]["sha256"] == sha  # pinned
    first, second = job["provenance"]["hires_passes"]
    assert (first["width"], second["width"], second["upscaler_sha256"]) == (64, 128, sha)
    image = png(base64.b64encode(api.get(job["images"][0]["url"]).content).decode())
    assert image.size == (128, 128)
    text = image.text["parameters"]
    assert "Size: 64x64" in text and "Hires upscale: 2, Hires steps: 2, Hires upscaler: tiny-esrgan-2x" in text
    assert "Denoising strength: 0.7" in text


@pytest.mark.parametrize(
    ("hires", "field", "needle"),
    [
        ({"upscaler": "4x-Nope"}, "hires.upscaler", "'4x-Nope'"),
        ({"scale": 8}, "hires.scale", "512x512"),
        ({"resize_x": 1000}, "hires.resize_x", "1000x1000"),
        ({"scale": 0.5}, "hires.scale", "greater than or equal to 1"),
    ],
)
def test_native_hires_422_names_the_field_before_a_job_exists(api, hires, field, needle):
    before = job_count(api)
    response = api.post("/v1/jobs", json={"prompt": "a cat", "hires": hires, **SMALL})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == field and needle in error["message"], error
    assert job_count(api) == before


def test_native_hires_is_for_txt2img_only(api):
    source = base64.b64encode(b"not even an image").decode()
    response = api.post("/v1/jobs", json={"prompt": "a cat", "hires": {}, "init_image": source, **SMALL})
    assert response.status_code == 422 and response.json()["error"]["field"] == "hires"


def test_a1111_enable_hr_runs_hires_fix(api):
    body = {
        "prompt": "a lighthouse",
        "enable_hr": True,
        "hr_scale": 2,
        "hr_upscaler": "Latent (nearest)",
        "hr_second_pass_steps": 2,
        "denoising_strength": 0.6,
        **SMALL,
    }
    response = api.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    out = response.json()
    assert set(out) == {"images", "parameters", "info"}
    assert png(out["images"][0]).size == (128, 128)
    assert out["parameters"]["enable_hr"] is True and out["parameters"]["hr_upscaler"] == "Latent (nearest)"
    info = json.loads(out["info"])
    assert (info["width"], info["height"], info["denoising_strength"]) == (64, 64, 0.6)
    assert info["extra_generation_params"] == {
        "Hires upscale": "2",
        "Hires steps": 2,
        "Hires upscaler": "Latent (nearest)",
    }
    assert (
        "Denoising strength: 0.6, Hires upscale: 2, Hires steps: 2, Hires upscaler: Latent (nearest)"
        in (info["infotexts"][0])
    )


def test_a1111_hr_resize_and_default_upscaler(api):
    body = {"prompt": "a lighthouse", "enable_hr": True, "hr_resize_x": 96, **SMALL}
    out = api.post("/sdapi/v1/txt2img", json=body).json()
    assert png(out["images"][0]).size == (96, 96)
    text = json.loads(out["info"])["infotexts"][0]
    assert "Hires resize: 96x96" in text and "Hires upscaler: Latent" in text


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"hr_upscaler": "4x-Nope"}, "hr_upscaler"),
        ({"hr_scale": 8}, "hr_scale"),
        ({"hr_resize_y": 2048}, "hr_resize_y"),
        ({"hr_second_pass_steps": -1}, "hr_second_pass_steps"),
        ({"denoising_strength": 0}, "denoising_strength"),
        ({"hr_sampler_name": "DPM++ 2M"}, "hr_sampler_name"),
        ({"hr_prompt": "another prompt"}, "hr_prompt"),
        ({"hr_checkpoint_name": "other.safetensors"}, "hr_checkpoint_name"),
    ],
)
def test_a1111_hires_422_names_the_a1111_field(api, patch, field):
    before = job_count(api)
    response = api.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "enable_hr": True, **SMALL, **patch})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field
    assert job_count(api) == before


def test_a1111_lists_latent_upscale_modes(api):
    modes = api.get("/sdapi/v1/latent-upscale-modes").json()
    assert modes[0] == {"name": "Latent"} and {"name": "Latent (nearest-exact)"} in modes
    assert all(set(mode) == {"name"} for mode in modes)
