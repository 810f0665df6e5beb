"""Invisible watermark: a DWT-DCT mark in the luma of every output, found again by `darkroom verify`.

Why our own code and not the `invisible-watermark` package (imwatermark 0.2.0, the one SDXL uses): measured here, its
`dwtDct` method lost the mark on plain gradients even through a lossless PNG round trip (38-66 % of marker bits right),
rebuilt the chroma plane with the horizontal and vertical wavelet details swapped (PSNR 15 dB on a detailed image),
was at chance after JPEG q=90, refuses images under 256x256 (tests and small requests make 64x64), and pulls in
opencv-python (the GUI build, which needs libGL, absent from our slim image) plus torch on import. The scheme below is
the same family in about a page of numpy/scipy, with none of those problems.

How: the luma plane's one-level Haar DWT approximation band (LL) is cut into 4x4 blocks (8x8 pixels each); four
low/mid-frequency DCT coefficients per block each carry one payload bit by dithered quantisation index modulation (QIM).
A fixed pseudo-random tile of 8x8 blocks (64x64 pixels) assigns every payload bit to exactly four slots per tile, so
each bit is spread over the whole image. Only luma changes: the same delta is added to R, G and B.

Payload: a fixed 32-bit darkroom marker, then a 32-bit tag (the caller's; darkroom uses a digest of the unmarked
pixels, so identical generations stay pixel-identical). `detect` calls the mark present when at least 90 % of the
marker bits decode right: an unmarked image decodes to coin flips, so the chance of that is about 1 in 800,000.

Limits: both sides must be at least 64 pixels (one tile). The mark survives lossless formats and JPEG down to about
q=75, but not resizing, cropping or rotation, which move the block grid. It is a disclosure mark, not a signature:
the key is public, so anyone can read, strip or forge it. The C2PA manifest (c2pa_manifest.py) is the signed claim.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from functools import cache
from typing import Any

import numpy as np
from PIL import Image
from scipy.fft import dct

METHOD = "dwt-dct-qim"
VERSION = 1
MARKER = bytes.fromhex("d4a7c5e1")
TAG_BYTES = 4
PAYLOAD_BITS = 8 * (len(MARKER) + TAG_BYTES)
THRESHOLD = 0.9
MIN_SIDE = 64

_BLOCK = 8  # pixels per side of one DCT block (4x4 LL coefficients)
_TILE = 8  # blocks per side of the repeating bit-assignment tile
_COEFFICIENTS = ((0, 1), (1, 0), (1, 1), (2, 2))
_STEP = 12.0  # QIM step in LL-DCT units: about 49 dB PSNR
_SEED = 0x6461726B  # "dark"
_LUMA = np.array([0.299, 0.587, 0.114])


@dataclass(frozen=True)
class Detection:
    """What `detect` found. `bit_accuracy` is the share of marker bits that decoded right (0.5 is chance)."""

    present: bool
    bit_accuracy: float | None
    payload: str | None = None
    reason: str | None = None
    method: str = METHOD

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def too_small(image: Image.Image) -> str | None:
    """Why `image` cannot carry the mark, or None when it can."""
    if min(image.size) < MIN_SIDE:
        return f"image {image.width}x{image.height} is smaller than {MIN_SIDE}x{MIN_SIDE}"
    return None


def content_tag(image: Image.Image) -> bytes:
    """A tag from the unmarked pixels: the same pixels always get the same mark, so seeded runs stay reproducible."""
    return hashlib.sha256(image.tobytes()).digest()[:TAG_BYTES]


def embed(image: Image.Image, tag: bytes) -> Image.Image:
    """`image` with the marker and `tag` embedded; RGBA keeps its alpha, other modes come back as RGB."""
    if len(tag) != TAG_BYTES:
        raise ValueError(f"tag must be {TAG_BYTES} bytes, got {len(tag)}")
    if reason := too_small(image):
        raise ValueError(reason)
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    current = _carriers(rgb @ _LUMA)
    nby, nbx = current.shape[:2]
    assign, dither = _layout(nby, nbx)
    bits = _bits(MARKER + tag)[assign]
    offset = dither + bits * (_STEP / 2)
    delta = np.round((current - offset) / _STEP) * _STEP + offset - current
    # Back to pixels: the LL band's change is each block's carrier deltas times their basis patterns; a Haar LL
    # coefficient spreads over its 2x2 pixels (halved), added to R, G and B alike (a view: no upsampled copy).
    ll = np.einsum("abk,kxy->axby", delta, _basis()).reshape(nby * 4, nbx * 4) / 2.0
    rgb[: nby * _BLOCK, : nbx * _BLOCK].reshape(nby * 4, 2, nbx * 4, 2, 3)[...] += ll[:, None, :, None, None]
    marked = Image.fromarray(np.clip(np.round(rgb), 0, 255).astype(np.uint8), "RGB")
    if image.mode == "RGBA":
        marked.putalpha(image.getchannel("A"))
    return marked


def detect(image: Image.Image) -> Detection:
    """Decode the payload and judge it by the marker bits; never raises for an image it can open."""
    if reason := too_small(image):
        return Detection(present=False, bit_accuracy=None, reason=reason)
    carriers = _carriers(np.asarray(image.convert("RGB"), dtype=np.float64) @ _LUMA)
    assign, dither = _layout(*carriers.shape[:2])
    # +1 on the bit-0 lattice, -1 on the bit-1 lattice, 0 half-way: soft votes, summed per bit.
    votes = np.cos(2 * np.pi * (carriers - dither) / _STEP)
    score = np.bincount(assign.ravel(), weights=votes.ravel(), minlength=PAYLOAD_BITS)
    decoded = (score < 0).astype(np.uint8)
    marker_bits = 8 * len(MARKER)
    accuracy = float((decoded[:marker_bits] == _bits(MARKER)).mean())
    present = accuracy >= THRESHOLD
    payload = np.packbits(decoded[marker_bits:]).tobytes().hex() if present else None
    return Detection(present=present, bit_accuracy=round(accuracy, 4), payload=payload)


def _bits(data: bytes) -> np.ndarray:
    return np.unpackbits(np.frombuffer(data, dtype=np.uint8))


def _carriers(luma: np.ndarray) -> np.ndarray:
    """(blocks down, blocks across, carriers): the four carrying DCT coefficients of each 4x4 block of the Haar LL
    band, ignoring ragged edges. Projected on their basis patterns directly: the mark needs 4 of the 16 coefficients,
    and a full block DCT and its inverse cost five times as much (229 → 38 ms for a 1024² image, same pixels)."""
    nby, nbx = luma.shape[0] // _BLOCK, luma.shape[1] // _BLOCK
    pixels = luma[: nby * _BLOCK, : nbx * _BLOCK]
    ll = pixels.reshape(nby * 4, 2, nbx * 4, 2).sum(axis=(1, 3)) / 2.0
    return np.einsum("axby,kxy->abk", ll.reshape(nby, 4, nbx, 4), _basis())


@cache
def _basis() -> np.ndarray:
    """(carriers, 4, 4): the orthonormal 2-D DCT-II basis pattern of each carrying coefficient (u, v)."""
    c = dct(np.eye(4), axis=0, norm="ortho")  # c[u, x]: the 1-D basis
    return np.stack([np.outer(c[u], c[v]) for u, v in _COEFFICIENTS])


def _layout(nby: int, nbx: int) -> tuple[np.ndarray, np.ndarray]:
    """Which payload bit each slot carries, and its dither, for an image of nby x nbx blocks."""
    assign, dither = _tile()
    reps = (-(-nby // _TILE), -(-nbx // _TILE), 1)
    return np.tile(assign, reps)[:nby, :nbx], np.tile(dither, reps)[:nby, :nbx]


@cache
def _tile() -> tuple[np.ndarray, np.ndarray]:
    """One 8x8-block tile: every payload bit gets exactly four of its 256 slots; fixed, so any decoder finds them."""
    rng = np.random.default_rng(_SEED)
    slots = _TILE * _TILE * len(_COEFFICIENTS)
    assign = (rng.permutation(slots) % PAYLOAD_BITS).reshape(_TILE, _TILE, len(_COEFFICIENTS))
    dither = rng.random(slots).reshape(_TILE, _TILE, len(_COEFFICIENTS)) * _STEP
    return assign, dither
