"""`darkroom keys | tenants | audit`: administration from a shell on a node that reaches the database.

Whoever runs these holds the database URL (or the data dir), which is already everything, so they act as an admin;
the audit log names them `cli:<os user>`."""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from darkroom import clock
from darkroom.config import ConfigFileError, command_settings

keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
tenants_app = typer.Typer(help="Tenant policies: quotas, prompt rules, review, retention.", no_args_is_help=True)
audit_app = typer.Typer(help="The audit log.", no_args_is_help=True)
console = Console(stderr=True)

DataDir = Annotated[Path | None, typer.Option("--data-dir", help="data folder [env DARKROOM_DATA_DIR]")]
DbUrl = Annotated[str | None, typer.Option("--database-url", help="SQLAlchemy URL [env DARKROOM_DATABASE_URL]")]


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")
    app.add_typer(tenants_app, name="tenants")
    app.add_typer(audit_app, name="audit")


def _services(data_dir: Path | None, database_url: str | None) -> Any:
    """The node's services, with settings found as every command finds them (darkroom.config.command_settings)."""
    from darkroom.service import Services

    try:
        settings, origin = command_settings(data_dir=data_dir, database_url=database_url)
    except (ValidationError, ConfigFileError) as exc:
        raise _fail(str(exc)) from None
    if origin.startswith("recorded"):
        console.print(f"data dir {settings.data_dir} ({origin})", highlight=False)
    return Services.open(settings)


def _fail(message: str) -> typer.Exit:
    console.print(f"[red]{message}[/red]")
    return typer.Exit(1)


@keys_app.command("create")
def keys_create(
    role: Annotated[str, typer.Option(help="admin | operator | user | service | metrics")] = "user",
    tenant: Annotated[str, typer.Option(help="the tenant the key acts for")] = "default",
    name: Annotated[str | None, typer.Option(help="what the key is for; default: role@tenant")] = None,
    expires_days: Annotated[float | None, typer.Option("--expires-days", help="expire after this many days")] = None,
    requests_per_minute: Annotated[int | None, typer.Option("--requests-per-minute", min=1)] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    data_dir: DataDir = None,
    database_url: DbUrl = None,
) -> None:
    """Create a key. The key is printed once, here; only its hash is kept."""
    from darkroom.auth.principal import Principal, Role
    from darkroom.errors import DarkroomError

    try:
        role_value = Role(role)
    except ValueError:
        raise _fail(f"role must be one of {', '.join(r.value for r in Role)}") from None
    svc = _services(data_dir, database_url)
    try:
        key, token = svc.keys.create(
            Principal.cli(),
            name=name or f"{role}@{tenant}",
            role=role_value,
            tenant=tenant,
            expires_in=dt.timedelta(days=expires_days) if expires_days else None,
            requests_per_minute=requests_per_minute,
        )
    except DarkroomError as exc:
        raise _fail(exc.message) from None
    finally:
        svc.store.close()
    if as_json:
        typer.echo(json.dumps({**key.public(), "token": token}))
        return
    console.print(f"created key {key.id} ({key.role.value} for tenant {key.tenant}); it is shown this once:")
    typer.echo(token)


@keys_app.command("token")
def keys_token() -> None:
    """Print a fresh key without storing it: for DARKROOM_SECURITY__BOOTSTRAP_ADMIN_KEY in a secret store."""
    from darkroom.auth.keys import new_token

    typer.echo(new_token()[1])


@keys_app.command("list")
def keys_list(
    tenant: str | None = None,
    include_revoked: Annotated[bool, typer.Option("--all", help="include revoked keys")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    data_dir: DataDir = None,
    database_url: DbUrl = None,
) -> None:
    """Keys (never their secrets)."""
    svc = _services(data_dir, database_url)
    keys = svc.keys.list(tenant=tenant, include_revoked=include_revoked)
    svc.store.close()
    if as_json:
        typer.echo(json.dumps([k.public() for k in keys], indent=2))
        return
    table = Table("id", "name", "role", "tenant", "expires", "revoked", "last used")
    for k in keys:
        table.add_row(
            k.id, k.name, k.role.value, k.tenant, _when(k.expires_at), _when(k.revoked_at), _when(k.last_used_at)
        )
    Console().print(table)


def _when(value: dt.datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value else "-"


@keys_app.command("revoke")
def keys_revoke(key_id: str, data_dir: DataDir = None, database_url: DbUrl = None) -> None:
    """Revoke a key: every request with it fails from now on."""
    from darkroom.auth.principal import Principal
    from darkroom.errors import DarkroomError

    svc = _services(data_dir, database_url)
    try:
        key = svc.keys.revoke(Principal.cli(), key_id)
    except DarkroomError as exc:
        raise _fail(exc.message) from None
    finally:
        svc.store.close()
    typer.echo(f"revoked {key.id} ({key.name})")


@tenants_app.command("show")
def tenants_show(tenant: str, data_dir: DataDir = None, database_url: DbUrl = None) -> None:
    """A tenant's policy as JSON (defaults when it has none of its own)."""
    svc = _services(data_dir, database_url)
    typer.echo(svc.tenants.get(tenant).model_dump_json(indent=2))
    svc.store.close()


@tenants_app.command("set")
def tenants_set(
    tenant: str,
    policy_file: Annotated[Path | None, typer.Option(help="a whole policy as JSON ('-' reads stdin)")] = None,
    requests_per_minute: Annotated[int | None, typer.Option(min=1)] = None,
    images_per_day: Annotated[int | None, typer.Option(min=1)] = None,
    gpu_seconds_per_month: Annotated[float | None, typer.Option(min=0.001)] = None,
    require_review: Annotated[bool | None, typer.Option("--require-review/--no-require-review")] = None,
    image_ttl_days: Annotated[float | None, typer.Option(min=0.0001)] = None,
    prompt_ttl_days: Annotated[float | None, typer.Option(min=0.0001)] = None,
    block_term: Annotated[list[str] | None, typer.Option(help="TERM=REASON; repeatable")] = None,
    block_regex: Annotated[list[str] | None, typer.Option(help="REGEX=REASON; repeatable")] = None,
    data_dir: DataDir = None,
    database_url: DbUrl = None,
) -> None:
    """Change a tenant's policy: the flags given change those fields, the rest stays (audited)."""
    from pydantic import ValidationError

    from darkroom.auth.principal import Principal
    from darkroom.auth.tenants import TenantPolicy

    svc = _services(data_dir, database_url)
    try:
        current = svc.tenants.get(tenant).model_dump()
        if policy_file is not None:
            text = sys.stdin.read() if str(policy_file) == "-" else policy_file.read_text()
            current = json.loads(text)
        changes = {
            "requests_per_minute": requests_per_minute,
            "images_per_day": images_per_day,
            "gpu_seconds_per_month": gpu_seconds_per_month,
            "require_review": require_review,
            "image_ttl_days": image_ttl_days,
            "prompt_ttl_days": prompt_ttl_days,
        }
        current.update({k: v for k, v in changes.items() if v is not None})
        rules = [_rule(spec, "term") for spec in block_term or []] + [
            _rule(spec, "regex") for spec in block_regex or []
        ]
        current["prompt_rules"] = list(current.get("prompt_rules") or []) + rules
        policy = svc.tenants.put(tenant, TenantPolicy.model_validate(current), Principal.cli())
    except (ValidationError, ValueError) as exc:
        raise _fail(str(exc)) from None
    finally:
        svc.store.close()
    typer.echo(policy.model_dump_json(indent=2))


def _rule(spec: str, kind: str) -> dict[str, str]:
    pattern, sep, reason = spec.partition("=")
    if not sep or not pattern or not reason:
        raise ValueError(f"{spec!r}: expected PATTERN=REASON")
    return {"pattern": pattern, "kind": kind, "reason": reason}


@audit_app.command("export")
def audit_export(
    output: Annotated[Path | None, typer.Option("-o", "--output", help="JSON Lines file; default stdout")] = None,
    since: Annotated[dt.datetime | None, typer.Option(help="ISO time (UTC unless it says)")] = None,
    until: Annotated[dt.datetime | None, typer.Option(help="ISO time (UTC unless it says)")] = None,
    action: Annotated[str | None, typer.Option(help="an action, or a prefix ending in '.' (job.)")] = None,
    tenant: str | None = None,
    actor: str | None = None,
    data_dir: DataDir = None,
    database_url: DbUrl = None,
) -> None:
    """Every matching audit record as JSON Lines, oldest first."""
    svc = _services(data_dir, database_url)
    filters = {
        "since": clock.aware(since),
        "until": clock.aware(until),
        "action": action,
        "tenant": tenant,
        "actor": actor,
    }
    out = output.open("w") if output else sys.stdout
    count = 0
    try:
        for rec in svc.audit.export(**filters):
            out.write(json.dumps(rec.to_dict(), sort_keys=True) + "\n")
            count += 1
    finally:
        if output:
            out.close()
        svc.store.close()
    console.print(f"{count} audit records")
