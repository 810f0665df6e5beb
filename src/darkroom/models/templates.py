"""Prompt templates and asset types: named, versioned, per tenant.

A *template* is a prompt with typed variables (`a photo of {product} in {style} style`), a negative prompt and fixed
parameters (steps, sampler, guidance, size, model, n). An *asset type* fixes only size, model and n (a "banner" is
1536x512 on the brand model, 4 variants). A request names them (`template`: `NAME` for the newest version or
`NAME@VERSION`; `variables`; `asset_type`), and the API renders them into an ordinary request before anything else
is checked, so limits, access and the prompt policy apply to the rendered result. A missing, unknown or ill-typed
variable is a 422 naming it (`variables.product`); a field the client sends that the template or asset type fixes
to another value is a 422 naming that field: fixed means fixed.

Each save makes a new version; versions are never changed, so a job's `template` (`NAME@VERSION`) says exactly
which text made its prompt. They live in `settings_kv`, one row per name (`template:TENANT:NAME`), read by key.

A1111's `styles` map onto templates: a style is a template whose only variable is `prompt`; as in A1111, a style
prompt with `{prompt}` takes the user's prompt in its place, one without is appended after a comma.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from darkroom import clock
from darkroom.errors import InvalidRequest, NotFound
from darkroom.jobs.db import read_tx, write_tx
from darkroom.schemas import TEMPLATE_PROMPT, GenerationRequest
from darkroom.webhooks.tables import settings_kv

Kind = Literal["template", "asset_type"]
NAME = r"^[a-z0-9][a-z0-9._-]{0,63}$"
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]{0,63})\}")
VarType = Literal["string", "integer", "number", "boolean"]
_PYTHON: dict[str, tuple[type, ...]] = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,)}


class Variable(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: VarType = "string"
    choices: list[str | int | float] | None = Field(None, max_length=200, description="the only values allowed")
    default: str | int | float | bool | None = Field(None, description="used when the request leaves it out")
    max_length: int = Field(500, ge=1, le=10_000, description="strings: the longest value")


class AssetType(BaseModel):
    """Size, model and number of images for one kind of asset."""

    model_config = ConfigDict(extra="forbid")

    width: int | None = Field(None, ge=8)
    height: int | None = Field(None, ge=8)
    model: str | None = Field(None, min_length=1, max_length=200)
    n: int | None = Field(None, ge=1)


class Template(AssetType):
    """A prompt with typed variables, a negative prompt, and fixed parameters."""

    prompt: str = Field(min_length=1, max_length=10_000)
    negative_prompt: str = Field("", max_length=10_000)
    variables: dict[str, Variable] = Field(default_factory=dict, max_length=100)
    steps: int | None = Field(None, ge=1)
    sampler: str | None = Field(None, min_length=1, max_length=100)
    guidance_scale: float | None = Field(None, ge=0.0)

    @model_validator(mode="after")
    def _declared(self) -> Template:
        """Every `{name}` in the texts is a declared variable: a typo would otherwise reach the model verbatim."""
        for text in (self.prompt, self.negative_prompt):
            for name in PLACEHOLDER.findall(text):
                if name not in self.variables:
                    raise ValueError(f"{{{name}}} is used but not declared in variables")
        return self


FIXED = ("width", "height", "model", "n", "steps", "sampler", "guidance_scale")


class Version(BaseModel):
    version: int
    created_at: str
    created_by: str
    body: dict[str, Any]


class Named(BaseModel):
    kind: Kind
    name: str
    versions: list[Version]

    def pick(self, version: int | None) -> Version:
        if version is None:
            return self.versions[-1]
        for v in self.versions:
            if v.version == version:
                return v
        raise InvalidRequest(f"{self.kind} {self.name!r} has no version {version}", field=self.kind)


def _key(kind: Kind, tenant: str, name: str) -> str:
    return f"{kind}:{tenant}:{name}"


class TemplateStore:
    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def save(self, kind: Kind, tenant: str, name: str, body: AssetType, who: str) -> Named:
        """A new version of `name` (the first one creates it)."""
        key = _key(kind, tenant, name)
        now = clock.utcnow()
        with write_tx(self.engine) as conn:
            row = conn.execute(sa.select(settings_kv.c.value).where(settings_kv.c.key == key)).first()
            named = Named.model_validate(row.value) if row else Named(kind=kind, name=name, versions=[])
            number = named.versions[-1].version + 1 if named.versions else 1
            version = Version(version=number, created_at=now.isoformat(), created_by=who, body=body.model_dump())
            named = named.model_copy(update={"versions": [*named.versions, version]})
            value = named.model_dump(mode="json")
            if row:
                conn.execute(settings_kv.update().where(settings_kv.c.key == key).values(value=value, updated_at=now))
            else:
                conn.execute(settings_kv.insert().values(key=key, value=value, updated_at=now))
        return named

    def get(self, kind: Kind, tenant: str, name: str) -> Named:
        with read_tx(self.engine) as conn:
            row = conn.execute(
                sa.select(settings_kv.c.value).where(settings_kv.c.key == _key(kind, tenant, name))
            ).first()
        if row is None:
            raise NotFound(f"no {kind} {name!r}", field=kind)
        return Named.model_validate(row.value)

    def list(self, kind: Kind, tenant: str) -> list[Named]:
        prefix = _key(kind, tenant, "")
        with read_tx(self.engine) as conn:
            rows = conn.execute(
                sa.select(settings_kv.c.value).where(settings_kv.c.key.startswith(prefix)).order_by(settings_kv.c.key)
            ).all()
        return [Named.model_validate(r.value) for r in rows]

    def lookup(self, kind: Kind, tenant: str, ref: str) -> tuple[str, Version]:
        """`NAME` or `NAME@VERSION` → (`NAME@VERSION`, that version); unknown → 422 naming the field."""
        name, _, number = ref.partition("@")
        if number and not number.isdigit():
            raise InvalidRequest(f"{kind} {ref!r}: the version after @ is a number", field=kind)
        try:
            named = self.get(kind, tenant, name)
        except NotFound:
            raise InvalidRequest(f"unknown {kind} {name!r}", field=kind) from None
        version = named.pick(int(number) if number else None)
        return f"{name}@{version.version}", version


# --- rendering -------------------------------------------------------------------------------------------------------


def check_variables(template: Template, given: dict[str, Any]) -> dict[str, Any]:
    """The variables' values, defaults filled in; each missing, unknown or ill-typed one is a 422 naming it."""
    for name in given:
        if name not in template.variables:
            known = ", ".join(sorted(template.variables)) or "none"
            raise InvalidRequest(f"unknown variable {name!r} (the template has: {known})", field=f"variables.{name}")
    values: dict[str, Any] = {}
    for name, spec in template.variables.items():
        value = given.get(name, spec.default)
        field = f"variables.{name}"
        if value is None:
            raise InvalidRequest(f"variable {name!r} is missing ({spec.type})", field=field)
        ok = isinstance(value, _PYTHON[spec.type]) and not (spec.type != "boolean" and isinstance(value, bool))
        if not ok:
            raise InvalidRequest(f"variable {name!r} must be a {spec.type}, not {value!r}", field=field)
        if spec.choices is not None and value not in spec.choices:
            raise InvalidRequest(f"variable {name!r} must be one of {spec.choices}", field=field)
        if isinstance(value, str) and len(value) > spec.max_length:
            raise InvalidRequest(f"variable {name!r} is longer than {spec.max_length} characters", field=field)
        values[name] = value
    return values


def render(text: str, values: dict[str, Any]) -> str:
    return PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)


def apply(
    store: TemplateStore, tenant: str, body: GenerationRequest, sent: set[str]
) -> tuple[GenerationRequest, set[str]]:
    """The request with its template and asset type rendered in; returns it and the fields now given (so a model's
    defaults do not override what the template fixed)."""
    updates: dict[str, Any] = {}
    fixed: dict[str, tuple[Any, str]] = {}  # field → (value, what fixes it)
    if body.template:
        ref, version = store.lookup("template", tenant, body.template)
        template = Template.model_validate(version.body)
        given = dict(body.variables or {})
        if "prompt" in template.variables and body.prompt != TEMPLATE_PROMPT and "prompt" not in given:
            given["prompt"] = body.prompt  # a client's own prompt fills a template's {prompt}
        values = check_variables(template, given)
        updates.update(template=ref, prompt=render(template.prompt, values))
        negative = render(template.negative_prompt, values)
        if negative:
            updates["negative_prompt"] = ", ".join(p for p in (negative, body.negative_prompt) if p)
        fixed.update({k: (getattr(template, k), "template") for k in FIXED if getattr(template, k) is not None})
    elif body.variables:
        raise InvalidRequest("variables need a template", field="variables")
    elif body.prompt == TEMPLATE_PROMPT:
        raise InvalidRequest("prompt is required", field="prompt")
    if body.asset_type:
        ref, version = store.lookup("asset_type", tenant, body.asset_type)
        asset = AssetType.model_validate(version.body)
        updates["asset_type"] = ref
        fixed.update({k: (v, "asset type") for k, v in asset.model_dump().items() if v is not None})
    for field, (value, what) in fixed.items():
        if field in sent and getattr(body, field) != value:
            raise InvalidRequest(f"{field} is fixed to {value!r} by the {what}", field=field)
    values_fixed = {k: v for k, (v, _) in fixed.items()}
    return body.model_copy(update={**updates, **values_fixed}), sent | set(values_fixed) | set(updates)


def apply_styles(store: TemplateStore, tenant: str, names: list[str], prompt: str, negative: str) -> tuple[str, str]:
    """A1111's styles, each a template of the tenant (variables other than `prompt` cannot be given here)."""
    for name in names:
        try:
            _, version = store.lookup("template", tenant, name)
        except InvalidRequest as exc:
            raise InvalidRequest(f"style {name!r}: {exc.message}", field="styles") from None
        style = Template.model_validate(version.body)
        if set(style.variables) - {"prompt"}:
            raise InvalidRequest(f"style {name!r} needs variables; use the native API's template", field="styles")
        prompt = _styled(style.prompt, prompt)
        negative = _styled(style.negative_prompt, negative)
    return prompt, negative


def _styled(style: str, text: str) -> str:
    if not style:
        return text
    if "{prompt}" in style:
        return style.replace("{prompt}", text)
    return ", ".join(p for p in (text, style) if p)


def as_style(named: Named) -> dict[str, str]:
    """`/sdapi/v1/prompt-styles`' shape."""
    body = named.versions[-1].body
    return {"name": named.name, "prompt": body.get("prompt", ""), "negative_prompt": body.get("negative_prompt", "")}
