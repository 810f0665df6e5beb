"""The web UI: server-rendered pages (Jinja2) with htmx for the live parts, served by the API process itself.

A browser signs in with an API key once; the key never reaches the browser again. What it holds is a session cookie
that resolves, on every request, to the same `Principal` the key would give on the API (`web.session_auth`), so a
page shows exactly what the API would answer that key. Assets are vendored under `static/` (no CDN, no build step).
"""
