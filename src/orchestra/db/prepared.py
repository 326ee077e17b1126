"""Statements compiled once to SQLite's SQL and run on the writer's raw ``sqlite3`` connection:
the hot path's writes (:mod:`~orchestra.db.queue`, :mod:`~orchestra.db.attempts`,
:mod:`~orchestra.db.events`)."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect

_DIALECT = sqlite_dialect(paramstyle="qmark")


class Prepared:
    """A Core statement compiled once to SQLite's SQL and run on the writer's raw ``sqlite3``
    connection, inside the transaction :meth:`~orchestra.db.engine.Database.transaction` opened.

    For the hot path: SQLAlchemy's per-call work (building the statement, its cache key,
    parameter processing) cost more CPU than SQLite itself — about 40 % of the service's CPU in
    the throughput benchmark. Parameters are ``bindparam`` names; only plain values (text,
    numbers, None) may be bound, since no type processing runs.
    """

    def __init__(self, statement: Any) -> None:
        compiled = statement.compile(dialect=_DIALECT)
        self.sql: str = compiled.string
        self._names: tuple[str, ...] = tuple(compiled.positiontup or ())
        # Values fixed in the statement itself (literal binds), by name.
        self._defaults: dict[str, Any] = {
            name: bind.value for name, bind in compiled.binds.items() if not bind.required
        }

    def _values(self, params: Mapping[str, Any]) -> list[Any]:
        return [params[n] if n in params else self._defaults[n] for n in self._names]

    def run(self, conn: Connection, params: Mapping[str, Any]) -> sqlite3.Cursor:
        """Execute once; returns the cursor (``rowcount``, ``fetchall()``)."""
        raw: sqlite3.Connection = conn.connection.driver_connection  # type: ignore[assignment]
        return raw.execute(self.sql, self._values(params))

    def rows(self, conn: Connection, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Execute once; every row as a mapping of column name to value."""
        cursor = self.run(conn, params)
        names = [d[0] for d in cursor.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def run_many(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        """Execute once per parameter set."""
        raw: sqlite3.Connection = conn.connection.driver_connection  # type: ignore[assignment]
        raw.executemany(self.sql, [self._values(r) for r in rows])
