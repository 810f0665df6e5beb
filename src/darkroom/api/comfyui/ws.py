"""ComfyUI's `/ws?clientId=` WebSocket, driven by job events.

Each process keeps its open sockets by client id. A job submitted through `POST /prompt` is followed by one task in
that process, woken by the change feed (`api.waiting.job_events`, no polling), which turns the job's events into
ComfyUI's messages for the sockets of the job's `client_id` (every socket of the caller's tenant that may see the
job, when the workflow came without one, as ComfyUI broadcasts): `execution_start`, `executing`, `progress` (and
binary preview frames when previews were asked for), `executed` with the output images, `execution_success`,
`execution_error`, `execution_interrupted`, and `status` with the caller's queue length. A socket that connects
later follows the caller's queued and running jobs of its client id the same way.

Messages for a client with no open socket are dropped, as ComfyUI drops them: clients read `/history` for results.
With several API processes behind one address, a socket hears of the jobs its own process queued and of those already
queued or running when it connected; a job queued through another process after that is not announced on it (its
`/history` entry is there all the same).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import WebSocket
from fastapi.concurrency import run_in_threadpool

from darkroom.auth.principal import Principal
from darkroom.jobs.store import JobRecord
from darkroom.schemas import JobEvent
from darkroom.service import Services

from .. import waiting
from ..a1111 import waiting_jobs
from ..auth import sees_job
from . import views

log = logging.getLogger("darkroom.api.comfyui")
PREVIEW_IMAGE = 1  # ComfyUI's binary event type
PREVIEW_FORMAT = {"jpeg": 1, "png": 2}


@dataclass(eq=False)
class Socket:
    websocket: WebSocket
    who: Principal
    client_id: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def send(self, message: dict[str, Any] | bytes) -> None:
        async with self.lock:  # one frame at a time: followers of several jobs share the socket
            with contextlib.suppress(Exception):  # a socket that went away is dropped by its own handler
                if isinstance(message, bytes):
                    await self.websocket.send_bytes(message)
                else:
                    await self.websocket.send_json(message)


class Hub:
    """This process's ComfyUI sockets and the jobs it follows for them."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self.sockets: set[Socket] = set()
        self.following: dict[str, asyncio.Task[None]] = {}

    def listeners(self, job: JobRecord) -> list[Socket]:
        client = views.spec(job).get("client_id")
        return [s for s in self.sockets if (not client or s.client_id == client) and sees_job(s.who, job)]

    def follow(self, job: JobRecord) -> None:
        """Turn `job`'s events into messages until it ends (once per process, whoever asks)."""
        if job.id not in self.following and not job.state.terminal:
            task = asyncio.get_running_loop().create_task(self._follow(job))
            self.following[job.id] = task
            task.add_done_callback(lambda _: self.following.pop(job.id, None))

    async def _follow(self, job: JobRecord) -> None:
        try:
            async with contextlib.aclosing(waiting.job_events(self.svc, job.id, 0)) as events:
                async for event in events:
                    if event is not None:
                        await self._deliver(job, event)
        except Exception:
            log.exception("following job %s for ComfyUI sockets failed", job.id)

    async def _deliver(self, job: JobRecord, event: JobEvent) -> None:
        if event.type in ("queued", "requeued", "retrying"):
            return
        sockets = self.listeners(job)
        if not sockets and event.type not in waiting.TERMINAL_EVENTS:
            return
        if event.type in waiting.TERMINAL_EVENTS:
            job = await run_in_threadpool(self.svc.store.require, job.id)
            sockets = self.listeners(job)
        for message in await self._messages(job, event):
            for socket in sockets:
                await socket.send(message)
        if event.type in waiting.TERMINAL_EVENTS:
            for socket in sockets:
                await socket.send(await self.status(socket))

    async def _messages(self, job: JobRecord, event: JobEvent) -> list[dict[str, Any] | bytes]:
        workflow = views.spec(job)
        pid = job.id
        node = workflow.get("sampler_node") or next(iter(workflow.get("outputs", [])), None)
        now = int(time.time() * 1000)
        if event.type == "started":
            return [
                _msg("execution_start", prompt_id=pid, timestamp=now),
                _msg("execution_cached", nodes=[], prompt_id=pid, timestamp=now),
                _msg("executing", node=node, display_node=node, prompt_id=pid),
            ]
        if event.type == "progress":
            data = event.data
            out: list[dict[str, Any] | bytes] = [
                _msg("progress", value=data.get("step", 0), max=data.get("total", 0), prompt_id=pid, node=node)
            ]
            if data.get("preview") and job.request.get("preview"):
                out.append(preview_frame(str(data["preview"])))
            return out
        if event.type == "succeeded":
            images = await run_in_threadpool(self.svc.store.images_for, job.id)
            done = views.outputs(job, images)
            out = []
            for output, result in done.items():
                out += [
                    _msg("executing", node=output, display_node=output, prompt_id=pid),
                    _msg("executed", node=output, display_node=output, output=result, prompt_id=pid),
                ]
            return [
                *out,
                _msg("execution_success", prompt_id=pid, timestamp=now),
                _msg("executing", node=None, prompt_id=pid),
            ]
        if event.type == "cancelled":
            graph = workflow.get("prompt", {})
            kind = graph.get(node, {}).get("class_type") if node else None
            interrupted = _msg(
                "execution_interrupted", prompt_id=pid, node_id=node, node_type=kind, executed=[], timestamp=now
            )
            return [interrupted, _msg("executing", node=None, prompt_id=pid)]
        if event.type in waiting.TERMINAL_EVENTS:  # failed, dead
            return [{"type": "execution_error", "data": views.error(job)}, _msg("executing", node=None, prompt_id=pid)]
        return []  # a cancel asked for, a retry queued, …: nothing ComfyUI shows (it ended no prompt)

    async def status(self, socket: Socket, sid: bool = False) -> dict[str, Any]:
        """`status`: the caller's queued and running jobs (its own queue: never other tenants')."""
        remaining = await run_in_threadpool(waiting_jobs, self.svc, socket.who)
        data: dict[str, Any] = {"status": {"exec_info": {"queue_remaining": remaining}}}
        if sid:
            data["sid"] = socket.client_id
        return {"type": "status", "data": data}

    async def serve(self, socket: Socket) -> None:
        """A connected socket: greet it, follow the caller's jobs for its client id, and hold it until it closes."""
        try:
            await socket.send(await self.status(socket, sid=True))
            # Only now does it hear other jobs' messages: a ComfyUI client takes its sid from the first message,
            # which a job ending while the greeting was being read would otherwise have been.
            self.sockets.add(socket)
            for job in await run_in_threadpool(active_jobs, self.svc, socket.who):
                if views.spec(job).get("client_id") in (None, socket.client_id):
                    self.follow(job)
            while True:  # ComfyUI's clients may send messages (feature flags); nothing in them changes the stream
                await socket.websocket.receive_text()
        except Exception:
            return
        finally:
            self.sockets.discard(socket)


def active_jobs(svc: Services, who: Principal) -> list[JobRecord]:
    """The caller's queued and running jobs submitted through the ComfyUI API, oldest first."""
    from darkroom.schemas import JobState

    found: list[JobRecord] = []
    for state in (JobState.running, JobState.queued):
        listed = svc.store.list(state=state, limit=200, tenant=who.tenant)
        found += [job for job in listed if views.spec(job) and sees_job(who, job)]
    return sorted(found, key=lambda job: job.created_at)


def preview_frame(preview: str) -> bytes:
    """ComfyUI's binary preview: event type 1, image format (1 JPEG, 2 PNG), then the image bytes."""
    header, _, data = preview.partition(",") if preview.startswith("data:") else ("", "", preview)
    raw = base64.b64decode(data)
    fmt = PREVIEW_FORMAT["png"] if ("png" in header or raw[:4] == b"\x89PNG") else PREVIEW_FORMAT["jpeg"]
    return PREVIEW_IMAGE.to_bytes(4, "big") + fmt.to_bytes(4, "big") + raw


def _msg(kind: str, **data: Any) -> dict[str, Any]:
    return {"type": kind, "data": data}


def hub_for(svc: Services, app_state: Any) -> Hub:
    hub = getattr(app_state, "comfyui_hub", None)
    if hub is None:
        hub = Hub(svc)
        app_state.comfyui_hub = hub
    return hub
