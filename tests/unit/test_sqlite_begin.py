"""A write transaction that finds another process's write lock
(orchestra.db.sqlite_setup.begin_waiting): it takes the lock soon after it is let go, not on
SQLite's own busy handler's schedule (1, 2, 5, 10… ms between tries, which slept through the
gaps between another Orchestra process's group commits), and gives up after the busy
timeout. Real SQLite files and locks."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from orchestra.db.sqlite_setup import begin_waiting
from tests.fixtures.servers import load_slack


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    return conn


def test_the_lock_is_taken_soon_after_the_other_lets_it_go(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    holder, waiter = _connect(path), _connect(path)
    waiter.execute("PRAGMA busy_timeout = 5000")
    holder.execute("BEGIN IMMEDIATE")  # another process's group commit, held 0.26 s
    released: list[float] = []

    def release() -> None:
        holder.execute("COMMIT")
        released.append(time.monotonic())

    timer = threading.Timer(0.26, release)
    timer.start()
    try:
        begin_waiting(waiter, 5000)
        taken = time.monotonic()
    finally:
        timer.join()
        holder.close()
    assert waiter.in_transaction
    # SQLite's own handler tries at 228 ms, then sleeps 100 ms: about 68 ms after a release
    # at 0.26 s it tries again; this waits at most 2 ms between tries.
    assert taken - released[0] < 0.03 * load_slack()
    waiter.execute("ROLLBACK")
    # The rest of a transaction keeps the service's busy timeout.
    assert waiter.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    waiter.close()


def test_a_lock_held_past_the_busy_timeout_is_database_is_locked(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    holder, waiter = _connect(path), _connect(path)
    holder.execute("BEGIN IMMEDIATE")
    started = time.monotonic()
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            begin_waiting(waiter, 150)
    finally:
        holder.close()
    assert time.monotonic() - started >= 0.14
    assert not waiter.in_transaction
    assert waiter.execute("PRAGMA busy_timeout").fetchone()[0] == 150
    waiter.close()
