"""Models, usage, and the admin pages (keys, tenants, audit log). Each page reads and writes through the admin and
v1 API functions (`api.admin`, `api.v1`) with the session's principal: the same checks, scoping and audit records
as the JSON endpoints."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Iterator

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response, StreamingResponse
from pydantic import TypeAdapter, ValidationError

from darkroom import clock
from darkroom.api import admin
from darkroom.api.auth import tenant_policy
from darkroom.auth.audit import AuditRecord
from darkroom.auth.limits import effective, usage
from darkroom.auth.principal import DEFAULT_TENANT, Permission, Principal, Role
from darkroom.auth.tenants import TenantPolicy
from darkroom.errors import InvalidRequest, NotFound
from darkroom.models import access as model_access
from darkroom.observability.cost import GroupBy
from darkroom.schemas import ModelInfo

from .render import page
from .session_auth import check_csrf, ui_principal

router = APIRouter(prefix="/ui", include_in_schema=False)


def _invalid(exc: ValidationError) -> InvalidRequest:
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or None
    return InvalidRequest(f"{field}: {first['msg']}", field=field)


# --- models --------------------------------------------------------------------------------------------------------


def _models(request: Request, who: Principal) -> tuple[list[ModelInfo], dict[str, dict | None], set[str]]:
    """The models the caller may use (`GET /v1/models`'s rule: allowed by `models.access` and approved). Operators
    also see the allowed models whose file waits for approval (the third item: their ids), and every model's
    versions (None: none recorded yet)."""
    svc = request.app.state.services
    policy = tenant_policy(request)
    offered = model_access.offered_checkpoints(svc, policy)
    if not who.can(Permission.models):
        return offered, {}, set()
    listed = model_access.visible_checkpoints(svc.registry, policy)
    versions: dict[str, dict | None] = {}
    for m in listed:
        try:
            versions[m.id] = admin.model_versions(request, m.id, who)
        except NotFound:
            versions[m.id] = None
    served = {m.id for m in offered}
    pending = {m.id for m in listed if m.id not in served and not (versions[m.id] or {}).get("disabled")}
    return listed, versions, pending


@router.get("/models")
async def models(request: Request) -> Response:
    who = await ui_principal(request)
    listed, versions, pending = await run_in_threadpool(_models, request, who)
    return page(request, "models.html", models=listed, versions=versions, pending=pending)


@router.post("/models/{model_id}/{action}")
async def model_action(request: Request, model_id: str, action: str) -> Response:
    """Approve this node's copy, disable, enable, or roll back to the form's `version`: the API's
    `POST /v1/models/{id}/{action}` (audited there)."""
    who = await ui_principal(request, Permission.models)
    form = await request.form()
    check_csrf(request, str(form.get("csrf_token") or ""))
    if action == "approve":
        await run_in_threadpool(admin.approve_model, request, model_id, None, who)
    elif action in ("disable", "enable"):
        await run_in_threadpool(admin.model_action, request, model_id, action, None, who)  # type: ignore[arg-type]
    elif action == "rollback":
        try:
            body = admin.VersionAction(version=str(form.get("version") or "").strip() or None)
        except ValidationError as exc:
            raise _invalid(exc) from None
        if body.version is None:
            raise InvalidRequest("rollback needs the version to go back to", field="version")
        await run_in_threadpool(admin.model_action, request, model_id, "rollback", body, who)
    else:
        raise InvalidRequest("action must be approve, disable, enable or rollback", field="action")
    return RedirectResponse("/ui/models", status_code=303)


# --- usage ---------------------------------------------------------------------------------------------------------


def _usage(request: Request, who: Principal) -> list[dict]:
    """The quota view of `GET /v1/usage` for the caller's tenant; for admins, for every tenant known to the service."""
    svc = request.app.state.services
    tenants = [who.tenant]
    if who.can(Permission.admin):
        tenants = sorted({DEFAULT_TENANT, who.tenant, *svc.tenants.all(), *(k.tenant for k in svc.keys.list())})
    return [
        {"tenant": t, **usage(svc.store.engine, t, effective(svc.tenants.get(t), svc.settings.security))}
        for t in tenants
    ]


def _cost(request: Request, who: Principal, days: int) -> dict:
    """`GET /v1/usage?from=…&group_by=…`: the last `days` days' jobs, images, device time and cost, by tenant for
    admins (every tenant) and by day for everyone else (their own)."""
    end = clock.utcnow()
    group: GroupBy = "tenant" if who.can(Permission.admin) else "day"
    return admin.get_usage(request, end - dt.timedelta(days=days), end, group, None, who)


@router.get("/usage")
async def usage_page(request: Request, days: int = Query(30, ge=1, le=366)) -> Response:
    who = await ui_principal(request)
    rows = await run_in_threadpool(_usage, request, who)
    report = await run_in_threadpool(_cost, request, who, days)
    return page(request, "usage.html", rows=rows, report=report, days=days)


# --- keys (admin) --------------------------------------------------------------------------------------------------


@router.get("/keys")
async def keys(request: Request, revoked: bool = False) -> Response:
    who = await ui_principal(request, Permission.admin)
    listed = await run_in_threadpool(admin.list_keys, request, None, revoked, who)
    return page(request, "keys.html", keys=listed, roles=[r.value for r in Role], revoked=revoked, new=None)


@router.post("/keys")
async def create_key(request: Request) -> Response:
    who = await ui_principal(request, Permission.admin)
    form = await request.form()
    check_csrf(request, str(form.get("csrf_token") or ""))
    fields = {k: str(form.get(k) or "").strip() for k in ("name", "role", "tenant", "expires_in_days")}
    try:
        body = admin.KeyCreate(**{k: v for k, v in fields.items() if v})
    except ValidationError as exc:
        raise _invalid(exc) from None
    new = await run_in_threadpool(admin.create_key, request, body, who)
    listed = await run_in_threadpool(admin.list_keys, request, None, False, who)
    return page(request, "keys.html", status=201, keys=listed, roles=[r.value for r in Role], revoked=False, new=new)


@router.post("/keys/{key_id}/revoke")
async def revoke_key(request: Request, key_id: str) -> Response:
    who = await ui_principal(request, Permission.admin)
    form = await request.form()
    check_csrf(request, str(form.get("csrf_token") or ""))
    await run_in_threadpool(admin.revoke_key, request, key_id, who)
    return RedirectResponse("/ui/keys", status_code=303)


# --- tenants (admin) -----------------------------------------------------------------------------------------------


@router.get("/tenants")
async def tenants(request: Request) -> Response:
    who = await ui_principal(request, Permission.admin)
    policies = await run_in_threadpool(admin.list_tenants, request, who)
    return page(request, "tenants.html", policies=policies)


@router.post("/tenants")
async def put_tenant(request: Request) -> Response:
    who = await ui_principal(request, Permission.admin)
    form = await request.form()
    check_csrf(request, str(form.get("csrf_token") or ""))
    tenant = str(form.get("tenant") or "").strip()
    try:
        policy = TenantPolicy.model_validate(json.loads(str(form.get("policy") or "{}")))
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"policy is not JSON: {exc.msg}", field="policy") from None
    except ValidationError as exc:
        raise _invalid(exc) from None
    await run_in_threadpool(admin.put_tenant, request, tenant, policy, who)
    return RedirectResponse("/ui/tenants", status_code=303)


# --- audit log (admin) ---------------------------------------------------------------------------------------------

AUDIT_FILTERS = ("action", "tenant", "actor", "since", "until")
_WHEN: TypeAdapter[dt.datetime | None] = TypeAdapter(dt.datetime | None)


def _filters(request: Request) -> dict[str, str]:
    return {k: request.query_params.get(k, "").strip()[:64] for k in AUDIT_FILTERS}


def _audit_args(filters: dict[str, str]) -> dict:
    """The audit API's own query parameters, validated as it validates them."""
    out: dict = {k: (filters[k] or None) for k in ("action", "tenant", "actor")}
    for k in ("since", "until"):
        try:
            out[k] = _WHEN.validate_python(filters[k] or None)
        except ValidationError:
            raise InvalidRequest(f"{k} must be a date or time (2026-12-01, 2026-12-01T10:00Z)", field=k) from None
    return out


@router.get("/audit")
async def audit(request: Request, after: int = 0) -> Response:
    who = await ui_principal(request, Permission.admin)
    filters = _filters(request)
    args = _audit_args(filters)
    records = await run_in_threadpool(admin.list_audit, request, after, 200, who=who, **args)
    return page(request, "audit.html", records=records, filters=filters, after=after)


def _csv(records: Iterator[AuditRecord]) -> Iterator[str]:
    columns = ("id", "at", "actor", "role", "tenant", "action", "target", "outcome", "ip", "request_id", "details")
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns)
    for record in records:
        row = record.to_dict()
        row["details"] = json.dumps(row["details"], sort_keys=True)
        writer.writerow([row[c] for c in columns])
        yield out.getvalue()
        out.seek(0)
        out.truncate()
    yield out.getvalue()


@router.get("/audit.csv")
async def audit_csv(request: Request) -> Response:
    who = await ui_principal(request, Permission.admin)
    args = _audit_args(_filters(request))
    svc = request.app.state.services

    def export() -> list[AuditRecord]:
        records = list(svc.audit.export(**args))
        svc.audit.record(who, "audit.export", None, {"rows": len(records), **{k: str(v) for k, v in args.items() if v}})
        return records

    records = await run_in_threadpool(export)
    return StreamingResponse(
        _csv(iter(records)),
        media_type="text/csv",
        headers={"Content-Disposition": 'attachment; filename="darkroom-audit.csv"'},
    )
