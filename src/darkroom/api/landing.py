"""`/`: the web UI's front door. Signed in, it goes to the generate page; signed out, it is the sign-in form beside
a map of what the server offers (the OpenAPI schema, the API docs, the probes), so a person who opens darkroom in a
browser finds their way with or without a key. Every asset it loads is served by darkroom (`darkroom.web`): the page
works on the closed networks darkroom is self-hosted on."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from fastapi.responses import RedirectResponse, Response

from darkroom.web import render, session_auth

router = APIRouter(include_in_schema=False)

LINKS: tuple[tuple[str, str], ...] = (
    ("/openapi.json", "OpenAPI schema (JSON): every route, body and error"),
    ("/docs", "interactive API docs (Swagger UI, served from this server)"),
    ("/redoc", "API reference (ReDoc, served from this server)"),
    ("/healthz", "liveness"),
    ("/readyz", "readiness: database, storage, models"),
    ("/v1/models", "approved models (needs a key once keys exist)"),
)

EXAMPLE = """curl -s $DARKROOM_URL/v1/generate -H 'content-type: application/json' \\
  -d '{"prompt": "a yellow star in the top left corner on a black background", "seed": 42}'"""


def safe_next(value: str | None) -> str:
    """Where to go after signing in: a UI path of this server only (never another site)."""
    if value and value.startswith("/ui/") and "//" not in value and "\\" not in value:
        return value
    return "/ui/generate"


@router.get("/")
async def landing(
    request: Request, next: str | None = Query(None, max_length=500), error: str | None = None
) -> Response:
    await session_auth.admit_request(request)
    if getattr(request.state, "principal", None) is not None:
        return RedirectResponse(safe_next(next), status_code=303)
    return sign_in_page(request, next, None)


def sign_in_page(request: Request, next: str | None, error: str | None, status: int = 200) -> Response:
    token = session_auth.login_csrf(request)
    svc = request.app.state.services
    response = render.page(
        request,
        "landing.html",
        status=status,
        links=LINKS,
        example=EXAMPLE,
        login_csrf=token,
        next=safe_next(next),
        error=error,
        keyless=session_auth.keyless(svc),
        hours=f"{svc.settings.server.ui_session_hours:g}",
    )
    secure = session_auth.secure_cookies(request)
    response.set_cookie(
        session_auth.LOGIN_CSRF_COOKIE, token, httponly=True, samesite="lax", secure=secure, path="/ui/login"
    )
    return response
