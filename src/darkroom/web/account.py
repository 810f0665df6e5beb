"""Signing in and out. Sign-in checks the key exactly as the API does (`api.auth.authenticate`, with the same failed
login throttle and audit), then keeps only the key's id in a server-side session (`web.sessions`)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response

from darkroom.api.auth import authenticate
from darkroom.api.landing import safe_next, sign_in_page
from darkroom.auth.principal import Principal, Role
from darkroom.errors import DarkroomError, Forbidden
from darkroom.service import Services

from . import session_auth
from .session_auth import COOKIE, LOGIN_CSRF_COOKIE, check_csrf, check_login_csrf, session_store

router = APIRouter(prefix="/ui", include_in_schema=False)
NO_UI = (Role.service, Role.metrics)  # machine keys: they call the API, they do not sign in


def _sign_in(svc: Services, token: str, ip: str | None, rid: str | None, failures: object) -> tuple[str, Principal]:
    if token:
        who = authenticate(svc, token, ip, rid, failures)  # type: ignore[arg-type]
    elif session_auth.keyless(svc):
        who = Principal.local(ip, rid)
    else:
        raise Forbidden("an API key is required", field="api_key")
    if who.role in NO_UI:
        raise Forbidden(f"a {who.role.value!r} key is for programs and cannot sign in to the UI", field="api_key")
    session_id, _ = session_store(svc).create(who.key_id)
    svc.audit.record(who, "ui.login", who.key_id)
    return session_id, who


@router.post("/login")
async def login(request: Request) -> Response:
    form = await request.form()
    next_path = str(form.get("next") or "")
    check_login_csrf(request, str(form.get("csrf_token") or ""))
    svc: Services = request.app.state.services
    ip = request.client.host if request.client else None
    rid = getattr(request.state, "request_id", None)
    failures = getattr(request.app.state, "login_failures", None)
    try:
        session_id, _ = await run_in_threadpool(
            _sign_in, svc, str(form.get("api_key") or "").strip(), ip, rid, failures
        )
    except DarkroomError as exc:
        return sign_in_page(request, next_path, exc.message, status=exc.status)
    response = RedirectResponse(safe_next(next_path), status_code=303)
    response.set_cookie(
        COOKIE,
        session_id,
        max_age=int(svc.settings.server.ui_session_hours * 3600),
        httponly=True,
        secure=session_auth.secure_cookies(request),
        samesite="lax",
        path="/",
    )
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/ui/login")
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    form = await request.form()
    await session_auth.admit_request(request)
    check_csrf(request, str(form.get("csrf_token") or ""))
    svc: Services = request.app.state.services
    await run_in_threadpool(session_store(svc).delete, request.cookies.get(COOKIE))
    response = RedirectResponse("/", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response
