"""Live previews through a tiny autoencoder (`gpu.preview_decoders`, engines/preview_decoder.py): random
`AutoencoderTiny` weights built here (no downloads) in the layouts operators bring, previews made through them by the
real engine on the tiny model, and a missing or wrong file refused at start-up with the setting's name."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderTiny
from PIL import Image
from safetensors.torch import save_file

from darkroom.config import GpuSettings, Settings
from darkroom.engines.acceleration import Acceleration
from darkroom.engines.diffusers_engine import DiffusersEngine
from darkroom.engines.preview_decoder import check_preview_decoders, load_tiny_decoder
from darkroom.models.registry import ModelRegistry
from darkroom.schemas import GenerationRequest

SMALL = {"encoder_block_out_channels": (8, 8, 8, 8), "decoder_block_out_channels": (8, 8, 8, 8)}


def tiny_autoencoder(**config) -> AutoencoderTiny:
    torch.manual_seed(0)
    return AutoencoderTiny(**config).eval()


@dataclass
class Built:
    folder: Path  # a diffusers folder (small config)
    diffusers: Path  # one file with diffusers' keys (default config, as the real TAESD)
    taesd: Path  # the original TAESD decoder file: its layer k is diffusers' decoder layer k - 1
    reference: AutoencoderTiny  # the weights both files hold


@pytest.fixture(scope="module")
def decoders(tmp_path_factory: pytest.TempPathFactory) -> Built:
    root = tmp_path_factory.mktemp("preview")
    tiny_autoencoder(**SMALL).save_pretrained(root / "taesd")
    full = tiny_autoencoder()
    save_file(full.state_dict(), str(root / "taesd-diffusers.safetensors"))
    original = {}
    for key, value in full.decoder.state_dict().items():
        index, rest = key.removeprefix("layers.").split(".", 1)
        original[f"{int(index) + 1}.{rest}"] = value.contiguous()
    save_file(original, str(root / "taesd_decoder.safetensors"))
    return Built(root / "taesd", root / "taesd-diffusers.safetensors", root / "taesd_decoder.safetensors", full)


@pytest.mark.parametrize("layout", ["diffusers", "taesd"])
def test_single_files_load_with_the_weights_they_hold(decoders, layout) -> None:
    loaded = load_tiny_decoder(getattr(decoders, layout), "cpu", torch.float32)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(loaded.decode(latents).sample, decoders.reference.decode(latents).sample)


class Watcher:
    """A job's progress callback that asks for a preview at every step, as the worker's does every second."""

    def __init__(self) -> None:
        self.previews: list[bytes] = []

    def __call__(self, step: int, total: int) -> None:
        pass

    def wants_preview(self, step: int) -> bool:
        return True

    def preview(self, step: int, jpeg: bytes) -> None:
        self.previews.append(jpeg)


def engine_with(models_dir: Path, tmp: Path, **decoders: str) -> DiffusersEngine:
    registry = ModelRegistry(models_dir, tmp / "hashes.json")
    accel = Acceleration.from_settings(GpuSettings(preview_decoders=decoders), "cpu")
    return DiffusersEngine(registry, device="cpu", batch_invariant=False, acceleration=accel)


def previews_of(engine: DiffusersEngine) -> list[Image.Image]:
    watcher = Watcher()
    request = GenerationRequest(prompt="a red cat", width=64, height=64, steps=3, seed=5, model="tiny-diffusers")
    engine.generate(request, None, watcher)
    images = [Image.open(io.BytesIO(jpeg)) for jpeg in watcher.previews]
    assert len(images) == 3 and {image.format for image in images} == {"JPEG"}
    return images


def test_previews_decode_through_the_tiny_autoencoder(models_dir, tmp_path, decoders, monkeypatch) -> None:
    calls: list[tuple[int, ...]] = []
    real = AutoencoderTiny.decode

    def decode(self, latents, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(tuple(latents.shape))
        return real(self, latents, *args, **kwargs)

    monkeypatch.setattr(AutoencoderTiny, "decode", decode)
    approximated = engine_with(models_dir, tmp_path)
    tiny = engine_with(models_dir, tmp_path, sd1=str(decoders.folder))
    try:
        assert {image.size for image in previews_of(approximated)} == {(8, 8)} and not calls  # a latent per pixel
        assert {image.size for image in previews_of(tiny)} == {(64, 64)}  # decoded to the image's size
        assert calls == [(1, 4, 8, 8)] * 3  # the first image of the pass, at each step
    finally:
        approximated.close()
        tiny.close()


def test_a_decoder_that_fails_at_run_time_falls_back_to_the_approximation(models_dir, tmp_path, caplog) -> None:
    """Weights for other latents pass the start-up check (it reads no tensors), fail at the first decode, are logged
    once, and the job still gets its previews and its image."""
    tiny_autoencoder(latent_channels=16, **SMALL).save_pretrained(tmp_path / "taesd3")
    engine = engine_with(models_dir, tmp_path, sd1=str(tmp_path / "taesd3"))
    try:
        assert {image.size for image in previews_of(engine)} == {(8, 8)}
    finally:
        engine.close()
    failures = [r for r in caplog.records if r.levelname == "ERROR" and "preview decoder" in r.getMessage()]
    assert len(failures) == 1


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda tmp: tmp / "missing.safetensors", "no such file or folder"),
        (lambda tmp: write(tmp / "taesd.ckpt", b"\x80\x04pickle"), "must be .safetensors"),
        (lambda tmp: write(tmp / "junk.safetensors", b"not a safetensors file"), "not a readable safetensors"),
        (lambda tmp: _other_weights(tmp), "no tiny-autoencoder decoder weights"),
        (lambda tmp: _other_folder(tmp), "not an AutoencoderTiny"),
    ],
)
def test_a_missing_or_wrong_decoder_is_refused_naming_the_setting(tmp_path, make, says) -> None:
    path = make(tmp_path)
    settings = Settings(data_dir=tmp_path / "data", models_dir=tmp_path, gpu={"preview_decoders": {"sd1": path.name}})
    with pytest.raises(ValueError, match=f"gpu.preview_decoders.sd1: .*{says}"):
        check_preview_decoders(settings)


def _other_weights(tmp: Path) -> Path:
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, str(tmp / "sd15.safetensors"))
    return tmp / "sd15.safetensors"


def _other_folder(tmp: Path) -> Path:
    (tmp / "vae").mkdir()
    (tmp / "vae" / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    return tmp / "vae"


def test_settings_name_only_known_architectures() -> None:
    with pytest.raises(ValueError, match="unknown architecture 'flux'"):
        GpuSettings(preview_decoders={"flux": "taef1"})


def test_a_worker_with_a_missing_decoder_refuses_to_start(tmp_path) -> None:
    """Before it touches the database or a model, with the setting's name."""
    env = {**os.environ, "DARKROOM_DATA_DIR": str(tmp_path / "data"), "DARKROOM_DEVICE": "cpu"}
    env["DARKROOM_GPU__PREVIEW_DECODERS"] = '{"sd1": "preview/taesd"}'
    done = subprocess.run(
        [sys.executable, "-m", "darkroom.cli", "worker"], env=env, capture_output=True, text=True, timeout=120
    )
    said = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 2, said
    assert "gpu.preview_decoders.sd1" in said and "no such file or folder" in said
    assert not (tmp_path / "data" / "darkroom.db").exists()
