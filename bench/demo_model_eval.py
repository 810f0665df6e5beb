"""Score the demo model on captions it never saw: does the prompt reach the pixels?

Generates one picture for each of N held-out captions (`darkroom.demo.world.held_out_scenes`: colour/shape/background
combinations the training never drew) at the model's native size with its default steps, sampler and guidance
(its `darkroom.json`), through diffusers' StableDiffusionPipeline as darkroom's engine loads it, then reads each
picture back from its pixels (`darkroom.demo.reading`) and prints JSON: the share of pictures whose background
colour, shape colour, position (single shapes placed by the caption) and count match the caption, and the seconds
one picture takes at batch size 1.

    .venv/bin/python bench/demo_model_eval.py [--model DIR] [-n 200] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from darkroom.demo.install import WEIGHTS_DIR, model_card
from darkroom.demo.reading import read_picture
from darkroom.demo.world import held_out_scenes


def load(model: Path) -> tuple[Any, dict[str, Any]]:
    import torch
    from diffusers import StableDiffusionPipeline

    from darkroom.engines.samplers import make_scheduler, resolve_sampler

    card_path = model / "darkroom.json"
    card = json.loads(card_path.read_text()) if card_path.exists() else model_card()
    defaults = card["defaults"]
    pipe = StableDiffusionPipeline.from_pretrained(
        model, torch_dtype=torch.float32, local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = make_scheduler(resolve_sampler(defaults["sampler"]), pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe, defaults


def generate(pipe: Any, defaults: dict[str, Any], prompts: list[str], seeds: list[int]) -> list[Any]:
    import torch

    return list(
        pipe(
            prompts,
            width=defaults["width"],
            height=defaults["height"],
            num_inference_steps=defaults["steps"],
            guidance_scale=defaults["guidance_scale"],
            generator=[torch.Generator().manual_seed(s) for s in seeds],
        ).images
    )


def evaluate(model: Path, n: int, batch: int, save: Path | None = None) -> dict[str, Any]:
    pipe, defaults = load(model)
    scenes = held_out_scenes(n)
    hits = {"background": 0, "colour": 0, "count": 0, "position": 0}
    positioned = 0
    for start in range(0, n, batch):
        chunk = scenes[start : start + batch]
        images = generate(pipe, defaults, [s.caption for s in chunk], list(range(start, start + len(chunk))))
        for i, (scene, image) in enumerate(zip(chunk, images, strict=True)):
            if save is not None:
                image.save(save / f"{start + i:03d}.png")
            got = read_picture(image)
            hits["background"] += got.background == scene.background
            hits["colour"] += got.colour == scene.colour
            hits["count"] += got.count == scene.count
            if scene.position is not None:
                positioned += 1
                hits["position"] += got.position == scene.position
    timings = []
    for seed in range(5):
        started = time.perf_counter()
        generate(pipe, defaults, [scenes[0].caption], [seed])
        timings.append(time.perf_counter() - started)
    totals = {"background": n, "colour": n, "count": n, "position": positioned}
    return {
        "model": str(model),
        "captions": n,
        "defaults": defaults,
        "accuracy": {key: round(hits[key] / max(1, totals[key]), 3) for key in hits},
        "scored": totals,
        "seconds_per_image": round(statistics.median(timings), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=WEIGHTS_DIR, help="a diffusers folder (default: the shipped one)")
    parser.add_argument("-n", type=int, default=200, help="held-out captions to generate")
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save", type=Path, help="write the pictures here")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.save is not None:
        args.save.mkdir(parents=True, exist_ok=True)
    json.dump(evaluate(args.model, args.n, args.batch, args.save), sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
