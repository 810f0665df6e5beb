"""How darkroom jobs read in ComfyUI's shapes: queue items, history entries, output image references. A ComfyUI
`prompt_id` is the darkroom job id; output files are named after the darkroom image id."""

from __future__ import annotations

from typing import Any

from darkroom.jobs.store import ImageRecord, JobRecord
from darkroom.schemas import JobState


def spec(job: JobRecord) -> dict[str, Any]:
    """The job's workflow spec (`GenerationRequest.workflow`); {} for jobs not submitted through ComfyUI's API."""
    return job.request.get("workflow") or {}


def number(job: JobRecord) -> int:
    """ComfyUI's queue `number`: increases with submit time."""
    return int(job.created_at.timestamp() * 1000)


def queue_item(job: JobRecord) -> list[Any]:
    """[number, prompt_id, prompt, extra_data, outputs_to_execute], as ComfyUI lists a queued prompt."""
    workflow = spec(job)
    extra = {**(workflow.get("extra_data") or {}), "client_id": workflow.get("client_id")}
    return [number(job), job.id, workflow.get("prompt", {}), extra, workflow.get("outputs", [])]


def file_name(image: ImageRecord) -> str:
    return f"{image.id}.png"


def image_id(filename: str) -> str:
    return filename.removesuffix(".png")


def outputs(job: JobRecord, images: list[ImageRecord]) -> dict[str, Any]:
    """Each output node's images. PreviewImage's are `temp`, SaveImage's `output`; held images are left out."""
    workflow = spec(job)
    graph = workflow.get("prompt", {})
    released = [{"filename": file_name(i), "subfolder": ""} for i in images if i.released]
    result: dict[str, Any] = {}
    for node in workflow.get("outputs", []):
        kind = "temp" if graph.get(node, {}).get("class_type") == "PreviewImage" else "output"
        result[node] = {"images": [{**ref, "type": kind} for ref in released]}
    return result


def status(job: JobRecord) -> dict[str, Any]:
    ok = job.state is JobState.succeeded
    messages: list[Any] = [["execution_start", {"prompt_id": job.id, "timestamp": _ms(job.started_at)}]]
    if ok:
        messages.append(["execution_success", {"prompt_id": job.id, "timestamp": _ms(job.finished_at)}])
    elif job.state is JobState.cancelled:
        messages.append(["execution_interrupted", {"prompt_id": job.id, "timestamp": _ms(job.finished_at)}])
    else:
        messages.append(["execution_error", error(job)])
    return {"status_str": "success" if ok else "error", "completed": ok, "messages": messages}


def history_entry(job: JobRecord, images: list[ImageRecord]) -> dict[str, Any]:
    out = outputs(job, images)
    return {
        "prompt": queue_item(job),
        "outputs": out,
        "status": status(job),
        "meta": {node: {"node_id": node, "display_node": node} for node in out},
    }


def error(job: JobRecord) -> dict[str, Any]:
    """`execution_error`'s data: the job's error, blamed on the sampler node (darkroom runs the job as one)."""
    workflow = spec(job)
    node = workflow.get("sampler_node") or next(iter(workflow.get("outputs", [])), None)
    graph = workflow.get("prompt", {})
    err = job.error or {}
    return {
        "prompt_id": job.id,
        "node_id": node,
        "node_type": graph.get(node, {}).get("class_type") if node else None,
        "executed": [],
        "exception_message": err.get("message") or f"job {job.state.value}",
        "exception_type": err.get("code") or job.state.value,
        "traceback": [],
        "current_inputs": {},
        "current_outputs": {},
        "timestamp": _ms(job.finished_at),
    }


def _ms(value: Any) -> int | None:
    return int(value.timestamp() * 1000) if value is not None else None
