"""`darkroom serve | worker | generate | models`."""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from darkroom import __version__, heap
from darkroom.cli_admin import register as register_admin_commands
from darkroom.cli_cost import register as register_cost_commands
from darkroom.cli_demo import register as register_demo_commands
from darkroom.cli_engines import register as register_engine_commands
from darkroom.client_cli import register as register_client_commands
from darkroom.config import ConfigFileError, Settings, command_settings, data_dir_origin, record_data_dir
from darkroom.extras import MissingExtra
from darkroom.observability import tracing
from darkroom.observability.logging import FORMAT_ENV
from darkroom.observability.logging import setup as setup_logging

app = typer.Typer(help="darkroom: self-hosted image generation.", no_args_is_help=True, add_completion=False)
models_app = typer.Typer(help="List and add models.", no_args_is_help=True)
app.add_typer(models_app, name="models")
retention_app = typer.Typer(help="Retention: delete expired images, redact expired prompts.", no_args_is_help=True)
app.add_typer(retention_app, name="retention")
register_admin_commands(app)
register_cost_commands(app)
register_demo_commands(app)
register_engine_commands(app)
register_client_commands(app)
console = Console(stderr=True, soft_wrap=True)

DataDir = Annotated[Path | None, typer.Option("--data-dir", help="data folder [env DARKROOM_DATA_DIR]")]
DbUrl = Annotated[str | None, typer.Option("--database-url", help="SQLAlchemy URL [env DARKROOM_DATABASE_URL]")]
ModelsDir = Annotated[Path | None, typer.Option("--models-dir", help="models folder [env DARKROOM_MODELS_DIR]")]
LogFormatOption = Annotated[
    str | None,
    typer.Option("--log-format", help="text | json (ids on every line, access lines) [env DARKROOM_LOG_FORMAT]"),
]


def settings_from(**flags: Any) -> Settings:
    """Flags given on the command line, then env, then darkroom.toml (darkroom.config); with none of them setting a
    data dir and no ./darkroom-data here, the one `darkroom serve` recorded. A bad setting exits 2, naming it."""
    from pydantic import ValidationError

    try:
        settings, origin = command_settings(**flags)
    except (ValidationError, ConfigFileError) as exc:
        console.print(f"[red]{exc}[/red]", highlight=False)
        raise typer.Exit(2) from None
    if origin.startswith("recorded"):
        console.print(f"data dir {settings.data_dir} ({origin})", highlight=False)
    return settings


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="bind address [env DARKROOM_HOST]")] = None,
    port: Annotated[int | None, typer.Option(help="port [env DARKROOM_PORT]")] = None,
    data_dir: DataDir = None,
    database_url: DbUrl = None,
    models_dir: ModelsDir = None,
    workers: Annotated[int | None, typer.Option(help="in-process workers; 0 for an API-only node")] = None,
    devices: Annotated[
        str | None,
        typer.Option(help="a worker process per device: cuda:0,cuda:1 or all (more --workers become its threads)"),
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="without API keys, answer unauthenticated requests off loopback too")
    ] = False,
    threads: Annotated[
        int | None, typer.Option(min=1, help="request threads for sync handlers [env DARKROOM_SERVER__REQUEST_THREADS]")
    ] = None,
    max_in_flight: Annotated[
        int | None,
        typer.Option(min=1, help="requests at once before an immediate 429 [env DARKROOM_SERVER__MAX_IN_FLIGHT]"),
    ] = None,
    api_processes: Annotated[
        int | None,
        typer.Option(min=1, help="processes answering the API on one socket [env DARKROOM_SERVER__API_PROCESSES]"),
    ] = None,
    listen_fd: Annotated[
        int | None, typer.Option(hidden=True, help="an extra API process: answer on this socket")
    ] = None,
    log_level: str = "info",
    log_format: LogFormatOption = None,
) -> None:
    """Run the API (and in-process workers). Without API keys it answers only on a loopback address."""
    import uvicorn

    replica = listen_fd is not None  # started by another `serve` (darkroom.api.processes): requests only
    _logging(log_level, "api" if replica else "serve", log_format)  # first: it quiets the libraries
    from darkroom.api import wire
    from darkroom.api.app import create_app
    from darkroom.service import Services
    from darkroom.worker.processes import die_with_parent

    if replica:
        die_with_parent()

    settings = _serve_settings(
        host=host, port=port, data_dir=data_dir, database_url=database_url, models_dir=models_dir, workers=workers
    )
    if log_format is None and settings.log_format != os.environ.get(FORMAT_ENV):  # set in darkroom.toml
        setup_logging(log_level, "serve", settings.log_format)
    tracing.configure(settings, "api")  # OTLP spans when observability.otlp_endpoint is set (`tracing` extra)
    from darkroom.observability import metrics

    if not replica:  # a replica writes to the primary's folder (inherited through the environment)
        metrics.multiprocess(settings.data_dir / "metrics")  # one /metrics for this server and its child processes
    if devices is not None:
        _pin_devices(settings, devices, workers_given=workers is not None)
    if insecure:
        settings.security.insecure = True
    if threads is not None:
        settings.server.request_threads = threads
    if max_in_flight is not None:
        settings.server.max_in_flight = max_in_flight
    if api_processes is not None:
        settings.server.api_processes = api_processes
    _validate_hooks(settings, output_checker=settings.workers > 0)
    services = Services.open(settings)
    if not replica and not (_bootstrap(services) and _access_check(services)):
        services.close()
        raise typer.Exit(2)
    if settings.workers > 0:
        services.ensure_default_model()
    services.approve_models()
    api = create_app(
        services, workers=settings.workers, worker_processes=settings.worker_processes, background=not replica
    )
    config = uvicorn.Config(  # uvicorn's lines in darkroom's format (observability.logging); no line per request
        api,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
        http=wire.protocol_class(),  # one socket write per answer (api/wire.py)
    )
    server = uvicorn.Server(config)
    if not replica:
        processes = settings.server.api_processes
        console.print(
            f"darkroom {__version__} on http://{settings.host}:{settings.port} ({settings.workers} worker(s)"
            + (f", {processes} API processes" if processes > 1 else "")
            + "; API docs at /docs)",
            highlight=False,
        )
    heap.settle()  # what start-up made lives as long as the process: full collections need not walk it
    if replica:
        server.run(sockets=[socket.socket(fileno=listen_fd)])
    elif settings.server.api_processes > 1:
        from darkroom.api.processes import ApiReplicas

        sock = config.bind_socket()
        replicas = ApiReplicas(settings, sock, settings.server.api_processes - 1, log_level).start()
        try:
            server.run(sockets=[sock])
        finally:
            replicas.stop()
    else:
        server.run()
    services.close()


def _logging(level: str, role: str, fmt: str | None) -> None:
    """Logging for a long-running command; a bad --log-format exits 2, naming it."""
    try:
        setup_logging(level, role, fmt)
    except ValueError as exc:
        console.print(f"[red]--log-format: {exc}[/red]", highlight=False)
        raise typer.Exit(2) from None


def _pin_devices(settings: Settings, devices: str, *, workers_given: bool) -> None:
    """`serve --devices`: a worker process per device (`all`: every GPU); without --workers, one worker each."""
    from darkroom.worker.processes import resolve_devices

    settings.devices = resolve_devices([d.strip() for d in devices.split(",") if d.strip()])
    if not workers_given:
        settings.workers = len(settings.devices)
    settings.worker_processes = True


def _serve_settings(**flags: Any) -> Settings:
    """The server's settings; its data dir is logged with where it came from and recorded for later commands."""
    from pydantic import ValidationError

    try:
        settings = Settings(**{k: v for k, v in flags.items() if v is not None})
        origin = data_dir_origin(flag=flags.get("data_dir") is not None)
    except (ValidationError, ConfigFileError) as exc:
        console.print(f"[red]{exc}[/red]", highlight=False)
        raise typer.Exit(2) from None
    logging.getLogger("darkroom").info("data dir %s (from %s)", settings.data_dir, origin)
    if origin in ("default", "--data-dir"):  # found by nothing else: `darkroom models list` elsewhere uses this
        record_data_dir(settings)
    return settings


def _validate_hooks(settings: Settings, *, output_checker: bool) -> None:
    """A misconfigured prompt classifier or output checker (or, where workers run, preview decoder) stops the
    process now, naming the setting."""
    from darkroom.engines.preview_decoder import check_preview_decoders
    from darkroom.safety.policy import validate_hooks

    try:
        validate_hooks(settings, output_checker=output_checker)
        if output_checker:  # this process runs workers, which decode the previews
            check_preview_decoders(settings)
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


def _bootstrap(services: Any) -> bool:
    """Register the keys handed over in settings (`security.bootstrap_admin_key`, `…_metrics_key`); False on a bad
    one (said in red)."""
    from darkroom.auth.principal import Role
    from darkroom.errors import DarkroomError

    security = services.settings.security
    for role, secret in ((Role.admin, security.bootstrap_admin_key), (Role.metrics, security.bootstrap_metrics_key)):
        if secret is None:
            continue
        try:
            key = services.keys.bootstrap(secret.get_secret_value(), role)
        except DarkroomError as exc:
            console.print(f"[red]{exc.message}[/red]")
            return False
        if key is not None:
            console.print(f"registered the bootstrap {role.value} key {key.id}")
    return True


def _access_check(services: Any) -> bool:
    """Secure by default: say who may call, and refuse to open an unauthenticated API beyond loopback."""
    from darkroom.api.auth import is_loopback

    settings = services.settings
    if services.keys.any_keys():
        console.print(f"API keys required ({len(services.keys.list())} active); manage them with `darkroom keys`")
        return True
    if is_loopback(settings.host):
        console.print(
            f"no API keys: unauthenticated requests are accepted because {settings.host} is a loopback address. "
            "Create a key (`darkroom keys create --role admin`) before exposing the service."
        )
        return True
    if settings.security.insecure:
        console.print(
            f"[yellow]--insecure: no API keys, and {settings.host} is not loopback: ANYONE who reaches this port "
            "can generate, read every job and administer the service.[/yellow]"
        )
        return True
    console.print(
        f"[red]refusing to start: no API keys exist and {settings.host} is not a loopback address, so anyone on the "
        "network could use and administer the service. Create a key first (`darkroom keys create --role admin`), "
        "bind to 127.0.0.1, or pass --insecure on a closed network.[/red]"
    )
    return False


def _yield_cpu_to_the_api(settings: Settings) -> None:
    """A worker denoising on the CPU shares the cores the API answers on. Measured with 200 clients and one such
    worker on two cores (`bench/load.py`, four alternated pairs of 30 s runs), the worker at nice 10 held accepted
    submits to a p99 of 87-104 ms, against 97-164 ms at the API's priority, with as many accepted; the images wait
    in the queue either way. A GPU's worker keeps its priority: its CPU work is what feeds the device."""
    if settings.cpu_worker_nice <= 0:
        return
    from darkroom.engines.diffusers_engine import resolve_device

    try:
        device = resolve_device(settings.device)
    except ValueError:
        return  # the engine reports it
    if device == "cpu":
        os.nice(settings.cpu_worker_nice)


@app.command()
def worker(
    data_dir: DataDir = None,
    database_url: DbUrl = None,
    models_dir: ModelsDir = None,
    worker_id: Annotated[str | None, typer.Option(help="stable id; default host:pid")] = None,
    metrics_port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="serve this worker's Prometheus metrics on this port")
    ] = None,
    metrics_host: Annotated[str, typer.Option(help="address for --metrics-port (no auth: keep it private)")] = (
        "127.0.0.1"
    ),
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N, mps (default: the settings' device)")] = None,
    threads: Annotated[int, typer.Option(min=1, help="worker loops sharing this process's engine")] = 1,
    log_level: str = "info",
    log_format: LogFormatOption = None,
) -> None:
    """Run one worker process against the service's database and data dir."""
    _logging(log_level, "worker", log_format)  # first: it quiets the libraries before they are imported
    from darkroom.service import Services
    from darkroom.worker.loop import Worker
    from darkroom.worker.processes import die_with_parent

    die_with_parent()  # a child of `darkroom serve` goes when the server goes

    if os.environ.get("DARKROOM_WORKER_PARENT"):  # a child of `darkroom serve` (worker.processes.PARENT_ENV),
        logging.getLogger("darkroom.models.registry").setLevel(logging.WARNING)  # which listed the models already
    settings = settings_from(data_dir=data_dir, database_url=database_url, models_dir=models_dir, worker_id=worker_id)
    if device is not None:
        settings.device = device
    if log_format is None and settings.log_format != os.environ.get(FORMAT_ENV):  # set in darkroom.toml
        setup_logging(log_level, "worker", settings.log_format)
    tracing.configure(settings, "worker")
    _validate_hooks(settings, output_checker=True)
    from darkroom.models.registry import ModelRegistry

    services = Services.open(settings)
    services.registry.rescan_seconds = ModelRegistry.SERVICE_RESCAN_SECONDS  # a job looks at most once a second
    _yield_cpu_to_the_api(settings)
    services.ensure_default_model()
    if metrics_port is not None:
        from darkroom.observability import metrics

        metrics.serve_worker_endpoint(metrics_port, metrics_host)
    if threads > 1:
        _worker_threads(services, threads)
        return
    loop = Worker(settings, services.store, services.blobs, services.make_engine, registry=services.registry)

    def _drain(signum: int, _frame: object) -> None:
        console.print(f"worker: signal {signum}: draining (the current job gets {settings.drain_seconds} s to finish)")
        loop.begin_drain()

    signal.signal(signal.SIGTERM, _drain)
    signal.signal(signal.SIGINT, _drain)
    heap.settle()  # torch, diffusers and the rest of start-up live as long as the process (darkroom.heap)
    loop.run()
    services.store.close()


def _worker_threads(services: Any, threads: int) -> None:
    """`darkroom worker --threads N`: N supervised worker loops sharing one engine, drained on SIGTERM/SIGINT."""
    import threading

    stop = threading.Event()

    def _drain(signum: int, _frame: object) -> None:
        console.print(f"worker: signal {signum}: draining (running jobs get {services.settings.drain_seconds} s)")
        stop.set()

    signal.signal(signal.SIGTERM, _drain)
    signal.signal(signal.SIGINT, _drain)
    services.start_workers(threads)
    while not stop.wait(1.0):
        pass
    services.close()


@app.command()
def generate(
    prompt: str,
    output: Annotated[Path, typer.Option("-o", "--output", help="PNG path; with n>1, -1, -2 … are added")] = Path(
        "out.png"
    ),
    url: Annotated[str, typer.Option(envvar="DARKROOM_URL", help="server base URL")] = "http://127.0.0.1:8000",
    api_key: Annotated[str | None, typer.Option(envvar="DARKROOM_API_KEY", help="API key (dk_…)")] = None,
    negative_prompt: Annotated[str | None, typer.Option("--negative", "-N")] = None,
    width: int | None = None,
    height: int | None = None,
    steps: int | None = None,
    guidance_scale: Annotated[float | None, typer.Option("--guidance", "--cfg")] = None,
    sampler: str | None = None,
    seed: int | None = None,
    n: int | None = None,
    model: str | None = None,
    init_image: Annotated[Path | None, typer.Option(help="img2img source image")] = None,
    strength: float | None = None,
    priority: str | None = None,
) -> None:
    """Generate on a running server, showing queue position, ETA and steps; prints each image's path, seed, model."""
    body: dict[str, Any] = {
        k: v
        for k, v in dict(
            prompt=prompt,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            steps=steps,
            guidance_scale=guidance_scale,
            sampler=sampler,
            seed=seed,
            n=n,
            model=model,
            strength=strength,
            priority=priority,
        ).items()
        if v is not None
    }
    if init_image:
        body["init_image"] = base64.b64encode(init_image.read_bytes()).decode()
    from darkroom.client_cli import run_generate

    try:
        saved = run_generate(url, body, output, api_key=api_key, out=console)
    except RuntimeError as exc:
        console.print(f"[red]{exc}[/red]", highlight=False)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    for path, image in saved:
        typer.echo(f"{path}  seed {image['seed']}  model {image['model']}")


@models_app.command("list")
def models_list(models_dir: ModelsDir = None, data_dir: DataDir = None, as_json: bool = False) -> None:
    """Models in the models dir."""
    from darkroom.models.registry import ModelRegistry

    settings = settings_from(models_dir=models_dir, data_dir=data_dir)
    models = ModelRegistry.for_settings(settings).scan()
    if as_json:
        typer.echo(json.dumps([m.model_dump() for m in models], indent=2))
        return
    table = Table("id", "format", "arch", "sha256", "size", "note")
    for m in models:
        note = "random-weight smoke test" if m.smoke_test else m.description[:40]
        table.add_row(m.id, m.format, m.arch, m.sha256[:12], f"{m.size_bytes / 1e6:.1f} MB", note)
    Console().print(table)
    if not models:
        console.print(f"no models in {settings.resolved_models_dir}")


@models_app.command("add")
def models_add(path: Path, name: str | None = None, models_dir: ModelsDir = None, data_dir: DataDir = None) -> None:
    """Copy a checkpoint (.safetensors) or a diffusers folder into the models dir."""
    from darkroom.errors import DarkroomError
    from darkroom.models.registry import ModelRegistry

    settings = settings_from(models_dir=models_dir, data_dir=data_dir)
    settings.resolved_models_dir.mkdir(parents=True, exist_ok=True)
    try:
        info = ModelRegistry.for_settings(settings).add(path, name=name)
    except DarkroomError as exc:
        console.print(f"[red]{exc.message}[/red]")
        raise typer.Exit(1) from None
    typer.echo(f"added {info.id} ({info.format}, {info.arch}, sha256 {info.sha256[:12]})")
    typer.echo(f"it is served once approved: darkroom models approve {info.id}")


@models_app.command("approve")
def models_approve(
    model_id: str,
    version: str | None = typer.Argument(None, help="sha256 (or a prefix) of a recorded version; default: the file"),
    data_dir: DataDir = None,
    database_url: DbUrl = None,
    models_dir: ModelsDir = None,
) -> None:
    """Approve a model version (default: this node's file) and make it the one served; others stop being served.
    MODEL_ID is a checkpoint id, or lora:NAME, embedding:NAME, upscaler:NAME."""
    _model_action("approve", model_id, version, data_dir, database_url, models_dir)


@models_app.command("disable")
def models_disable(model_id: str, data_dir: DataDir = None, database_url: DbUrl = None) -> None:
    """Stop serving a model (every version) until it is enabled again."""
    _model_action("disable", model_id, None, data_dir, database_url, None)


@models_app.command("enable")
def models_enable(model_id: str, data_dir: DataDir = None, database_url: DbUrl = None) -> None:
    """Serve a disabled model again (its current approved version)."""
    _model_action("enable", model_id, None, data_dir, database_url, None)


@models_app.command("rollback")
def models_rollback(
    model_id: str, version: str, data_dir: DataDir = None, database_url: DbUrl = None, models_dir: ModelsDir = None
) -> None:
    """Make an earlier approved VERSION (sha256 or a prefix) current, its file restored from the kept copy."""
    _model_action("rollback", model_id, version, data_dir, database_url, models_dir)


@models_app.command("versions")
def models_versions(
    model_id: str, data_dir: DataDir = None, database_url: DbUrl = None, models_dir: ModelsDir = None
) -> None:
    """A model's versions: sha256, who added and approved each and when, which is current, what is on disk."""
    from darkroom.errors import DarkroomError
    from darkroom.models.lifecycle import versions
    from darkroom.service import Services

    services = Services.open(settings_from(data_dir=data_dir, database_url=database_url, models_dir=models_dir))
    try:
        found = versions(services, model_id)
    except DarkroomError as exc:
        console.print(f"[red]{exc.message}[/red]")
        raise typer.Exit(1) from None
    table = Table("sha256", "added (UTC)", "by", "approved by", "state")
    table.columns[0].min_width = 12  # a sha256 prefix cut short is no use to copy into `rollback`
    for v in found["versions"]:
        state = (
            "current" if v["sha256"] == found["current"] else "approved" if v["approved_at"] is not None else "pending"
        )
        state += ", on disk" if v["sha256"] == found["on_disk"] else ""
        table.add_row(v["sha256"][:12], v["added_at"][:16], v["added_by"], v["approved_by"] or "", state)
    Console().print(table)
    if found["disabled"]:
        console.print(f"{model_id} is disabled")


def _model_action(
    action: str,
    model_id: str,
    version: str | None,
    data_dir: Path | None,
    database_url: str | None,
    models_dir: Path | None,
) -> None:
    from darkroom.auth.principal import Principal
    from darkroom.errors import DarkroomError
    from darkroom.models.lifecycle import act
    from darkroom.service import Services

    services = Services.open(settings_from(data_dir=data_dir, database_url=database_url, models_dir=models_dir))
    try:
        record = act(services, Principal.cli(), action, model_id, version)  # type: ignore[arg-type]
    except DarkroomError as exc:
        console.print(f"[red]{exc.message}[/red]")
        raise typer.Exit(1) from None
    state = "disabled" if record.disabled else "enabled"
    typer.echo(f"{action}: {model_id} current sha256 {record.current or 'none'} ({state})")


@retention_app.command("sweep")
def retention_sweep(data_dir: DataDir = None, database_url: DbUrl = None) -> None:
    """Apply every tenant's image and prompt TTLs now (as API processes do in the background); prints the counts."""
    from darkroom.service import Services
    from darkroom.storage.retention import RetentionSweeper

    services = Services.open(settings_from(data_dir=data_dir, database_url=database_url))
    try:
        report = RetentionSweeper(services.store.engine, services.blobs, services.settings).sweep()
    finally:
        services.close()
    typer.echo(json.dumps(report, indent=2, sort_keys=True))


@app.command()
def verify(
    image: Path,
    as_json: Annotated[bool, typer.Option("--json", help="print the full report as JSON")] = False,
    data_dir: DataDir = None,
) -> None:
    """Check an image for darkroom's watermark, provenance and C2PA manifest.

    Exit status 0: darkroom's watermark is in the pixels; 1: it is not; 2: the file is not a readable image.
    """
    from darkroom.safety.c2pa_manifest import trust_anchor
    from darkroom.safety.verify import UnreadableImage, render
    from darkroom.safety.verify import verify as check

    anchor = trust_anchor(settings_from(data_dir=data_dir).data_dir / "c2pa")
    try:
        report = check(image.read_bytes(), trust_anchors=anchor)
    except (OSError, UnreadableImage) as exc:
        console.print(f"[red]{image}: {exc}[/red]")
        raise typer.Exit(2) from None
    typer.echo(json.dumps(report, indent=2) if as_json else render(report))
    raise typer.Exit(0 if report["watermark"]["present"] else 1)


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def main() -> None:
    try:
        app(prog_name="darkroom")
    except MissingExtra as exc:  # a role started on an install without its extra: one line, not a traceback
        console.print(str(exc), style="red", markup=False, highlight=False, soft_wrap=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
