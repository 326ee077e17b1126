"""The SQLite file a process opened, as the file system has it now.

A database file deleted or moved while the service has it open goes unnoticed by SQLite:
its writes go on into the open file, which nothing can open again, every read answers, and
the next start makes an empty database at the path (every task since is gone). Its
write-ahead log deleted (``orch.db-wal``) is as bad: the writes not yet copied into the
database are in a file only this process holds, and another process opening the database
starts a log of its own beside it. SQLite itself never deletes or replaces the log while a
connection of this process holds the database (each keeps a shared lock on it): a log that
is not the one first seen, while this process holds the first one deleted, was deleted from
outside.

:meth:`DatabaseFile.replaced` tells either, for /health (``degraded``, with what to do) and
the writable gauge; :meth:`DatabaseFile.refuse_writes` makes writes fail (503) meanwhile,
rather than answer 201 for what would be lost. A change is logged once, as a warning.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from orchestra import logs
from orchestra.db.failures import free_bytes
from orchestra.errors import StorageUnavailable

log = logs.get("orchestra.db")

#: Where this process's open files are listed (Linux).
_OPEN_FILES = Path("/proc/self/fd")
#: Seconds a look at the file is trusted by :meth:`DatabaseFile.refuse_writes`.
LOOK_EVERY = 1.0


def _identity(path: Path) -> tuple[int, int] | None:
    """The file at ``path`` (device, inode), or None when there is none."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino


def _holds_deleted(identity: tuple[int, int]) -> bool:
    """Whether this process has the file ``identity`` open though it was deleted (Linux;
    elsewhere: False)."""
    try:
        names = os.listdir(_OPEN_FILES)
    except OSError:
        return False
    for name in names:
        try:
            found = os.stat(_OPEN_FILES / name)
        except OSError:  # closed meanwhile
            continue
        if (found.st_dev, found.st_ino) == identity:
            return found.st_nlink == 0
    return False


class DatabaseFile:
    """The database file at ``path`` as it was when opened, and its write-ahead log."""

    def __init__(self, path: Path) -> None:
        self.path = Path(os.path.abspath(path))
        # SQLite keeps its log beside the file itself, past any symlink to it.
        real = Path(os.path.realpath(path))
        self.wal = real.with_name(real.name + "-wal")
        self._opened = _identity(self.path)
        self._wal: tuple[int, int] | None = None
        self._said: str | None = None
        self._looked = -LOOK_EVERY

    def replaced(self) -> str | None:
        """What happened to the file since this process opened it ("the database file …
        was deleted or moved …"), or None while it is the one at its path; a change is
        logged once (``database.file_replaced``, a warning; ``database.file_back``)."""
        problem = self._problem()
        self._looked = time.monotonic()
        if problem != self._said:
            if problem is None:
                log.info("database.file_back", path=str(self.path))
            else:
                log.warning("database.file_replaced", path=str(self.path), problem=problem)
            self._said = problem
        return problem

    def refuse_writes(self) -> None:
        """Raise while the file is not the one opened (looked at most every second).

        Raises:
            StorageUnavailable: saying what happened to it.
        """
        if time.monotonic() - self._looked >= LOOK_EVERY:
            self.replaced()
        if self._said is not None:
            raise StorageUnavailable(self._said)

    def _problem(self) -> str | None:
        if self._opened is None:  # not there when opened (a race with its creation)
            self._opened = _identity(self.path)
            return None
        now = _identity(self.path)
        if now != self._opened:
            what = "deleted or moved" if now is None else "replaced by another file"
            return (
                f"the database file {self.path} was {what} while this process had it open: "
                "its writes are refused, as they would go to a file nothing else can open; "
                "stop the service, put the file back and start it again (docs/install.md)"
            )
        wal = _identity(self.wal)
        if self._wal is None or wal == self._wal:
            self._wal = wal  # its log, once it has one
        elif not _holds_deleted(self._wal):
            self._wal = wal  # made anew while no connection held it (a writer reopened)
        else:
            return (
                f"the database file {self.wal} (its write-ahead log) was deleted while this "
                "process had it open: its writes are refused, as another process opening the "
                "database would not see them; stop every process on this database (a graceful "
                "stop copies the log into the database) and start again"
            )
        return None

    def free_mb(self) -> float | None:
        """Free space on the file's disk, in MB (None when it cannot be told)."""
        free = free_bytes(self.path)
        return None if free is None else free / (1024 * 1024)
