"""Pickled checkpoints (`.ckpt`): refused unless an admin enables `security.allow_pickle_models`, and even then one
whose unpickling would run code is refused without running it. Real files: the tiny model's LDM state dict saved with
`torch.save` under `{"state_dict": …}`, like the checkpoints people download."""

from __future__ import annotations

import builtins
import logging
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file
from typer.testing import CliRunner

from darkroom.api.app import create_app
from darkroom.cli import app as cli_app
from darkroom.config import SecuritySettings, Settings
from darkroom.engines.diffusers_engine import DiffusersEngine, load_single_file
from darkroom.errors import InvalidRequest, ModelLoadError
from darkroom.models.registry import ModelRegistry
from darkroom.schemas import GenerationRequest
from darkroom.service import Services

CKPT_ID = "tiny-ckpt"


def nop(done: int, total: int) -> None:
    pass


def req(**kw) -> GenerationRequest:  # type: ignore[no-untyped-def]
    return GenerationRequest(**{"prompt": "a red cat", "width": 64, "height": 64, "steps": 2, "seed": 7, **kw})


@pytest.fixture(scope="module")
def ckpt_source(tiny_single_file_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny-ckpt.ckpt` (torch.save of the tiny model's LDM state dict, Lightning-style) and its config sidecar."""
    folder = tmp_path_factory.mktemp("ckpt-source")
    checkpoint = folder / f"{CKPT_ID}.ckpt"
    torch.save({"state_dict": load_file(str(tiny_single_file_model)), "global_step": 1}, checkpoint)
    shutil.copytree(tiny_single_file_model.with_suffix(".config"), folder / f"{CKPT_ID}.config")
    return checkpoint


@pytest.fixture
def models(tmp_path: Path, ckpt_source: Path, tiny_single_file_model: Path) -> Path:
    """A models folder with the .ckpt and the same weights as .safetensors."""
    root = tmp_path / "models"
    root.mkdir()
    for source in (ckpt_source, tiny_single_file_model):
        shutil.copy2(source, root / source.name)
        shutil.copytree(source.with_suffix(".config"), root / source.with_suffix(".config").name)
    return root


class RunsCode:
    """Unpickling this creates `marker`: what a hostile checkpoint would do with os.system instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (builtins.open, (str(self.marker), "w"))


@pytest.fixture
def hostile(tmp_path: Path, tiny_single_file_model: Path) -> tuple[list[Path], Path]:
    """Two hostile checkpoints: a bare pickle, and torch's zip format with real LDM keys plus a code-running object.
    Each has a loadable config sidecar, so a loader would get as far as reading the weights."""
    marker = tmp_path / "pwned"
    folder = tmp_path / "hostile"
    folder.mkdir()
    for name in ("bare", "zipped"):
        shutil.copytree(tiny_single_file_model.with_suffix(".config"), folder / f"{name}.config")
    bare = folder / "bare.ckpt"
    bare.write_bytes(pickle.dumps({"state_dict": {"model.diffusion_model.x": RunsCode(marker)}}, protocol=2))
    zipped = folder / "zipped.ckpt"
    weights = {"model.diffusion_model.x.weight": torch.zeros(2), "cond_stage_model.transformer.y": torch.zeros(1)}
    torch.save({"state_dict": weights, "callbacks": RunsCode(marker)}, zipped)
    assert not marker.exists()
    return [bare, zipped], marker


# --- off (the default) ------------------------------------------------------------------------------------------------


def test_by_default_a_ckpt_is_not_listed_with_a_warning(models: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    with caplog.at_level(logging.WARNING, logger="darkroom.models.registry"):
        ids = [m.id for m in ModelRegistry(models, models.parent / "hashes.json").scan()]
    assert ids == ["tiny-single"]
    assert f"{CKPT_ID}.ckpt" in caplog.text and "ALLOW_PICKLE_MODELS" in caplog.text


def test_by_default_models_add_refuses_a_ckpt(tmp_path: Path, ckpt_source: Path) -> None:
    registry = ModelRegistry(tmp_path / "models", tmp_path / "hashes.json")
    with pytest.raises(InvalidRequest, match="pickled checkpoint") as info:
        registry.add(ckpt_source)
    assert info.value.field == "path"
    result = CliRunner().invoke(
        cli_app, ["models", "add", str(ckpt_source), "--models-dir", str(tmp_path / "m"), "--data-dir", str(tmp_path)]
    )
    assert result.exit_code == 1 and "pickled checkpoint" in result.output
    assert not any((tmp_path / "m").iterdir())


def test_the_engine_refuses_a_ckpt_even_when_the_registry_lists_it(models: Path) -> None:
    listed = ModelRegistry(models, models.parent / "hashes.json", allow_pickle=True)
    assert CKPT_ID in [m.id for m in listed.scan()]
    engine = DiffusersEngine(listed, device="cpu")  # allow_pickle defaults to False
    with pytest.raises(ModelLoadError, match="pickled checkpoint"):
        engine.generate(req(model=CKPT_ID), None, nop)


def test_services_pass_the_setting_down(tmp_path: Path, models: Path) -> None:
    off = Services.open(Settings(data_dir=tmp_path / "off", models_dir=models))
    on = Services.open(
        Settings(data_dir=tmp_path / "on", models_dir=models, security=SecuritySettings(allow_pickle_models=True))
    )
    try:
        assert CKPT_ID not in [m.id for m in off.registry.scan()]
        assert CKPT_ID in [m.id for m in on.registry.scan()]
        assert off.make_engine().allow_pickle is False and on.make_engine().allow_pickle is True
    finally:
        off.close()
        on.close()


# --- on ---------------------------------------------------------------------------------------------------------------


def test_allowed_ckpt_is_listed_added_and_gives_the_safetensors_pixels(tmp_path: Path, models: Path) -> None:
    registry = ModelRegistry(models, models.parent / "hashes.json", allow_pickle=True)
    info = registry.get(CKPT_ID)
    assert (info.format, info.arch) == ("single_file", "sd1")
    engine = DiffusersEngine(registry, device="cpu", allow_pickle=True)
    try:
        from_ckpt = engine.generate(req(model=CKPT_ID), None, nop)
        from_safetensors = engine.generate(req(model="tiny-single"), None, nop)
    finally:
        engine.close()
    assert np.array_equal(np.asarray(from_ckpt.images[0].image), np.asarray(from_safetensors.images[0].image))
    added = ModelRegistry(tmp_path / "added", tmp_path / "h.json", allow_pickle=True).add(
        models / f"{CKPT_ID}.ckpt", name="Imported"
    )
    assert added.id == "imported" and Path(added.path).name == "imported.ckpt"
    assert (tmp_path / "added" / "imported.config" / "model_index.json").is_file()


def test_allowed_ckpt_generates_through_the_api(tmp_path: Path, models: Path) -> None:
    settings = Settings(
        data_dir=tmp_path / "data",
        models_dir=models,
        poll_seconds=0.05,
        security=SecuritySettings(allow_pickle_models=True, approve_first_seen_models=True),
    )
    services = Services.open(settings)
    try:
        with TestClient(create_app(services, workers=1)) as api:
            assert CKPT_ID in [m["id"] for m in api.get("/v1/models").json()["data"]]
            response = api.post("/v1/generate", json={**req(model=CKPT_ID).model_dump(), "seed": 7})
            assert response.status_code == 200, response.text
            job = response.json()
            assert job["state"] == "succeeded" and job["provenance"]["model"]["id"] == CKPT_ID
    finally:
        services.close()


# --- hostile checkpoints ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("allow", [False, True])
def test_a_ckpt_that_would_run_code_never_runs_it(tmp_path: Path, hostile, allow: bool, caplog) -> None:  # type: ignore
    files, marker = hostile
    models = files[0].parent
    with caplog.at_level(logging.WARNING, logger="darkroom.models.registry"):
        listed = ModelRegistry(models, tmp_path / "hashes.json", allow_pickle=allow).scan()
    assert listed == []
    if allow:
        assert "builtins.open" in caplog.text or "io.open" in caplog.text  # the zipped one: refused by name
        assert "not a PyTorch zip checkpoint" in caplog.text  # the bare one
    for path in files:
        with pytest.raises(InvalidRequest) as info:
            ModelRegistry(tmp_path / "dest", tmp_path / "h.json", allow_pickle=allow).add(path)
        assert info.value.field == "path"
        if allow:  # the second line of defence: diffusers' torch.load(weights_only=True) refuses it too
            with pytest.raises(Exception):  # noqa: B017 - torch's UnpicklingError or diffusers' OSError
                load_single_file(path, "sd1", torch.float32, [])
    assert not marker.exists(), "a pickle ran code"
