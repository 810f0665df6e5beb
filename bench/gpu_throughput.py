"""GPU throughput: darkroom's engine and its whole service against a plain diffusers pipeline, batch by batch.

Architectures with random weights built from the configs darkroom ships (`darkroom/models/configs`), so the compute
is the real model's without downloading it: `sd15` (SD 1.5's UNet, VAE and CLIP text encoder; 512² by default) and
`sdxl` (SDXL's UNet, VAE and both text encoders; 1024²). `tiny` is darkroom's smoke model, for a CPU smoke run.
Every pipeline is saved once as a diffusers folder in `--work` and then loaded the way users' models are.

For each `--batches` size, with guidance (so the UNet runs twice per step) and `--steps` steps:
- `engine`: darkroom's `DiffusersEngine.generate_batch` (the worker's path for a batch of compatible jobs);
- `service`: `darkroom serve` with one worker, the batch submitted as that many concurrent `POST /v1/generate`
  requests (`Accept: image/png`), so HTTP, the queue, the worker, post-processing and storage are all in it;
- `baseline`: a plain diffusers pipeline in the same dtype behind a lock, one request at a time (batch 1 only: that
  server cannot batch), the pattern darkroom replaces.
Reported per batch: seconds per batch, images/s, UNet iterations/s (steps x images), peak device memory, and
achieved TFLOP/s from the UNet's FLOPs counted once per shape (`torch.utils.flop_counter`). Ratios: service against
engine (the service's overhead) and engine and service against the baseline. Prints JSON.

    .venv/bin/python bench/gpu_throughput.py --arch sd15 --batches 1,2,4,8,16           # on a GPU
    .venv/bin/python bench/gpu_throughput.py --arch tiny --batches 1,2 --steps 2 --size 64 --repeat 1  # CPU smoke
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
from _common import bench_env, darkroom_server, git_commit, log  # noqa: E402

DEFAULT_SIZE = {"tiny": 64, "sd15": 512, "sdxl": 1024}
CONFIGS = Path(__file__).resolve().parents[1] / "src" / "darkroom" / "models" / "configs"
INDUCTOR_CACHE = Path(tempfile.gettempdir()) / "darkroom-bench-inductor"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=sorted(DEFAULT_SIZE), default="sd15")
    p.add_argument("--size", type=int, help="image side; default 512 (sd15), 1024 (sdxl), 64 (tiny)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument(
        "--strength",
        type=float,
        help="img2img from a gradient source at this strength (steps x strength denoising steps); default: txt2img",
    )
    p.add_argument("--batches", default="1,2,4,8,16")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per batch size (median); one warm-up first")
    p.add_argument("--modes", default="engine,service,baseline")
    p.add_argument("--device", default="auto", help="auto: cuda when available, else cpu")
    p.add_argument("--dtype", default="auto", help="auto: float16 on CUDA, float32 on CPU")
    p.add_argument("--work", type=Path, help="folder for the saved model (kept between runs); default: a temp dir")
    p.add_argument(
        "--gpu",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a `gpu` setting for engine and service, e.g. compile=true, cuda_graphs=true, channels_last=off "
        "(repeatable; with compile, compile_sizes defaults to the benchmark's size)",
    )
    return p.parse_args(argv)


def gpu_settings(args: argparse.Namespace, size: int) -> dict[str, str]:
    """The `--gpu` settings, as `DARKROOM_GPU__*` would give them. Compiled artefacts are kept between runs in one
    cache folder for engine and service alike, so only a first run pays for compiling."""
    given = {"compile_cache_dir": str(INDUCTOR_CACHE), **dict(item.split("=", 1) for item in args.gpu)}
    if given.get("compile", "").lower() in ("1", "true", "on", "yes"):
        given.setdefault("compile_sizes", json.dumps([f"{size}x{size}"]))
    return given


def gpu_model(args: argparse.Namespace, size: int) -> Any:
    """The same settings as `GpuSettings` (which also checks them before anything runs)."""
    from darkroom.config import GpuSettings

    given = gpu_settings(args, size)
    return GpuSettings(**{k: json.loads(v) if k == "compile_sizes" else v for k, v in given.items()})


def resolve(args: argparse.Namespace) -> tuple[str, Any]:
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    name = args.dtype if args.dtype != "auto" else ("float16" if device.startswith("cuda") else "float32")
    return device, getattr(torch, name)


# --- the model ------------------------------------------------------------------------------------------------------


def build_pipeline(arch: str) -> Any:
    """Random weights in the architecture's real shapes, with darkroom's offline tokenizer (77 tokens, as CLIP's)."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from darkroom.models.smoke import _sd15_scheduler, build_tiny_pipeline, build_tiny_tokenizer

    if arch == "tiny":
        return build_tiny_pipeline()
    torch.manual_seed(0)
    folder = CONFIGS / ("sd1" if arch == "sd15" else "sdxl")

    def config(part: str) -> dict[str, Any]:
        return {k: v for k, v in json.loads((folder / part / "config.json").read_text()).items() if k[0] != "_"}

    parts: dict[str, Any] = {
        "unet": UNet2DConditionModel.from_config(config("unet")),
        "vae": AutoencoderKL.from_config(config("vae")),
        "scheduler": _sd15_scheduler(),
        "tokenizer": build_tiny_tokenizer(),
    }
    if arch == "sd15":
        parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**config("text_encoder")))
        return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None)
    parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**config("text_encoder")))
    parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**config("text_encoder_2")))
    parts["tokenizer_2"] = build_tiny_tokenizer()
    return StableDiffusionXLPipeline(**parts)


def ensure_model(models_dir: Path, arch: str, dtype: Any) -> Path:
    path = models_dir / f"bench-{arch}"
    if not (path / "model_index.json").is_file():
        log(f"building {arch} with random weights in {path}")
        build_pipeline(arch).to(dtype=dtype).save_pretrained(path, safe_serialization=True)
    return path


def unet_tflops_per_image(pipe: Any, arch: str, size: int, steps: int, guidance: bool) -> float:
    """The UNet's FLOPs for one image over every step, counted on one forward pass at batch 1 (x2 with guidance)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    unet = pipe.unet
    latent = torch.zeros(1, unet.config.in_channels, size // 8, size // 8, device=unet.device, dtype=unet.dtype)
    text = torch.zeros(1, 77, unet.config.cross_attention_dim, device=unet.device, dtype=unet.dtype)
    extra: dict[str, Any] = {}
    if arch == "sdxl":
        pooled = pipe.text_encoder_2.config.projection_dim
        ids = torch.tensor([[size, size, 0, 0, size, size]], device=unet.device, dtype=unet.dtype)
        extra["added_cond_kwargs"] = {"text_embeds": torch.zeros(1, pooled, device=unet.device, dtype=unet.dtype)}
        extra["added_cond_kwargs"]["time_ids"] = ids
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        unet(latent, torch.tensor([500], device=unet.device), encoder_hidden_states=text, **extra)
    return counter.get_total_flops() * steps * (2 if guidance else 1) / 1e12


# --- the three ways to run a batch ----------------------------------------------------------------------------------


def peak_memory_reset(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: str) -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated(device)) if device.startswith("cuda") else None


def request(i: int, args: argparse.Namespace, size: int, model: str, init: str | None = None) -> dict[str, Any]:
    """One job; with `--strength`, an img2img job whose `init` is the source (base64 for the API, a blob reference
    for the engine, which is handed the image itself)."""
    body: dict[str, Any] = {
        "prompt": f"a lighthouse on a cliff at dusk, {i}",
        "model": model,
        "width": size,
        "height": size,
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "seed": 1000 + i,
    }
    if args.strength is not None:
        body.update(init_image=init or "blob:bench", strength=args.strength)
    return body


def source_image(size: int) -> Any:
    """The img2img source: a grey gradient (what it shows does not change the compute)."""
    from PIL import Image

    return Image.frombytes("L", (256, 1), bytes(range(256))).resize((size, size)).convert("RGB")


def source_base64(size: int) -> str:
    import base64
    import io

    out = io.BytesIO()
    source_image(size).save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode()


def denoise_steps(args: argparse.Namespace) -> int:
    """Steps the UNet runs per image: img2img skips the first (1 - strength) of the schedule."""
    return args.steps if args.strength is None else min(args.steps, int(args.steps * args.strength))


def engine_runs(args: argparse.Namespace, models_dir: Path, model: str, size: int, device: str) -> dict[int, Any]:
    from darkroom.engines.acceleration import Acceleration
    from darkroom.engines.base import BatchItem
    from darkroom.engines.diffusers_engine import DiffusersEngine
    from darkroom.models.registry import ModelRegistry
    from darkroom.schemas import GenerationRequest

    registry = ModelRegistry(models_dir, models_dir / ".hashes.json")
    gpu = gpu_model(args, size)
    accel = Acceleration.from_settings(gpu, device, gpu.compile_cache_dir)
    engine = DiffusersEngine(registry, device=device, dtype=args.dtype, batch_invariant=False, acceleration=accel)
    out: dict[int, Any] = {}
    init = source_image(size) if args.strength is not None else None
    try:
        for batch in batch_sizes(args):
            items = [
                BatchItem(GenerationRequest(**request(i, args, size, model)), lambda step, total: None, init_image=init)
                for i in range(batch)
            ]

            def once(items: list[BatchItem] = items) -> None:
                outcomes = engine.generate_batch(items)
                failed = [o for o in outcomes if isinstance(o, Exception)]
                if failed:
                    raise failed[0]

            out[batch] = timed(once, args.repeat, device)
    finally:
        engine.close()
    return out


def baseline_runs(args: argparse.Namespace, path: Path, size: int, device: str, dtype: Any) -> dict[int, Any]:
    """What people write: one pipeline, one lock, one request at a time (so batch 1 only)."""
    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype).to(device)
    source: dict[str, Any] = {}
    if args.strength is not None:
        from diffusers import AutoPipelineForImage2Image

        pipe = AutoPipelineForImage2Image.from_pipe(pipe)
        source = {"image": source_image(size), "strength": args.strength}
    pipe.set_progress_bar_config(disable=True)
    lock = threading.Lock()

    def once() -> None:
        with lock, torch.inference_mode():
            generator = torch.Generator(device="cpu").manual_seed(1)
            pipe(
                "a lighthouse on a cliff at dusk",
                width=size,
                height=size,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                generator=generator,
                **source,
            ).images[0].save(os.devnull, "PNG")

    return {1: timed(once, args.repeat, device)}


def service_runs(args: argparse.Namespace, models_dir: Path, model: str, size: int) -> dict[int, Any]:
    """`darkroom serve --workers 1`; a batch is that many concurrent sync requests for the PNG itself."""
    out: dict[int, Any] = {}
    with tempfile.TemporaryDirectory(prefix="darkroom-gpu-") as tmp:
        # the benchmark's own random-weight model is served as it was written, without an operator's approval
        extra = {"DARKROOM_BATCH_WINDOW_SECONDS": "0.05", "DARKROOM_SECURITY__APPROVE_FIRST_SEEN_MODELS": "true"}
        env = bench_env(int(os.environ.get("OMP_NUM_THREADS", "1")), extra)
        if args.dtype != "auto":
            env["DARKROOM_DTYPE"] = args.dtype
        env.update({f"DARKROOM_GPU__{key.upper()}": value for key, value in gpu_settings(args, size).items()})
        server = darkroom_server("service", Path(tmp), models_dir, 1, Path(tmp), env)
        try:
            server.wait_ready(timeout=1800)
            for batch in batch_sizes(args):
                out[batch] = asyncio.run(_service_batch(server.url, args, size, model, batch))
        finally:
            server.stop()
    return out


async def _service_batch(url: str, args: argparse.Namespace, size: int, model: str, batch: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=batch + 2)
    init = source_base64(size) if args.strength is not None else None
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as http:

        async def one(i: int) -> None:
            body = request(i, args, size, model, init)
            r = await http.post("/v1/generate", json=body, headers={"Accept": "image/png"})
            if r.is_error:
                raise RuntimeError(f"POST /v1/generate answered {r.status_code}: {r.text[:500]}")
            if r.headers["content-type"] != "image/png":
                raise RuntimeError(f"job did not succeed: {r.text[:500]}")

        seconds = []
        for run in range(args.repeat + 1):  # the first run warms up (model load, kernels)
            started = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(batch)))
            if run:
                seconds.append(time.perf_counter() - started)
    return {"seconds": statistics.median(seconds), "runs": [round(s, 4) for s in seconds]}


def timed(once: Any, repeat: int, device: str) -> dict[str, Any]:
    import torch

    once()  # warm-up: model load, kernel selection, compilation
    peak_memory_reset(device)
    seconds = []
    for _ in range(repeat):
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        once()
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - started)
    return {"seconds": statistics.median(seconds), "runs": [round(s, 4) for s in seconds], "peak": peak_memory(device)}


def batch_sizes(args: argparse.Namespace) -> list[int]:
    return [int(b) for b in args.batches.split(",") if b.strip()]


# --- the run --------------------------------------------------------------------------------------------------------


def figures(run: dict[str, Any], batch: int, steps: int, tflop_per_image: float) -> dict[str, Any]:
    seconds = run["seconds"]
    return {
        "seconds_per_batch": round(seconds, 4),
        "images_per_s": round(batch / seconds, 3),
        "unet_it_per_s": round(steps * batch / seconds, 2),
        "tflops": round(tflop_per_image * batch / seconds, 4),
        "peak_memory_bytes": run.get("peak"),
        "runs": run["runs"],
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    size = args.size or DEFAULT_SIZE[args.arch]
    modes = {m.strip() for m in args.modes.split(",") if m.strip()}
    device, dtype = resolve(args)
    gpu_model(args, size)  # a bad --gpu setting fails before anything is built
    with tempfile.TemporaryDirectory(prefix="darkroom-gpu-models-") as tmp:
        models_dir = args.work or Path(tmp)
        models_dir.mkdir(parents=True, exist_ok=True)
        path = ensure_model(models_dir, args.arch, dtype)
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype).to(device)
        tflop = unet_tflops_per_image(pipe, args.arch, size, denoise_steps(args), args.guidance > 1)
        del pipe
        raw: dict[str, dict[int, Any]] = {}
        if "engine" in modes:
            raw["engine"] = engine_runs(args, models_dir, path.name, size, device)
        if "baseline" in modes:
            raw["baseline"] = baseline_runs(args, path, size, device, dtype)
        if "service" in modes:
            raw["service"] = service_runs(args, models_dir, path.name, size)
    table = {
        mode: {str(b): figures(r, b, denoise_steps(args), tflop) for b, r in runs.items()} for mode, runs in raw.items()
    }
    print(json.dumps(summary(args, size, device, dtype, tflop, table), indent=2))


def summary(args: argparse.Namespace, size: int, device: str, dtype: Any, tflop: float, table: dict) -> dict[str, Any]:
    def seconds(mode: str, batch: int) -> float | None:
        row = table.get(mode, {}).get(str(batch))
        return row["seconds_per_batch"] if row else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a and b else None

    batches = batch_sizes(args)
    best = {m: max(rows.values(), key=lambda r: r["images_per_s"]) for m, rows in table.items()}
    return {
        "benchmark": "gpu_throughput",
        "commit": git_commit(),
        "arch": args.arch,
        "size": size,
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "mode": "txt2img" if args.strength is None else f"img2img (strength {args.strength})",
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "gpu_settings": gpu_settings(args, size),
        "unet_gflop_per_image": round(tflop * 1000, 3),
        "results": table,
        "best_images_per_s": {m: r["images_per_s"] for m, r in best.items()},
        "single_image_s": {m: seconds(m, 1) for m in table if seconds(m, 1)},
        # the service's overhead over the engine for the same batch (1.03 = 3 % slower)
        "service_over_engine": {str(b): ratio(seconds("service", b), seconds("engine", b)) for b in batches},
        "baseline_over_engine_batch1": ratio(seconds("baseline", 1), seconds("engine", 1)),
        "baseline_over_service_batch1": ratio(seconds("baseline", 1), seconds("service", 1)),
        "python": sys.version.split()[0],
    }


if __name__ == "__main__":
    main()
