"""`darkroom usage` (the cost report, as a table, JSON or CSV) and `darkroom cost estimate` (the TCO helper).

`usage` reads the node's database directly, like `darkroom keys`: whoever holds the database URL sees every tenant.
The numbers are `darkroom.observability.cost`'s, the same as `GET /v1/usage?from&to&group_by`."""

from __future__ import annotations

import csv
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Annotated, TextIO

import typer
from rich.console import Console
from rich.table import Table

from darkroom import clock
from darkroom.cli_admin import DataDir, DbUrl, _services

cost_app = typer.Typer(help="What generating images costs.", no_args_is_help=True)
console = Console(stderr=True)
out = Console()

ReportFormat = Annotated[str, typer.Option("--format", help="table | json | csv")]


def register(app: typer.Typer) -> None:
    app.command("usage")(usage)
    app.add_typer(cost_app, name="cost")


def _day(value: str | None, name: str) -> dt.datetime | None:
    if value is None:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        console.print(f"[red]{name}: not an ISO date or time: {value!r}[/red]")
        raise typer.Exit(2) from None
    return parsed.replace(tzinfo=dt.UTC) if parsed.tzinfo is None else parsed.astimezone(dt.UTC)


def usage(
    start: Annotated[str | None, typer.Option("--from", help="jobs finished at or after (ISO date, UTC)")] = None,
    end: Annotated[str | None, typer.Option("--to", help="jobs finished before (default: now)")] = None,
    group_by: Annotated[str, typer.Option("--group-by", help="day | model | tenant")] = "day",
    tenant: Annotated[str | None, typer.Option(help="one tenant (default: all)")] = None,
    fmt: ReportFormat = "table",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="write here instead of stdout")] = None,
    data_dir: DataDir = None,
    database_url: DbUrl = None,
) -> None:
    """Jobs, images, device-seconds and cost per day, model or tenant, and stored bytes at their monthly price."""
    from darkroom.observability import cost

    if group_by not in ("day", "model", "tenant"):
        console.print("[red]--group-by must be day, model or tenant[/red]")
        raise typer.Exit(2)
    if fmt not in ("table", "json", "csv"):
        console.print("[red]--format must be table, json or csv[/red]")
        raise typer.Exit(2)
    until = _day(end, "--to") or clock.utcnow()
    since = _day(start, "--from") or until - dt.timedelta(days=30)
    svc = _services(data_dir, database_url)
    try:
        report = cost.report(svc.settings, svc.store.engine, since, until, group_by, tenant)  # type: ignore[arg-type]
    finally:
        svc.close()
    stream = output.open("w", newline="") if output is not None else sys.stdout
    try:
        if fmt == "json":
            stream.write(json.dumps(report, indent=2) + "\n")
        elif fmt == "csv":
            _csv(report, stream)
        else:
            _table(report)
    finally:
        if output is not None:
            stream.close()


def _csv(report: dict, stream: TextIO) -> None:
    writer = csv.writer(stream)
    writer.writerow([report["group_by"], "jobs", "images", "device_seconds", f"cost_{report['currency']}"])
    for row in report["rows"]:
        writer.writerow([row["key"], row["jobs"], row["images"], row["device_seconds"], row["cost"]])
    total = report["total"]
    writer.writerow(["total", total["jobs"], total["images"], total["device_seconds"], total["cost"]])


def _table(report: dict) -> None:
    table = Table(report["group_by"], "jobs", "images", "device-s", f"cost ({report['currency']})")
    for row in [*report["rows"], {"key": "total", **report["total"]}]:
        table.add_row(
            row["key"], str(row["jobs"]), str(row["images"]), f"{row['device_seconds']:.1f}", f"{row['cost']:.4f}"
        )
    out.print(table)
    storage = report["storage"]
    out.print(f"stored: {storage['bytes']} bytes, {storage['cost_per_month']:.4f} {report['currency']} a month")


@cost_app.command("estimate")
def estimate(
    images_per_day: Annotated[float, typer.Option("--images-per-day", min=0)],
    seconds_per_image: Annotated[float, typer.Option("--seconds-per-image", min=0)],
    gpu_hour_price: Annotated[float, typer.Option("--gpu-hour-price", min=0, help="per GPU-hour, rented or owned")],
    cloud_price_per_image: Annotated[float, typer.Option("--cloud-price-per-image", min=0)],
    utilisation: Annotated[
        float, typer.Option(min=0.01, max=1.0, help="share of paid GPU hours spent generating (1: pay per use)")
    ] = 1.0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Monthly cost self-hosted (GPU hours at your price) against a per-image cloud price."""
    from darkroom.observability.cost import estimate as tco

    result = tco(images_per_day, seconds_per_image, gpu_hour_price, cloud_price_per_image, utilisation)
    if as_json:
        out.print_json(json.dumps(result))
        return
    table = Table("per month", "value")
    for name, value in result.items():
        table.add_row(name.replace("_", " "), f"{value:,}")
    out.print(table)
