"""Live previews through a TAESD-style tiny autoencoder (`gpu.preview_decoders`), instead of the linear approximation.

The approximation (engines/preview.py) maps each latent pixel to one RGB pixel: a 64² smudge of a 512² image. A tiny
autoencoder (TAESD for SD 1.x/2.x, TAESDXL for SDXL; diffusers' `AutoencoderTiny`) decodes the latents to the full
size for about 1 % of the VAE's cost, so a preview shows the picture as it forms. The preview is sent at most
`PREVIEW_SIDE` pixels on its long side, a JPEG of a few kilobytes, as before.

Configured per architecture, as a path in the models folder (or an absolute one):
- a diffusers folder (`config.json` with `_class_name: AutoencoderTiny`, `diffusion_pytorch_model.safetensors`);
- one `.safetensors` file: diffusers' keys (`decoder.layers.…`, with or without the encoder's), or the original
  TAESD decoder's (`taesd_decoder.safetensors`, `taesdxl_decoder.safetensors`: `1.weight` …, whose layer 0 is the
  clamp diffusers folds into the decoder's forward), with `AutoencoderTiny`'s default configuration.

`check_preview_decoders` runs at start-up without torch (a worker process, or `serve` with workers, refuses to start
with the setting's name when a file is missing or is not a tiny autoencoder); `PreviewDecoders` loads each one on the
device at the first preview of its architecture. A decoder that still fails (weights that do not fit the
configuration, latents of another shape) is logged once and that architecture goes back to the approximation: a
preview never fails a job.
"""

from __future__ import annotations

import io
import json
import logging
import struct
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from darkroom.engines.preview import latents_to_jpeg

if TYPE_CHECKING:
    from darkroom.config import Settings

log = logging.getLogger(__name__)

PREVIEW_SIDE = 256  # the long side of a decoded preview, in pixels
ARCHES = ("sd1", "sd2", "sdxl")
WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
MAX_HEADER = 16 * 1024 * 1024

Render = Callable[[Any], bytes]


def resolve(name: str, models_dir: Path) -> Path:
    """A configured decoder's path: relative ones are in the models folder."""
    path = Path(name).expanduser()
    return path if path.is_absolute() else models_dir / path


def check_preview_decoders(settings: Settings) -> None:
    """Each configured decoder exists and is a tiny autoencoder; else a `ValueError` naming the setting."""
    for arch, name in settings.gpu.preview_decoders.items():
        path = resolve(name, settings.resolved_models_dir)
        problem = _problem(path)
        if problem is not None:
            raise ValueError(f"gpu.preview_decoders.{arch}: {path}: {problem}")


def _problem(path: Path) -> str | None:
    if path.is_dir():
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as exc:
            return f"not a diffusers AutoencoderTiny folder (config.json: {exc})"
        if config.get("_class_name") != "AutoencoderTiny":
            return f"config.json describes a {config.get('_class_name')!r}, not an AutoencoderTiny"
        weights = next((path / w for w in WEIGHTS if (path / w).is_file()), None)
        if weights is None:
            return f"no {WEIGHTS[0]} in the folder"
        return _weights_problem(weights)
    if not path.is_file():
        return "no such file or folder"
    if path.suffix.lower() != ".safetensors":
        return "a single-file preview decoder must be .safetensors"
    return _weights_problem(path)


def _weights_problem(path: Path) -> str | None:
    try:
        keys = _safetensors_keys(path)
    except (OSError, ValueError) as exc:
        return f"not a readable safetensors file ({exc})"
    if _layout(keys) is None:
        sample = ", ".join(sorted(keys)[:3]) or "none"
        return f"no tiny-autoencoder decoder weights (decoder.layers.* or TAESD's 1.weight …); keys: {sample}"
    return None


def _safetensors_keys(path: Path) -> set[str]:
    """Tensor names from a safetensors header (8 bytes of little-endian length, then JSON), without torch."""
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("shorter than a header")
        (length,) = struct.unpack("<Q", head)
        if not 2 <= length <= MAX_HEADER:
            raise ValueError(f"header length {length}")
        header = json.loads(f.read(length))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return {key for key in header if key != "__metadata__"}


def _layout(keys: set[str]) -> str | None:
    """`diffusers` (decoder.layers.*), `taesd` (the original decoder: numbered layers), or None."""
    if any(key.startswith("decoder.layers.") for key in keys):
        return "diffusers"
    if keys and all(key.split(".", 1)[0].isdigit() for key in keys):
        return "taesd"
    return None


class PreviewDecoders:
    """The engine's previews per architecture: through its tiny decoder when one is configured and loads, else the
    linear approximation. Thread-safe: worker threads sharing the engine preview from their own passes."""

    def __init__(self, paths: Mapping[str, Path], device: str, dtype: Any) -> None:
        self.paths = dict(paths)
        self.device = device
        self.dtype = dtype
        self._loaded: dict[str, Any] = {}  # arch → the AutoencoderTiny, or None after it failed
        self._lock = threading.Lock()

    def render_for(self, arch: str) -> Render:
        """latents (N, C, h, w) → JPEG bytes of the first image."""
        if arch not in self.paths:
            return lambda latents: latents_to_jpeg(latents, arch)

        def render(latents: Any) -> bytes:
            decoder = self._decoder(arch)
            if decoder is not None:
                try:
                    return _decode_jpeg(decoder, latents)
                except Exception as exc:
                    self._failed(arch, f"decoding failed: {type(exc).__name__}: {exc}")
            return latents_to_jpeg(latents, arch)

        return render

    def _decoder(self, arch: str) -> Any:
        with self._lock:
            if arch not in self._loaded:
                try:
                    self._loaded[arch] = load_tiny_decoder(self.paths[arch], self.device, self.dtype)
                    log.info("previews of %s models decode through %s", arch, self.paths[arch])
                except Exception as exc:
                    self._loaded[arch] = None
                    log.error(
                        "preview decoder %s for %s could not load (%s): previews approximate",
                        self.paths[arch],
                        arch,
                        exc,
                    )
            return self._loaded[arch]

    def _failed(self, arch: str, why: str) -> None:
        with self._lock:
            self._loaded[arch] = None
        log.error("preview decoder for %s: %s; previews of %s models approximate from now on", arch, why, arch)


def load_tiny_decoder(path: Path, device: str, dtype: Any) -> Any:
    """An `AutoencoderTiny` from a diffusers folder or a single safetensors file (either key layout), on `device`."""
    from diffusers import AutoencoderTiny
    from safetensors.torch import load_file

    from darkroom.models.offline import enforce_offline

    enforce_offline()
    model: Any
    if path.is_dir():
        variant = None if (path / WEIGHTS[0]).is_file() else "fp16"
        model = AutoencoderTiny.from_pretrained(path, local_files_only=True, use_safetensors=True, variant=variant)
    else:
        state = load_file(str(path))
        if _layout(set(state)) == "taesd":  # the original decoder: layer k is diffusers' decoder layer k - 1
            state = {_taesd_key(key): value for key, value in state.items()}
        model = AutoencoderTiny()
        decoder = {key.removeprefix("decoder."): v for key, v in state.items() if key.startswith("decoder.")}
        model.decoder.load_state_dict(decoder, strict=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _taesd_key(key: str) -> str:
    index, rest = key.split(".", 1)
    return f"decoder.layers.{int(index) - 1}.{rest}"


def _decode_jpeg(decoder: Any, latents: Any, quality: int = 70) -> bytes:
    import torch
    from PIL import Image

    first = latents[:1].detach().to(device=decoder.device, dtype=decoder.dtype)
    with torch.inference_mode():
        sample = decoder.decode(first).sample[0]
    pixels = ((sample.float() + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    image = Image.fromarray(pixels, "RGB")
    image.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()
