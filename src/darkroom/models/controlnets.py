"""ControlNet models in `models/controlnet/`, as the registry lists them: name, family, sha256. No torch here.

Two layouts, as users bring them:
- a diffusers folder (`NAME/config.json` naming `ControlNetModel`, and its `.safetensors` weights);
- a single file `NAME.safetensors`, in the original layout (`control_model.input_hint_block.*`, `zero_convs`) or in
  diffusers' keys (`controlnet_cond_embedding.*`, how most SDXL ControlNets ship). Pickled `.pth` files are never
  listed: loading one can run code.

The family (sd1 | sd2 | sdxl) comes from the config, or from the file's tensor names and shapes: SDXL ControlNets
carry the size-conditioning embedding (`add_embedding` / `label_emb`), SD 2 ones a 1024-wide cross-attention. A request
that pairs a ControlNet with a model of another family is refused at submit with that reason.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

CONTROLNET_DIR = "controlnet"
CONFIG_FILE = "config.json"
HINT_MARKERS = ("controlnet_cond_embedding.", "input_hint_block.")  # the conditioning image's encoder
SDXL_MARKERS = ("add_embedding.", "label_emb.")  # SDXL's size/crop conditioning
CROSS_ATTENTION_KEYS = ("attn2.to_k.weight",)  # [inner, context]: context 1024 is SD 2's OpenCLIP-H


class ControlNetInfo(BaseModel):
    """A ControlNet file or folder as the registry lists it (the API reads this: no torch)."""

    name: str = Field(description="folder name or file name without .safetensors: what a unit's `model` names")
    format: Literal["diffusers", "single_file"]
    arch: str = Field(description="sd1 | sd2 | sdxl | unknown: the model family it steers")
    path: str = Field(description="absolute path (kept off the API: it shows `relpath`)")
    relpath: str
    sha256: str
    size_bytes: int

    def title(self) -> str:
        """A1111's ControlNet extension names models `name [hash8]` in model_list and infotexts."""
        return f"{self.name} [{self.sha256[:8]}]"


def candidates(root: Path) -> dict[str, tuple[Path, str]]:
    """name → (path, format) for every entry of the folder that looks like a ControlNet, nothing read but names and
    a config file. Of two entries with one name, the folder wins (sorted order, first kept)."""
    found: dict[str, tuple[Path, str]] = {}
    if not root.is_dir():
        return found
    for entry in sorted(p for p in root.iterdir() if not p.name.startswith(".")):
        if entry.is_dir() and _is_controlnet_folder(entry):
            found.setdefault(entry.name, (entry, "diffusers"))
        elif entry.is_file() and entry.suffix.lower() == ".safetensors":
            found.setdefault(entry.stem, (entry, "single_file"))
    return found


def folder_files(folder: Path) -> list[Path]:
    """The files that make a diffusers ControlNet's identity: its config and weights."""
    return sorted(f for f in folder.rglob("*") if f.is_file() and not f.name.startswith("."))


def folder_arch(folder: Path) -> str:
    config = _read_json(folder / CONFIG_FILE)
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    if config.get("cross_attention_dim") == 1024 or config.get("use_linear_projection"):
        return "sd2"
    return "sd1" if config else "unknown"


def single_file_arch(header: dict[str, Any]) -> str | None:
    """From a safetensors header: None when it holds no ControlNet (no conditioning-image encoder)."""
    keys = [k for k in header if k != "__metadata__"]
    if not any(marker in k for k in keys for marker in HINT_MARKERS):
        return None
    if any(marker in k for k in keys for marker in SDXL_MARKERS):
        return "sdxl"
    for key in keys:
        if key.endswith(CROSS_ATTENTION_KEYS):
            shape = header[key].get("shape") or []
            if len(shape) == 2 and shape[1] == 1024:
                return "sd2"
    return "sd1"


def compatible(controlnet_arch: str, model_arch: str) -> bool:
    """Whether a ControlNet of one family can steer a model of another (unknown on either side is let through: the
    engine then fails the job for good if the shapes do not fit)."""
    if "unknown" in (controlnet_arch, model_arch):
        return True
    return controlnet_arch == model_arch.removesuffix("-refiner")


def _is_controlnet_folder(folder: Path) -> bool:
    return str(_read_json(folder / CONFIG_FILE).get("_class_name", "")).startswith("ControlNet")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
