"""Errors on UI paths answer as pages, not JSON: a signed-out browser is sent to sign in (and back), anything else
is shown with the API's own message and field. Every other path keeps the API's error shape."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import cast
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response

from darkroom.errors import DarkroomError, Unauthorized

from .render import page
from .session_auth import UI_PREFIX

Handler = Callable[[Request, Exception], Awaitable[Response]]
TITLES = {401: "Please sign in", 403: "Not allowed", 404: "Not found", 409: "Conflict", 429: "Slow down"}


def install(app: FastAPI) -> None:
    api_handler = cast(Handler, app.exception_handlers[DarkroomError])

    async def handler(request: Request, exc: Exception) -> Response:
        if not request.url.path.startswith(UI_PREFIX) or "authorization" in request.headers:
            return await api_handler(request, exc)
        assert isinstance(exc, DarkroomError)
        if isinstance(exc, Unauthorized) and request.method == "GET" and not request.headers.get("hx-request"):
            return RedirectResponse(f"/?next={quote(request.url.path)}", status_code=303)
        if isinstance(exc, Unauthorized) and request.headers.get("hx-request"):
            return Response(status_code=401, headers={"HX-Redirect": "/"})
        title = TITLES.get(exc.status, "Bad request" if exc.status < 500 else "Something went wrong")
        response = page(request, "error.html", status=exc.status, title=title, message=exc.message, field=exc.field)
        response.headers["X-Error-Code"] = exc.code
        if retry_after := getattr(exc, "retry_after", None):
            response.headers["Retry-After"] = str(retry_after)
        return response

    app.add_exception_handler(DarkroomError, handler)
