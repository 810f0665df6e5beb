"""`GET /v1/jobs/{id}/webhooks`: the delivery log of a job's webhooks (every attempt, status, error)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from darkroom.auth.principal import Permission
from darkroom.webhooks.deliveries import DeliveryStore

from . import compat
from .auth import require
from .v1 import services

router = APIRouter(prefix="/v1", tags=["webhooks"], dependencies=[Depends(require(Permission.generate))])


@router.get("/jobs/{job_id}/webhooks", summary="Webhook deliveries of a job: state, attempts, responses")
def job_webhooks(request: Request, job_id: str) -> list[dict[str, Any]]:
    svc = services(request)
    compat.tenant_job(request, job_id)
    return [d.public() for d in DeliveryStore(svc.store.engine).for_job(job_id)]
