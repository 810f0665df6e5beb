"""Templates: one Jinja2 environment (autoescaped) and `page()`, which gives every template the caller, the CSRF
token and the navigation the caller's role allows, so no template decides permissions on its own."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from darkroom import __version__
from darkroom.auth.principal import Permission, Principal

HERE = Path(__file__).parent
STATIC = HERE / "static"

# The UI's pages load scripts, styles and images from this server only; previews and mask uploads are data: URLs.
CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'self'; form-action 'self'"
)

NAV: tuple[tuple[str, str, Permission], ...] = (
    ("/ui/generate", "Generate", Permission.generate),
    ("/ui/gallery", "Gallery", Permission.generate),
    ("/ui/queue", "Queue", Permission.generate),
    ("/ui/review", "Review", Permission.review),
    ("/ui/models", "Models", Permission.generate),
    ("/ui/usage", "Usage", Permission.generate),
    ("/ui/keys", "Keys", Permission.admin),
    ("/ui/tenants", "Tenants", Permission.admin),
    ("/ui/audit", "Audit", Permission.admin),
)


def _when(value: dt.datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value else "—"


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)


env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))
env.filters["when"] = _when
env.filters["pretty"] = _pretty


def nav_for(who: Principal | None) -> list[tuple[str, str]]:
    return [(href, label) for href, label, need in NAV if who is not None and who.can(need)]


def page(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    who: Principal | None = getattr(request.state, "principal", None)
    session = getattr(request.state, "ui_session", None)
    html = env.get_template(template).render(
        request=request,
        who=who,
        csrf=session.csrf if session is not None else "",
        nav=nav_for(who),
        path=request.url.path,
        version=__version__,
        Permission=Permission,
        **context,
    )
    return HTMLResponse(html, status_code=status, headers=page_headers())


def page_headers() -> dict[str, str]:
    return {
        "Content-Security-Policy": CSP,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "same-origin",
        "Cache-Control": "no-store",
    }
