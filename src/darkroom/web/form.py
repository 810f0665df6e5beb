"""The generate form ↔ `GenerationRequest`. Every native field has an input; a bad value becomes an
`InvalidRequest` naming the field, the same error the JSON API gives, shown beside the form."""

from __future__ import annotations

import base64
from typing import Any

from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile

from darkroom.errors import InvalidRequest
from darkroom.schemas import GenerationRequest

INTS = ("width", "height", "steps", "n", "seed", "mask_crop_padding")
FLOATS = ("guidance_scale", "strength")
TEXTS = ("prompt", "negative_prompt", "model", "sampler", "priority")
OPTIONAL = ("model", "seed", "mask_crop_padding")  # empty: absent
HIRES_FIELDS: dict[str, type] = {
    "scale": float,
    "upscaler": str,
    "second_pass_steps": int,
    "denoising_strength": float,
}
# What the form shows before anything is chosen: small and quick; the API's own defaults apply to absent fields.
DEFAULTS: dict[str, Any] = {
    "prompt": "",
    "negative_prompt": "",
    "width": 512,
    "height": 512,
    "steps": 20,
    "guidance_scale": 7.0,
    "sampler": "Euler a",
    "n": 1,
    "strength": 0.75,
    "priority": "normal",
    "preview": True,
    "loras": "",
    "tags": "",
    "hires_scale": 2.0,
    "hires_upscaler": "Latent",
    "hires_second_pass_steps": 0,
    "hires_denoising_strength": 0.7,
}


def _number(kind: type, name: str, raw: str) -> Any:
    try:
        return kind(raw)
    except ValueError:
        raise InvalidRequest(f"{name} must be a number (got {raw[:40]!r})", field=name) from None


def parse_loras(text: str) -> list[dict[str, Any]]:
    """`name` or `name:weight`, one per line or comma-separated (A1111's `<lora:name:weight>` without the brackets)."""
    loras = []
    for item in text.replace("\n", ",").split(","):
        item = item.strip().removeprefix("<lora:").removesuffix(">")
        if not item:
            continue
        name, _, weight = item.rpartition(":") if ":" in item else (item, "", "1")
        loras.append({"name": name.strip(), "weight": _number(float, "loras", weight.strip() or "1")})
    return loras


async def request_from_form(form: FormData) -> GenerationRequest:
    body: dict[str, Any] = {}
    body["prompt"] = str(form.get("prompt") or "")
    for name in TEXTS[1:]:  # empty: absent, so the API's default applies
        if value := str(form.get(name) or "").strip():
            body[name] = value
    for kinds, kind in ((INTS, int), (FLOATS, float)):
        for name in kinds:
            raw = str(form.get(name) or "").strip()
            if raw:
                body[name] = _number(kind, name, raw)
    body["preview"] = form.get("preview") is not None
    body["loras"] = parse_loras(str(form.get("loras") or ""))
    body["tags"] = [tag for tag in str(form.get("tags") or "").split(",") if tag.strip()]
    if form.get("hires") is not None:
        body["hires"] = {
            key: _number(kind, f"hires.{key}", raw) if kind is not str else raw
            for key, kind in HIRES_FIELDS.items()
            if (raw := str(form.get(f"hires_{key}") or "").strip())
        }
    upload = form.get("init_image")
    if isinstance(upload, UploadFile) and upload.filename:
        data = await upload.read()
        if data:
            body["init_image"] = base64.b64encode(data).decode()
            mask = str(form.get("mask_image") or "").strip()
            if mask:
                body["mask_image"] = mask
    try:
        return GenerationRequest(**body)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or None
        raise InvalidRequest(f"{field}: {first['msg']}", field=field) from None


def values_from_request(request: dict[str, Any]) -> dict[str, Any]:
    """A stored request as form values ("reuse these settings"); source images are not carried over."""
    values = dict(DEFAULTS)
    values.update({k: v for k, v in request.items() if k in DEFAULTS and v is not None})
    for k in OPTIONAL:
        values[k] = request.get(k) if request.get(k) is not None else ""
    values["loras"] = ", ".join(f"{lo['name']}:{lo.get('weight', 1)}" for lo in request.get("loras") or [])
    values["tags"] = ", ".join(request.get("tags") or [])
    hires = request.get("hires")
    values["hires"] = bool(hires)
    for key in HIRES_FIELDS:
        if hires and hires.get(key) is not None:
            values[f"hires_{key}"] = hires[key]
    return values


def values_from_form(form: FormData) -> dict[str, Any]:
    """What the user typed, to show again beside an error."""
    values = dict(DEFAULTS)
    values.update({k: v for k, v in form.items() if isinstance(v, str)})
    values["preview"] = form.get("preview") is not None
    values["hires"] = form.get("hires") is not None
    return values
