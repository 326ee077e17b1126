"""The writer's group commit: transactions waiting together commit together, and one that
fails is rolled back alone."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import Connection, event, text

from orchestra.db import Database
from tests.fixtures.servers import wait_until


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = Database(db_url)
    await database.transaction(
        lambda conn: conn.execute(text("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)"))
    )
    yield database
    await database.close()


def _insert(k: int, fail: bool = False) -> object:
    def work(conn: Connection) -> int:
        conn.execute(text("INSERT INTO t (k, v) VALUES (:k, 'x')"), {"k": k})
        if fail:
            raise ValueError(f"unit {k} refuses")
        return k * 10

    return work


async def test_waiting_transactions_commit_together_and_a_failure_stays_alone(
    db: Database,
) -> None:
    commits: list[int] = []
    event.listen(db._writer, "commit", lambda _conn: commits.append(1))
    gate, entered = threading.Event(), threading.Event()

    def blocker(conn: Connection) -> str:
        entered.set()
        gate.wait(10)
        conn.execute(text("INSERT INTO t (k, v) VALUES (0, 'first')"))
        return "first"

    first = asyncio.ensure_future(db.transaction(blocker))
    await wait_until(entered.is_set)  # the writer is inside ``blocker``
    rest = [asyncio.ensure_future(db.transaction(_insert(k, fail=k == 5))) for k in range(1, 11)]
    await asyncio.sleep(0)  # each has asked for its transaction (the first thing it does)
    gate.set()
    assert await first == "first"
    results = await asyncio.gather(*rest, return_exceptions=True)

    assert [r for r in results if not isinstance(r, BaseException)] == [
        k * 10 for k in range(1, 11) if k != 5
    ]
    [error] = [r for r in results if isinstance(r, BaseException)]
    assert isinstance(error, ValueError) and "unit 5" in str(error)
    # The blocker alone, then the ten waiting ones in one commit.
    assert len(commits) == 2
    with sqlite3.connect(db.path) as conn:
        keys = [k for (k,) in conn.execute("SELECT k FROM t ORDER BY k")]
    assert keys == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10]


async def test_a_single_failing_transaction_writes_nothing(db: Database) -> None:
    with pytest.raises(ValueError):
        await db.transaction(_insert(1, fail=True))
    assert await db.transaction(_insert(2)) == 20
    with sqlite3.connect(db.path) as conn:
        assert [k for (k,) in conn.execute("SELECT k FROM t")] == [2]


async def test_a_cancelled_caller_does_not_cut_its_transaction_short(db: Database) -> None:
    gate, entered = threading.Event(), threading.Event()

    def slow(conn: Connection) -> None:
        entered.set()
        gate.wait(10)
        conn.execute(text("INSERT INTO t (k, v) VALUES (7, 'done')"))

    waiter = asyncio.ensure_future(db.transaction(slow))
    await wait_until(entered.is_set)
    waiter.cancel()
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    with sqlite3.connect(db.path) as conn:
        assert conn.execute("SELECT v FROM t WHERE k = 7").fetchone() == ("done",)
