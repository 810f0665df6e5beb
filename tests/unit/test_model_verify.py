"""A worker serves a model only when its local copy is there and, where an approved sha256 is recorded, matches it."""

from __future__ import annotations

import hashlib
import shutil

import pytest

from darkroom.models.registry import ModelRegistry
from darkroom.models.verify import verify_local_models


@pytest.fixture
def local_models(tmp_path, models_dir):
    """A private copy of the tiny models (the session's copy is read-only for tests)."""
    root = tmp_path / "models"
    shutil.copytree(models_dir, root)
    return root


def registry_for(root, tmp_path) -> ModelRegistry:
    return ModelRegistry(root, tmp_path / "model-hashes.json")


def test_every_local_model_is_served_without_approved_hashes(local_models, tmp_path):
    registry = registry_for(local_models, tmp_path)
    assert verify_local_models(registry, None) == {"tiny-diffusers", "tiny-single"}


def test_matching_hashes_are_served_and_unknown_approvals_are_ignored(local_models, tmp_path):
    registry = registry_for(local_models, tmp_path)
    approved = {m.id: m.sha256.upper() for m in registry.scan()} | {"not-here": "0" * 64}
    assert verify_local_models(registry, approved) == {"tiny-diffusers", "tiny-single"}


def test_a_tampered_file_is_not_served(local_models, tmp_path):
    registry = registry_for(local_models, tmp_path)
    approved = {m.id: m.sha256 for m in registry.scan()}
    weights = local_models / "tiny-diffusers" / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, different weights
    weights.write_bytes(bytes(data))
    assert verify_local_models(registry, approved) == {"tiny-single"}
    # A truncated copy is not even listed, so it is not served either.
    (local_models / "tiny-single.safetensors").write_bytes(b"\0" * 16)
    assert verify_local_models(registry_for(local_models, tmp_path), approved) == set()


def test_verification_reuses_the_registry_hash_cache(local_models, tmp_path, monkeypatch):
    approved = {m.id: m.sha256 for m in registry_for(local_models, tmp_path).scan()}
    assert (tmp_path / "model-hashes.json").is_file()

    def no_rehash(*_a, **_k):
        raise AssertionError("a cached file was hashed again")

    monkeypatch.setattr(hashlib, "file_digest", no_rehash)
    fresh = registry_for(local_models, tmp_path)  # a restarted worker: new registry, same cache file
    assert verify_local_models(fresh, approved) == {"tiny-diffusers", "tiny-single"}
