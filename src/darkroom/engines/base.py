"""The narrow interface between a worker and whatever runs the pipeline.

The worker hands over a validated `GenerationRequest` (seed already resolved) and a progress callback; the engine hands
back PIL images with their seeds and what it used. The callback may raise `JobCancelled` or `LeaseLost` to stop the
run at the next denoising step. Failures leave typed (`darkroom.errors`): `InvalidRequest` or a permanent `EngineError`
when the request is at fault, `FatalEngineError` when the device is, a retryable `EngineError` otherwise.

An engine says what it can run (`Capabilities`), what it holds and whether it is well (`held_models`, `health`), so the
worker, `GET /v1/engines` and later the routing rules ask the engine instead of probing for attributes: a remote
backend (another darkroom, engines/remote_darkroom.py) is one more implementation, not a special case.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from darkroom.schemas import GenerationRequest, ModelInfo

if TYPE_CHECKING:
    from PIL import Image

ProgressFn = Callable[[int, int], None]
"""progress(step_done, total_steps); raises to interrupt."""

ALL_MODES = frozenset({"txt2img", "img2img", "inpaint", "upscale"})


@dataclass(frozen=True)
class Capabilities:
    """What an engine can run. Empty `families` / `adapters` mean none are named (a remote that does not say);
    `None` sizes mean no limit of the engine's own beyond the service's `limits`. `external`: the work leaves this
    deployment's machines (another operator's server, a cloud API), which confidential work must never reach."""

    modes: frozenset[str] = ALL_MODES
    families: frozenset[str] = frozenset()
    adapters: frozenset[str] = frozenset()
    max_width: int | None = None
    max_height: int | None = None
    external: bool = False

    def as_dict(self) -> dict[str, object]:
        return {
            "modes": sorted(self.modes),
            "families": sorted(self.families),
            "adapters": sorted(self.adapters),
            "max_width": self.max_width,
            "max_height": self.max_height,
            "external": self.external,
        }


@dataclass(frozen=True)
class EngineHealth:
    """An engine's own view of whether it can take work now: the local device passes its self-check, a remote
    answers its health probe. `detail` says why not, for operators; `latency_ms`: how long a remote's probe took."""

    ok: bool
    detail: str = ""
    latency_ms: float | None = None

    def as_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "detail": self.detail, "latency_ms": self.latency_ms}


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
    remote: dict[str, str] | None = None  # a remote engine's host and job id, recorded in the provenance


class Engine(Protocol):
    name: str
    device: str  # where the pixels are computed: `cpu`, `cuda:0` … or a remote engine's base URL
    capabilities: Capabilities

    def generate(
        self,
        request: GenerationRequest,
        init_image: Image.Image | None,
        progress: ProgressFn,
        mask_image: Image.Image | None = None,
    ) -> EngineResult:
        """`mask_image` (with `request.mask_image`): inpainting; white repaints, black keeps."""
        ...

    def preload(self, model_id: str) -> None:
        """Make `model_id` ready before the first job asks for it (a remote engine has nothing to do)."""
        ...

    def held_models(self) -> list[str]:
        """Model ids ready to run without a load, for the scheduler's affinity and the worker's presence row."""
        ...

    def health(self) -> EngineHealth:
        """Whether the engine can take work now; cheap enough for an operator's listing."""
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
    prepared: Any = None  # the engine's `prepare` of the request, made ahead (engines/prepare.py); None: not made


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
