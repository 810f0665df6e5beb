"""ComfyUI-compatible API: ComfyUI's HTTP routes and `/ws`, at the root and under `/api/`, on darkroom's queue.

`POST /prompt` compiles the workflow (`compile.py`) into one `GenerationRequest` and queues it through `v1.submit`,
so keys, tenants, quotas, priorities, the prompt policy and the audit log apply exactly as on the native API. The
answer's `prompt_id` is the job id. A client's own `prompt_id` is taken as the Idempotency-Key (sending the same one
twice queues one job). `extra_data.preview_method` other than `none` asks for previews (binary frames on `/ws`), and
`front: true` queues at high priority. Errors leave in ComfyUI's shape: `{"error": {"type", "message", "details",
"extra_info"}, "node_errors": {...}}`, a refused workflow with 400 and a node error per node darkroom cannot run.

A caller sees only its own tenant's queue, history and files (a `user` key: the jobs it submitted); `/view` of any
other file is a 404.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import platform
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request, Response, WebSocket
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from PIL import Image
from starlette.datastructures import UploadFile

from darkroom import __version__
from darkroom.auth import audit
from darkroom.auth.principal import Permission, Principal
from darkroom.auth.tenants import TenantPolicy
from darkroom.engines import upscalers
from darkroom.errors import Conflict, DarkroomError, HeldForReview, InvalidRequest, NotFound, PayloadTooLarge
from darkroom.jobs.store import JobRecord
from darkroom.kv import SettingsKV
from darkroom.models import access as model_access
from darkroom.models.controlnets import ControlNetInfo
from darkroom.schemas import AdapterInfo, GenerationRequest, JobState, WorkflowSpec, check_limits
from darkroom.service import Services

from .. import compat
from ..auth import principal, require, sees_job, tenant_policy, visible_image, visible_job, websocket_principal
from ..errors import invalid_json_message
from ..uploads import open_image, png_bytes
from ..v1 import services, submit
from . import nodes, views
from .compile import Compiled, WorkflowInvalid, compile_workflow
from .inputs import Inputs, check_name, full_name
from .ws import Hub, Socket, active_jobs, hub_for

MAX_HISTORY = 200


def comfy_error(
    status: int, kind: str, message: str, details: str = "", node_errors: dict[str, Any] | None = None
) -> JSONResponse:
    body = {"error": {"type": kind, "message": message, "details": details, "extra_info": {}}}
    return JSONResponse({**body, "node_errors": node_errors or {}}, status_code=status)


class ComfyRoute(APIRoute):
    """Routes whose errors leave in ComfyUI's shape; a request ComfyUI would refuse is a 400."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                if (invalid_json := invalid_json_message(exc)) is not None:
                    return comfy_error(400, "invalid_json", invalid_json)
                first = exc.errors()[0] if exc.errors() else {}
                where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query"))
                return comfy_error(400, "invalid_request", f"{where}: {first.get('msg', 'invalid')}", where)
            except DarkroomError as exc:
                status = 400 if exc.status == InvalidRequest.status else exc.status
                response = comfy_error(status, exc.code, exc.message, exc.field or "")
                response.headers.update(getattr(exc, "headers", None) or {})
                if retry := getattr(exc, "retry_after", None):
                    response.headers["Retry-After"] = str(retry)
                return response

        return route


# POST /queue, /interrupt and /history answer 200 with an empty body, as ComfyUI does: documented so, not as JSON.
EMPTY_ANSWER: dict[str, Any] = {
    "response_class": Response,
    "responses": {200: {"description": "Done: an empty body, as ComfyUI answers"}},
}
router = APIRouter(tags=["comfyui"], route_class=ComfyRoute, dependencies=[Depends(require(Permission.generate))])
socket_router = APIRouter(tags=["comfyui"])


def hub(request: Request) -> Hub:
    return hub_for(services(request), request.app.state)


# --- prompts --------------------------------------------------------------------------------------------------------


async def read_json(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw or b"{}")
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}", field="body") from None
    except UnicodeDecodeError:
        raise InvalidRequest("the body is not UTF-8 JSON", field="body") from None


def node_errors(problems: list[Any], outputs: list[str]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for problem in problems:
        entry = found.setdefault(
            problem.node, {"errors": [], "dependent_outputs": outputs, "class_type": problem.class_type}
        )
        extra = {"input_name": problem.input_name} if problem.input_name else {}
        entry["errors"].append(
            {"type": problem.kind, "message": problem.message, "details": problem.message, "extra_info": extra}
        )
    return found


def refusal(exc: WorkflowInvalid, graph: Any) -> JSONResponse:
    outputs = [k for k, v in graph.items() if isinstance(v, dict)] if isinstance(graph, dict) else []
    message = "Prompt outputs failed validation" if exc.problems else exc.message
    details = "; ".join(f"{p.class_type} {p.node}: {p.message}" for p in exc.problems) or exc.message
    return comfy_error(400, exc.kind, message, details, node_errors(exc.problems, outputs))


def field_refusal(exc: DarkroomError, compiled: Compiled) -> JSONResponse:
    """A field the job refused (a limit, an unknown LoRA or checkpoint), named as the node it came from."""
    field = (exc.field or "").split(".")[0]
    node = compiled.origin.get(field)  # a field no node set (priority from extra_data): a plain 400 naming it
    if exc.status != InvalidRequest.status or node is None:
        raise exc
    problem = {"type": "value_not_valid", "message": exc.message, "details": exc.message, "extra_info": {}}
    errors = {node[0]: {"errors": [problem], "dependent_outputs": compiled.outputs, "class_type": node[1]}}
    return comfy_error(400, "prompt_outputs_failed_validation", "Prompt outputs failed validation", exc.message, errors)


def build_request(svc: Services, compiled: Compiled, body: dict[str, Any]) -> GenerationRequest:
    """The job: the compiled fields, the checkpoint resolved, the workflow kept for provenance and the API."""
    fields = dict(compiled.fields)
    model_name = fields.pop("model", None)
    fields["model"] = (
        compat.find_model(svc, str(model_name), "model").id if model_name else compat.default_model(svc).id
    )
    given = body.get("extra_data")
    extra: dict[str, Any] = given if isinstance(given, dict) else {}
    preview_method = str(extra.get("preview_method", "none")).lower()
    workflow = WorkflowSpec(
        prompt=body["prompt"],
        client_id=str(body["client_id"])[:200] if body.get("client_id") else None,
        outputs=compiled.outputs,
        sampler_node=compiled.sampler_node,
        extra_data=extra,
    )
    fields.update(
        workflow=workflow,
        preview=preview_method not in ("none", "") and "upscale" not in fields,
        priority="high" if body.get("front") is True else extra.get("priority", "normal"),
    )
    request = compat.generation_request(fields, {})
    check_limits(request, svc.settings.limits)
    return request


def compile_for(svc: Services, who: Principal, graph: Any) -> Compiled:
    folder = Inputs(svc, who.tenant)
    return compile_workflow(graph, folder.read, upscalers.model_scale_from_name)


@router.post("/prompt", summary="ComfyUI: queue an API-format workflow (compiled into a darkroom job)")
async def post_prompt(request: Request) -> Response:
    svc = services(request)
    who = principal(request)
    body = await read_json(request)
    if not isinstance(body, dict) or "prompt" not in body:
        return comfy_error(400, "no_prompt", "No prompt provided", "the body needs a `prompt` (API format)")
    try:
        compiled = await run_in_threadpool(compile_for, svc, who, body["prompt"])
    except WorkflowInvalid as exc:
        return refusal(exc, body["prompt"])
    key = f"comfyui:{body['prompt_id']}" if body.get("prompt_id") else request.headers.get("Idempotency-Key")
    try:
        generation = await run_in_threadpool(build_request, svc, compiled, body)
        job, _ = await submit(request, generation, key)
    except DarkroomError as exc:
        return field_refusal(exc, compiled)
    hub(request).follow(job)
    return JSONResponse({"prompt_id": job.id, "number": views.number(job), "node_errors": {}})


@router.get("/prompt", summary="ComfyUI: the caller's queue length")
def get_prompt(request: Request) -> dict[str, Any]:
    jobs = active_jobs(services(request), principal(request))
    return {"exec_info": {"queue_remaining": len(jobs)}}


# --- queue, interrupt ------------------------------------------------------------------------------------------------


@router.get("/queue", summary="ComfyUI: the caller's running and pending prompts")
def get_queue(request: Request) -> dict[str, Any]:
    jobs = active_jobs(services(request), principal(request))
    return {
        "queue_running": [views.queue_item(j) for j in jobs if j.state is JobState.running],
        "queue_pending": [views.queue_item(j) for j in jobs if j.state is JobState.queued],
    }


def cancel(svc: Services, who: Principal, job: JobRecord) -> None:
    with contextlib.suppress(Conflict):  # it finished between the look and the cancel
        svc.store.cancel(job.id, record=lambda conn, state: audit.record(conn, who, "job.cancel", job.id, state))


@router.post(
    "/queue",
    summary="ComfyUI: delete pending prompts (`delete`: ids) or clear the caller's own (`clear`)",
    **EMPTY_ANSWER,
)
async def post_queue(request: Request) -> Response:
    svc, who = services(request), principal(request)
    body = await read_json(request)
    body = body if isinstance(body, dict) else {}
    pending = [j for j in await run_in_threadpool(active_jobs, svc, who) if j.state is JobState.queued]
    wanted = {str(i) for i in body.get("delete") or []} if isinstance(body.get("delete"), list) else set()
    for job in pending:
        if body.get("clear") is True or job.id in wanted:
            await run_in_threadpool(cancel, svc, who, job)
    return Response(status_code=200)


@router.post(
    "/interrupt",
    summary="ComfyUI: stop the caller's running prompt (or the one `prompt_id` names)",
    **EMPTY_ANSWER,
)
async def interrupt(request: Request) -> Response:
    svc, who = services(request), principal(request)
    body = await read_json(request)
    wanted = body.get("prompt_id") if isinstance(body, dict) else None
    running = [j for j in await run_in_threadpool(active_jobs, svc, who) if j.state is JobState.running]
    for job in running if wanted is None else [j for j in running if j.id == wanted]:
        await run_in_threadpool(cancel, svc, who, job)
    return Response(status_code=200)


# --- history ---------------------------------------------------------------------------------------------------------


def _hidden_key(who: Principal) -> str:
    return f"comfyui.history_hidden.{who.tenant}.{who.key_id or who.actor}"


def history(svc: Services, who: Principal, limit: int, only: str | None = None) -> dict[str, Any]:
    """The caller's finished ComfyUI prompts, newest first, less the ones it cleared."""
    hidden = SettingsKV(svc.store.engine).get(_hidden_key(who), {}) or {}
    before = hidden.get("before")
    if only is not None:
        try:
            listed = [visible_job(svc, who, only)]
        except NotFound:
            return {}
    else:
        listed = [j for j in svc.store.list(limit=MAX_HISTORY, tenant=who.tenant) if sees_job(who, j)]
    found: dict[str, Any] = {}
    for job in listed:
        if not views.spec(job) or not job.state.terminal or job.id in hidden.get("ids", []):
            continue
        if before and job.created_at.isoformat() <= before:
            continue
        found[job.id] = views.history_entry(job, svc.store.images_for(job.id))
        if len(found) >= limit:
            break
    return found


@router.get("/history", summary="ComfyUI: the caller's finished prompts")
def get_history(request: Request, max_items: int | None = None) -> dict[str, Any]:
    return history(services(request), principal(request), max(1, min(max_items or MAX_HISTORY, MAX_HISTORY)))


@router.get("/history/{prompt_id}", summary="ComfyUI: one finished prompt ({} while it runs)")
def get_history_item(request: Request, prompt_id: str) -> dict[str, Any]:
    return history(services(request), principal(request), 1, only=prompt_id)


@router.post(
    "/history",
    summary="ComfyUI: clear the caller's history (`clear`) or hide prompts (`delete`)",
    **EMPTY_ANSWER,
)
async def post_history(request: Request) -> Response:
    svc, who = services(request), principal(request)
    body = await read_json(request)
    body = body if isinstance(body, dict) else {}
    kv = SettingsKV(svc.store.engine)
    hidden = dict(await run_in_threadpool(kv.get, _hidden_key(who), {}) or {})
    if body.get("clear") is True:
        hidden = {"before": dt.datetime.now(dt.UTC).replace(tzinfo=None).isoformat(), "ids": []}
    if isinstance(body.get("delete"), list):
        hidden["ids"] = [*hidden.get("ids", []), *(str(i) for i in body["delete"])][-1000:]
    await run_in_threadpool(kv.set, _hidden_key(who), hidden)
    return Response(status_code=200)


# --- files -----------------------------------------------------------------------------------------------------------


@router.get("/view", summary="ComfyUI: an output image (darkroom image id) or an uploaded input")
def view(request: Request, filename: str, type: str = "output", subfolder: str = "") -> Response:  # noqa: A002
    svc, who = services(request), principal(request)
    if type == "input":
        try:
            data = Inputs(svc, who.tenant).read(full_name(filename, subfolder))
        except KeyError:
            raise NotFound(f"no file {filename!r}", field="filename") from None
        return Response(data, media_type=_media_type(data))
    image, _ = visible_image(svc, who, views.image_id(filename))  # another tenant's image: the same 404
    if not image.released:
        raise HeldForReview(f"image {filename} is held for review", field="filename")
    return Response(svc.blobs.get(image.blob_key), media_type=image.content_type)


def _media_type(data: bytes) -> str:
    if data[:4] == b"\x89PNG":
        return "image/png"
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    return "image/webp" if data[8:12] == b"WEBP" else "application/octet-stream"


async def _upload(request: Request) -> tuple[Any, bytes, str, str, bool]:
    try:
        form = await request.form()
    except Exception as exc:  # not multipart, or a malformed body
        raise InvalidRequest(f"expected multipart/form-data: {exc}", field="image") from None
    upload = form.get("image")
    if not isinstance(upload, UploadFile):
        raise InvalidRequest("an `image` file is required", field="image")
    limit = services(request).settings.limits.max_upload_bytes
    if upload.size is not None and upload.size > limit:
        raise PayloadTooLarge(f"image is larger than {limit} bytes", field="image")
    data = await upload.read()
    name = check_name(str(upload.filename or "image.png"), "image")
    subfolder = check_name(str(form.get("subfolder") or ""), "subfolder", allow_empty=True)
    if str(form.get("type") or "input") != "input":
        raise InvalidRequest("darkroom keeps uploads in the input folder (type input)", field="type")
    return form, data, name, subfolder, str(form.get("overwrite") or "").lower() in ("true", "1")


@router.post("/upload/image", summary="ComfyUI: upload an input image (multipart `image`, `subfolder`, `overwrite`)")
async def upload_image(request: Request) -> dict[str, Any]:
    svc, who = services(request), principal(request)
    _, data, name, subfolder, overwrite = await _upload(request)
    await run_in_threadpool(open_image, data, svc.settings.limits, "image")  # a real image within the limits
    kind = _media_type(data)
    stored = await run_in_threadpool(Inputs(svc, who.tenant).add, name, subfolder, data, kind, overwrite)
    return {"name": stored, "subfolder": subfolder, "type": "input"}


@router.post("/upload/mask", summary="ComfyUI: a mask's alpha put into an uploaded image (`original_ref`)")
async def upload_mask(request: Request) -> dict[str, Any]:
    svc, who = services(request), principal(request)
    form, data, name, subfolder, overwrite = await _upload(request)
    try:
        ref = json.loads(str(form.get("original_ref") or ""))
        original_name = full_name(check_name(str(ref["filename"]), "original_ref"), str(ref.get("subfolder") or ""))
    except (ValueError, KeyError, TypeError):
        raise InvalidRequest("original_ref must be JSON naming an uploaded input", field="original_ref") from None
    folder = Inputs(svc, who.tenant)
    try:
        original = await run_in_threadpool(folder.read, original_name)
    except KeyError:
        raise InvalidRequest(f"original_ref: no input {original_name!r}", field="original_ref") from None
    limits = svc.settings.limits

    def merge() -> bytes:
        base = open_image(original, limits, "original_ref").convert("RGBA")
        mask = open_image(data, limits, "image").convert("RGBA").resize(base.size, Image.Resampling.LANCZOS)
        base.putalpha(mask.getchannel("A"))
        return png_bytes(base)

    merged = await run_in_threadpool(merge)
    stored = await run_in_threadpool(folder.add, name, subfolder, merged, "image/png", overwrite)
    return {"name": stored, "subfolder": subfolder, "type": "input"}


# --- models, nodes, system -------------------------------------------------------------------------------------------

T = TypeVar("T", AdapterInfo, ControlNetInfo)
MODEL_FOLDERS = ("checkpoints", "loras", "vae", "controlnet", "upscale_models", "embeddings")


def folder_listing(svc: Services, who: Principal, policy: TenantPolicy) -> dict[str, list[str]]:
    """What the model folders hold for this caller: as the native and A1111 listings, only the models its tenant may
    use (`models.access`) whose file is approved, so no tenant learns another's private model names here either."""
    registry = svc.registry

    def offered(kind: str, items: Iterable[T]) -> list[T]:
        return model_access.offered(svc, policy, kind, items, _name, _sha)

    upscalers = registry.upscaler_files()
    return {
        "checkpoints": [m.id for m in model_access.offered_checkpoints(svc, policy)],
        "loras": [a.relpath for a in offered("lora", registry.loras())],
        "vae": [],
        "controlnet": [c.relpath for c in offered("controlnet", registry.controlnets())],
        "upscale_models": sorted(p.name for n, p in upscalers.items() if model_access.may_use(policy, "upscaler", n)),
        "embeddings": [a.name for a in offered("embedding", registry.embeddings())],
        "input": sorted(Inputs(svc, who.tenant).names()),
    }


def _name(item: AdapterInfo | ControlNetInfo) -> str:
    return item.name


def _sha(item: AdapterInfo | ControlNetInfo) -> str:
    return item.sha256


@router.get("/models", summary="ComfyUI: the model folders")
def model_folders() -> list[str]:
    return list(MODEL_FOLDERS)


@router.get("/models/{folder}", summary="ComfyUI: the files of a model folder")
def model_folder(request: Request, folder: str) -> list[str]:
    if folder not in MODEL_FOLDERS:
        raise NotFound(f"no model folder {folder!r} ({', '.join(MODEL_FOLDERS)})", field="folder")
    return folder_listing(services(request), principal(request), tenant_policy(request))[folder]


@router.get("/object_info", summary="ComfyUI: the node classes darkroom compiles")
def object_info(request: Request) -> dict[str, Any]:
    return nodes.definitions(folder_listing(services(request), principal(request), tenant_policy(request)))


@router.get("/object_info/{node_class}", summary="ComfyUI: one node class")
def object_info_one(request: Request, node_class: str) -> dict[str, Any]:
    found = nodes.definitions(folder_listing(services(request), principal(request), tenant_policy(request)))
    return {node_class: found[node_class]} if node_class in found else {}


@router.get("/embeddings", summary="ComfyUI: textual-inversion embeddings by name")
def embeddings(request: Request) -> list[str]:
    return [a.name for a in services(request).registry.embeddings()]


@router.get("/system_stats", summary="ComfyUI: the server (devices are the workers' business)")
def system_stats() -> dict[str, Any]:
    return {
        "system": {
            "os": platform.system().lower(),
            "python_version": platform.python_version(),
            "embedded_python": False,
            "comfyui_version": f"darkroom {__version__}",
            "pytorch_version": "",
            "argv": [],
            "ram_total": 0,
            "ram_free": 0,
        },
        "devices": [],
    }


@socket_router.websocket("/ws")
async def websocket(websocket: WebSocket) -> None:
    """ComfyUI's event stream for `clientId` (see ws.py). Keys as on every WebSocket: header (Bearer or Basic) or
    `?api_key=`."""
    who = await websocket_principal(websocket, Permission.generate)
    if who is None:
        return
    await websocket.accept()
    svc: Services = websocket.app.state.services
    client_id = websocket.query_params.get("clientId") or websocket.query_params.get("client_id") or ""
    await hub_for(svc, websocket.app.state).serve(Socket(websocket, who, client_id[:200]))
