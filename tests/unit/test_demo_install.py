"""The shipped demo model becomes the default of an empty models folder, and of nothing else."""

from __future__ import annotations

import json
from pathlib import Path

from darkroom.demo.install import DEMO_MODEL_DIRNAME, WEIGHTS_DIR, ensure_default_model, ensure_demo_model
from darkroom.models.registry import ModelRegistry


def test_the_weights_ship_in_the_package_within_the_size_budget() -> None:
    files = [f for f in WEIGHTS_DIR.rglob("*") if f.is_file()]
    assert {f.name for f in files} >= {"model_index.json", "diffusion_pytorch_model.safetensors", "tokenizer.json"}
    assert not [f for f in files if f.suffix in (".bin", ".ckpt", ".pt")]  # safetensors only
    assert sum(f.stat().st_size for f in files) <= 25 * 1024 * 1024


def test_an_empty_models_folder_gets_the_demo_model_with_its_card(tmp_path: Path, models_dir: Path) -> None:
    path, what = ensure_default_model(tmp_path / "models")
    assert path == tmp_path / "models" / DEMO_MODEL_DIRNAME and "demo model" in what
    card = json.loads((path / "darkroom.json").read_text())
    assert card["defaults"]["width"] == 64 and "only knows shapes" in card["description"]
    assert not card.get("smoke_test")
    info = ModelRegistry(tmp_path / "models", tmp_path / "hashes.json").get(DEMO_MODEL_DIRNAME)
    assert (info.arch, info.format, info.smoke_test) == ("sd1", "diffusers", False)
    assert ensure_demo_model(tmp_path / "models") is None  # once only
    assert ensure_demo_model(models_dir) is None  # a folder with models of its own gets nothing
