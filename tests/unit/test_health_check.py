"""/health's database check: reused while recent, checked again when due or when writes change.

A real database on a tmp file; the clock is injected, and the checks are counted by wrapping
the database's own ``state``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from orchestra.api.health import DatabaseCheck
from orchestra.db import Database
from orchestra.db.failures import DatabaseState
from orchestra.errors import StorageFull, StorageUnavailable


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Counted:
    """The database with its ``state`` calls counted."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.checks = 0
        state = db.state

        async def counting(min_free_mb: float) -> DatabaseState:
            self.checks += 1
            return await state(min_free_mb)

        db.state = counting  # type: ignore[method-assign]


@pytest.fixture
async def counted(db: Database) -> AsyncIterator[Counted]:
    yield Counted(db)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def check(counted: Counted, clock: Clock) -> DatabaseCheck:
    return DatabaseCheck(counted.db, min_free_mb=0, max_age=1.0, clock=clock)


async def test_a_recent_check_is_reused_until_it_is_due(
    check: DatabaseCheck, counted: Counted, clock: Clock
) -> None:
    first = await check.state()
    for _ in range(5):
        assert await check.state() is first
    clock.now += 0.99
    await check.state()
    assert counted.checks == 1
    clock.now += 0.01
    await check.state()
    assert counted.checks == 2


async def test_a_write_failing_or_working_again_shows_at_once(
    check: DatabaseCheck, counted: Counted
) -> None:
    assert (await check.state()).detail == "ok"
    counted.db.writes.failed(StorageFull("the disk is full"))
    failing = await check.state()
    assert failing.readable and not failing.ok
    assert failing.detail.startswith("error: disk full since ")
    assert await check.state() is failing  # the same failure: no new check
    counted.db.writes.succeeded()
    assert (await check.state()).detail == "ok"
    assert counted.checks == 3


async def test_a_database_that_stops_answering_shows_once_the_check_is_due(
    check: DatabaseCheck, counted: Counted, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert (await check.state()).readable

    async def refused() -> None:
        raise StorageUnavailable("the database (x.db) cannot be used: an I/O error")

    monkeypatch.setattr(counted.db, "ping", refused)
    assert (await check.state()).readable  # as checked a moment ago
    clock.now += 1.0
    down = await check.state()
    assert not down.readable and down.detail.startswith("error: ")


async def test_callers_that_find_the_check_due_share_one(
    check: DatabaseCheck, counted: Counted
) -> None:
    states = await asyncio.gather(*(check.state() for _ in range(20)))
    assert counted.checks == 1
    assert all(s is states[0] for s in states)


async def test_now_checks_even_when_the_last_check_is_recent(
    check: DatabaseCheck, counted: Counted
) -> None:
    await check.state()
    await check.state(now=True)
    assert counted.checks == 2


async def test_a_check_that_fails_is_not_kept(
    check: DatabaseCheck, counted: Counted, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(_min_free_mb: float) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(counted.db, "state", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        await check.state()
    monkeypatch.undo()
    assert (await check.state()).detail == "ok"
