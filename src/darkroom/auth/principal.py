"""Who is calling: the role and tenant every authorization decision reads."""

from __future__ import annotations

import getpass
from dataclasses import dataclass
from enum import StrEnum


class Role(StrEnum):
    admin = "admin"  # everything: keys, tenants, settings, audit, plus what operators do
    operator = "operator"  # review held outputs, models, the queue and workers; generates like a user
    user = "user"  # generates, and sees the jobs its own key submitted
    service = "service"  # generates for its tenant and sees the tenant's jobs; no UI
    metrics = "metrics"  # reads /metrics and nothing else: the key a Prometheus scraper holds


class Permission(StrEnum):
    generate = "generate"
    read_tenant_jobs = "read_tenant_jobs"  # every job of the tenant, not only the caller's own
    review = "review"
    models = "models"
    queue = "queue"
    admin = "admin"
    metrics = "metrics"  # GET /metrics


GRANTS: dict[Role, frozenset[Permission]] = {
    Role.admin: frozenset(Permission),
    Role.operator: frozenset(
        {
            Permission.generate,
            Permission.read_tenant_jobs,
            Permission.review,
            Permission.models,
            Permission.queue,
            Permission.metrics,
        }
    ),
    Role.user: frozenset({Permission.generate}),
    Role.service: frozenset({Permission.generate, Permission.read_tenant_jobs}),
    Role.metrics: frozenset({Permission.metrics}),
}

DEFAULT_TENANT = "default"


@dataclass(frozen=True)
class Principal:
    actor: str  # the key id; "local" for an unauthenticated loopback caller; "cli:<user>" for the CLI
    role: Role
    tenant: str
    key_id: str | None = None
    ip: str | None = None
    request_id: str | None = None
    requests_per_minute: int | None = None

    def can(self, permission: Permission) -> bool:
        return permission in GRANTS[self.role]

    @classmethod
    def local(cls, ip: str | None = None, request_id: str | None = None) -> Principal:
        """No keys exist and the API is on loopback (or `--insecure`): the caller is the machine's owner."""
        return cls(actor="local", role=Role.admin, tenant=DEFAULT_TENANT, ip=ip, request_id=request_id)

    @classmethod
    def cli(cls) -> Principal:
        """Someone with shell access to the data dir or the database URL: an admin by construction."""
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = "unknown"
        return cls(actor=f"cli:{user}"[:64], role=Role.admin, tenant=DEFAULT_TENANT)
