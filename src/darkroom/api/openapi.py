"""The OpenAPI document, with every error status an operation can answer and the body it answers with.

FastAPI documents a 200 and, for routes with input, its own `{"detail": …}` 422. darkroom answers every error as
`{"error": {"code", "message", "field"}}` (errors.py), the OpenAI routes as OpenAI's `{"error": {"message", "type",
"param", "code"}}` (openai_compat.py), and most statuses follow from how a route is built, so they are derived from
the route rather than listed per route: a path parameter can name nothing (404), a body can be too large (413), a
`require(...)` dependency authenticates, authorizes and rate-limits (401, 403, 429), and every route behind the edge
can be refused while the server is full (429 `overloaded`) or the database or storage is down (503). Clients (and
the schema fuzz in tests/integration) can then tell an answer the API promises from one it does not."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, routing
from fastapi.dependencies.models import Dependant
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute, RouteContext

from darkroom.auth.principal import Permission

from .auth import require
from .comfyui.routes import ComfyRoute
from .edge import PROBES
from .openai_compat import OpenAIRoute

PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "field": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            },
        }
    },
}
OPENAI_ERROR_SCHEMA: dict[str, Any] = {
    "title": "OpenAIError",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                "code": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            },
        }
    },
}
COMFYUI_ERROR_SCHEMA: dict[str, Any] = {
    "title": "ComfyUIError",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {
                "type": {"type": "string"},
                "message": {"type": "string"},
                "details": {"type": "string"},
                "extra_info": {"type": "object"},
            },
        },
        "node_errors": {"type": "object", "description": "per node id: what is wrong with that node"},
    },
}
PROBLEM = "#/components/schemas/Problem"
OPENAI_ERROR = "#/components/schemas/OpenAIError"
COMFYUI_ERROR = "#/components/schemas/ComfyUIError"

# The compatibility routes wait for their job: with no worker finishing in time they answer 504 `timeout` (their
# clients know no job to poll), and a job that failed as the error it ended with (compat.raise_for_job: 500).
# `POST /v1/generate` answers 202 with the job instead (documented on the route).
WAITS = frozenset(
    {
        "/sdapi/v1/txt2img",
        "/sdapi/v1/img2img",
        "/sdapi/v1/extra-single-image",
        "/sdapi/v1/extra-batch-images",
        "/v1/images/generations",
        "/v1/images/edits",
        "/v1/images/variations",
    }
)
# A1111 routes darkroom answers on purpose with 501 `not_implemented` (api/a1111_info.py), never a made-up result.
NOT_IMPLEMENTED = frozenset({"/sdapi/v1/interrogate"})
# Routes whose answer follows the caller's Accept (`POST /v1/generate` with `Accept: image/png`): 406 when the
# request cannot be answered that way (one PNG, but n > 1).
NEGOTIATES = frozenset({"/v1/generate"})
# Answered by the edge (api/edge.py) or the app's handlers (errors.py) before or around an OpenAI route's own
# handling, so in darkroom's shape there as well.
EDGE_STATUSES = frozenset({413, 429, 503})
DESCRIPTIONS = {
    400: "Invalid request (OpenAI's status for it)",
    401: "Missing, unknown or revoked API key",
    403: "The key's role may not do this, or the image is held for review",
    404: "Nothing with this id (or not yours)",
    406: "The `Accept` header asks for what this request cannot give (image/png for more than one image)",
    409: "Conflicts with the current state: a reused Idempotency-Key, a job or image already settled",
    413: "The request body, or an upload in it, is too large",
    422: "Invalid request: the `field` names what is wrong",
    429: "Rate limit or quota reached, the tenant's queue is full, or the server is `overloaded`; see Retry-After",
    500: "The job failed on the worker; `code` is the error it ended with",
    503: "The database (`database_unavailable`) or storage is unavailable; see Retry-After",
    501: "Not available in darkroom (`not_implemented`)",
    504: "No worker finished the job within the wait (`timeout`); the job stays queued",
    507: "The blob store is full (`storage_full`)",
}
_REQUIRE = require(Permission.generate).__code__  # every `require(permission)` closure shares this code object


def build(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI document with the error responses added; built once, then cached on the app."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.pop("HTTPValidationError", None)  # FastAPI's `{"detail": …}`: darkroom never answers it
        components.pop("ValidationError", None)
        components["Problem"] = PROBLEM_SCHEMA
        components["OpenAIError"] = OPENAI_ERROR_SCHEMA
        components["ComfyUIError"] = COMFYUI_ERROR_SCHEMA
        for context in routing.iter_route_contexts(app.routes):  # routers included in the app, flattened
            route = context.original_route
            if isinstance(route, APIRoute) and context.include_in_schema:
                operations = schema["paths"][context.path_format]
                for method in context.methods or ():
                    operation = operations[method.lower()]
                    operation["responses"] = _with_errors(context, method, operation)
        app.openapi_schema = schema
    return app.openapi_schema


def error_statuses(route: RouteContext, method: str, has_body: bool) -> set[int]:
    """The error statuses `route` can answer to `method`, from how it is built."""
    statuses: set[int] = set()
    if route.path_format in PROBES:  # not behind the edge; /readyz documents its own 503
        return statuses
    statuses |= {429, 503}
    if route.dependant.path_params or route.dependant.query_params or route.dependant.header_params or has_body:
        statuses.add(422)
    if route.dependant.path_params:
        statuses.add(404)
    if has_body:
        statuses.add(413)
    permissions = _permissions(route.dependant)
    if permissions:
        statuses |= {401, 403}
    writes = method in ("POST", "PUT", "PATCH", "DELETE")
    idempotent = any(p.alias.lower() == "idempotency-key" for p in route.dependant.header_params)
    if writes and (route.dependant.path_params or idempotent):
        statuses.add(409)
    if writes and has_body and permissions == {Permission.generate}:  # submits a job: stores what it carries
        statuses.add(507)
    if route.path_format in WAITS:
        statuses |= {500, 504}
    if route.path_format in NEGOTIATES:
        statuses.add(406)
    if route.path_format in NOT_IMPLEMENTED:
        statuses.add(501)
    if _own_shape(route) is not None and 422 in statuses:  # OpenAI and ComfyUI call a bad request a 400
        statuses = (statuses - {422}) | {400}
    if isinstance(route.original_route, ComfyRoute):  # they read bodies and names themselves (no schema to show)
        statuses |= {400, 404}
    return statuses


def _own_shape(route: RouteContext) -> str | None:
    """The error schema of a compatibility route that answers in its ecosystem's shape (None: darkroom's)."""
    if isinstance(route.original_route, OpenAIRoute):
        return OPENAI_ERROR
    if isinstance(route.original_route, ComfyRoute):
        return COMFYUI_ERROR
    return None


def _with_errors(route: RouteContext, method: str, operation: dict[str, Any]) -> dict[str, Any]:
    responses = {k: v for k, v in operation.get("responses", {}).items() if k != "422"}  # FastAPI's shape
    own = _own_shape(route)
    for status in sorted(error_statuses(route, method, "requestBody" in operation)):
        if own is not None and status in EDGE_STATUSES:
            schema: dict[str, Any] = {"anyOf": [{"$ref": own}, {"$ref": PROBLEM}]}
        else:
            schema = {"$ref": own or PROBLEM}
        response: dict[str, Any] = {
            "description": DESCRIPTIONS[status],
            "content": {"application/json": {"schema": schema}},
        }
        if status in (429, 503):
            response["headers"] = {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}}
        responses.setdefault(str(status), response)
    return responses


def _permissions(dependant: Dependant) -> set[Permission]:
    """The permissions the route's `require(...)` dependencies check (its router's and its own)."""
    found = set()
    if dependant.call is not None and getattr(dependant.call, "__code__", None) is _REQUIRE:
        cells = dict(zip(dependant.call.__code__.co_freevars, dependant.call.__closure__ or (), strict=True))
        found.add(cells["permission"].cell_contents)
    for sub in dependant.dependencies:
        found |= _permissions(sub)
    return found
