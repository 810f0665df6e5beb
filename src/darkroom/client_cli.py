"""`darkroom generate`: submit, follow progress over SSE, download the images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from rich.progress import Progress

from darkroom.client import ApiError, Client


def output_paths(output: Path, count: int) -> list[Path]:
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i + 1}{output.suffix}") for i in range(count)]


def run_generate(
    url: str, body: dict[str, Any], output: Path, progress: Progress, api_key: str | None = None
) -> list[Path]:
    try:
        with Client(url, api_key=api_key) as client, progress:
            job = client.submit(body)
            task = progress.add_task(f"{job['id']} queued", total=job["progress"]["total"] or None)
            for event in client.events(job["id"]):
                kind = event["type"]
                if kind == "progress":
                    progress.update(
                        task, description=f"{job['id']} running", completed=event["step"], total=event["total"]
                    )
                elif kind in ("started", "requeued", "retrying"):
                    progress.update(task, description=f"{job['id']} {kind}")
            job = client.job(job["id"])
            if job["state"] != "succeeded":
                error = job.get("error") or {}
                raise RuntimeError(f"job {job['id']} {job['state']}: {error.get('message', '')}")
            paths = output_paths(output, len(job["images"]))
            for path, image in zip(paths, job["images"], strict=True):
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(client.image(image["id"]))
            return paths
    except ApiError as exc:
        raise RuntimeError(str(exc)) from None
    except httpx.HTTPError as exc:
        raise RuntimeError(f"cannot reach {url}: {exc}") from None
