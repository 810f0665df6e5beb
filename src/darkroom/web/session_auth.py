"""A UI session → the caller, through the API's own path (`api.auth`): the session names the key the user signed in
with; the key is read again on every request (a revoked or expired key ends its sessions at once) and mapped to a
`Principal` by `api.auth.key_principal`, then policed by `api.auth.admit_principal` (tenant policy, rate limit). Pages
then check permissions with `Principal.can` and scope data with `sees_job`/`visible_image`, as the API routes do.

The session cookie is honoured only on `/ui/…` paths: it never authenticates the JSON API, so a browser that is
signed in cannot be made to call `/v1` on a user's behalf by another site. Forms carry the session's CSRF token
(checked before any work: 403 without it); the sign-in form, before there is a session, uses a double-submit cookie.
"""

from __future__ import annotations

import datetime as dt
import hmac
import secrets

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from darkroom import clock
from darkroom.api.auth import admit_before_body as api_admit_before_body
from darkroom.api.auth import admit_principal, key_principal, open_without_keys
from darkroom.auth.principal import Permission, Principal
from darkroom.auth.tenants import TenantPolicy
from darkroom.errors import DarkroomError, Forbidden, Unauthorized
from darkroom.service import Services

from .sessions import Session, SessionStore

COOKIE = "darkroom_session"
LOGIN_CSRF_COOKIE = "darkroom_login_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
UI_PREFIX = "/ui/"
LOGIN_PATH = "/ui/login"


class CsrfRefused(Forbidden):
    code = "csrf"


def secure_cookies(request: Request) -> bool:
    """Mark cookies Secure when the browser reaches us over https: directly, through a proxy uvicorn trusts
    (`--forwarded-allow-ips`), or as the configured `public_url` says."""
    public = request.app.state.services.settings.public_url or ""
    return request.url.scheme == "https" or public.startswith("https://")


def session_store(svc: Services) -> SessionStore:
    return SessionStore(svc.store.engine, dt.timedelta(hours=svc.settings.server.ui_session_hours))


def keyless(svc: Services) -> bool:
    """No key was ever made and the service is on loopback (or `--insecure`): the API's open door, also here."""
    return open_without_keys(svc) and not svc.keys.any_keys()


def resolve(svc: Services, session: Session | None, ip: str | None, rid: str | None) -> Principal:
    """The principal a session stands for, exactly as its key would be on the API; Unauthorized when none."""
    if session is None:
        raise Unauthorized("sign in with an API key")
    if session.key_id is None:
        if keyless(svc):
            return Principal.local(ip, rid)
        raise Unauthorized("API keys exist now: sign in with one")
    key = svc.keys.get(session.key_id)
    if key is None or not key.active(clock.utcnow()):
        raise Unauthorized("the key this session signed in with was revoked or has expired")
    return key_principal(key, ip, rid)


def _admit(
    svc: Services, session_id: str | None, ip: str | None, rid: str | None
) -> tuple[Principal, TenantPolicy, Session]:
    session = session_store(svc).get(session_id)
    who, policy = admit_principal(svc, resolve(svc, session, ip, rid))
    assert session is not None  # resolve raises without one
    return who, policy, session


async def admit_request(request: Request) -> None:
    """Resolve the session once per request, leaving principal, policy and session on `request.state` (the error on
    `request.state.edge_refusal`, as the API's admission does)."""
    if hasattr(request.state, "principal") or hasattr(request.state, "edge_refusal"):
        return
    svc: Services = request.app.state.services
    ip = request.client.host if request.client else None
    rid = getattr(request.state, "request_id", None)
    try:
        who, policy, session = await run_in_threadpool(_admit, svc, request.cookies.get(COOKIE), ip, rid)
    except DarkroomError as exc:
        request.state.edge_refusal = exc
        return
    request.state.principal = who
    request.state.tenant_policy = policy
    request.state.ui_session = session


async def admit_before_body(request: Request) -> None:
    """The edge's admission hook (api/edge.py): UI paths authenticate by session, the sign-in form by nothing (its
    body is the key; the sign-in route checks it like the API would); everything else as the API always has."""
    path = request.scope["path"]  # not `request.url`, which builds a whole URL: this runs for every request
    if not path.startswith(UI_PREFIX) or "authorization" in request.headers:
        await api_admit_before_body(request)
    elif path != LOGIN_PATH:
        await admit_request(request)


async def ui_principal(request: Request, permission: Permission = Permission.generate) -> Principal:
    """The signed-in caller with `permission`: Unauthorized (sign in) or Forbidden, as the API would answer."""
    await admit_request(request)
    if (error := getattr(request.state, "edge_refusal", None)) is not None:
        raise error
    who: Principal = request.state.principal
    if not who.can(permission):
        raise Forbidden(f"role {who.role.value!r} may not see this (needs {permission.value!r})")
    return who


def check_csrf(request: Request, submitted: str | None) -> None:
    """403 unless the form (or htmx's header) carries this session's token."""
    session: Session | None = getattr(request.state, "ui_session", None)
    token = submitted or request.headers.get(CSRF_HEADER)
    if session is None or not session.csrf_ok(token):
        raise CsrfRefused("this form is missing its CSRF token (reload the page and try again)", field=CSRF_FIELD)


def login_csrf(request: Request) -> str:
    """The sign-in form's token: the double-submit cookie's value, or a new one (the page sets the cookie)."""
    return request.cookies.get(LOGIN_CSRF_COOKIE) or secrets.token_urlsafe(32)


def check_login_csrf(request: Request, submitted: str | None) -> None:
    cookie = request.cookies.get(LOGIN_CSRF_COOKIE)
    if not cookie or not submitted or not hmac.compare_digest(cookie, submitted):
        raise CsrfRefused(
            "the sign-in form is missing its CSRF token (reload the page and try again)", field=CSRF_FIELD
        )
