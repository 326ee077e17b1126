"""Opening SQLite connections: the pragmas every connection of the service sets, and WAL mode.

Each connection: a busy timeout (set first), WAL mode (kept in the file), ``synchronous``
(NORMAL, or FULL as ``[database] synchronous`` says) and foreign keys; transaction control
taken from the ``sqlite3`` module, so that the "begin" event emits the BEGIN wanted
(``BEGIN IMMEDIATE`` for the writer).

A new database file is made readable and writable by its owner alone (:func:`create_private`):
it holds webhook secrets, API key hashes and every task's data. SQLite gives the ``-wal`` and
``-shm`` files it makes beside it the database file's permissions.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

#: The permissions of a database file Orchestra creates: its owner's alone.
PRIVATE_MODE = 0o600


def create_private(path: Path) -> bool:
    """Create ``path``, empty, with :data:`PRIVATE_MODE` (SQLite takes an empty file for a
    new database), unless it exists: an existing file keeps the mode it has (an operator may
    have widened it for a backup group). Returns whether it was created: not when it exists,
    nor when it cannot be made (a folder not writable), which SQLite then reports as before,
    in the words the service's checks expect.
    """
    try:
        # O_EXCL: never touches a file that exists, even one made meanwhile by another
        # process starting on the same path.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
    except OSError:
        return False
    os.close(fd)
    return True


def to_wal(cursor: Any, patience: float) -> None:
    """Put the database in WAL mode (kept in the file: a no-op once it is).

    Connections that turn a new database to WAL at the same moment can each hold the shared
    lock the other must see released; SQLite answers one of them "database is locked" at
    once, without waiting out the busy timeout (it would wait forever). Three processes
    starting on one new file hit it. So a locked answer is tried again, with a growing
    pause, for ``patience`` seconds.

    Raises:
        sqlite3.OperationalError: still locked after ``patience`` seconds, or another error.
    """
    deadline = time.monotonic() + patience
    pause = 0.001
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)  # a connection being opened, once: the writer's or a reader's
        pause = min(pause * 2, 0.05)


#: The first and the longest pause between two tries of a BEGIN IMMEDIATE that found the write
#: lock taken, in seconds.
BEGIN_PAUSE = 0.0001
BEGIN_PAUSE_MAX = 0.002


def begin_waiting(
    raw: sqlite3.Connection, busy_timeout_ms: int, *, within_ms: float | None = None
) -> None:
    """BEGIN IMMEDIATE, waiting up to ``busy_timeout_ms`` (or ``within_ms``, what is left of
    it) for a write lock another process holds, trying again after 0.1 ms, then twice as
    long each time, up to 2 ms.

    SQLite's own busy handler sleeps 1, 2, 5, 10, 15… ms between its tries, while another
    Orchestra process holds the lock for a group commit of 0.1–0.3 ms and takes it again soon
    after: the waiter slept through the gaps (two processes on one file ran 1.09 times one).
    The rest of the transaction keeps the busy timeout (a statement inside it rarely waits in
    WAL mode). Python's ``sqlite3`` offers no busy handler of one's own, hence the loop.

    Raises:
        sqlite3.OperationalError: still locked after the busy timeout ("database is locked"),
            or another error.
    """
    deadline = time.monotonic() + (busy_timeout_ms if within_ms is None else within_ms) / 1000
    pause = BEGIN_PAUSE
    raw.execute("PRAGMA busy_timeout = 0")
    try:
        while True:
            try:
                raw.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                busy = exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY
                if not busy or time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, BEGIN_PAUSE_MAX)
    finally:
        raw.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")


def setup(engine: Engine, *, begin: str, busy_timeout_ms: int, synchronous: str = "normal") -> None:
    """Give every connection ``engine`` opens the service's pragmas, and have SQLAlchemy's
    transactions start with ``begin`` ("BEGIN IMMEDIATE" for the writer)."""
    level = {"normal": "NORMAL", "full": "FULL"}[synchronous]

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module (SQLAlchemy's documented
        # recipe for SQLite): the "begin" hook below emits the BEGIN we want.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        to_wal(cursor, busy_timeout_ms / 1000)
        cursor.execute(f"PRAGMA synchronous={level}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # The writer's group commit opens its transaction on the sqlite3 connection itself
        # (SqliteDatabase._begin); SQLAlchemy's own begin, when a unit inside it runs Core,
        # then only joins it.
        if not conn.connection.driver_connection.in_transaction:
            conn.exec_driver_sql(begin)


def reader_engine(url: str, *, pool_size: int, busy_timeout_ms: int) -> AsyncEngine:
    """The async engine of the read connections (a pool of ``pool_size``)."""
    engine = create_async_engine(url, pool_size=pool_size, max_overflow=0, pool_timeout=60)
    setup(engine.sync_engine, begin="BEGIN", busy_timeout_ms=busy_timeout_ms)
    return engine
