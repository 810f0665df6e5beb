"""The shipped demo model: where its weights live in the package and how a fresh models dir gets a copy.

A fresh data dir has no checkpoint. Instead of a random-weight model whose pictures are noise, darkroom copies in
this small trained model (`darkroom demo train` made it; `docs/demo-model.md`), so the first request a new user
sends, with a caption the model knows, comes back as the picture it asked for. The copy is written to a hidden
temporary folder and renamed into place, so a concurrent scan never sees half of it.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from darkroom.demo.world import COLOURS, POSITIONS, SHAPES, SIZE

log = logging.getLogger(__name__)

DEMO_MODEL_DIRNAME = "darkroom-demo"
WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULTS: dict[str, Any] = {"width": SIZE, "height": SIZE, "steps": 20, "sampler": "DPM++ 2M", "guidance_scale": 4.0}
EXAMPLE_PROMPT = "a yellow star in the top left corner on a black background"


def model_card() -> dict[str, Any]:
    """darkroom.json for the demo model: what it knows, its native size and sampling defaults."""
    return {
        "description": (
            f"darkroom's built-in demo model, trained from scratch on {SIZE}x{SIZE} pictures of flat coloured "
            "shapes. It only knows shapes: " + ", ".join(SHAPES) + "; colours: " + ", ".join(COLOURS) + "; "
            "sizes small and large; one to four shapes; positions: " + ", ".join(POSITIONS) + "; and a background "
            f'colour ("{EXAMPLE_PROMPT}"). Add real checkpoints with `darkroom models add PATH`.'
        ),
        "demo_model": True,
        "trained_on": "procedural pictures from darkroom.demo.world (Pillow), captions in plain English",
        "defaults": DEFAULTS,
    }


def shipped() -> bool:
    return (WEIGHTS_DIR / "model_index.json").is_file()


def ensure_demo_model(models_dir: Path) -> Path | None:
    """Copy the shipped demo model into an empty models dir; returns its path, or None if nothing was copied."""
    from darkroom.models.registry import ModelRegistry

    models_dir.mkdir(parents=True, exist_ok=True)
    target = models_dir / DEMO_MODEL_DIRNAME
    if target.exists() or ModelRegistry.has_models(models_dir) or not shipped():
        return None
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=models_dir))
    try:
        shutil.copytree(WEIGHTS_DIR, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        (tmp / "darkroom.json").write_text(json.dumps(model_card(), indent=2) + "\n")
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("no models in %s: installed the built-in demo model %s", models_dir, DEMO_MODEL_DIRNAME)
    return target


def ensure_default_model(models_dir: Path) -> tuple[Path | None, str]:
    """What an empty models dir gets: the demo model, or the random-weight smoke-test model where an install lacks
    the demo weights. Returns the new model's path (None if the folder needed nothing) and what it is, for the log."""
    if shipped():
        return ensure_demo_model(models_dir), "the built-in demo model (it paints flat coloured shapes)"
    from darkroom.models.smoke import ensure_smoke_model  # imports torch

    return ensure_smoke_model(models_dir), "the random-weight smoke-test model (its images are noise)"
