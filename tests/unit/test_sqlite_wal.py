"""Turning a new SQLite file to WAL while another connection holds its lock
(orchestra.db.sqlite_setup.to_wal): a locked answer is tried again until the lock goes,
within the patience given. Real SQLite files and locks; the busy timeout is 0 here, so each
locked answer comes at once, as it does when two connections deadlock on the conversion."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from orchestra.db.sqlite_setup import to_wal


def _held(path: Path) -> sqlite3.Connection:
    """A connection holding the new file's exclusive lock."""
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    return holder


def test_a_locked_new_database_turns_to_wal_once_the_lock_goes(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    holder = _held(path)
    release = threading.Timer(0.2, holder.execute, ("COMMIT",))
    waiter = sqlite3.connect(path, timeout=0, isolation_level=None)
    started = time.monotonic()
    release.start()
    try:
        to_wal(waiter.cursor(), patience=10)
    finally:
        release.join()
        holder.close()
    assert time.monotonic() - started >= 0.15  # it waited for the lock, not around it
    assert waiter.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    waiter.close()


def test_a_lock_held_past_the_patience_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    holder = _held(path)
    waiter = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            to_wal(waiter.cursor(), patience=0.1)
    finally:
        waiter.close()
        holder.close()
