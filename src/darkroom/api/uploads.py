"""Uploaded images: size limit, format allow-list and a decompression-bomb guard before any pixel is decoded."""

from __future__ import annotations

import base64
import binascii
import io
import re

from PIL import Image, UnidentifiedImageError

from darkroom.config import Limits
from darkroom.errors import InvalidRequest, PayloadTooLarge

ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP"}
_DATA_URL = re.compile(r"^data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)


def decode_base64_image(value: str, limits: Limits, field: str) -> bytes:
    value = _DATA_URL.sub("", value.strip(), count=1)
    if len(value) * 3 // 4 > limits.max_upload_bytes:
        raise PayloadTooLarge(f"{field} is larger than {limits.max_upload_bytes} bytes", field=field)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{field} is not valid base64", field=field) from None


def load_image(data: bytes, limits: Limits, field: str, size: tuple[int, int] | None = None) -> bytes:
    """Check and normalise an uploaded image; returns PNG bytes (resized to `size` when given)."""
    if len(data) > limits.max_upload_bytes:
        raise PayloadTooLarge(f"{field} is larger than {limits.max_upload_bytes} bytes", field=field)
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            if img.format not in ALLOWED_FORMATS:
                raise InvalidRequest(
                    f"{field}: format {img.format} is not one of {sorted(ALLOWED_FORMATS)}", field=field
                )
            if img.width * img.height > limits.max_upload_pixels:
                raise InvalidRequest(
                    f"{field} is {img.width}x{img.height}; at most {limits.max_upload_pixels} pixels are accepted",
                    field=field,
                )
            img.load()
            rgb = img.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError):
        raise InvalidRequest(f"{field} is not a readable image", field=field) from None
    if size and rgb.size != size:
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    rgb.save(out, format="PNG")
    return out.getvalue()
