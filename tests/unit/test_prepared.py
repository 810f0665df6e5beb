"""Prepared statements (`jobs.prepared`) on SQLite and PostgreSQL: what they write and read is what SQLAlchemy's own
execution writes and reads for the same statement, the engine's events still see them, and statements they cannot
run as rendered are refused when first used."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa

from darkroom import clock
from darkroom.jobs.db import create_engine, migrate, write_tx
from darkroom.jobs.prepared import Prepared, PreparedInsert
from darkroom.jobs.store import JobStore, _job, _one_live_params, _one_live_statement
from darkroom.jobs.tables import job_events, jobs
from darkroom.schemas import GenerationRequest


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request, tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    migrate(url, lock_dir=tmp_path)
    engine = create_engine(url)
    yield engine
    engine.dispose()


def new_row(i: int, created: dt.datetime) -> dict:
    request = GenerationRequest(prompt=f"p{i}", width=64, height=64, steps=4, seed=i)
    row = JobStore._new_row(request, "t", 0, created, None, f"h{i}", f"req{i}", 3, None)
    return {**row, "fair_tag": float(i), "result": {"nested": [1, 2.5, None]}, "cancel_requested": True}


def test_a_prepared_insert_writes_the_row_sqlalchemy_writes(engine):
    ours = new_row(1, clock.utcnow() - dt.timedelta(seconds=5))
    theirs = {**ours, "id": "job_theirs", "idempotency_key": "k"}  # (the unique keys differ, the rest is the same)
    with write_tx(engine) as conn:
        PreparedInsert(jobs).execute(conn, ours)
        conn.execute(jobs.insert(), theirs)
    with engine.connect() as conn:
        got = {r.id: r._asdict() for r in conn.execute(sa.select(jobs))}
    mine, same = got.pop(ours["id"]), got.pop("job_theirs")
    assert {**mine, "id": "", "idempotency_key": ""} == {**same, "id": "", "idempotency_key": ""}
    assert mine["request"] == ours["request"] and mine["result"] == {"nested": [1, 2.5, None]}  # JSON
    assert mine["cancel_requested"] is True and mine["error"] is None and mine["started_at"] is None
    assert mine["created_at"].replace(tzinfo=None) == ours["created_at"].replace(tzinfo=None)  # SQLite drops the zone


def test_a_prepared_insert_of_many_rows_and_its_statements_seen_by_the_engines_events(engine):
    seen: list[str] = []
    sa.event.listen(engine, "before_cursor_execute", lambda conn, cur, statement, *rest: seen.append(statement))
    now = clock.utcnow()
    with write_tx(engine) as conn:
        row = new_row(1, now)
        PreparedInsert(jobs).execute(conn, row)
        events = [{"job_id": row["id"], "type": "x", "data": {"i": i}, "created_at": now} for i in range(3)]
        PreparedInsert(job_events).execute(conn, events)
    inserts = [s for s in seen if s.lstrip().upper().startswith("INSERT")]
    assert len(inserts) == 2  # one statement for the three events (executemany)
    with engine.connect() as conn:
        assert [r.data for r in conn.execute(sa.select(job_events).order_by(job_events.c.id))] == [
            {"i": 0},
            {"i": 1},
            {"i": 2},
        ]


def test_a_prepared_select_answers_as_sqlalchemy_does(engine):
    """The status read of one queued job: bounded counts with their LIMITs carried by the statement, a datetime
    parameter, scalar subqueries; the same row through both paths."""
    now = clock.utcnow()
    rows = [new_row(i, now + dt.timedelta(microseconds=i)) for i in range(5)]
    with write_tx(engine) as conn:
        PreparedInsert(jobs).execute(conn, rows)
    job = _job(rows[3])
    statement = _one_live_statement(True)
    with engine.connect() as conn:
        expected = conn.execute(statement, _one_live_params(job)).one()._asdict()
        got = Prepared(statement).execute(conn, _one_live_params(job)).one()._asdict()
    assert got == expected
    assert got["p0"] == 3  # the three jobs with smaller fair tags


def test_statements_that_cannot_run_as_rendered_are_refused(engine):
    with engine.connect() as conn:
        with pytest.raises(ValueError, match="expanding"):
            Prepared(sa.select(jobs.c.id).where(jobs.c.id.in_(sa.bindparam("ids", expanding=True)))).execute(
                conn, {"ids": ["a"]}
            )
        row = new_row(1, clock.utcnow())
        del row["attempts"]  # a column with a Python-side default SQLAlchemy would fill in
        with pytest.raises(ValueError, match="attempts"):
            PreparedInsert(jobs).execute(conn, row)
