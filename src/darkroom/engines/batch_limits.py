"""How many images one tensor batch may hold, per model and size, from the device's free memory.

A batch too large runs out of memory and is halved (the engine retries it), which costs a failed pass; a batch too
small leaves the device idle. So the limit is derived before the pass: free device memory (on CUDA, what the driver
reports free plus what torch's allocator holds unused; elsewhere the machine's available RAM) times
`gpu.memory_headroom`, less what decoding one image needs (the VAE decodes a batch image by image), divided by what
one more image costs in the UNet. That cost is first estimated from the model's shapes (latent size, the UNet's and
the VAE's first-level width, the dtype's size; on the safe side), then replaced by the measured peak of the first
batch at that size (CUDA only: the allocator's peak over the pass, per image). Running out of memory all the same
halves the limit for the engine's life (`after_oom`), whatever the estimate says later.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import torch

from darkroom.observability import metrics

log = logging.getLogger(__name__)

LATENT_FACTOR = 8  # the VAE's spatial downscale (SD 1.x/2.x, SDXL)
UNET_COPIES = 64  # live activations of the UNet's first level per latent pixel and channel, a generous guess
VAE_COPIES = 8  # the same for the VAE decoder's full-resolution level
GUIDANCE_PASSES = 2  # classifier-free guidance runs the UNet on the conditional and the unconditional half

Key = tuple[str, int, int]  # (model id, width, height)


@dataclass(frozen=True)
class Footprint:
    """Bytes a pass needs beyond the weights: `per_image` grows with the batch, `fixed` does not."""

    per_image: int
    fixed: int
    measured: bool = False
    images: int = 0  # the batch size measured


def estimate(pipe: Any, width: int, height: int, dtype: torch.dtype) -> Footprint:
    """A guess from the model's shapes, before any pass at this size was measured."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    latent_pixels = (width // LATENT_FACTOR) * (height // LATENT_FACTOR)
    unet_width = _first_width(getattr(pipe, "unet", None), default=320)
    vae_width = _first_width(getattr(pipe, "vae", None), default=128)
    per_image = GUIDANCE_PASSES * latent_pixels * unet_width * itemsize * UNET_COPIES
    fixed = width * height * vae_width * itemsize * VAE_COPIES
    return Footprint(per_image=per_image, fixed=fixed)


def limit_for(footprint: Footprint, free_bytes: int, headroom: float) -> int:
    """Most images that fit in `free_bytes * headroom` (at least one: a single image is tried and fails alone)."""
    usable = int(free_bytes * headroom) - footprint.fixed
    return max(1, usable // max(1, footprint.per_image))


def free_bytes(device: str) -> int | None:
    """Memory a pass may use now, or None when the device does not say."""
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device)
        free, _ = torch.cuda.mem_get_info(index)
        return int(free + torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index))
    if device == "cpu":
        try:
            import psutil
        except ImportError:
            return None
        return int(psutil.virtual_memory().available)
    return None


class BatchLimits:
    """Per (model, width, height): the measured footprint, the limit learnt from running out of memory, and the
    limit in force. Thread-safe: the worker threads of a process share their engine."""

    def __init__(self, device: str, headroom: float) -> None:
        self.device = device
        self.headroom = headroom
        self._lock = threading.Lock()
        self._measured: dict[Key, Footprint] = {}
        self._oom: dict[Key, int] = {}
        self._current: dict[Key, int] = {}

    def limit(self, key: Key, pipe: Any | None, dtype: torch.dtype, free: int | None = None) -> int | None:
        """The most images one batch of `key` may hold now; None when nothing bounds it (no pipeline loaded yet to
        estimate from and no memory figure), so the batch runs whole and out of memory halves it."""
        with self._lock:
            oom = self._oom.get(key)
            footprint = self._measured.get(key)
        free = free if free is not None else free_bytes(self.device)
        derived: int | None = None
        if free is not None and (footprint is not None or pipe is not None):
            footprint = footprint or estimate(pipe, key[1], key[2], dtype)
            derived = limit_for(footprint, free, self.headroom)
        limits = [value for value in (oom, derived) if value is not None]
        result = min(limits) if limits else None
        if result is not None:
            self._set(key, result)
        return result

    def measured(self, key: Key, images: int, peak_extra_bytes: int) -> None:
        """The allocator's peak over a pass of `images` images, beyond what was allocated before it, all of it
        counted per image (on the safe side: part of it is the decoder's). The pass with the most images wins, as
        the one nearest the batches the limit is for; among equals, the larger cost."""
        if images < 1 or peak_extra_bytes <= 0:
            return
        footprint = Footprint(per_image=max(1, peak_extra_bytes // images), fixed=0, measured=True, images=images)
        with self._lock:
            old = self._measured.get(key)
            if old is None or (images, footprint.per_image) > (old.images, old.per_image):
                self._measured[key] = footprint

    def after_oom(self, key: Key, images: int) -> int:
        """Out of memory with `images` in one batch: at most half as many from now on."""
        half = max(1, images // 2)
        with self._lock:
            limit = self._oom[key] = min(half, self._oom.get(key, half))
        self._set(key, limit)
        return limit

    def _set(self, key: Key, limit: int) -> None:
        with self._lock:
            self._current[key] = limit
        metrics.batch_limit(self.device, *key, limit)

    def current(self) -> dict[Key, int]:
        """The limit last in force per model and size (also `darkroom_batch_limit_images`)."""
        with self._lock:
            return dict(self._current)

    def rows(self) -> list[dict[str, object]]:
        """`current` as the worker reports it with its heartbeat (the fleet view): model (`default` for requests
        that name none), width, height, images; and whether the limit was halved by running out of memory."""
        with self._lock:
            current, oom = dict(self._current), dict(self._oom)
        return [
            {"model": model or "default", "width": w, "height": h, "images": images, "oom": (model, w, h) in oom}
            for (model, w, h), images in sorted(current.items())
        ]


class PeakMeter:
    """The allocator's peak over one pass beyond what was allocated before it (CUDA; nothing elsewhere)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda") and torch.cuda.is_available()
        self.device = device
        self.before = 0
        self.extra = 0

    def __enter__(self) -> PeakMeter:
        if self.cuda:
            index = torch.device(self.device)
            torch.cuda.reset_peak_memory_stats(index)
            self.before = torch.cuda.memory_allocated(index)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda and exc[0] is None:
            self.extra = torch.cuda.max_memory_allocated(torch.device(self.device)) - self.before


def _first_width(module: Any, default: int) -> int:
    channels = getattr(getattr(module, "config", None), "block_out_channels", None)
    return int(channels[0]) if channels else default
