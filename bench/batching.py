"""Service-level throughput for a mixed workload, dynamic batching off vs on, in one run.

Everything is real except the weights: the SQLite job store, the local blob store, the worker loop and the diffusers
engine running the random-weight smoke-test model on the CPU. Each configuration runs `--rounds` times, alternating,
and the median is reported, so machine noise hits both sides alike. Prints JSON.

    .venv/bin/python bench/batching.py --jobs 48 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from darkroom.config import Settings  # noqa: E402
from darkroom.models.smoke import ensure_smoke_model  # noqa: E402
from darkroom.schemas import GenerationRequest, JobState  # noqa: E402
from darkroom.service import Services  # noqa: E402

SHAPES = [  # (width, height, steps, sampler): a few compatibility classes, as real traffic has
    (64, 64, 4, "Euler a"),
    (128, 128, 4, "DPM++ 2M Karras"),
    (64, 64, 8, "Euler a"),
]


def workload(count: int, seed: int = 0) -> list[GenerationRequest]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        width, height, steps, sampler = rng.choice(SHAPES)
        out.append(
            GenerationRequest(
                prompt=f"prompt {i}",
                width=width,
                height=height,
                steps=steps,
                sampler=sampler,
                seed=rng.randrange(2**31),
                priority=rng.choice(["high", "normal", "low"]),
            )
        )
    return out


def run_once(models_dir: Path, requests: list[GenerationRequest], max_batch: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            data_dir=Path(tmp),
            models_dir=models_dir,
            max_batch=max_batch,
            batch_window_seconds=0.0,
            poll_seconds=0.01,
            progress_interval=0.25,
            create_default_model=False,
        )
        svc = Services.open(settings)
        model = svc.registry.default().id
        ids = [svc.store.create(r.model_copy(update={"model": model}))[0].id for r in requests]
        svc.start_workers(1)
        started = time.perf_counter()
        while svc.store.counts().get(JobState.succeeded.value, 0) < len(ids):
            time.sleep(0.01)
        elapsed = time.perf_counter() - started
        svc.close()
    return {"seconds": elapsed, "jobs_per_s": len(ids) / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as models:
        ensure_smoke_model(Path(models))
        requests = workload(args.jobs)
        run_once(Path(models), requests[:4], 1)  # warm-up: imports, first load
        results: dict[str, list[float]] = {"off": [], "on": []}
        for _ in range(args.rounds):
            for name, size in (("off", 1), ("on", args.max_batch)):
                results[name].append(run_once(Path(models), requests, size)["jobs_per_s"])
    off, on = statistics.median(results["off"]), statistics.median(results["on"])
    print(
        json.dumps(
            {
                "benchmark": "service_throughput_batching",
                "device": "cpu",
                "model": "darkroom-smoke-test (random weights)",
                "jobs": args.jobs,
                "rounds": args.rounds,
                "batching_off_jobs_per_s": round(off, 3),
                "batching_on_jobs_per_s": round(on, 3),
                "max_batch": args.max_batch,
                "speedup_on_vs_off": round(on / off, 3),
                "raw": {k: [round(v, 3) for v in vs] for k, vs in results.items()},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
