"""Per-tenant model access: which checkpoints, LoRAs, embeddings, ControlNets and upscalers a tenant may see and use.

A tenant's policy carries two allow-lists (`darkroom.auth.tenants.TenantPolicy`): `allowed_kinds` (whole kinds of
model) and `allowed_models` (patterns over names: `NAME` for any kind, `KIND:NAME` for one kind; shell-style `*` and
`?` match, as in `lora:brand-a-*`). Absent lists allow everything, so a tenant without a policy sees what it always
saw. One function decides (`may_use`); listings filter with it and submit refuses with it, so what a tenant is shown
is exactly what it may ask for. A refusal is a 403 naming the model: the request was well formed, the tenant may not
use that model. Listings also leave out a model whose file is not approved (`offered`: a file that appeared or
changed waits for an operator, `models.approvals`), since a submit naming it would be refused. Built-in upscalers
(Lanczos, Nearest, latent modes) are code, not models, and are always allowed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Literal, Protocol, TypeVar, get_args

from darkroom.errors import Forbidden, InvalidRequest

if TYPE_CHECKING:
    from darkroom.models.registry import ModelRegistry
    from darkroom.schemas import GenerationRequest, ModelInfo
    from darkroom.service import Services

ModelKind = Literal["checkpoint", "lora", "embedding", "controlnet", "upscaler"]
MODEL_KINDS: tuple[str, ...] = get_args(ModelKind)
T = TypeVar("T")


class AccessPolicy(Protocol):
    """The two fields of a tenant policy this module reads (kept as a protocol: the policy module imports this)."""

    @property
    def allowed_models(self) -> list[str] | None: ...

    @property
    def allowed_kinds(self) -> list[ModelKind] | None: ...


class ModelForbidden(Forbidden):
    code = "model_forbidden"


def check_pattern(pattern: str) -> str:
    """A pattern is `NAME` or `KIND:NAME`; a typo in the kind would silently allow nothing, so it is refused."""
    kind, sep, name = pattern.partition(":")
    if sep and kind not in MODEL_KINDS:
        raise ValueError(f"{pattern!r}: the part before ':' must be one of {', '.join(MODEL_KINDS)}")
    if not (name if sep else kind).strip():
        raise ValueError(f"{pattern!r} names no model")
    return pattern


def may_use(policy: AccessPolicy, kind: str, name: str) -> bool:
    if policy.allowed_kinds is not None and kind not in policy.allowed_kinds:
        return False
    if policy.allowed_models is None:
        return True
    for pattern in policy.allowed_models:
        scope, sep, rest = pattern.partition(":")
        if sep and scope != kind:
            continue
        if fnmatchcase(name, rest if sep else pattern):
            return True
    return False


def require(policy: AccessPolicy, kind: str, name: str, field: str) -> None:
    if not may_use(policy, kind, name):
        raise ModelForbidden(f"{kind} {name!r} is not available to this tenant", field=field)


def visible(policy: AccessPolicy, kind: str, items: Iterable[T], name: Callable[[T], str]) -> list[T]:
    """The items of one kind this tenant may use, in their order: what every listing shows."""
    return [item for item in items if may_use(policy, kind, name(item))]


def check_request(policy: AccessPolicy, request: GenerationRequest) -> None:
    """Every model a resolved request names (checkpoint, LoRAs, ControlNets, refiner, model upscalers; embeddings
    are filtered at submit, see `api.v1`), each checked; the first one refused is the 403. Run after pinning, so
    names are canonical and model upscalers carry a sha256."""
    if request.model:
        require(policy, "checkpoint", request.model, "model")
    for lora in request.loras:
        require(policy, "lora", lora.name, "loras")
    for embedding in request.embeddings or []:
        require(policy, "embedding", embedding.name, "prompt")
    for unit in getattr(request, "controlnet", None) or []:
        require(policy, "controlnet", unit.model, "controlnet")
    refiner = getattr(request, "refiner", None)
    if refiner is not None:
        require(policy, "checkpoint", refiner.model, "refiner.model")
    if request.hires is not None and request.hires.sha256:
        require(policy, "upscaler", request.hires.upscaler, "hires.upscaler")
    if request.upscale is not None and request.upscale.sha256:
        require(policy, "upscaler", request.upscale.upscaler, "upscale.upscaler")


def resolve_checkpoint(registry: ModelRegistry, policy: AccessPolicy, name: str | None) -> ModelInfo:
    """The request's checkpoint: named (unknown → 422, not allowed → 403), or the default, which for a tenant that
    may not use it is the first model it may use. An unknown name's message lists only what the tenant may use."""
    if name is None:
        default = registry.default()
        if may_use(policy, "checkpoint", default.id):
            return default
        allowed = visible(policy, "checkpoint", registry.scan(), lambda m: m.id)
        if not allowed:
            raise ModelForbidden("this tenant may use no model", field="model")
        return allowed[0]
    try:
        info = registry.get(name)
    except InvalidRequest:
        known = ", ".join(m.id for m in visible(policy, "checkpoint", registry.scan(), lambda m: m.id)) or "none"
        raise InvalidRequest(f"unknown model {name!r} (available: {known})", field="model") from None
    require(policy, "checkpoint", info.id, "model")
    return info


def visible_checkpoints(registry: ModelRegistry, policy: AccessPolicy) -> list[ModelInfo]:
    """The checkpoints a tenant may use, approved or not (the operators' models page); listings offer
    `offered_checkpoints`."""
    return visible(policy, "checkpoint", registry.scan(), lambda m: m.id)


def offered(
    svc: Services,
    policy: AccessPolicy,
    kind: str,
    items: Iterable[T],
    name: Callable[[T], str],
    sha: Callable[[T], str],
) -> list[T]:
    """What a listing offers a tenant: the items it may use (`visible`) whose file a submit would serve now."""
    from darkroom.models.approvals import Approvals  # the database side; this module stays import-light

    return Approvals.for_services(svc).offered(kind, visible(policy, kind, items, name), name, sha)


def offered_checkpoints(svc: Services, policy: AccessPolicy) -> list[ModelInfo]:
    """The checkpoints every model listing shows (native, A1111, OpenAI, the UI): allowed and approved."""
    return offered(svc, policy, "checkpoint", svc.registry.scan(), lambda m: m.id, lambda m: m.sha256)
