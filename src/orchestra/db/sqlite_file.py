"""The SQLite file a process opened, as the file system has it now.

A database file deleted or moved while the service has it open goes unnoticed by SQLite:
its writes go on into the open file, which nothing can open again, every read answers, and
the next start makes an empty database at the path (every task since is gone). Its
write-ahead log deleted (``orch.db-wal``) is as bad: the writes not yet copied into the
database are in a file only this process holds, and another process opening the database
starts a log of its own beside it. :meth:`DatabaseFile.replaced` tells either, for /health
(``degraded``, with what to do), the writable gauge and a warning in the log.
"""

from __future__ import annotations

import os
from pathlib import Path

from orchestra import logs
from orchestra.db.failures import free_bytes

log = logs.get("orchestra.db")

#: Where this process's open files are listed (Linux); elsewhere a deleted log is not seen.
_OPEN_FILES = Path("/proc/self/fd")


def _identity(path: Path) -> tuple[int, int] | None:
    """The file at ``path`` (device, inode), or None when there is none."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino


def _holds_deleted(path: Path) -> bool:
    """Whether this process has ``path`` open though it was deleted."""
    deleted = f"{path} (deleted)"
    try:
        names = os.listdir(_OPEN_FILES)
    except OSError:
        return False
    for name in names:
        try:
            if os.readlink(_OPEN_FILES / name) == deleted:
                return True
        except OSError:  # closed meanwhile
            continue
    return False


class DatabaseFile:
    """The database file at ``path`` as it was when opened, and its write-ahead log."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.wal = path.with_name(path.name + "-wal")
        self._opened = _identity(path)
        self._said: str | None = None

    def free_mb(self) -> float | None:
        """Free space on the file's disk, in MB (None when it cannot be told)."""
        free = free_bytes(self.path)
        return None if free is None else free / (1024 * 1024)

    def replaced(self) -> str | None:
        """What happened to the file since this process opened it ("the database file …
        was deleted or moved …"), or None while it is the one at its path; a change is
        logged once (``database.file_replaced``, a warning; ``database.file_back``)."""
        problem = self._problem()
        if problem != self._said:
            if problem is None:
                log.info("database.file_back", path=str(self.path))
            else:
                log.warning("database.file_replaced", path=str(self.path), problem=problem)
            self._said = problem
        return problem

    def _problem(self) -> str | None:
        if self._opened is None:  # not there when opened (an in-memory test, a race)
            self._opened = _identity(self.path)
            return None
        now = _identity(self.path)
        if now != self._opened:
            what = "deleted or moved" if now is None else "replaced by another file"
            return (
                f"the database file {self.path} was {what} while this process had it open: "
                "its writes since go to a file nothing else can open, lost when it stops; "
                "put the file back (docs/install.md, Backups)"
            )
        if _holds_deleted(self.wal):
            return (
                f"the database file {self.wal} (its write-ahead log) was deleted while this "
                "process had it open: another process opening the database would not see "
                "its writes; stop every process on this database (a graceful stop copies "
                "the log into the database) and start again"
            )
        return None
