"""Statements compiled once per engine and run on the transaction's own DB-API connection
(``sqlite3`` or psycopg): the hot path's writes (:mod:`~orchestra.db.queue`,
:mod:`~orchestra.db.attempts`, :mod:`~orchestra.db.events`)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection


@functools.cache
def _dialect(engine: str) -> Any:
    """The SQLAlchemy dialect statements are compiled for, imported when first needed (the
    PostgreSQL dialect's modules cost a SQLite service's start about 0.1 s of CPU)."""
    if engine == "postgresql":
        from sqlalchemy.dialects.postgresql.psycopg import dialect as pg_dialect

        return pg_dialect(paramstyle="pyformat")  # type: ignore[no-untyped-call]
    from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect

    return sqlite_dialect(paramstyle="qmark")


def insert_of(engine: str) -> Callable[..., Any]:
    """The INSERT (with ``on_conflict_do_nothing`` / ``…_do_update``) of an engine
    ("sqlite", "postgresql")."""
    if engine == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert


def insert_for(conn: Connection) -> Callable[..., Any]:
    """The INSERT (with ``on_conflict_do_nothing`` / ``…_do_update``) of ``conn``'s engine."""
    return insert_of(conn.dialect.name)


class _Compiled:
    def __init__(self, statement: Any, dialect: Any) -> None:
        compiled = statement.compile(dialect=dialect)
        self.sql: str = compiled.string
        self.positional = compiled.positiontup is not None
        self.names: tuple[str, ...] = tuple(compiled.positiontup or compiled.binds)
        # Values fixed in the statement itself (literal binds), by name.
        self.defaults: dict[str, Any] = {
            name: bind.value for name, bind in compiled.binds.items() if not bind.required
        }

    def values(self, params: Mapping[str, Any]) -> Any:
        if self.positional:
            return [params[n] if n in params else self.defaults[n] for n in self.names]
        return {n: params[n] if n in params else self.defaults.get(n) for n in self.names}


class Prepared:
    """A Core statement compiled once for each engine and run on the transaction's raw DB-API
    connection, inside the transaction :meth:`~orchestra.db.engine.Database.transaction`
    opened.

    For the hot path: SQLAlchemy's per-call work (building the statement, its cache key,
    parameter processing) cost more CPU than SQLite itself — about 40 % of the service's CPU in
    the throughput benchmark. Parameters are ``bindparam`` names; only plain values (text,
    numbers, None) may be bound, since no type processing runs.

    Args:
        statement: the statement, or a function of the engine's name ("sqlite",
            "postgresql") that builds it, where the engines need different SQL (an INSERT with
            ON CONFLICT, the claim's row locks).
    """

    def __init__(self, statement: Any) -> None:
        self._statement = statement
        self._compiled: dict[str, _Compiled] = {}

    def _for(self, conn: Connection) -> tuple[_Compiled, Any]:
        name = conn.dialect.name
        compiled = self._compiled.get(name)
        if compiled is None:
            statement = self._statement
            if callable(statement):
                statement = statement(name)
            compiled = self._compiled[name] = _Compiled(statement, _dialect(name))
        return compiled, conn.connection.driver_connection

    def statement(self, dialect: str = "sqlite") -> Any:
        """The Core statement for an engine (to build a bigger statement around it)."""
        statement = self._statement
        return statement(dialect) if callable(statement) else statement

    def sql(self, dialect: str = "sqlite") -> str:
        """The statement's SQL for an engine (for tests and EXPLAIN)."""
        return _Compiled(self.statement(dialect), _dialect(dialect)).sql

    def run(self, conn: Connection, params: Mapping[str, Any]) -> Any:
        """Execute once; returns the cursor (``rowcount``, ``fetchall()``)."""
        compiled, raw = self._for(conn)
        return raw.execute(compiled.sql, compiled.values(params))

    def rows(self, conn: Connection, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Execute once; every row as a mapping of column name to value."""
        cursor = self.run(conn, params)
        names = [d[0] for d in cursor.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def run_many(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        """Execute once per parameter set."""
        compiled, raw = self._for(conn)
        values = [compiled.values(r) for r in rows]
        if conn.dialect.name == "sqlite":
            raw.executemany(compiled.sql, values)
        else:
            raw.cursor().executemany(compiled.sql, values)
