"""Provenance written into every PNG, and read back.

Two text chunks: `parameters`, the AUTOMATIC1111 text that tools like A1111's "PNG Info" and civitai read, and
`darkroom`, JSON with everything needed to reproduce or audit the image.
"""

from __future__ import annotations

import io
import json
from typing import Any

from PIL import Image, PngImagePlugin

PROVENANCE_KEY = "darkroom"
PARAMETERS_KEY = "parameters"


def a1111_parameters(prov: dict[str, Any]) -> str:
    req = prov["request"]
    lines = [req["prompt"]]
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
    fields.append(("Version", f"darkroom {prov['versions'].get('darkroom', '')}"))
    lines.append(", ".join(f"{k}: {v}" for k, v in fields))
    return "\n".join(lines)


def encode_png(image: Image.Image, provenance: dict[str, Any]) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, a1111_parameters(provenance))
    info.add_itxt(PROVENANCE_KEY, json.dumps(provenance, sort_keys=True), zip=True)
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info, compress_level=6)
    return out.getvalue()


def read_png(data: bytes) -> dict[str, Any]:
    """{'parameters': str | None, 'provenance': dict | None} from PNG bytes."""
    with Image.open(io.BytesIO(data)) as img:
        text = dict(getattr(img, "text", {}) or {})
    raw = text.get(PROVENANCE_KEY)
    return {"parameters": text.get(PARAMETERS_KEY), "provenance": json.loads(raw) if raw else None}
