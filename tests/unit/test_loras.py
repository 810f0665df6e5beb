"""LoRA adapters and textual-inversion embeddings: real files built from random weights, loaded by the real engine
(diffusers + PEFT) into the tiny SD 1.x pipeline, and through the native and A1111 APIs with a real worker."""

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
from PIL import Image

from darkroom.api.app import create_app
from darkroom.config import Settings, WebhookSettings
from darkroom.engines.adapters import AdapterError
from darkroom.engines.diffusers_engine import DiffusersEngine
from darkroom.errors import JobCancelled
from darkroom.models.registry import ModelRegistry
from darkroom.schemas import EmbeddingSpec, GenerationRequest, LoraSpec
from darkroom.service import Services
from tests.support.tiny_models import build_tiny_xl_pipeline, make_embedding, make_lora

MODEL = "tiny-diffusers"
SMALL = {"width": 64, "height": 64, "steps": 2, "seed": 3}


@pytest.fixture(scope="module")
def lora_models_dir(tmp_path_factory, tiny_diffusers_model) -> Path:
    """The tiny SD 1.x model, one adapter (seed 7) in all three key layouts, a second adapter, an SDXL-family LoRA,
    a file that is no adapter at all, and one embedding."""
    root = tmp_path_factory.mktemp("lora-models")
    shutil.copytree(tiny_diffusers_model, root / tiny_diffusers_model.name)
    loras = root / "loras"
    make_lora(loras, "style", "kohya", seed=7)
    make_lora(loras / "formats", "style-diffusers", "diffusers", seed=7)
    make_lora(loras / "formats", "style-peft", "peft", seed=7)
    make_lora(loras, "other", "kohya", seed=8)
    make_lora(loras, "xl-style", "peft", pipe=build_tiny_xl_pipeline(seed=0), seed=7)
    from safetensors.numpy import save_file

    save_file({"foo.weight": np.ones((3, 3), dtype=np.float32)}, str(loras / "not-a-lora.safetensors"))
    make_embedding(root / "embeddings", "mytoken")
    return root


@pytest.fixture(scope="module")
def registry(lora_models_dir, tmp_path_factory) -> ModelRegistry:
    return ModelRegistry(lora_models_dir, tmp_path_factory.mktemp("hashes") / "model-hashes.json")


@pytest.fixture(scope="module")
def engine(registry):
    engine = DiffusersEngine(registry, device="cpu")
    yield engine
    engine.close()


def render(engine: DiffusersEngine, registry: ModelRegistry, prompt: str = "a cat", **loras: float) -> np.ndarray:
    specs = registry.pin_loras([LoraSpec(name=name, weight=weight) for name, weight in loras.items()])
    request = GenerationRequest(prompt=prompt, model=MODEL, loras=specs, **SMALL)
    result = engine.generate(request, None, lambda step, total: None)
    return np.asarray(result.images[0].image)


@pytest.fixture(scope="module")
def base(engine, registry) -> np.ndarray:
    return render(engine, registry)


# --- registry -------------------------------------------------------------------------------------------------------


def test_registry_lists_adapters_by_name_with_sha256(registry, lora_models_dir):
    loras = {info.name: info for info in registry.loras()}
    assert set(loras) == {"style", "style-diffusers", "style-peft", "other", "xl-style", "not-a-lora"}
    style = loras["style"]
    assert style.sha256 == hashlib.sha256((lora_models_dir / "loras" / "style.safetensors").read_bytes()).hexdigest()
    assert style.relpath == "style.safetensors" and loras["style-peft"].relpath == "formats/style-peft.safetensors"
    assert style.metadata["ss_output_name"] == "style" and style.kind == "lora"
    assert [e.name for e in registry.embeddings()] == ["mytoken"]
    assert {m.id for m in registry.scan()} == {MODEL}  # adapter folders are never listed as models
    assert registry.lora("STYLE").name == "style"  # typed by hand in A1111 prompts


def test_a_submit_hashes_only_the_adapters_it_names(lora_models_dir, tmp_path):
    fresh = ModelRegistry(lora_models_dir, tmp_path / "hashes.json")
    fresh.pin_loras([LoraSpec(name="style")])
    fresh.pin_embeddings("a cat")  # names no embedding: nothing to read
    hashed = json.loads((tmp_path / "hashes.json").read_text())
    assert [Path(p).name for p in hashed] == ["style.safetensors"]


def test_pinning_refuses_unknown_names_and_stale_pins(registry):
    with pytest.raises(Exception, match="unknown LoRA 'nope'") as caught:
        registry.pin_loras([LoraSpec(name="nope")])
    assert caught.value.field == "loras"
    with pytest.raises(Exception, match="is version") as caught:
        registry.pin_loras([LoraSpec(name="style", sha256="0" * 64)])
    assert registry.pin_loras([LoraSpec(name="style", weight=0.5)])[0].sha256 == registry.lora("style").sha256


def test_the_worker_refuses_a_file_changed_or_removed_since_submit(registry):
    from darkroom.engines.adapters import resolve_embeddings, resolve_loras

    stale = LoraSpec(name="style", weight=1.0, sha256="0" * 64)
    with pytest.raises(AdapterError, match="changed since the job was queued") as caught:
        resolve_loras(registry, [GenerationRequest(prompt="x", model=MODEL, loras=[stale], **SMALL)])
    assert caught.value.permanent
    with pytest.raises(AdapterError, match="no longer in the loras folder"):
        resolve_loras(registry, [GenerationRequest(prompt="x", model=MODEL, loras=[LoraSpec(name="gone")], **SMALL)])
    stale_embedding = EmbeddingSpec(name="mytoken", sha256="0" * 64)
    request = GenerationRequest(prompt="x mytoken", model=MODEL, embeddings=[stale_embedding], **SMALL)
    with pytest.raises(AdapterError, match="embedding 'mytoken' changed since the job was queued"):
        resolve_embeddings(registry, [request])


# --- engine: exact base weights around an adapter -------------------------------------------------------------------


def test_weight_zero_is_base_weight_one_differs_and_next_job_is_base_again(engine, registry, base):
    assert np.array_equal(render(engine, registry, style=0.0), base)
    with_lora = render(engine, registry, style=1.0)
    assert np.abs(with_lora.astype(int) - base.astype(int)).max() > 10
    assert np.array_equal(render(engine, registry), base)  # no stale adapter in the cached pipeline
    assert not any(render_adapters(engine).values())


def render_adapters(engine: DiffusersEngine) -> dict:
    (loaded,) = [engine._cache.get(key) for key in engine.loaded_models()]
    return loaded.txt2img.get_list_adapters()


def test_key_layouts_load_the_same_adapter(engine, registry):
    """kohya, diffusers and PEFT files of one adapter give one image: all three key layouts map onto the model."""
    kohya = render(engine, registry, style=1.0)
    assert np.array_equal(render(engine, registry, **{"style-diffusers": 1.0}), kohya)
    assert np.array_equal(render(engine, registry, **{"style-peft": 1.0}), kohya)


def test_two_adapters_stack(engine, registry, base):
    one = render(engine, registry, style=0.7)
    both = render(engine, registry, style=0.7, other=0.7)
    assert not np.array_equal(one, both) and not np.array_equal(both, base)


@pytest.mark.parametrize("name", ["xl-style", "not-a-lora"])
def test_a_file_for_another_family_fails_for_good_and_leaves_the_base(engine, registry, base, name):
    with pytest.raises(AdapterError, match=name) as caught:
        render(engine, registry, **{name: 1.0})
    assert caught.value.permanent and caught.value.field == "loras" and caught.value.code == "adapter_incompatible"
    assert np.array_equal(render(engine, registry), base)


def test_embedding_token_in_the_prompt_changes_the_image_and_is_removed_after(engine, registry, lora_models_dir, base):
    path = lora_models_dir / "embeddings" / "mytoken.safetensors"
    hidden = path.with_name(".mytoken.safetensors")  # hidden files are not listed
    path.rename(hidden)
    try:
        plain_word = render(engine, registry, "a cat mytoken")  # the same text without the embedding
    finally:
        hidden.rename(path)
    pipe = engine._cache.get(engine.loaded_models()[0]).txt2img
    vocab = len(pipe.tokenizer)
    embedded = render(engine, registry, "a cat mytoken")
    assert np.abs(embedded.astype(int) - plain_word.astype(int)).max() > 10
    assert len(pipe.tokenizer) == vocab and pipe.text_encoder.get_input_embeddings().weight.shape[0] == vocab
    assert np.array_equal(render(engine, registry, "a cat mytoken"), embedded)  # loads again, same result
    pinned = registry.pin_embeddings("a cat mytoken")  # as the API pins them at submit
    assert [spec.name for spec in pinned] == ["mytoken"] and registry.pin_embeddings("a cat mytokens") == []
    request = GenerationRequest(prompt="a cat mytoken", model=MODEL, embeddings=pinned, **SMALL)
    assert np.array_equal(np.asarray(engine.generate(request, None, lambda s, t: None).images[0].image), embedded)
    assert np.array_equal(render(engine, registry), base)


def test_a_cancelled_pass_still_restores_the_base(engine, registry, base):
    def cancel(step: int, total: int) -> None:
        raise JobCancelled("cancelled by the test")

    specs = registry.pin_loras([LoraSpec(name="style")])
    with pytest.raises(JobCancelled):
        engine.generate(GenerationRequest(prompt="a cat mytoken", model=MODEL, loras=specs, **SMALL), None, cancel)
    assert not any(render_adapters(engine).values())
    assert np.array_equal(render(engine, registry), base)


def test_sdxl_lora_and_embedding(tmp_path, tiny_sdxl_model):
    """SDXL: a LoRA on its UNet and first text encoder, an embedding with one tensor per text encoder."""
    shutil.copytree(tiny_sdxl_model, tmp_path / "models" / tiny_sdxl_model.name)
    make_lora(tmp_path / "models" / "loras", "xl-style", "peft", pipe=build_tiny_xl_pipeline(seed=0), seed=7)
    make_embedding(tmp_path / "models" / "embeddings", "xltoken", sdxl=True)
    registry = ModelRegistry(tmp_path / "models", tmp_path / "hashes.json")
    engine = DiffusersEngine(registry, device="cpu")

    def xl(prompt: str = "a cat", **loras: float) -> np.ndarray:
        specs = registry.pin_loras([LoraSpec(name=name, weight=weight) for name, weight in loras.items()])
        request = GenerationRequest(prompt=prompt, model="tiny-xl", loras=specs, **SMALL)
        return np.asarray(engine.generate(request, None, lambda s, t: None).images[0].image).astype(int)

    try:
        base = xl()
        assert np.array_equal(xl(**{"xl-style": 0.0}), base)
        assert np.abs(xl(**{"xl-style": 1.0}) - base).max() > 10
        assert np.array_equal(xl(), base)
        embedding = tmp_path / "models" / "embeddings" / "xltoken.safetensors"
        embedding.rename(embedding.with_name(".hidden"))
        plain_word = xl("a cat xltoken")
        embedding.with_name(".hidden").rename(embedding)
        assert np.abs(xl("a cat xltoken") - plain_word).max() > 10
        assert np.array_equal(xl("a cat xltoken"), xl("a cat xltoken"))  # loaded, removed, loaded again: same
        assert np.array_equal(xl(), base)
    finally:
        engine.close()


# --- batching -------------------------------------------------------------------------------------------------------


def test_a_joint_batch_runs_with_its_one_adapter_set_and_leaves_the_base(engine, registry, base):
    """Two jobs with one LoRA set as one tensor batch; an embedding in one prompt leaves the other prompt alone.
    Batched pixels match solo ones within rounding (the engine's module docstring), not bit for bit."""
    from darkroom.engines.base import BatchItem

    specs = registry.pin_loras([LoraSpec(name="style", weight=1.0)])
    requests = [
        GenerationRequest(prompt=prompt, model=MODEL, loras=specs, **{**SMALL, "seed": seed})
        for prompt, seed in (("a cat", 3), ("a dog mytoken", 4))
    ]
    solo = [np.asarray(engine.generate(r, None, lambda s, t: None).images[0].image).astype(int) for r in requests]
    engine.batch_invariant = False
    try:
        outcomes = engine.generate_batch([BatchItem(request=r, progress=lambda s, t: None) for r in requests])
    finally:
        engine.batch_invariant = True
    assert all(not isinstance(o, Exception) for o in outcomes), outcomes
    for outcome, alone in zip(outcomes, solo, strict=True):
        assert np.abs(np.asarray(outcome.images[0].image).astype(int) - alone).max() <= 2
    assert np.abs(solo[0] - base.astype(int)).max() > 10
    assert np.array_equal(render(engine, registry), base)


def test_batch_key_holds_the_adapter_set(registry):
    def key(**loras: float) -> str:
        specs = registry.pin_loras([LoraSpec(name=n, weight=w) for n, w in loras.items()])
        return GenerationRequest(prompt="x", model=MODEL, loras=specs, **SMALL).batch_key()

    plain = GenerationRequest(prompt="y", model=MODEL, **SMALL).batch_key()
    assert len({plain, key(style=1.0), key(style=0.5), key(other=1.0), key(style=1.0, other=1.0)}) == 5
    assert key(style=1.0, other=0.5) == key(other=0.5, style=1.0)  # the set, not the order
    assert (
        key(style=1.0)
        == GenerationRequest(
            prompt="z", model=MODEL, loras=registry.pin_loras([LoraSpec(name="style")]), **SMALL
        ).batch_key()
    )


def test_batch_key_holds_the_embedding_set(registry):
    """A pass loads the embeddings of every job in it: a job whose prompt happens to hold another tenant's private
    token (one its own tenant may not use, so not pinned for it) must not share that pass."""
    with_token = registry.pin_embeddings("a photo of mytoken")
    assert [e.name for e in with_token] == ["mytoken"]
    key = GenerationRequest(prompt="a photo of mytoken", model=MODEL, embeddings=with_token, **SMALL).batch_key()
    unpinned = GenerationRequest(prompt="a photo of mytoken", model=MODEL, **SMALL).batch_key()
    assert key != unpinned
    assert key == GenerationRequest(prompt="other words", model=MODEL, embeddings=with_token, **SMALL).batch_key()


def test_jobs_with_different_adapter_sets_are_never_claimed_as_one_batch(registry, tmp_path):
    from darkroom.jobs.db import migrate
    from darkroom.jobs.store import JobStore

    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    migrate(url, lock_dir=tmp_path)
    store = JobStore(url)
    try:
        sets = [{"style": 1.0}, {"other": 1.0}, {"style": 1.0}, {}, {"style": 0.5}]
        for i, loras in enumerate(sets):
            specs = registry.pin_loras([LoraSpec(name=n, weight=w) for n, w in loras.items()])
            store.enqueue(GenerationRequest(prompt=f"job {i}", model=MODEL, loras=specs, **SMALL), with_status=False)
        batches = []
        while claimed := store.claim_batch("w1", 60, max_batch=8):
            batches.append(sorted(job.request["prompt"] for job in claimed))
        assert sorted(batches) == [["job 0", "job 2"], ["job 1"], ["job 3"], ["job 4"]]
    finally:
        store.close()


# --- through the APIs -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(tmp_path_factory, lora_models_dir):
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("lora-data"),
        models_dir=lora_models_dir,
        poll_seconds=0.05,
        progress_interval=0,
        webhooks=WebhookSettings(enabled=False),
    )
    svc = Services.open(settings)
    with TestClient(create_app(svc, workers=1)) as client:
        yield client
    svc.close()


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(int)


def test_native_unknown_adapter_is_422_naming_it_before_a_job_exists(api):
    before = len(api.get("/v1/jobs").json())
    response = api.post("/v1/jobs", json={"prompt": "a cat", "loras": [{"name": "nope", "weight": 1}], **SMALL})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "loras" and "'nope'" in response.json()["error"]["message"]
    assert len(api.get("/v1/jobs").json()) == before
    twice = api.post("/v1/jobs", json={"prompt": "a", "loras": [{"name": "style"}, {"name": "style"}], **SMALL})
    assert twice.status_code == 422


def test_native_job_pins_the_adapter_and_records_it(api, registry):
    job = api.post("/v1/generate", json={"prompt": "a cat", "loras": [{"name": "style", "weight": 0.8}], **SMALL})
    body = job.json()
    assert body["state"] == "succeeded", body
    sha = registry.lora("style").sha256
    assert body["request"]["loras"] == [{"name": "style", "weight": 0.8, "sha256": sha}]
    assert body["provenance"]["request"]["loras"][0]["sha256"] == sha


def test_native_wrong_family_fails_once_without_retry(api):
    body = api.post("/v1/generate", json={"prompt": "a cat", "loras": [{"name": "xl-style"}], **SMALL}).json()
    assert body["state"] == "failed" and body["attempts"] == 1, body
    assert body["error"]["code"] == "adapter_incompatible" and "xl-style" in body["error"]["message"]


def test_a1111_lora_tag_is_stripped_used_and_written_back(api, registry):
    plain = api.post("/sdapi/v1/txt2img", json={"prompt": "a cat ", **SMALL}).json()
    zero = api.post("/sdapi/v1/txt2img", json={"prompt": "a cat <lora:style:0>", **SMALL}).json()
    one = api.post("/sdapi/v1/txt2img", json={"prompt": "a cat <lora:style:1>", **SMALL}).json()
    assert np.array_equal(decode(zero["images"][0]), decode(plain["images"][0]))
    assert np.abs(decode(one["images"][0]) - decode(plain["images"][0])).max() > 10
    info = json.loads(one["info"])
    job = api.get(f"/v1/jobs/{info['job_id']}").json()
    assert job["request"]["prompt"] == "a cat " and job["request"]["loras"][0]["name"] == "style"
    short = registry.lora("style").sha256[:12]
    assert info["prompt"] == "a cat <lora:style:1>"  # as sent
    assert info["extra_generation_params"] == {"Lora hashes": f'"style: {short}"'}
    text = info["infotexts"][0]
    assert text.startswith("a cat <lora:style:1>\n") and f'Lora hashes: "style: {short}"' in text
    png_info = api.post("/sdapi/v1/png-info", json={"image": one["images"][0]}).json()
    assert png_info["info"] == text
    assert png_info["items"]["darkroom"]["request"]["loras"][0]["sha256"] == registry.lora("style").sha256


@pytest.mark.parametrize(
    ("prompt", "needle"),
    [("a cat <lora:nope:1>", "'nope'"), ("a cat <lora:style:x>", "must be a number"), ("<lora:style:1>", "non-empty")],
)
def test_a1111_bad_lora_tags_are_422_naming_the_prompt(api, prompt, needle):
    response = api.post("/sdapi/v1/txt2img", json={"prompt": prompt, **SMALL})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "prompt" and needle in response.json()["error"]["message"]


def test_embeddings_are_pinned_at_submit_and_land_in_the_infotext(api, registry):
    from darkroom.safety.provenance import read_png

    body = api.post("/v1/generate", json={"prompt": "a cat", "negative_prompt": "mytoken, blurry", **SMALL}).json()
    assert body["state"] == "succeeded", body
    sha = registry.embeddings()[0].sha256
    assert body["request"]["embeddings"] == [{"name": "mytoken", "sha256": sha}]
    meta = read_png(api.get(f"/v1/images/{body['images'][0]['id']}").content)
    assert f'TI hashes: "mytoken: {sha[:12]}"' in meta["parameters"]
    assert meta["provenance"]["request"]["embeddings"][0]["sha256"] == sha
    plain = api.post("/v1/jobs", json={"prompt": "a cat", **SMALL}).json()
    assert plain["request"]["embeddings"] == []


def test_a1111_lists_loras_and_embeddings_in_its_shapes(api, registry):
    loras = api.get("/sdapi/v1/loras").json()
    style = next(item for item in loras if item["name"] == "style")
    assert set(style) == {"name", "alias", "path", "metadata"}
    assert style["path"] == "style.safetensors" and style["metadata"]["ss_network_dim"] == "4"
    assert len(loras) == len(registry.loras())
    embeddings = api.get("/sdapi/v1/embeddings").json()
    assert embeddings == {
        "loaded": {
            "mytoken": {"step": 100, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 32, "vectors": 2}
        },
        "skipped": {},
    }
    assert api.post("/sdapi/v1/refresh-loras").status_code == 200


def test_openai_generations_take_loras_as_an_extension(api):
    body = {"prompt": "a cat", "model": MODEL, "size": "64x64", "steps": 2, "seed": 3, "response_format": "b64_json"}
    plain = api.post("/v1/images/generations", json=body)
    styled = api.post("/v1/images/generations", json={**body, "loras": [{"name": "style", "weight": 1}]})
    assert plain.status_code == 200 and styled.status_code == 200, styled.text
    assert np.abs(decode(styled.json()["data"][0]["b64_json"]) - decode(plain.json()["data"][0]["b64_json"])).max() > 10
    unknown = api.post("/v1/images/generations", json={**body, "loras": [{"name": "nope"}]})
    assert unknown.status_code in (400, 422) and unknown.json()["error"]["param"] == "loras"
    assert "'nope'" in unknown.json()["error"]["message"]
