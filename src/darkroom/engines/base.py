"""The narrow interface between a worker and whatever runs the pipeline.

The worker hands over a validated `GenerationRequest` (seed already resolved) and a progress callback; the engine hands
back PIL images with their seeds and what it used. The callback may raise `JobCancelled` or `LeaseLost` to stop the
run at the next denoising step. Failures leave typed (`darkroom.errors`): `InvalidRequest` or a permanent `EngineError`
when the request is at fault, `FatalEngineError` when the device is, a retryable `EngineError` otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from darkroom.schemas import GenerationRequest, ModelInfo

if TYPE_CHECKING:
    from PIL import Image

ProgressFn = Callable[[int, int], None]
"""progress(step_done, total_steps); raises to interrupt."""


@dataclass
class EngineImage:
    image: Image.Image
    seed: int


@dataclass
class EngineResult:
    images: list[EngineImage]
    model: ModelInfo
    engine: str
    scheduler: str  # diffusers scheduler class actually used, e.g. "EulerAncestralDiscreteScheduler"
    device: str
    dtype: str
    timings: dict[str, float] = field(default_factory=dict)  # seconds: load, inference, total
    versions: dict[str, str] = field(default_factory=dict)  # darkroom, diffusers, torch, transformers


class Engine(Protocol):
    name: str

    def generate(
        self,
        request: GenerationRequest,
        init_image: Image.Image | None,
        progress: ProgressFn,
        mask_image: Image.Image | None = None,
    ) -> EngineResult:
        """`mask_image` (with `request.mask_image`): inpainting; white repaints, black keeps."""
        ...

    def close(self) -> None: ...


@dataclass
class BatchItem:
    """One job's part of a batch: its request (seed resolved), its progress callback and its source images."""

    request: GenerationRequest
    progress: ProgressFn
    init_image: Image.Image | None = None
    mask_image: Image.Image | None = None
    control_images: list[Image.Image] | None = None  # one per ControlNet unit of the request, in order


BatchOutcome = EngineResult | Exception
"""Per item: its result, or the exception that ended it (cancelled, timed out, bad input, a retryable failure)."""


class BatchingEngine(Engine, Protocol):
    """An engine that can run the images of several compatible jobs (one batch key) as one tensor batch.

    Optional: a worker whose engine lacks it runs a claimed batch job after job through `generate`."""

    def batchable(self, requests: list[GenerationRequest]) -> bool:
        """Whether these requests would run as one tensor batch. When not, the worker runs them one after another
        through `generate`, each job's post-processing overlapping the next one's denoising."""
        ...

    def generate_batch(self, items: list[BatchItem]) -> list[BatchOutcome]:
        """One outcome per item, in order. `FatalEngineError` (the device failed) is raised, not returned: it ends
        every job of the batch the same way."""
        ...


class CheckableEngine(Engine, Protocol):
    """An engine that can test its device. Optional: after a device failure (`FatalEngineError`) the worker calls
    `check()` on the rebuilt engine before it claims again, so a broken device touches no more jobs."""

    def check(self) -> None:
        """Raise `FatalEngineError` when the device cannot compute."""
        ...
