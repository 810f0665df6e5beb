"""How the local engine runs a loaded pipeline close to the hardware: the switches of `settings.gpu`, applied at load.

Kept out of the engine so the engine reads as what it runs, not how fast: attention through torch's fused
`scaled_dot_product_attention` (diffusers' `AttnProcessor2_0`), channels-last convolutions, the VAE decoding a batch
image by image (slicing) and, above a size, in overlapping tiles, `torch.compile` of the UNet and the VAE decoder
(optionally replaying CUDA graphs), and finished images copied to the host through pinned memory.

Compiling is bounded three ways so it can never stall a worker for long: only the sizes listed in
`gpu.compile_sizes` run compiled (each warmed up at load, so the first job does not pay for it), every other size runs
the same modules eagerly, and torch's own `recompile_limit` caps the shapes (batch sizes) compiled per module, past
which torch runs that shape eagerly too. Inductor's artefacts live under the data dir (`TORCHINDUCTOR_CACHE_DIR`), so
a restarted worker loads them instead of compiling again.

The compiled call of a module is toggled, not swapped in: `nn.Module.compile` keeps the module object (and every
pipeline twin that shares it) and only sets its `_compiled_call_impl`; here that is set for a pass at a compiled size
and cleared afterwards, so a twin, an adapter or an odd size always finds the plain module.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from PIL import Image

    from darkroom.config import GpuSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Acceleration:
    """The resolved switches for one engine on one device (see `GpuSettings` for what each means)."""

    sdpa: bool = True
    channels_last: bool = False
    compile: bool = False
    compile_mode: str = "default"
    compile_sizes: frozenset[tuple[int, int]] = frozenset()
    compile_max_recompiles: int = 8
    cache_dir: Path | None = None
    vae_slicing: bool = True
    vae_tiling_pixels: int | None = None
    pinned_transfers: bool = False
    memory_headroom: float = 0.85
    preview_decoders: dict[str, str] = field(default_factory=dict)  # arch → tiny autoencoder (engines/preview_decoder)

    @classmethod
    def from_settings(cls, gpu: GpuSettings, device: str, cache_dir: Path | None = None) -> Acceleration:
        """`auto` switches resolve here, per device: pinned copies are CUDA's; channels-last is CUDA's and the CPU's
        (oneDNN's convolutions prefer that layout: the tiny model's pipeline call 5-8 % faster, the demo model's at
        256² 3 %), not MPS's."""
        cuda = device.startswith("cuda")
        return cls(
            sdpa=gpu.sdpa,
            channels_last=gpu.channels_last == "on" or (gpu.channels_last == "auto" and (cuda or device == "cpu")),
            compile=gpu.compile,
            compile_mode="reduce-overhead" if gpu.cuda_graphs else gpu.compile_mode,
            compile_sizes=gpu.compile_size_set(),
            compile_max_recompiles=gpu.compile_max_recompiles,
            cache_dir=cache_dir,
            vae_slicing=gpu.vae_slicing,
            vae_tiling_pixels=gpu.vae_tiling_pixels,
            pinned_transfers=gpu.pinned_transfers and cuda,
            memory_headroom=gpu.memory_headroom,
            preview_decoders=dict(gpu.preview_decoders),
        )

    def apply(self, pipe: Any) -> Compiled | None:
        """Prepare a freshly loaded pipeline (on its device already); the compiled modules when compiling."""
        _set_attention(pipe, sdpa=self.sdpa)
        presign_attention(*(getattr(pipe, "components", {}) or {}).values(), per_instance=not self.compile)
        pin_execution_device(pipe)
        vae: Any = getattr(pipe, "vae", None)
        if self.channels_last:
            for module in (getattr(pipe, "unet", None), vae):
                if isinstance(module, torch.nn.Module):
                    module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # a real keyword
        if self.vae_slicing and hasattr(vae, "enable_slicing"):
            vae.enable_slicing()  # decode a batch one image at a time: less memory, same pixels as alone
        return self._compile(pipe) if self.compile else None

    def _compile(self, pipe: Any) -> Compiled:
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(self.cache_dir))  # read when inductor first compiles
        import torch._dynamo.config as dynamo_config

        dynamo_config.recompile_limit = self.compile_max_recompiles
        modules = [m for m in (getattr(pipe, "unet", None), getattr(getattr(pipe, "vae", None), "decoder", None)) if m]
        compiled = Compiled(sizes=self.compile_sizes)
        for module in modules:
            module.compile(mode=self.compile_mode)
            compiled.calls.append((module, module._compiled_call_impl))
            module._compiled_call_impl = None  # plain until a pass at a compiled size switches it on
        return compiled

    @contextlib.contextmanager
    def pass_context(self, pipe: Any, compiled: Compiled | None, size: tuple[int, int] | None) -> Iterator[None]:
        """One pipeline call at `size` (width, height; None when unknown): compiled modules on at a compiled size,
        VAE tiling on above the threshold; both off again afterwards, whatever happens."""
        tiled = self.tiles(size) and hasattr(getattr(pipe, "vae", None), "enable_tiling")
        if tiled:
            pipe.vae.enable_tiling()
        try:
            if compiled is not None and size in compiled.sizes:
                with compiled.active():
                    yield
            else:
                yield
        finally:
            if tiled:
                pipe.vae.disable_tiling()

    def tiles(self, size: tuple[int, int] | None) -> bool:
        return size is not None and self.vae_tiling_pixels is not None and size[0] * size[1] > self.vae_tiling_pixels

    def warm_up(self, compiled: Compiled | None, run: Callable[[int, int], None]) -> None:
        """Compile at load rather than in the first job: `run(width, height)` makes one short pass at each size."""
        if compiled is None:
            return
        for width, height in sorted(compiled.sizes):
            log.info("compiling for %dx%d (torch.compile, mode %s)", width, height, self.compile_mode)
            run(width, height)


@dataclass
class Compiled:
    """The compiled call implementations of a pipeline's UNet and VAE decoder, switched on for one pass at a time."""

    sizes: frozenset[tuple[int, int]]
    calls: list[tuple[torch.nn.Module, Any]] = field(default_factory=list)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        for module, call in self.calls:
            module._compiled_call_impl = call
        try:
            yield
        finally:
            for module, _ in self.calls:
                module._compiled_call_impl = None


def _set_attention(pipe: Any, sdpa: bool) -> None:
    """diffusers picks SDPA by default with torch 2; set it explicitly so a model that came with another processor
    (or an older default) runs the fused kernel too. Off: plain matmul attention, the reference to compare with."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    for name in ("unet", "vae"):
        module: Any = getattr(pipe, name, None)
        if hasattr(module, "set_attn_processor") and getattr(module, "attn_processors", None):
            module.set_attn_processor(AttnProcessor2_0() if sdpa else AttnProcessor())


def presign_attention(*modules: Any, per_instance: bool = True) -> int:
    """Give every attention processor under `modules` its call signature once, instead of once per call.

    diffusers' `Attention.forward` runs `inspect.signature(self.processor.__call__)` on every call, only to drop
    keyword arguments the processor does not take: about 15 µs of pure Python each time, some thirty times a
    denoising step, which on the CPU was 4-5 % of a small model's whole pipeline call (and on a GPU is host time the
    device waits through). The answer never changes, so it is computed once, in two layers:
    - the processor class's `__call__` function gets its signature as `__signature__`, which `inspect` returns as it
      is (it still derives the bound method's from it: 5 of the 15 µs);
    - with `per_instance`, each processor object also gets an instance attribute `__call__`: a forwarder to its
      bound method carrying the bound signature, which attribute lookup prefers to the class's method, so `inspect`
      has nothing left to derive. Calling the processor (`processor(...)`) looks `__call__` up on its type and never
      sees the attribute, so what runs is unchanged. torch.compile cannot trace through that attribute (a graph
      break at every attention layer), so compiled modules get the class layer only: `Acceleration.apply` asks for
      `per_instance` only when it does not compile.
    A processor set later (an adapter that swaps processors) simply goes the slow way. Returns how many processors
    were signed per instance."""
    import inspect

    signed = 0
    for processor in _attention_processors(modules):
        method = type(processor).__call__
        if inspect.isfunction(method) and "__signature__" not in method.__dict__:
            with contextlib.suppress(TypeError, ValueError):  # not introspectable: leave it to diffusers
                method.__signature__ = inspect.signature(method)  # type: ignore[attr-defined]
        own = getattr(processor, "__dict__", None)  # None: a processor with __slots__ takes no instance attribute
        if not per_instance or own is None or "__call__" in own:
            continue
        try:
            bound = processor.__call__
            signature = inspect.signature(bound)
        except (TypeError, ValueError):
            continue

        def call(*args: Any, _bound: Any = bound, **kwargs: Any) -> Any:
            return _bound(*args, **kwargs)

        call.__signature__ = signature  # type: ignore[attr-defined]  # read by inspect.signature
        processor.__dict__["__call__"] = call
        signed += 1
    return signed


def _attention_processors(modules: tuple[Any, ...]) -> Iterator[Any]:
    """The processors of diffusers' `Attention` layers (and subclasses: what has `set_processor`) under `modules`."""
    for module in modules:
        if isinstance(module, torch.nn.Module):
            for sub in module.modules():
                if hasattr(sub, "set_processor") and getattr(sub, "processor", None) is not None:
                    yield sub.processor


_PINNED: dict[type, type] = {}


def pin_execution_device(pipe: Any) -> Any:
    """Let `pipe` answer `_execution_device` with the device its modules are on, without a walk over all of them.

    A diffusers pipeline asks `_execution_device` at the start of every call, and the property looks for offloading
    hooks in every submodule of every component (some 900 on the tiny test model, thousands on SD 1.5): 1.7 ms a
    call on the CPU, before any work. darkroom never installs offloading hooks (a model is on one device, `pipe.to`),
    so the answer is where its weights are. The pipeline's class becomes a subclass of itself (same name, made once per
    class) that says so; everything else, `from_pipe` twins included (which get their own pin), is the class's own.
    Returns `pipe`."""
    cls = type(pipe)
    if cls in _PINNED.values() or not isinstance(getattr(cls, "_execution_device", None), property):
        return pipe
    pinned = _PINNED.get(cls)
    if pinned is None:
        namespace: dict[str, Any] = {
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__,
            "_execution_device": property(_device_of),
        }
        pinned = _PINNED.setdefault(cls, type(cls.__name__, (cls,), namespace))
    pipe.__class__ = pinned
    return pipe


def _device_of(pipe: Any) -> torch.device:
    """The device of the first parameter of the pipeline's first module (`pipe.device` asks each module, and a
    diffusers model's `device` walks its submodules for offloading hooks too: 0.3 ms for a UNet)."""
    names, _ = pipe._get_signature_keys(pipe)
    for name in names:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            for parameter in module.parameters():
                return parameter.device
    return torch.device("cpu")


class HostImages:
    """Finished images from the device to PIL. On CUDA with `pinned_transfers`, the batch is copied into pinned host
    memory (torch's caching host allocator) on a side stream, ordered after the pass by an event, so the copy runs at
    full bus speed and the device's own stream is free for the next pass at once; the rounding to 8 bits is then
    done on the host, as diffusers' `pil` output does it, so the pixels are identical to it."""

    def __init__(self, pinned: bool) -> None:
        self.pinned = pinned
        self._stream: Any = None

    def start(self, images: torch.Tensor) -> HostTransfer:
        images = images.detach()
        if not (self.pinned and images.is_cuda):
            return HostTransfer(images)
        if self._stream is None:
            self._stream = torch.cuda.Stream(images.device)
        ready = torch.cuda.current_stream(images.device).record_event()
        host = torch.empty(images.shape, dtype=images.dtype, pin_memory=True)
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(ready)
            host.copy_(images, non_blocking=True)
            images.record_stream(self._stream)  # the allocator must not reuse it before the copy has read it
            done = self._stream.record_event()
        return HostTransfer(host, done)

    def to_pil(self, images: torch.Tensor) -> list[Image.Image]:
        return self.start(images).to_pil()


class HostTransfer:
    """A batch of images on its way to the host; `to_pil` waits for the copy (if any) and makes the PIL images."""

    def __init__(self, images: torch.Tensor, done: Any = None) -> None:
        self.images = images
        self.done = done

    def to_pil(self) -> list[Image.Image]:
        from diffusers.image_processor import VaeImageProcessor

        if self.done is not None:
            self.done.synchronize()
        host = self.images.cpu()
        return list(VaeImageProcessor.numpy_to_pil(host.permute(0, 2, 3, 1).float().numpy()))


def pass_size(kwargs: dict[str, Any]) -> tuple[int, int] | None:
    """The output size of one pipeline call, from its arguments: width and height, else the source image's size
    (img2img), else the size a latent source decodes to (the refiner). None when none says."""
    if kwargs.get("width") and kwargs.get("height"):
        return int(kwargs["width"]), int(kwargs["height"])
    image: Any = kwargs.get("image")
    if isinstance(image, list) and image:
        image = image[0]
    if hasattr(image, "size") and isinstance(image.size, tuple):
        return int(image.size[0]), int(image.size[1])  # PIL: (width, height)
    if isinstance(image, torch.Tensor) and image.ndim >= 3 and image.shape[-3] == 4:
        return int(image.shape[-1]) * 8, int(image.shape[-2]) * 8  # latents, at the VAE's factor of 8
    return None
