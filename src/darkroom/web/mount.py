"""Attach the UI to the API app: its routes, its static files, and HTML errors on its paths."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from . import account, docs, errors, gallery, generate, manage, queue, review
from .render import STATIC


def install(app: FastAPI) -> None:
    """Call after the API's error handlers are installed (the UI's wraps the API's for `/ui/` paths)."""
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")
    for module in (account, generate, queue, review, gallery, manage, docs):
        app.include_router(module.router)
    errors.install(app)
