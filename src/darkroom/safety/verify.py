"""`darkroom verify IMAGE`: is this a darkroom image, and what does it say about itself?

Three independent witnesses, because each survives different handling: the invisible watermark lives in the pixels
(it outlives metadata stripping and moderate JPEG), the provenance chunk says how the image was made (gone once
re-encoded), and a C2PA manifest signs that claim (any pixel edit breaks it). The watermark alone sets the exit code.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from typing import Any

from PIL import Image, UnidentifiedImageError

from darkroom.extras import require
from darkroom.safety import c2pa_manifest
from darkroom.safety.provenance import pixel_digest, read_png


class UnreadableImage(ValueError):
    """The bytes are not an image Pillow can decode."""


_UNREADABLE = (
    OSError,
    SyntaxError,
    ValueError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)


def verify(data: bytes, *, trust_anchors: bytes | None = None) -> dict[str, Any]:
    """The full report for one file; raises UnreadableImage for anything that isn't a decodable image."""
    require("verify", ("numpy", "scipy"), "darkroom verify")  # the watermark detector's stack
    from darkroom.safety import watermark

    image, image_format = _open(data)
    provenance = _provenance(data) if image_format == "PNG" else None
    detection = watermark.detect(image)
    recorded = (provenance or {}).get("watermark") or {}
    matches = detection.payload == recorded["payload"] if recorded.get("applied") else None
    return {
        "file": {
            "format": image_format,
            "width": image.width,
            "height": image.height,
            "sha256": hashlib.sha256(data).hexdigest(),
        },
        "watermark": {**detection.to_dict(), "matches_provenance": matches},
        "provenance": _provenance_report(provenance, image),
        "c2pa": _c2pa_report(data, image_format, trust_anchors, provenance),
    }


def render(report: dict[str, Any]) -> str:
    """The report as a few lines for a terminal."""
    return "\n".join([_watermark_line(report["watermark"]), _provenance_line(report["provenance"]), _c2pa_line(report)])


def _open(data: bytes) -> tuple[Image.Image, str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # as an error: too big to check
            image = Image.open(io.BytesIO(data))
            image.load()
    except UnidentifiedImageError:
        raise UnreadableImage("not an image format Pillow can read") from None
    except _UNREADABLE as exc:
        raise UnreadableImage(f"damaged or oversized image: {exc}") from None
    return image, image.format or "unknown"


def _provenance(data: bytes) -> dict[str, Any] | None:
    """The darkroom chunk, or None when it's missing or not JSON (a damaged chunk is no provenance)."""
    try:
        return read_png(data)["provenance"]
    except (ValueError, OSError):
        return None


def _provenance_report(provenance: dict[str, Any] | None, image: Image.Image) -> dict[str, Any]:
    if provenance is None:
        return {"present": False}
    recorded_digest = provenance.get("pixels_sha256")
    model = provenance.get("model") or {}
    return {
        "present": True,
        "job_id": provenance.get("job_id"),
        "request_id": provenance.get("request_id"),
        "image_index": provenance.get("image_index"),
        "seed": provenance.get("seed"),
        "model": {"id": model.get("id"), "sha256": model.get("sha256")},
        "engine": provenance.get("engine"),
        "darkroom_version": (provenance.get("versions") or {}).get("darkroom"),
        "watermark": provenance.get("watermark"),
        "pixels_match": pixel_digest(image) == recorded_digest if recorded_digest else None,
    }


def _c2pa_report(
    data: bytes, image_format: str, trust_anchors: bytes | None, provenance: dict[str, Any] | None
) -> dict[str, Any]:
    if not c2pa_manifest.available():
        return {"available": False, "present": None}
    manifest = c2pa_manifest.read_manifest(data, image_format, trust_anchors)
    if manifest is None:
        return {"available": True, "present": False}
    generation = manifest.pop("generation", None)
    same = _same(generation, provenance) if generation is not None and provenance else None
    return {"available": True, "present": True, **manifest, "matches_provenance": same}


def _same(signed: Any, stored: Any) -> bool:
    """Equal values, where floats may differ in their last bit: the C2PA library re-prints a full-precision float
    (a timing, say) one ULP off now and then, and that is not a change to the provenance."""
    if isinstance(signed, dict) and isinstance(stored, dict):
        return signed.keys() == stored.keys() and all(_same(signed[k], stored[k]) for k in signed)
    if isinstance(signed, list) and isinstance(stored, list):
        return len(signed) == len(stored) and all(_same(a, b) for a, b in zip(signed, stored, strict=True))
    if isinstance(signed, float) and isinstance(stored, float):
        return math.isclose(signed, stored, rel_tol=1e-15, abs_tol=0.0)
    return type(signed) is type(stored) and signed == stored


def _watermark_line(mark: dict[str, Any]) -> str:
    if mark["present"]:
        match = {True: ", matches provenance", False: ", DIFFERS from provenance", None: ""}[mark["matches_provenance"]]
        accuracy = f"bit accuracy {mark['bit_accuracy']:.2f}"
        return f"watermark:  present ({mark['method']}, {accuracy}, payload {mark['payload']}{match})"
    if mark["reason"]:
        return f"watermark:  not found ({mark['reason']})"
    return f"watermark:  not found (marker bit accuracy {mark['bit_accuracy']:.2f}; 0.5 is chance)"


def _provenance_line(prov: dict[str, Any]) -> str:
    if not prov["present"]:
        return "provenance: none in this file"
    model = prov["model"]
    pixels = {True: "pixels unchanged", False: "pixels EDITED since darkroom wrote them", None: "no pixel digest"}
    recorded = prov["watermark"] or {}
    skipped = f"; watermark not applied: {recorded.get('reason')}" if recorded.get("applied") is False else ""
    return (
        f"provenance: job {prov['job_id']} image {prov['image_index']}, seed {prov['seed']}, "
        f"model {model['id']} (sha256 {(model['sha256'] or '')[:12]}); {pixels[prov['pixels_match']]}{skipped}"
    )


def _c2pa_line(report: dict[str, Any]) -> str:
    c2pa = report["c2pa"]
    if not c2pa["available"]:
        return "c2pa:       not checked (install darkroom[c2pa])"
    if not c2pa["present"]:
        return "c2pa:       no manifest"
    failures = f"; failures: {', '.join(c2pa['failures'])}" if c2pa["failures"] else ""
    signer = f"from {c2pa['generator']}, signed by {c2pa['signer']}"
    return f"c2pa:       {c2pa['validation_state']} manifest {signer}{failures}"
