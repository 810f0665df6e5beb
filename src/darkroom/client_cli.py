"""The client commands, `darkroom generate` and `darkroom jobs list|show|cancel`: everything through the HTTP API
(darkroom.client), so they work against any server the user can reach, with nothing but httpx and rich.

`generate` follows the job's Server-Sent Events on a thread; while the job waits in the queue nothing happens on that
stream, so the job's view (queue position, ETA) is re-read every `QUEUED_REFRESH_SECONDS` until it starts. On a
terminal that shows as a live progress bar; piped (a log, CI) each change of status is one line on stderr."""

from __future__ import annotations

import datetime as dt
import json
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from darkroom.client import TERMINAL_STATES, ApiError, Client

QUEUED_REFRESH_SECONDS = 1.0

jobs_app = typer.Typer(help="Jobs on a running server: list, show, cancel.", no_args_is_help=True)
console = Console(stderr=True, soft_wrap=True)

Url = Annotated[str, typer.Option(envvar="DARKROOM_URL", help="server base URL")]
ApiKey = Annotated[str | None, typer.Option(envvar="DARKROOM_API_KEY", help="API key (dk_…)")]
AsJson = Annotated[bool, typer.Option("--json", help="print the API's JSON")]
DEFAULT_URL = "http://127.0.0.1:8000"


def register(app: typer.Typer) -> None:
    app.add_typer(jobs_app, name="jobs")


# --- generate -------------------------------------------------------------------------------------------------------


def output_paths(output: Path, count: int) -> list[Path]:
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i + 1}{output.suffix}") for i in range(count)]


class Status:
    """What `generate` shows while it waits: a live bar on a terminal, else one line per change of description."""

    def __init__(self, out: Console) -> None:
        self.out = out
        self.bar: Progress | None = None
        self.description = ""
        if out.is_terminal:
            columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"))
            self.bar = Progress(*columns, TimeElapsedColumn(), TimeRemainingColumn(), console=out)
            self.task = self.bar.add_task("", total=None)

    def __enter__(self) -> Status:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def update(self, description: str, completed: int | None = None, total: int | None = None) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=description, completed=completed, total=total)
        elif description != self.description:
            self.out.print(description, highlight=False)
        self.description = description


def run_generate(
    url: str, body: dict[str, Any], output: Path, api_key: str | None = None, out: Console | None = None
) -> list[tuple[Path, dict[str, Any]]]:
    """Submit, show queue position / ETA / steps, download. Returns each saved path with its image view (seed …)
    and, as `model`, the model that made it."""
    with _errors_as_runtime(url), Client(url, api_key=api_key) as client:
        job = client.submit(body)
        try:
            with Status(out or console) as status:
                job = _follow(client, job, status)
        except KeyboardInterrupt:
            console.print(f"job {job['id']} goes on on the server; `darkroom jobs cancel {job['id']}` stops it")
            raise
        if job["state"] != "succeeded":
            error = job.get("error") or {}
            raise RuntimeError(f"job {job['id']} {job['state']}: {error.get('message', '')}")
        model = ((job.get("provenance") or {}).get("model") or {}).get("id") or job["request"].get("model") or "?"
        saved = []
        for path, image in zip(output_paths(output, len(job["images"])), job["images"], strict=True):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(client.image(image["id"]))
            saved.append((path, {**image, "model": model}))
        return saved


def _follow(client: Client, job: dict[str, Any], status: Status) -> dict[str, Any]:
    """Until the job ends: events from a thread; while queued, the job view again every second for its place."""
    events: queue.Queue[dict[str, Any] | BaseException] = queue.Queue()
    status.update(_queued_text(job))
    state = job["state"]
    streaming = False
    while state not in TERMINAL_STATES:
        if not streaming:  # at first, and again should the server close a stream before the end
            threading.Thread(target=_pump, args=(client, job["id"], events), daemon=True, name="sse").start()
            streaming = True
        try:
            event = events.get(timeout=QUEUED_REFRESH_SECONDS if state == "queued" else None)
        except queue.Empty:
            event = {"type": "refresh"}
        if isinstance(event, BaseException):
            raise event
        if event["type"] in ("refresh", "end"):
            streaming = event["type"] != "end"
            job = client.job(job["id"])
            state = job["state"]
            if state == "queued":
                status.update(_queued_text(job))
            continue
        state = _show_event(status, job["id"], event, state)
    return client.job(job["id"])


def _pump(client: Client, job_id: str, out: queue.Queue[dict[str, Any] | BaseException]) -> None:
    try:
        for event in client.events(job_id):
            out.put(event)
    except BaseException as exc:  # handed to the main thread, which raises it
        out.put(exc)
    else:
        out.put({"type": "end"})


def _show_event(status: Status, job_id: str, event: dict[str, Any], state: str) -> str:
    """Show one event; returns the job's state as the events tell it."""
    kind = event["type"]
    if kind == "progress":
        status.update(f"{job_id} running", completed=event["step"], total=event["total"])
        return "running"
    if kind == "started":
        status.update(f"{job_id} running")
        return "running"
    if kind in ("requeued", "retrying"):
        status.update(f"{job_id} {kind}", completed=0)
        return "queued"
    if kind in TERMINAL_STATES:
        status.update(f"{job_id} {kind}")
        return kind
    return state


def _queued_text(job: dict[str, Any]) -> str:
    position, eta = job.get("queue_position"), job.get("eta_seconds")
    if job["state"] != "queued":
        return f"{job['id']} {job['state']}"
    place = f"#{position} in queue" if position is not None else "in queue"
    if position is not None and position > 1000:
        place = "more than 1000 ahead"
    return f"{job['id']} queued, {place}, ETA " + (_duration(eta) if eta is not None else "unknown")


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


@contextmanager
def _errors_as_runtime(url: str) -> Iterator[None]:
    """API and connection errors become one-line RuntimeErrors the commands print."""
    try:
        yield
    except ApiError as exc:
        raise RuntimeError(str(exc)) from None
    except httpx.HTTPError as exc:
        raise RuntimeError(f"cannot reach {url}: {exc}") from None


@contextmanager
def _command(url: str, api_key: str | None) -> Iterator[Client]:
    """A client for one command; an error is printed in red and exits 1."""
    try:
        with _errors_as_runtime(url), Client(url, api_key=api_key) as client:
            yield client
    except RuntimeError as exc:
        console.print(f"[red]{exc}[/red]", highlight=False)
        raise typer.Exit(1) from None


# --- jobs -----------------------------------------------------------------------------------------------------------


@jobs_app.command("list")
def jobs_list(
    state: Annotated[str | None, typer.Option(help="queued | running | succeeded | failed | cancelled | dead")] = None,
    limit: Annotated[int, typer.Option(min=1, max=500, help="most jobs shown, newest first")] = 20,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Recent jobs of the key's tenant (a user key: its own), newest first."""
    params: dict[str, Any] = {"limit": limit, **({"state": state} if state else {})}
    with _command(url, api_key) as client:
        jobs = client.request("GET", "/v1/jobs", params=params).json()
    if as_json:
        typer.echo(json.dumps(jobs, indent=2))
        return
    rows: list[tuple[str, ...]] = [("ID", "STATE", "CREATED", "WHERE", "MODEL", "PROMPT")]
    rows += [
        (j["id"], j["state"], _when(j["created_at"]), _where(j), _model_of(j), (j["request"].get("prompt") or "")[:40])
        for j in jobs
    ]
    typer.echo(_columns(rows))
    if not jobs:
        console.print("no jobs")


def _columns(rows: list[tuple[str, ...]]) -> str:
    """Plain aligned columns, never cut (job ids are copied from here); the last column runs on."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(row, widths, strict=False)), row[-1]]) for row in rows)


@jobs_app.command("show")
def jobs_show(job_id: str, url: Url = DEFAULT_URL, api_key: ApiKey = None, as_json: AsJson = False) -> None:
    """One job: state, queue position and ETA, progress, images (seed each), error."""
    with _command(url, api_key) as client:
        job = client.job(job_id)
    if as_json:
        typer.echo(json.dumps(job, indent=2))
        return
    lines = [
        f"job      {job['id']}",
        f"state    {job['state']} ({_where(job)})",
        f"model    {_model_of(job)}",
        f"prompt   {job['request'].get('prompt', '')}",
        f"created  {_when(job['created_at'])}   attempts {job['attempts']}",
    ]
    lines += [f"image    {image['id']}  seed {image['seed']}  {image['url'] or '(held)'}" for image in job["images"]]
    if job.get("error"):
        lines.append(f"error    {job['error']['code']}: {job['error']['message']}")
    typer.echo("\n".join(lines))


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """Cancel a job: a queued one at once, a running one at its next step."""
    with _command(url, api_key) as client:
        job = client.cancel(job_id)
    typer.echo(f"{job['id']} {job['state']}")


def _where(job: dict[str, Any]) -> str:
    """Queue place and ETA while queued, steps while running, image count at the end."""
    if job["state"] == "queued":
        return _queued_text(job).split(" queued, ", 1)[-1]
    if job["state"] == "running":
        return f"step {job['progress']['step']}/{job['progress']['total']}"
    if job["state"] == "succeeded":
        return f"{len(job['images'])} image(s)"
    return job["state"]


def _model_of(job: dict[str, Any]) -> str:
    return str(((job.get("provenance") or {}).get("model") or {}).get("id") or job["request"].get("model") or "-")


def _when(value: str) -> str:
    return dt.datetime.fromisoformat(value).strftime("%Y-%m-%d %H:%M:%S")
