"""Alembic environment: runs against the URL darkroom passes in (see darkroom.jobs.db.migrate)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from darkroom.jobs.db import create_engine
from darkroom.jobs.tables import metadata

config = context.config


def run() -> None:
    url = config.get_main_option("sqlalchemy.url")
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_with(connection)
        return
    engine = create_engine(url or "")
    try:
        with engine.connect() as conn:
            _run_with(conn)
    finally:
        engine.dispose()


def _run_with(conn: Connection) -> None:
    context.configure(connection=conn, target_metadata=metadata, render_as_batch=conn.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()
    if conn.in_transaction():
        conn.commit()


run()
