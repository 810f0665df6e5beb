"""`darkroom engines list | test NAME`: what a node's workers run on, and whether it works, for operators.

With `--url` (or `DARKROOM_URL`) the commands ask a running darkroom (`GET /v1/engines`, an operator's key): its own
view, the remote probed from the API process. Without, they read this node's settings (flags, env, darkroom.toml) and
probe the configured engine from here as its workers would; `test` then also runs a remote engine's own check (the
remote answers and accepts its key), the check its workers run before they claim again after a failure.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

engines_app = typer.Typer(help="The engines this node's workers run on: list, test.", no_args_is_help=True)
console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

Url = Annotated[str | None, typer.Option(envvar="DARKROOM_URL", help="ask this running server instead")]
ApiKey = Annotated[str | None, typer.Option(envvar="DARKROOM_API_KEY", help="an operator's API key (dk_…)")]
DataDir = Annotated[Path | None, typer.Option("--data-dir", help="data folder [env DARKROOM_DATA_DIR]")]
LOCAL_HEALTH = "local device: its workers report their health to the API (darkroom engines list --url)"


def register(app: typer.Typer) -> None:
    app.add_typer(engines_app, name="engines")


@engines_app.command("list")
def list_engines(
    url: Url = None,
    api_key: ApiKey = None,
    data_dir: DataDir = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Each engine: kind, target, modes, whether it is external, and its health."""
    engines = _engines(url, api_key, data_dir)
    if as_json:
        out.print_json(json.dumps(engines))
        return
    for engine in engines:  # one line each, whole at any width (a log or a pipe as much as a terminal)
        caps, health = engine["capabilities"], engine["health"]
        state = "[green]ok[/green]" if health["ok"] else "[red]down[/red]"
        external = "external" if caps["external"] else "internal"
        modes = ",".join(caps["modes"]) or "-"
        line = f"{engine['name']}  {engine['kind']}  {engine['target']}  {modes}  {external}  {state}"
        out.print(f"{line}  {health['detail']}", highlight=False)


@engines_app.command("test")
def test_engine(name: str, url: Url = None, api_key: ApiKey = None, data_dir: DataDir = None) -> None:
    """Probe one engine (by name or kind); exit 1 when it cannot take work."""
    engines = _engines(url, api_key, data_dir)
    found = next((e for e in engines if name in (e["name"], e["kind"])), None)
    if found is None:
        names = ", ".join(e["name"] for e in engines)
        console.print(f"[red]no engine {name!r} here (configured: {names})[/red]", highlight=False)
        raise typer.Exit(2)
    problem = None if found["health"]["ok"] else found["health"]["detail"]
    if problem is None and url is None and found["kind"] != "diffusers":
        problem = _check_remote(data_dir)
    if problem:
        console.print(f"[red]{found['name']}: {problem}[/red]", highlight=False)
        raise typer.Exit(1)
    out.print(f"{found['name']} ({found['target']}): ok", highlight=False)


def _engines(url: str | None, api_key: str | None, data_dir: Path | None) -> list[dict[str, Any]]:
    if url:
        return _from_api(url, api_key)
    from darkroom.engines.base import EngineHealth
    from darkroom.engines.catalog import configured_engines

    return [e.as_dict() for e in configured_engines(_settings(data_dir), EngineHealth(True, LOCAL_HEALTH))]


def _from_api(url: str, api_key: str | None) -> list[dict[str, Any]]:
    import httpx

    from darkroom.client import ApiError, Client

    try:
        with Client(url, api_key=api_key) as client:
            return list(client.request("GET", "/v1/engines").json())
    except ApiError as exc:
        console.print(f"[red]{url}: {exc}[/red]", highlight=False)
        raise typer.Exit(1) from None
    except httpx.HTTPError as exc:
        console.print(f"[red]{url}: {type(exc).__name__}: {exc}[/red]", highlight=False)
        raise typer.Exit(1) from None


def _check_remote(data_dir: Path | None) -> str | None:
    """The configured remote's own check (it answers and accepts the key); None when it passes."""
    from darkroom.engines.remote_http import build_remote

    try:
        engine = build_remote(_settings(data_dir))
    except ValueError as exc:
        return str(exc)
    try:
        check = getattr(engine, "check", None)
        if check is not None:
            check()
    except Exception as exc:  # the engine's own error says what is wrong (a rejected key, no answer)
        return f"{type(exc).__name__}: {exc}"
    finally:
        engine.close()
    return None


def _settings(data_dir: Path | None) -> Any:
    from darkroom.cli import settings_from

    return settings_from(data_dir=data_dir)
