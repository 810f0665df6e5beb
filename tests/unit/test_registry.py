"""The models folder as the registry sees it: formats, ids, hashes and their cache, arch, adding, smoke model."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from darkroom.errors import Conflict, InvalidRequest, ServiceUnavailable
from darkroom.models import registry as registry_module
from darkroom.models.registry import ModelRegistry, diffusers_arch, single_file_arch, slugify
from darkroom.models.smoke import SMOKE_MODEL_DIRNAME, ensure_smoke_model
from tests.support.tiny_models import label


def fake_checkpoint(path: Path, *prefixes: str) -> Path:
    """A safetensors file with the given key prefixes and no real weights: enough for header-only detection."""
    tensors = {f"{prefix}weight": np.zeros(2, dtype=np.float32) for prefix in prefixes}
    save_file(tensors, str(path))
    return path


def fake_diffusers(folder: Path, class_name: str, unet: dict | None = None, text: dict | None = None) -> Path:
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    (folder / "unet" / "config.json").write_text(json.dumps(unet or {"cross_attention_dim": 768}))
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    if text is not None:
        (folder / "text_encoder").mkdir()
        (folder / "text_encoder" / "config.json").write_text(json.dumps(text))
    return folder


def file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def models(tmp_path: Path, tiny_diffusers_model: Path, tiny_single_file_model: Path) -> Path:
    """A writable models folder with the tiny model in both formats (copies: tests change it)."""
    root = tmp_path / "models"
    shutil.copytree(tiny_diffusers_model, root / "Tiny Diffusers")
    shutil.copy2(tiny_single_file_model, root / "tiny-single.safetensors")
    shutil.copytree(tiny_single_file_model.with_suffix(".config"), root / "tiny-single.config")
    return root


def make_registry(models: Path) -> ModelRegistry:
    return ModelRegistry(models, models.parent / "hashes.json")


# --- scanning ---------------------------------------------------------------------------------------------------------


def test_scan_finds_both_formats_with_ids_arch_sizes_and_hashes(models: Path) -> None:
    found = {m.id: m for m in make_registry(models).scan()}
    assert sorted(found) == ["tiny-diffusers", "tiny-single"]  # the .config sidecar is not a model of its own
    folder, single = found["tiny-diffusers"], found["tiny-single"]
    assert (folder.format, folder.arch, folder.name) == ("diffusers", "sd1", "Tiny Diffusers")
    assert (single.format, single.arch, single.name) == ("single_file", "sd1", "tiny-single")
    assert single.sha256 == file_sha(models / "tiny-single.safetensors")
    assert single.size_bytes == (models / "tiny-single.safetensors").stat().st_size
    files = sorted(p for p in (models / "Tiny Diffusers").rglob("*") if p.is_file())
    expected = hashlib.sha256()
    for f in files:
        rel = f.relative_to(models / "Tiny Diffusers").as_posix()
        expected.update(f"{rel}\0{file_sha(f)}\n".encode())
    assert folder.sha256 == expected.hexdigest()
    assert folder.size_bytes == sum(f.stat().st_size for f in files)
    assert Path(folder.path) == (models / "Tiny Diffusers").resolve()


def test_folder_hash_ignores_darkroom_metadata_but_not_weights(models: Path) -> None:
    registry = make_registry(models)
    before = registry.get("tiny-diffusers").sha256
    label(models / "Tiny Diffusers", description="a note")
    after = registry.get("tiny-diffusers")
    assert after.sha256 == before
    assert after.description == "a note"  # the label change was still seen
    (models / "Tiny Diffusers" / "unet" / "extra.txt").write_text("changed")
    assert registry.get("tiny-diffusers").sha256 != before


def test_hashes_are_cached_across_restarts_and_refreshed_on_change(models: Path, monkeypatch) -> None:
    first = make_registry(models).scan()
    assert (models.parent / "hashes.json").is_file()
    hashed: list[str] = []
    real = hashlib.file_digest

    def counting(fh, name):
        hashed.append(fh.name)
        return real(fh, name)

    monkeypatch.setattr(registry_module.hashlib, "file_digest", counting)
    restarted = make_registry(models)
    assert restarted.scan() == first
    assert hashed == []  # nothing re-hashed after a restart
    checkpoint = models / "tiny-single.safetensors"
    os.utime(checkpoint, ns=(checkpoint.stat().st_atime_ns, checkpoint.stat().st_mtime_ns + 10**9))
    assert restarted.get("tiny-single").sha256 == first[1].sha256
    assert hashed == [str(checkpoint)]  # only the touched file


def test_scan_reuses_its_result_until_the_folder_changes(models: Path, monkeypatch, tiny_single_file_model) -> None:
    registry = make_registry(models)
    registry.scan()
    builds: list[int] = []
    real = ModelRegistry._build_infos

    def counting(self):
        builds.append(1)
        return real(self)

    monkeypatch.setattr(ModelRegistry, "_build_infos", counting)
    registry.scan()
    registry.get("tiny-single")
    assert builds == []
    shutil.copy2(tiny_single_file_model, models / "second.safetensors")
    assert "second" in [m.id for m in registry.scan()]
    assert builds == [1]


def test_pickles_hidden_entries_and_non_models_are_not_listed(models: Path, caplog) -> None:
    (models / "danger.ckpt").write_bytes(b"pickle")
    (models / "danger.bin").write_bytes(b"pickle")
    (models / ".hidden.safetensors").write_bytes(b"")
    (models / "notes.txt").write_text("hi")
    fake_checkpoint(models / "some-lora.safetensors", "lora_unet_down_blocks_0.")
    (models / "truncated.safetensors").write_bytes(b"\x00" * 16)
    pickled = fake_diffusers(models / "pickled", "StableDiffusionPipeline")
    (pickled / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (pickled / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with caplog.at_level(logging.WARNING, logger="darkroom.models.registry"):
        ids = [m.id for m in make_registry(models).scan()]
    assert ids == ["tiny-diffusers", "tiny-single"]
    assert "danger.ckpt" in caplog.text and "only pickled weights" in caplog.text
    assert "truncated.safetensors" in caplog.text


def test_ids_are_slugs_and_collisions_get_a_suffix(tmp_path: Path) -> None:
    assert slugify("My Model v1.5 (final)") == "my-model-v1.5-final"
    assert slugify("..Ünïcode__name--") == "unicode__name"
    assert slugify("???") == "model"
    models = tmp_path / "models"
    models.mkdir()
    fake_checkpoint(models / "Dream Shaper.safetensors", "model.diffusion_model.", "cond_stage_model.transformer.")
    fake_checkpoint(models / "dream-shaper.safetensors", "model.diffusion_model.", "cond_stage_model.transformer.")
    assert sorted(m.id for m in make_registry(models).scan()) == ["dream-shaper", "dream-shaper-2"]


# --- architectures ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefixes", "arch"),
    [
        (["model.diffusion_model.", "cond_stage_model.transformer.text_model."], "sd1"),
        (["model.diffusion_model.", "cond_stage_model.model.transformer."], "sd2"),
        (["model.diffusion_model.", "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."], "sdxl"),
        (["model.diffusion_model."], "unknown"),
        (["lora_te_text_model."], None),
    ],
)
def test_single_file_arch_from_header_keys(tmp_path: Path, prefixes: list[str], arch: str | None) -> None:
    assert single_file_arch(fake_checkpoint(tmp_path / "m.safetensors", *prefixes)) == arch


@pytest.mark.parametrize(
    ("class_name", "unet", "text", "arch"),
    [
        ("StableDiffusionPipeline", {"cross_attention_dim": 768}, {"hidden_size": 768}, "sd1"),
        ("StableDiffusionPipeline", {"cross_attention_dim": 1024, "use_linear_projection": True}, None, "sd2"),
        ("StableDiffusionPipeline", {"cross_attention_dim": 768}, {"hidden_size": 1024}, "sd2"),
        ("StableDiffusionXLPipeline", {"cross_attention_dim": 2048}, None, "sdxl"),
        ("KandinskyPipeline", {}, None, "unknown"),
    ],
)
def test_diffusers_arch_from_configs(tmp_path: Path, class_name, unet, text, arch) -> None:
    assert diffusers_arch(fake_diffusers(tmp_path / "m", class_name, unet, text)) == arch


# --- get / default ----------------------------------------------------------------------------------------------------


def test_get_unknown_model_names_the_field(models: Path) -> None:
    with pytest.raises(InvalidRequest) as info:
        make_registry(models).get("nope")
    assert info.value.field == "model"
    assert "tiny-diffusers" in info.value.message


def test_default_prefers_a_real_model_by_name_and_needs_one(models: Path, tmp_path: Path) -> None:
    label(models / "Tiny Diffusers", smoke_test=True, description="noise")
    registry = make_registry(models)
    assert registry.get("tiny-diffusers").smoke_test is True
    assert registry.default().id == "tiny-single"
    (models / "tiny-single.safetensors").unlink()
    assert registry.default().id == "tiny-diffusers"  # only the smoke model is left
    with pytest.raises(ServiceUnavailable):
        make_registry(tmp_path / "empty").default()


# --- add --------------------------------------------------------------------------------------------------------------


def test_add_single_file_brings_its_sidecars(tmp_path: Path, tiny_single_file_model: Path) -> None:
    label(tiny_single_file_model.with_name("elsewhere.safetensors"), description="unused")  # not the one being added
    registry = make_registry(tmp_path / "models")
    info = registry.add(tiny_single_file_model, name="My Checkpoint")
    assert (info.id, info.format, info.arch) == ("my-checkpoint", "single_file", "sd1")
    assert info.sha256 == file_sha(tiny_single_file_model)
    assert (tmp_path / "models" / "my-checkpoint.config" / "model_index.json").is_file()
    assert [p.name for p in (tmp_path / "models").iterdir() if p.name.startswith(".")] == []
    with pytest.raises(Conflict):
        registry.add(tiny_single_file_model, name="my checkpoint")


def test_add_diffusers_folder(tmp_path: Path, tiny_diffusers_model: Path) -> None:
    info = make_registry(tmp_path / "models").add(tiny_diffusers_model)
    assert (info.id, info.format, info.arch) == ("tiny-diffusers", "diffusers", "sd1")


def test_add_refuses_pickles_and_things_that_are_not_models(tmp_path: Path) -> None:
    registry = make_registry(tmp_path / "models")
    (tmp_path / "old.ckpt").write_bytes(b"pickle")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    fake_checkpoint(tmp_path / "vae.safetensors", "encoder.down.0.")
    (tmp_path / "folder").mkdir()
    for path, words in [
        (tmp_path / "old.ckpt", "pickle"),
        (tmp_path / "junk.safetensors", "safetensors"),
        (tmp_path / "vae.safetensors", "UNet"),
        (tmp_path / "folder", "model_index.json"),
        (tmp_path / "missing.safetensors", "does not exist"),
    ]:
        with pytest.raises(InvalidRequest, match=words) as info:
            registry.add(path)
        assert info.value.field == "path"
    assert registry.scan() == []


# --- smoke-test model -------------------------------------------------------------------------------------------------


def test_smoke_model_is_built_only_for_an_empty_folder_and_labelled(tmp_path: Path, tiny_single_file_model) -> None:
    models = tmp_path / "models"
    path = ensure_smoke_model(models)
    assert path == models / SMOKE_MODEL_DIRNAME
    assert ensure_smoke_model(models) is None
    info = make_registry(models).default()
    assert (info.id, info.arch, info.smoke_test) == (SMOKE_MODEL_DIRNAME, "sd1", True)
    assert "darkroom models add" in info.description
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy2(tiny_single_file_model, other / "real.safetensors")
    assert ensure_smoke_model(other) is None
    loras_only = tmp_path / "loras"
    loras_only.mkdir()
    fake_checkpoint(loras_only / "style.safetensors", "lora_unet_down_blocks_0.")
    assert ensure_smoke_model(loras_only) == loras_only / SMOKE_MODEL_DIRNAME


def test_smoke_weights_are_deterministic() -> None:
    import torch

    from darkroom.models.smoke import build_tiny_pipeline

    a, b = build_tiny_pipeline(seed=0), build_tiny_pipeline(seed=0)
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.vae_scale_factor == 8
    assert len(a.tokenizer) == a.text_encoder.config.vocab_size
    ids = a.tokenizer("the cat").input_ids
    assert ids[0] == a.tokenizer.bos_token_id and ids[-1] == a.tokenizer.eos_token_id and len(ids) == 4


def test_registry_imports_no_torch() -> None:
    """The API process scans and validates models; it must not pay for torch."""
    code = "import sys, darkroom.models.registry; assert 'torch' not in sys.modules and 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_an_api_registry_looks_at_the_folder_at_most_once_a_second_but_sees_new_models_at_once(models: Path) -> None:
    """The API asks for the default model on every submit: within `rescan_seconds` it stats the folder only.
    A model added shows at once (the folder's mtime moved); a change inside a model's folder shows on the next full
    look, which `rescan` forces."""
    registry = make_registry(models)
    registry.rescan_seconds = 3600.0
    before = registry.get("tiny-diffusers").sha256
    (models / "Tiny Diffusers" / "unet" / "extra.txt").write_text("changed")
    assert registry.get("tiny-diffusers").sha256 == before  # not looked at yet
    shutil.copy(models / "tiny-single.safetensors", models / "another.safetensors")
    assert "another" in {m.id for m in registry.scan()}  # a new top-level entry: seen at once
    assert registry.get("tiny-diffusers").sha256 != before  # and that look saw the changed folder too
    (models / "Tiny Diffusers" / "unet" / "extra.txt").write_text("changed again")
    changed = registry.get("tiny-diffusers").sha256
    assert registry.rescan() and registry.get("tiny-diffusers").sha256 != changed
