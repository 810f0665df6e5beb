"""`darkroom demo train` on a tiny configuration: deterministic, resumable, its output loads like an SD checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from darkroom.cli import app
from darkroom.demo.train import TrainConfig, Trainer
from darkroom.demo.world import POSITIONS

TINY = {"batch": 2, "vae_batch": 2, "unet_channels": (16, 32), "vae_channels": (8, 8, 8), "checkpoint_every": 1}


def weights(trainer: Trainer) -> list[object]:
    return [p.detach().clone() for p in (*trainer.unet_params, *trainer.vae.parameters())]


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path: Path) -> None:
    straight = Trainer(TrainConfig(steps=2, vae_steps=1, **TINY), tmp_path / "straight")  # type: ignore[arg-type]
    straight.run()
    first = Trainer(TrainConfig(steps=1, vae_steps=1, **TINY), tmp_path / "split")  # type: ignore[arg-type]
    first.run()
    resumed = Trainer(TrainConfig(steps=2, vae_steps=1, **TINY), tmp_path / "split")  # type: ignore[arg-type]
    assert resumed.load_checkpoint() and (resumed.vae_step, resumed.unet_step) == (1, 1)
    resumed.run()
    for a, b in zip(weights(straight), weights(resumed), strict=True):
        assert a.equal(b)  # type: ignore[attr-defined]
    assert not weights(first)[0].equal(weights(resumed)[0])  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The command itself, one step of each phase, then once more with --resume and one more UNet step."""
    root = tmp_path_factory.mktemp("demo-train")
    args = [
        "demo",
        "train",
        "--out",
        str(root / "out"),
        "--work",
        str(root / "work"),
        "--batch",
        "2",
        "--vae-batch",
        "2",
    ]
    runner = CliRunner()
    first = runner.invoke(app, [*args, "--steps", "1", "--vae-steps", "1"])
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, [*args, "--steps", "2", "--vae-steps", "1", "--resume"])
    assert again.exit_code == 0, again.output
    assert "resumed at VAE step 1, UNet step 1" in again.output
    return root / "out"


def test_the_command_writes_an_sd1_diffusers_folder_with_a_model_card(trained: Path) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    card = json.loads((trained / "darkroom.json").read_text())
    assert card["defaults"]["width"] == 64 and "only knows shapes" in card["description"]
    pipe = StableDiffusionPipeline.from_pretrained(trained, dtype=torch.float32, local_files_only=True)
    assert pipe.vae_scale_factor == 4 and pipe.unet.config.sample_size * 4 == 64
    image = pipe("a red circle on a blue background", num_inference_steps=2, output_type="pil").images[0]
    assert image.size == (64, 64)


def test_placed_shapes_join_the_batches_only_from_placed_from_on(tmp_path: Path) -> None:
    """Batches before `placed_from` are the ones earlier runs drew, so resuming past it continues those runs."""
    import random

    from darkroom.demo.world import Scene

    trainer = Trainer(TrainConfig(placed_from=3, placed_share=1.0, **TINY), tmp_path)  # type: ignore[arg-type]
    rng = random.Random("0:unet:2")
    assert trainer.batch("unet", 2, 8)[1] == [Scene.sample(rng).caption for _ in range(8)]
    late = trainer.batch("unet", 3, 8)[1]
    assert all(c.split()[0] in ("a", "an") and any(p[2] in c for p in POSITIONS.values()) for c in late)
    rng = random.Random("0:vae:3")
    assert trainer.batch("vae", 3, 8)[1] == [Scene.sample(rng).caption for _ in range(8)]
