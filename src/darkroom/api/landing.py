"""`/`: a small page that works offline and says where things are.

`/` used to redirect to FastAPI's Swagger UI, which loads its script and styles from a CDN: on the closed networks
darkroom is self-hosted on, that page is blank. This one is plain HTML with no external assets (no script, no
stylesheet, no font), so it renders anywhere, and it links to what works without a network: the OpenAPI schema, the
health and readiness probes. The interactive docs are still linked, with a note that they need the CDN. A real web
UI is a later piece of work; this page stays a map."""

from __future__ import annotations

from html import escape

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from darkroom import __version__

router = APIRouter(include_in_schema=False)

LINKS: tuple[tuple[str, str], ...] = (
    ("/openapi.json", "OpenAPI schema (JSON): every route, body and error"),
    ("/docs", "interactive API docs (Swagger UI; loads its assets from a CDN, so it needs internet access)"),
    ("/redoc", "API reference (ReDoc; also loads from a CDN)"),
    ("/healthz", "liveness"),
    ("/readyz", "readiness: database, storage, models"),
    ("/v1/models", "approved models (needs a key once keys exist)"),
)

EXAMPLE = """curl -s $DARKROOM_URL/v1/generate -H 'content-type: application/json' \\
  -d '{"prompt": "a lighthouse at dusk", "seed": 42}'"""


def page() -> str:
    items = "\n".join(
        f'<li><a href="{escape(href)}"><code>{escape(href)}</code></a> {escape(text)}</li>' for href, text in LINKS
    )
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>darkroom {escape(__version__)}</title>
<style>
body {{ font: 16px/1.5 system-ui, sans-serif; max-width: 46rem; margin: 2rem auto; padding: 0 1rem; }}
code, pre {{ font-family: ui-monospace, monospace; }}
pre {{ background: #f4f4f4; padding: .75rem; overflow-x: auto; }}
</style>
</head>
<body>
<h1>darkroom <small>{escape(__version__)}</small></h1>
<p>Self-hosted image generation: durable jobs, workers, full provenance. This server speaks three APIs: native
<code>/v1</code>, AUTOMATIC1111's <code>/sdapi/v1</code> and OpenAI's <code>/v1/images</code>.</p>
<ul>
{items}
</ul>
<p>Try it:</p>
<pre>{escape(EXAMPLE)}</pre>
<p>The API reference with curl and Python examples is <code>docs/api.md</code> in the repository.</p>
</body>
</html>
"""


@router.get("/", response_class=HTMLResponse)
def landing() -> HTMLResponse:
    return HTMLResponse(page())
