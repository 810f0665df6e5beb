"""Every error leaves the API in one shape: {"error": {"code", "message", "field"}} with a fitting status.

Database outages are mapped here, once: a lost or refused connection (SQLAlchemy's OperationalError, a DBAPIError
that invalidated its connection, a pool that cannot hand one out) is 503 `database_unavailable` with Retry-After,
not 500. Being handled, it also keeps the client's keep-alive connection: an unhandled error makes the server drop
it, and every client reconnecting at once is the last thing a recovering database needs."""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from darkroom.errors import DarkroomError

log = logging.getLogger("darkroom.api")


def problem(
    status: int, code: str, message: str, field: str | None = None, headers: dict | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message, "field": field}}, status_code=status, headers=headers
    )


def _field_of(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


def invalid_json_message(exc: RequestValidationError) -> str | None:
    """'invalid JSON at line L column C: reason' when the body did not parse as JSON, else None.

    FastAPI reports a JSON syntax error with the character offset as the error's location (`"field": "15"`), which
    reads like a field name and is no help in a multi-line body; line and column are what an editor shows."""
    errors = exc.errors()
    first: dict[str, Any] = dict(errors[0]) if errors else {}
    if first.get("type") != "json_invalid":
        return None
    loc = tuple(first.get("loc", ()))
    doc = exc.body if isinstance(exc.body, str) else ""
    pos = loc[-1] if loc and isinstance(loc[-1], int) else 0
    line = doc.count("\n", 0, pos) + 1
    column = pos - doc.rfind("\n", 0, pos)
    reason = (first.get("ctx") or {}).get("error")
    return f"invalid JSON at line {line} column {column}" + (f": {reason}" if reason else "")


def database_outage(exc: BaseException) -> bool:
    """Whether a database error means the database cannot be reached (retry later), not a bad statement."""
    if isinstance(exc, sa.exc.TimeoutError | sa.exc.OperationalError | sa.exc.InterfaceError):
        return True
    return isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated


def install(app: FastAPI, database_retry_after: int = 5) -> None:
    @app.exception_handler(DarkroomError)
    async def _darkroom(request: Request, exc: DarkroomError) -> JSONResponse:
        headers = dict(getattr(exc, "headers", None) or {})
        if retry_after := getattr(exc, "retry_after", None):
            headers["Retry-After"] = str(retry_after)
        return JSONResponse({"error": exc.to_dict()}, status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        if (invalid_json := invalid_json_message(exc)) is not None:
            return problem(422, "invalid_request", invalid_json, None)
        first = exc.errors()[0] if exc.errors() else {}
        field = _field_of(tuple(first.get("loc", ())))
        message = first.get("msg", "invalid request")
        return problem(422, "invalid_request", f"{field}: {message}" if field else message, field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            exc.status_code, "http_error"
        )
        if exc.status_code == 413:  # the streamed body passed the cap (edge.BodyTooLarge)
            return problem(413, code, str(exc.detail), "body")
        if exc.status_code == 400:  # FastAPI's only 400: a body that is not JSON (or not the form it claims)
            return problem(422, "invalid_request", f"body: {exc.detail}", "body")
        return problem(exc.status_code, code, str(exc.detail))

    async def _database(request: Request, exc: Exception) -> JSONResponse:
        rid = getattr(request.state, "request_id", None)
        if not database_outage(exc):
            log.exception("database error (request %s)", rid)
            return problem(500, "internal_error", f"internal error; request id {rid}")
        log.warning("database unavailable (request %s): %s", rid, type(exc).__name__)
        return problem(
            503,
            "database_unavailable",
            f"the database is unavailable; retry in {database_retry_after}s",
            headers={"Retry-After": str(database_retry_after)},
        )

    app.add_exception_handler(sa.exc.DBAPIError, _database)
    app.add_exception_handler(sa.exc.TimeoutError, _database)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        rid = getattr(request.state, "request_id", None)
        log.exception("unhandled error (request %s)", rid)
        return problem(500, "internal_error", f"internal error; request id {rid}")
