"""Prompt templates and asset types of the caller's tenant (`darkroom.models.templates`): anyone who may generate
reads them; operators and admins save new versions. Each save is audited."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Path, Request

from darkroom.auth.principal import Permission, Principal
from darkroom.models.templates import NAME, AssetType, Named, Template, TemplateStore
from darkroom.service import Services

from .auth import require

router = APIRouter(prefix="/v1", tags=["templates"])
Generate = Depends(require(Permission.generate))
Manage = Depends(require(Permission.models))
Name = Path(pattern=NAME, description="lowercase letters, digits, '.', '_' and '-'")


def _store(request: Request) -> tuple[Services, TemplateStore]:
    svc: Services = request.app.state.services
    return svc, TemplateStore(svc.store.engine)


@router.get("/templates", response_model=list[Named], summary="Prompt templates of your tenant")
def list_templates(request: Request, who: Principal = Generate) -> list[Named]:
    return _store(request)[1].list("template", who.tenant)


@router.get("/templates/{name}", response_model=Named, summary="A template with all its versions")
def get_template(request: Request, name: str = Name, who: Principal = Generate) -> Named:
    return _store(request)[1].get("template", who.tenant, name)


@router.put("/templates/{name}", response_model=Named, summary="Save a new version of a template (operator)")
def put_template(request: Request, body: Template, name: str = Name, who: Principal = Manage) -> Named:
    return _save(request, who, "template", name, body)


@router.get("/asset-types", response_model=list[Named], summary="Asset types of your tenant")
def list_asset_types(request: Request, who: Principal = Generate) -> list[Named]:
    return _store(request)[1].list("asset_type", who.tenant)


@router.put("/asset-types/{name}", response_model=Named, summary="Save a new version of an asset type (operator)")
def put_asset_type(request: Request, body: AssetType, name: str = Name, who: Principal = Manage) -> Named:
    return _save(request, who, "asset_type", name, body)


def _save(request: Request, who: Principal, kind: Any, name: str, body: AssetType) -> Named:
    svc, store = _store(request)
    named = store.save(kind, who.tenant, name, body, who.actor)
    svc.audit.record(who, f"{kind}.save", name, {"version": named.versions[-1].version})
    return named
