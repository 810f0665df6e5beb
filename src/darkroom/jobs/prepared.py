"""Prepared statements: hot SQL rendered once per dialect, run without SQLAlchemy's per-call compile work.

A submit runs seven statements in its transaction. Through `Connection.execute`, even a statement built once at
import costs more Python than SQLite spends running it: SQLAlchemy walks the statement's tree for its cache key on
every call (the admission snapshot and the status read are selects of a dozen nested subqueries), builds the
parameters through the compiled form and sets up typed result processing. Profiled on the 2-core machine at 16
clients, that machinery was about a quarter of the API process's time holding the GIL, and SQLite's own work a
twentieth.

`Prepared` renders a statement once per dialect, keeps the order of its bound parameters and their types' bind
processors (the same ones SQLAlchemy applies), and runs it with `Connection.exec_driver_sql`: on the caller's
connection and transaction, seen by the engine's events (the statement budgets count them), without the per-call
compile. Rows come back as the driver returns them, so it is for statements whose result columns need no
processing (numbers and strings: counts, tags, rates), and for writes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.sql.compiler import SQLCompiler


@dataclass(frozen=True)
class _Rendered:
    sql: str
    names: tuple[str, ...] | None  # positional paramstyles (SQLite's `?`): the bound names in order; else by name
    processors: Mapping[str, Callable[[Any], Any]]
    fixed: Mapping[str, Any]  # values the statement carries itself (a LIMIT), by bound name

    def bind(self, params: Mapping[str, Any]) -> tuple[Any, ...] | dict[str, Any]:
        values = {**self.fixed, **params} if self.fixed else params
        processors = self.processors
        if self.names is None:
            return {k: (processors[k](v) if k in processors else v) for k, v in values.items()}
        return tuple(processors[k](values[k]) if k in processors else values[k] for k in self.names)


def _render(statement: sa.ClauseElement, dialect: sa.Dialect, column_keys: Sequence[str] | None) -> _Rendered:
    keys = list(column_keys) if column_keys is not None else None
    compiled = cast(SQLCompiler, statement.compile(dialect=dialect, column_keys=keys))  # (compiles are SQLCompilers)
    binds = compiled.binds
    if "POSTCOMPILE" in compiled.string or any(b.expanding for b in binds.values()):
        raise ValueError("a statement with expanding (IN) or literal-execute parameters cannot be prepared")
    processors = {}
    for name, bind in binds.items():
        processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
        if processor is not None:
            processors[name] = processor
    fixed = {name: bind.effective_value for name, bind in binds.items() if not bind.required}
    if column_keys is not None and (extra := set(binds) - set(column_keys)):
        raise ValueError(f"the prepared INSERT also binds {sorted(extra)}: give every column it sets")
    names = tuple(compiled.positiontup or ()) if dialect.positional else None
    return _Rendered(compiled.string, names, processors, fixed)


class Prepared:
    """`statement`, rendered for each dialect on first use and then run by `execute` with plain parameters."""

    def __init__(self, statement: sa.ClauseElement) -> None:
        self.statement = statement
        self._rendered: dict[str, _Rendered] = {}

    def execute(self, conn: sa.Connection, params: Mapping[str, Any]) -> sa.CursorResult[Any]:
        rendered = self._rendered.get(conn.dialect.name)
        if rendered is None:
            rendered = self._rendered[conn.dialect.name] = _render(self.statement, conn.dialect, None)
        return conn.exec_driver_sql(rendered.sql, rendered.bind(params))


class PreparedInsert:
    """`table.insert()` for rows given as dicts of column values: rendered once per dialect and set of columns
    (every column a row names, in its order), one row or many (`executemany`)."""

    def __init__(self, table: sa.Table) -> None:
        self.table = table
        self._rendered: dict[tuple[str, tuple[str, ...]], _Rendered] = {}

    def execute(self, conn: sa.Connection, rows: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> None:
        many = [rows] if isinstance(rows, Mapping) else list(rows)
        key = (conn.dialect.name, tuple(many[0]))
        rendered = self._rendered.get(key)
        if rendered is None:
            rendered = self._rendered[key] = _render(self.table.insert(), conn.dialect, key[1])
        if len(many) == 1:
            conn.exec_driver_sql(rendered.sql, rendered.bind(many[0]))
        else:
            conn.exec_driver_sql(rendered.sql, [rendered.bind(row) for row in many])
