"""`/docs` (Swagger UI) and `/redoc` from assets vendored in this package (static/vendor, see VENDORED.md): FastAPI's
own pages load theirs from a CDN, which leaves them blank on the closed networks darkroom runs on."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse

router = APIRouter(include_in_schema=False)
VENDOR = "/ui/static/vendor"
FAVICON = "/ui/static/favicon.svg"


@router.get("/docs")
def swagger() -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="darkroom · API docs",
        swagger_js_url=f"{VENDOR}/swagger-ui-bundle.js",
        swagger_css_url=f"{VENDOR}/swagger-ui.css",
        swagger_favicon_url=FAVICON,
    )


@router.get("/redoc")
def redoc() -> HTMLResponse:
    return get_redoc_html(
        openapi_url="/openapi.json",
        title="darkroom · API reference",
        redoc_js_url=f"{VENDOR}/redoc.standalone.js",
        redoc_favicon_url=FAVICON,
        with_google_fonts=False,
    )
