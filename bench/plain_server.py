"""The baseline darkroom has to beat: the server people write when they need one model behind HTTP.

FastAPI, ONE diffusers `StableDiffusionPipeline` loaded at start from a model folder, an `asyncio.Lock` so one request
runs at a time, the pipeline called in a thread so the event loop stays free, PNG encoded with Pillow. No queue, no
store, no provenance. Defaults match darkroom's (`GenerationRequest` and `engines/diffusers_engine.py`): "Euler a"
(`EulerAncestralDiscreteScheduler` from the model's own scheduler config, a fresh one per request), guidance 7.0, no
negative prompt, float32 on the CPU, one CPU `torch.Generator` seeded with the request's seed, PIL output.

    .venv/bin/python bench/plain_server.py --model MODEL_DIR --port 8100
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import uvicorn  # noqa: E402
from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from fastapi.responses import Response  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402
from starlette.concurrency import run_in_threadpool  # noqa: E402


class Generate(BaseModel):
    prompt: str = Field(min_length=1)
    steps: int = Field(20, ge=1, le=150)
    width: int = Field(512, ge=64, le=2048, multiple_of=8)
    height: int = Field(512, ge=64, le=2048, multiple_of=8)
    seed: int = Field(0, ge=0, lt=2**32)
    guidance_scale: float = Field(7.0, ge=0.0, le=30.0)


def create_app(model: str) -> FastAPI:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(
        model, torch_dtype=dtype, local_files_only=True, safety_checker=None, requires_safety_checker=False
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    scheduler_config = pipe.scheduler.config
    lock = asyncio.Lock()
    app = FastAPI(title="plain diffusers server")

    def render(body: Generate) -> bytes:
        pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(scheduler_config)
        with torch.inference_mode():
            image = pipe(
                prompt=body.prompt,
                num_inference_steps=body.steps,
                guidance_scale=body.guidance_scale,
                width=body.width,
                height=body.height,
                generator=torch.Generator(device="cpu").manual_seed(body.seed),
                output_type="pil",
            ).images[0]
        out = io.BytesIO()
        image.save(out, format="PNG")
        return out.getvalue()

    @app.post("/generate")
    async def generate(body: Generate) -> Response:
        async with lock:
            png = await run_in_threadpool(render, body)
        return Response(png, media_type="image/png")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a diffusers model folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()
    uvicorn.run(create_app(args.model), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
