"""Closing the database: what was asked for before ends first; nothing starts after.

A write that came late to a stopping service (a step's streamed text flushed 50 ms after its
task was handed back) used to run on SQLite's writer connection while ``close()`` closed it on
the writer's thread: a segfault inside SQLite at a service's stop, once in five full runs.
"""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import Connection, text

from orchestra.db import Database
from orchestra.errors import StorageUnavailable


async def _opened(db_url: str) -> Database:
    db = Database(db_url)  # migrated already
    await db.transaction(lambda conn: conn.execute(text("CREATE TABLE marks (n INTEGER)")))
    return db


def _mark(n: int) -> object:
    def work(conn: Connection) -> None:
        conn.execute(text("INSERT INTO marks VALUES (:n)"), {"n": n})

    return work


async def test_nothing_starts_on_a_closed_database_and_each_refusal_names_it(
    db_url: str,
) -> None:
    db = await _opened(db_url)
    await db.close()
    for small in (True, False):
        with pytest.raises(StorageUnavailable, match="closed"):
            await db.transaction(_mark(1), small=small)  # type: ignore[arg-type]
    with pytest.raises(StorageUnavailable, match="closed"):
        await db.read_now(lambda conn: conn.execute("SELECT 1").fetchall())
    with pytest.raises(StorageUnavailable, match="closed"):
        async with db.read():
            pass
    await db.close()  # a second close has nothing left to do


async def test_a_write_asked_for_while_the_database_closes_is_refused_and_the_queued_ones_end(
    db_url: str,
) -> None:
    db = await _opened(db_url)
    queued = [asyncio.ensure_future(db.transaction(_mark(n), small=n % 2 == 0)) for n in range(6)]
    closing = asyncio.ensure_future(db.close())
    await asyncio.sleep(0)  # close() has begun: it waits for what was queued
    with pytest.raises(StorageUnavailable, match="closed"):
        await db.transaction(_mark(99), small=True)  # type: ignore[arg-type]
    await closing
    assert all(f.done() and f.exception() is None for f in queued)

    again = Database(db_url)
    try:
        marks = await again.read_now(
            lambda conn: conn.execute("SELECT n FROM marks ORDER BY n").fetchall()
        )
    finally:
        await again.close()
    assert [n for (n,) in marks] == list(range(6))
