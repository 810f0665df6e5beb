"""Uploaded images: size limit, format allow-list and a decompression-bomb guard before any pixel is decoded."""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import re
from collections.abc import Iterator

from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from darkroom.config import Limits
from darkroom.errors import InvalidRequest, PayloadTooLarge

ALLOWED_FORMATS = {"PNG", "JPEG", "MPO", "WEBP"}  # MPO: how Pillow names the JPEGs many cameras and phones write
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
    rgb = open_image(data, limits, field).convert("RGB")
    if size and rgb.size != size:
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    return png_bytes(rgb)


def image_size(data: bytes, limits: Limits, field: str) -> tuple[int, int]:
    """An upload's width and height from its header alone, after the byte, format and pixel-count checks: what a
    caller needs to check the request's own limits before any pixel is decoded."""
    with _opened(data, limits, field) as img:
        return img.size


def open_image(data: bytes, limits: Limits, field: str) -> Image.Image:
    """Decode an upload after the checks (size, format allow-list, pixel count) that must come before decoding."""
    with _opened(data, limits, field) as img:
        try:
            img.load()
        except (OSError, SyntaxError, ValueError, EOFError):
            raise InvalidRequest(f"{field} is not a readable image", field=field) from None
        return img.copy()


@contextlib.contextmanager
def _opened(data: bytes, limits: Limits, field: str) -> Iterator[Image.Image]:
    """The image with only its header read (Pillow opens lazily), every check that needs no pixels passed."""
    if len(data) > limits.max_upload_bytes:
        raise PayloadTooLarge(f"{field} is larger than {limits.max_upload_bytes} bytes", field=field)
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # Pillow's guard, for headers far past ours
        raise InvalidRequest(
            f"{field} claims more than {limits.max_upload_pixels} pixels (a decompression bomb?)", field=field
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        raise InvalidRequest(f"{field} is not a readable image", field=field) from None
    with img:
        if img.format not in ALLOWED_FORMATS:
            raise InvalidRequest(f"{field}: format {img.format} is not one of {sorted(ALLOWED_FORMATS)}", field=field)
        if img.width < 1 or img.height < 1 or img.width * img.height > limits.max_upload_pixels:
            raise InvalidRequest(
                f"{field} is {img.width}x{img.height}; at most {limits.max_upload_pixels} pixels are accepted",
                field=field,
            )
        yield img


def load_mask(
    data: bytes,
    limits: Limits,
    field: str,
    size: tuple[int, int],
    *,
    transparent_repaints: bool = False,
    invert: bool = False,
    blur: int = 0,
) -> bytes:
    """An inpainting mask as a grey PNG at `size`: white repaints, black keeps.

    A mask with transparency speaks through its alpha channel, and the two APIs read it oppositely: OpenAI repaints
    where the mask is transparent (`transparent_repaints=True`), A1111 where it is painted (opaque). A mask without
    transparency is read by brightness. An all-black mask would repaint nothing, which is always a client mistake."""
    mask = _mask_channel(open_image(data, limits, field), transparent_repaints)
    if mask.size != size:
        mask = mask.resize(size, Image.Resampling.NEAREST)
    if invert:
        mask = ImageOps.invert(mask)
    if blur > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    if mask.getextrema()[1] == 0:
        raise InvalidRequest(f"{field} is black everywhere: nothing to repaint", field=field)
    return png_bytes(mask)


def _mask_channel(img: Image.Image, transparent_repaints: bool) -> Image.Image:
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        alpha = img.convert("RGBA").getchannel("A")
        if alpha.getextrema() != (255, 255):
            return ImageOps.invert(alpha) if transparent_repaints else alpha
    return img.convert("L")


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
