"""ControlNet units and the SDXL refiner: tiny ControlNets and a tiny refiner built from random weights for the tiny
SD 1.x and SDXL pipelines, run by the real engine (diffusers), and through the native and A1111 APIs with a real
worker. Control images go through the upload checks, are stored, and their hashes land in the provenance."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from darkroom.api.app import create_app
from darkroom.api.controlnet import a1111_refiner
from darkroom.config import Limits, Settings, WebhookSettings
from darkroom.engines import preprocessors
from darkroom.engines.controlnet import ControlNetError, pin_units
from darkroom.engines.diffusers_engine import DiffusersEngine
from darkroom.errors import InvalidRequest
from darkroom.models.registry import ModelRegistry
from darkroom.safety.provenance import read_png
from darkroom.schemas import ControlNetUnit, GenerationRequest
from tests.support.tiny_models import build_tiny_xl_pipeline, make_controlnet, make_sdxl_refiner

SD1, XL, REFINER = "tiny-diffusers", "tiny-xl", "tiny-xl-refiner"
SMALL = {"width": 64, "height": 64, "steps": 2, "seed": 3}


def square(size: int = 64) -> Image.Image:
    """A black square on white: canny gives its outline, invert a white square."""
    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).rectangle((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill="black")
    return image


def b64png(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(int)


@pytest.fixture(scope="module")
def cn_models_dir(tmp_path_factory, tiny_diffusers_model, tiny_sdxl_model) -> Path:
    """The tiny SD 1.x and SDXL models, an SDXL refiner, ControlNets for each family in both layouts, and a
    safetensors file in controlnet/ that is no ControlNet."""
    root = tmp_path_factory.mktemp("cn-models")
    shutil.copytree(tiny_diffusers_model, root / tiny_diffusers_model.name)
    shutil.copytree(tiny_sdxl_model, root / tiny_sdxl_model.name)
    make_sdxl_refiner(root, REFINER)
    folder = root / "controlnet"
    make_controlnet(folder, "edges")  # a diffusers folder
    make_controlnet(folder, "edges-original", fmt="original")  # the same weights, lllyasviel's key layout
    make_controlnet(folder, "lines", fmt="single_file", seed=14)
    make_controlnet(folder, "xl-edges", pipe=build_tiny_xl_pipeline(seed=0), fmt="single_file")
    from safetensors.numpy import save_file

    save_file({"foo.weight": np.ones((3, 3), dtype=np.float32)}, str(folder / "not-a-controlnet.safetensors"))
    return root


@pytest.fixture(scope="module")
def registry(cn_models_dir, tmp_path_factory) -> ModelRegistry:
    return ModelRegistry(cn_models_dir, tmp_path_factory.mktemp("cn-hashes") / "model-hashes.json")


@pytest.fixture(scope="module")
def engine(registry):
    engine = DiffusersEngine(registry, device="cpu")
    yield engine
    engine.close()


def render(engine, registry, model: str = SD1, units: tuple[dict, ...] = (), **extra) -> np.ndarray:
    request = GenerationRequest(prompt="a cat", model=model, **{**SMALL, **extra})
    controls = None
    if units:
        pinned = pin_units(registry, [ControlNetUnit(image="x", **unit) for unit in units], registry.get(model))
        request = request.model_copy(update={"controlnet": pinned})
        controls = [square() for _ in units]
    result = engine.generate(request, None, lambda step, total: None, control_images=controls)
    return np.asarray(result.images[0].image).astype(int)


@pytest.fixture(scope="module")
def base(engine, registry) -> np.ndarray:
    return render(engine, registry)


# --- registry and preprocessors -------------------------------------------------------------------------------------


def test_registry_lists_controlnets_with_family_and_sha256(registry, cn_models_dir):
    listed = {info.name: info for info in registry.controlnets()}
    assert set(listed) == {"edges", "edges-original", "lines", "xl-edges"}  # not-a-controlnet is skipped
    assert (listed["edges"].format, listed["edges"].arch) == ("diffusers", "sd1")
    assert (listed["lines"].format, listed["lines"].arch, listed["xl-edges"].arch) == ("single_file", "sd1", "sdxl")
    lines = cn_models_dir / "controlnet" / "lines.safetensors"
    assert listed["lines"].sha256 == hashlib.sha256(lines.read_bytes()).hexdigest()
    assert registry.controlnet(listed["lines"].title()).name == "lines"  # A1111's `name [hash8]`
    assert registry.controlnet("EDGES").name == "edges"
    assert {m.id: m.arch for m in registry.scan()} == {SD1: "sd1", XL: "sdxl", REFINER: "sdxl-refiner"}
    assert registry.default().id == SD1  # a refiner never starts a picture


def test_preprocessors_make_maps_without_downloads():
    edges = np.asarray(preprocessors.control_map(square(), "canny", (64, 64)))[:, :, 0] > 0
    assert edges[16, 32] or edges[15, 32] or edges[17, 32]  # the square's top side
    assert not edges[32, 32] and not edges[2, 2]  # nothing inside it or in the flat background
    assert np.asarray(preprocessors.control_map(square(), "invert", (64, 64)))[32, 32].tolist() == [255, 255, 255]
    lines = np.asarray(preprocessors.control_map(square(), "scribble_xdog", (64, 64)))
    assert lines.max() == 255 and lines[2, 2].max() == 0
    blurred = np.asarray(preprocessors.control_map(square(), "blur_gaussian", (64, 64), threshold_a=3))
    assert 0 < blurred[16, 32, 0] < 255
    wide = Image.new("RGB", (128, 64), "white")
    for mode in ("resize", "crop", "fill"):
        assert preprocessors.control_map(wide, "tile_resample", (64, 48), mode, threshold_a=2).size == (64, 48)
    assert preprocessors.resolve("None") == "none"
    with pytest.raises(InvalidRequest, match="'depth_midas' is not available") as caught:
        preprocessors.resolve("depth_midas", field="controlnet[0].module")
    assert caught.value.field == "controlnet[0].module"


def test_batch_key_holds_the_units_but_not_their_images():
    def key(**unit) -> str:
        request = GenerationRequest(prompt="x", controlnet=[{"model": "edges", "image": "a", **unit}], **SMALL)
        return request.batch_key()

    plain = GenerationRequest(prompt="x", **SMALL).batch_key()
    assert len({plain, key(), key(weight=0.5), key(module="canny"), key(model="lines")}) == 5
    assert key(image="b") == key()
    refined = GenerationRequest(prompt="x", refiner={"model": REFINER}, **SMALL).batch_key()
    assert refined != plain


def test_jobs_with_different_units_are_never_claimed_as_one_batch(tmp_path):
    """The store's claim groups by batch key: equal units (other images) share a batch, any other unit set not."""
    from darkroom.jobs.db import migrate
    from darkroom.jobs.store import JobStore

    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    migrate(url, lock_dir=tmp_path)
    store = JobStore(url)
    unit = {"model": "edges", "module": "canny", "image": "blob:" + "a" * 64}
    sets = [
        [unit],
        [{**unit, "weight": 0.5}],
        [{**unit, "image": "blob:" + "b" * 64}],
        [],
        [{**unit, "model": "lines"}],
    ]
    try:
        for i, units in enumerate(sets):
            store.enqueue(GenerationRequest(prompt=f"job {i}", controlnet=units, **SMALL), with_status=False)
        batches = []
        while claimed := store.claim_batch("w1", 60, max_batch=8):
            batches.append(sorted(job.request["prompt"] for job in claimed))
        assert sorted(batches) == [["job 0", "job 2"], ["job 1"], ["job 3"], ["job 4"]]
    finally:
        store.close()


# --- engine ---------------------------------------------------------------------------------------------------------


def test_a_unit_steers_the_picture_weight_zero_leaves_it_and_the_base_comes_back(engine, registry, base):
    steered = render(engine, registry, units=({"model": "edges", "module": "canny"},))
    assert np.abs(steered - base).max() > 10
    assert np.array_equal(render(engine, registry, units=({"model": "edges", "module": "canny", "weight": 0},)), base)
    assert np.array_equal(render(engine, registry), base)  # the cached pipeline was never changed


def test_single_files_in_both_layouts_two_units_and_control_modes(engine, registry, base):
    lines = render(engine, registry, units=({"model": "lines", "module": "invert"},))
    assert np.abs(lines - base).max() > 10
    edges = {"model": "edges", "module": "canny"}
    both = render(engine, registry, units=(edges, {"model": "lines", "module": "invert"}))
    assert not np.array_equal(both, lines)
    balanced = render(engine, registry, units=(edges,))
    original = render(engine, registry, units=({**edges, "model": "edges-original"},))
    assert np.array_equal(original, balanced)  # the original layout converts to exactly the same model
    for mode in ("prompt", "control"):
        assert not np.array_equal(render(engine, registry, units=({**edges, "control_mode": mode},)), balanced)
    late = render(engine, registry, units=({**edges, "guidance_start": 0.5},))
    assert not np.array_equal(late, balanced)


def test_the_worker_refuses_a_controlnet_changed_or_removed_since_submit(engine, registry):
    pinned = pin_units(registry, [ControlNetUnit(image="x", model="edges")], registry.get(SD1))
    for unit, needle in (
        (pinned[0].model_copy(update={"sha256": "0" * 64}), "changed since the job was queued"),
        (pinned[0].model_copy(update={"model": "gone"}), "no longer available"),
    ):
        request = GenerationRequest(prompt="a cat", model=SD1, controlnet=[unit], **SMALL)
        with pytest.raises(ControlNetError, match=needle) as caught:
            engine.generate(request, None, lambda step, total: None, control_images=[square()])
        assert caught.value.permanent and caught.value.code == "controlnet_incompatible"


# --- through the APIs -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(tmp_path_factory, cn_models_dir):
    from darkroom.service import Services

    settings = Settings(
        data_dir=tmp_path_factory.mktemp("cn-data"),
        models_dir=cn_models_dir,
        poll_seconds=0.05,
        progress_interval=0,
        webhooks=WebhookSettings(enabled=False),
        limits=Limits(max_upload_pixels=128 * 128),  # a control image past it costs nothing to make
    )
    svc = Services.open(settings)
    with TestClient(create_app(svc, workers=1)) as client:
        yield client
    svc.close()


UNIT = {"model": "edges", "module": "canny", "weight": 1.0}


def test_native_unit_runs_pinned_stored_and_recorded(api, registry):
    image = b64png(square(96))
    plain = api.post("/v1/generate", json={"prompt": "a cat", **SMALL}).json()
    body = api.post("/v1/generate", json={"prompt": "a cat", "controlnet": [{**UNIT, "image": image}], **SMALL}).json()
    assert body["state"] == "succeeded", body
    unit = body["request"]["controlnet"][0]
    sha = registry.controlnet("edges").sha256
    assert unit["sha256"] == sha and unit["image"].startswith("blob:")
    png = api.get(f"/v1/images/{body['images'][0]['id']}").content
    steered = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    plain_png = api.get(f"/v1/images/{plain['images'][0]['id']}").content
    assert np.abs(steered - np.asarray(Image.open(io.BytesIO(plain_png)).convert("RGB")).astype(int)).max() > 10
    record = body["provenance"]["controlnet"][0]
    assert record["model"] == "edges" and record["model_sha256"] == sha and record["module"] == "canny"
    assert record["image_sha256"] == unit["image"].removeprefix("blob:")
    assert (record["weight"], record["guidance_start"], record["guidance_end"]) == (1.0, 0.0, 1.0)
    meta = read_png(png)
    assert f'ControlNet 0: "Module: canny, Model: edges [{sha[:8]}], Weight: 1' in meta["parameters"]
    assert f"Image Hash: {record['image_sha256'][:12]}" in meta["parameters"]
    info = api.post("/sdapi/v1/png-info", json={"image": base64.b64encode(png).decode()}).json()
    assert info["info"] == meta["parameters"] and info["items"]["darkroom"]["controlnet"] == [record]


def bad(**fields) -> dict:
    return {"prompt": "a cat", **SMALL, **fields}


@pytest.mark.parametrize(
    ("body", "field", "needle"),
    [
        (bad(controlnet=[{**UNIT, "module": "openpose"}]), "controlnet[0].module", "'openpose' is not available"),
        (bad(controlnet=[{**UNIT, "model": "nope"}]), "controlnet[0].model", "unknown ControlNet model 'nope'"),
        (bad(controlnet=[{**UNIT, "model": "xl-edges"}]), "controlnet[0].model", "is for sdxl models"),
        (bad(controlnet=[{**UNIT, "image": "@@@"}]), "controlnet[0].image", "not valid base64"),
        (bad(controlnet=[{**UNIT, "image": b64png(square())[:40]}]), "controlnet[0].image", "not a readable image"),
        (bad(refiner={"model": "nope"}), "refiner.model", "unknown model 'nope'"),
        (bad(refiner={"model": REFINER}), "refiner.model", "for SDXL models"),
        (bad(model=XL, refiner={"model": SD1}), "refiner.model", "cannot refine"),
        (bad(model=REFINER), "model", "is an SDXL refiner"),
        (bad(controlnet=[UNIT], hires={"scale": 2}), "controlnet", "hires fix"),
    ],
)
def test_native_refusals_name_the_field_before_a_job_exists(api, body, field, needle):
    image = b64png(square())
    for unit in body.get("controlnet", []):
        unit.setdefault("image", image)
    before = len(api.get("/v1/jobs").json())
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == field and needle in error["message"], error
    assert len(api.get("/v1/jobs").json()) == before


def test_a_control_image_past_the_upload_limits_is_refused(api):
    huge = b64png(Image.new("RGB", (129, 128), "white"))
    response = api.post("/v1/jobs", json=bad(controlnet=[{**UNIT, "image": huge}]))
    assert response.status_code in (413, 422) and response.json()["error"]["field"] == "controlnet[0].image"


def image_of(api, job: dict) -> np.ndarray:
    png = api.get(f"/v1/images/{job['images'][0]['id']}").content
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def test_sdxl_unit_and_refiner_change_the_picture_and_are_recorded(api, registry):
    plain = api.post("/v1/generate", json=bad(model=XL, steps=4)).json()
    unit = {"model": "xl-edges", "module": "canny", "image": b64png(square())}
    steered = api.post("/v1/generate", json=bad(model=XL, steps=4, controlnet=[unit])).json()
    body = api.post("/v1/generate", json=bad(model=XL, steps=4, refiner={"model": REFINER, "switch_at": 0.25})).json()
    assert body["state"] == "succeeded" and steered["state"] == "succeeded", (body, steered)
    assert np.abs(image_of(api, steered) - image_of(api, plain)).max() > 10
    assert np.abs(image_of(api, body) - image_of(api, plain)).max() > 5
    sha = registry.get(REFINER).sha256
    assert body["request"]["refiner"] == {"model": REFINER, "switch_at": 0.25, "sha256": sha}
    passes = body["provenance"]["refiner_passes"]
    assert [(p["part"], p["model"], p["steps"]) for p in passes] == [("base", XL, 1), ("refiner", REFINER, 3)]
    text = read_png(api.get(f"/v1/images/{body['images'][0]['id']}").content)["parameters"]
    assert f"Refiner: {REFINER} [{sha[:10]}], Refiner switch at: 0.25" in text


# --- A1111's shapes -------------------------------------------------------------------------------------------------


def a1111_unit(**fields) -> dict:
    """A unit as the ControlNet extension's clients send it."""
    unit = {
        "enabled": True,
        "image": b64png(square()),
        "module": "canny",
        "model": "edges",
        "weight": 1.0,
        "resize_mode": "Crop and Resize",
        "lowvram": False,
        "processor_res": 512,
        "threshold_a": 100,
        "threshold_b": 200,
        "guidance_start": 0.0,
        "guidance_end": 1.0,
        "control_mode": "Balanced",
        "pixel_perfect": False,
    }
    return {**unit, **fields}


def test_a1111_extension_routes(api, registry):
    assert api.get("/controlnet/version").json() == {"version": 2}
    models = api.get("/controlnet/model_list").json()["model_list"]
    assert models == [info.title() for info in registry.controlnets()]
    modules = api.get("/controlnet/module_list").json()
    assert {"none", "canny", "invert", "tile_resample", "blur_gaussian", "scribble_xdog"} <= set(modules["module_list"])
    assert modules["module_detail"]["canny"]["sliders"][1]["name"] == "Canny Low Threshold"


def test_a1111_txt2img_with_controlnet_units(api, registry):
    plain = api.post("/sdapi/v1/txt2img", json={"prompt": "a cat", **SMALL}).json()
    title = registry.controlnet("edges").title()
    scripts = {"controlnet": {"args": [a1111_unit(model=title), a1111_unit(enabled=False, module="nope")]}}
    steered = api.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "alwayson_scripts": scripts, **SMALL})
    assert steered.status_code == 200, steered.text
    out = steered.json()
    assert np.abs(decode(out["images"][0]) - decode(plain["images"][0])).max() > 10
    info = json.loads(out["info"])
    assert info["extra_generation_params"]["ControlNet 0"].startswith(f'"Module: canny, Model: {title}, Weight: 1')
    assert "Threshold A: 100, Threshold B: 200" in info["infotexts"][0]
    off = {"controlnet": {"args": [a1111_unit(enabled=False)]}}
    same = api.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "alwayson_scripts": off, **SMALL}).json()
    assert np.array_equal(decode(same["images"][0]), decode(plain["images"][0]))


def test_a1111_img2img_with_a_unit(api):
    body = {
        "prompt": "a cat",
        "init_images": [b64png(Image.new("RGB", (64, 64), "gray"))],
        "denoising_strength": 0.5,
        "alwayson_scripts": {"ControlNet": {"args": [a1111_unit(module="invert", model="lines", resize_mode=0)]}},
        **SMALL,
    }
    response = api.post("/sdapi/v1/img2img", json=body)
    assert response.status_code == 200, response.text
    job = api.get(f"/v1/jobs/{json.loads(response.json()['info'])['job_id']}").json()
    assert job["request"]["controlnet"][0]["resize_mode"] == "resize" and job["state"] == "succeeded"


@pytest.mark.parametrize(
    ("unit", "field", "needle"),
    [
        (a1111_unit(module="depth_midas"), "args[0].module", "not available"),
        (a1111_unit(model="nope [12345678]"), "args[0].model", "unknown ControlNet model"),
        (a1111_unit(model="xl-edges"), "args[0].model", "is for sdxl models"),
        (a1111_unit(control_mode="Loud"), "args[0].control_mode", "is not one of"),
        (a1111_unit(image=None), "args[0].image", "needs a control image"),
        (a1111_unit(guidance_start=0.8, guidance_end=0.2), "args[0].guidance_end", "greater than guidance_start"),
    ],
)
def test_a1111_bad_units_are_422_naming_the_extension_field(api, unit, field, needle):
    body = {"prompt": "a cat", "alwayson_scripts": {"controlnet": {"args": [unit]}}, **SMALL}
    response = api.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == f"alwayson_scripts.controlnet.{field}" and needle in error["message"], error


def test_a1111_refiner_fields(api, registry):
    xl = {"prompt": "a cat", "override_settings": {"sd_model_checkpoint": XL}, **SMALL}  # 1 step each part
    title = f"{REFINER} [{registry.get(REFINER).sha256[:10]}]"
    response = api.post("/sdapi/v1/txt2img", json={**xl, "refiner_checkpoint": title, "refiner_switch_at": 0.5})
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert info["extra_generation_params"]["Refiner"] == title
    assert info["extra_generation_params"]["Refiner switch at"] == "0.5"
    unknown = api.post("/sdapi/v1/txt2img", json={**xl, "refiner_checkpoint": "nope"})
    assert unknown.status_code == 422 and unknown.json()["error"]["field"] == "refiner_checkpoint"
    sd1 = api.post("/sdapi/v1/txt2img", json={"prompt": "a cat", **SMALL, "refiner_checkpoint": REFINER})
    assert sd1.status_code == 422 and sd1.json()["error"]["field"] == "refiner_checkpoint"
    assert a1111_refiner(None, "None", 0.5) is None  # type: ignore[arg-type]  # A1111's "no refiner" needs no lookup
