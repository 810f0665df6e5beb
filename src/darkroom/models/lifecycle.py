"""Operator actions on model versions, one function for the CLI and the API: approve, disable, enable, rollback.
Each is audited with who did it; `versions` shows a model's record with the version its folder holds now."""

from __future__ import annotations

from typing import Any, Literal

from darkroom.auth.principal import Principal
from darkroom.errors import InvalidRequest
from darkroom.models.approvals import Approvals, ModelVersions, approve_version, on_disk

Action = Literal["approve", "disable", "enable", "rollback"]


def versions(svc: Any, key: str) -> dict[str, Any]:
    """The model's versions, which is current, and the sha256 of the file on disk now (null when it is gone)."""
    record = Approvals.for_services(svc).get(key)
    try:
        disk: str | None = on_disk(svc.registry, key)[0]
    except InvalidRequest:
        disk = None
    return {**record.model_dump(mode="json"), "on_disk": disk}


def act(svc: Any, who: Principal, action: Action, key: str, version: str | None = None) -> ModelVersions:
    approvals = Approvals.for_services(svc)
    if action == "approve":
        record = approve_version(approvals, svc.registry, key, version, who.actor)
    elif action == "rollback":
        if not version:
            raise InvalidRequest("rollback needs the version to go back to", field="version")
        record = approvals.rollback(key, version)
    else:
        record = approvals.set_disabled(key, action == "disable")
    svc.audit.record(who, f"model.{action}", key, {"current": record.current, "disabled": record.disabled})
    return record
