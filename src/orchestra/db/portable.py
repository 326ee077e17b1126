"""SQL that says the same on SQLite and PostgreSQL where their words differ: index hints
(SQLite's alone), case-insensitive LIKE (SQLite's LIKE is, PostgreSQL's ILIKE is), the time
between two stored times, and the column types of the migrations' DDL."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import ColumnElement, Float, Text, literal
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ColumnElement as _ColumnElement
from sqlalchemy.sql.visitors import InternalTraversal

_HINT = re.compile(r"\s+(INDEXED BY \w+|NOT INDEXED)\b")


def hinted(sql: str, dialect: str) -> str:
    """``sql`` with its SQLite index hints (``INDEXED BY``) for SQLite, without them
    elsewhere (PostgreSQL's planner takes no hints)."""
    return sql if dialect == "sqlite" else _HINT.sub("", sql)


class _Unindexed(_ColumnElement[Any]):
    inherit_cache = True
    _traverse_internals = [("column", InternalTraversal.dp_clauseelement)]

    def __init__(self, column: ColumnElement[Any]) -> None:
        self.column = column
        self.type = column.type


@compiles(_Unindexed)
def _unindexed_default(element: _Unindexed, compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(element.column, **kw)


@compiles(_Unindexed, "sqlite")
def _unindexed_sqlite(element: _Unindexed, compiler: SQLCompiler, **kw: Any) -> str:
    return "+" + compiler.process(element.column, **kw)


def unindexed(column: ColumnElement[Any]) -> ColumnElement[Any]:
    """The same value, but on SQLite a condition on it cannot choose an index (``+column``);
    elsewhere the column itself."""
    return _Unindexed(column)


class _Contains(_ColumnElement[bool]):
    inherit_cache = True
    _traverse_internals = [
        ("column", InternalTraversal.dp_clauseelement),
        ("pattern", InternalTraversal.dp_clauseelement),
    ]

    def __init__(self, column: ColumnElement[Any], pattern: str) -> None:
        self.column = column
        self.pattern = literal(pattern, Text())


def _like(element: _Contains, compiler: SQLCompiler, operator: str, **kw: Any) -> str:
    column = compiler.process(element.column, **kw)
    pattern = compiler.process(element.pattern, **kw)
    return f"{column} {operator} {pattern} ESCAPE '\\'"


@compiles(_Contains)
def _contains_default(element: _Contains, compiler: SQLCompiler, **kw: Any) -> str:
    return _like(element, compiler, "LIKE", **kw)


@compiles(_Contains, "postgresql")
def _contains_postgresql(element: _Contains, compiler: SQLCompiler, **kw: Any) -> str:
    return _like(element, compiler, "ILIKE", **kw)


def like(column: ColumnElement[Any], pattern: str) -> ColumnElement[bool]:
    """``column LIKE pattern ESCAPE '\\'``, case-insensitive for ASCII on every engine (as
    SQLite's LIKE is)."""
    return _Contains(column, pattern)


class _Greatest(_ColumnElement[Any]):
    inherit_cache = True
    _traverse_internals = [
        ("left", InternalTraversal.dp_clauseelement),
        ("right", InternalTraversal.dp_clauseelement),
    ]

    def __init__(self, left: ColumnElement[Any], right: ColumnElement[Any]) -> None:
        self.left = left
        self.right = right
        self.type = left.type


@compiles(_Greatest)
def _greatest_default(element: _Greatest, compiler: SQLCompiler, **kw: Any) -> str:
    left, right = compiler.process(element.left, **kw), compiler.process(element.right, **kw)
    return f"GREATEST({left}, {right})"


@compiles(_Greatest, "sqlite")
def _greatest_sqlite(element: _Greatest, compiler: SQLCompiler, **kw: Any) -> str:
    left, right = compiler.process(element.left, **kw), compiler.process(element.right, **kw)
    return f"max({left}, {right})"


def greatest(left: ColumnElement[Any], right: ColumnElement[Any]) -> ColumnElement[Any]:
    """The larger of two values (SQLite's two-argument ``max``, PostgreSQL's ``GREATEST``)."""
    return _Greatest(left, right)


class _ElapsedMs(_ColumnElement[Any]):
    inherit_cache = True
    _traverse_internals = [
        ("start", InternalTraversal.dp_clauseelement),
        ("end", InternalTraversal.dp_clauseelement),
    ]

    def __init__(self, start: ColumnElement[Any], end: ColumnElement[Any]) -> None:
        self.start = start
        self.end = end
        self.type = Float()


@compiles(_ElapsedMs)
def _elapsed_default(element: _ElapsedMs, compiler: SQLCompiler, **kw: Any) -> str:
    start, end = compiler.process(element.start, **kw), compiler.process(element.end, **kw)
    # GREATEST skips a NULL, so a NULL time is kept NULL by the CASE.
    return (
        f"CASE WHEN {start} IS NULL OR {end} IS NULL THEN NULL ELSE"
        f" GREATEST(round(CAST(EXTRACT(EPOCH FROM (CAST({end} AS timestamptz)"
        f" - CAST({start} AS timestamptz))) * 1000 AS numeric), 3), 0) END"
    )


@compiles(_ElapsedMs, "sqlite")
def _elapsed_sqlite(element: _ElapsedMs, compiler: SQLCompiler, **kw: Any) -> str:
    # Whole seconds, then the microseconds from the text (fixed width: domain.iso):
    # julianday() keeps whole milliseconds, and the difference of two such large doubles
    # read 12.345 ms as 11.989.
    start, end = compiler.process(element.start, **kw), compiler.process(element.end, **kw)
    # max() of SQLite is NULL when an argument is: a NULL time gives NULL. Rounded to the
    # microsecond: across a second's boundary the sum of the two parts is a float near it
    # (12.345000000000027 for 12.345 ms).
    return (
        f"max(round((strftime('%s', {end}) - strftime('%s', {start})) * 1000.0"
        f" + (CAST(substr({end}, 21, 6) AS INTEGER)"
        f" - CAST(substr({start}, 21, 6) AS INTEGER)) / 1000.0, 3), 0.0)"
    )


def elapsed_ms(start: ColumnElement[Any], end: ColumnElement[Any]) -> ColumnElement[Any]:
    """Milliseconds from ``start`` to ``end``, two stored times (ISO-8601 text as
    :func:`~orchestra.domain.iso` writes them), to the microsecond on both engines; never
    below 0 (two hosts' clocks); NULL when either is."""
    return _ElapsedMs(start, end)


#: SQLite's words and PostgreSQL's, for the types that differ. SQLite's INTEGER is 64 bits;
#: PostgreSQL's is 32, and a priority or a version past 2**31 must fit as it does on SQLite.
_POSTGRESQL_TYPES = (
    (
        r"\bINTEGER NOT NULL PRIMARY KEY AUTOINCREMENT\b",
        "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
    ),
    (r"\bINTEGER\b", "BIGINT"),
    (r"\bFLOAT\b", "DOUBLE PRECISION"),
)


def portable_ddl(statement: str, dialect: str) -> str:
    """``statement`` (SQLite's DDL, as migrations write it) in the words of ``dialect``."""
    if dialect != "postgresql":
        return statement
    for pattern, words in _POSTGRESQL_TYPES:
        statement = re.sub(pattern, words, statement)
    return statement
