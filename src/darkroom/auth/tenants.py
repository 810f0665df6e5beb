"""Tenants and their policies: quotas, prompt rules, output review, retention. A tenant without a row gets the
defaults, so naming a tenant on a key is all it takes to start one.

Every request reads its tenant's policy, so policies are cached for `cache_seconds`; `put` drops the entry at once in
this process and, on PostgreSQL, in every other one through a `darkroom_cache` notice (`auth.invalidation`)."""

from __future__ import annotations

import logging
import re
from typing import Literal

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from darkroom import clock
from darkroom.auth import audit, invalidation
from darkroom.auth.cache import TTLCache
from darkroom.auth.principal import Principal
from darkroom.auth.tables import tenants
from darkroom.config import DataLabel
from darkroom.jobs.db import read_tx, write_tx
from darkroom.models.access import ModelKind, check_pattern

log = logging.getLogger(__name__)
TENANT_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class PromptRule(BaseModel):
    """A blocked term (whole words, case-insensitive) or regular expression, with the reason callers are told."""

    model_config = ConfigDict(extra="forbid")
    pattern: str = Field(min_length=1, max_length=500)
    kind: Literal["term", "regex"] = "term"
    reason: str = Field(min_length=1, max_length=500)

    @model_validator(mode="after")
    def _safe(self) -> PromptRule:
        """A regex that does not compile, or could backtrack catastrophically, is refused when it is stored."""
        from darkroom.safety.policy import validate_rules  # the policy module imports this one

        validate_rules([self])
        return self


class TenantPolicy(BaseModel):
    """Unknown fields are refused (422 naming them): a misspelt limit that were silently ignored would be no limit."""

    model_config = ConfigDict(extra="forbid")

    requests_per_minute: int | None = Field(default=None, ge=1, description="API requests, all keys together")
    images_per_day: int | None = Field(default=None, ge=1, description="images asked for since 00:00 UTC")
    gpu_seconds_per_month: float | None = Field(default=None, gt=0, description="worker time since the 1st, UTC")
    prompt_rules: list[PromptRule] = Field(default_factory=list, max_length=1000)
    require_review: bool = Field(default=False, description="hold every output until an operator approves it")
    data_label: DataLabel | None = Field(
        default=None, description="the tenant's data label; a request may only make it stricter (engines/routing.py)"
    )
    image_ttl_days: float | None = Field(default=None, gt=0, description="delete images (and uploads) after")
    prompt_ttl_days: float | None = Field(default=None, gt=0, description="redact prompt text after")
    allowed_models: list[str] | None = Field(
        default=None,
        max_length=1000,
        description="models this tenant may list and use: `NAME` or `KIND:NAME` (kind: checkpoint, lora, embedding, "
        "controlnet, upscaler), `*` and `?` match; absent: every model",
    )
    allowed_kinds: list[ModelKind] | None = Field(default=None, description="kinds of model allowed; absent: all")
    result_cache: bool = Field(
        default=False,
        description="answer an identical request with an explicit seed from the images it already made (no GPU)",
    )

    @field_validator("allowed_models")
    @classmethod
    def _patterns(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else [check_pattern(p) for p in v]

    @classmethod
    def from_stored(cls, data: dict) -> TenantPolicy:
        """A stored policy may predate a field's removal (or hold `allowed_models` from when it was ignored, in
        another shape): keys this version does not know are dropped with a warning instead of failing every request
        of the tenant; what the API accepts from now on is checked strictly."""
        known = {k: v for k, v in data.items() if k in cls.model_fields}
        if len(known) != len(data):
            log.warning("tenant policy: ignoring unknown stored fields %s", sorted(set(data) - set(known)))
        return cls.model_validate(known)


def valid_tenant(tenant: str) -> str:
    if not TENANT_ID.match(tenant):
        raise ValueError(f"tenant {tenant!r}: lowercase letters, digits, '.', '_' and '-', at most 64")
    return tenant


class TenantStore:
    def __init__(self, engine: sa.Engine, cache_seconds: float = 5.0) -> None:
        self.engine = engine
        self._policies: TTLCache[str, TenantPolicy] = TTLCache(cache_seconds)

    def configure_cache(self, seconds: float) -> None:
        self._policies.ttl = seconds
        self.forget_all()

    def forget(self, tenant: str) -> None:
        self._policies.forget(tenant)

    def forget_all(self) -> None:
        self._policies.forget_all()

    def cached(self, tenant: str) -> TenantPolicy | None:
        """The tenant's policy if it is cached (no database), else None."""
        return self._policies.get(tenant)

    def get(self, tenant: str) -> TenantPolicy:
        """The tenant's policy (cached: callers copy before they change it, as `limits.effective` does)."""
        generation = self._policies.generation
        cached = self._policies.get(tenant)
        if cached is not None:
            return cached
        with read_tx(self.engine) as conn:
            row = conn.execute(sa.select(tenants.c.policy).where(tenants.c.id == tenant)).first()
        policy = TenantPolicy.from_stored(row.policy) if row else TenantPolicy()
        return self._policies.put(tenant, policy, generation)

    def all(self) -> dict[str, TenantPolicy]:
        with read_tx(self.engine) as conn:
            rows = conn.execute(sa.select(tenants.c.id, tenants.c.policy).order_by(tenants.c.id)).all()
        return {r.id: TenantPolicy.from_stored(r.policy) for r in rows}

    def put(self, tenant: str, policy: TenantPolicy, who: Principal) -> TenantPolicy:
        """Replace the tenant's policy; the change and its audit record commit together."""
        valid_tenant(tenant)
        now = clock.utcnow()
        value = policy.model_dump(mode="json")
        with write_tx(self.engine) as conn:
            before = conn.execute(sa.select(tenants.c.policy).where(tenants.c.id == tenant)).first()
            if before is None:
                conn.execute(tenants.insert().values(id=tenant, policy=value, created_at=now, updated_at=now))
            else:
                conn.execute(tenants.update().where(tenants.c.id == tenant).values(policy=value, updated_at=now))
            audit.record(
                conn,
                who,
                "tenant.update",
                tenant,
                {"before": before.policy if before else None, "after": value},
                tenant=tenant,
            )
            invalidation.announce(conn, "tenant", tenant)
        self.forget(tenant)
        return policy
