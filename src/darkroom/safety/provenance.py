"""Provenance written into every PNG, and read back.

Two text chunks: `parameters`, the AUTOMATIC1111 text that tools like A1111's "PNG Info" and civitai read, and
`darkroom`, JSON with everything needed to reproduce or audit the image. The JSON also says whether (and which)
invisible watermark is in the pixels, and a digest of those pixels, so `darkroom verify` can tell an edited image from
the one darkroom wrote. Optionally a signed C2PA manifest follows (c2pa_manifest.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from darkroom.safety import c2pa_manifest

log = logging.getLogger(__name__)

PROVENANCE_KEY = "darkroom"
PARAMETERS_KEY = "parameters"


def a1111_parameters(prov: dict[str, Any]) -> str:
    from darkroom.engines import controlnet, hires, refiner, upscalers  # torch-free; kept out of safety/'s imports

    req = prov["request"]
    if req.get("upscale"):  # an upscale job: A1111's extras write only the postprocessing fields
        return upscalers.infotext(req, prov["versions"].get("darkroom", ""))
    lines = [prompt_with_tags(req["prompt"], req.get("loras") or [])]
    if req.get("negative_prompt"):
        lines.append(f"Negative prompt: {req['negative_prompt']}")
    fields = [
        ("Steps", req["steps"]),
        ("Sampler", req["sampler"]),
        ("CFG scale", f"{req['guidance_scale']:g}"),
        ("Seed", prov["seed"]),
        ("Size", f"{req['width']}x{req['height']}"),
        ("Model hash", prov["model"]["sha256"][:10]),
        ("Model", prov["model"]["id"]),
    ]
    if req.get("init_image"):
        fields.append(("Denoising strength", f"{req['strength']:g}"))
    fields += hires.infotext_fields(req)
    if req.get("loras"):
        fields.append(("Lora hashes", lora_hashes(req["loras"])))
    if req.get("embeddings"):
        fields.append(("TI hashes", lora_hashes(req["embeddings"])))
    fields += refiner.infotext_fields(req) + controlnet.infotext_fields(req)
    fields.append(("Version", f"darkroom {prov['versions'].get('darkroom', '')}"))
    lines.append(", ".join(f"{k}: {v}" for k, v in fields))
    return "\n".join(lines)


def prompt_with_tags(prompt: str, loras: list[dict[str, Any]]) -> str:
    """The prompt with the request's LoRAs as A1111 tags at its end, so the infotext pasted back into A1111 (or
    darkroom's A1111 API) asks for the same adapters: A1111 keeps the tags in the prompt it writes; darkroom strips
    them before the text encoder and puts them back here. `a cat <lora:x:1>` comes back exactly as it was sent."""
    if not loras:
        return prompt
    return prompt.rstrip() + "".join(f" <lora:{spec['name']}:{spec['weight']:g}>" for spec in loras)


def lora_hashes(loras: list[dict[str, Any]]) -> str:
    """A1111's `Lora hashes: "name: sha256[:12], …"` (the short hash civitai and A1111 look adapters up by); its
    `TI hashes` for embeddings read the same."""
    return '"' + ", ".join(f"{spec['name']}: {(spec.get('sha256') or '')[:12]}" for spec in loras) + '"'


def encode_png(
    image: Image.Image,
    provenance: dict[str, Any],
    *,
    watermark: bool = True,
    c2pa_dir: Path | None = None,
    compress_level: int = 6,
) -> bytes:
    """The PNG darkroom stores. The mark goes into the pixels first, so the recorded pixel digest (and the C2PA hash)
    describe exactly what is in the file; with `c2pa_dir` and c2pa-python installed, a signed manifest comes last.
    `compress_level`: zlib's (`storage.png_compress_level`), which changes the file's size, never its pixels."""
    image, record = _watermark(image, watermark)
    provenance = {**provenance, "watermark": record, "pixels_sha256": pixel_digest(image)}
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, a1111_parameters(provenance))
    info.add_itxt(PROVENANCE_KEY, json.dumps(provenance, sort_keys=True), zip=True)
    for key, value in comfyui_chunks(provenance["request"]).items():
        info.add_text(key, value)
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info, compress_level=compress_level)
    if c2pa_dir is None or not c2pa_manifest.available():
        return out.getvalue()
    return _sign(out.getvalue(), provenance, c2pa_dir)


def comfyui_chunks(request: dict[str, Any]) -> dict[str, str]:
    """A job compiled from a ComfyUI workflow carries it as ComfyUI's own PNGs do: the API-format graph in `prompt`
    and, when the client sent one, the UI graph in `workflow`, so dropping the image on ComfyUI loads the workflow."""
    spec = request.get("workflow")
    if not spec:
        return {}
    chunks = {"prompt": json.dumps(spec["prompt"])}
    ui = (spec.get("extra_data") or {}).get("extra_pnginfo", {})
    if isinstance(ui, dict) and ui.get("workflow") is not None:
        chunks["workflow"] = json.dumps(ui["workflow"])
    return chunks


def pixel_digest(image: Image.Image) -> str:
    """sha256 of mode, size and raw pixels: survives metadata stripping and lossless re-saves, not any edit."""
    return hashlib.sha256(f"{image.mode} {image.width}x{image.height}\n".encode() + image.tobytes()).hexdigest()


def _watermark(image: Image.Image, enabled: bool) -> tuple[Image.Image, dict[str, Any]]:
    if not enabled:
        return image, {"applied": False, "reason": "disabled (security.watermark)"}
    from darkroom.safety import watermark as marking  # numpy and scipy: the worker's extra, never the API's

    if reason := marking.too_small(image):
        return image, {"applied": False, "reason": reason}
    tag = marking.content_tag(image)
    record = {"applied": True, "method": marking.METHOD, "version": marking.VERSION, "payload": tag.hex()}
    return marking.embed(image, tag), record


def _sign(png: bytes, provenance: dict[str, Any], c2pa_dir: Path) -> bytes:
    """A manifest is an extra: a signing failure is logged and the image ships with its other provenance intact."""
    try:
        return c2pa_manifest.sign_png(png, provenance, c2pa_manifest.load_identity(c2pa_dir))
    except Exception:
        log.exception("C2PA signing with the identity in %s failed; image stored without a manifest", c2pa_dir)
        return png


def read_png(data: bytes) -> dict[str, Any]:
    """{'parameters': str | None, 'provenance': dict | None} from PNG bytes."""
    with Image.open(io.BytesIO(data)) as img:
        text = dict(getattr(img, "text", {}) or {})
    raw = text.get(PROVENANCE_KEY)
    return {"parameters": text.get(PARAMETERS_KEY), "provenance": json.loads(raw) if raw else None}
