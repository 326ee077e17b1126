"""When the database itself fails: SQLite's errors in words, and how writes have been going.

SQLite reports a full disk, a lock held past the busy timeout, a read-only file or an I/O
error with a result code on the exception (``sqlite_errorcode``, Python 3.11+).
:func:`storage_error` turns those into the error tree's :class:`~orchestra.errors.StorageError`
kinds, with a message that says what to do; any other error is left as it is (a bug, or a
constraint the caller handles).

:class:`WriteHealth` keeps the outcome of the writer's latest transaction, so /health tells
the truth about writes: a read-only probe would answer "ok" while every write fails.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import msgspec

from orchestra import logs
from orchestra.domain import iso, now
from orchestra.errors import StorageError, StorageFull, StorageLocked, StorageUnavailable

log = logs.get("orchestra.db")

# SQLite's primary result codes (the low byte of an extended code). SQLITE_LOCKED (6), a
# conflict inside one connection, is a bug here, not the database failing: it stays a 500.
_FULL = 13
_BUSY = 5
_READONLY = 8
_UNAVAILABLE = {
    10: "an I/O error",  # SQLITE_IOERR
    11: "the file is corrupt",  # SQLITE_CORRUPT
    14: "the file cannot be opened",  # SQLITE_CANTOPEN
    15: "a locking protocol error",  # SQLITE_PROTOCOL
    26: "the file is not a database",  # SQLITE_NOTADB
}


def storage_error(exc: BaseException, path: Path) -> StorageError | None:
    """The :class:`StorageError` an exception from SQLite (raw, or wrapped by SQLAlchemy)
    stands for, or None when it is not a failure of the database itself."""
    seen: BaseException | None = exc
    while seen is not None and not isinstance(seen, sqlite3.Error):
        seen = getattr(seen, "orig", None) or seen.__cause__
    code = getattr(seen, "sqlite_errorcode", None)
    if code is None:
        return None
    primary = code & 0xFF
    detail = str(seen)
    if primary == _FULL:
        return StorageFull(f"the database's disk is full ({path}); free space and retry")
    if primary == _BUSY:
        return StorageLocked(
            f"database is locked by another connection (is a sqlite3 shell holding a "
            f"transaction on {path}?); retry shortly"
        )
    if primary == _READONLY:
        return StorageUnavailable(f"the database ({path}) is read-only: {detail}")
    if primary in _UNAVAILABLE:
        return StorageUnavailable(
            f"the database ({path}) cannot be used: {_UNAVAILABLE[primary]} ({detail})"
        )
    return None


class WriteFailure(msgspec.Struct, frozen=True):
    """Writes have been failing since ``since``, the latest for ``error``."""

    error: StorageError
    since: datetime
    #: The file's size in pages when it failed (a full disk is over once it grows).
    pages: int | None = None

    def describe(self) -> str:
        """``error: disk full since 2026-12-01T09:00:32.000000Z``."""
        return f"error: {self.error.condition} since {iso(self.since)}"


class WriteHealth:
    """The outcome of the writer's latest transaction. Only the writer's thread changes it,
    each time by swapping one frozen struct, so readers on other threads need no lock."""

    def __init__(self) -> None:
        self._failure: WriteFailure | None = None

    @property
    def failure(self) -> WriteFailure | None:
        """Since when, and why, writes fail; None while they succeed."""
        return self._failure

    def failed(self, error: StorageError, pages: int | None = None) -> None:
        """A write failed for ``error`` (the file had ``pages`` pages); since when writes
        fail stays the first failure's time."""
        since = self._failure.since if self._failure is not None else now()
        self._failure = WriteFailure(error=error, since=since, pages=pages)

    def succeeded(self) -> bool:
        """Writes work (again); True when they were failing until now."""
        was_failing, self._failure = self._failure is not None, None
        return was_failing


class DatabaseState(msgspec.Struct, frozen=True):
    """The database as /health reports it."""

    #: Whether it answers a read now.
    readable: bool
    #: Whether it is well: readable, writes succeed, and there is room on its disk.
    ok: bool
    #: "ok", or what is wrong ("error: disk full since …", "low disk: 80 MB free").
    detail: str


def free_bytes(path: Path) -> int | None:
    """Free space on the file system that holds ``path`` (None when it cannot be told)."""
    try:
        return shutil.disk_usage(path.parent if not path.is_dir() else path).free
    except OSError:
        return None


async def warn_when_low(
    free_mb: Callable[[], float | None], min_free_mb: float, path: Path | str, every: float = 60.0
) -> None:
    """Log ``database.low_disk`` every ``every`` seconds while the database's disk has less
    than ``min_free_mb`` free (0: never), until cancelled."""
    if min_free_mb <= 0:
        return
    while True:
        free = free_mb()
        if free is not None and free < min_free_mb:
            log.warning(
                "database.low_disk",
                free_mb=round(free, 1),
                min_free_mb=min_free_mb,
                path=str(path),
            )
        await asyncio.sleep(every)
