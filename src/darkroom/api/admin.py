"""Operator endpoints: the worker fleet (operators), and API keys, tenant policies and the audit log (admins)."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from darkroom import clock
from darkroom.auth.audit import AuditRecord
from darkroom.auth.keys import KeyRecord
from darkroom.auth.limits import effective, usage
from darkroom.auth.principal import DEFAULT_TENANT, Permission, Principal, Role
from darkroom.auth.tenants import TenantPolicy
from darkroom.engines.base import EngineHealth
from darkroom.engines.catalog import configured_engines
from darkroom.errors import Forbidden, InvalidRequest
from darkroom.jobs.workers import WorkerRegistry, WorkerState, stale_after
from darkroom.models import lifecycle
from darkroom.observability import cost
from darkroom.observability.cost import GroupBy
from darkroom.service import Services

from .auth import require

router = APIRouter(prefix="/v1", tags=["admin"])
Admin = Depends(require(Permission.admin))


def _services(request: Request) -> Services:
    return request.app.state.services


class BatchLimitView(BaseModel):
    """The most images one tensor batch of a model at a size may hold on the worker's device now (from its free
    memory; `oom`: halved after running out of memory)."""

    model: str
    width: int
    height: int
    images: int
    oom: bool = False


class WorkerView(BaseModel):
    id: str
    host: str
    pid: int
    device: str
    memory_bytes: int | None
    loaded_models: list[str]
    models_available: list[str]
    state: WorkerState
    started_at: dt.datetime
    last_heartbeat_at: dt.datetime
    jobs_done: int
    batch_limits: list[BatchLimitView] = []


def _registry(request: Request) -> tuple[WorkerRegistry, Services]:
    svc: Services = request.app.state.services
    return WorkerRegistry(svc.store.engine), svc


def _list(request: Request, state: WorkerState | None) -> list[WorkerView]:
    registry, svc = _registry(request)
    # Mark silent workers lost before answering: when every worker is dead, nobody else is left to do it.
    registry.mark_lost(stale_after(svc.settings.lease_seconds, svc.settings.heartbeat_seconds))
    return [WorkerView.model_validate(w, from_attributes=True) for w in registry.list(state)]


@router.get("/workers", response_model=list[WorkerView], summary="Worker processes: device, models, liveness")
async def list_workers(
    request: Request, state: WorkerState | None = None, who: Principal = Depends(require(Permission.queue))
) -> list[WorkerView]:
    return await run_in_threadpool(_list, request, state)


def _engines(request: Request) -> list[dict[str, object]]:
    svc = _services(request)
    workers = svc.worker_health()
    detail = f"{workers.get('healthy', 0)} of {workers.get('workers', 0)} workers of this process healthy"
    local = EngineHealth(ok=workers.get("status") == "ok", detail=detail)
    return [engine.as_dict() for engine in configured_engines(svc.settings, local, svc.route)]


@router.get("/engines", summary="The engine this process's workers run on: capabilities and health (operator)")
async def list_engines(
    request: Request, who: Principal = Depends(require(Permission.queue))
) -> list[dict[str, object]]:
    return await run_in_threadpool(_engines, request)


# --- API keys (admin) ------------------------------------------------------------------------------------------------


class KeyCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")  # no NUL (PostgreSQL) or controls
    role: Role = Role.user
    tenant: str = Field(DEFAULT_TENANT, min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    expires_in_days: float | None = Field(None, gt=0, le=3650)
    requests_per_minute: int | None = Field(None, ge=1, le=1_000_000)


@dataclass(frozen=True)
class NewKey(KeyRecord):
    token: str = ""  # the API key; shown this once and never again


@router.post("/keys", status_code=201, response_model=NewKey, tags=["admin"], summary="Create an API key (admin)")
def create_key(request: Request, body: KeyCreate, who: Principal = Admin) -> NewKey:
    svc = _services(request)
    expires = dt.timedelta(days=body.expires_in_days) if body.expires_in_days else None
    key, token = svc.keys.create(
        who,
        name=body.name,
        role=body.role,
        tenant=body.tenant,
        expires_in=expires,
        requests_per_minute=body.requests_per_minute,
    )
    return NewKey(**asdict(key), token=token)


@router.get("/keys", response_model=list[KeyRecord], tags=["admin"], summary="API keys, without their secrets (admin)")
def list_keys(
    request: Request, tenant: str | None = None, include_revoked: bool = False, who: Principal = Admin
) -> list[KeyRecord]:
    return _services(request).keys.list(tenant=tenant, include_revoked=include_revoked)


@router.delete("/keys/{key_id}", response_model=KeyRecord, tags=["admin"], summary="Revoke an API key (admin)")
def revoke_key(request: Request, key_id: str, who: Principal = Admin) -> KeyRecord:
    return _services(request).keys.revoke(who, key_id)


# --- tenants (admin) and usage (everyone, for their own tenant) -------------------------------------------------------


@router.get("/tenants", tags=["admin"], summary="Tenants with a policy of their own (admin)")
def list_tenants(request: Request, who: Principal = Admin) -> dict[str, TenantPolicy]:
    return _services(request).tenants.all()


@router.get("/tenants/{tenant}", response_model=TenantPolicy, tags=["admin"], summary="A tenant's policy (admin)")
def get_tenant(request: Request, tenant: str, who: Principal = Admin) -> TenantPolicy:
    return _services(request).tenants.get(tenant)


@router.put("/tenants/{tenant}", response_model=TenantPolicy, tags=["admin"], summary="Set a tenant's policy (admin)")
def put_tenant(request: Request, tenant: str, policy: TenantPolicy, who: Principal = Admin) -> TenantPolicy:
    try:
        return _services(request).tenants.put(tenant, policy, who)
    except ValueError as exc:
        raise InvalidRequest(str(exc), field="tenant") from None


@router.get(
    "/usage",
    tags=["v1"],
    summary="Your tenant's usage against its quotas; with from / to / group_by, a cost report (admins: every tenant)",
)
def get_usage(
    request: Request,
    start: dt.datetime | None = Query(None, alias="from", description="report: jobs finished at or after (UTC)"),
    end: dt.datetime | None = Query(None, alias="to", description="report: jobs finished before (default: now)"),
    group_by: GroupBy | None = Query(None, description="report rows by day, model or tenant"),
    tenant: str | None = Query(None, max_length=64, description="report: one tenant (admins; others see their own)"),
    who: Principal = Depends(require(Permission.generate)),
) -> dict:
    svc = _services(request)
    if start is None and end is None and group_by is None:  # the quota view, as before
        policy = effective(svc.tenants.get(who.tenant), svc.settings.security)
        return {"tenant": who.tenant, **usage(svc.store.engine, who.tenant, policy)}
    end = _utc(end, "to") if end is not None else clock.utcnow()
    start = _utc(start, "from") if start is not None else end - dt.timedelta(days=30)
    if start >= end:
        raise InvalidRequest("`from` must be before `to`", field="from")
    if not who.can(Permission.admin):
        if tenant not in (None, who.tenant):
            raise Forbidden("only admins report on another tenant")
        tenant = who.tenant
    return cost.report(svc.settings, svc.store.engine, start, end, group_by or "day", tenant)


def _utc(value: dt.datetime, field: str) -> dt.datetime:
    """A report bound as an aware UTC time; a naive one is taken as UTC."""
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


# --- audit log (admin) ------------------------------------------------------------------------------------------------


@router.get("/audit", response_model=list[AuditRecord], tags=["admin"], summary="The audit log, oldest first (admin)")
def list_audit(
    request: Request,
    after: int = Query(0, ge=0, le=2**63 - 1, description="the last id seen: pages forward"),
    limit: int = Query(100, ge=1, le=1000),
    action: str | None = Query(None, max_length=64, description="`job.submit`, or a prefix ending in `.`: `job.`"),
    tenant: str | None = Query(None, max_length=64),
    actor: str | None = Query(None, max_length=64),
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    who: Principal = Admin,
) -> list[AuditRecord]:
    return _services(request).audit.list(
        after_id=after, limit=limit, action=action, tenant=tenant, actor=actor, since=since, until=until
    )


# --- models (operators) ---------------------------------------------------------------------------------------------


class VersionAction(BaseModel):
    version: str | None = Field(None, min_length=4, max_length=64, description="sha256 or a prefix of one")


ModelsPerm = Depends(require(Permission.models))


@router.post("/models/{model_id}/approve", tags=["admin"], summary="Approve a model version (operator)")
def approve_model(
    request: Request, model_id: str, body: VersionAction | None = None, who: Principal = ModelsPerm
) -> dict:
    """Without a body: this node's file. `model_id`: a checkpoint id, or lora:NAME, embedding:NAME, upscaler:NAME."""
    record = lifecycle.act(_services(request), who, "approve", model_id, body.version if body else None)
    return {"model": model_id, "sha256": record.current, **record.model_dump(mode="json")}


@router.post("/models/{model_id}/{action}", tags=["admin"], summary="Disable, enable or roll back a model (operator)")
def model_action(
    request: Request,
    model_id: str,
    action: Literal["disable", "enable", "rollback"],
    body: VersionAction | None = None,
    who: Principal = ModelsPerm,
) -> dict:
    record = lifecycle.act(_services(request), who, action, model_id, body.version if body else None)
    return record.model_dump(mode="json")


@router.get("/models/{model_id}/versions", tags=["admin"], summary="A model's versions (operator)")
def model_versions(request: Request, model_id: str, who: Principal = ModelsPerm) -> dict:
    return lifecycle.versions(_services(request), model_id)
