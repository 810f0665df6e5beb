"""The local engine: Stable Diffusion pipelines from diffusers, run in this process on CUDA, MPS or the CPU.

Loading (never from the network: `local_files_only=True` everywhere and `HF_HUB_OFFLINE=1`):
- a diffusers folder loads with its pipeline class (SD 1/2, SDXL; `AutoPipelineForText2Image` for anything else);
- a single-file checkpoint (`NAME.safetensors`, original LDM/sgm key layout) loads with `from_single_file`, which
  needs a diffusers *config* folder to know the architecture. darkroom uses, in order:
  1. a sidecar folder `NAME.config/` beside the checkpoint: a diffusers layout without weights (model_index.json,
     scheduler/, unet/config.json, vae/config.json, text_encoder/config.json, tokenizer/ ...);
  2. otherwise the configs bundled with darkroom for the detected architecture (`darkroom/models/configs/sd1|sd2|sdxl`:
     SD 1.5, SD 2.1 768-v, SDXL base 1.0). Those cannot carry CLIP's tokenizer vocabulary (it is not ours to ship and
     cannot be downloaded here), so the tokenizer comes from the sidecar's `tokenizer/` (and `tokenizer_2/` for SDXL)
     or from any diffusers-format model of the same architecture in the models dir. With neither, loading fails with
     `ModelLoadError` naming the folder to create.
  SD 2.x *base* (512px, epsilon) checkpoints look like SD 2.1 768-v from their keys; give them a sidecar config.

Running: the sampler is a fresh scheduler built from the model's own scheduler config for every pass, swapped in and
restored afterwards whatever happens. Every image gets its own generator seeded with its own seed (a CPU generator, so
a seed gives the same starting noise on any worker, GPU or not), and SDE samplers get one Brownian tree per image
seeded the same way. That makes the *noise* of an image independent of its batch, but not the arithmetic: kernels pick
different algorithms by batch size, and a convolution over 4 images rounds differently from one over 2 (measured: up
to 1/255 per pixel on CPU). So by default (`batch_invariant=True`) each image of a request is its own pass, and seeds
[s, s+1] give exactly the pixels of s and s+1 run alone; `batch_invariant=False` runs them as one batch, which is
faster on a GPU at the cost of that guarantee. Progress is reported from `callback_on_step_end`; when the callback
raises (JobCancelled, LeaseLost) the exception leaves the pipeline at that step and propagates. Any other failure is
classified (`engines/classify.py`): the request's fault is permanent, a device failure is fatal to the worker, the
rest is retried.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from darkroom import __version__
from darkroom.clock import random_seed
from darkroom.engines import prepare as preparing
from darkroom.engines.acceleration import (
    Acceleration,
    Compiled,
    HostImages,
    HostTransfer,
    pass_size,
    pin_execution_device,
)
from darkroom.engines.adapters import activate as activate_adapters
from darkroom.engines.adapters import resolve_embeddings
from darkroom.engines.base import (
    BatchItem,
    BatchOutcome,
    EngineHealth,
    EngineImage,
    EngineResult,
    ProgressFn,
)
from darkroom.engines.batch_limits import BatchLimits, PeakMeter
from darkroom.engines.catalog import DIFFUSERS_CAPABILITIES
from darkroom.engines.classify import classify
from darkroom.engines.controlnet import Control, ControlNets
from darkroom.engines.dtype_arg import dtype_kwargs
from darkroom.engines.hires import run_hires
from darkroom.engines.prepare import Prepared
from darkroom.engines.preview_decoder import PreviewDecoders, Render, resolve
from darkroom.engines.refiner import run_refined
from darkroom.engines.samplers import SamplerSpec, make_scheduler, resolve_sampler, seed_scheduler_noise
from darkroom.errors import DarkroomError, EngineOutOfMemory, FatalEngineError, InvalidRequest, ModelLoadError
from darkroom.models.offline import enforce_offline
from darkroom.models.registry import PICKLE_HINT, PICKLE_SUFFIXES, SIDECAR_CONFIG_SUFFIX, ModelRegistry
from darkroom.models.verify import check_pinned_version
from darkroom.observability import metrics
from darkroom.schemas import GenerationRequest, ModelInfo
from darkroom.worker.cache import LRUCache, release_memory

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

BUNDLED_CONFIGS = Path(__file__).resolve().parent.parent / "models" / "configs"
# One load at a time per process: diffusers builds models on the meta device by patching torch process-wide
# (accelerate's `init_empty_weights`), so two worker threads loading at once break each other's modules
# ("Cannot copy out of meta tensor").
_LOAD_LOCK = threading.Lock()
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
JOINT_MODES = frozenset({"txt2img", "img2img", "inpaint"})  # modes whose jobs can share one tensor batch
TOKENIZER_SOURCES = {
    "sd1": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd2": "stabilityai/stable-diffusion-2-1",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}


@dataclass
class LoadedModel:
    """One model's pipelines. The img2img and inpaint twins share every module with txt2img (`from_pipe`), so they
    cost no extra memory. Inpainting works with a regular 4-channel UNet: diffusers then blends the re-noised source
    back outside the mask at every step, as A1111 does for non-inpainting checkpoints."""

    info: ModelInfo
    txt2img: Any
    scheduler_config: Any
    load_s: float
    img2img: Any = None
    inpaint: Any = None
    compiled: Compiled | None = None  # torch.compile'd UNet and VAE decoder (`gpu.compile`), for the listed sizes

    def compiled_for(self, requests: list[GenerationRequest]) -> Compiled | None:
        """The compiled modules for a plain pass; LoRAs change the UNet's layers, which would only force recompiles
        (ControlNet passes are left out by the caller, which knows its units)."""
        return None if any(r.loras for r in requests) else self.compiled

    def pipeline(self, mode: str) -> Any:
        if mode == "txt2img":
            return self.txt2img
        if getattr(self, mode) is None:
            setattr(self, mode, self._twin(mode))
        return getattr(self, mode)

    def _twin(self, mode: str) -> Any:
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

        auto, field = {
            "img2img": (AutoPipelineForImage2Image, "init_image"),
            "inpaint": (AutoPipelineForInpainting, "mask_image"),
        }[mode]
        try:
            twin = auto.from_pipe(self.txt2img)
        except ValueError as exc:  # no twin of that kind for this pipeline class
            raise InvalidRequest(f"model {self.info.id} cannot do {mode}: {exc}", field=field) from exc
        twin.set_progress_bar_config(disable=True)
        return pin_execution_device(twin)


def resolve_device(device: str = "auto") -> str:
    if device != "auto":
        if device.split(":")[0] not in ("cpu", "cuda", "mps"):
            raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps")
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """Half precision where the hardware is built for it; CPUs are fastest and exact in float32."""
    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.float16
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: use auto, float32, float16 or bfloat16") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class DiffusersEngine:
    name = "diffusers"
    capabilities = DIFFUSERS_CAPABILITIES  # declared without torch, for API processes (engines/catalog.py)

    def __init__(
        self,
        registry: ModelRegistry,
        device: str = "auto",
        dtype: str = "auto",
        cache_size: int = 2,
        batch_invariant: bool = True,
        cache_bytes: int | None = None,
        allow_pickle: bool = False,
        acceleration: Acceleration | None = None,
    ) -> None:
        """`batch_invariant`: denoise the images of a request one at a time (see the module docstring).
        `allow_pickle`: load single-file pickled checkpoints (`security.allow_pickle_models`), checked here again
        whatever the registry lists, and then only with `torch.load(weights_only=True)` (diffusers' loader).
        `acceleration`: how pipelines run on the device (`settings.gpu`, engines/acceleration.py); default: the
        settings' defaults for this device."""
        enforce_offline()
        _quiet_progress_bars()
        self.registry = registry
        self.allow_pickle = allow_pickle
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.batch_invariant = batch_invariant
        if acceleration is None:
            from darkroom.config import GpuSettings

            acceleration = Acceleration.from_settings(GpuSettings(), self.device)
        self.acceleration = acceleration
        self._host = HostImages(pinned=acceleration.pinned_transfers)
        budget = cache_bytes if cache_bytes is not None else default_cache_budget(self.device)
        self._cache: LRUCache[tuple[str, str], LoadedModel] = LRUCache(
            cache_size, on_evict=self._on_evict, budget_bytes=budget
        )
        # A pipeline is not re-entrant. Re-entrant for one thread: free memory for a batch limit is read under it
        # (another worker's pass would look like memory in use), also from inside a pass's own hold.
        self._run_lock = threading.RLock()
        self._waiting = 0  # passes waiting for the run lock (`waiting`)
        self._waiting_lock = threading.Lock()
        # Held while text encoders run outside a prepared pass: `prepare` (ahead, outside the run lock) and every pass
        # that encodes its own prompts or loads adapters into the text encoders (inside it). A tokenizer is not safe
        # for two threads at once, and an adapter must never leak into another request's encoding.
        self._encode_lock = threading.RLock()
        self._prepare_stream: Any = None  # CUDA: the side stream `prepare` runs on
        # (model, width, height) → most images one tensor batch may hold: from free memory, and halved by an OOM
        self.batch_limits = BatchLimits(self.device, acceleration.memory_headroom)
        self.controlnets = ControlNets(registry, self.device, self.dtype, _LOAD_LOCK)
        decoders = {arch: resolve(name, registry.models_dir) for arch, name in acceleration.preview_decoders.items()}
        self.previews = PreviewDecoders(decoders, self.device, self.dtype)  # `gpu.preview_decoders`, else approximated

    # --- Engine protocol ---------------------------------------------------------------------------------------------

    def generate(
        self,
        request: GenerationRequest,
        init_image: Image.Image | None,
        progress: ProgressFn,
        mask_image: Image.Image | None = None,
        control_images: list[Image.Image] | None = None,
        prepared: Prepared | None = None,
    ) -> EngineResult:
        """`control_images`: each ControlNet unit's image, in the order of `request.controlnet`. `prepared`: what
        `prepare` made of this request ahead (ignored unless it was made for exactly this request)."""
        started = time.perf_counter()
        info = self._model_info(request)
        check_pinned_version(info, request)
        spec = resolve_sampler(request.sampler)
        if request.seed is None:  # the API resolves seeds when it creates the job; direct callers may not have
            request = request.model_copy(update={"seed": random_seed()})
        seeds = request.seeds()
        check_request(request, init_image, mask_image)
        sources = Sources.fit(request, init_image, mask_image)
        prepared = self._prepared(request, info, prepared)  # before the device: another thread's pass may hold it
        with self._device():
            loaded, load_s = self._pipelines(info)
            pipe = loaded.pipeline(request.mode)
            if prepared is None:  # the model was not loaded yet
                prepared = self._prepare_one(request, info, loaded, ahead=False)
            control = self.controlnets.prepare(request, control_images, info, pipe.unet)  # units: models and maps
            ran = time.perf_counter()
            with (
                self._encode_lock if prepared is None else contextlib.nullcontext(),  # the pipeline encodes itself
                activate_adapters(pipe, self.registry, [request], lock=_LOAD_LOCK),  # LoRAs/embeddings: this pass only
            ):
                if request.hires is not None:  # engines/hires.py: first pass, upscale, img2img second pass
                    images, scheduler_name = run_hires(self, loaded, spec, request, seeds, progress)
                elif request.refiner is not None:  # engines/refiner.py: the base's steps, then the refiner's
                    images, scheduler_name = run_refined(self, pipe, loaded, spec, request, seeds, progress)
                else:
                    images, scheduler_name = self._run(
                        pipe, loaded, spec, request, sources, seeds, progress, control, prepared
                    )
        done = time.perf_counter()
        return EngineResult(
            images=[EngineImage(image=img, seed=seed) for img, seed in zip(images, seeds, strict=True)],
            model=info,
            engine=self.name,
            scheduler=scheduler_name,
            device=self.device,
            dtype=dtype_name(self.dtype),
            timings={"load_s": load_s, "inference_s": done - ran, "total_s": done - started},
            versions=versions(),
        )

    def batchable(self, requests: list[GenerationRequest]) -> bool:
        """Several requests of one mode (and one strength), unless `batch_invariant` asks for every image alone.
        img2img and inpainting stack their jobs' source images (and masks). An inpainting job joins a batch only
        with one image and no crop: its pipeline encodes one source for all of a job's images, so the draws from
        each image's generator, and with them its noise, would differ from its solo run."""
        plain = all(  # hires and the refiner run image by image; ControlNet units with their own maps, job by job
            r.hires is None and r.refiner is None and not r.controlnet and r.mode in JOINT_MODES for r in requests
        )
        one_kind = len({(r.mode, r.strength if r.mode != "txt2img" else None) for r in requests}) == 1
        inpaint_alone = any(r.mode == "inpaint" and (r.n > 1 or r.mask_crop_padding is not None) for r in requests)
        return not self.batch_invariant and len(requests) > 1 and plain and one_kind and not inpaint_alone

    def generate_batch(self, items: list[BatchItem]) -> list[BatchOutcome]:
        """Compatible jobs (one batch key) as one tensor batch: every image of every job in one pipeline call.

        Each image keeps its own generator (and source image), so its pixels match its solo run within rounding
        (see the module docstring); `batch_invariant=True`, a lone job, or jobs `batchable` refuses run one after
        another.
        A job whose callback raises (cancelled, lease lost, timed out, draining) drops out of the outcome at that
        step while the others go on; the call stops early only when every job has stopped. A failure of the call
        itself that is not the device's is retried job by job, so one bad request cannot fail its batch partners."""
        if not self.batchable([item.request for item in items]):
            return [self._alone(item) for item in items]
        outcomes: list[BatchOutcome | None] = [None] * len(items)
        live: list[int] = []
        for index, item in enumerate(items):
            if item.request.seed is None:
                item.request = item.request.model_copy(update={"seed": random_seed()})
            try:
                check_request(item.request, item.init_image, item.mask_image)
                live.append(index)
            except DarkroomError as exc:
                outcomes[index] = exc
        for index, outcome in zip(live, self._together([items[i] for i in live]), strict=True):
            outcomes[index] = outcome
        return [outcome for outcome in outcomes if outcome is not None]

    def _together(self, items: list[BatchItem]) -> list[BatchOutcome]:
        """Run `items` in tensor batches of at most the image limit for their model and size (engines/batch_limits.py:
        from free device memory, and never above what ran out of memory before). Out of memory halves that limit
        (remembered for the engine's life) and re-runs the chunk in smaller batches."""
        first = items[0].request
        empty = [index for index, item in enumerate(items) if not item.request.negative_prompt]
        if 0 < len(empty) < len(items) and self._zeroes_empty_negatives(first):
            return self._in_groups(items, empty)
        key = (first.model or "", first.width, first.height)
        outcomes: list[BatchOutcome] = []
        for chunk in _chunks(items, self._batch_limit(first)):
            if len(chunk) == 1:
                outcomes.append(self._alone(chunk[0]))
                continue
            try:
                outcomes += self._generate_joint(chunk)
            except FatalEngineError:
                raise
            except EngineOutOfMemory:
                images = sum(item.request.n for item in chunk)
                limit = self.batch_limits.after_oom(key, images)
                release_memory()
                log.warning("out of memory with %d images in one batch: at most %d from now on", images, limit)
                outcomes += self._together(chunk)
            except DarkroomError as exc:  # not the device's fault, maybe one request's: isolate it
                log.info("a batch of %d jobs failed (%s); running them one by one", len(chunk), exc.code)
                outcomes += [self._alone(item) for item in chunk]
        return outcomes

    def _model_info(self, request: GenerationRequest) -> ModelInfo:
        """The model a request names, or the registry's default."""
        return self.registry.get(request.model) if request.model else self.registry.default()

    def _zeroes_empty_negatives(self, request: GenerationRequest) -> bool:
        """SDXL guides an image without a negative prompt with zeros, not with an encoded empty prompt; one call
        cannot do both, so such a batch runs as two (with and without negative prompts)."""
        try:
            info = self._model_info(request)
        except DarkroomError:
            return False
        return info.arch.startswith("sdxl")

    def _in_groups(self, items: list[BatchItem], first_group: list[int]) -> list[BatchOutcome]:
        """`items` as two batches, `first_group`'s indexes and the rest, with the outcomes back in the items' order."""
        rest = [index for index in range(len(items)) if index not in first_group]
        outcomes: dict[int, BatchOutcome] = {}
        for group in (first_group, rest):
            ran = (
                self._together([items[index] for index in group]) if len(group) > 1 else [self._alone(items[group[0]])]
            )
            outcomes.update(zip(group, ran, strict=True))
        return [outcomes[index] for index in range(len(items))]

    def _batch_limit(self, request: GenerationRequest) -> int | None:
        """The image limit for `request`'s model and size now; estimated from the model's shapes only once it is
        loaded (a first batch relies on the halving after an out-of-memory error)."""
        try:
            info = self._model_info(request)
        except DarkroomError:
            return None  # the joint run reports it, job by job
        with self._run_lock:  # no other pass in flight while free memory is read
            loaded = self._cache.get((info.id, info.sha256))
            pipe = loaded.txt2img if loaded is not None else None
            return self.batch_limits.limit((request.model or "", request.width, request.height), pipe, self.dtype)

    def _alone(self, item: BatchItem) -> BatchOutcome:
        extra: dict[str, Any] = {"mask_image": item.mask_image} if item.mask_image is not None else {}
        if item.control_images:
            extra["control_images"] = item.control_images
        try:
            return self.generate(item.request, item.init_image, item.progress, **extra)
        except FatalEngineError:
            raise
        except Exception as exc:
            return exc

    def _generate_joint(self, items: list[BatchItem]) -> list[BatchOutcome]:
        started = time.perf_counter()
        first = items[0].request
        info = self._model_info(first)
        for item in items:
            check_pinned_version(info, item.request)
        spec = resolve_sampler(first.sampler)
        seeds = [seed for item in items for seed in item.request.seeds()]
        sources = [Sources.fit(item.request, item.init_image, item.mask_image) for item in items]
        fan = _FanOut(items, total_steps(first), self.previews.render_for(info.arch))
        key = (first.model or "", first.width, first.height)
        kwargs = joint_kwargs(items, sources, seeds, fan)  # prepared while another worker's pass may hold the device
        prepared = [self._prepared(item.request, info, item.prepared) for item in items]
        with self._device():
            loaded, load_s = self._pipelines(info)
            pipe = loaded.pipeline(first.mode)
            made = zip(prepared, items, strict=True)
            prepared = [given or self._prepare_one(item.request, info, loaded, ahead=False) for given, item in made]
            ready = [p for p in prepared if p is not None]
            if len(ready) == len(items):  # every job's prompts encoded: the pipeline gets embeddings and noise
                kwargs = preparing.joint(ready, [item.request.seeds() for item in items], kwargs)
                for p in ready:
                    p.wait(self.device)
            ran = time.perf_counter()
            scheduler = make_scheduler(spec, loaded.scheduler_config)
            seed_scheduler_noise(scheduler, seeds)
            try:
                with (
                    self._encode_lock if len(ready) < len(items) else contextlib.nullcontext(),
                    activate_adapters(pipe, self.registry, [item.request for item in items], lock=_LOAD_LOCK),
                    PeakMeter(self.device) as peak,
                ):
                    compiled = loaded.compiled_for([i.request for i in items])
                    pending = self._call_tensors(pipe, scheduler, kwargs, compiled)
                self.batch_limits.measured(key, len(seeds), peak.extra)
            except DarkroomError:
                if not fan.all_stopped():
                    raise
                pending = None  # every job stopped: nothing to keep
            scheduler_name = type(scheduler).__name__
        # The device is free for the next batch (another worker's) while these images reach the host.
        images = self._host_images(pending) if pending is not None else []
        done = time.perf_counter()
        timings = {"load_s": load_s, "inference_s": done - ran, "total_s": done - started, "batch_images": len(seeds)}
        outcomes: list[BatchOutcome] = []
        offset = 0
        for index, item in enumerate(items):
            count = item.request.n
            stopped = fan.stopped.get(index)
            if stopped is not None:
                outcomes.append(stopped)
            else:
                pasted = sources[index].paste_back(images[offset : offset + count])
                mine = zip(pasted, item.request.seeds(), strict=True)
                outcomes.append(
                    EngineResult(
                        images=[EngineImage(image=img, seed=seed) for img, seed in mine],
                        model=info,
                        engine=self.name,
                        scheduler=scheduler_name,
                        device=self.device,
                        dtype=dtype_name(self.dtype),
                        timings=dict(timings),
                        versions=versions(),
                    )
                )
            offset += count
        return outcomes

    # --- preparing ahead (engines/prepare.py) ---------------------------------------------------------------------

    def prepare(self, requests: list[GenerationRequest]) -> list[Prepared | None]:
        """Encode the requests' prompts and draw their starting noise now, for passes that come later (`generate`
        and `generate_batch` take them back through `prepared` / `BatchItem.prepared`). Runs beside the pass that
        holds the device (on CUDA on a side stream). None for a request that cannot be prepared (adapters, hires,
        refiner, ControlNet, no seed), whose model is not loaded, or whose encoding failed: its pass encodes it."""
        outcome: list[Prepared | None] = []
        for request in requests:
            try:
                info = self._model_info(request)
            except DarkroomError:
                outcome.append(None)
                continue
            outcome.append(self._prepare_one(request, info, None, ahead=True))
        return outcome

    def waiting(self) -> int:
        """Passes waiting for the device now: a worker claims ahead only when none is (it would wait behind them)."""
        with self._waiting_lock:
            return self._waiting

    @contextlib.contextmanager
    def _device(self) -> Iterator[None]:
        """The run lock for one pass, counted while waited for (`waiting`)."""
        with self._waiting_lock:
            self._waiting += 1
        try:
            self._run_lock.acquire()
        finally:
            with self._waiting_lock:
                self._waiting -= 1
        try:
            yield
        finally:
            self._run_lock.release()

    def _prepared(self, request: GenerationRequest, info: ModelInfo, given: Prepared | None) -> Prepared | None:
        """`given` when it was made for this request, else a preparation made now, before the pass (None when the
        model is not loaded yet: the pass then prepares once it is)."""
        if given is not None and given.fits(request, (info.id, info.sha256)):
            return given
        return self._prepare_one(request, info, None, ahead=True)

    def _prepare_one(
        self, request: GenerationRequest, info: ModelInfo, loaded: LoadedModel | None, ahead: bool
    ) -> Prepared | None:
        if not self._preparable(request, info):
            return None
        loaded = loaded or self._cache.get((info.id, info.sha256))
        pipe = loaded.txt2img if loaded is not None else None
        if pipe is None or not hasattr(pipe, "encode_prompt"):
            return None
        stream = self._side_stream() if ahead else None
        try:
            with self._encode_lock:
                return preparing.encode(pipe, request, (info.id, info.sha256), self.device, stream)
        except Exception as exc:  # the pass encodes the prompts itself and reports what is wrong, if anything
            log.warning("could not prepare a %s pass ahead: %s: %s", request.mode, type(exc).__name__, exc)
            return None

    def _preparable(self, request: GenerationRequest, info: ModelInfo) -> bool:
        """A plain pass of a Stable Diffusion model whose text encoders no adapter changes."""
        plain = request.hires is None and request.refiner is None and not request.controlnet and not request.loras
        known = request.mode in JOINT_MODES and info.arch in ("sd1", "sd2", "sdxl")
        if not plain or not known or request.seed is None:
            return False
        try:
            return not resolve_embeddings(self.registry, [request])
        except DarkroomError:
            return False  # the pass reports it

    def _side_stream(self) -> Any:
        if not (self.device.startswith("cuda") and torch.cuda.is_available()):
            return None
        if self._prepare_stream is None:
            self._prepare_stream = torch.cuda.Stream(torch.device(self.device))
        return self._prepare_stream

    def close(self) -> None:
        self._cache.clear()
        self.controlnets.clear()

    def check(self) -> None:
        """A device self-test the worker runs before claiming again after a device failure: a little arithmetic on
        the device, synchronised, so a lost CUDA context or driver shows here and not in the next job."""
        try:
            probe = torch.arange(64, dtype=torch.float32, device=self.device)
            if float((probe * 2).sum().cpu()) != 4032.0:
                raise RuntimeError("the device computed a wrong sum")
            if self.device.startswith("cuda"):
                torch.cuda.synchronize(self.device)
        except Exception as exc:
            raise FatalEngineError(f"device self-check failed on {self.device}: {type(exc).__name__}: {exc}") from exc

    def loaded_models(self) -> list[tuple[str, str]]:
        """(model id, sha256) pairs held in memory, least recently used first: what the scheduler's affinity needs."""
        return self._cache.keys()

    def held_models(self) -> list[str]:
        return [model_id for model_id, _ in self.loaded_models()]

    def health(self) -> EngineHealth:
        """The device self-check (`check`), as a value: an operator's listing must not raise."""
        try:
            self.check()
        except FatalEngineError as exc:
            return EngineHealth(ok=False, detail=exc.message)
        return EngineHealth(ok=True, detail=self.device)

    # --- running -------------------------------------------------------------------------------------------------

    def _run(
        self,
        pipe: Any,
        loaded: LoadedModel,
        spec: SamplerSpec,
        request: GenerationRequest,
        sources: Sources,
        seeds: list[int],
        progress: ProgressFn,
        control: Control | None = None,
        prepared: Prepared | None = None,
    ) -> tuple[list[Image.Image], str]:
        """Every image of the request, in passes of one (batch_invariant) or all; `control`: its ControlNet units,
        run on the ControlNet twin of `pipe`; `prepared`: its prompts' embeddings and starting noise."""
        if control is not None:
            pipe = control.pipeline(pipe)
            prepared = None
        if prepared is not None:
            prepared.wait(self.device)
        # Progress counts image-steps, so it rises steadily however the images are grouped into passes.
        per_pass = total_steps(request)
        grand_total = per_pass * len(seeds)
        limit = 1 if self.batch_invariant else self._batch_limit(request) or len(seeds)
        pending = [seeds[start : start + limit] for start in range(0, len(seeds), limit)]
        images: list[Image.Image] = []
        scheduler_name = ""
        while pending:
            pass_seeds = pending.pop(0)
            offset = len(images) * per_pass
            callback = step_callback(
                progress,
                per_pass,
                offset=offset,
                grand_total=grand_total,
                weight=len(pass_seeds),
                preview=_preview_hook_for(progress, self.previews.render_for(loaded.info.arch)),
            )
            scheduler = make_scheduler(spec, loaded.scheduler_config)
            seed_scheduler_noise(scheduler, pass_seeds)
            scheduler_name = type(scheduler).__name__
            kwargs = pipeline_kwargs(request, sources, pass_seeds, callback)
            if prepared is not None:
                kwargs = prepared.apply(kwargs, pass_seeds, per_image=False)
            if control is not None:
                kwargs.update(control.call_kwargs(request.mode))
            try:
                with control.modes(pipe) if control is not None else contextlib.nullcontext():
                    compiled = loaded.compiled_for([request]) if control is None else None
                    images.extend(sources.paste_back(self._call(pipe, scheduler, kwargs, compiled)))
            except EngineOutOfMemory:
                if len(pass_seeds) == 1:
                    raise EngineOutOfMemory(
                        f"one {request.width}x{request.height} image does not fit in {self.device} memory; "
                        "ask for a smaller size",
                        field="width",
                        permanent=True,
                    ) from None
                release_memory()  # the failed attempt's activations, before the smaller retry
                half = len(pass_seeds) // 2
                log.warning(
                    "out of memory with %d images at once: splitting into %d + %d",
                    len(pass_seeds),
                    half,
                    len(pass_seeds) - half,
                )
                pending[:0] = [pass_seeds[:half], pass_seeds[half:]]
        return images, scheduler_name

    def _call(
        self, pipe: Any, scheduler: Any, kwargs: dict[str, Any], compiled: Compiled | None = None
    ) -> list[Image.Image]:
        """One pipeline call with a borrowed scheduler; whatever happens, the pipeline is left as it was found.
        PIL output is made here from the pipeline's tensors (one pinned copy to the host on CUDA, the same rounding);
        a crop-and-paste inpainting keeps the pipeline's own, which pastes PIL images. `compiled`: the model's
        compiled modules, used at the sizes they were compiled for (engines/acceleration.py)."""
        if kwargs.get("output_type") == "pil" and kwargs.get("padding_mask_crop") is None:
            return self._host_images(self._call_tensors(pipe, scheduler, kwargs, compiled))
        return list(self._run_pipe(pipe, scheduler, kwargs, compiled).images)

    def _call_tensors(
        self, pipe: Any, scheduler: Any, kwargs: dict[str, Any], compiled: Compiled | None = None
    ) -> HostTransfer:
        """A PIL-output call whose images stay tensors, already on their way to pinned host memory (CUDA, on a side
        stream): the caller turns them into PIL images once it has let go of the device."""
        output = self._run_pipe(pipe, scheduler, {**kwargs, "output_type": "pt"}, compiled)
        try:
            return self._host.start(output.images)
        except Exception as exc:  # a failing copy is the device's failure (engines/classify.py)
            raise classify(exc) from exc

    def _host_images(self, transfer: HostTransfer) -> list[Image.Image]:
        try:
            return transfer.to_pil()
        except Exception as exc:  # the copy's failure, met when waiting for it
            raise classify(exc) from exc

    def _run_pipe(self, pipe: Any, scheduler: Any, kwargs: dict[str, Any], compiled: Compiled | None) -> Any:
        """The pipeline call itself, its failures classified; the pipeline is left as it was found."""
        original = pipe.scheduler
        pipe.scheduler = scheduler
        try:
            with torch.inference_mode(), self.acceleration.pass_context(pipe, compiled, pass_size(kwargs)):
                return pipe(**kwargs)
        except DarkroomError:
            raise
        except torch.OutOfMemoryError as exc:
            n = kwargs.get("num_images_per_prompt", 1)
            raise EngineOutOfMemory(f"out of memory on {self.device} generating {n} image(s) at once") from exc
        except Exception as exc:  # the request's fault, the device's, or transient: see engines/classify.py
            raise classify(exc) from exc
        finally:
            pipe.scheduler = original
            pipe._interrupt = False

    # --- loading -----------------------------------------------------------------------------------------------------

    def _pipelines(self, info: ModelInfo) -> tuple[LoadedModel, float]:
        key = (info.id, info.sha256)
        hit = self._cache.get(key)
        if hit is not None:
            return hit, 0.0
        for old in self.loaded_models():
            if old[0] == info.id:  # the file changed on disk: the old version will not be asked for again
                self._cache.evict(old)
        self._cache.make_room(incoming_bytes=info.size_bytes)  # the files' size: a fair guess before loading
        loaded = self._load(info)
        metrics.model_loaded(info.id, loaded.load_s)
        self._cache.put(key, loaded, size_bytes=pipeline_bytes(loaded.txt2img))
        return loaded, loaded.load_s

    def preload(self, model_id: str) -> None:
        """Load a model before the first job asks for it (the worker's `preload_models`)."""
        info = self.registry.get(model_id)
        with self._run_lock:
            self._pipelines(info)

    def _load(self, info: ModelInfo) -> LoadedModel:
        started = time.perf_counter()
        log.info("loading model %s (%s, %s) on %s as %s", info.id, info.format, info.arch, self.device, self.dtype)
        try:
            with _LOAD_LOCK:
                pipe = self._load_pipeline(info)
            pipe.to(self.device)
        except DarkroomError:
            raise
        except torch.OutOfMemoryError as exc:
            raise EngineOutOfMemory(f"out of memory on {self.device} loading model {info.id}") from exc
        except Exception as exc:
            if isinstance(fatal := classify(exc), FatalEngineError):
                raise fatal from exc  # a broken device, not a broken model
            raise ModelLoadError(
                f"could not load model {info.id} from {info.path}: {type(exc).__name__}: {exc}"
            ) from exc
        pipe.set_progress_bar_config(disable=True)
        compiled = self.acceleration.apply(pipe)  # SDPA, channels-last, VAE slicing, torch.compile (settings.gpu)
        config = pipe.scheduler.config
        loaded = LoadedModel(info=info, txt2img=pipe, scheduler_config=config, load_s=0.0, compiled=compiled)
        self.acceleration.warm_up(compiled, lambda width, height: self._warm(loaded, width, height))
        loaded.load_s = time.perf_counter() - started
        return loaded

    def _warm(self, loaded: LoadedModel, width: int, height: int) -> None:
        """Short passes at a compiled size, so compiling happens at load and not in a user's job: one image, then two
        (the batch size changing is what makes torch compile the batch dimension as dynamic, once)."""
        for images in (1, 2):
            kwargs = {
                "prompt": "",
                "num_inference_steps": 2,
                "num_images_per_prompt": images,
                "width": width,
                "height": height,
                "output_type": "pil",
            }
            self._call(loaded.txt2img, loaded.txt2img.scheduler, kwargs, loaded.compiled)

    def _load_pipeline(self, info: ModelInfo) -> Any:
        if info.format == "diffusers":
            return load_diffusers_folder(Path(info.path), info.arch, self.dtype)
        checkpoint = Path(info.path)
        if checkpoint.suffix.lower() in PICKLE_SUFFIXES and not self.allow_pickle:
            raise ModelLoadError(
                f"model {info.id} is a pickled checkpoint, which can run code when loaded; {PICKLE_HINT}"
            )
        return load_single_file(checkpoint, info.arch, self.dtype, self._tokenizer_donors(info.arch))

    def _tokenizer_donors(self, arch: str) -> list[Path]:
        return [Path(m.path) for m in self.registry.scan() if m.format == "diffusers" and m.arch == arch]

    def _on_evict(self, key: tuple[str, str], loaded: LoadedModel) -> None:
        log.info("unloading model %s", key[0])
        loaded.img2img = None
        loaded.inpaint = None
        loaded.txt2img = None


# --- request → pipeline arguments ------------------------------------------------------------------------------------


def check_request(
    request: GenerationRequest, init_image: Image.Image | None, mask_image: Image.Image | None = None
) -> None:
    """Everything that would otherwise fail deep inside the pipeline, named by field."""
    for field, value in (("width", request.width), ("height", request.height)):
        if value % 8:
            raise InvalidRequest(f"{field} must be a multiple of 8 (got {value})", field=field)
    if request.mode == "txt2img":
        if init_image is not None:
            raise InvalidRequest("an init image was given for a txt2img request", field="init_image")
        if request.mask_image or mask_image is not None:
            raise InvalidRequest("a mask needs an init image to inpaint", field="mask_image")
        return
    if init_image is None:
        raise InvalidRequest(f"{request.mode} needs the init image", field="init_image")
    if int(request.steps * request.strength) < 1:
        raise InvalidRequest(
            f"steps * strength must be at least 1 (got {request.steps} * {request.strength})", field="strength"
        )
    if request.mode == "inpaint" and mask_image is None:
        raise InvalidRequest("inpainting needs the mask image", field="mask_image")
    if request.mode == "img2img" and mask_image is not None:
        raise InvalidRequest("a mask was given for a request without mask_image", field="mask_image")


@dataclass
class Sources:
    """The source image and mask of a request, at the requested size. Inpainting keeps the source's pixels outside
    the mask exactly (A1111's overlay): the VAE round trip would otherwise shift them slightly."""

    init: Image.Image | None = None
    mask: Image.Image | None = None
    crop_padding: int | None = None

    @classmethod
    def fit(cls, request: GenerationRequest, init: Image.Image | None, mask: Image.Image | None) -> Sources:
        size = (request.width, request.height)
        return cls(
            init=_fit(init, *size) if init is not None else None,
            mask=_fit(mask, *size, mode="L") if mask is not None else None,
            crop_padding=request.mask_crop_padding,
        )

    def paste_back(self, images: list[Image.Image]) -> list[Image.Image]:
        if self.init is None or self.mask is None or self.crop_padding is not None:
            return images  # with a crop, the pipeline already pasted the crop into the source
        from PIL import Image as PILImage

        return [PILImage.composite(image, self.init, self.mask) for image in images]


def total_steps(request: GenerationRequest) -> int:
    """What progress counts to: img2img and inpainting skip the first (1 - strength) of the schedule."""
    if request.mode != "txt2img":
        return min(int(request.steps * request.strength), request.steps)
    return request.steps


def pipeline_kwargs(request: GenerationRequest, sources: Sources, seeds: list[int], callback: Any) -> dict[str, Any]:
    """Arguments for one pipeline call producing one image per seed."""
    kwargs: dict[str, Any] = {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt or None,
        "num_inference_steps": request.steps,
        "guidance_scale": request.guidance_scale,
        "num_images_per_prompt": len(seeds),
        "generator": [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds],
        "callback_on_step_end": callback,
        "output_type": "pil",
    }
    if request.mode == "txt2img":
        kwargs["width"], kwargs["height"] = request.width, request.height
        return kwargs
    assert sources.init is not None
    kwargs["image"] = sources.init
    kwargs["strength"] = request.strength
    if request.mode == "inpaint":
        assert sources.mask is not None
        kwargs["mask_image"] = sources.mask
        kwargs["width"], kwargs["height"] = request.width, request.height
        if sources.crop_padding is not None:
            kwargs["padding_mask_crop"] = sources.crop_padding
    return kwargs


def joint_kwargs(items: list[BatchItem], sources: list[Sources], seeds: list[int], callback: Any) -> dict[str, Any]:
    """Arguments for one pipeline call producing every image of `items` (one batch key: same mode, size, steps,
    strength): prompts, source images and masks repeated per image of each job, one generator per image."""
    first = items[0].request
    any_negative = any(item.request.negative_prompt for item in items)
    per_image = [
        (item.request, source) for item, source in zip(items, sources, strict=True) for _ in range(item.request.n)
    ]
    kwargs: dict[str, Any] = {
        "prompt": [request.prompt for request, _ in per_image],
        # None when no image has one, as in a solo run: SDXL then guides with zeros instead of an encoded ""
        "negative_prompt": [request.negative_prompt or "" for request, _ in per_image] if any_negative else None,
        "num_inference_steps": first.steps,
        "guidance_scale": first.guidance_scale,
        "num_images_per_prompt": 1,
        "generator": [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds],
        "callback_on_step_end": callback,
        "output_type": "pil",
    }
    if first.mode != "img2img":  # img2img takes its size from the source images (fitted to the request's size)
        kwargs["width"], kwargs["height"] = first.width, first.height
    if first.mode != "txt2img":
        kwargs["image"] = [source.init for _, source in per_image]
        kwargs["strength"] = first.strength
    if first.mode == "inpaint":
        kwargs["mask_image"] = [source.mask for _, source in per_image]
    return kwargs


def step_callback(
    progress: ProgressFn,
    total: int,
    offset: int = 0,
    grand_total: int | None = None,
    weight: int = 1,
    preview: Callable[[int, Any], None] | None = None,
) -> Any:
    """Maps denoiser calls to the user's steps: second-order samplers (Heun, DPM2, DPM++ SDE) and PLMS's warm-up call
    the model more often than `steps`, so the count is scaled to end exactly at `total` and never repeats a value.
    A pass of `weight` images reports `offset + done * weight` out of `grand_total` image-steps, so progress rises
    once, to the end, however the images are grouped. `preview(step, latents)` sees the latents after each step."""
    reported = 0
    overall = grand_total if grand_total is not None else total

    def on_step_end(pipe: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        nonlocal reported
        calls = max(getattr(pipe, "_num_timesteps", 0) or total, 1)
        done = min(total, math.ceil((i + 1) * total / calls))
        if done > reported:
            reported = done
            step = offset + done * weight
            if preview is not None and "latents" in tensors:
                preview(step, tensors["latents"])
            progress(step, overall)  # may raise JobCancelled / LeaseLost: the run stops here
        return tensors

    return on_step_end


def _chunks(items: list[BatchItem], limit: int | None) -> Iterator[list[BatchItem]]:
    """Consecutive groups of at most `limit` images (a job with more images than that forms a group alone)."""
    chunk: list[BatchItem] = []
    images = 0
    for item in items:
        if chunk and limit is not None and images + item.request.n > limit:
            yield chunk
            chunk, images = [], 0
        chunk.append(item)
        images += item.request.n
    if chunk:
        yield chunk


class _FanOut:
    """The step callback of a joint batch: each job's own callback sees its own images' latents and progress.

    A job whose callback raises (cancelled, lease lost, timed out, draining) is recorded and skipped from then on;
    when every job has stopped, the last exception leaves the pipeline, which stops the call at this step."""

    def __init__(self, items: list[BatchItem], per_pass: int, render: Render) -> None:
        self.stopped: dict[int, Exception] = {}
        self._slices: list[slice] = []
        self._callbacks: list[Any] = []
        offset = 0
        for item in items:
            n = item.request.n
            self._slices.append(slice(offset, offset + n))
            offset += n
            preview = _preview_hook_for(item.progress, render)
            self._callbacks.append(
                step_callback(item.progress, per_pass, grand_total=per_pass * n, weight=n, preview=preview)
            )

    def all_stopped(self) -> bool:
        return len(self.stopped) == len(self._callbacks)

    def __call__(self, pipe: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        latents = tensors.get("latents")
        last: Exception | None = None
        for index, callback in enumerate(self._callbacks):
            if index in self.stopped:
                continue
            mine = {"latents": latents[self._slices[index]]} if latents is not None else {}
            try:
                callback(pipe, i, t, mine)
            except Exception as exc:
                self.stopped[index] = last = exc
        if last is not None and self.all_stopped():
            raise last
        return tensors


def _preview_hook_for(progress: ProgressFn, render: Render) -> Callable[[int, Any], None] | None:
    """Previews only for callers that ask (`progress.wants_preview(step)`), made only on the steps they want, by
    `render` (the model's tiny decoder, or the latent approximation: engines/preview_decoder.py)."""
    wants = getattr(progress, "wants_preview", None)
    deliver = getattr(progress, "preview", None)
    if wants is None or deliver is None:
        return None

    def hook(step: int, latents: Any) -> None:
        if wants(step):
            deliver(step, render(latents))

    return hook


def _fit(image: Image.Image, width: int, height: int, mode: str = "RGB") -> Image.Image:
    from PIL import Image as PILImage

    image = image.convert(mode)
    if image.size != (width, height):
        image = image.resize((width, height), PILImage.Resampling.LANCZOS)
    return image


# --- loaders ---------------------------------------------------------------------------------------------------------


def load_diffusers_folder(folder: Path, arch: str, dtype: torch.dtype) -> Any:
    enforce_offline()
    import diffusers

    kwargs: dict[str, Any] = {"local_files_only": True, "use_safetensors": True, **dtype_kwargs(dtype)}
    variant = _weights_variant(folder)
    if variant:
        kwargs["variant"] = variant
    if arch in ("sd1", "sd2"):
        # darkroom's safety checks run on outputs elsewhere; the SD checker would double the load for no gain.
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        return diffusers.StableDiffusionPipeline.from_pretrained(folder, **kwargs)
    if arch == "sdxl":
        # Watermarking belongs to darkroom's safety stage, not to whether invisible-watermark happens to be installed.
        return diffusers.StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False, **kwargs)
    if arch == "sdxl-refiner":  # img2img only: it refines the base model's latents (engines/refiner.py)
        return diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(folder, add_watermarker=False, **kwargs)
    return diffusers.AutoPipelineForText2Image.from_pretrained(folder, **kwargs)


def load_single_file(checkpoint: Path, arch: str, dtype: torch.dtype, donors: list[Path]) -> Any:
    enforce_offline()
    import diffusers

    config = single_file_config(checkpoint, arch)
    kwargs: dict[str, Any] = {"config": str(config), "local_files_only": True, **dtype_kwargs(dtype)}
    kwargs.update(_tokenizers(checkpoint, arch, config, donors))
    if arch == "sdxl":
        return diffusers.StableDiffusionXLPipeline.from_single_file(str(checkpoint), add_watermarker=False, **kwargs)
    if arch == "sdxl-refiner":
        pipeline = diffusers.StableDiffusionXLImg2ImgPipeline
        return pipeline.from_single_file(str(checkpoint), add_watermarker=False, **kwargs)
    kwargs.update(safety_checker=None, requires_safety_checker=False)
    return diffusers.StableDiffusionPipeline.from_single_file(str(checkpoint), **kwargs)


def single_file_config(checkpoint: Path, arch: str) -> Path:
    sidecar = checkpoint.with_name(checkpoint.stem + SIDECAR_CONFIG_SUFFIX)
    if (sidecar / "model_index.json").is_file():
        return sidecar
    bundled = BUNDLED_CONFIGS / arch
    if (bundled / "model_index.json").is_file():
        return bundled
    raise ModelLoadError(
        f"cannot tell the architecture of {checkpoint.name} (detected {arch!r}); put a diffusers config folder "
        f"(model_index.json, scheduler/, unet/, vae/, text_encoder/, tokenizer/ without weights) at {sidecar}"
    )


def _tokenizer_names(arch: str) -> list[str]:
    return {"sdxl": ["tokenizer", "tokenizer_2"], "sdxl-refiner": ["tokenizer_2"]}.get(arch, ["tokenizer"])


def _tokenizers(checkpoint: Path, arch: str, config: Path, donors: list[Path]) -> dict[str, Any]:
    """A config folder with its own tokenizers needs nothing; the bundled ones borrow from a same-arch model."""
    names = _tokenizer_names(arch)
    if all((config / name).is_dir() for name in names):
        return {}
    for donor in donors:
        if all((donor / name).is_dir() for name in names):
            return {name: _load_tokenizer(donor / name) for name in names}
    sidecar = checkpoint.with_name(checkpoint.stem + SIDECAR_CONFIG_SUFFIX)
    wanted = " and ".join(f"{sidecar}/{name}/" for name in names)
    source = TOKENIZER_SOURCES.get(arch, "the model's original diffusers repository")
    raise ModelLoadError(
        f"{checkpoint.name} ({arch}) needs a CLIP tokenizer, which darkroom cannot download. Provide {wanted} "
        f"(vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json: copy the tokenizer folder(s) of "
        f"{source}), or put any diffusers-format {arch} model in the models dir."
    )


def _load_tokenizer(folder: Path) -> Any:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def _weights_variant(folder: Path) -> str | None:
    """Hub folders sometimes hold only `*.fp16.safetensors`; from_pretrained must be told to look for those."""
    unet = folder / "unet"
    if not unet.is_dir() or any(p.name.endswith(".safetensors") and ".fp16." not in p.name for p in unet.iterdir()):
        return None
    return "fp16" if any(p.name.endswith(".fp16.safetensors") for p in unet.iterdir()) else None


def _quiet_progress_bars() -> None:
    """Loading bars from diffusers and transformers would interleave with a worker's structured logs."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    noisy = logging.getLogger("diffusers.models.modeling_utils")
    if not any(isinstance(f, _EmptyFp32ListFilter) for f in noisy.filters):
        noisy.addFilter(_EmptyFp32ListFilter())


class _EmptyFp32ListFilter(logging.Filter):
    """from_single_file casts each module to the requested dtype and diffusers then warns that the modules to keep in
    float32 (an empty list for SD) might be cast: true of every single-file load, and actionable for none."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


def pipeline_bytes(pipe: Any) -> int:
    """Bytes held by a pipeline's weights and buffers (what the cache budget counts)."""
    total = 0
    for component in getattr(pipe, "components", {}).values():
        if isinstance(component, torch.nn.Module):
            tensors = [*component.parameters(), *component.buffers()]
            total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def default_cache_budget(device: str) -> int | None:
    """Most of the device's memory for cached pipelines: 80 % of the GPU's, half of the machine's RAM on the CPU
    (the rest is for activations, the API and the OS)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory * 0.8)
    try:
        import psutil

        return int(psutil.virtual_memory().total * 0.5)
    except ImportError:
        return None


def versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {
        "darkroom": __version__,
        "diffusers": diffusers.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
