"""Authentication and authorization, as FastAPI dependencies: `Depends(require(Permission.generate))`.

Secure by default: with no API keys at all, a caller is the machine's owner (`Principal.local`, an admin) only while
the service is bound to a loopback address or runs with `--insecure`; once any key exists, every request needs one.
The request's principal is kept on `request.state.principal` for the audit log and for tenant scoping.

Requests that carry a body are authenticated by the edge middleware (api/edge.py, `admit_before_body`) before a byte
of the body is read: a caller without a valid key cannot make the server buffer anything. A failure there is kept on
`request.state.edge_refusal`, the body is withheld from the route, and the route's `require(...)` raises it, so the
error leaves in the route's own shape (OpenAI routes answer in OpenAI's)."""

from __future__ import annotations

import base64
import binascii
import ipaddress
from collections.abc import Callable

from fastapi import Depends, Request, WebSocket
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from darkroom.auth.failures import LoginFailures
from darkroom.auth.keys import KeyRecord
from darkroom.auth.limits import RateLimiter, effective
from darkroom.auth.principal import Permission, Principal
from darkroom.auth.tenants import TenantPolicy
from darkroom.errors import Forbidden, NotFound, RateLimited, Unauthorized
from darkroom.jobs.store import ImageRecord, JobRecord
from darkroom.observability.logging import bind as bind_log_context
from darkroom.service import Services

bearer = HTTPBearer(auto_error=False, description="an API key: `darkroom keys create --role user --tenant acme`")


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def open_without_keys(svc: Services) -> bool:
    """No keys: answer unauthenticated callers only on loopback, or when the operator said `--insecure`."""
    return svc.settings.security.insecure or is_loopback(svc.settings.host)


def authenticate(
    svc: Services, token: str | None, ip: str | None, request_id: str | None, failures: LoginFailures | None = None
) -> Principal:
    """The caller. Without any keys an open service ignores whatever token comes (OpenAI clients always send one).
    With `failures`, an address that keeps sending bad keys is refused before any key is looked up, and its failed
    logins are audited in aggregate; without it (callers outside the API) each failure is audited."""
    if token:
        if failures is not None:
            failures.check(ip)
        try:
            key = svc.keys.authenticate(token)
        except Unauthorized as exc:
            if open_without_keys(svc) and not svc.keys.any_keys():
                return Principal.local(ip, request_id)
            claimed = token.split("_")[1][:32] if token.startswith("dk_") and token.count("_") >= 2 else None
            if failures is not None:
                failures.failed(claimed, ip, request_id, exc.message)
            else:
                svc.audit.denied_login(claimed, ip, request_id, exc.message)
            raise
        return key_principal(key, ip, request_id)
    if svc.keys.any_keys():
        raise Unauthorized("an API key is required: Authorization: Bearer dk_…")
    if not open_without_keys(svc):
        raise Unauthorized("no API keys exist and the service is not on loopback; create one with `darkroom keys`")
    return Principal.local(ip, request_id)


def key_principal(key: KeyRecord, ip: str | None, request_id: str | None) -> Principal:
    """The caller a valid key makes: the one mapping from key to principal, for the API and the web UI's sessions."""
    return Principal(
        actor=key.id,
        role=key.role,
        tenant=key.tenant,
        key_id=key.id,
        ip=ip,
        request_id=request_id,
        requests_per_minute=key.requests_per_minute,
    )


def _admit(
    svc: Services, failures: LoginFailures | None, token: str | None, ip: str | None, request_id: str | None
) -> tuple[Principal, TenantPolicy]:
    """The caller and its tenant's effective policy (read once per request: submit checks it again), rate-limited."""
    return admit_principal(svc, authenticate(svc, token, ip, request_id, failures))


async def admitted(
    svc: Services, failures: LoginFailures | None, token: str | None, ip: str | None, request_id: str | None
) -> tuple[Principal, TenantPolicy]:
    """`_admit`: on the event loop when the caches answer (`admit_cached`), else on a request thread."""
    found = admit_cached(svc, failures, token, ip, request_id)
    return found if found is not None else await run_in_threadpool(_admit, svc, failures, token, ip, request_id)


def admit_cached(
    svc: Services, failures: LoginFailures | None, token: str | None, ip: str | None, request_id: str | None
) -> tuple[Principal, TenantPolicy] | None:
    """`_admit` when it needs no database: a valid key (or an open service that is known to have no keys, whatever
    token comes) and its tenant's policy both cached, and no per-minute limit to count. It runs on the event loop,
    which saves the request a hand-off to a thread and back; None sends the request the usual way (`_admit` on a
    thread), which is also where every failure is decided and audited."""
    if failures is not None and failures.refusing(ip):
        return None
    if open_without_keys(svc) and svc.keys.known_keyless():  # as `authenticate` answers with no keys
        who = Principal.local(ip, request_id)
    elif token and (key := svc.keys.cached(token)) is not None and not key.requests_per_minute:
        who = key_principal(key, ip, request_id)
    else:
        return None
    if (stored := svc.tenants.cached(who.tenant)) is None:
        return None
    policy = effective(stored, svc.settings.security)
    if policy.requests_per_minute:
        return None
    bind_log_context(tenant=who.tenant)
    return who, policy


def admit_principal(svc: Services, who: Principal) -> tuple[Principal, TenantPolicy]:
    """What follows authentication, however the caller proved who it is (a key here, a web UI session in
    `darkroom.web.session_auth`): its tenant's effective policy, and the rate limit."""
    bind_log_context(tenant=who.tenant)  # the request's later log lines (and its access line) name the tenant
    policy = effective(svc.tenants.get(who.tenant), svc.settings.security)
    RateLimiter(svc.store.engine).hit(who, policy.requests_per_minute)
    return who, policy


def require(permission: Permission) -> Callable[..., object]:
    """A dependency that authenticates, rate-limits, and checks the role has `permission`."""

    async def dependency(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Principal:
        if (error := getattr(request.state, "edge_refusal", None)) is not None:
            raise error  # the edge refused the caller before reading the body (admit_before_body)
        who: Principal | None = getattr(request.state, "principal", None)
        if who is None:
            svc: Services = request.app.state.services
            ip = request.client.host if request.client else None
            token = bearer_token(request)  # Bearer (what `creds` documents) or Basic
            rid = getattr(request.state, "request_id", None)
            failures = getattr(request.app.state, "login_failures", None)
            who, request.state.tenant_policy = await admitted(svc, failures, token, ip, rid)
            request.state.principal = who
        assert who is not None  # _admit raises for a caller it does not let in
        if not who.can(permission):
            raise Forbidden(f"role {who.role.value!r} may not do this (needs {permission.value!r})")
        return who

    return dependency


async def websocket_principal(websocket: WebSocket, permission: Permission) -> Principal | None:
    """WebSockets: the key from the Authorization header, or `?api_key=` (browsers cannot set headers there).
    None (after closing the socket with 4401/4403) when the caller may not."""
    svc: Services = websocket.app.state.services
    token = credential(websocket.headers.get("authorization", "")) or websocket.query_params.get("api_key")
    ip = websocket.client.host if websocket.client else None
    failures = getattr(websocket.app.state, "login_failures", None)
    try:
        who, _ = await admitted(svc, failures, token, ip, None)
    except (Unauthorized, RateLimited) as exc:
        await websocket.close(code=4401 if isinstance(exc, Unauthorized) else 4429, reason=exc.message[:120])
        return None
    if not who.can(permission):
        await websocket.close(code=4403, reason="forbidden")
        return None
    return who


def credential(authorization: str) -> str | None:
    """The API key an `Authorization` header carries: `Bearer <key>`, or `Basic base64(user:key)` as A1111's
    `--api-auth` clients and ComfyUI clients send it (the user name is ignored: the key says who calls). The one
    place both schemes are read, for every route and WebSocket."""
    scheme, _, credentials = authorization.partition(" ")
    credentials = credentials.strip()
    if scheme.lower() == "bearer":
        return credentials or None
    if scheme.lower() != "basic" or not credentials:
        return None
    try:
        decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return decoded.partition(":")[2] or None


def bearer_token(request: Request) -> str | None:
    """The request's API key (`credential`), from a Bearer or Basic `Authorization` header."""
    return credential(request.headers.get("authorization", ""))


async def admit_before_body(request: Request) -> None:
    """Authenticate and rate-limit a request before its body is read (the edge middleware calls this for requests
    that carry one). Success leaves the principal and policy on `request.state` for `require(...)`; failure leaves
    the error on `request.state.edge_refusal`. Either way nothing of the body has been read."""
    svc: Services = request.app.state.services
    ip = request.client.host if request.client else None
    rid = getattr(request.state, "request_id", None)
    failures = getattr(request.app.state, "login_failures", None)
    try:
        who, policy = await admitted(svc, failures, bearer_token(request), ip, rid)
    except Exception as exc:  # raised again by the route's own `require(...)`, so it leaves in the route's shape
        request.state.edge_refusal = exc
        return
    request.state.principal = who
    request.state.tenant_policy = policy


def principal(request: Request) -> Principal:
    """The caller, once a `require(...)` dependency ran for this request."""
    return request.state.principal


def tenant_policy(request: Request) -> TenantPolicy:
    """The caller's tenant's policy with the service-wide defaults filled in, as `require(...)` read it."""
    return request.state.tenant_policy


def sees_job(who: Principal, job: JobRecord) -> bool:
    """Tenant isolation, and within a tenant: users see the jobs their own key submitted."""
    if job.tenant != who.tenant:
        return False
    return who.can(Permission.read_tenant_jobs) or (job.key_id is not None and job.key_id == who.key_id)


def visible_job(svc: Services, who: Principal, job_id: str) -> JobRecord:
    """The job, or the same 404 a job that does not exist gets: ids never leak across tenants."""
    job = svc.store.get(job_id)
    if job is None or not sees_job(who, job):
        raise NotFound(f"no job {job_id!r}", field="job_id")
    return job


def visible_image(svc: Services, who: Principal, image_id: str) -> tuple[ImageRecord, JobRecord]:
    image = svc.store.get_image(image_id)
    job = svc.store.get(image.job_id) if image else None
    if image is None or job is None or not sees_job(who, job) or image.deleted_at is not None:
        raise NotFound(f"no image {image_id!r}", field="image_id")
    return image, job
